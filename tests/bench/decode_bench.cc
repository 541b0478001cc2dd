// Benchmark (not a test): single-stream decode speed and cold load time of a model, printed
// next to the machine's limit — weight bytes read per token over measured memory-copy and
// read bandwidth — with peak RSS, prompt (prefill) speed and batched decode. Usage:
//   decode_bench MODEL_DIR [NEW_TOKENS] [THREADS] [CPU_KERNELS] [DTYPE] [PROMPT_TOKENS]
//   [mmap|mmap_keep|read]
//                [none|int8|int8_weight_only|bf16_packed] [BATCH_ROWS] [KV_CACHE_DTYPE]
//                [highest|medium]
// DTYPE is --dtype (default auto: a BF16 checkpoint's matrices read in place); PROMPT_TOKENS
// (default 512) is the length of the prompt timed through one whole prefill; `read` loads the
// weights into private memory (--mmap=false) instead of mapping them, `mmap_keep` maps them
// without re-reading files the page cache holds in small pages
// (--mmap_refresh_small_pages=false); int8, int8_weight_only and bf16_packed are --quantize's;
// BATCH_ROWS (default 32, 0 for none) is the largest batch of the batched-decode figures (an 8B
// model takes minutes over all of them); the last is --matmul_precision.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include "core/engine.h"
#include "tests/bench/bandwidth.h"

namespace {

using adapterd::bench::BestRate;
using adapterd::bench::Counting;
using adapterd::bench::ReadRate;

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Returns bytes copied per second by memcpy over a buffer far larger than the caches, split
// across `threads` threads as the model's matrix-vector products are.
double CopyBandwidth(int threads) {
  const size_t bytes = size_t{1} << 30;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  const size_t chunk = bytes / threads;
  return BestRate(threads, static_cast<double>(chunk * threads), [&](int t) {
    std::memcpy(dst.data() + t * chunk, src.data() + t * chunk, chunk);
  });
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fprintf(stderr,
                 "usage: %s MODEL_DIR [NEW_TOKENS] [THREADS] [CPU_KERNELS] [DTYPE] [PROMPT_TOKENS] "
                 "[mmap|mmap_keep|read] [none|int8|int8_weight_only|bf16_packed] [BATCH_ROWS] "
                 "[KV_CACHE_DTYPE] "
                 "[highest|medium]\n",
                 argv[0]);
    return 2;
  }
  const int new_tokens = argc > 2 ? std::atoi(argv[2]) : 64;
  const int threads = argc > 3 ? std::atoi(argv[3]) : static_cast<int>(std::thread::hardware_concurrency());
  adapterd::core::EngineOptions options;
  options.model_dir = argv[1];
  options.threads = threads;
  if (argc > 4) options.cpu_kernels = argv[4];
  if (argc > 5) options.dtype = argv[5];
  const int prompt_tokens = argc > 6 ? std::atoi(argv[6]) : 512;
  if (argc > 7) options.map_weights = std::strcmp(argv[7], "read") != 0;
  if (argc > 7) options.refresh_small_pages = std::strcmp(argv[7], "mmap_keep") != 0;
  if (argc > 8) options.quantize = argv[8];
  const int max_rows = argc > 9 ? std::atoi(argv[9]) : 32;
  if (argc > 10) options.kv_cache_dtype = argv[10];
  if (argc > 11) options.matmul_precision = argv[11];
  adapterd::core::LoadReport report;
  auto t0 = std::chrono::steady_clock::now();
  auto engine = adapterd::core::Engine::Load(options, &report);
  const double load_s = Seconds(t0, std::chrono::steady_clock::now());
  if (!engine.ok()) {
    std::fprintf(stderr, "load failed: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  // The bytes a step reads: every weight as served (each storage once), quantized matrices as
  // their int8 copies, less an untied input embedding, of which a step reads one row per token
  // (a tied one is read whole as lm_head, or as lm_head's int8 copy).
  const adapterd::core::ModelConfig& config = (*engine)->config();
  const bool tied = !report.tied.empty();
  const double embedding_bytes =
      tied ? 0.0
           : static_cast<double>(config.vocab_size) * config.hidden_size *
                 (report.weights_dtype == "float32" ? 4 : 2);
  const double weight_bytes = static_cast<double>(report.bytes_mapped + report.bytes_copied -
                                                  report.quantized_source_bytes + report.quantized_bytes) -
                              embedding_bytes;
  std::printf(
      "model            %s (%lld parameters, %.1f MB read per token: weights %s%s, compute %s, kv "
      "%s)\n",
      report.architecture.c_str(), static_cast<long long>(report.parameter_count),
      weight_bytes / 1e6, report.weights_dtype.c_str(),
      report.quantization == "int8"               ? ", matrices int8 (w8a8)"
      : report.quantization == "int8_weight_only" ? ", matrices int8, weight-only"
      : report.quantization == "bf16_packed"      ? ", matrices bfloat16 packed in 12 bits"
                                                  : "",
      report.compute_dtype.c_str(), report.kv_cache_dtype.c_str());
  if (report.bf16_products)
    std::printf("products         bfloat16 (--matmul_precision %s)\n",
                report.matmul_precision.c_str());
  std::printf("load             %.3f s (%lld bytes mapped zero-copy, %lld copied)\n", load_s,
              static_cast<long long>(report.bytes_mapped), static_cast<long long>(report.bytes_copied));
  std::printf(
      "pages            %lld of the files' %lld bytes in 2 MiB pages (%lld read again for them)\n",
      static_cast<long long>(report.bytes_huge_pages),
      static_cast<long long>(report.bytes_files_held), static_cast<long long>(report.bytes_reread));

  std::vector<int32_t> prompt;
  for (int i = 0; i < 16; ++i) prompt.push_back(100 + 37 * i);
  auto seq = (*engine)->NewSequence(prompt, adapterd::core::SamplingParams());
  if (!seq.ok()) return 1;
  auto step = (*engine)->Step({seq->get()});  // Prefill.
  for (int i = 0; i < 3; ++i) step = (*engine)->Step({seq->get()});  // Warm-up decode.
  t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < new_tokens; ++i) step = (*engine)->Step({seq->get()});
  const double decode_s = Seconds(t0, std::chrono::steady_clock::now());
  if (!step.ok()) return 1;
  const double tps = new_tokens / decode_s;
  // Peak resident memory so far (mapped weight pages count): taken before the bandwidth
  // measurements allocate their buffers.
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  const double peak_rss_mb = usage.ru_maxrss / 1024.0;
  const double bw = CopyBandwidth(threads);
  const double limit = bw / weight_bytes;
  const double read_bw = ReadRate(threads, Counting(size_t{1} << 30), 5);
  const double read_limit = read_bw / weight_bytes;
  std::printf("threads          %d, CPU kernels %s, w8a8 kernel %s\n", adapterd::core::Engine::threads(),
              adapterd::core::Engine::cpu_kernels(), adapterd::core::Engine::w8a8_kernel());
  std::printf("decode           %.2f tokens/s (%.2f ms/token over %d tokens)\n", tps,
              1e3 * decode_s / new_tokens, new_tokens);
  std::printf("peak RSS         %.0f MB (after load and decode)\n", peak_rss_mb);
  std::printf("memcpy bandwidth %.2f GB/s\n", bw / 1e9);
  std::printf("limit            %.2f tokens/s (weight bytes per token / bandwidth)\n", limit);
  std::printf("ratio            %.2f of the limit\n", tps / limit);
  std::printf("read bandwidth   %.2f GB/s (summing a 1 GiB buffer, no huge pages asked for)\n", read_bw / 1e9);
  std::printf("read limit       %.2f tokens/s (weight bytes per token / read bandwidth)\n", read_limit);
  std::printf("read ratio       %.2f of the read limit\n", tps / read_limit);
  // The same ratio where the machine's bandwidth moves under us (a shared host's neighbours can
  // halve it from one second to the next): windows of 16 decode tokens, each right after a
  // read of 256 MiB, each window's tokens/s over the limit that read gives; the median.
  {
    const std::vector<uint64_t> probe = Counting(size_t{1} << 28);
    constexpr int kWindows = 9, kWindowTokens = 16;
    std::vector<double> ratios;
    for (int w = 0; w < kWindows; ++w) {
      const double probe_bw = ReadRate(threads, probe, 2);
      t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < kWindowTokens; ++i) step = (*engine)->Step({seq->get()});
      if (!step.ok()) return 1;
      const double window_tps = kWindowTokens / Seconds(t0, std::chrono::steady_clock::now());
      ratios.push_back(window_tps / (probe_bw / weight_bytes));
    }
    std::sort(ratios.begin(), ratios.end());
    std::printf("read ratio       %.2f median of %d windows of %d tokens, each against the read bandwidth "
                "just before it (%.2f-%.2f)\n",
                ratios[kWindows / 2], kWindows, kWindowTokens, ratios.front(), ratios.back());
  }

  // Prefill: one prompt of prompt_tokens in one step (after a warm-up of the same length).
  if (prompt_tokens > 0) {
    std::vector<int32_t> long_prompt;
    const int64_t vocab = (*engine)->config().vocab_size;
    for (int i = 0; i < prompt_tokens; ++i) long_prompt.push_back(static_cast<int32_t>((101 + 7919 * i) % vocab));
    double best = 0;
    for (int rep = 0; rep < 3; ++rep) {
      auto p = (*engine)->NewSequence(long_prompt, adapterd::core::SamplingParams());
      if (!p.ok()) return 1;
      t0 = std::chrono::steady_clock::now();
      if (!(*engine)->Step({p->get()}).ok()) return 1;
      const double s = Seconds(t0, std::chrono::steady_clock::now());
      if (rep > 0) best = std::max(best, prompt_tokens / s);
    }
    std::printf("prefill          %.1f tokens/s (a %d-token prompt in one step, best of 2)\n", best, prompt_tokens);
  }

  // Batched decode: B sequences step together (what the server's scheduler does with B
  // streams), without gRPC; aggregate tokens/s and the speed-up over one row.
  for (int rows : {1, 4, 8, 16, 32}) {
    if (rows > max_rows) break;
    std::vector<std::unique_ptr<adapterd::core::Sequence>> seqs;
    std::vector<adapterd::core::Sequence*> batch;
    for (int r = 0; r < rows; ++r) {
      std::vector<int32_t> p;
      for (int i = 0; i < 16; ++i) p.push_back(100 + 13 * r + 7 * i);
      seqs.push_back(std::move(*(*engine)->NewSequence(p, adapterd::core::SamplingParams())));
      batch.push_back(seqs.back().get());
    }
    (void)(*engine)->Step(batch);  // Prefill.
    for (int i = 0; i < 2; ++i) (void)(*engine)->Step(batch);
    const int steps = 32;
    t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) (void)(*engine)->Step(batch);
    const double s = Seconds(t0, std::chrono::steady_clock::now());
    std::printf("batch %2d rows    %7.1f tokens/s (%.2f ms/step, %.2fx one row)\n", rows,
                rows * steps / s, 1e3 * s / steps, rows * steps / s / tps);
  }
  return 0;
}
