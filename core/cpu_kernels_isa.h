// The raw-pointer interface of the instruction-set-specific kernels behind cpu_kernels.h.
// Each ISA's translation unit is compiled with its own -m flags, so this header (and those
// units) hold no inline functions or templates with external linkage: a copy compiled for
// AVX-512 must never be picked by the linker for code that runs on any CPU.
#pragma once

#include <cstdint>

namespace adapterd::core::cpu {

// How the weights of a LinearArgs (or a KV cache) are stored; bfloat16 and float16 are widened
// to float32 exactly as they are loaded, so the sums are those of the float32 copy. Expands
// (LoRA factors) take float32 and bfloat16 only. kI8 (Linear only): int8 values with one
// float32 scale per block of kInt8Block along k; each weight is widened to float(q)·scale,
// rounded once, so the sums are those of the dequantized float32 matrix.
// kBf16Packed (Linear only): bfloat16 held losslessly in 12 bits (PackedBf16Rows).
enum class WeightType : int32_t { kF32, kBf16, kF16, kI8, kBf16Packed };

// `--quantize bf16_packed`: a bfloat16 matrix held in 12 bits a weight, losslessly. A weight's
// high byte (sign and the exponent's top 7 bits) takes few values in a row, so each row has a
// table of its 15 most frequent high bytes and a weight stores a 4-bit code into it beside its
// low byte; the rare weights whose high byte is not in the table take code 15 (table entry 0,
// low byte 0) and are listed as escapes, written back into the decoded vectors. A row is k / 128
// blocks of kPackedBlockBytes: 64 bytes of codes, then two runs of 64 low bytes. Weight t of a
// block (0 <= t < 128), with h = t / 64, u = t / 32 % 2, r = t % 32, sits at byte
// p = 16·(r / 8) + 8·u + r % 8 of low-byte run h, its code in the low (h = 0) or high (h = 1)
// nibble of code byte p: the order in which vpunpck{l,h}bw of a low-byte run and its decoded
// high bytes yield the block's four vectors of 32 weights in order.
inline constexpr int64_t kPackedBlock = 128;
inline constexpr int64_t kPackedBlockBytes = 192;
inline constexpr int kPackedEscape = 15;
struct PackedBf16Rows {
  const uint8_t* tables;          // Row n's 16 high bytes at tables + 16·n (entry 15: 0).
  const int64_t* escape_offsets;  // Row n's escapes are [escape_offsets[n], escape_offsets[n + 1]),
  const int32_t* escape_pos;      // in order of position within the row,
  const uint16_t* escape_values;  // with their bfloat16 bits.
};

// Weights per int8 block (along the input), each block with its own scale: Q8_0's 32.
inline constexpr int64_t kInt8Block = 32;

// y[i, n] = scale·(sum_k x[i, k]·w[n, k] (+ b[n])) for rows i < m and outputs n in [n0, n1);
// with `accumulate`, that is added to y[i, n] instead (as y + scale·(x·wᵀ) would do).
struct LinearArgs {
  const float* x;
  int64_t ldx;
  const void* w;  // float, or uint16_t bfloat16 or float16 bits, or int8_t (w_type).
  int64_t ldw;
  const float* b;  // Null: no bias.
  float* y;
  int64_t ldy;
  int64_t m;
  int64_t k;
  bool accumulate = false;
  // Rows (ldw apart, k long, of w_type) that come next after outputs [n0, n1), e.g. the next
  // adapter's factors: the last tile prefetches them as it prefetches its successor.
  const void* w_next = nullptr;
  WeightType w_type = WeightType::kF32;
  float scale = 1.0f;
  // kI8: the scales, k / kInt8Block per row of w, rows ld_scales apart.
  const float* w_scales = nullptr;
  int64_t ld_scales = 0;
  // kBf16 under MatmulPrecision::kMedium (LinearBf16Dot only): x's rows rounded to bfloat16,
  // ldxb apart.
  const uint16_t* xb = nullptr;
  int64_t ldxb = 0;
  // kBf16Packed: w points at the blocks (row n at w + n·ldw bytes), these at the rest.
  const PackedBf16Rows* packed = nullptr;
};

// A one-row pass (a decode step) reads its outputs' weight rows [n0, n1) start to end: one
// sequential stream per thread. The hardware prefetcher does not follow a stream across a 4 KiB
// page, and mapped weight files often sit in 4 KiB pages (see README, "Model files while
// serving"); asking for the line 8 KiB ahead as well took the 1.1B's BF16 decode on 4 KiB pages
// from 15.8-18.0 to 18.2-19.8 tokens/s, and two threads summing a buffer in 2 MiB pages from
// ~49 to ~53 GB/s (2-core AMD EPYC; 4 and 16 KiB ahead measured lower). Rows that are not
// contiguous (ldw > k) are left to the hardware. The stream goes on into a.w_next where that
// continues it (the thread's next task).
class StreamAhead {
 public:
  static constexpr int64_t kBytes = 8192;
  StreamAhead(const LinearArgs& a, int64_t n1, int64_t elem) {
    if (a.ldw == a.k) Stream(a.w, n1 * a.ldw * elem, a.w_next);
  }
  // Rows of `row_bytes` that lie end to end from `w` (packed rows).
  StreamAhead(const void* w, int64_t n1, int64_t row_bytes, const void* w_next) {
    Stream(w, n1 * row_bytes, w_next);
  }
  // Asks for the lines kBytes past [p, p + bytes), a step's weights, up to the stream's end.
  void Step(const void* p, int64_t bytes) const {
    const uintptr_t q = reinterpret_cast<uintptr_t>(p) + kBytes;
    for (uintptr_t o = 0; o < static_cast<uintptr_t>(bytes); o += 64) {
      if (q + o < end_) __builtin_prefetch(reinterpret_cast<const void*>(q + o), 0, 3);
    }
  }

 private:
  void Stream(const void* w, int64_t bytes, const void* w_next) {
    const uintptr_t stop = reinterpret_cast<uintptr_t>(w) + static_cast<uintptr_t>(bytes);
    end_ = reinterpret_cast<uintptr_t>(w_next) == stop ? stop + kBytes : stop;
  }
  uintptr_t end_ = 0;  // 0: nothing is asked for.
};

// y[i, o] += scale·(sum_r t[i, r]·wt[r, o]) for rows i < m and outputs o in [o0, o1): a LoRA
// expand over Bᵀ (wt [k, n] row-major, float or bfloat16), one axpy per rank so there are no
// horizontal sums however short the rank. The sum over r runs in order with fused
// multiply-adds from zero, then is scaled and added (two roundings).
// Outputs (rows × outputs of the call) up to which an expand accumulates rank by rank in a
// buffer that stays in L1, reading each rank's run of wt contiguously.
inline constexpr int64_t kExpandRankOuterFloats = 4096;

struct ExpandArgs {
  const float* t;
  int64_t ldt;
  const void* wt;
  int64_t ldw;
  float* y;
  int64_t ldy;
  int64_t m;
  int64_t k;
  WeightType w_type = WeightType::kF32;
  float scale = 1.0f;
};

// Attention for one kv head of one sequence over its cache: `count` new positions (one for a
// decode row, more for a prefill chunk) are stored at [position, position + count) of the
// head's cache, then each of the `group` query heads of new position c attends over positions
// [first(c), position + c], first(c) = max(0, position + c + 1 - window) when window > 0, else 0.
// Each query's scores, softmax and weighted sum are computed as for a lone decode row, in the
// same order, so a position's output does not depend on how its prompt was split into chunks.
// One query head's share of a key tile: its scores (then probabilities), its output, its
// query, and the positions [from, to) of the tile it sees.
struct AttendTileRow {
  float* s;
  float* o;
  const float* q;
  int64_t from;
  int64_t to;
};

// Cached positions [begin, end) of one kv head that lie together: position p's key at
// keys + (p - begin)·head_dim elements of kv_type, its value likewise.
struct KvSpan {
  int64_t begin;
  int64_t end;
  const void* keys;
  const void* values;
};

struct AttendArgs {
  const float* q;    // Position c's query heads of this kv head: group × head_dim at q + c·q_stride.
  const float* k;    // Position c's new key for this kv head: head_dim at k + c·kv_stride.
  const float* v;    // Its new value, at v + c·kv_stride.
  // Where the cache's positions lie, in order of position, up to position + count at least;
  // the spans holding the new positions (own blocks) are written there first.
  const KvSpan* spans;
  int64_t num_spans = 1;
  float* out;        // Position c's group × head_dim at out + c·out_stride.
  float* scores;     // Scratch: max(kAttendRows, group)·(position + count) floats.
  AttendTileRow* tile_rows;  // Scratch: max(kAttendRows, group) entries.
  int64_t count = 1;
  int64_t q_stride = 0;
  int64_t kv_stride = 0;
  int64_t out_stride = 0;
  int64_t group;
  int64_t head_dim;
  int64_t window = 0;
  int64_t position;  // The past length: the first new position.
  float scale;
  WeightType kv_type = WeightType::kF32;  // float32 or bfloat16 (--kv_cache_dtype).
};

// Query heads (positions × group) whose scores a chunk computes together, each key tile read
// once for all of them while it is in L1.
inline constexpr int64_t kAttendRows = 16;
// Keys per tile: 64 × head_dim 128 in float32 is 32 KB.
inline constexpr int64_t kAttendKeys = 64;

// `--quantize int8` (w8a8): int8 weights times int8 activations, summed in int32. The weights of
// outputs [8p, 8p + 8) form panel p: [k / 4][8][4] int8, the four consecutive inputs of each
// output side by side (a 32-byte load covers 8 outputs × 4 inputs), then the panel's scales
// [k / kInt8Block][8] float32. Outputs past n in the last panel are zero.
inline constexpr int64_t kW8A8Panel = 8;

// Activations quantized per row and block of kInt8Block inputs as the weights are (Q8_0):
// s = max|x| / 127, q = round-half-even(x · (1 / s)) (0 where the block is all zeros), and
// |q| beside q (the magnitudes the unsigned × signed products take).
struct QuantizedRows {
  int8_t* q;           // [m, k]
  uint8_t* magnitude;  // [m, k]
  float* scales;       // [m, k / kInt8Block]
};

// y[i, n] = sum over blocks b, in order, of fma(float(sum_{k in b} xq[i, k]·wq[n, k]),
// xs[i, b]·ws[n, b], ·) from zero (+ bias[n]) for rows i < m and the outputs of panels
// [p0, p1) below n. The block sums are exact integers, so only the float steps round.
struct W8A8Args {
  QuantizedRows x;
  int64_t m;
  int64_t k;
  const int8_t* panels;
  const float* panel_scales;
  int64_t n;
  const float* b;  // Null: no bias.
  float* y;
  int64_t ldy;
};

// Quantizes rows i < m of x (k a multiple of kInt8Block) into `out`'s arrays.
void QuantizeRowsAvx2(const float* x, int64_t ldx, int64_t m, int64_t k, const QuantizedRows& out);
void W8A8Avx2(const W8A8Args& args, int64_t p0, int64_t p1);
// The same sums with AVX-512 VNNI's vpdpbusd: bit for bit W8A8Avx2's results. From
// kW8A8WideRows rows on, runs of four panels take 512-bit vectors (and tasks should hand it
// panels four at a time).
inline constexpr int64_t kW8A8WideRows = 4;
void W8A8Vnni(const W8A8Args& args, int64_t p0, int64_t p1);

// MatmulPrecision::kMedium on a CPU with AVX-512 BF16 (cpu_kernels_bf16.cc). RoundRowsBf16:
// rows i < m of x (k long, ldx apart) rounded to bfloat16, nearest even, into out [m, k].
void RoundRowsBf16(const float* x, int64_t ldx, int64_t m, int64_t k, uint16_t* out);
// LinearArgs over bfloat16 weights with the rows of x given in bfloat16 (xb): each output is
// one sum in one order whatever the rows of its batch. The k range in vectors of 32, vector c
// added into chain c % 4 by vdpbf16ps (each lane adds the exact products of two neighbouring
// inputs), the chains combined as (c0 + c1) + (c2 + c3) and summed across the vector, then
// the inputs past the last whole vector one by one (exact product, fused add), then bias and
// scale as LinearAvx512 adds them.
void LinearBf16Dot(const LinearArgs& args, int64_t n0, int64_t n1);

void LinearAvx512(const LinearArgs& args, int64_t n0, int64_t n1);
// kBf16Packed on AVX-512 with BW (cpu_kernels_packed.cc): each output the sum LinearAvx512 (x in
// float32) or, with args.xb, LinearBf16Dot (which the CPU must have) gives over the unpacked
// matrix, bit for bit. One row of x decodes each block in registers as it streams; several
// rows decode a few rows of weights at a time into a buffer that stays in L2 and run those
// kernels over it.
void LinearPackedAvx512(const LinearArgs& args, int64_t n0, int64_t n1);
// Rows [r0, r1) of a packed matrix (blocks `w`, rows ldw bytes apart, k weights each) decoded
// into out (rows ldo apart).
void UnpackBf16Avx512(const uint8_t* w, int64_t ldw, const PackedBf16Rows& p, int64_t k, int64_t r0,
                      int64_t r1, uint16_t* out, int64_t ldo);
void LinearAvx2(const LinearArgs& args, int64_t n0, int64_t n1);
void AttendAvx512(const AttendArgs& args);
void AttendAvx2(const AttendArgs& args);
void ExpandAvx512(const ExpandArgs& args, int64_t o0, int64_t o1);
void ExpandAvx2(const ExpandArgs& args, int64_t o0, int64_t o1);

}  // namespace adapterd::core::cpu
