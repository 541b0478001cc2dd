#include "core/engine.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/causal_lm.h"
#include "core/cpu_kernels.h"
#include "core/model_loader.h"
#include "core/prefix_cache.h"
#include "core/prompt_rules.h"
#include "core/sampler.h"
#include "core/status_macros.h"
#include "core/stop_criteria.h"
#include "core/torch_error.h"

namespace adapterd::core {

static_assert(KvCache::kBlock == Engine::kKvBlockPositions && PrefixCache::kBlock == Engine::kKvBlockPositions,
              "a KV cache grows by the blocks the prefix cache shares and the scheduler counts");

struct Sequence::State {
  std::vector<int32_t> tokens;
  int64_t prompt_length = 0;
  std::shared_ptr<const SequenceAdapter> adapter;
  // Cache positions that hold no token of `tokens`: prefix-tuning keys/values (seeded at
  // creation) or soft-prompt rows (written by the first step).
  int64_t virtual_positions = 0;
  bool soft_prompt_pending = false;
  int64_t cached_tokens = 0;  // Prompt tokens reused from the prefix cache.
  SamplingParams params;
  int64_t vocab = 0;  // Ids this sequence may hold: the adapter's vocabulary or the base's.
  std::unique_ptr<KvCache> cache;
  at::Generator generator;
  std::vector<int64_t> seen;     // Distinct ids in `tokens`, for the repetition penalty.
  std::vector<uint8_t> is_seen;  // Indexed by id.
  GeneratedCounts generated;     // Counted only when the params need them.
  absl::flat_hash_map<int64_t, size_t> generated_index;  // id -> position in generated.ids.

  bool CountsGenerated() const {
    return params.presence_penalty != 0.0f || params.frequency_penalty != 0.0f;
  }
  void CountGenerated(int32_t id) {
    ++generated.length;
    if (!CountsGenerated()) return;
    auto [it, inserted] = generated_index.try_emplace(id, generated.ids.size());
    if (inserted) {
      generated.ids.push_back(id);
      generated.counts.push_back(1.0f);
    } else {
      generated.counts[it->second] += 1.0f;
    }
  }

  void Remember(int32_t id) {
    if (!is_seen[id]) {
      is_seen[id] = 1;
      seen.push_back(id);
    }
  }
};

Sequence::Sequence(std::unique_ptr<State> state) : state_(std::move(state)) {}
Sequence::~Sequence() = default;
const std::vector<int32_t>& Sequence::tokens() const { return state_->tokens; }
int64_t Sequence::prompt_length() const { return state_->prompt_length; }
int64_t Sequence::generated() const {
  return static_cast<int64_t>(state_->tokens.size()) - state_->prompt_length;
}
int64_t Sequence::kv_bytes() const { return state_->cache ? state_->cache->bytes() : 0; }
int64_t Sequence::kv_capacity() const { return state_->cache ? state_->cache->capacity() : 0; }
int64_t Sequence::kv_blocks_for(int64_t positions) const {
  return state_->cache ? state_->cache->BlocksFor(positions) : 0;
}
int64_t Sequence::kv_shared_positions() const {
  return state_->cache ? state_->cache->shared_length() : 0;
}
bool Sequence::preempted() const { return state_->cache == nullptr; }
int64_t Sequence::cached_tokens() const { return state_->cached_tokens; }
int64_t Sequence::pending_tokens() const {
  if (state_->cache == nullptr) return static_cast<int64_t>(state_->tokens.size());
  const int64_t soft_rows = state_->soft_prompt_pending ? state_->adapter->virtual_tokens() : 0;
  const int64_t done = state_->cache->length() - (state_->virtual_positions - soft_rows);
  return static_cast<int64_t>(state_->tokens.size()) - done;
}
int64_t Sequence::positions() const {
  return static_cast<int64_t>(state_->tokens.size()) + state_->virtual_positions;
}
const SamplingParams& Sequence::params() const { return state_->params; }
const std::shared_ptr<const SequenceAdapter>& Sequence::adapter() const { return state_->adapter; }

Engine::Engine(std::unique_ptr<CausalLm> model, LoadReport report)
    : model_(std::move(model)), report_(std::move(report)) {}
Engine::~Engine() = default;

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const EngineOptions& options,
                                                     LoadReport* report) {
  if (options.threads > 0) at::set_num_threads(options.threads);
  cpu::Isa isa = cpu::SupportedIsa();
  if (options.cpu_kernels != "auto") {
    if (!cpu::IsaFromName(options.cpu_kernels, &isa)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "cpu_kernels must be auto, avx512f, avx2 or none, got \"", options.cpu_kernels, "\""));
    }
  }
  if (!cpu::SelectIsa(isa)) {
    return absl::InvalidArgumentError(
        absl::StrCat("cpu_kernels=", options.cpu_kernels, " is not supported by this CPU (best: ",
                     cpu::IsaName(cpu::SupportedIsa()), ")"));
  }
  at::ScalarType kv_dtype = at::kFloat;
  const bool kv_auto = options.kv_cache_dtype == "auto";
  if (options.kv_cache_dtype == "float32") {
    kv_dtype = at::kFloat;
  } else if (options.kv_cache_dtype == "bfloat16") {
    kv_dtype = at::kBFloat16;
  } else if (options.kv_cache_dtype == "float16") {
    kv_dtype = at::kHalf;
  } else if (!kv_auto) {
    return absl::InvalidArgumentError(absl::StrCat(
        "kv_cache_dtype must be auto, float32, bfloat16 or float16, got \"", options.kv_cache_dtype, "\""));
  }
  cpu::MatmulPrecision precision;
  if (!cpu::MatmulPrecisionFromName(options.matmul_precision, &precision)) {
    return absl::InvalidArgumentError(
        absl::StrCat("matmul_precision must be highest, high or medium, got \"",
                     options.matmul_precision, "\""));
  }
  if (options.attention_block_bytes < 0) {
    return absl::InvalidArgumentError("attention_block_bytes must be 0 (the default) or more");
  }
  LoadOptions load;
  load.device = options.device;
  load.compute_dtype = options.dtype;
  load.map_weights = options.map_weights;
  load.refresh_small_pages = options.refresh_small_pages;
  load.quantize = options.quantize;
  ASSIGN_OR_RETURN(auto model, LoadModel(options.model_dir, load, report));
  if (!kv_auto) model->set_kv_dtype(kv_dtype);
  if (options.attention_block_bytes > 0) model->set_attention_block_bytes(options.attention_block_bytes);
  switch (model->kv_dtype()) {
    case at::kBFloat16: report->kv_cache_dtype = "bfloat16"; break;
    case at::kHalf: report->kv_cache_dtype = "float16"; break;
    default: report->kv_cache_dtype = "float32"; break;
  }
  model->set_matmul_precision(precision);
  report->matmul_precision = options.matmul_precision;
  if (precision == cpu::MatmulPrecision::kMedium) {
    report->bf16_products =
        absl::StrContains(report->weights_dtype, "bfloat16") &&
        report->compute_dtype == "float32" &&
        (report->quantization == "none" || report->quantization == "bf16_packed") &&
        model->config().architecture != Architecture::kGpt2 && cpu::Bf16ProductsAvailable();
  }
  if (options.prefix_cache_bytes < 0) {
    return absl::InvalidArgumentError("prefix_cache_bytes must be 0 (off) or more");
  }
  auto engine = std::unique_ptr<Engine>(new Engine(std::move(model), *report));
  if (options.prefix_cache_bytes > 0) {
    engine->prefix_cache_ = std::make_unique<PrefixCache>(options.prefix_cache_bytes);
  }
  return engine;
}

PrefixCacheStats Engine::prefix_cache_stats() const {
  PrefixCacheStats s;
  s.queried_tokens = prefix_queried_.load(std::memory_order_relaxed);
  s.hit_tokens = prefix_hits_.load(std::memory_order_relaxed);
  if (prefix_cache_ != nullptr) {
    s.bytes = prefix_cache_->bytes();
    s.pinned_bytes = prefix_cache_->pinned_bytes();
    s.blocks = prefix_cache_->blocks();
    s.max_bytes = prefix_cache_->max_bytes();
  }
  return s;
}

void Engine::ShrinkPrefixCache(int64_t max_bytes) const {
  if (prefix_cache_ != nullptr) prefix_cache_->Shrink(std::max<int64_t>(max_bytes, 0));
}

int64_t Engine::CachedPrefixPositions(const std::shared_ptr<const SequenceAdapter>& adapter,
                                      const std::vector<int32_t>& prompt) const {
  if (prefix_cache_ == nullptr || prompt.empty()) return 0;
  // As OpenCache asks: the last token always runs.
  return prefix_cache_->Cached(adapter, prompt, static_cast<int64_t>(prompt.size()) - 1,
                               adapter ? adapter->virtual_tokens() : 0);
}

const ModelConfig& Engine::config() const { return model_->config(); }
int64_t Engine::kv_bytes_per_position() const {
  const ModelConfig& c = model_->config();
  const int64_t element = static_cast<int64_t>(c10::elementSize(model_->kv_dtype()));
  return c.num_layers * 2 * c.num_kv_heads * c.head_dim * element;
}
int64_t Engine::context_length() const { return model_->config().max_position_embeddings; }
int Engine::threads() { return at::get_num_threads(); }
const char* Engine::cpu_kernels() { return cpu::IsaName(cpu::SelectedIsa()); }
const char* Engine::w8a8_kernel() { return cpu::W8A8KernelName(); }

absl::Status Engine::OpenCache(Sequence::State& s, int64_t capacity, bool count_reuse) const {
  const int64_t virtual_tokens = s.adapter ? s.adapter->virtual_tokens() : 0;
  int64_t prefix_positions = 0;
  s.cache = model_->NewCache(capacity);
  s.virtual_positions = 0;
  s.soft_prompt_pending = false;
  c10::InferenceMode guard;
  if (s.adapter) {
    try {
      prefix_positions = s.adapter->SeedCache(*s.cache);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("seeding the prefix failed: ", TorchErrorMessage(e)));
    }
    s.virtual_positions = prefix_positions + virtual_tokens;
    s.soft_prompt_pending = virtual_tokens > 0;
  }
  if (prefix_positions + static_cast<int64_t>(s.tokens.size()) >= context_length()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt has ", s.tokens.size(), " tokens (+", prefix_positions,
        " prefix positions); the model's context holds ", context_length(),
        " and at least one must be left to generate"));
  }
  if (prefix_cache_ == nullptr) return absl::OkStatus();
  // At least the last token is run: its logits choose the next token.
  int64_t reused = 0;
  try {
    reused = prefix_cache_->Reuse(s.adapter, s.tokens, static_cast<int64_t>(s.tokens.size()) - 1,
                                  prefix_positions, virtual_tokens, *s.cache);
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("reusing a cached prefix failed: ", TorchErrorMessage(e)));
  }
  if (reused > 0) s.soft_prompt_pending = false;
  // A soft prompt of other than whole blocks would shift the prompt's blocks off the cache's
  // own ones, and the prefix cache could only copy them: the blocks start after it instead.
  if (s.soft_prompt_pending) {
    try {
      s.cache->AlignBlocks(prefix_positions + virtual_tokens);
    } catch (const std::exception& e) {
      return absl::InternalError(absl::StrCat("aligning the KV blocks failed: ", TorchErrorMessage(e)));
    }
  }
  if (count_reuse) {
    s.cached_tokens = reused;
    prefix_queried_.fetch_add(s.prompt_length, std::memory_order_relaxed);
    prefix_hits_.fetch_add(reused, std::memory_order_relaxed);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Sequence>> Engine::NewSequence(
    std::vector<int32_t> prompt, const SamplingParams& params,
    std::shared_ptr<const SequenceAdapter> adapter, int64_t kv_capacity) const {
  RETURN_IF_ERROR(ValidateSamplingParams(params));
  const ModelConfig& c = config();
  const int64_t virtual_tokens = adapter ? adapter->virtual_tokens() : 0;
  const int64_t vocab = adapter && adapter->vocab_size() > 0 ? adapter->vocab_size() : c.vocab_size;
  RETURN_IF_ERROR(ValidatePrompt(prompt, vocab, context_length(), virtual_tokens));
  if (kv_capacity < 0) return absl::InvalidArgumentError("kv_capacity must be 0 (default) or more");
  auto state = std::make_unique<Sequence::State>();
  state->prompt_length = static_cast<int64_t>(prompt.size());
  state->params = params;
  state->vocab = vocab;
  state->is_seen.assign(vocab, 0);
  for (int32_t id : prompt) state->Remember(id);
  state->tokens = std::move(prompt);
  state->generator = at::make_generator<at::CPUGeneratorImpl>(params.seed);
  state->adapter = std::move(adapter);
  if (kv_capacity == 0) {
    kv_capacity = std::min<int64_t>(context_length(), state->prompt_length + virtual_tokens + 64);
  }
  RETURN_IF_ERROR(OpenCache(*state, kv_capacity, /*count_reuse=*/true));
  return std::unique_ptr<Sequence>(new Sequence(std::move(state)));
}

absl::Status Engine::ReserveKv(Sequence& seq, int64_t positions) const {
  Sequence::State& s = *seq.state_;
  if (s.cache == nullptr) return absl::FailedPreconditionError("the sequence is preempted");
  c10::InferenceMode guard;
  try {
    s.cache->Reserve(positions);
  } catch (const std::exception& e) {
    return absl::ResourceExhaustedError(
        absl::StrCat("growing the KV cache to ", positions, " positions failed: ", TorchErrorMessage(e)));
  }
  return absl::OkStatus();
}

void Engine::Preempt(Sequence& seq) const { seq.state_->cache.reset(); }

absl::Status Engine::Resume(Sequence& seq, int64_t kv_capacity) const {
  Sequence::State& s = *seq.state_;
  if (s.cache != nullptr) return absl::FailedPreconditionError("the sequence is not preempted");
  absl::Status opened = OpenCache(s, std::max<int64_t>(kv_capacity, 1), /*count_reuse=*/false);
  if (!opened.ok()) s.cache.reset();
  return opened;
}

absl::StatusOr<std::vector<StepOutput>> Engine::Step(const std::vector<Sequence*>& batch,
                                                     const std::vector<int64_t>& limits) const {
  if (batch.empty()) return std::vector<StepOutput>();
  if (!limits.empty() && limits.size() != batch.size()) {
    return absl::InvalidArgumentError("Step: one limit per row, or none");
  }
  c10::InferenceMode guard;
  // Pack rows grouped by adapter so that every adapter's tokens form one contiguous range.
  std::vector<size_t> order(batch.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::less<const void*>()(batch[a]->state_->adapter.get(),
                                    batch[b]->state_->adapter.get());
  });
  std::vector<int64_t> ids;
  std::vector<RowSpan> rows;
  std::vector<AdapterBatch::Range> ranges;
  std::vector<char> partial(batch.size(), 0);
  for (size_t i : order) {
    Sequence::State& s = *batch[i]->state_;
    const int64_t total = static_cast<int64_t>(s.tokens.size());
    if (s.cache == nullptr) {
      return absl::FailedPreconditionError("a preempted sequence cannot step before it is resumed");
    }
    if (total + s.virtual_positions > context_length()) {
      return absl::FailedPreconditionError(
          absl::StrCat("sequence of ", total, " tokens cannot take another step (context ",
                       context_length(), ")"));
    }
    const int64_t offset = static_cast<int64_t>(ids.size());
    int64_t soft_rows = 0;
    if (s.soft_prompt_pending) {
      soft_rows = s.adapter->virtual_tokens();
      ids.insert(ids.end(), soft_rows, 0);  // Placeholders; the soft prompt replaces them.
    }
    const int64_t done = s.cache->length() - (s.virtual_positions - soft_rows);
    if (done >= total) {
      return absl::FailedPreconditionError("sequence has no new token to process");
    }
    int64_t take = total - done;
    if (!limits.empty() && limits[i] > 0 && take > limits[i]) {
      take = limits[i];
      partial[i] = 1;
    }
    ids.insert(ids.end(), s.tokens.begin() + done, s.tokens.begin() + done + take);
    const int64_t length = static_cast<int64_t>(ids.size()) - offset;
    rows.push_back({offset, length, s.cache.get()});
    ranges.push_back({offset, length, s.adapter.get(), soft_rows});
  }
  AdapterBatch adapters(std::move(ranges));
  std::vector<StepOutput> out(batch.size());
  at::Tensor logits, logprobs;
  try {
    at::Tensor tokens = at::tensor(ids, at::kLong).to(model_->options().device());
    logits =
        model_->Forward(tokens, rows, /*all_positions=*/false, adapters.empty() ? nullptr : &adapters)
            .to(at::kCPU, at::kFloat);
    // Rows of a batch whose adapters resize the vocabulary differ in width: a row's entries
    // past its own vocabulary weigh nothing.
    for (size_t r = 0; r < order.size(); ++r) {
      const int64_t vocab = batch[order[r]]->state_->vocab;
      if (vocab < logits.size(1)) {
        logits[static_cast<int64_t>(r)].narrow(0, vocab, logits.size(1) - vocab).fill_(-INFINITY);
      }
    }
    logprobs = at::log_softmax(logits, -1);
  } catch (const std::exception& e) {
    // Nothing was committed: every cache keeps its length, so the rows can be retried.
    return absl::InternalError(absl::StrCat("model step failed: ", TorchErrorMessage(e)));
  }
  // One pass over the whole batch; rows are looked at one by one only when something is off.
  bool all_finite = true;
  try {
    all_finite = at::isfinite(logits).all().item<bool>();
  } catch (const std::exception&) {
    all_finite = false;
  }
  // Keeps the full blocks of the prompt's first `length` tokens for later requests. Called
  // after every prefill chunk, so that a long prompt's blocks are copied a chunk's worth at a
  // time rather than all in the step that completes it (a latency spike for every stream in
  // that step).
  const auto keep_prefix = [&](Sequence::State& s, int64_t length) {
    if (prefix_cache_ == nullptr) return;
    const int64_t soft_rows = s.adapter ? s.adapter->virtual_tokens() : 0;
    try {
      prefix_cache_->Insert(s.adapter, s.tokens, length, s.virtual_positions - soft_rows, soft_rows,
                            *s.cache);
    } catch (const std::exception&) {
      // Only a later request's reuse is lost; this one goes on.
    }
  };
  for (size_t r = 0; r < order.size(); ++r) {
    Sequence::State& s = *batch[order[r]]->state_;
    s.soft_prompt_pending = false;
    StepOutput& o = out[order[r]];
    if (partial[order[r]]) {
      o.prefill_only = true;  // Its logits predict a prompt token: nothing to choose.
      keep_prefix(s, s.cache->length() - s.virtual_positions);
      continue;
    }
    if (static_cast<int64_t>(s.tokens.size()) == s.prompt_length) {
      keep_prefix(s, s.prompt_length);  // The prompt is all in the cache now.
    }
    try {
      at::Tensor row = logits[r].narrow(0, 0, s.vocab);
      at::Tensor row_logprobs = logprobs[r].narrow(0, 0, s.vocab);
      if (!all_finite && !at::isfinite(row).all().item<bool>()) {
        o.status = absl::InternalError("the model produced non-finite logits for this sequence");
        continue;
      }
      at::Tensor processed = ProcessLogits(row, s.params, s.seen, s.generated);
      absl::StatusOr<int64_t> token = ChooseToken(processed, s.params, s.generator);
      if (!token.ok()) {
        o.status = token.status();
        continue;
      }
      o.token = static_cast<int32_t>(*token);
      o.logprob = row_logprobs[*token].item<float>();
      if (s.params.top_logprobs > 0) {
        auto [values, indices] = at::topk(row_logprobs, std::min<int64_t>(s.params.top_logprobs, s.vocab));
        auto v = values.accessor<float, 1>();
        auto i = indices.accessor<int64_t, 1>();
        for (int64_t k = 0; k < values.size(0); ++k) {
          o.top.push_back({static_cast<int32_t>(i[k]), v[k]});
        }
      }
    } catch (const std::exception& e) {
      o = StepOutput();
      o.status = absl::InternalError(absl::StrCat("sampling failed: ", TorchErrorMessage(e)));
      continue;
    }
    s.tokens.push_back(o.token);
    s.Remember(o.token);
    s.CountGenerated(o.token);
  }
  return out;
}

absl::StatusOr<std::vector<float>> Engine::PromptLogits(
    const std::vector<int32_t>& prompt, std::shared_ptr<const SequenceAdapter> adapter) const {
  ASSIGN_OR_RETURN(auto seq, NewSequence(prompt, SamplingParams(), std::move(adapter)));
  c10::InferenceMode guard;
  Sequence::State& s = *seq->state_;
  const int64_t soft_rows = s.soft_prompt_pending ? s.adapter->virtual_tokens() : 0;
  std::vector<int64_t> ids(soft_rows, 0);
  ids.insert(ids.end(), prompt.begin(), prompt.end());
  const int64_t n = static_cast<int64_t>(ids.size());
  AdapterBatch adapters({{0, n, s.adapter.get(), soft_rows}});
  try {
    at::Tensor tokens = at::tensor(ids, at::kLong).to(model_->options().device());
    std::vector<RowSpan> rows = {{0, n, s.cache.get()}};
    at::Tensor logits = model_->Forward(tokens, rows, /*all_positions=*/true,
                                        adapters.empty() ? nullptr : &adapters)
                            .narrow(0, soft_rows, n - soft_rows)
                            .to(at::kCPU, at::kFloat)
                            .contiguous();
    return std::vector<float>(logits.data_ptr<float>(), logits.data_ptr<float>() + logits.numel());
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("model forward failed: ", TorchErrorMessage(e)));
  }
}

const char* FinishReasonName(FinishReason r) {
  switch (r) {
    case FinishReason::kLength: return "length";
    case FinishReason::kEos: return "eos";
    case FinishReason::kStop: return "stop";
    case FinishReason::kCancelled: return "cancelled";
  }
  return "?";
}

absl::StatusOr<GenerateResult> Generate(const Engine& engine, const GenerateRequest& request) {
  if (request.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", request.max_new_tokens));
  }
  ASSIGN_OR_RETURN(auto seq, engine.NewSequence(request.prompt, request.params, request.adapter));
  GenerateResult result;
  StopCriteria stop;
  stop.eos_token_ids =
      request.eos_token_ids.empty() ? engine.config().eos_token_ids : request.eos_token_ids;
  stop.ignore_eos = request.ignore_eos;
  stop.stop_token_ids = request.stop_token_ids;
  stop.max_new_tokens = request.max_new_tokens;
  const std::string no_text;
  while (seq->positions() < engine.context_length()) {
    ASSIGN_OR_RETURN(auto step, engine.Step({seq.get()}));
    RETURN_IF_ERROR(step[0].status);
    result.steps.push_back(step[0]);
    const auto reason =
        stop.Check(step[0].token, no_text, 0, static_cast<int64_t>(result.steps.size()),
                   seq->positions(), engine.context_length());
    if (reason) {
      result.finish_reason = *reason;
      return result;
    }
  }
  result.finish_reason = FinishReason::kLength;
  return result;
}

}  // namespace adapterd::core
