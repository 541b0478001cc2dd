// The scheduler on a real model (the llama_tok fixture) with recording sinks: how requests
// end (shutdown, deadline, cancellation), the KV budget at admission, and a failing row that
// must not take the rest of its batch with it.
#include "server/scheduler.h"

#include <atomic>
#include <map>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "adapters/adapter.h"
#include "core/engine.h"
#include "server/metrics.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace adapterd::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// Everything one request received. Sinks run on the scheduler thread only.
struct Outcome {
  std::vector<int32_t> tokens;
  absl::Status status;
  core::FinishReason reason = core::FinishReason::kLength;
  bool done = false;
};

// Records outcomes, and the most requests it ever saw between first token and end at once.
struct Recorder {
  std::map<uint64_t, Outcome> outcomes;
  std::set<uint64_t> streaming;
  size_t most_streaming = 0;
  std::vector<uint64_t> events;  // The request of every OnTokens call, in order.
  absl::Mutex mu;
  int done = 0;
  // While set, OnTokens waits, and the scheduler thread with it: requests submitted meanwhile
  // are all queued when it resumes, however slowly a loaded machine runs the submitting thread.
  bool hold = false;
};

class RecordingSink final : public RequestSink {
 public:
  RecordingSink(Recorder* r, uint64_t id) : r_(r), id_(id) {}
  void OnTokens(const std::vector<core::StepOutput>& tokens, const std::string&) override {
    absl::MutexLock lock(&r_->mu);
    r_->mu.Await(absl::Condition(
        +[](bool* hold) { return !*hold; }, &r_->hold));
    for (const auto& t : tokens) r_->outcomes[id_].tokens.push_back(t.token);
    r_->streaming.insert(id_);
    r_->events.push_back(id_);
    r_->most_streaming = std::max(r_->most_streaming, r_->streaming.size());
  }
  void OnDone(const absl::Status& status, core::FinishReason reason, const GenerationStats&,
              const std::string&) override {
    absl::MutexLock lock(&r_->mu);
    Outcome& o = r_->outcomes[id_];
    o.status = status;
    o.reason = reason;
    o.done = true;
    r_->streaming.erase(id_);
    ++r_->done;
  }

 private:
  Recorder* r_;
  uint64_t id_;
};

class SchedulerTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    core::EngineOptions options;
    options.model_dir = testing::Fixture("llama_tok");
    core::LoadReport report;
    auto engine = core::Engine::Load(options, &report);
    ASSERT_TRUE(engine.ok()) << engine.status();
    engine_ = engine->release();
  }
  static void TearDownTestSuite() { delete engine_; }

  std::unique_ptr<GenerationRequest> Request(uint64_t id, int64_t max_new_tokens,
                                             std::vector<int32_t> prompt = {1, 450, 4996}) {
    auto r = std::make_unique<GenerationRequest>();
    r->id = id;
    r->prompt = std::move(prompt);
    r->max_new_tokens = max_new_tokens;
    r->ignore_eos = true;
    return r;
  }
  void Submit(Scheduler& s, std::unique_ptr<GenerationRequest> r) {
    const uint64_t id = r->id;
    ASSERT_TRUE(s.Submit(std::move(r), std::make_shared<RecordingSink>(&recorder_, id)).ok());
  }
  void Hold(bool hold) {
    absl::MutexLock lock(&recorder_.mu);
    recorder_.hold = hold;
  }
  void AwaitDone(int n) {
    absl::MutexLock lock(&recorder_.mu);
    auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(recorder_.mu) { return recorder_.done >= n; };
    ASSERT_TRUE(recorder_.mu.AwaitWithTimeout(absl::Condition(&done), absl::Seconds(60)));
  }
  // Waits until requests 1 and 2 both streamed a token; `events` gets the OnTokens count then.
  void AwaitTokensFromOneAndTwo(size_t* events = nullptr) {
    absl::MutexLock lock(&recorder_.mu);
    auto both = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(recorder_.mu) {
      return !recorder_.outcomes[1].tokens.empty() && !recorder_.outcomes[2].tokens.empty();
    };
    ASSERT_TRUE(recorder_.mu.AwaitWithTimeout(absl::Condition(&both), absl::Seconds(60)));
    if (events != nullptr) *events = recorder_.events.size();
  }
  Outcome Get(uint64_t id) {
    absl::MutexLock lock(&recorder_.mu);
    return recorder_.outcomes[id];
  }

  // The same fixture with a 64 MiB prefix cache; null when it does not load.
  static std::unique_ptr<core::Engine> LoadWithPrefixCache() {
    core::EngineOptions eo;
    eo.model_dir = testing::Fixture("llama_tok");
    eo.prefix_cache_bytes = 64 << 20;
    core::LoadReport report;
    auto loaded = core::Engine::Load(eo, &report);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? *std::move(loaded) : nullptr;
  }

  static core::Engine* engine_;
  Recorder recorder_;
};
core::Engine* SchedulerTest::engine_ = nullptr;

TEST_F(SchedulerTest, TheEndOfTheGracePeriodIsUnavailableAndDeadlinesAreDeadlines) {
  SchedulerOptions options;
  options.max_batch_rows = 1;  // The others wait in the queue.
  Scheduler s(*engine_, nullptr, nullptr, options);
  auto expired = Request(1, 4);
  expired->deadline = Clock::now() - std::chrono::seconds(1);
  Submit(s, std::move(expired));
  auto cancelled = Request(2, 4);
  cancelled->cancelled->store(true);
  Submit(s, std::move(cancelled));
  AwaitDone(2);
  EXPECT_EQ(Get(1).status.code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(Get(2).status.code(), absl::StatusCode::kCancelled);
  // A deadline that passes while running, even when gRPC also cancelled the call.
  auto running = Request(3, 200);
  running->deadline = Clock::now() + std::chrono::milliseconds(30);
  auto flag = running->cancelled;
  Submit(s, std::move(running));
  std::this_thread::sleep_for(std::chrono::milliseconds(35));
  flag->store(true);
  AwaitDone(3);
  EXPECT_EQ(Get(3).status.code(), absl::StatusCode::kDeadlineExceeded) << Get(3).status;
  for (uint64_t id = 10; id < 14; ++id) Submit(s, Request(id, 200));
  s.StopAdmission();
  EXPECT_EQ(s.Submit(Request(99, 1), std::make_shared<RecordingSink>(&recorder_, 99)).code(),
            absl::StatusCode::kUnavailable);
  s.CancelAll();
  AwaitDone(7);
  for (uint64_t id = 10; id < 14; ++id) {
    EXPECT_EQ(Get(id).status.code(), absl::StatusCode::kUnavailable) << id;
    EXPECT_THAT(std::string(Get(id).status.message()), HasSubstr("grace period"));
  }
}

// An on-demand load may settle, and its wake-up pass, before the request naming it is parked
// (a folder that does not exist fails at once): the idle scheduler must still look at it.
TEST_F(SchedulerTest, ARequestParkedOnASettledLoadEndsWithoutAnotherWakeUp) {
  Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
  ASSERT_TRUE(s.WaitIdle(Clock::now() + std::chrono::seconds(30)));
  auto failed = std::make_shared<AdapterWait>("gone");
  failed->Settle(absl::NotFoundError("no such folder"), nullptr);
  auto r = Request(1, 4);
  r->adapter_wait = failed;
  Submit(s, std::move(r));
  AwaitDone(1);
  EXPECT_EQ(Get(1).status.code(), absl::StatusCode::kNotFound) << Get(1).status;

  // A wait for several (a weighted mix): it settles once its last part has, with what its
  // combine makes of them...
  auto pending = std::make_shared<AdapterWait>("later");
  std::atomic<int> combined{0};
  std::thread::id combined_on;
  auto combine = [&combined, &combined_on](const std::vector<adapters::AdapterRef>& parts)
      -> absl::StatusOr<adapters::AdapterRef> {
    combined.fetch_add(1);
    combined_on = std::this_thread::get_id();
    return absl::InvalidArgumentError(absl::StrCat("combined ", parts.size()));
  };
  auto mix = AdapterWait::AllOf("mix", {AdapterWait::Settled("a", nullptr), pending}, combine);
  auto r2 = Request(2, 4);
  r2->adapter_wait = mix;
  Submit(s, std::move(r2));
  std::this_thread::sleep_for(std::chrono::milliseconds(60));  // Polled a few times meanwhile.
  EXPECT_FALSE(Get(2).done);
  EXPECT_EQ(combined.load(), 0);
  pending->Settle(absl::OkStatus(), nullptr);
  // Combined by the thread that settled the last part (the loader's), not under the
  // scheduler's lock.
  EXPECT_EQ(combined.load(), 1);
  EXPECT_EQ(combined_on, std::this_thread::get_id());
  s.Wake();
  AwaitDone(2);
  EXPECT_EQ(Get(2).status, absl::InvalidArgumentError("combined 2"));
  EXPECT_EQ(combined.load(), 1);
  // ...or with its first failed part's error, never combining.
  auto broken = std::make_shared<AdapterWait>("broken");
  broken->Settle(absl::FailedPreconditionError("lora_B missing"), nullptr);
  auto r3 = Request(3, 4);
  r3->adapter_wait = AdapterWait::AllOf("mix2", {AdapterWait::Settled("a", nullptr), broken}, combine);
  Submit(s, std::move(r3));
  AwaitDone(3);
  EXPECT_EQ(Get(3).status, absl::FailedPreconditionError("lora_B missing"));
  EXPECT_EQ(combined.load(), 1);
}

// --max_kv_bytes is a pool of blocks of kKvBlock positions; a request starts with the blocks
// of its prompt (+1 position) and admission leaves a block of headroom per running request.
int64_t BlockBytes(const core::Engine& engine) { return Scheduler::kKvBlock * engine.kv_bytes_per_position(); }

TEST_F(SchedulerTest, TheKvBudgetHoldsFromAnIdleBatchOn) {
  SchedulerOptions options;
  // Two blocks: one request (3 + 20 positions) and its headroom, not two.
  options.max_kv_bytes = 2 * BlockBytes(*engine_) + BlockBytes(*engine_) / 2;
  Scheduler s(*engine_, nullptr, nullptr, options);
  for (uint64_t id = 1; id <= 4; ++id) Submit(s, Request(id, 20));
  AwaitDone(4);
  for (uint64_t id = 1; id <= 4; ++id) EXPECT_TRUE(Get(id).status.ok()) << id;
  EXPECT_EQ(recorder_.most_streaming, 1u);
  EXPECT_EQ(s.preemptions(), 0);
  // Once the scheduler is idle, the gauge it publishes after each step says nothing runs.
  ASSERT_TRUE(s.WaitIdle(Clock::now() + std::chrono::seconds(30)));
  EXPECT_EQ(s.kv_bytes(), 0);
  EXPECT_EQ(s.running(), 0);
  // A request that cannot fit even alone (3 + 30 positions: three blocks) is refused at once.
  auto refused = s.Submit(Request(9, 30), std::make_shared<RecordingSink>(&recorder_, 9));
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.message()), HasSubstr("(33 positions), more than the budget of"));
}

// Requests are admitted by the blocks they hold, not by their longest possible length: eight
// blocks run four requests of 3 + 20 positions at once (one block each to start, one of
// headroom each, two each at the end), where reserving each one's whole length up front (as
// before the pool) ran one.
TEST_F(SchedulerTest, AdmissionCountsTheBlocksARequestHoldsNotItsLongestLength) {
  SchedulerOptions options;
  options.max_kv_bytes = 8 * BlockBytes(*engine_);
  Scheduler s(*engine_, nullptr, nullptr, options);
  Hold(true);
  for (uint64_t id = 1; id <= 4; ++id) Submit(s, Request(id, 20, {1, 450, static_cast<int32_t>(4990 + id)}));
  Hold(false);
  AwaitDone(4);
  for (uint64_t id = 1; id <= 4; ++id) {
    EXPECT_TRUE(Get(id).status.ok()) << id;
    EXPECT_EQ(Get(id).tokens.size(), 20u) << id;
  }
  EXPECT_EQ(recorder_.most_streaming, 4u);
  EXPECT_EQ(s.preemptions(), 0);
}

// --kv_cache_dtype bfloat16 halves the bytes per position, so the same --max_kv_bytes holds
// twice the blocks and runs twice the requests: four float32 blocks run two, eight bfloat16
// blocks four.
TEST_F(SchedulerTest, AHalfPrecisionKvCacheAdmitsTwiceTheRequests) {
  core::EngineOptions eo;
  eo.model_dir = testing::Fixture("llama_tok");
  eo.kv_cache_dtype = "bfloat16";
  core::LoadReport report;
  auto half = core::Engine::Load(eo, &report);
  ASSERT_TRUE(half.ok()) << half.status();
  ASSERT_EQ(2 * (*half)->kv_bytes_per_position(), engine_->kv_bytes_per_position());
  SchedulerOptions options;
  options.max_kv_bytes = 4 * BlockBytes(*engine_) + BlockBytes(*engine_) / 4;
  for (const core::Engine* engine : {engine_, half->get()}) {
    recorder_.outcomes.clear();
    recorder_.done = 0;
    recorder_.most_streaming = 0;
    Scheduler s(*engine, nullptr, nullptr, options);
    Hold(true);
    for (uint64_t id = 1; id <= 8; ++id) Submit(s, Request(id, 20));
    Hold(false);
    AwaitDone(8);
    for (uint64_t id = 1; id <= 8; ++id) {
      EXPECT_TRUE(Get(id).status.ok()) << id;
      EXPECT_EQ(Get(id).tokens.size(), 20u) << id;
    }
    EXPECT_EQ(recorder_.most_streaming, engine == engine_ ? 2u : 4u);
  }
}

// A pool too small for every admitted request to grow: the newest running ones are preempted
// (caches freed) and recomputed when room returns, and every answer, greedy and seeded with
// penalties, equals the one computed alone; the pool's bytes are never exceeded and the
// preemptions are counted in the metrics.
TEST_F(SchedulerTest, ATinyPoolPreemptsTheNewestAndKeepsEveryAnswer) {
  auto request = [&](uint64_t id) {
    auto r = Request(id, 40, {1, static_cast<int32_t>(300 + 7 * id), static_cast<int32_t>(900 + id)});
    if (id % 2 == 0) {
      r->params.temperature = 0.9f;
      r->params.top_p = 0.95f;
      r->params.seed = 100 + id;
      r->params.presence_penalty = 0.5f;
    }
    return r;
  };
  constexpr uint64_t kRequests = 6;
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    for (uint64_t id = 1; id <= kRequests; ++id) {
      Submit(s, request(id));
      AwaitDone(static_cast<int>(id));
      alone[id] = Get(id).tokens;
      ASSERT_EQ(alone[id].size(), 40u);
    }
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  Metrics metrics;
  SchedulerOptions options;
  // Six blocks: three requests start (one block each, one of headroom each); each needs three
  // at its end (43 positions), so they cannot all grow.
  options.max_kv_bytes = 6 * BlockBytes(*engine_);
  Scheduler s(*engine_, nullptr, &metrics, options);
  for (uint64_t id = 1; id <= kRequests; ++id) Submit(s, request(id));
  int64_t most_kv = 0;
  while (true) {
    most_kv = std::max(most_kv, s.kv_bytes());
    {
      absl::MutexLock lock(&recorder_.mu);
      if (recorder_.done == static_cast<int>(kRequests)) break;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  for (uint64_t id = 1; id <= kRequests; ++id) {
    EXPECT_TRUE(Get(id).status.ok()) << id << ": " << Get(id).status;
    EXPECT_EQ(Get(id).tokens, alone[id]) << id;
  }
  EXPECT_GT(s.preemptions(), 0);
  EXPECT_LE(most_kv, options.max_kv_bytes);
  ASSERT_TRUE(s.WaitIdle(Clock::now() + std::chrono::seconds(30)));
  const std::string scrape = metrics.Scrape();
  EXPECT_THAT(scrape, HasSubstr(absl::StrCat("adapterd_preemptions_total ", s.preemptions())));
  EXPECT_THAT(scrape, HasSubstr("adapterd_kv_blocks{state=\"total\"} 6"));
  EXPECT_THAT(scrape, HasSubstr("adapterd_kv_blocks{state=\"used\"} 0"));
}

// The prefix cache lives in the pool: its blocks count against --max_kv_bytes and the least
// recently used make way when a request needs their room (before anyone waits or is
// preempted), so the cache never holds what running requests need; answers stay the same.
TEST_F(SchedulerTest, PrefixBlocksMakeWayInTheKvPool) {
  std::unique_ptr<core::Engine> loaded = LoadWithPrefixCache();
  ASSERT_NE(loaded, nullptr);
  const core::Engine& warm = *loaded;
  const int64_t block = BlockBytes(warm);
  auto prompt = [](int n, int salt) {
    std::vector<int32_t> p = {1};
    for (int i = 1; i < n; ++i) p.push_back(static_cast<int32_t>(200 + (salt * 31 + 7 * i) % 900));
    return p;
  };
  const std::vector<int32_t> a = prompt(40, 1), b = prompt(70, 2);
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    Submit(s, Request(1, 8, a));
    Submit(s, Request(2, 10, b));
    AwaitDone(2);
    alone[1] = Get(1).tokens;
    alone[2] = Get(2).tokens;
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  Metrics metrics;
  SchedulerOptions options;
  options.max_kv_bytes = 6 * block;
  Scheduler s(warm, nullptr, &metrics, options);
  auto idle = [&] { ASSERT_TRUE(s.WaitIdle(Clock::now() + std::chrono::seconds(30))); };
  // A (3 blocks at most) leaves its prompt's 2 full blocks cached: 5 of 6 in all.
  Submit(s, Request(1, 8, a));
  AwaitDone(1);
  ASSERT_NO_FATAL_FAILURE(idle());
  EXPECT_EQ(warm.prefix_cache_stats().blocks, 2);
  EXPECT_THAT(metrics.Scrape(), HasSubstr("adapterd_kv_blocks{state=\"cached\"} 2"));
  // B needs 5 blocks from its start: one of A's goes at once. B's 4 full prompt blocks go to
  // the prefix cache as they are (its own blocks, counted once, not copies that would need
  // room of their own), so all of them stay: 5 cached of 6.
  Submit(s, Request(2, 10, b));
  AwaitDone(2);
  ASSERT_NO_FATAL_FAILURE(idle());
  EXPECT_EQ(warm.prefix_cache_stats().bytes, 5 * block);
  EXPECT_EQ(warm.prefix_cache_stats().blocks, 5);
  // B again reuses all 4, nothing is preempted, and every answer is the one computed alone.
  const int64_t hits = warm.prefix_cache_stats().hit_tokens;
  Submit(s, Request(3, 10, b));
  AwaitDone(3);
  EXPECT_EQ(warm.prefix_cache_stats().hit_tokens - hits, 64);
  EXPECT_EQ(Get(1).tokens, alone[1]);
  EXPECT_EQ(Get(2).tokens, alone[2]);
  EXPECT_EQ(Get(3).tokens, alone[2]);
  EXPECT_EQ(s.preemptions(), 0);
}

// Requests whose prompts start with cached blocks read them in place, so admission counts
// only what they add: after one request of a 64-token system prompt, four more with their own
// tails run at once in a pool of 12 blocks (4 cached + 1 own each, growing to 2), where
// counting their whole prompts would fit 1 or 2; nothing is preempted and every answer is
// the one computed alone without the cache.
TEST_F(SchedulerTest, CachedPrefixBlocksAreNotTakenFromThePoolTwice) {
  std::unique_ptr<core::Engine> loaded = LoadWithPrefixCache();
  ASSERT_NE(loaded, nullptr);
  const core::Engine& warm = *loaded;
  std::vector<int32_t> system = {1};
  for (int i = 1; i < 64; ++i) system.push_back(static_cast<int32_t>(300 + (13 * i) % 700));
  auto prompt = [&](int32_t salt) {
    std::vector<int32_t> p = system;
    p.insert(p.end(), {static_cast<int32_t>(2000 + salt), 29889, static_cast<int32_t>(3000 + salt)});
    return p;
  };
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    for (uint64_t id = 1; id <= 5; ++id) {
      Submit(s, Request(id, 20, prompt(static_cast<int32_t>(id))));
      AwaitDone(static_cast<int>(id));
      alone[id] = Get(id).tokens;
    }
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  recorder_.most_streaming = 0;
  SchedulerOptions options;
  options.max_kv_bytes = 12 * BlockBytes(warm);
  Scheduler s(warm, nullptr, nullptr, options);
  Submit(s, Request(1, 20, prompt(1)));
  AwaitDone(1);
  ASSERT_TRUE(s.WaitIdle(Clock::now() + std::chrono::seconds(30)));
  ASSERT_EQ(warm.prefix_cache_stats().blocks, 4);
  ASSERT_EQ(warm.CachedPrefixPositions(nullptr, prompt(2)), 64);
  recorder_.most_streaming = 0;
  Hold(true);
  for (uint64_t id = 2; id <= 5; ++id) Submit(s, Request(id, 20, prompt(static_cast<int32_t>(id))));
  Hold(false);
  AwaitDone(5);
  for (uint64_t id = 1; id <= 5; ++id) {
    EXPECT_TRUE(Get(id).status.ok()) << id << ": " << Get(id).status;
    EXPECT_EQ(Get(id).tokens, alone[id]) << id;
  }
  EXPECT_EQ(recorder_.most_streaming, 4u);
  EXPECT_EQ(s.preemptions(), 0);
  EXPECT_EQ(warm.prefix_cache_stats().hit_tokens, 4 * 64);
}

// A prompt's full blocks that the prefill hands to the prefix cache are the request's own
// blocks, not copies, and count once in the pool: a 150-token prompt growing to 180 positions
// runs in a 12-block pool with the prefix cache on and no preemption, answering as alone.
// (Counted twice, as the request's and the cache's, its 9 prompt blocks made it 21 blocks and
// it preempted itself.)
TEST_F(SchedulerTest, PromptBlocksHandedToThePrefixCacheCountOnce) {
  std::unique_ptr<core::Engine> loaded = LoadWithPrefixCache();
  ASSERT_NE(loaded, nullptr);
  const core::Engine& warm = *loaded;
  std::vector<int32_t> prompt = {1};
  for (int i = 1; i < 150; ++i) prompt.push_back(static_cast<int32_t>(300 + (17 * i) % 700));
  std::vector<int32_t> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    Submit(s, Request(1, 30, prompt));
    AwaitDone(1);
    alone = Get(1).tokens;
  }
  ASSERT_EQ(alone.size(), 30u);
  recorder_.outcomes.clear();
  recorder_.done = 0;
  SchedulerOptions options;
  options.max_kv_bytes = 12 * BlockBytes(warm);
  Scheduler s(warm, nullptr, nullptr, options);
  Submit(s, Request(1, 30, prompt));
  AwaitDone(1);
  EXPECT_TRUE(Get(1).status.ok()) << Get(1).status;
  EXPECT_EQ(Get(1).tokens, alone);
  EXPECT_EQ(s.preemptions(), 0);
  EXPECT_EQ(warm.prefix_cache_stats().blocks, 9);
}

// A request cancelled while preempted ends CANCELLED with the tokens it had; the one that
// preempted it is unaffected.
TEST_F(SchedulerTest, ARequestCancelledWhilePreemptedEndsCancelled) {
  std::vector<int32_t> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    Submit(s, Request(1, 200));
    AwaitDone(1);
    alone = Get(1).tokens;
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  SchedulerOptions options;
  // Thirteen blocks: request 1 alone grows to all of them (203 positions); request 2 starts
  // beside it and is preempted when both pass 80 positions, then waits for room that only
  // request 1's end gives back.
  options.max_kv_bytes = 13 * BlockBytes(*engine_);
  Scheduler s(*engine_, nullptr, nullptr, options);
  Submit(s, Request(1, 200));
  auto two = Request(2, 200, {1, 450, 4997});
  auto cancelled = two->cancelled;
  Submit(s, std::move(two));
  const auto give_up = Clock::now() + std::chrono::seconds(60);
  while (s.preemptions() == 0 && Clock::now() < give_up) std::this_thread::sleep_for(std::chrono::microseconds(100));
  ASSERT_EQ(s.preemptions(), 1);
  cancelled->store(true);
  AwaitDone(2);
  EXPECT_EQ(Get(2).status.code(), absl::StatusCode::kCancelled);
  EXPECT_LT(Get(2).tokens.size(), 200u);
  EXPECT_TRUE(Get(1).status.ok()) << Get(1).status;
  EXPECT_EQ(Get(1).tokens, alone);
}

// Chunked prefill: a long prompt arriving while two streams decode runs a chunk per step
// (--max_tokens_per_step 8: the two decode tokens and 6 prompt tokens), so the streams keep
// getting a token every step meanwhile instead of waiting for its whole prefill; every answer
// equals the one computed alone.
TEST_F(SchedulerTest, ALongPromptIsPrefilledInChunksBesideRunningStreams) {
  std::vector<int32_t> long_prompt = {1};
  for (int i = 0; i < 59; ++i) long_prompt.push_back(static_cast<int32_t>(300 + 17 * i));
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    Submit(s, Request(1, 30));
    Submit(s, Request(2, 30, {1, 450, 4997}));
    Submit(s, Request(3, 5, long_prompt));
    AwaitDone(3);
    for (uint64_t id = 1; id <= 3; ++id) alone[id] = Get(id).tokens;
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  recorder_.events.clear();
  SchedulerOptions options;
  options.max_tokens_per_step = 8;
  Scheduler s(*engine_, nullptr, nullptr, options);
  Submit(s, Request(1, 30));
  Submit(s, Request(2, 30, {1, 450, 4997}));
  size_t submitted_at = 0;
  ASSERT_NO_FATAL_FAILURE(AwaitTokensFromOneAndTwo(&submitted_at));
  Submit(s, Request(3, 5, long_prompt));
  AwaitDone(3);
  for (uint64_t id = 1; id <= 3; ++id) {
    EXPECT_TRUE(Get(id).status.ok()) << id;
    EXPECT_EQ(Get(id).tokens, alone[id]) << id;
  }
  // Tokens the streams got after the long prompt arrived and before its first token: its 60
  // tokens take 10 steps of 6, so each stream gets about 9 (at most 1 if it ran in one step).
  std::map<uint64_t, int> meanwhile;
  absl::MutexLock lock(&recorder_.mu);
  for (size_t i = submitted_at; i < recorder_.events.size() && recorder_.events[i] != 3; ++i) {
    ++meanwhile[recorder_.events[i]];
  }
  EXPECT_GE(meanwhile[1], 7);
  EXPECT_GE(meanwhile[2], 7);
}

// --max_step_slowdown sizes the prompt's chunks from measured step times instead of the token
// budget: whatever sizes that picks (they depend on the machine's timing), every answer equals
// the one computed alone, and the long prompt completes beside the streams.
TEST_F(SchedulerTest, AGovernedPrefillKeepsEveryAnswer) {
  std::vector<int32_t> long_prompt = {1};
  for (int i = 0; i < 199; ++i) long_prompt.push_back(static_cast<int32_t>(300 + 13 * i));
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    Submit(s, Request(1, 40));
    AwaitDone(1);
    Submit(s, Request(2, 40, {1, 450, 4997}));
    AwaitDone(2);
    Submit(s, Request(3, 5, long_prompt));
    AwaitDone(3);
    for (uint64_t id = 1; id <= 3; ++id) alone[id] = Get(id).tokens;
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  SchedulerOptions options;
  options.max_step_slowdown = 1.2;
  options.max_tokens_per_step = 64;
  Scheduler s(*engine_, nullptr, nullptr, options);
  Submit(s, Request(1, 40));
  Submit(s, Request(2, 40, {1, 450, 4997}));
  ASSERT_NO_FATAL_FAILURE(AwaitTokensFromOneAndTwo());
  Submit(s, Request(3, 5, long_prompt));
  AwaitDone(3);
  for (uint64_t id = 1; id <= 3; ++id) {
    EXPECT_TRUE(Get(id).status.ok()) << id;
    EXPECT_EQ(Get(id).tokens, alone[id]) << id;
  }
}

// An adapter whose LoRA A has the wrong width: the forward pass throws for any batch that
// holds one of its rows.
adapters::AdapterRef BrokenAdapter(const core::Engine& engine) {
  adapters::AdapterReport report;
  report.name = "broken";
  adapters::AdapterWeights weights;
  const int64_t hidden = engine.config().hidden_size;
  weights.lora[{0, core::Projection::kQ}] = {at::zeros({4, hidden + 3}), at::zeros({4, hidden})};
  return std::make_shared<const adapters::Adapter>(report, std::move(weights));
}

TEST_F(SchedulerTest, AStepThatFailsIsRetriedRowByRowAndOnlyTheBadRowEnds) {
  // Expected tokens of each good request, run alone first.
  std::map<uint64_t, std::vector<int32_t>> alone;
  {
    Scheduler s(*engine_, nullptr, nullptr, SchedulerOptions());
    for (uint64_t id = 1; id <= 4; ++id) {
      Submit(s, Request(id, 12, {1, 450, static_cast<int32_t>(4996 + id)}));
      AwaitDone(static_cast<int>(id));
      alone[id] = Get(id).tokens;
    }
  }
  recorder_.outcomes.clear();
  recorder_.done = 0;
  SchedulerOptions options;
  options.max_batch_rows = 8;
  Scheduler s(*engine_, nullptr, nullptr, options);
  auto bad = Request(100, 12);
  bad->adapter = BrokenAdapter(*engine_);
  bad->adapter_name = "broken";
  Submit(s, std::move(bad));
  for (uint64_t id = 1; id <= 4; ++id) {
    Submit(s, Request(id, 12, {1, 450, static_cast<int32_t>(4996 + id)}));
  }
  AwaitDone(5);
  const Outcome failed = Get(100);
  EXPECT_EQ(failed.status.code(), absl::StatusCode::kInternal);
  EXPECT_THAT(std::string(failed.status.message()), HasSubstr("request 100"));
  EXPECT_THAT(std::string(failed.status.message()), Not(HasSubstr("size")));  // No LibTorch text.
  for (uint64_t id = 1; id <= 4; ++id) {
    const Outcome o = Get(id);
    EXPECT_TRUE(o.status.ok()) << id << " " << o.status;
    EXPECT_EQ(o.tokens, alone[id]) << id;
  }
}

}  // namespace
}  // namespace adapterd::server
