// Benchmark (not a test) for adapters on a model with r=16 LoRA adapters on q, k, v, o:
// load time per adapter, decode throughput of 16 rows spread over 8 adapters relative to 16
// rows on the base, of 32 rows over 32 distinct adapters of ranks 8-64 relative to 32 base
// rows (the segmented kernel, and the per-adapter path it replaced), Acquire latency while a
// writer churns the table, and memory held per adapter relative to its tensor bytes.
// Usage: adapter_bench MODEL_DIR ADAPTER_DIR_PREFIX [THREADS]   (adapters PREFIX0..PREFIX7)
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <thread>
#include <tuple>
#include <vector>

#include "adapters/adapter.h"
#include "adapters/adapter_loader.h"
#include "adapters/adapter_mix.h"
#include "adapters/adapter_table.h"
#include "core/engine.h"

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int64_t RssBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * sysconf(_SC_PAGESIZE);
}

// Seconds of each of `steps` decode steps of `rows` sequences, sequence i on
// adapters[i % adapters.size()].
std::vector<double> StepSeconds(const adapterd::core::Engine& engine,
                                const std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>>& adapters,
                                int steps, int rows) {
  std::vector<std::unique_ptr<adapterd::core::Sequence>> seqs;
  for (int i = 0; i < rows; ++i) {
    std::vector<int32_t> prompt;
    for (int t = 0; t < 16; ++t) prompt.push_back(100 + 31 * i + 7 * t);
    seqs.push_back(*engine.NewSequence(prompt, adapterd::core::SamplingParams(),
                                       adapters[i % adapters.size()]));
  }
  std::vector<adapterd::core::Sequence*> batch;
  for (auto& s : seqs) batch.push_back(s.get());
  (void)engine.Step(batch);  // Prefill.
  (void)engine.Step(batch);
  std::vector<double> seconds;
  for (int i = 0; i < steps; ++i) {
    auto t0 = Clock::now();
    if (!engine.Step(batch).ok()) std::abort();
    seconds.push_back(Seconds(t0, Clock::now()));
  }
  return seconds;
}

// Decode tokens/s of `rows` sequences over `steps` steps (see StepSeconds).
double Throughput(const adapterd::core::Engine& engine,
                  const std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>>& adapters,
                  int steps, int rows = 16) {
  double total = 0;
  for (double s : StepSeconds(engine, adapters, steps, rows)) total += s;
  return rows * steps / total;
}

// Step times gathered over interleaved runs: the fastest tells the cost of the work itself
// (neighbours on a shared machine only ever add time), the median what a run sees.
struct StepTimes {
  std::vector<double> seconds;
  void Add(const std::vector<double>& more) { seconds.insert(seconds.end(), more.begin(), more.end()); }
  double Quantile(double q) {
    std::sort(seconds.begin(), seconds.end());
    return seconds[static_cast<size_t>(q * static_cast<double>(seconds.size() - 1))];
  }
};

// A LoRA adapter as core saw them before the segmented kernel: Delta() per adapter only.
class PerAdapterPath final : public adapterd::core::SequenceAdapter {
 public:
  explicit PerAdapterPath(adapterd::adapters::AdapterRef a) : a_(std::move(a)) {}
  bool Adapts(int64_t layer, adapterd::core::Projection p) const override { return a_->Adapts(layer, p); }
  at::Tensor Delta(int64_t layer, adapterd::core::Projection p, const at::Tensor& x) const override {
    return a_->Delta(layer, p, x);
  }

 private:
  adapterd::adapters::AdapterRef a_;
};

// `count` seeded LoRA adapters on q, k, v, o of every layer, ranks cycling 8, 16, 32, 64;
// with `bf16`, factors held in bfloat16 as the loader keeps those of bfloat16 files (and of
// every file under --adapter_dtype bfloat16).
std::vector<adapterd::adapters::AdapterRef> DistinctAdapters(const adapterd::core::ModelConfig& c, int count,
                                                             bool bf16) {
  using adapterd::core::Projection;
  at::manual_seed(5);
  std::vector<adapterd::adapters::AdapterRef> out;
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  for (int i = 0; i < count; ++i) {
    const int64_t rank = int64_t{8} << (i % 4);
    adapterd::adapters::AdapterWeights w;
    for (int64_t layer = 0; layer < c.num_layers; ++layer) {
      for (auto [p, in, o] : {std::tuple{Projection::kQ, c.hidden_size, q}, std::tuple{Projection::kK, c.hidden_size, kv},
                              std::tuple{Projection::kV, c.hidden_size, kv}, std::tuple{Projection::kO, q, c.hidden_size}}) {
        const at::ScalarType dtype = bf16 ? at::kBFloat16 : at::kFloat;
        w.lora[{layer, p}] = {(at::randn({rank, in}) * 0.02).to(dtype), (at::randn({rank, o}) * 0.02).to(dtype),
                              bf16 ? 0.5f : 1.0f};
      }
    }
    adapterd::adapters::AdapterReport r;
    r.name = "distinct" + std::to_string(i);
    out.push_back(std::make_shared<const adapterd::adapters::Adapter>(r, std::move(w)));
  }
  return out;
}

// One seeded adapter over q, k, v, o of every layer (r=16) as plain LoRA, as DoRA (the same
// factors plus a per-output scale), or as IA3 on PEFT's default modules (k, v, down_proj's
// input): the formats whose decode cost the benchmark compares.
adapterd::adapters::AdapterRef FormatAdapter(const adapterd::core::ModelConfig& c, const std::string& format) {
  using adapterd::core::Projection;
  at::manual_seed(9);
  adapterd::adapters::AdapterWeights w;
  const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    if (format == "ia3") {
      w.ia3[{layer, Projection::kK}] = {1 + 0.1 * at::randn({kv}), false};
      w.ia3[{layer, Projection::kV}] = {1 + 0.1 * at::randn({kv}), false};
      w.ia3[{layer, Projection::kDown}] = {1 + 0.1 * at::randn({c.intermediate_size}), true};
      continue;
    }
    for (auto [p, in, o] : {std::tuple{Projection::kQ, c.hidden_size, q}, std::tuple{Projection::kK, c.hidden_size, kv},
                            std::tuple{Projection::kV, c.hidden_size, kv}, std::tuple{Projection::kO, q, c.hidden_size}}) {
      adapterd::adapters::LoraModule m{at::randn({16, in}) * 0.02, at::randn({16, o}) * 0.02, 1.0f};
      if (format == "dora") m.dora_scale = 1 + 0.1 * at::randn({o});
      w.lora[{layer, p}] = std::move(m);
    }
  }
  adapterd::adapters::AdapterReport r;
  r.name = format;
  r.type = format == "ia3" ? "IA3" : "LORA";
  return std::make_shared<const adapterd::adapters::Adapter>(r, std::move(w));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR ADAPTER_DIR_PREFIX [THREADS]\n", argv[0]);
    return 2;
  }
  adapterd::core::EngineOptions options;
  options.model_dir = argv[1];
  options.threads = argc > 3 ? std::atoi(argv[3]) : static_cast<int>(std::thread::hardware_concurrency());
  adapterd::core::LoadReport report;
  auto engine = adapterd::core::Engine::Load(options, &report);
  if (!engine.ok()) return 1;
  const std::string prefix = argv[2];

  // Load time and memory.
  std::vector<adapterd::adapters::AdapterRef> loaded;
  std::vector<double> load_times;
  int64_t tensor_bytes = 0;
  const int64_t rss_before = RssBytes();
  for (int i = 0; i < 8; ++i) {
    adapterd::adapters::AdapterReport r;
    auto t0 = Clock::now();
    auto a = adapterd::adapters::LoadAdapter(prefix + std::to_string(i), "a" + std::to_string(i),
                                             (*engine)->model(), &r);
    load_times.push_back(Seconds(t0, Clock::now()));
    if (!a.ok()) {
      std::fprintf(stderr, "%s\n", std::string(a.status().message()).c_str());
      return 1;
    }
    for (const auto& [dtype, b] : r.file_bytes_by_dtype) tensor_bytes += b;
    loaded.push_back(*a);
  }
  const int64_t rss_after = RssBytes();
  std::sort(load_times.begin(), load_times.end());
  std::printf("adapter load     %.2f ms median, %.2f ms max (r=16, q/k/v/o, %lld bytes each)\n",
              1e3 * load_times[4], 1e3 * load_times[7],
              static_cast<long long>(tensor_bytes / 8));
  std::printf("memory           %.3f x tensor bytes (RSS grew %lld bytes for %lld tensor bytes)\n",
              static_cast<double>(rss_after - rss_before) / tensor_bytes,
              static_cast<long long>(rss_after - rss_before), static_cast<long long>(tensor_bytes));

  // Throughput: 16 rows over 8 adapters vs 16 rows on the base.
  const int steps = 16;
  std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>> none = {nullptr};
  std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>> eight(loaded.begin(),
                                                                            loaded.end());
  const double base_tps = Throughput(**engine, none, steps);
  const double mixed_tps = Throughput(**engine, eight, steps);
  std::printf("base 16 rows     %.1f tokens/s\n", base_tps);
  std::printf("8 adapters x 2   %.1f tokens/s\n", mixed_tps);
  std::printf("ratio            %.3f (target >= 0.85)\n", mixed_tps / base_tps);

  // Throughput: 32 rows over 32 distinct adapters (ranks 8/16/32/64) vs 32 rows on the base.
  const auto distinct = DistinctAdapters((*engine)->config(), 32, /*bf16=*/false);
  const auto distinct16 = DistinctAdapters((*engine)->config(), 32, /*bf16=*/true);
  std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>> segmented16(distinct16.begin(), distinct16.end());
  std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>> segmented(distinct.begin(), distinct.end());
  std::vector<std::shared_ptr<const adapterd::core::SequenceAdapter>> per_adapter;
  for (const auto& a : distinct) per_adapter.push_back(std::make_shared<PerAdapterPath>(a));
  // Interleaved runs of 16 steps each.
  StepTimes base32, seg32, per32, seg16;
  for (int rep = 0; rep < 8; ++rep) {
    base32.Add(StepSeconds(**engine, none, steps, 32));
    seg32.Add(StepSeconds(**engine, segmented, steps, 32));
    per32.Add(StepSeconds(**engine, per_adapter, steps, 32));
    seg16.Add(StepSeconds(**engine, segmented16, steps, 32));
  }
  for (const auto& [label, q] : {std::pair{"fastest step", 0.0}, std::pair{"median step ", 0.5}}) {
    const double base = base32.Quantile(q);
    std::printf("base 32 rows     %s %.1f ms (%.1f tokens/s)\n", label, 1e3 * base, 32 / base);
    std::printf("32 distinct      %s %.1f ms segmented (ratio %.3f, target >= 0.85); %.1f ms per adapter "
                "(ratio %.3f)\n",
                label, 1e3 * seg32.Quantile(q), base / seg32.Quantile(q), 1e3 * per32.Quantile(q),
                base / per32.Quantile(q));
    std::printf("32 distinct bf16 %s %.1f ms segmented, factors held in bfloat16: bfloat16 files, or any with "
                "--adapter_dtype bfloat16 (ratio %.3f, target >= 0.85)\n",
                label, 1e3 * seg16.Quantile(q), base / seg16.Quantile(q));
  }

  // Decode cost by format: what one adapter adds to a decode step of 16 rows (every layer's
  // q, k, v, o, gate, up and down: the base-input scaling and the delta/scale work of
  // core::AdapterBatch), timed alone because at this size it is a few percent of the step, well
  // under the jitter of whole steps on a shared machine.
  {
    const auto& c = (*engine)->config();
    const auto lora_adapter = FormatAdapter(c, "lora");
    auto mixed = adapterd::adapters::MixAdapters(**engine, {{lora_adapter, 0.5f}, {loaded[0], 0.5f}}, "mix");
    if (!mixed.ok()) return 1;
    const std::vector<std::pair<const char*, adapterd::adapters::AdapterRef>> formats = {
        {"LoRA r=16 q/k/v/o", lora_adapter},
        {"DoRA (same factors)", FormatAdapter(c, "dora")},
        {"IA3 k/v/down", FormatAdapter(c, "ia3")},
        {"weighted mix of two r=16 LoRAs", *mixed}};
    using adapterd::core::Projection;
    const int64_t q = c.num_heads * c.head_dim, kv = c.num_kv_heads * c.head_dim, rows = 16;
    const std::vector<std::tuple<Projection, int64_t, int64_t>> projections = {
        {Projection::kQ, c.hidden_size, q},           {Projection::kK, c.hidden_size, kv},
        {Projection::kV, c.hidden_size, kv},          {Projection::kO, q, c.hidden_size},
        {Projection::kGate, c.hidden_size, c.intermediate_size}, {Projection::kUp, c.hidden_size, c.intermediate_size},
        {Projection::kDown, c.intermediate_size, c.hidden_size}};
    at::manual_seed(3);
    std::vector<std::pair<at::Tensor, at::Tensor>> io;
    for (const auto& [p, in, out] : projections) io.emplace_back(at::randn({rows, in}), at::randn({rows, out}));
    std::vector<double> fastest;
    for (const auto& [label, adapter] : formats) {
      adapterd::core::AdapterBatch batch({{0, rows, adapter.get(), 0}});
      double best = 1e9;
      for (int rep = 0; rep < 200; ++rep) {
        const auto t0 = Clock::now();
        for (int64_t layer = 0; layer < c.num_layers; ++layer) {
          for (size_t i = 0; i < projections.size(); ++i) {
            at::Tensor x = batch.ScaleInputs(layer, std::get<0>(projections[i]), io[i].first);
            batch.AddDelta(layer, std::get<0>(projections[i]), x, io[i].second);
          }
        }
        best = std::min(best, Seconds(t0, Clock::now()));
      }
      fastest.push_back(best);
    }
    std::printf("formats, adapter work per 16-row decode step (fastest of 200):");
    for (size_t i = 0; i < formats.size(); ++i) {
      std::printf("%s %s %.3f ms (%.2fx LoRA's)", i ? ";" : "", formats[i].first, 1e3 * fastest[i],
                  fastest[i] / fastest[0]);
    }
    std::printf("\n");
  }

  // Acquire latency while a writer replaces adapters: at 1 kHz (far above any operator's
  // load/unload rate), then back to back. Each publish ends in a grace period whose
  // membarrier interrupts readers, which is what the back-to-back figures show.
  adapterd::adapters::AdapterTable table({64, int64_t{1} << 34});
  for (auto& a : loaded) {
    if (!table.Insert(a, false).ok()) return 1;
  }
  for (const int period_us : {1000, 0}) {
    std::atomic<bool> stop{false};
    std::atomic<int64_t> writes{0};
    std::thread writer([&] {
      int i = 0;
      while (!stop.load(std::memory_order_relaxed)) {
        (void)table.Insert(loaded[i++ % 8], true);
        writes.fetch_add(1, std::memory_order_relaxed);
        if (period_us) std::this_thread::sleep_for(std::chrono::microseconds(period_us));
      }
    });
    const int n = 2'000'000;
    std::vector<int64_t> ns(n);
    const std::string names[8] = {"a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7"};
    auto start = Clock::now();
    for (int i = 0; i < n; ++i) {
      auto t0 = Clock::now();
      auto ref = table.Acquire(names[i & 7]);
      ns[i] = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now() - t0).count();
      if (!ref) std::abort();
    }
    const double elapsed = Seconds(start, Clock::now());
    stop = true;
    writer.join();
    std::sort(ns.begin(), ns.end());
    std::printf("acquire          writer %s: p50 %lld ns, p99 %lld ns, p99.9 %lld ns "
                "(%d reads, %.0f writes/s)\n",
                period_us ? "every 1 ms  " : "back to back", static_cast<long long>(ns[n / 2]),
                static_cast<long long>(ns[n * 99 / 100]),
                static_cast<long long>(ns[n * 999 / 1000]), n, writes.load() / elapsed);
  }
  return 0;
}
