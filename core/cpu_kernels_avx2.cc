// cpu_kernels_isa.h for AVX2 + FMA + F16C (compiled with -mavx2 -mfma -mf16c; see core/CMakeLists.txt).
#include <immintrin.h>
#include <math.h>

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

// The w8a8 kernel (cpu_kernels_isa.h). It is AVX2 only: an AVX-512 CPU runs it too.

// Rows R × panels P of W8A8Args: per block of 32 inputs, an int32 sum per (row, output) from
// 8 groups of 4 inputs, then one float fma per block. The products take the usual trick for
// an unsigned × signed byte multiply (vpmaddubsw): |x| times w with x's sign moved onto w,
// exact since |x|, |w| <= 127 keep each pair's sum within int16.
template <int R, int P>
void W8A8Tile(const W8A8Args& a, int64_t i0, int64_t p) {
  const int64_t blocks = a.k / kInt8Block;
  const int8_t* w[P];
  const float* ws[P];
  for (int j = 0; j < P; ++j) {
    w[j] = a.panels + (p + j) * a.k * kW8A8Panel;
    ws[j] = a.panel_scales + (p + j) * blocks * kW8A8Panel;
  }
  const int8_t* xq[R];
  const uint8_t* xm[R];
  const float* xs[R];
  for (int i = 0; i < R; ++i) {
    xq[i] = a.x.q + (i0 + i) * a.k;
    xm[i] = a.x.magnitude + (i0 + i) * a.k;
    xs[i] = a.x.scales + (i0 + i) * blocks;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][P];
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < P; ++j) acc[i][j] = _mm256_setzero_ps();
  }
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i sums[R][P];
    for (int i = 0; i < R; ++i) {
      for (int j = 0; j < P; ++j) sums[i][j] = _mm256_setzero_si256();
    }
    for (int64_t k = b * kInt8Block; k < (b + 1) * kInt8Block; k += 4) {
      __m256i wv[P];
      for (int j = 0; j < P; ++j) wv[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[j] + k * kW8A8Panel));
      for (int i = 0; i < R; ++i) {
        int32_t q4, m4;
        __builtin_memcpy(&q4, xq[i] + k, 4);
        __builtin_memcpy(&m4, xm[i] + k, 4);
        const __m256i sign = _mm256_set1_epi32(q4);
        const __m256i magnitude = _mm256_set1_epi32(m4);
        for (int j = 0; j < P; ++j) {
          const __m256i pairs = _mm256_maddubs_epi16(magnitude, _mm256_sign_epi8(wv[j], sign));
          sums[i][j] = _mm256_add_epi32(sums[i][j], _mm256_madd_epi16(pairs, ones));
        }
      }
    }
    for (int j = 0; j < P; ++j) {
      const __m256 scale = _mm256_loadu_ps(ws[j] + b * kW8A8Panel);
      for (int i = 0; i < R; ++i) {
        const __m256 d = _mm256_mul_ps(scale, _mm256_set1_ps(xs[i][b]));
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i][j]), Vec::Materialize(d), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int j = 0; j < P; ++j) {
      alignas(32) float out[kW8A8Panel];
      _mm256_store_ps(out, acc[i][j]);
      const int64_t n0 = (p + j) * kW8A8Panel;
      float* y = a.y + (i0 + i) * a.ldy + n0;
      for (int64_t o = 0; o < kW8A8Panel && n0 + o < a.n; ++o) y[o] = a.b != nullptr ? out[o] + a.b[n0 + o] : out[o];
    }
  }
}

template <int P>
void W8A8Rows(const W8A8Args& a, int64_t p) {
  int64_t i = 0;
  for (; i + 2 <= a.m; i += 2) W8A8Tile<2, P>(a, i, p);
  if (i < a.m) W8A8Tile<1, P>(a, i, p);
}

}  // namespace

void LinearAvx2(const LinearArgs& args, int64_t n0, int64_t n1) { LinearTiles(args, n0, n1); }
void AttendAvx2(const AttendArgs& args) { AttendHead(args); }
void ExpandAvx2(const ExpandArgs& args, int64_t o0, int64_t o1) { Expand(args, o0, o1); }

void W8A8Avx2(const W8A8Args& args, int64_t p0, int64_t p1) {
  int64_t p = p0;
  for (; p + 2 <= p1; p += 2) W8A8Rows<2>(args, p);
  if (p < p1) W8A8Rows<1>(args, p);
}

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
