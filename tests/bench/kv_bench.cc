// Benchmark (not a test): the KV-memory figures of issue #12, printed, on the engine alone
// (no gRPC, so the figures are the model's, not the network's).
//   1. Prefix reuse: time to first token of a prompt whose leading 96% is cached by an earlier
//      request, over the same prompt cold.
//   2. Decode speed with a long context against a short one.
//   3. Chunked prefill: inter-token latency of 8 running streams while a long prompt arrives
//      and is prefilled in chunks of --max_tokens_per_step (the scheduler's policy: every
//      decode row first, the arrival takes the rest of the budget), over the latency without
//      arrivals, for several budgets and for no chunking at all; then with the scheduler's
//      StepGovernor (--max_step_slowdown) sizing the chunks within 512.
//   4. Concurrent 512-position sequences a fixed --max_kv_bytes runs, per cache dtype, measured
//      through the server's own Scheduler (its block pool and admission): the most requests of
//      500 prompt + 12 generated tokens seen running at once.
// Usage: kv_bench MODEL_DIR [THREADS] [PROMPT=1000] [SHARED=960] [ARRIVAL=4000]
// (KV_BENCH_SERIES=1 also prints every step's latency during each arrival, to stderr;
// KV_BENCH_GOVERNED_ONLY=1 skips the fixed budgets; KV_BENCH_POOL_ONLY=1 runs only 4.)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "core/engine.h"
#include "server/scheduler.h"
#include "server/step_governor.h"

namespace {

using adapterd::core::Engine;
using adapterd::core::EngineOptions;
using adapterd::core::SamplingParams;
using adapterd::core::Sequence;
using adapterd::server::StepGovernor;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size() - 1) + 0.5));
  return v[i];
}

double Median(std::vector<double> v) { return Percentile(std::move(v), 0.5); }

std::vector<int32_t> RandomIds(std::mt19937& gen, int64_t n, int64_t vocab) {
  std::uniform_int_distribution<int32_t> id(3, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& x : out) x = id(gen);
  return out;
}

std::unique_ptr<Sequence> Open(const Engine& engine, std::vector<int32_t> prompt) {
  auto seq = engine.NewSequence(std::move(prompt), SamplingParams());
  if (!seq.ok()) {
    std::fprintf(stderr, "NewSequence: %s\n", std::string(seq.status().message()).c_str());
    std::exit(1);
  }
  return std::move(*seq);
}

void Run(const Engine& engine, const std::vector<Sequence*>& batch, const std::vector<int64_t>& limits = {}) {
  auto out = engine.Step(batch, limits);
  if (!out.ok()) {
    std::fprintf(stderr, "Step: %s\n", std::string(out.status().message()).c_str());
    std::exit(1);
  }
}

// Seconds from opening a sequence for `prompt` to its first token (prefill in one step).
double TimeToFirstToken(const Engine& engine, const std::vector<int32_t>& prompt, int64_t* cached) {
  const auto t0 = Clock::now();
  auto seq = Open(engine, prompt);
  Run(engine, {seq.get()});
  const double s = Seconds(t0, Clock::now());
  if (cached != nullptr) *cached = seq->cached_tokens();
  return s;
}

void PrefixReuse(const Engine& engine, int64_t length, int64_t shared) {
  std::mt19937 gen(7);
  const int64_t vocab = engine.config().vocab_size;
  (void)TimeToFirstToken(engine, RandomIds(gen, 64, vocab), nullptr);  // Warm-up.
  std::vector<double> cold, warm;
  int64_t cached = 0;
  for (int rep = 0; rep < 3; ++rep) {
    std::vector<int32_t> first = RandomIds(gen, length, vocab);
    cold.push_back(TimeToFirstToken(engine, first, nullptr));
    std::vector<int32_t> second(first.begin(), first.begin() + shared);
    for (int32_t id : RandomIds(gen, length - shared, vocab)) second.push_back(id);
    warm.push_back(TimeToFirstToken(engine, second, &cached));
  }
  const double ratio = Median(warm) / Median(cold);
  std::printf("prefix reuse     %lld-token prompts, %lld shared with an earlier request: %lld taken from the cache\n",
              static_cast<long long>(length), static_cast<long long>(shared), static_cast<long long>(cached));
  std::printf("  cold TTFT      %.1f ms (median of 3)\n", 1e3 * Median(cold));
  std::printf("  reused TTFT    %.1f ms (median of 3)\n", 1e3 * Median(warm));
  std::printf("  ratio          %.3f (target <= 0.15)\n", ratio);
  // Eight requests that share the prefix, all open at once: each cache holds only its own
  // positions and reads the cached blocks in place.
  std::vector<int32_t> base = RandomIds(gen, length, vocab);
  (void)TimeToFirstToken(engine, base, nullptr);
  std::vector<std::unique_ptr<Sequence>> open;
  int64_t own = 0, held = 0;
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> p(base.begin(), base.begin() + shared);
    for (int32_t id : RandomIds(gen, length - shared, vocab)) p.push_back(id);
    open.push_back(Open(engine, p));
    own += open.back()->kv_bytes();
    held += open.back()->kv_capacity() * engine.kv_bytes_per_position();
  }
  const adapterd::core::PrefixCacheStats stats = engine.prefix_cache_stats();
  std::printf("  8 at once      %.1f MiB of own KV and %.1f MiB of cached blocks read in place (%.1f MiB pinned), "
              "against %.1f MiB as private copies\n",
              static_cast<double>(own) / (1 << 20), static_cast<double>(stats.bytes) / (1 << 20),
              static_cast<double>(stats.pinned_bytes) / (1 << 20), static_cast<double>(held) / (1 << 20));
}

// Milliseconds per decoded token of one sequence after a `context`-token prompt.
double DecodeMs(const Engine& engine, int64_t context, int tokens) {
  std::mt19937 gen(11);
  auto seq = Open(engine, RandomIds(gen, context, engine.config().vocab_size));
  Run(engine, {seq.get()});
  for (int i = 0; i < 2; ++i) Run(engine, {seq.get()});
  const auto t0 = Clock::now();
  for (int i = 0; i < tokens; ++i) Run(engine, {seq.get()});
  return 1e3 * Seconds(t0, Clock::now()) / tokens;
}

struct Streams {
  std::vector<std::unique_ptr<Sequence>> owned;
  std::vector<Sequence*> rows;
};

Streams StartStreams(const Engine& engine, int count, std::mt19937& gen) {
  Streams s;
  for (int i = 0; i < count; ++i) {
    s.owned.push_back(Open(engine, RandomIds(gen, 16, engine.config().vocab_size)));
    s.rows.push_back(s.owned.back().get());
  }
  Run(engine, s.rows);
  for (int i = 0; i < 2; ++i) Run(engine, s.rows);
  return s;
}

// Step latencies of `streams` decoding alone.
std::vector<double> DecodeSteps(const Engine& engine, Streams& streams, int steps) {
  std::vector<double> out;
  for (int i = 0; i < steps; ++i) {
    const auto t0 = Clock::now();
    Run(engine, streams.rows);
    out.push_back(1e3 * Seconds(t0, Clock::now()));
  }
  return out;
}

// Step latencies of `streams` while an `arrival`-token prompt is prefilled beside them within
// `budget` tokens per step (0: the whole prompt in one step), or as `governor` sizes each step
// within that budget (the scheduler's --max_step_slowdown); `ttft` gets the arrival's time to
// its first token.
std::vector<double> StepsWithArrival(const Engine& engine, Streams& streams, int64_t arrival,
                                     int64_t budget, std::mt19937& gen, double* ttft,
                                     StepGovernor* governor = nullptr) {
  std::vector<double> out;
  auto seq = Open(engine, RandomIds(gen, arrival, engine.config().vocab_size));
  std::vector<Sequence*> batch = streams.rows;
  batch.push_back(seq.get());
  const int64_t rows = static_cast<int64_t>(streams.rows.size());
  std::vector<int64_t> limits(batch.size(), 0);
  const auto start = Clock::now();
  while (seq->generated() == 0) {
    // Decode rows take one token each; the arrival gets what is left (at least one), or what
    // the governor grants (0: a decode-only step).
    limits.back() = governor != nullptr ? governor->Budget(rows) - rows
                    : budget == 0       ? 0
                                        : std::max<int64_t>(1, budget - rows);
    const int64_t pending = seq->pending_tokens();
    const auto t0 = Clock::now();
    if (governor != nullptr && limits.back() == 0) {
      Run(engine, streams.rows);
    } else {
      Run(engine, batch, limits);
    }
    const double seconds = Seconds(t0, Clock::now());
    if (governor != nullptr) governor->Observe(seconds, rows, pending - seq->pending_tokens());
    out.push_back(1e3 * seconds);
  }
  if (std::getenv("KV_BENCH_SERIES") != nullptr) {
    for (double ms : out) std::fprintf(stderr, "%.0f ", ms);
    std::fprintf(stderr, "\n");
  }
  *ttft = Seconds(start, Clock::now());
  return out;
}

void ChunkedPrefill(const Engine& engine, int64_t arrival) {
  std::mt19937 gen(13);
  const int streams_n = 8;
  Streams base = StartStreams(engine, streams_n, gen);
  const std::vector<double> alone = DecodeSteps(engine, base, 48);
  const double p50 = Percentile(alone, 0.5), p99 = Percentile(alone, 0.99);
  std::printf("chunked prefill  %d streams decoding; a %lld-token prompt arrives\n", streams_n,
              static_cast<long long>(arrival));
  std::printf("  no arrival     ITL p50 %.1f ms, p99 %.1f ms over 48 steps\n", p50, p99);
  // The streams' own contexts grow by a position a step, so over a slow arrival their steps get
  // slower whatever the arrival does: each case is also held against twin streams (same
  // prompts) decoding alone for as many steps ("same span"), the fair figure for long TTFTs.
  auto report = [&](const std::string& label, int64_t budget, StepGovernor* governor) {
    std::mt19937 twin_gen = gen;
    Streams streams = StartStreams(engine, streams_n, gen);
    double ttft = 0;
    const std::vector<double> with = StepsWithArrival(engine, streams, arrival, budget, gen, &ttft, governor);
    streams = Streams();
    Streams twin = StartStreams(engine, streams_n, twin_gen);
    const double span_p99 = Percentile(DecodeSteps(engine, twin, static_cast<int>(with.size())), 0.99);
    std::printf("  %-14s ITL p50 %.1f ms, p99 %.1f ms, max %.1f ms over %zu steps: p99 ratio %.2f, "
                "%.2f over the same span alone (p99 %.1f ms) (target <= 1.5); arrival's TTFT %.2f s\n",
                label.c_str(), Percentile(with, 0.5), Percentile(with, 0.99),
                *std::max_element(with.begin(), with.end()), with.size(), Percentile(with, 0.99) / p99,
                Percentile(with, 0.99) / span_p99, span_p99, ttft);
  };
  if (std::getenv("KV_BENCH_GOVERNED_ONLY") == nullptr) {
    for (const int64_t budget : {int64_t{16}, int64_t{32}, int64_t{64}, int64_t{128}, int64_t{512}, int64_t{2048}, int64_t{0}}) {
      report(budget == 0 ? std::string("unchunked") : "budget " + std::to_string(budget), budget, nullptr);
    }
  }
  // The scheduler's --max_step_slowdown: chunks sized from measured step times, within 512.
  for (const double slowdown : {1.25, 1.5, 2.0}) {
    StepGovernor governor(slowdown, 512);
    char label[32];
    std::snprintf(label, sizeof label, "slowdown %.2f", slowdown);
    report(label, 512, &governor);
  }
}

// Counts finished requests (the scheduler calls it on its thread).
class CountingSink final : public adapterd::server::RequestSink {
 public:
  explicit CountingSink(std::atomic<int>* done) : done_(done) {}
  void OnTokens(const std::vector<adapterd::core::StepOutput>&, const std::string&) override {}
  void OnDone(const absl::Status& status, adapterd::core::FinishReason, const adapterd::server::GenerationStats&,
              const std::string&) override {
    if (!status.ok()) std::fprintf(stderr, "request failed: %s\n", std::string(status.message()).c_str());
    done_->fetch_add(1);
  }

 private:
  std::atomic<int>* done_;
};

// The most requests of `prompt` + `generated` tokens the scheduler runs at once with a pool of
// `budget` bytes (submitting a few more than fit, so that admission is what limits them); -1
// when one fails or any is preempted. With `shared` > 0 every prompt starts with the same
// `shared` tokens, and one such request runs first, so that (with the engine's prefix cache
// on) the others find its blocks cached.
int64_t MostRunning(const Engine& engine, int64_t budget, int64_t prompt, int64_t generated, int64_t shared = 0) {
  adapterd::server::SchedulerOptions so;
  so.max_kv_bytes = budget;
  so.max_batch_rows = 256;
  so.max_tokens_per_step = 1 << 16;
  adapterd::server::Scheduler s(engine, nullptr, nullptr, so);
  const int64_t fit = budget / ((prompt - shared + generated) * engine.kv_bytes_per_position());
  const int count = static_cast<int>(std::min<int64_t>(fit + 4, 250));
  std::atomic<int> done{0};
  std::mt19937 gen(11);
  const std::vector<int32_t> head = RandomIds(gen, shared, engine.config().vocab_size);
  auto submit = [&](int i) {
    auto r = std::make_unique<adapterd::server::GenerationRequest>();
    r->id = static_cast<uint64_t>(i + 1);
    r->prompt = head;
    for (int32_t id : RandomIds(gen, prompt - shared, engine.config().vocab_size)) r->prompt.push_back(id);
    r->max_new_tokens = generated;
    r->ignore_eos = true;
    return s.Submit(std::move(r), std::make_shared<CountingSink>(&done)).ok();
  };
  int first = 0;
  if (shared > 0) {
    if (!submit(first++)) return -1;
    while (done.load() < 1) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  for (int i = 0; i < count; ++i) {
    if (!submit(first + i)) return -1;
  }
  int64_t most = 0;
  while (done.load() < first + count) {
    most = std::max(most, s.running());
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return s.preemptions() > 0 ? -1 : most;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [THREADS] [PROMPT=1000] [SHARED=960] [ARRIVAL=4000]\n", argv[0]);
    return 2;
  }
  EngineOptions options;
  options.model_dir = argv[1];
  options.threads = argc > 2 ? std::atoi(argv[2]) : static_cast<int>(std::thread::hardware_concurrency());
  options.prefix_cache_bytes = int64_t{1} << 30;
  const int64_t prompt = argc > 3 ? std::atoll(argv[3]) : 1000;
  const int64_t shared = argc > 4 ? std::atoll(argv[4]) : 960;
  int64_t arrival = argc > 5 ? std::atoll(argv[5]) : 4000;
  adapterd::core::LoadReport report;
  auto engine = Engine::Load(options, &report);
  if (!engine.ok()) {
    std::fprintf(stderr, "load failed: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  const Engine& e = **engine;
  const int64_t context = e.context_length();
  std::printf("model            %s, %lld parameters, context %lld, %d threads, CPU kernels %s\n",
              report.architecture.c_str(), static_cast<long long>(report.parameter_count),
              static_cast<long long>(context), Engine::threads(), Engine::cpu_kernels());
  if (prompt >= context || shared > prompt) {
    std::fprintf(stderr, "PROMPT must be under the context (%lld) and SHARED at most PROMPT\n",
                 static_cast<long long>(context));
    return 2;
  }
  if (arrival + 400 > context) {
    arrival = context - 400;
    std::printf("(the arrival is cut to %lld tokens to fit the context)\n", static_cast<long long>(arrival));
  }

  if (std::getenv("KV_BENCH_POOL_ONLY") == nullptr) {
    PrefixReuse(e, prompt, shared);

    const int64_t long_context = std::min<int64_t>(2000, context - 64);
    const double short_ms = DecodeMs(e, 100, 32), long_ms = DecodeMs(e, long_context, 32);
    std::printf("decode           %.2f ms/token at 100 tokens of context, %.2f at %lld: %.2fx the tokens/s\n",
                short_ms, long_ms, static_cast<long long>(long_context), short_ms / long_ms);

    ChunkedPrefill(e, arrival);
  }

  // Sequences of 512 positions running at once in a 256 MiB pool, per cache dtype.
  const int64_t budget = int64_t{256} << 20;
  std::printf("KV pool          256 MiB runs at once, of 512-position sequences:");
  std::vector<int64_t> held;
  for (const char* dtype : {"float32", "bfloat16"}) {
    EngineOptions o = options;
    o.prefix_cache_bytes = 0;
    o.kv_cache_dtype = dtype;
    adapterd::core::LoadReport r;
    auto other = Engine::Load(o, &r);
    if (!other.ok()) return 1;
    const int64_t most = MostRunning(**other, budget, 500, 12);
    if (most < 0) return 1;
    held.push_back(most);
    std::printf(" %s %lld", dtype, static_cast<long long>(most));
    std::fflush(stdout);
  }
  std::printf(" (%.2fx; target >= 2x)\n", static_cast<double>(held[1]) / static_cast<double>(held[0]));
  // The same with the first 448 prompt tokens shared and the prefix cache on: the cached
  // blocks are read in place, so each request takes only its own positions from the pool.
  std::printf("  448 of the 500 prompt tokens shared, prefix cache on:");
  for (const char* dtype : {"float32", "bfloat16"}) {
    EngineOptions o = options;
    o.prefix_cache_bytes = budget;
    o.kv_cache_dtype = dtype;
    adapterd::core::LoadReport r;
    auto other = Engine::Load(o, &r);
    if (!other.ok()) return 1;
    const int64_t most = MostRunning(**other, budget, 500, 12, 448);
    if (most < 0) return 1;
    std::printf(" %s %lld", dtype, static_cast<long long>(most));
    std::fflush(stdout);
  }
  std::printf("\n");
  return 0;
}
