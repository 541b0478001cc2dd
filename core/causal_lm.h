// The forward pass of a decoder-only language model over a packed batch: the new tokens of
// every row are concatenated into one [N] tensor so that each projection is one matrix
// multiply for the whole batch, while attention reads each row's own KV cache (all decode
// rows of a layer in one CPU kernel call when it applies, other rows one by one). Rows may
// mix prefill (many new tokens) and decode (one new token).
//
// Thread-safety: the weights are immutable and shared; Forward() is called by the single
// scheduler thread (it mutates the rows' caches).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/cpu_kernels.h"
#include "core/kv_cache.h"
#include "core/model_config.h"

namespace adapterd::core {

// The projections an adapter can modify.
enum class Projection { kQ, kK, kV, kO, kGate, kUp, kDown, kCAttn, kAttnOut, kFc, kMlpOut, kLmHead };

// The output projection (lm_head) goes through the adapter seam as projection kLmHead of the
// layer after the last one.
inline int64_t OutputLayer(const ModelConfig& config) { return config.num_layers; }

// Returns the module's short name as PEFT target_modules spell it ("q_proj", "c_attn", ...).
const char* ProjectionName(Projection p);

// The seam adapters plug into: one object per loaded adapter, shared by every sequence that
// uses it. `core` groups a batch's rows by adapter and asks each for its contribution;
// `adapters` implements the PEFT math. Implementations are immutable and thread-safe.
class SequenceAdapter {
 public:
  virtual ~SequenceAdapter() = default;
  // Soft-prompt rows prepended to the sequence at prefill (prompt tuning); 0 for none.
  virtual int64_t virtual_tokens() const { return 0; }
  // Returns the soft prompt's input embeddings, [virtual_tokens, hidden] in compute dtype.
  virtual at::Tensor soft_prompt() const { return at::Tensor(); }
  // Shares prefix keys and values (prefix tuning) into an empty cache (KvCache::Share);
  // returns how many positions they fill.
  virtual int64_t SeedCache(KvCache& /*cache*/) const { return 0; }
  // True when this adapter modifies projection `p` of `layer`.
  virtual bool Adapts(int64_t /*layer*/, Projection /*p*/) const { return false; }
  // Returns what the adapter adds to the output of projection `p` of `layer` for inputs
  // `x` ([n, in]); only called when Adapts() is true.
  virtual at::Tensor Delta(int64_t /*layer*/, Projection /*p*/, const at::Tensor& /*x*/) const {
    return at::Tensor();
  }
  // For a plain LoRA projection, its factors: Delta(x) = scale·(x·aᵀ)·bt with a [r, in] and
  // bt = Bᵀ [r, out]. Lets core run the rows of many adapters in one segmented kernel; false
  // (the default) means core calls Delta() instead.
  virtual bool LoraFactors(int64_t /*layer*/, Projection /*p*/, const at::Tensor** /*a*/,
                           const at::Tensor** /*bt*/, float* /*scale*/) const {
    return false;
  }
  // DoRA: after its LoRA delta, the adapter's rows of projection `p` of `layer` become
  // y·scale + shift (shift may be null); false when it has no such step there.
  virtual bool OutputAffine(int64_t /*layer*/, Projection /*p*/, const at::Tensor** /*scale*/,
                            const at::Tensor** /*shift*/) const {
    return false;
  }
  // IA3: the vector ([n], compute dtype) that scales projection `p` of `layer` element-wise,
  // its input when `*input` is set to true (feed-forward modules), else its output (bias
  // included); null when the adapter scales nothing there.
  virtual const at::Tensor* Ia3Scale(int64_t /*layer*/, Projection /*p*/, bool* /*input*/) const {
    return nullptr;
  }
  // Ids the adapter's rows may hold and produce when it resizes the vocabulary (added tokens);
  // 0 means the base model's.
  virtual int64_t vocab_size() const { return 0; }
  // The input embedding table ([vocab, hidden], compute dtype) that replaces the base's for
  // this adapter's rows (PEFT modules_to_save, or a resized embedding saved with the adapter);
  // null: the base's.
  virtual const at::Tensor* InputEmbedding() const { return nullptr; }
  // LoRA on the input embedding (PEFT's lora.Embedding): the rows gain scale·at[id]·bt, with
  // at = lora_embedding_Aᵀ [vocab, r] and bt = lora_embedding_Bᵀ [r, hidden]; false when none.
  virtual bool EmbeddingLora(const at::Tensor** /*at*/, const at::Tensor** /*bt*/, float* /*scale*/) const {
    return false;
  }
  // The output projection ([vocab, hidden]) that replaces lm_head for this adapter's rows;
  // null: the base's.
  virtual const at::Tensor* OutputEmbedding() const { return nullptr; }
};

// A weight matrix the forward pass reads from a compact copy made at load (`--quantize`).
// `--quantize bf16_packed`: `packed` holds a bfloat16 matrix losslessly in 12 bits a weight
// (cpu::PackedBf16); the other fields are undefined.
// A weight matrix quantized to int8 (`--quantize int8_weight_only`): symmetric, one float32 scale
// per block of 32 inputs as llama.cpp's Q8_0 (which stores it in float16). q [out, in] int8, scales
// [out, in / 32] float32; weight (n, k) stands for float(q[n, k])·scales[n, k / 32].
// `--quantize int8` holds the same values in the w8a8 kernel's layout instead (q and scales
// then undefined): panels [ceil(out / 8), in / 4, 8, 4] int8 and panel_scales [ceil(out / 8),
// in / 32, 8] float32, for `out` rows (cpu::LinearW8A8), and its forward pass quantizes the
// activations too.
struct CompactMatrix {
  at::Tensor q;
  at::Tensor scales;
  at::Tensor panels;
  at::Tensor panel_scales;
  int64_t out = 0;
  cpu::PackedBf16 packed;
  bool defined() const { return q.defined() || panels.defined() || packed.defined(); }
  int64_t bytes() const {
    if (packed.defined()) return packed.bytes();
    if (panels.defined()) return static_cast<int64_t>(panels.nbytes() + panel_scales.nbytes());
    return q.defined() ? static_cast<int64_t>(q.nbytes() + scales.nbytes()) : 0;
  }
};
// Whether QuantizeInt8() takes `w`: a matrix whose input width is a multiple of 32.
bool Int8Quantizable(const at::Tensor& w);
// Returns `w` ([out, in], any floating dtype, Int8Quantizable) quantized: per block,
// scale = max|w| / 127 and q = round-half-even(w / scale) (0 where the block is all zeros).
// Computed on w's device, a few MiB of rows at a time.
CompactMatrix QuantizeInt8(const at::Tensor& w);
// Returns rows [row0, row0 + rows) of the matrix `m` stands for, in float32: float(q)·scale,
// rounded once, which is what the CPU kernel multiplies by.
at::Tensor DequantizeInt8(const CompactMatrix& m, int64_t row0, int64_t rows);
// Returns QuantizeInt8(w)'s values and scales in panels (CompactMatrix, `--quantize int8`).
CompactMatrix QuantizeW8A8(const at::Tensor& w);
// Returns rows [row0, row0 + rows) (row0 and rows multiples of 8, or rows reaching the end) of
// a panel matrix in QuantizeInt8's layout: q [rows, in] and scales [rows, in / 32].
CompactMatrix UnpackPanels(const CompactMatrix& m, int64_t row0, int64_t rows);
// LinearForward over a compact matrix.
// - bf16_packed: the CPU kernel (cpu::LinearPacked) where it applies, else the matrix unpacked
//   ~4 MiB of output rows at a time, each block multiplied as LinearForward multiplies a tensor:
//   either way exactly what the unpacked bfloat16 matrix gives at `precision`.
// - Weight-only (q): the CPU kernel (cpu::LinearInt8) for few rows, else the matrix
//   dequantized ~4 MiB of output rows at a time, one GEMM per block. Both equal x·Wᵀ + b
//   over the dequantized W (the kernel bit for bit, as its float32 copy would give).
// - w8a8 (panels): x quantized per row and block of 32 as the weights are, the products of
//   each block summed exactly, then scaled by both blocks' scales: the CPU kernel
//   (cpu::LinearW8A8) for any number of rows, else the same sums in ATen (integer-valued
//   float32 products, exact below 2^24), which may differ from the kernel in the last bits
//   of the sum over blocks.
at::Tensor LinearForward(const at::Tensor& x, const CompactMatrix& w, const at::Tensor& b,
                         cpu::MatmulPrecision precision = cpu::MatmulPrecision::kHighest);
// LinearForward of one x by several compact matrices, each with its bias: when all are w8a8 (or
// all bf16_packed) and the CPU kernel takes them, the matrices share one parallel pass (w8a8: x
// quantized once; cpu::LinearW8A8Shared, cpu::LinearPacked); otherwise one LinearForward each.
// Either way the same results.
std::vector<at::Tensor> LinearForwardShared(
    const at::Tensor& x, const std::vector<const CompactMatrix*>& w,
    const std::vector<const at::Tensor*>& b,
    cpu::MatmulPrecision precision = cpu::MatmulPrecision::kHighest);

// One row of a packed batch: tokens [offset, offset + length) of the batch belong to it and
// continue the sequence held in `cache`.
struct RowSpan {
  int64_t offset = 0;
  int64_t length = 0;
  KvCache* cache = nullptr;
};

// The adapters of one packed batch: contiguous token ranges, each with the adapter of its
// row (or none). The forward pass calls it at every adaptable projection.
class AdapterBatch {
 public:
  struct Range {
    int64_t offset = 0;
    int64_t length = 0;
    const SequenceAdapter* adapter = nullptr;
    int64_t soft_prompt_rows = 0;  // Leading rows of the range that take the soft prompt.
  };
  explicit AdapterBatch(std::vector<Range> ranges);

  bool empty() const { return ranges_.empty(); }
  // Adds every adapter's delta for projection `p` of `layer` to its rows of `y`: the few-row
  // ranges of LoRA adapters together in one segmented kernel (cpu::LoraSegments), the rest
  // range by range.
  // Rows of IA3 adapters that scale the output are scaled here.
  void AddDelta(int64_t layer, Projection p, const at::Tensor& x, at::Tensor& y) const;
  // Returns the input of projection `p` of `layer` for the base weights: `x` with the rows of
  // IA3 adapters that scale this projection's input scaled (a copy), or `x` itself when none do.
  at::Tensor ScaleInputs(int64_t layer, Projection p, const at::Tensor& x) const;
  // Overwrites the token embeddings of soft-prompt rows with the adapters' soft prompts.
  void WriteSoftPrompts(at::Tensor& embeddings) const;
  // Returns the input embeddings of `tokens` ([N] ids) in `dtype` (the compute dtype): the base
  // `table`'s rows, except where an adapter replaces the table or adds an embedding LoRA.
  at::Tensor Embed(const at::Tensor& table, const at::Tensor& tokens, at::ScalarType dtype) const;
  // Returns float32 logits of hidden states `x` through `lm_head` ([V, hidden]) with every
  // adapter's output-projection changes: a replaced lm_head (its own, possibly larger,
  // vocabulary) and LoRA on lm_head. `rows` and `all_positions` are the Forward() call's: x
  // holds every token, or each row's last. The result is [rows of x, widest vocabulary]; a
  // row's entries past its own vocabulary are unspecified (Engine cuts each row to its own).
  // `lm_head_compact`, when defined, is lm_head's compact copy (`--quantize`): the base logits
  // come from it (an adapter's own lm_head stays in full precision).
  at::Tensor OutputLogits(const at::Tensor& x, const at::Tensor& lm_head, int64_t output_layer,
                          const std::vector<RowSpan>& rows, bool all_positions,
                          const CompactMatrix& lm_head_compact = CompactMatrix(),
                          cpu::MatmulPrecision precision = cpu::MatmulPrecision::kHighest) const;

 private:
  std::vector<Range> ranges_;  // Only ranges with an adapter; adjacent equal ones merged.
};

class CausalLm {
 public:
  virtual ~CausalLm() = default;

  // Runs the new tokens `tokens` ([N] int64 on the model's device) of `rows` through the
  // model, appending to and committing each row's cache. Returns float32 logits for the last
  // token of every row ([rows, vocab]) or, when `all_positions`, for every token ([N, vocab]).
  // Precondition: rows partition [0, N) in order; each row's positions fit the context.
  virtual at::Tensor Forward(const at::Tensor& tokens, const std::vector<RowSpan>& rows,
                             bool all_positions, const AdapterBatch* adapters) const = 0;

  // Returns a cache sized for `capacity` positions, in the KV dtype.
  std::unique_ptr<KvCache> NewCache(int64_t capacity) const;
  // The dtype keys and values are cached in (by default the compute dtype). Attention reads
  // them widened (or narrowed) to the compute dtype. Set before any cache is made.
  at::ScalarType kv_dtype() const { return kv_dtype_; }
  void set_kv_dtype(at::ScalarType dtype) { kv_dtype_ = dtype; }
  // Bytes of attention scores a prefill computes at once: longer prompts go in blocks of
  // queries (at least 16) whose scores fit. Set before the first Forward.
  void set_attention_block_bytes(int64_t bytes) { attention_block_bytes_ = bytes; }
  // How the base model's matrix products treat bfloat16 weights (`--matmul_precision`, see
  // cpu::MatmulPrecision); adapters' factors always take kHighest. Llama family only (GPT-2's
  // Conv1D matrices are float32). Set before the first Forward.
  cpu::MatmulPrecision matmul_precision() const { return matmul_precision_; }
  void set_matmul_precision(cpu::MatmulPrecision precision) { matmul_precision_ = precision; }

  // What Compact() replaced: how many matrices, their bytes as held before, and the
  // copies' bytes (int8: values and scales; bf16_packed: blocks, tables and escapes).
  struct CompactSummary {
    int64_t matrices = 0;
    int64_t source_bytes = 0;
    int64_t bytes = 0;
  };
  // The copies Compact() makes: `--quantize int8_weight_only`, `int8` (w8a8) and `bf16_packed`.
  enum class Compaction { kInt8WeightOnly, kW8A8, kBf16Packed };
  // `--quantize`: the forward pass reads every projection matrix and the output projection from
  // compact copies from now on: int8 (QuantizeInt8; kW8A8: QuantizeW8A8, the activations are
  // quantized too) or bfloat16 packed losslessly (cpu::PackBf16). weights() keeps the originals,
  // which adapters read (DoRA's norms, saved-module checks) and embeddings are looked up in.
  // Returns false, changing nothing, for an architecture without such a path (GPT-2) or a matrix
  // the copy does not take (int8: an input width not a multiple of 32; bf16_packed: not a CPU
  // bfloat16 matrix with an input width a multiple of 128). `done`, when given, is called with
  // each original right after its copy is made (the loader hands its pages back there, so a
  // large model never holds both whole). Call before the first Forward.
  virtual bool Compact(Compaction /*how*/, CompactSummary* /*summary*/,
                       const std::function<void(const at::Tensor&)>& /*done*/ = nullptr) {
    return false;
  }

  const ModelConfig& config() const { return config_; }
  const at::TensorOptions& options() const { return options_; }
  // Every declared parameter by canonical name; tied names hold the same tensor.
  const std::map<std::string, at::Tensor>& weights() const { return weights_; }

 protected:
  CausalLm(ModelConfig config, std::map<std::string, at::Tensor> weights,
           at::TensorOptions options)
      : config_(std::move(config)),
        options_(options),
        kv_dtype_(c10::typeMetaToScalarType(options.dtype())),
        weights_(std::move(weights)) {}

  // Returns the absolute position of every packed token ([N] int64 on `device`): each row
  // continues its cache.
  static at::Tensor Positions(const std::vector<RowSpan>& rows, int64_t n, at::Device device);
  // Commits every row's new positions to its cache and, unless `all_positions`, keeps only
  // each row's last hidden state ([rows, H]).
  static at::Tensor FinishRows(const at::Tensor& x, const std::vector<RowSpan>& rows,
                               bool all_positions);

  // Attention of every row: q [N, nH*d], k, v [N, nKV*d] (rotated for Llama), written into
  // `out` ([N, nH*d], contiguous). Every row (decode or prefill chunk) goes through one
  // cpu::CachedAttention call when it applies (CPU, float32 activations, a float32, bfloat16
  // or float16 cache); otherwise each row through RowAttention().
  void Attend(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const std::vector<RowSpan>& rows, double scale, int64_t window,
              at::Tensor& out) const;
  // Attention of one row: q [t, nH*d], k, v [t, nKV*d] (already rotated for Llama), written
  // into `out` ([t, nH*d], contiguous rows of the batch's output). `scale` multiplies q·kᵀ;
  // `window` > 0 limits keys to that many positions.
  void RowAttention(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    KvCache& cache, double scale, int64_t window, at::Tensor out) const;

  ModelConfig config_;
  at::TensorOptions options_;
  at::ScalarType kv_dtype_;
  int64_t attention_block_bytes_ = int64_t{8} << 20;
  cpu::MatmulPrecision matmul_precision_ = cpu::MatmulPrecision::kHighest;
  std::map<std::string, at::Tensor> weights_;
};

// y = x·Wᵀ + b for nn.Linear weights W [out, in]. A few rows on the CPU in float32 go through
// cpu::Linear (weights read once, unpacked, bfloat16/float16 widened in registers); otherwise a
// single row goes through a matrix-vector product (OpenBLAS streams the weights 2-3x faster that
// way than through a one-row GEMM) and more rows through at::linear. Weights held in another dtype
// than x (bfloat16/float16 served in place under float32 activations, `--dtype auto`) that no
// kernel takes are widened a block of outputs at a time, each block one GEMM: no widened copy of W
// is ever held whole. `precision`: how cpu::Linear multiplies by bfloat16 weights (the other paths
// compute at kHighest).
at::Tensor LinearForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                         cpu::MatmulPrecision precision = cpu::MatmulPrecision::kHighest);
// LinearForward of one x by several matrices, each with its bias: when the CPU kernel takes
// them all, one parallel pass for the group (cpu::LinearShared); otherwise one LinearForward
// each. Either way the same results.
std::vector<at::Tensor> LinearForwardShared(
    const at::Tensor& x, const std::vector<const at::Tensor*>& w,
    const std::vector<const at::Tensor*>& b,
    cpu::MatmulPrecision precision = cpu::MatmulPrecision::kHighest);

// Returns `table`'s rows for `tokens` in `dtype` (an embedding served in place in half precision
// widens only the rows it looks up).
at::Tensor EmbeddingRows(const at::Tensor& table, const at::Tensor& tokens, at::ScalarType dtype);
// y = x·W + b for transformers' Conv1D weights W [in, out] (GPT-2).
at::Tensor Conv1dForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b);

struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
};

using WeightMap = std::map<std::string, at::Tensor>;

// Returns every parameter the architecture declares, under its canonical name (GPT-2 with
// the "transformer." prefix), including the output projection even when it is tied.
std::vector<ParamSpec> DeclareParameters(const ModelConfig& config);
// Returns the input embedding's name, which a tied output projection shares.
std::string InputEmbeddingName(const ModelConfig& config);
inline constexpr const char* kOutputEmbeddingName = "lm_head.weight";

// Builds the model over materialised weights (every declared name present).
std::unique_ptr<CausalLm> BuildLlama(const ModelConfig& config, const WeightMap& weights,
                                     at::TensorOptions options);
std::unique_ptr<CausalLm> BuildGpt2(const ModelConfig& config, const WeightMap& weights,
                                    at::TensorOptions options);

}  // namespace adapterd::core
