// cpu_kernels_isa.h's kBf16Packed kernels (`--quantize bf16_packed`), compiled with -mavx512f
// -mavx512bw -mavx512bf16 (see core/CMakeLists.txt). A block of 128 weights is decoded with one
// vpshufb per 64 codes (the row's table is 16 bytes, so the in-lane shuffle is the lookup) and one
// vpunpck{l,h}bw per 32 weights, then multiplied as the unpacked kernels multiply: widened to
// float32 for LinearAvx512's sums, or straight into vdpbf16ps for LinearBf16Dot's. A decode step
// reads 1.5 bytes a weight instead of 2, and at the read bandwidth that is the step's time: on the
// 2-core EPYC the 1.1B shape decoded 34-37 tokens/s packed against 27-29 unpacked (README,
// "--quantize bf16_packed").
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

#include "core/cpu_kernels_avx512_vec.inc"

// Rows of weights decoded at a time for several rows of x: ~192 KB of bfloat16, which stays in
// L2 while the tiles read it once per four rows of x.
constexpr int64_t kDecodeBytes = int64_t{192} << 10;

// A block's four vectors of 32 bfloat16 weights, in order, from its 192 bytes at `b`, `table`
// holding the row's 16 high bytes in every 128-bit lane.
struct Block {
  __m512i w[4];
};

inline Block Decode(const uint8_t* b, __m512i table) {
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  const __m512i codes = _mm512_loadu_si512(b);
  const __m512i high0 = _mm512_shuffle_epi8(table, _mm512_and_si512(codes, low_nibbles));
  const __m512i high1 =
      _mm512_shuffle_epi8(table, _mm512_and_si512(_mm512_srli_epi16(codes, 4), low_nibbles));
  const __m512i low0 = _mm512_loadu_si512(b + 64);
  const __m512i low1 = _mm512_loadu_si512(b + 128);
  Block out;
  out.w[0] = _mm512_unpacklo_epi8(low0, high0);
  out.w[1] = _mm512_unpackhi_epi8(low0, high0);
  out.w[2] = _mm512_unpacklo_epi8(low1, high1);
  out.w[3] = _mm512_unpackhi_epi8(low1, high1);
  return out;
}

// Writes the escapes of the block at row position k0 (the row's next ones, from *e) back.
inline void Patch(Block& blk, int64_t k0, const PackedBf16Rows& p, int64_t& e, int64_t e_end) {
  for (; e < e_end && p.escape_pos[e] < k0 + kPackedBlock; ++e) {
    const int64_t t = p.escape_pos[e] - k0;
    const __m512i v = _mm512_set1_epi16(static_cast<int16_t>(p.escape_values[e]));
    const __mmask32 lane = __mmask32{1} << (t % 32);
    switch (t / 32) {
      case 0:
        blk.w[0] = _mm512_mask_mov_epi16(blk.w[0], lane, v);
        break;
      case 1:
        blk.w[1] = _mm512_mask_mov_epi16(blk.w[1], lane, v);
        break;
      case 2:
        blk.w[2] = _mm512_mask_mov_epi16(blk.w[2], lane, v);
        break;
      default:
        blk.w[3] = _mm512_mask_mov_epi16(blk.w[3], lane, v);
        break;
    }
  }
}

inline __m512i Table(const PackedBf16Rows& p, int64_t n) {
  return _mm512_maskz_broadcast_i32x4(
      0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p.tables + 16 * n)));
}

// Sixteen bfloat16 (the low or high half of a vector of 32) widened to float32, as Vec::LoadBf16
// (all-ones masked forms: the unmasked ones trip GCC 12's -Wmaybe-uninitialized).
inline __m512 WidenLow(__m512i w) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
      0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, _mm512_maskz_extracti64x4_epi64(0xff, w, 0)),
      16));
}
inline __m512 WidenHigh(__m512i w) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(
      0xffff, _mm512_maskz_cvtepu16_epi32(0xffff, _mm512_maskz_extracti64x4_epi64(0xff, w, 1)),
      16));
}

// The sum's end, as LinearAvx512's FinishOutput and LinearBf16Dot's Finish (rows are whole blocks).
inline void Finish(const LinearArgs& a, float s, int64_t n) {
  if (a.b != nullptr) s += a.b[n];
  if (a.scale != 1.0f) {
    s *= a.scale;
    asm("" : "+x"(s));  // Rounded here, never fused into the add below.
  }
  float& out = a.y[n];
  out = a.accumulate ? out + s : s;
}

// One row of x: vector j of 16 (float32) or 32 (bfloat16 products) weights into chain j % 4,
// as LinearOneRow and DotOneRow add them, the row's blocks one sequential stream.
template <bool kProducts>
void PackedOneRow(const LinearArgs& a, int64_t n0, int64_t n1) {
  const uint8_t* w = static_cast<const uint8_t*>(a.w);
  const PackedBf16Rows& p = *a.packed;
  const StreamAhead ahead(a.w, n1, a.ldw, a.w_next);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* b = w + n * a.ldw;
    const __m512i table = Table(p, n);
    int64_t e = p.escape_offsets[n];
    const int64_t e_end = p.escape_offsets[n + 1];
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int64_t k = 0; k < a.k; k += kPackedBlock, b += kPackedBlockBytes) {
      ahead.Step(b, kPackedBlockBytes);
      Block blk = Decode(b, table);
      if (e < e_end && p.escape_pos[e] < k + kPackedBlock) Patch(blk, k, p, e, e_end);
      if constexpr (kProducts) {
        const uint16_t* x = a.xb + k;
        c0 = _mm512_dpbf16_ps(c0, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x)),
                              reinterpret_cast<__m512bh>(blk.w[0]));
        c1 = _mm512_dpbf16_ps(c1, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + 32)),
                              reinterpret_cast<__m512bh>(blk.w[1]));
        c2 = _mm512_dpbf16_ps(c2, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + 64)),
                              reinterpret_cast<__m512bh>(blk.w[2]));
        c3 = _mm512_dpbf16_ps(c3, reinterpret_cast<__m512bh>(_mm512_loadu_si512(x + 96)),
                              reinterpret_cast<__m512bh>(blk.w[3]));
      } else {
        const float* x = a.x + k;
        c0 = Vec::Fma(Vec::Load(x), WidenLow(blk.w[0]), c0);
        c1 = Vec::Fma(Vec::Load(x + 16), WidenHigh(blk.w[0]), c1);
        c2 = Vec::Fma(Vec::Load(x + 32), WidenLow(blk.w[1]), c2);
        c3 = Vec::Fma(Vec::Load(x + 48), WidenHigh(blk.w[1]), c3);
        c0 = Vec::Fma(Vec::Load(x + 64), WidenLow(blk.w[2]), c0);
        c1 = Vec::Fma(Vec::Load(x + 80), WidenHigh(blk.w[2]), c1);
        c2 = Vec::Fma(Vec::Load(x + 96), WidenLow(blk.w[3]), c2);
        c3 = Vec::Fma(Vec::Load(x + 112), WidenHigh(blk.w[3]), c3);
      }
    }
    Finish(a, Vec::Sum(Vec::Add(Vec::Add(c0, c1), Vec::Add(c2, c3))), n);
  }
}

void UnpackRows(const uint8_t* w, int64_t ldw, const PackedBf16Rows& p, int64_t k, int64_t r0,
                int64_t r1, uint16_t* out, int64_t ldo) {
  for (int64_t n = r0; n < r1; ++n) {
    const uint8_t* b = w + n * ldw;
    uint16_t* o = out + (n - r0) * ldo;
    const __m512i table = Table(p, n);
    int64_t e = p.escape_offsets[n];
    const int64_t e_end = p.escape_offsets[n + 1];
    for (int64_t k0 = 0; k0 < k; k0 += kPackedBlock, b += kPackedBlockBytes) {
      Block blk = Decode(b, table);
      if (e < e_end && p.escape_pos[e] < k0 + kPackedBlock) Patch(blk, k0, p, e, e_end);
      for (int i = 0; i < 4; ++i) _mm512_storeu_si512(o + k0 + 32 * i, blk.w[i]);
    }
  }
}

}  // namespace

void UnpackBf16Avx512(const uint8_t* w, int64_t ldw, const PackedBf16Rows& p, int64_t k, int64_t r0,
                      int64_t r1, uint16_t* out, int64_t ldo) {
  UnpackRows(w, ldw, p, k, r0, r1, out, ldo);
}

void LinearPackedAvx512(const LinearArgs& a, int64_t n0, int64_t n1) {
  if (a.m == 1) {
    if (a.xb != nullptr) {
      PackedOneRow<true>(a, n0, n1);
    } else {
      PackedOneRow<false>(a, n0, n1);
    }
    return;
  }
  // Several rows: a few weight rows at a time unpacked into a buffer, then the unpacked
  // kernels over it (outputs [c, c + rows) as outputs [0, rows) of shifted y and b).
  const int64_t rows = std::max<int64_t>(1, kDecodeBytes / (2 * a.k));
  thread_local std::vector<uint16_t> buffer;
  buffer.resize(static_cast<size_t>(rows * a.k));
  for (int64_t c = n0; c < n1; c += rows) {
    const int64_t r = std::min(rows, n1 - c);
    UnpackRows(static_cast<const uint8_t*>(a.w), a.ldw, *a.packed, a.k, c, c + r, buffer.data(),
               a.k);
    LinearArgs sub = a;
    sub.w = buffer.data();
    sub.ldw = a.k;
    sub.w_type = WeightType::kBf16;
    sub.w_next = nullptr;
    sub.packed = nullptr;
    sub.y = a.y + c;
    sub.b = a.b != nullptr ? a.b + c : nullptr;
    if (a.xb != nullptr) {
      LinearBf16Dot(sub, 0, r);
    } else {
      LinearAvx512(sub, 0, r);
    }
  }
}

}  // namespace adapterd::core::cpu
