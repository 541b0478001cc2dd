// cpu_kernels_isa.h for AVX2 + FMA + F16C (compiled with -mavx2 -mfma -mf16c; see core/CMakeLists.txt).
#include <immintrin.h>
#include <math.h>

#include <cmath>
#include <type_traits>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

struct Vec {
  using T = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kTile = 3;  // 4 rows × 3 outputs: 12 accumulators of the 16 registers.
  static T Zero() { return _mm256_setzero_ps(); }
  static T Set1(float v) { return _mm256_set1_ps(v); }
  static T Load(const float* p) { return _mm256_loadu_ps(p); }
  // Eight bfloat16 values widened to float32 (the bits move to the high half).
  static T LoadBf16(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  // Eight float16 values widened to float32 (F16C, exact).
  static T LoadF16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  // Eight int8 values widened to float32 (exact).
  static T LoadI8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static void Store(float* p, T v) { _mm256_storeu_ps(p, v); }
  static T Fma(T a, T b, T c) { return _mm256_fmadd_ps(a, b, c); }
  static T Mul(T a, T b) { return _mm256_mul_ps(a, b); }
  // `v` as it is now, rounded: GCC contracts a product and a later sum into one FMA
  // (-ffp-contract=fast) unless the product has to be materialised first.
  static T Materialize(T v) {
    asm("" : "+v"(v));
    return v;
  }
  static T Add(T a, T b) { return _mm256_add_ps(a, b); }
  static T Sub(T a, T b) { return _mm256_sub_ps(a, b); }
  // Exp()'s pieces: min(max(x, lo), hi), floor, y·2^n (n integral within [-126, 127]: built
  // in the exponent bits), and y where x >= lo, else 0.
  static T Clamp(T x, float lo, float hi) { return _mm256_max_ps(_mm256_min_ps(x, Set1(hi)), Set1(lo)); }
  static T Floor(T x) { return _mm256_floor_ps(x); }
  static T ScaleByPow2(T y, T n) {
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
  }
  static T ZeroBelow(T y, T x, float lo) { return _mm256_and_ps(y, _mm256_cmp_ps(x, Set1(lo), _CMP_GE_OQ)); }
  static float Sum(T v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "core/cpu_kernels_impl.inc"

// The w8a8 kernel (cpu_kernels_isa.h), for CPUs without VNNI: vpmaddubsw pairs, vpmaddwd to
// int32, then an add. Two rows a tile, as the 16 registers allow.
struct Int8Dot {
  static __m256i Add(__m256i sums, __m256i u, __m256i s) {
    return _mm256_add_epi32(sums, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
};

#include "core/cpu_kernels_w8a8.inc"

}  // namespace

void LinearAvx2(const LinearArgs& args, int64_t n0, int64_t n1) { LinearTiles(args, n0, n1); }
void AttendAvx2(const AttendArgs& args) { AttendHead(args); }
void ExpandAvx2(const ExpandArgs& args, int64_t o0, int64_t o1) { Expand(args, o0, o1); }

void W8A8Avx2(const W8A8Args& args, int64_t p0, int64_t p1) { W8A8Panels<2>(args, p0, p1); }

void QuantizeRowsAvx2(const float* x, int64_t ldx, int64_t m, int64_t k, const QuantizedRows& out) {
  const int64_t blocks = k / kInt8Block;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* p = x + i * ldx + b * kInt8Block;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      for (int t = 0; t < 4; ++t) {
        v[t] = _mm256_loadu_ps(p + 8 * t);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[t], abs_mask));
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float scale = _mm_cvtss_f32(h) / 127.0f;
      const __m256 inverse = _mm256_set1_ps(scale > 0 ? 1.0f / scale : 0.0f);
      __m256i r[4];
      for (int t = 0; t < 4; ++t) {
        // Rounded to nearest even (the default rounding mode), as torch.round rounds.
        r[t] = _mm256_max_epi32(lo, _mm256_min_epi32(hi, _mm256_cvtps_epi32(_mm256_mul_ps(v[t], inverse))));
      }
      // int32 → int16 → int8; the packs interleave 128-bit lanes, the permutation undoes it.
      const __m256i q = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q + i * k + b * kInt8Block), q);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.magnitude + i * k + b * kInt8Block), _mm256_abs_epi8(q));
      out.scales[i * blocks + b] = scale;
    }
  }
}

}  // namespace adapterd::core::cpu
