// Hand-written float32 CPU kernels for the decode path, where a step carries a few rows per
// projection and one new token per sequence:
//  - Linear: y = x·Wᵀ (+ b) for a few rows of x. BLAS packs W before every GEMM, so with
//    2–32 rows it reads the weights twice and runs at a third of memory bandwidth; these
//    kernels read W once, straight from the (memory-mapped) checkpoint layout [out, in]. Each
//    output is one dot product summed in a fixed order, so a row's result does not depend on
//    which other rows share its batch.
//  - CachedAttention: each sequence's new queries (one when decoding, a prefill chunk's
//    otherwise) against its KV cache, read in place, every row and head of a layer in one
//    parallel call instead of a handful of ATen ops per row (and no BLAS packing of the whole
//    cache for a few queries).
// Both choose AVX-512F or AVX2+FMA code at run time and report when they do not apply (other
// device or dtype, no such CPU), so callers fall back to ATen and CUDA builds are unaffected.
//
// Thread-safety: stateless; they parallelise internally with ATen's intra-op pool.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "core/kv_cache.h"

namespace adapterd::core::cpu {

// Rows up to which Linear() and LoraSegments() are used. Linear() also needs x to stay
// within kLinearMaxInputBytes past 48 rows: it reads x once per tile of outputs, fast while x
// sits in the core's cache, and BLAS, which packs, wins beyond. Measured on a 110M Llama (K
// 768, 2 cores, AVX-512, Debian's OpenBLAS), whole-prompt generation took 2.65 s against
// 3.04 s with BLAS at 500 tokens and 4.1 against 4.6 s at 1,000, but 6.9 against 6.55 s at
// 2,000 (x of 6 MB). Each row's result is independent of its batch on these kernels.
inline constexpr int64_t kLinearMaxRows = 4096;
inline constexpr int64_t kLinearMaxInputBytes = int64_t{4} << 20;
// Whether Linear() takes an x of `rows` rows of `k` floats.
inline bool LinearTakes(int64_t rows, int64_t k) {
  return rows <= 48 || (rows <= kLinearMaxRows && rows * k * static_cast<int64_t>(sizeof(float)) <= kLinearMaxInputBytes);
}

// Instruction sets with kernels, in increasing order; kNone: every caller uses ATen.
enum class Isa { kNone, kAvx2, kAvx512 };

// Returns the best instruction set this CPU (and build) supports.
Isa SupportedIsa();
// Returns the instruction set in use (SupportedIsa() unless SelectIsa() chose another).
Isa SelectedIsa();
// Uses `isa` from now on (a lower one than supported, e.g. to compare paths in tests, or
// kNone to turn the kernels off). Returns false, changing nothing, when it is unsupported.
bool SelectIsa(Isa isa);
// Returns "avx512f", "avx2" or "none".
const char* IsaName(Isa isa);
// Returns the instruction set IsaName() names `name`; false when it names none.
bool IsaFromName(const std::string& name, Isa* isa);

// Returns y = x·wᵀ + b (b may be undefined) when a kernel applies: x [M, K] with
// M <= kLinearMaxRows, w [N, K], both on the CPU with unit stride along K, x float32, w float32,
// bfloat16 or float16 (widened exactly: the result equals the float32 copy's), b float32 contiguous
// [N]. Returns an undefined tensor otherwise.
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

// How Linear() multiplies float32 rows by bfloat16 weights, after the levels of PyTorch's
// torch.set_float32_matmul_precision:
//  - kHighest (default): the weights widened exactly, the result the float32 copy's.
//  - kMedium: where the CPU has AVX-512 BF16 and AVX-512 is selected, each row of x is rounded
//    to bfloat16 (nearest even) once per call and the exact products of pairs of inputs are
//    summed into float32 by vdpbf16ps, one instruction per 32 weights instead of three per 16.
//    The only error beyond kHighest's is x's rounding (at most 2^-8 of each input), which a
//    model computed in bfloat16 makes too. A row's result still depends only on that row (the
//    same sums in any batch), but not on kHighest's bits. Elsewhere as kHighest; weights of
//    other dtypes are unaffected.
// PyTorch's "high" asks for TF32 or three bfloat16 products where they are fast; no CPU
// kernel here has them, so it computes as "highest", which PyTorch allows.
enum class MatmulPrecision { kHighest, kMedium };
// "highest" and "high" (kHighest) or "medium"; false for any other name.
bool MatmulPrecisionFromName(const std::string& name, MatmulPrecision* precision);
// Whether kMedium takes effect now: AVX-512 selected on a CPU with AVX-512 BF16.
bool Bf16ProductsAvailable();
// Linear() at `precision`.
at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  MatmulPrecision precision);
// One matrix of LinearShared(): weights and bias as Linear() takes them.
struct LinearMatrix {
  const at::Tensor* w;
  const at::Tensor* b;  // Undefined tensor: no bias.
};
// Linear() of one x by several matrices (a layer's q, k and v, or gate and up) in one parallel
// pass: the threads fork and join once for the group instead of once per matrix. Each result
// equals its own Linear() bit for bit. Empty when the kernel does not take x or any matrix.
std::vector<at::Tensor> LinearShared(const at::Tensor& x, const std::vector<LinearMatrix>& matrices,
                                     MatmulPrecision precision = MatmulPrecision::kHighest);

// `--quantize bf16_packed`: a bfloat16 matrix [n, k] held losslessly in 12 bits a weight (the
// layout: PackedBf16Rows in cpu_kernels_isa.h). Made by PackBf16; multiplied by LinearPacked.
struct PackedBf16 {
  at::Tensor blocks;          // uint8 [n, k / 128 · 192]: codes and low bytes.
  at::Tensor tables;          // uint8 [n, 16]: each row's high bytes (entry 15: 0, the escape).
  at::Tensor escape_offsets;  // int64 [n + 1]: row r's escapes are [offsets[r], offsets[r + 1]).
  at::Tensor escape_pos;      // int32 [escapes]: positions within their rows, in order.
  at::Tensor escape_values;   // int16 [escapes]: their bfloat16 bits.
  int64_t k = 0;
  bool defined() const { return blocks.defined(); }
  int64_t rows() const { return blocks.size(0); }
  int64_t escapes() const { return escape_pos.numel(); }
  int64_t bytes() const;
};
// Whether PackBf16() takes `w`: a CPU bfloat16 matrix [n, k], unit stride along k, k a positive
// multiple of 128.
bool PackBf16Takes(const at::Tensor& w);
// Returns `w` (PackBf16Takes) packed: each row's table holds its 15 most frequent high bytes
// (ties to the smaller byte), every other weight is an escape. Parallel over rows.
PackedBf16 PackBf16(const at::Tensor& w);
// Returns rows [row0, row0 + rows) of the packed matrix as bfloat16 [rows, k]: the original's
// bits exactly.
at::Tensor UnpackBf16(const PackedBf16& p, int64_t row0, int64_t rows);
// Whether LinearPacked() has a kernel: AVX-512 selected on a CPU with AVX-512 BW.
bool PackedKernelAvailable();
// One matrix of LinearPacked(): the packed weights and the bias as Linear() takes it.
struct PackedMatrix {
  const PackedBf16* w;
  const at::Tensor* b;  // Undefined tensor: no bias.
};
// Linear() of one x by several packed matrices in one parallel pass: each result equals
// Linear(x, UnpackBf16(w), b, precision) bit for bit (kMedium where Bf16ProductsAvailable()).
// Empty when the kernel does not apply: no PackedKernelAvailable(), or x as Linear() does not take
// it.
std::vector<at::Tensor> LinearPacked(const at::Tensor& x, const std::vector<PackedMatrix>& matrices,
                                     MatmulPrecision precision);

// Linear() over int8 weights: q [N, K] int8 with K a multiple of 32, scales [N, K / 32] float32
// (unit inner stride), one per block of 32 inputs. Each weight is widened to float(q)·scale
// (one rounding), so the result equals Linear() over that dequantized float32 matrix bit for
// bit. Undefined when the kernel does not apply.
at::Tensor LinearInt8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& b);

// `--quantize int8` (w8a8): y = x·Wᵀ + b for the [n, k] int8 matrix held as panels ([ceil(n / 8),
// k / 4, 8, 4] int8, contiguous) and their scales ([ceil(n / 8), k / 32, 8] float32, contiguous;
// see cpu_kernels_isa.h), with x's rows quantized per block of 32 inputs as the weights are and
// every block's products summed exactly in int32 (W8A8Args says how the float steps round).
// Any number of rows; a row's result depends only on that row. Undefined when the kernel does
// not apply: no AVX2 (or kernels off), x not CPU float32 [m, k] with unit stride along k, or
// shapes that do not match.
at::Tensor LinearW8A8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& panel_scales, int64_t n,
                      const at::Tensor& b);
// One matrix of LinearW8A8Shared(): panels, their scales, outputs and bias as LinearW8A8 takes them.
struct W8A8Matrix {
  const at::Tensor* panels;
  const at::Tensor* panel_scales;
  int64_t n;
  const at::Tensor* b;  // Undefined tensor: no bias.
};
// LinearW8A8 of one x by several matrices (a layer's q, k and v, or gate and up): x quantized
// once and every matrix's panels in one parallel pass, so a decode step pays one quantization
// and one fork and join for the group instead of one per matrix. Each result equals its own
// LinearW8A8() bit for bit. Empty when the kernel does not take x or any of the matrices.
std::vector<at::Tensor> LinearW8A8Shared(const at::Tensor& x, const std::vector<W8A8Matrix>& matrices);
// The kernel LinearW8A8() runs now: "avx512vnni" (AVX-512 selected on a CPU with AVX-512 VNNI,
// VL and BW: vpdpbusd), "avx2" (vpmaddubsw; AVX2 selected, or AVX-512 without VNNI) or "none".
// Both give the same results bit for bit.
const char* W8A8KernelName();

// The rows [offset, offset + length) of a packed batch that one LoRA adapter applies to, with
// its factors: a [rank, in] and bt = Bᵀ [rank, out], float32 or bfloat16, and the scaling
// applied to x·aᵀ·bt (1 when folded into bt).
struct LoraSegment {
  int64_t offset = 0;
  int64_t length = 0;
  const at::Tensor* a = nullptr;
  const at::Tensor* bt = nullptr;
  float scale = 1.0f;
};

// y[rows of s] += scale_s·(x[rows of s]·a_sᵀ)·bt_s for every segment s, in one parallel pass
// of a task per segment when there are many of few rows (each its shrink then its expand), else
// in two over blocks (all the shrinks, then all the expands), whatever the number of segments:
// Punica's SGMV on CPU, so a step over many distinct adapters pays no per-adapter dispatch. The shrink
// is Linear(x_s, a_s); the expand is one axpy per rank over the rows of bt (no horizontal
// sums, however short the rank), summed in rank order with fused multiply-adds, then scaled
// and added: LoraExpand() computes the same values. A row's result depends only on its own
// input. Returns false, touching nothing, when it does not apply: x [M, in] and y [M, out]
// CPU float32 with unit stride along the features, factors CPU float32 or bfloat16 with unit
// inner stride, segments of at most kLinearMaxRows rows within [0, M).
bool LoraSegments(const at::Tensor& x, at::Tensor& y, const std::vector<LoraSegment>& segments);

// Returns scale·(t·bt) ([M, out]) for t [M, rank] float32 (unit inner stride) and bt [rank,
// out] float32 or bfloat16 on the CPU, summed as LoraSegments() sums it; undefined when no
// kernel applies.
at::Tensor LoraExpand(const at::Tensor& t, const at::Tensor& bt, float scale);

// Llama's RMSNorm of every row of x [M, d] (CPU float32, unit stride along d) with weight w
// [d] (CPU float32, bfloat16 or float16, contiguous; widened exactly), as transformers computes
// it in float32: y = w·(x·rsqrt(mean(x²) + eps)), two roundings per element. One call instead of
// the formula's six ATen operations, which cost more than the arithmetic on a decode row. The
// mean's sum runs in 16 interleaved partial sums, so it may differ from ATen's in the last bits;
// each row depends only on itself. Returns an undefined tensor when it does not apply (kernels
// off, other device, dtype or shape).
at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w, double eps);

// Rotary position embedding in place, rotate_half layout: for every row i of x [M, heads·d]
// (CPU float32, unit stride along the features) and every head, with c = cos[i], s = sin[i]
// ([M, d] float32 contiguous, the first half equal to the second), x[j] becomes
// x[j]·c[j] − x[j + d/2]·s[j] and x[j + d/2] becomes x[j + d/2]·c[j + d/2] + x[j]·s[j + d/2]:
// transformers' x·cos + rotate_half(x)·sin, with the same three roundings, so the result equals
// that formula's bit for bit. Returns false, touching nothing, when it does not apply.
bool RotateInPlace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim);

// A sequence's new positions in a packed batch: tokens [index, index + length) of q/k/v
// continue the sequence in `cache` (one for a decode row, more for a prefill chunk).
struct CachedRow {
  int64_t index = 0;
  KvCache* cache = nullptr;
  int64_t length = 1;
};

// Returns true when CachedAttention() can take these tensors: CPU float32 q, k, v [n, heads·d]
// with unit stride along the features (k and v with the same row stride), `out` [n, heads·d]
// contiguous (the caches: see KvCacheApplies).
bool CachedAttentionApplies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out);

// Returns true when CachedAttention() can read and write `cache`: on the CPU, in float32,
// bfloat16 or float16.
bool KvCacheApplies(const KvCache& cache);

// For every row: writes its keys and values ([kv_heads·d] at tokens [index, index + length) of
// k and v) into `layer` of its cache at positions [cache->length(), + length) (not committed),
// then writes the causal attention of each of its queries (num_heads·d) over the cached
// positions up to its own — the last `window` when window > 0 — into its row of `out`. Query
// head h reads kv head h / (num_heads / kv_heads). Each query is computed alone (the same
// operations whatever the row's length), so a prompt's outputs do not depend on its chunking.
void CachedAttention(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<CachedRow>& rows, int64_t num_heads, int64_t kv_heads,
                     int64_t head_dim, double scale, int64_t window, at::Tensor& out);

}  // namespace adapterd::core::cpu
