// The w8a8 kernel of cpu_kernels_isa.h for CPUs with AVX-512 VNNI (compiled with -mavx512f
// -mavx512bw -mavx512vl -mavx512vnni; see core/CMakeLists.txt). vpdpbusd adds four byte
// products to each int32 lane in one instruction, where AVX2 takes three; its 256-bit form
// (AVX-512VL) keeps the panel layout of the AVX2 kernel, and the 32 vector registers hold
// four rows' sums and accumulators for two panels. Many-row steps take 512-bit vectors over
// four panels (W8A8Tile512).
#include <immintrin.h>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

struct Int8Dot {
  static __m256i Add(__m256i sums, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(sums, u, s); }
};

#include "core/cpu_kernels_w8a8.inc"

// Panels [p, p + 4) for rows [i0, i0 + R) in 512-bit vectors, for many-row (prefill) steps
// where the products, not memory, bound the time: each vector holds two panels side by side
// (16 outputs × 4 inputs), so a row's 4 inputs take one sign mask for all four panels, then a
// masked negate and one vpdpbusd per two panels (AVX-512 has no vpsignb). The sums and the
// float steps are those of W8A8Tile, in the same order, so the results are bit for bit equal.
// (All-ones masked forms: the unmasked ones trip GCC 12's -Wmaybe-uninitialized through
// _mm512_undefined_*.)
template <int R>
void W8A8Tile512(const W8A8Args& a, int64_t i0, int64_t p) {
  const int64_t blocks = a.k / kInt8Block;
  const int8_t* w[4];
  const float* ws[4];
  for (int j = 0; j < 4; ++j) {
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
  const __m512i zero = _mm512_setzero_si512();
  __m512 acc[R][2];
  for (int i = 0; i < R; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i sums[R][2];
    for (int i = 0; i < R; ++i) sums[i][0] = sums[i][1] = zero;
    for (int64_t k = b * kInt8Block; k < (b + 1) * kInt8Block; k += 4) {
      __m512i wv[2];
      for (int h = 0; h < 2; ++h) {
        const __m512i lo = _mm512_maskz_loadu_epi64(0x0f, w[2 * h] + k * kW8A8Panel);
        const __m256i hi =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[2 * h + 1] + k * kW8A8Panel));
        wv[h] = _mm512_maskz_inserti64x4(0xff, lo, hi, 1);
      }
      for (int i = 0; i < R; ++i) {
        int32_t q4, m4;
        __builtin_memcpy(&q4, xq[i] + k, 4);
        __builtin_memcpy(&m4, xm[i] + k, 4);
        const __mmask64 negative = _mm512_movepi8_mask(_mm512_set1_epi32(q4));
        const __m512i magnitude = _mm512_set1_epi32(m4);
        for (int h = 0; h < 2; ++h) {
          // w where x >= 0, -w where x < 0 (|w| <= 127: no overflow), as vpsignb gives; a zero
          // x has a zero magnitude, so its product is 0 either way.
          const __m512i signed_w = _mm512_mask_sub_epi8(wv[h], negative, zero, wv[h]);
          sums[i][h] = _mm512_dpbusd_epi32(sums[i][h], magnitude, signed_w);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const __m512 scale = _mm512_castpd_ps(_mm512_maskz_insertf64x4(
          0xff, _mm512_castps_pd(_mm512_maskz_loadu_ps(0x00ff, ws[2 * h] + b * kW8A8Panel)),
          _mm256_castps_pd(_mm256_loadu_ps(ws[2 * h + 1] + b * kW8A8Panel)), 1));
      for (int i = 0; i < R; ++i) {
        __m512 d = _mm512_mul_ps(scale, _mm512_set1_ps(xs[i][b]));
        asm("" : "+v"(d));  // Rounded on its own, not contracted into the fma.
        acc[i][h] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(0xffff, sums[i][h]), d, acc[i][h]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    for (int h = 0; h < 2; ++h) {
      alignas(64) float out[2 * kW8A8Panel];
      _mm512_store_ps(out, acc[i][h]);
      const int64_t n0 = (p + 2 * h) * kW8A8Panel;
      float* y = a.y + (i0 + i) * a.ldy + n0;
      for (int64_t o = 0; o < 2 * kW8A8Panel && n0 + o < a.n; ++o) {
        y[o] = a.b != nullptr ? out[o] + a.b[n0 + o] : out[o];
      }
    }
  }
}

}  // namespace

void W8A8Vnni(const W8A8Args& args, int64_t p0, int64_t p1) {
  // Decode rows (memory-bound) and the panels left over: 256-bit vectors.
  if (args.m < kW8A8WideRows) {
    W8A8Panels<4>(args, p0, p1);
    return;
  }
  int64_t p = p0;
  for (; p + 4 <= p1; p += 4) {
    int64_t i = 0;
    for (; i + 4 <= args.m; i += 4) W8A8Tile512<4>(args, i, p);
    for (; i < args.m; ++i) W8A8Tile512<1>(args, i, p);
  }
  if (p < p1) W8A8Panels<4>(args, p, p1);
}

}  // namespace adapterd::core::cpu
