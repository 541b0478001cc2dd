// cpu_kernels_isa.h for AVX-512F (compiled with -mavx512f -mfma -mf16c; see core/CMakeLists.txt).
#include <immintrin.h>
#include <math.h>

#include <cmath>
#include <type_traits>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

struct Vec {
  using T = __m512;
  static constexpr int kLanes = 16;
  static constexpr int kTile = 6;  // 4 rows × 6 outputs: 24 accumulators of the 32 registers.
  static T Zero() { return _mm512_setzero_ps(); }
  static T Set1(float v) { return _mm512_set1_ps(v); }
  static T Load(const float* p) { return _mm512_loadu_ps(p); }
  // Sixteen bfloat16 values widened to float32 (the bits move to the high half). All-ones
  // masked forms, for the reason given at Sum().
  static T LoadBf16(const uint16_t* p) {
    const __m512i wide =
        _mm512_maskz_cvtepu16_epi32(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xffff, wide, 16));
  }
  // Sixteen float16 values widened to float32 (exact); the all-ones masked form, as at Sum().
  static T LoadF16(const uint16_t* p) {
    return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  // Sixteen int8 values widened to float32 (exact); the all-ones masked forms, as at Sum().
  static T LoadI8(const int8_t* p) {
    return _mm512_maskz_cvtepi32_ps(
        0xffff, _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static void Store(float* p, T v) { _mm512_storeu_ps(p, v); }
  static T Fma(T a, T b, T c) { return _mm512_fmadd_ps(a, b, c); }
  static T Mul(T a, T b) { return _mm512_mul_ps(a, b); }
  // `v` as it is now, rounded: GCC contracts a product and a later sum into one FMA
  // (-ffp-contract=fast) unless the product has to be materialised first.
  static T Materialize(T v) {
    asm("" : "+v"(v));
    return v;
  }
  static T Add(T a, T b) { return _mm512_add_ps(a, b); }
  static T Sub(T a, T b) { return _mm512_sub_ps(a, b); }
  // Exp()'s pieces: min(max(x, lo), hi), floor, y·2^n (n integral), and y where x >= lo, else 0.
  static T Clamp(T x, float lo, float hi) {
    return _mm512_maskz_max_ps(0xffff, _mm512_maskz_min_ps(0xffff, x, Set1(hi)), Set1(lo));
  }
  static T Floor(T x) {
    return _mm512_maskz_roundscale_ps(0xffff, x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  }
  static T ScaleByPow2(T y, T n) { return _mm512_maskz_scalef_ps(0xffff, y, n); }
  static T ZeroBelow(T y, T x, float lo) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, Set1(lo), _CMP_GE_OQ), y);
  }
  // (_mm512_reduce_add_ps and the unmasked shuffles trip GCC 12's -Wuninitialized through
  // _mm512_undefined_ps; the all-ones masked forms do not.)
  static float Sum(T v) {
    v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm512_add_ps(v, _mm512_maskz_shuffle_f32x4(0xffff, v, v, _MM_SHUFFLE(2, 3, 0, 1)));
    __m128 s = _mm512_maskz_extractf32x4_ps(0xf, v, 0);
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#include "core/cpu_kernels_impl.inc"

}  // namespace

void LinearAvx512(const LinearArgs& args, int64_t n0, int64_t n1) { LinearTiles(args, n0, n1); }
void AttendAvx512(const AttendArgs& args) { AttendHead(args); }
void ExpandAvx512(const ExpandArgs& args, int64_t o0, int64_t o1) { Expand(args, o0, o1); }

}  // namespace adapterd::core::cpu
