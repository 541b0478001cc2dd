// The model-running facade that the rest of adapterd uses, free of LibTorch types: load a
// model, open sequences, run batched steps over them. One Step() runs every sequence of the
// batch through one forward pass — prefill for sequences that have not started, one decode
// token for the others — then chooses each row's next token with its own sampling state.
//
// Thread-safety: Load() and the accessors are safe from any thread. Step() mutates the
// sequences it is given and must be called by one thread at a time (the scheduler thread).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/load_report.h"
#include "core/model_config.h"
#include "core/sampling_params.h"

namespace adapterd::core {

class CausalLm;
class PrefixCache;
class SequenceAdapter;

struct TokenLogprob {
  int32_t id = 0;
  float logprob = 0;  // log-softmax of the model's raw logits.
};

struct StepOutput {
  // Not OK when this row alone failed (non-finite logits, sampling that overflowed): the
  // sequence did not advance and must end with this status; the other rows are unaffected.
  absl::Status status;
  int32_t token = 0;
  float logprob = 0;
  std::vector<TokenLogprob> top;  // The SamplingParams::top_logprobs most likely ids.
  // True when the step processed only part of the row's prompt (a prefill chunk, see
  // Engine::Step's `limits`): no token was chosen and the sequence did not advance.
  bool prefill_only = false;
};

// One request's token history, KV cache and sampling state. Created by Engine::NewSequence.
class Sequence {
 public:
  ~Sequence();
  const std::vector<int32_t>& tokens() const;  // Prompt followed by generated ids.
  int64_t prompt_length() const;
  int64_t generated() const;
  // Bytes of the KV cache blocks it alone holds; the shared segments it reads (prefix-tuning
  // positions, prefix-cache blocks) belong to the adapter and the prefix cache, and so do its
  // own full prompt blocks once the prefix cache holds them too.
  int64_t kv_bytes() const;
  // Positions its KV cache has room for, shared and own (0 while preempted).
  int64_t kv_capacity() const;
  // Of those, the positions it reads from shared segments rather than holds.
  int64_t kv_shared_positions() const;
  // The own blocks its KV cache holds once it has room for `positions` positions (at least
  // those it holds now; 0 while preempted).
  int64_t kv_blocks_for(int64_t positions) const;
  // True between Engine::Preempt and Engine::Resume: the sequence holds no KV cache.
  bool preempted() const;
  // Tokens not yet run through the model: the whole prompt before the first step, the part
  // of it past the chunks already prefilled, 1 while decoding.
  int64_t pending_tokens() const;
  // Prompt tokens whose keys and values came from the prefix cache instead of a prefill.
  int64_t cached_tokens() const;
  // Context positions the sequence occupies once its last token is processed: its tokens
  // plus the adapter's virtual tokens.
  int64_t positions() const;
  const SamplingParams& params() const;
  // The adapter this sequence runs with (null: the base model). Held for the sequence's
  // whole life, so an adapter unloaded meanwhile stays alive until the sequence ends.
  const std::shared_ptr<const SequenceAdapter>& adapter() const;

 private:
  friend class Engine;
  struct State;
  explicit Sequence(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

struct EngineOptions {
  std::string model_dir;
  std::string device = "cpu";
  std::string dtype = "auto";  // See LoadOptions::compute_dtype (core/model_loader.h).
  int threads = 0;  // Intra-op threads; 0 leaves LibTorch's setting alone.
  // CPU float32 kernels for few-row steps (core/cpu_kernels.h): "auto" (the best this CPU
  // supports), "avx512f", "avx2" or "none" (ATen/BLAS only). Process-wide.
  std::string cpu_kernels = "auto";
  bool map_weights = true;  // See LoadOptions::map_weights (core/model_loader.h).
  bool refresh_small_pages = true;  // See LoadOptions::refresh_small_pages.
  std::string quantize =
      "none";  // "none" | "int8" | "int8_weight_only" | "bf16_packed": see LoadOptions::quantize.
  // The dtype of the KV cache: "auto" (the dtype the weights are served in, `dtype`),
  // "float32", "bfloat16" or "float16". A half-precision cache holds twice the positions in
  // the same bytes; attention reads it in the compute dtype.
  std::string kv_cache_dtype = "auto";
  // How the base model multiplies by bfloat16 weights: "highest" (exactly as their float32
  // copy), "high" (the same here) or "medium" (activations rounded to bfloat16 and AVX-512 BF16
  // dot products where the CPU has them): see cpu::MatmulPrecision.
  std::string matmul_precision = "highest";
  // Bytes of prompt keys and values kept for reuse by later requests with the same leading
  // tokens and adapter (core/prefix_cache.h); 0 turns prefix reuse off.
  int64_t prefix_cache_bytes = 0;
  // Bytes of attention scores a prefill computes at once on the ATen path (no CPU kernels: a
  // long prompt's queries go in blocks); 0 keeps the default, 8 MiB.
  // Outputs do not depend on it.
  int64_t attention_block_bytes = 0;
};

// Prefix reuse so far: prompt tokens looked up, and of those found cached (not recomputed).
struct PrefixCacheStats {
  int64_t queried_tokens = 0;
  int64_t hit_tokens = 0;
  int64_t bytes = 0;
  int64_t pinned_bytes = 0;  // Of `bytes`, the blocks running sequences read (not evictable).
  int64_t blocks = 0;
  int64_t max_bytes = 0;
};

class Engine {
 public:
  // Positions of a KV cache block: the unit a cache grows by and the prefix cache shares.
  static constexpr int64_t kKvBlockPositions = 16;

  // Loads the model. `report` is filled also when loading fails.
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const EngineOptions& options,
                                                      LoadReport* report);
  ~Engine();

  const ModelConfig& config() const;
  // Bytes the KV cache holds per context position (every layer's keys and values, in the
  // cache's dtype): the one figure KV budgets are computed from.
  int64_t kv_bytes_per_position() const;
  const LoadReport& report() const { return report_; }
  // The model itself, for code inside core/ and adapters/ (LibTorch types).
  const CausalLm& model() const { return *model_; }
  // Positions the model can attend over (max_position_embeddings); an adapter's virtual
  // tokens take part of it.
  int64_t context_length() const;
  PrefixCacheStats prefix_cache_stats() const;
  // Drops the least recently used prefix-cache blocks until it holds at most `max_bytes`
  // (a KV pool that needs their room for running requests). Thread-safe.
  void ShrinkPrefixCache(int64_t max_bytes) const;
  // Positions the prefix cache would let a new sequence of `prompt` with `adapter` read in
  // place now (a prompt-tuning adapter's soft prompt and the prompt's cached leading blocks; 0
  // with the cache off). An eviction before the sequence is made may lower it.
  int64_t CachedPrefixPositions(const std::shared_ptr<const SequenceAdapter>& adapter,
                                const std::vector<int32_t>& prompt) const;
  // Returns the number of intra-op threads LibTorch uses.
  static int threads();
  // Returns the instruction set of the CPU kernels in use ("avx512f", "avx2" or "none").
  static const char* cpu_kernels();
  // Returns the kernel of --quantize int8's (w8a8) products ("avx512vnni", "avx2" or "none": ATen).
  static const char* w8a8_kernel();

  // Opens a sequence for `prompt`, run with `adapter` (null: the base model). InvalidArgument
  // for an empty prompt, an id outside the vocabulary, a prompt that (with the adapter's
  // virtual tokens) fills the context, or bad sampling parameters.
  // `kv_capacity` is the positions its KV cache starts with room for (0: the prompt's, the
  // adapter's virtual tokens and 64 more), in blocks of kKvBlockPositions; a step that needs
  // more adds blocks, or ReserveKv does ahead of time. Nothing cached is ever moved.
  absl::StatusOr<std::unique_ptr<Sequence>> NewSequence(
      std::vector<int32_t> prompt, const SamplingParams& params,
      std::shared_ptr<const SequenceAdapter> adapter = nullptr, int64_t kv_capacity = 0) const;
  // Grows the KV cache of `seq` to the blocks that hold `positions` positions when it holds
  // fewer (a caller that budgets KV memory grows caches itself, in the same blocks). ResourceExhausted when the
  // memory cannot be had; FailedPrecondition for a preempted sequence.
  absl::Status ReserveKv(Sequence& seq, int64_t positions) const;
  // Preemption by recomputation: frees the KV cache of `seq` and keeps everything else (its
  // tokens, sampling state and generator, penalty counts). It cannot step until Resume.
  void Preempt(Sequence& seq) const;
  // Gives a preempted sequence a KV cache of `kv_capacity` positions again: the adapter's
  // prefix positions are seeded and leading blocks in the prefix cache reused, and its next
  // steps prefill the rest of its tokens (prompt and generated), after which it chooses its
  // next token as if it had never stopped.
  absl::Status Resume(Sequence& seq, int64_t kv_capacity) const;

  // Runs one step over `batch` (distinct sequences, any mix of adapters) and appends each
  // row's chosen token. Outputs are in `batch` order. `limits` (empty, or one per row) caps
  // the tokens a row runs in this step (0: no cap): a row whose pending tokens exceed its cap
  // runs the first `cap` of them (chunked prefill) and gets no token (`prefill_only`); a
  // prefix or prompt-tuning adapter's virtual tokens go with the first chunk, uncounted.
  absl::StatusOr<std::vector<StepOutput>> Step(const std::vector<Sequence*>& batch,
                                               const std::vector<int64_t>& limits = {}) const;

  // Returns float32 logits of every prompt position, row-major [T, vocab] (for tests and
  // diagnostics; uses a fresh sequence).
  absl::StatusOr<std::vector<float>> PromptLogits(
      const std::vector<int32_t>& prompt,
      std::shared_ptr<const SequenceAdapter> adapter = nullptr) const;

 private:
  Engine(std::unique_ptr<CausalLm> model, LoadReport report);
  // Gives `s` a fresh cache of `capacity` positions: seeds prefix-tuning positions, marks a
  // soft prompt pending, reuses cached leading blocks (counted in the prefix statistics and in
  // `s.cached_tokens` when `count_reuse`).
  absl::Status OpenCache(Sequence::State& s, int64_t capacity, bool count_reuse) const;

  std::unique_ptr<CausalLm> model_;
  LoadReport report_;
  std::unique_ptr<PrefixCache> prefix_cache_;  // Null: off.
  mutable std::atomic<int64_t> prefix_queried_{0};
  mutable std::atomic<int64_t> prefix_hits_{0};
};

// Why a generation ended.
enum class FinishReason { kLength, kEos, kStop, kCancelled };
const char* FinishReasonName(FinishReason r);

struct GenerateRequest {
  std::vector<int32_t> prompt;
  std::shared_ptr<const SequenceAdapter> adapter;  // Null: the base model.
  SamplingParams params;
  int64_t max_new_tokens = 16;
  bool ignore_eos = false;
  std::vector<int64_t> stop_token_ids;  // In addition to the EOS ids.
  // The ids that end generation (see EosTokenIds in core/stop_criteria.h); when empty, the
  // model's config.json / generation_config.json ids.
  std::vector<int64_t> eos_token_ids;
};

struct GenerateResult {
  std::vector<StepOutput> steps;
  FinishReason finish_reason = FinishReason::kLength;
};

// Runs one request to completion on its own (the command-line path; the server batches).
absl::StatusOr<GenerateResult> Generate(const Engine& engine, const GenerateRequest& request);

}  // namespace adapterd::core
