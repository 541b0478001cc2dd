// Continuous batching at iteration level: the single thread that runs the model. gRPC
// handlers Submit() requests into a bounded admission queue; every step the scheduler admits
// waiting requests into the running batch (within row, token and KV budgets), drops the
// cancelled and expired ones, runs one Engine::Step over every running sequence — whatever
// their adapters — and hands each request its new tokens and stable text through its sink.
//
// KV memory: --max_kv_bytes is a pool of blocks of kKvBlock positions. A request is admitted
// when the blocks of its prompt (and adapter's virtual tokens) are free, and its cache grows a
// few blocks at a time as it decodes. When a request cannot grow, the newest running request
// is preempted (its cache freed, everything else kept) and resumed later by recomputing its
// tokens, oldest first and before any new admission; its answer is the one it would have
// given without the interruption.
//
// Thread-safety: Submit(), Cancel-by-flag, the gauges and Shutdown() from any thread. Sinks
// are called on the scheduler thread and must not block.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "adapters/adapter_ref.h"
#include "core/engine.h"
#include "core/tokenizer.h"
#include "server/adapter_wait.h"
#include "server/step_governor.h"

namespace adapterd::server {

class Metrics;

using Clock = std::chrono::steady_clock;

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double queue_seconds = 0;
  double time_to_first_token_seconds = 0;
  double total_seconds = 0;
  double adapter_load_wait_seconds = 0;
  int64_t cached_prompt_tokens = 0;  // Prompt tokens taken from the prefix cache.
};

// Receives one request's output, on the scheduler thread.
class RequestSink {
 public:
  virtual ~RequestSink() = default;
  // New tokens and the text that became stable with them (possibly empty).
  virtual void OnTokens(const std::vector<core::StepOutput>& tokens, const std::string& text) = 0;
  // The end: OK with a finish reason, or the error that ended the request. `text` is the
  // remaining text held back until now.
  virtual void OnDone(const absl::Status& status, core::FinishReason reason,
                      const GenerationStats& stats, const std::string& text) = 0;
};

struct GenerationRequest {
  uint64_t id = 0;
  std::vector<int32_t> prompt;
  // A text prompt as sent, kept so that an adapter bringing its own tokenizer (added tokens)
  // tokenizes it again once resolved (see FitPromptToAdapter).
  std::optional<std::string> text;
  bool add_special_tokens = true;
  core::SamplingParams params;
  adapters::AdapterRef adapter;  // Null: the base model. Held until the request ends.
  std::string adapter_name;
  // A weighted mix's parts (names and weights) as the request gave them; `adapter` is then the
  // mix, `adapter_name` its name (adapters::MixName).
  std::vector<std::pair<std::string, float>> mix;
  // Set (with `adapter` null) while the adapter loads on demand: the request is parked until
  // the load settles, then runs with the adapter or ends with the load's error.
  std::shared_ptr<AdapterWait> adapter_wait;
  double adapter_load_wait_seconds = 0;  // How long it was parked for its adapter.
  int64_t max_new_tokens = 0;
  std::vector<std::string> stop;
  std::vector<int64_t> stop_token_ids;
  bool ignore_eos = false;
  bool skip_special_tokens = false;
  Clock::time_point arrival = Clock::now();
  Clock::time_point deadline = Clock::time_point::max();
  std::shared_ptr<std::atomic<bool>> cancelled = std::make_shared<std::atomic<bool>>(false);
};

// Fits `r` to the adapter it will run with: a text prompt is tokenized again with the adapter's
// own tokenizer when it has one, and the prompt (with the adapter's virtual tokens) and the
// stop_token_ids are checked against the adapter's vocabulary, or the base's.
absl::Status FitPromptToAdapter(GenerationRequest& r, const adapters::AdapterRef& adapter,
                                const core::Engine& engine);

struct SchedulerOptions {
  int64_t max_batch_rows = 32;         // Sequences in one step.
  // Tokens run in one step: each decode row's one, then prompt chunks (chunked prefill: a
  // longer prompt runs over several steps, sharing them with the decodes). Also bounds the
  // prompt tokens admitted at once (the first request always is).
  int64_t max_tokens_per_step = 512;
  // > 1: a step carrying prompt chunks beside decode rows is sized to take at most this many
  // times a decode-only step (StepGovernor); 0: off, the token budget alone.
  double max_step_slowdown = 0;
  int64_t max_queue = 256;             // Waiting requests before RESOURCE_EXHAUSTED.
  // KV cache pool over running sequences, in blocks of Scheduler::kKvBlock positions.
  int64_t max_kv_bytes = int64_t{4} << 30;
  std::vector<int64_t> eos_token_ids;  // Empty: the model's (generation_)config.json ids.
};

class Scheduler {
 public:
  // Positions per block of the KV pool: the blocks the caches grow by and the prefix cache
  // shares.
  static constexpr int64_t kKvBlock = core::Engine::kKvBlockPositions;

  // `tokenizer` may be null (token-id-only serving). `metrics` may be null.
  Scheduler(const core::Engine& engine, const core::Tokenizer* tokenizer, Metrics* metrics,
            SchedulerOptions options);
  // Cancels whatever still runs and joins the thread.
  ~Scheduler();

  // Queues a request. ResourceExhausted when the queue is full, Unavailable once admission
  // has stopped. On OK the sink will receive OnDone exactly once. A request with an
  // `adapter_wait` is parked (it counts as queued) until the wait settles; cancellation,
  // deadlines and shutdown end parked requests too.
  absl::Status Submit(std::unique_ptr<GenerationRequest> request, std::shared_ptr<RequestSink> sink)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Refuses new requests from now on (shutdown's first step).
  void StopAdmission() ABSL_LOCKS_EXCLUDED(mu_);
  // Waits until nothing is queued or running, or until `deadline`; true when idle.
  bool WaitIdle(Clock::time_point deadline) ABSL_LOCKS_EXCLUDED(mu_);
  // Ends every queued and running request with CANCELLED / Unavailable.
  void CancelAll() ABSL_LOCKS_EXCLUDED(mu_);
  // Looks at the parked requests at once (an adapter load settled). Parked requests are also
  // looked at every kParkedPoll.
  void Wake() ABSL_LOCKS_EXCLUDED(mu_);

  int64_t queue_depth() const { return queue_depth_.load(std::memory_order_relaxed); }
  int64_t running() const { return running_.load(std::memory_order_relaxed); }
  int64_t kv_bytes() const { return kv_bytes_.load(std::memory_order_relaxed); }
  int64_t kv_capacity_bytes() const { return options_.max_kv_bytes; }
  // Running requests preempted so far (their caches freed for an older request to grow).
  int64_t preemptions() const { return preemptions_.load(std::memory_order_relaxed); }
  // Names of adapters with running / waiting requests, for LoRA-affinity routing.
  std::vector<std::string> RunningAdapters() const ABSL_LOCKS_EXCLUDED(mu_);
  std::vector<std::string> WaitingAdapters() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Active;

  // How much earlier than its deadline a request that gRPC cancelled counts as expired: the
  // deadline was converted between clocks.
  static constexpr std::chrono::milliseconds kDeadlineSlack{20};
  // How often parked requests are checked for cancellation and deadlines.
  static constexpr std::chrono::milliseconds kParkedPoll{20};

  void Loop();
  void Admit(std::vector<std::unique_ptr<Active>>& admitted) ABSL_LOCKS_EXCLUDED(mu_);
  // Moves parked requests whose adapter settled into the queue; those that must end (load
  // failed, cancelled, expired, shutdown) go to `ended` with their status.
  void Unpark(bool cancel_all, std::vector<std::pair<std::unique_ptr<Active>, absl::Status>>& ended)
      ABSL_LOCKS_EXCLUDED(mu_);
  int64_t Waiting() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return static_cast<int64_t>(queue_.size() + parked_.size());
  }
  static int64_t Blocks(int64_t positions) { return (positions + kKvBlock - 1) / kKvBlock; }
  // Pool blocks a sequence's cache alone holds (not the shared segments it reads, nor the own
  // blocks it handed to the prefix cache, which count in CachedBlocks()).
  int64_t OwnBlocks(const core::Sequence& q) const;
  // Blocks of the pool held by the running requests' caches.
  int64_t UsedBlocks() const;
  // Blocks of the pool held by the prefix cache (--prefix_cache_bytes), rounded up.
  int64_t CachedBlocks() const;
  // Blocks free beside `reserved` ones and the prefix cache's, after dropping least recently
  // used prefix blocks where that makes room for `need` more.
  int64_t FreeBlocks(int64_t reserved, int64_t need);
  // After a step (whose prefills may have added prefix blocks): drops prefix blocks until the
  // running caches and the prefix cache fit the pool together.
  void TrimPrefixCache();
  // Before a step: grows the cache of every row that needs another position, preempting the
  // newest running requests where the pool has no room.
  void MakeRoom();
  // Moves running_set_'s last (newest) request to preempted_, freeing its cache.
  void PreemptNewest();
  // Gives preempted requests their caches back, oldest first, while the pool has room.
  void ResumePreempted();
  // Why `a` must end now (Unavailable at the end of the grace period, DeadlineExceeded,
  // Cancelled), or OK. Scheduler thread only, as are the functions below.
  absl::Status EndReason(const Active& a, bool cancel_all, Clock::time_point now);
  // Opens the sequence of an admitted request and adds it to the running set (or ends it).
  void Start(std::unique_ptr<Active> a);
  // Runs one step over the running set; a failed step is retried row by row.
  void RunStep();
  // Hands one row's step output to its request and ends it when a stop criterion is met.
  void Deliver(Active& a, const core::StepOutput& out, Clock::time_point step_end);
  void DropFinished();
  void PublishGauges();
  void Finish(Active& a, const absl::Status& status, core::FinishReason reason);

  const core::Engine& engine_;
  const core::Tokenizer* tokenizer_;
  Metrics* metrics_;
  const SchedulerOptions options_;
  const std::vector<int64_t> eos_;
  int64_t kv_bytes_per_position_ = 0;

  mutable absl::Mutex mu_;
  std::deque<std::unique_ptr<Active>> queue_ ABSL_GUARDED_BY(mu_);
  std::deque<std::unique_ptr<Active>> parked_ ABSL_GUARDED_BY(mu_);  // Waiting for an adapter.
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<std::string> running_adapters_ ABSL_GUARDED_BY(mu_);
  bool admitting_ ABSL_GUARDED_BY(mu_) = true;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool cancel_all_ ABSL_GUARDED_BY(mu_) = false;
  bool idle_ ABSL_GUARDED_BY(mu_) = true;

  // Touched by the scheduler thread only.
  std::vector<std::unique_ptr<Active>> running_set_;  // In admission order.
  std::vector<std::unique_ptr<Active>> preempted_;    // In admission order.
  uint64_t admitted_ = 0;
  int64_t total_blocks_ = 0;
  int64_t block_bytes_ = 0;
  StepGovernor governor_;

  std::atomic<int64_t> queue_depth_{0};
  std::atomic<int64_t> running_{0};
  std::atomic<int64_t> kv_bytes_{0};
  std::atomic<int64_t> preemptions_{0};
  std::thread thread_;
};

}  // namespace adapterd::server
