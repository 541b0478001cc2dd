#include "server/scheduler.h"

#include <algorithm>
#include <set>

#include "absl/strings/str_cat.h"
#include "core/prompt_rules.h"
#include "core/stop_criteria.h"
#include "server/metrics.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {

// A request inside the scheduler: queued, then running with its sequence.
struct Scheduler::Active {
  std::unique_ptr<GenerationRequest> request;
  std::shared_ptr<RequestSink> sink;
  std::unique_ptr<core::Sequence> sequence;
  std::unique_ptr<core::Tokenizer::DecodeStream> stream;
  core::StopCriteria stop;
  std::string text;  // Stable text so far (for stop strings).
  int64_t generated = 0;
  uint64_t order = 0;            // Admission order: the newest is preempted first.
  int64_t start_positions = 0;   // The cache it starts with (prompt and virtual tokens, + 1), shared and own.
  int64_t max_positions = 0;     // The most positions it can reach (prompt, virtual, max_new).
  Clock::time_point first_step, first_token, last_token;
  bool started = false;
};

namespace {

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Client-facing form of an error: INTERNAL details (LibTorch messages, shapes, paths) go to
// the log under the request id, and the client gets the id to quote.
absl::Status ForClient(const absl::Status& s, uint64_t request_id) {
  if (s.code() != absl::StatusCode::kInternal) return s;
  spdlog::error("request {}: {}", request_id, std::string(s.message()));
  return absl::InternalError(absl::StrCat("internal error while generating (request ", request_id,
                                          "); the server log has the details"));
}

}  // namespace

Scheduler::Scheduler(const core::Engine& engine, const core::Tokenizer* tokenizer,
                     Metrics* metrics, SchedulerOptions options)
    : engine_(engine),
      tokenizer_(tokenizer),
      metrics_(metrics),
      options_(options),
      eos_(options.eos_token_ids.empty() ? engine.config().eos_token_ids : options.eos_token_ids),
      governor_(options.max_step_slowdown, options.max_tokens_per_step) {
  kv_bytes_per_position_ = engine.kv_bytes_per_position();
  block_bytes_ = kKvBlock * kv_bytes_per_position_;
  total_blocks_ = options.max_kv_bytes / block_bytes_;
  thread_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
    cancel_all_ = true;
  }
  thread_.join();
}

int64_t Scheduler::OwnBlocks(const core::Sequence& q) const {
  // The blocks its cache alone holds: those it handed to the prefix cache count there.
  return (q.kv_bytes() + block_bytes_ - 1) / block_bytes_;
}

int64_t Scheduler::UsedBlocks() const {
  // Shared positions are counted where they live: prefix-cache blocks in CachedBlocks(),
  // prefix-tuning positions in their adapter's memory.
  int64_t used = 0;
  for (const auto& a : running_set_) {
    if (a->sequence != nullptr) used += OwnBlocks(*a->sequence);
  }
  return used;
}

int64_t Scheduler::CachedBlocks() const {
  return (engine_.prefix_cache_stats().bytes + block_bytes_ - 1) / block_bytes_;
}

int64_t Scheduler::FreeBlocks(int64_t reserved, int64_t need) {
  int64_t cached = CachedBlocks();
  if (total_blocks_ - reserved - cached < need && cached > 0) {
    engine_.ShrinkPrefixCache(std::max<int64_t>(total_blocks_ - reserved - need, 0) * block_bytes_);
    cached = CachedBlocks();
  }
  return total_blocks_ - reserved - cached;
}

void Scheduler::TrimPrefixCache() {
  const int64_t room = total_blocks_ - UsedBlocks();
  if (CachedBlocks() > room) engine_.ShrinkPrefixCache(std::max<int64_t>(room, 0) * block_bytes_);
}

namespace {

int64_t VirtualTokens(const GenerationRequest& r) {
  return r.adapter != nullptr ? adapters::ReportOf(r.adapter).num_virtual_tokens : 0;
}

}  // namespace

absl::Status Scheduler::Submit(std::unique_ptr<GenerationRequest> request,
                               std::shared_ptr<RequestSink> sink) {
  absl::MutexLock lock(&mu_);
  if (!admitting_) return absl::UnavailableError("the server is shutting down");
  if (Waiting() >= options_.max_queue) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the admission queue is full (", options_.max_queue, " waiting requests); retry later"));
  }
  // Its whole length must fit the pool alone (an adapter still loading adds its virtual
  // tokens later; Start checks again).
  const int64_t positions = std::min<int64_t>(
      engine_.context_length(),
      static_cast<int64_t>(request->prompt.size()) + VirtualTokens(*request) + request->max_new_tokens);
  if (Blocks(positions) > total_blocks_) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the request needs ", Blocks(positions) * kKvBlock * kv_bytes_per_position_,
        " bytes of KV cache (", positions, " positions), more than the budget of ",
        options_.max_kv_bytes));
  }
  auto a = std::make_unique<Active>();
  a->request = std::move(request);
  a->sink = std::move(sink);
  if (a->request->adapter_wait != nullptr) {
    parked_.push_back(std::move(a));
    // The loop may be asleep without a timeout (nothing was parked) and the load may have
    // settled already (its wake-up came before this request was parked): wake it, so that it
    // polls the parked requests from now on.
    wake_ = true;
    if (metrics_) metrics_->SetAdapterWaiting(static_cast<int64_t>(parked_.size()));
  } else {
    queue_.push_back(std::move(a));
  }
  queue_depth_.store(Waiting(), std::memory_order_relaxed);
  idle_ = false;
  return absl::OkStatus();
}

void Scheduler::StopAdmission() {
  absl::MutexLock lock(&mu_);
  admitting_ = false;
}

bool Scheduler::WaitIdle(Clock::time_point deadline) {
  absl::MutexLock lock(&mu_);
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return idle_; };
  const auto wait = deadline - Clock::now();
  if (wait.count() <= 0) return idle_;
  mu_.AwaitWithTimeout(absl::Condition(&idle),
                       absl::FromChrono(std::chrono::duration_cast<std::chrono::nanoseconds>(wait)));
  return idle_;
}

void Scheduler::CancelAll() {
  absl::MutexLock lock(&mu_);
  cancel_all_ = true;
}

void Scheduler::Wake() {
  absl::MutexLock lock(&mu_);
  wake_ = true;
}

std::vector<std::string> Scheduler::RunningAdapters() const {
  absl::MutexLock lock(&mu_);
  return running_adapters_;
}

std::vector<std::string> Scheduler::WaitingAdapters() const {
  absl::MutexLock lock(&mu_);
  std::set<std::string> names;
  for (const auto* q : {&queue_, &parked_}) {
    for (const auto& a : *q) {
      if (!a->request->adapter_name.empty()) names.insert(a->request->adapter_name);
    }
  }
  return {names.begin(), names.end()};
}

void Scheduler::Finish(Active& a, const absl::Status& status, core::FinishReason reason) {
  const auto now = Clock::now();
  const absl::Status client_status = ForClient(status, a.request->id);
  GenerationStats stats;
  stats.prompt_tokens = static_cast<int64_t>(a.request->prompt.size());
  stats.completion_tokens = a.generated;
  stats.total_seconds = Seconds(a.request->arrival, now);
  stats.queue_seconds = Seconds(a.request->arrival, a.started ? a.first_step : now);
  stats.time_to_first_token_seconds = a.generated ? Seconds(a.request->arrival, a.first_token) : 0;
  stats.adapter_load_wait_seconds = a.request->adapter_load_wait_seconds;
  stats.cached_prompt_tokens = a.sequence ? a.sequence->cached_tokens() : 0;
  std::string tail;
  if (a.stream && status.ok()) {
    auto rest = a.stream->Finish();
    if (rest.ok()) tail = *rest;
  }
  if (metrics_) {
    metrics_->RequestDone(a.request->adapter_name, absl::StatusCodeToString(status.code()),
                          stats.total_seconds,
                          stats.queue_seconds, stats.time_to_first_token_seconds,
                          stats.prompt_tokens, stats.completion_tokens);
  }
  spdlog::debug("request {} done: {} {} ({} prompt, {} generated, {:.3f} s)", a.request->id,
                absl::StatusCodeToString(status.code()), core::FinishReasonName(reason), stats.prompt_tokens,
                stats.completion_tokens, stats.total_seconds);
  a.sink->OnDone(client_status, reason, stats, tail);
  a.sequence.reset();  // Releases the KV cache and the adapter reference.
}

void Scheduler::Admit(std::vector<std::unique_ptr<Active>>& admitted) {
  absl::MutexLock lock(&mu_);
  int64_t tokens = 0;
  const auto now = Clock::now();
  // Blocks taken: the running caches and one of headroom for each to grow into.
  int64_t reserved = UsedBlocks() + static_cast<int64_t>(running_set_.size());
  bool counted_on_cache = false;  // An admission of this round counts on cached blocks.
  for (auto it = queue_.begin(); it != queue_.end();) {
    Active& a = **it;
    if (cancel_all_ || a.request->cancelled->load() || now >= a.request->deadline) {
      admitted.push_back(std::move(*it));  // Finished below, outside the lock.
      it = queue_.erase(it);
      continue;
    }
    const int64_t rows = static_cast<int64_t>(running_set_.size() + admitted.size());
    const int64_t need_tokens = static_cast<int64_t>(a.request->prompt.size());
    // Preempted requests resume before anything new starts.
    if (!preempted_.empty()) break;
    if (rows >= options_.max_batch_rows) break;
    if (tokens > 0 && tokens + need_tokens > options_.max_tokens_per_step) break;
    // Positions the prefix cache holds for it are read in place, not taken from the pool.
    const std::shared_ptr<const core::SequenceAdapter> adapter = adapters::ForSequence(a.request->adapter);
    const int64_t reuse = engine_.CachedPrefixPositions(adapter, a.request->prompt);
    const int64_t start = need_tokens + VirtualTokens(*a.request) + 1 - reuse;
    // Making room evicts cached blocks, maybe ones an earlier admission of this round counts
    // on and does not hold yet: that waits for the next round, when they are held.
    if (counted_on_cache && Blocks(start) > total_blocks_ - reserved - CachedBlocks()) break;
    // Prefix blocks make way. With nothing running the pool is all free (Submit() refused
    // any request too long for it), so this never starves one.
    if (Blocks(start) > FreeBlocks(reserved, Blocks(start)) && !(rows == 0 && Blocks(start) <= total_blocks_)) {
      break;
    }
    // Its own blocks were among those that made way: counted again next round.
    if (reuse > 0 && engine_.CachedPrefixPositions(adapter, a.request->prompt) < reuse) break;
    counted_on_cache = counted_on_cache || reuse > 0;
    tokens += need_tokens;
    reserved += Blocks(start) + 1;
    a.start_positions = Blocks(start) * kKvBlock + reuse;
    a.order = admitted_++;
    admitted.push_back(std::move(*it));
    it = queue_.erase(it);
  }
  queue_depth_.store(Waiting(), std::memory_order_relaxed);
}

void Scheduler::Unpark(bool cancel_all, std::vector<std::pair<std::unique_ptr<Active>, absl::Status>>& ended) {
  absl::MutexLock lock(&mu_);
  if (parked_.empty()) return;  // The common case: nothing to do on this step.
  const auto now = Clock::now();
  for (auto it = parked_.begin(); it != parked_.end();) {
    GenerationRequest& r = *(*it)->request;
    absl::Status loaded;
    adapters::AdapterRef adapter;
    const bool settled = r.adapter_wait->Poll(&loaded, &adapter);
    absl::Status end = EndReason(**it, cancel_all, now);
    if (end.ok() && !settled) {
      ++it;
      continue;
    }
    r.adapter_load_wait_seconds = Seconds(r.arrival, now);
    if (settled && metrics_) metrics_->AdapterWaited(r.adapter_load_wait_seconds);
    if (end.ok()) end = loaded;
    if (end.ok()) end = FitPromptToAdapter(r, adapter, engine_);
    r.adapter_wait.reset();
    if (end.ok()) {
      r.adapter = std::move(adapter);
      queue_.push_back(std::move(*it));
    } else {
      ended.emplace_back(std::move(*it), end);
    }
    it = parked_.erase(it);
  }
  queue_depth_.store(Waiting(), std::memory_order_relaxed);
  if (metrics_) metrics_->SetAdapterWaiting(static_cast<int64_t>(parked_.size()));
}

absl::Status FitPromptToAdapter(GenerationRequest& r, const adapters::AdapterRef& adapter,
                                const core::Engine& engine) {
  if (adapter == nullptr) return absl::OkStatus();
  if (const core::Tokenizer* own = adapters::TokenizerOf(adapter); own != nullptr && r.text) {
    auto ids = own->Encode(*r.text, r.add_special_tokens);
    if (!ids.ok()) return ids.status();
    r.prompt = *std::move(ids);
  }
  const adapters::AdapterReport& report = adapters::ReportOf(adapter);
  const int64_t vocab = report.vocab_size > 0 ? report.vocab_size : engine.config().vocab_size;
  if (absl::Status s = core::ValidatePrompt(r.prompt, vocab, engine.context_length(), report.num_virtual_tokens);
      !s.ok()) {
    return s;
  }
  for (int64_t id : r.stop_token_ids) {
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop_token_ids: ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status Scheduler::EndReason(const Active& a, bool cancel_all, Clock::time_point now) {
  if (cancel_all) {
    return absl::UnavailableError("the server is shutting down and its grace period ended");
  }
  const GenerationRequest& r = *a.request;
  // gRPC cancels a call whose deadline passed: that is a deadline, not a client's cancel.
  const bool expired = now + kDeadlineSlack >= r.deadline;
  if (expired && (r.cancelled->load() || now >= r.deadline)) {
    return absl::DeadlineExceededError(
        a.started ? absl::StrCat("deadline exceeded after ", a.generated, " generated tokens")
                  : std::string("deadline exceeded before the request started"));
  }
  if (r.cancelled->load()) return absl::CancelledError("request cancelled");
  return absl::OkStatus();
}

void Scheduler::Start(std::unique_ptr<Active> a) {
  GenerationRequest& r = *a->request;
  a->stop.eos_token_ids = eos_;
  a->stop.ignore_eos = r.ignore_eos;
  a->stop.stop_token_ids = r.stop_token_ids;
  a->stop.stop = r.stop;
  a->stop.max_new_tokens = r.max_new_tokens;
  if (r.params.min_tokens > 0) {
    // min_tokens holds back the ids that would end the request early.
    r.params.min_tokens_suppressed = r.stop_token_ids;
    if (!r.ignore_eos) {
      r.params.min_tokens_suppressed.insert(r.params.min_tokens_suppressed.end(), eos_.begin(), eos_.end());
    }
  }
  // The sequence takes the request's adapter reference: one reference per running request. An
  // adapter that adds tokens detokenizes with its own tokenizer (alive while the sequence is).
  const core::Tokenizer* own = adapters::TokenizerOf(r.adapter);
  const core::Tokenizer* detokenizer = own != nullptr ? own : tokenizer_;
  auto seq = engine_.NewSequence(r.prompt, r.params, adapters::ForSequence(std::move(r.adapter)),
                                 a->start_positions);
  if (!seq.ok()) {
    Finish(*a, seq.status(), core::FinishReason::kCancelled);
    return;
  }
  a->sequence = *std::move(seq);
  a->max_positions = std::min<int64_t>(engine_.context_length(), a->sequence->positions() + r.max_new_tokens);
  if (Blocks(a->max_positions) > total_blocks_) {
    Finish(*a, absl::ResourceExhaustedError(absl::StrCat(
                   "the request needs ", a->max_positions, " positions of KV cache with its adapter's virtual tokens, more than the budget of ",
                   options_.max_kv_bytes, " bytes holds (", total_blocks_ * kKvBlock, ")")),
           core::FinishReason::kCancelled);
    return;
  }
  if (detokenizer != nullptr) {
    a->stream = std::make_unique<core::Tokenizer::DecodeStream>(*detokenizer, r.skip_special_tokens);
  }
  running_set_.push_back(std::move(a));
}

void Scheduler::Deliver(Active& a, const core::StepOutput& out, Clock::time_point step_end) {
  if (!out.status.ok()) {
    Finish(a, out.status, core::FinishReason::kCancelled);
    return;
  }
  ++a.generated;
  if (a.generated == 1) {
    a.first_token = step_end;
  } else if (metrics_) {
    metrics_->InterTokenLatency(Seconds(a.last_token, step_end));
  }
  a.last_token = step_end;
  std::string piece;
  if (a.stream) {
    auto p = a.stream->Step(out.token);
    if (p.ok()) piece = *std::move(p);
  }
  const size_t before = a.text.size();
  a.text += piece;
  a.sink->OnTokens({out}, piece);
  const auto reason = a.stop.Check(out.token, a.text, before, a.generated,
                                   a.sequence->positions(), engine_.context_length());
  if (reason) Finish(a, absl::OkStatus(), *reason);
}

void Scheduler::PreemptNewest() {
  std::unique_ptr<Active> a = std::move(running_set_.back());
  running_set_.pop_back();
  if (a->sequence == nullptr) return;  // Finished already: nothing to keep.
  engine_.Preempt(*a->sequence);
  preemptions_.fetch_add(1, std::memory_order_relaxed);
  if (metrics_) metrics_->Preempted();
  spdlog::debug("request {} preempted after {} generated tokens", a->request->id, a->generated);
  auto at = std::upper_bound(preempted_.begin(), preempted_.end(), a->order,
                             [](uint64_t order, const auto& p) { return order < p->order; });
  preempted_.insert(at, std::move(a));
}

void Scheduler::MakeRoom() {
  int64_t used = UsedBlocks();
  for (size_t i = 0; i < running_set_.size(); ++i) {
    Active& a = *running_set_[i];
    if (a.sequence == nullptr) continue;
    core::Sequence& q = *a.sequence;
    // A prompt's rows got room for all its tokens when they started or resumed.
    if (q.pending_tokens() > 1) continue;
    const int64_t capacity = q.kv_capacity();
    const int64_t need = q.positions();  // The cache's length after this step.
    if (need <= capacity) continue;
    // Grows by an eighth (at least a block), never past what the request can reach.
    const int64_t want = kKvBlock * std::min(Blocks(a.max_positions),
                                             Blocks(need + std::max(kKvBlock, capacity / 8)));
    const int64_t extra = q.kv_blocks_for(want) - q.kv_blocks_for(capacity);
    bool self = false;
    // Prefix blocks make way first; then the newest requests, down to this one.
    while (extra > FreeBlocks(used, extra) && !self) {
      const Active& newest = *running_set_.back();
      self = &newest == &a;
      if (newest.sequence != nullptr) used -= OwnBlocks(*newest.sequence);
      PreemptNewest();
    }
    if (self) return;  // It was the newest: the rest of the set is older and has room.
    if (absl::Status grown = engine_.ReserveKv(q, want); !grown.ok()) {
      used -= OwnBlocks(q);
      Finish(a, grown, core::FinishReason::kCancelled);
      continue;
    }
    used += extra;
  }
}

void Scheduler::ResumePreempted() {
  // Resumed like new admissions: into what the pool has free less a block of headroom per
  // running request, except that the oldest always resumes into an idle pool.
  int64_t reserved = UsedBlocks() + static_cast<int64_t>(running_set_.size());
  while (!preempted_.empty() &&
         static_cast<int64_t>(running_set_.size()) < options_.max_batch_rows) {
    Active& a = *preempted_.front();
    const int64_t want = kKvBlock * std::min(Blocks(a.max_positions), Blocks(a.sequence->positions() + 1));
    if (Blocks(want) > FreeBlocks(reserved, Blocks(want)) && !running_set_.empty()) break;
    std::unique_ptr<Active> p = std::move(preempted_.front());
    preempted_.erase(preempted_.begin());
    if (absl::Status resumed = engine_.Resume(*p->sequence, want); !resumed.ok()) {
      Finish(*p, resumed, core::FinishReason::kCancelled);
      continue;
    }
    spdlog::debug("request {} resumed: recomputing {} tokens", p->request->id, p->sequence->pending_tokens());
    reserved += Blocks(want) + 1;
    auto at = std::upper_bound(running_set_.begin(), running_set_.end(), p->order,
                               [](uint64_t order, const auto& r) { return order < r->order; });
    running_set_.insert(at, std::move(p));
  }
}

void Scheduler::RunStep() {
  // Chunked prefill: every decode row takes its one token, then the prompts still to prefill
  // share what is left of --max_tokens_per_step in arrival order, each running as much of its
  // prompt as fits (a long prompt over several steps, its chunks alongside the decodes). A
  // prompt that finds nothing left waits for the next step; the first one always runs. With
  // --max_step_slowdown the governor shrinks that budget while streams are decoding.
  std::vector<core::Sequence*> batch;
  std::vector<int64_t> limits;
  std::vector<Active*> rows;
  int64_t step_tokens = 0;
  MakeRoom();
  DropFinished();
  if (running_set_.empty()) return;
  const auto step_start = Clock::now();
  auto add = [&](Active& a, int64_t take) {
    batch.push_back(a.sequence.get());
    limits.push_back(take);
    rows.push_back(&a);
    step_tokens += take;
    if (!a.started) {
      a.started = true;
      a.first_step = step_start;
    }
  };
  for (auto& a : running_set_) {
    if (a->sequence->pending_tokens() <= 1) add(*a, 1);
  }
  const int64_t decode_rows = step_tokens;
  const int64_t budget = governor_.Budget(decode_rows);
  for (auto& a : running_set_) {
    const int64_t pending = a->sequence->pending_tokens();
    if (pending <= 1) continue;
    const int64_t left = budget - step_tokens;
    if (left <= 0 && !batch.empty()) break;
    add(*a, std::min(pending, std::max<int64_t>(left, 1)));
  }
  auto outputs = engine_.Step(batch, limits);
  governor_.Observe(Seconds(step_start, Clock::now()), decode_rows, step_tokens - decode_rows);
  if (metrics_) metrics_->Step(static_cast<int64_t>(batch.size()), step_tokens);
  auto deliver = [this](Active& a, const core::StepOutput& out, Clock::time_point at) {
    if (!out.prefill_only) Deliver(a, out, at);
  };
  if (outputs.ok()) {
    const auto step_end = Clock::now();
    for (size_t i = 0; i < rows.size(); ++i) deliver(*rows[i], (*outputs)[i], step_end);
    return;
  }
  // A failed step committed nothing. One row may be the cause: run each alone, so that only
  // the rows that fail by themselves end (with their own error) and the others go on.
  spdlog::warn("model step over {} rows failed; retrying each row alone: {}", batch.size(),
               std::string(outputs.status().message()));
  for (size_t i = 0; i < rows.size(); ++i) {
    auto alone = batch.size() == 1 ? outputs : engine_.Step({batch[i]}, {limits[i]});
    if (!alone.ok()) {
      Finish(*rows[i], alone.status(), core::FinishReason::kCancelled);
      continue;
    }
    deliver(*rows[i], (*alone)[0], Clock::now());
  }
}

void Scheduler::DropFinished() {
  running_set_.erase(std::remove_if(running_set_.begin(), running_set_.end(),
                                    [](const auto& a) { return a->sequence == nullptr; }),
                     running_set_.end());
}

void Scheduler::PublishGauges() {
  // The running sequences' own blocks and the prefix-cache blocks they read.
  const core::PrefixCacheStats prefix = engine_.prefix_cache_stats();
  int64_t kv = prefix.pinned_bytes;
  for (const auto& a : running_set_) kv += a->sequence->kv_bytes();
  // Preempted requests are still running for their clients (they resume before anything new).
  running_.store(static_cast<int64_t>(running_set_.size() + preempted_.size()), std::memory_order_relaxed);
  kv_bytes_.store(kv, std::memory_order_relaxed);
  if (metrics_) {
    metrics_->SetQueue(queue_depth(), running(),
                       static_cast<double>(kv) / static_cast<double>(options_.max_kv_bytes));
    metrics_->SetKvBlocks(UsedBlocks(), CachedBlocks(), total_blocks_);
    metrics_->SetPrefixCache(prefix.queried_tokens, prefix.hit_tokens, prefix.bytes, prefix.blocks);
  }
}

void Scheduler::Loop() {
  while (true) {
    bool cancel_all;
    {
      absl::MutexLock lock(&mu_);
      auto has_work = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
        return shutdown_ || wake_ || !queue_.empty() || !running_set_.empty() || !preempted_.empty();
      };
      if (running_set_.empty() && preempted_.empty() && queue_.empty() && parked_.empty()) {
        idle_ = true;
        running_adapters_.clear();
      }
      if (parked_.empty()) {
        mu_.Await(absl::Condition(&has_work));
      } else {  // Parked requests are looked at now and then for cancellation and deadlines.
        mu_.AwaitWithTimeout(absl::Condition(&has_work), absl::FromChrono(kParkedPoll));
      }
      wake_ = false;
      if (shutdown_ && queue_.empty() && running_set_.empty() && preempted_.empty() && parked_.empty()) {
        return;
      }
      idle_ = false;
      cancel_all = cancel_all_;
    }
    std::vector<std::pair<std::unique_ptr<Active>, absl::Status>> ended;
    Unpark(cancel_all, ended);
    for (auto& [a, status] : ended) Finish(*a, status, core::FinishReason::kCancelled);
    const auto now = Clock::now();
    for (auto& a : preempted_) {
      if (absl::Status end = EndReason(*a, cancel_all, now); !end.ok()) {
        Finish(*a, end, core::FinishReason::kCancelled);
      }
    }
    preempted_.erase(std::remove_if(preempted_.begin(), preempted_.end(),
                                    [](const auto& a) { return a->sequence == nullptr; }),
                     preempted_.end());
    ResumePreempted();
    std::vector<std::unique_ptr<Active>> admitted;
    Admit(admitted);
    for (auto& a : admitted) {
      if (absl::Status end = EndReason(*a, cancel_all, now); !end.ok()) {
        Finish(*a, end, core::FinishReason::kCancelled);
        continue;
      }
      Start(std::move(a));
    }
    // Cancellations and deadlines free their slot before the step.
    for (auto& a : running_set_) {
      if (absl::Status end = EndReason(*a, cancel_all, now); !end.ok()) {
        Finish(*a, end, core::FinishReason::kCancelled);
      }
    }
    DropFinished();
    {
      absl::MutexLock lock(&mu_);
      std::set<std::string> names;
      for (const auto& a : running_set_) {
        if (!a->request->adapter_name.empty()) names.insert(a->request->adapter_name);
      }
      running_adapters_.assign(names.begin(), names.end());
    }
    if (!running_set_.empty()) RunStep();
    DropFinished();
    TrimPrefixCache();
    PublishGauges();
  }
}

}  // namespace adapterd::server
