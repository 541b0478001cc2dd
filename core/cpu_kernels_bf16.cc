// cpu_kernels_isa.h's bfloat16 products (MatmulPrecision::kMedium) for CPUs with AVX-512 BF16
// (compiled with -mavx512f -mavx512bf16; see core/CMakeLists.txt). A decode step over bfloat16
// weights widened to float32 spends three instructions per 16 weights (widen, shift, fused
// multiply-add) where vdpbf16ps spends one per 32, and on the 2-core EPYC measured that work,
// not memory, capped the 1.1B model's decode (see README, "--matmul_precision").
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

#include "core/cpu_kernels_avx512_vec.inc"

// Inputs per vdpbf16ps: 32 bfloat16 of x times 32 of w, into 16 float32 lanes.
constexpr int64_t kDot = 32;
constexpr int kDotChains = 4;
// Outputs per tile when several rows of x share each weight vector: 4 rows × 6 outputs take
// 24 of the 32 registers, as LinearAvx512's tiles do.
constexpr int kDotTile = 6;

// bfloat16 to float32 as vdpbf16ps reads its inputs: subnormals as zero (it flushes them).
inline float Bf16ToFloat(uint16_t v) {
  const uint32_t u = (v & 0x7F80u) == 0 ? static_cast<uint32_t>(v & 0x8000u) << 16
                                        : static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// float32 to bfloat16 as vcvtne2ps2bf16 converts, for the inputs past the last whole vector:
// nearest even, a NaN kept quiet, a subnormal flushed to zero.
inline uint16_t FloatToBf16(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7F800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline __m512 Dot(__m512 acc, const uint16_t* x, const uint16_t* w) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)),
                          reinterpret_cast<__m512bh>(_mm512_loadu_si512(w)));
}

// An output's sum of its whole vectors, finished: the inputs past them, the bias, the scale,
// stored (or added) into y, in LinearAvx512's order.
inline void Finish(const LinearArgs& a, float s, const uint16_t* xr, const uint16_t* wr, int64_t kv,
                   int64_t m, int64_t n) {
  for (int64_t k = kv; k < a.k; ++k) s = __builtin_fmaf(Bf16ToFloat(xr[k]), Bf16ToFloat(wr[k]), s);
  if (a.b != nullptr) s += a.b[n];
  if (a.scale != 1.0f) {
    s *= a.scale;
    asm("" : "+x"(s));  // Rounded here, never fused into the add below.
  }
  float& out = a.y[m * a.ldy + n];
  out = a.accumulate ? out + s : s;
}

inline float Combine(__m512 c0, __m512 c1, __m512 c2, __m512 c3) {
  return Vec::Sum(Vec::Add(Vec::Add(c0, c1), Vec::Add(c2, c3)));
}

// One row of x: each weight row read alone, start to end, four chains in flight.
void DotOneRow(const LinearArgs& a, int64_t n0, int64_t n1) {
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  const uint16_t* x = a.xb;
  const int64_t kv = a.k - a.k % kDot;
  constexpr int64_t kStep = kDotChains * kDot;
  const int64_t kq = kv - kv % kStep;
  const StreamAhead ahead(a, n1, sizeof(uint16_t));
  for (int64_t n = n0; n < n1; ++n) {
    const uint16_t* wr = w + n * a.ldw;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    int64_t k = 0;
    for (; k < kq; k += kStep) {
      ahead.Step(wr + k, kStep * sizeof(uint16_t));
      c0 = Dot(c0, x + k, wr + k);
      c1 = Dot(c1, x + k + kDot, wr + k + kDot);
      c2 = Dot(c2, x + k + 2 * kDot, wr + k + 2 * kDot);
      c3 = Dot(c3, x + k + 3 * kDot, wr + k + 3 * kDot);
    }
    // The last vectors (fewer than four) go to the chains 0, 1, 2 in turn.
    if (k < kv) {
      c0 = Dot(c0, x + k, wr + k);
      k += kDot;
    }
    if (k < kv) {
      c1 = Dot(c1, x + k, wr + k);
      k += kDot;
    }
    if (k < kv) c2 = Dot(c2, x + k, wr + k);
    Finish(a, Combine(c0, c1, c2, c3), x, wr, kv, 0, n);
  }
}

// Rows [m, m + MB) × outputs [n, n + nb) for several rows of x, each weight vector loaded once
// for the MB rows; pass c of the chains adds the vectors c, c + 4, ..., so every output is the
// sum DotOneRow() gives. Outputs past nb repeat the last one and are not stored. Weight rows
// [pf_begin, pf_end) of `next` (the next tile) are prefetched into L2, as LinearAvx512 does.
template <int MB, int NB>
void DotTile(const LinearArgs& a, int64_t m, int64_t n, int nb, const uint16_t* next, int pf_begin,
             int pf_end) {
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  const uint16_t* xr[MB];
  for (int i = 0; i < MB; ++i) xr[i] = a.xb + (m + i) * a.ldxb;
  const uint16_t* wr[NB];
  for (int j = 0; j < NB; ++j) wr[j] = w + (n + (j < nb ? j : nb - 1)) * a.ldw;
  const int64_t kv = a.k - a.k % kDot;
  __m512 chain[kDotChains][MB][NB];
  for (int c = 0; c < kDotChains; ++c) {
    __m512 acc[MB][NB];
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    }
    for (int64_t k = c * kDot; k < kv; k += kDotChains * kDot) {
      for (int j = pf_begin; j < pf_end; ++j) {  // One 64-byte line per row and vector.
        _mm_prefetch(reinterpret_cast<const char*>(next + j * a.ldw + k), _MM_HINT_T1);
      }
      __m512i wv[NB];
      for (int j = 0; j < NB; ++j) wv[j] = _mm512_loadu_si512(wr[j] + k);
      for (int i = 0; i < MB; ++i) {
        const __m512bh xv = reinterpret_cast<__m512bh>(_mm512_loadu_si512(xr[i] + k));
        for (int j = 0; j < NB; ++j)
          acc[i][j] = _mm512_dpbf16_ps(acc[i][j], xv, reinterpret_cast<__m512bh>(wv[j]));
      }
    }
    for (int i = 0; i < MB; ++i) {
      for (int j = 0; j < NB; ++j) chain[c][i][j] = acc[i][j];
    }
  }
  for (int i = 0; i < MB; ++i) {
    for (int j = 0; j < nb; ++j) {
      Finish(a, Combine(chain[0][i][j], chain[1][i][j], chain[2][i][j], chain[3][i][j]), xr[i],
             wr[j], kv, m + i, n + j);
    }
  }
}

}  // namespace

void RoundRowsBf16(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out) {
  for (int64_t i = 0; i < m; ++i) {
    const float* xr = x + i * ldx;
    uint16_t* o = out + i * k;
    int64_t j = 0;
    for (; j + kDot <= k; j += kDot) {
      const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xr + j + 16), _mm512_loadu_ps(xr + j));
      _mm512_storeu_si512(o + j, reinterpret_cast<__m512i>(v));
    }
    for (; j < k; ++j) o[j] = FloatToBf16(xr[j]);
  }
}

void LinearBf16Dot(const LinearArgs& a, int64_t n0, int64_t n1) {
  if (a.m == 1) {
    DotOneRow(a, n0, n1);
    return;
  }
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  for (int64_t n = n0; n < n1; n += kDotTile) {
    const int nb = static_cast<int>(n1 - n < kDotTile ? n1 - n : kDotTile);
    // The passes over this tile (4 rows of x each) share the prefetch of the next tile
    // (inside [n0, n1) only); the last tile prefetches a.w_next, when given.
    const bool last = n + kDotTile >= n1;
    const bool has_next = n + 2 * kDotTile <= n1 || (last && a.w_next != nullptr);
    const uint16_t* next =
        last ? static_cast<const uint16_t*>(a.w_next) : w + (n + kDotTile) * a.ldw;
    const int64_t passes = (a.m + 3) / 4;
    const int share = static_cast<int>((kDotTile + passes - 1) / passes);
    int pf = 0;
    auto range_end = [&] {
      return has_next ? (pf + share < kDotTile ? pf + share : kDotTile) : pf;
    };
    int64_t m = 0;
    for (; m + 4 <= a.m; m += 4, pf = range_end())
      DotTile<4, kDotTile>(a, m, n, nb, next, pf, range_end());
    switch (a.m - m) {
      case 3:
        DotTile<3, kDotTile>(a, m, n, nb, next, pf, range_end());
        break;
      case 2:
        DotTile<2, kDotTile>(a, m, n, nb, next, pf, range_end());
        break;
      case 1:
        DotTile<1, kDotTile>(a, m, n, nb, next, pf, range_end());
        break;
      default:
        break;
    }
  }
}

}  // namespace adapterd::core::cpu
