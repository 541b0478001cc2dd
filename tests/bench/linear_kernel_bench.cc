// Benchmark (not a test) of the decode matrix kernels alone (cpu::Linear, and cpu::LinearW8A8
// for --quantize int8, with one row): weight bytes read per second, from memory (a set of
// matrices larger than any cache, visited in turn as a step visits a model's layers) and from
// cache (one small matrix, repeated), for float32, bfloat16, float16 and int8 weights. Prints each next to a two-thread read of a 1 GiB
// buffer, so a kernel that waits on arithmetic shows as a from-cache figure near the memory one.
// Usage: linear_kernel_bench [THREADS] [ROWS] [OUTPUTS] [INPUTS] (default 5632 × 2048, the 1.1B's MLP)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#include "core/causal_lm.h"
#include "core/cpu_kernels.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

// Bytes per second of `threads` threads summing their share of a 1 GiB buffer (best of 5).
double ReadBandwidth() {
  const int64_t n = int64_t{1} << 27;
  std::vector<int64_t> data(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) data[static_cast<size_t>(i)] = i;
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    std::vector<int64_t> sums(static_cast<size_t>(at::get_num_threads()), 0);
    const auto t0 = Clock::now();
    at::parallel_for(0, n, n / at::get_num_threads(), [&](int64_t b, int64_t e) {
      int64_t s = 0;
      for (int64_t i = b; i < e; ++i) s += data[static_cast<size_t>(i)];
      sums[static_cast<size_t>(at::get_thread_num())] += s;
    });
    const double t = Seconds(t0, Clock::now());
    int64_t total = 0;
    for (int64_t s : sums) total += s;
    if (total != n * (n - 1) / 2) std::fprintf(stderr, "read bandwidth: the sums are wrong\n");
    best = std::max(best, static_cast<double>(n) * 8 / t);
  }
  return best;
}

// Bytes of weights per second over `reps` passes of y = x·wᵀ for each matrix in turn (best pass).
double Rate(const at::Tensor& x, const std::vector<at::Tensor>& ws, int reps) {
  int64_t bytes = 0;
  for (const at::Tensor& w : ws) bytes += w.numel() * static_cast<int64_t>(w.element_size());
  double best = 1e9;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = Clock::now();
    for (const at::Tensor& w : ws) {
      if (!adapterd::core::cpu::Linear(x, w, at::Tensor()).defined()) std::abort();
    }
    best = std::min(best, Seconds(t0, Clock::now()));
  }
  return static_cast<double>(bytes) / best;
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency()));
  const int64_t rows = argc > 2 ? std::atoi(argv[2]) : 1;
  const int64_t n = argc > 3 ? std::atoi(argv[3]) : 5632, k = argc > 4 ? std::atoi(argv[4]) : 2048;
  const double read = ReadBandwidth();
  std::printf("read bandwidth %.2f GB/s (%d threads, CPU kernels %s)\n", read / 1e9, at::get_num_threads(),
              adapterd::core::cpu::IsaName(adapterd::core::cpu::SelectedIsa()));
  at::manual_seed(1);
  const at::Tensor x = at::randn({rows, k});
  const bool int8_only = std::getenv("LINEAR_BENCH_INT8_ONLY") != nullptr;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    if (int8_only) break;
    // From memory: n × k matrices, 1.5 GB of them in float32 (0.75 GB in 16 bits).
    std::vector<at::Tensor> big;
    for (int64_t i = 0; i < (int64_t{3} << 28) / (n * k); ++i) big.push_back((at::randn({n, k}) * 0.02).to(dtype));
    // From cache: 96 outputs per thread (192 KB of float32 at k 2048, 96 KB of 16-bit).
    const std::vector<at::Tensor> small(64, (at::randn({96 * at::get_num_threads(), k}) * 0.02).to(dtype));
    Rate(x, big, 1);
    const double memory = Rate(x, big, 3);
    Rate(x, small, 3);
    const double cache = Rate(x, small, 200);
    std::printf("%-9s %lld row(s) by %lld x %lld: from memory %.2f GB/s (%.2f of read), from cache %.2f GB/s\n",
                c10::toString(dtype), static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(k), memory / 1e9, memory / read, cache / 1e9);
  }
  // int8 (w8a8 panels and their scales, as --quantize int8 holds them).
  std::vector<adapterd::core::Int8Matrix> big, small;
  for (int64_t i = 0; i < (int64_t{3} << 28) / (n * k); ++i) {
    big.push_back(adapterd::core::QuantizeW8A8(at::randn({n, k}) * 0.02));
  }
  small.push_back(adapterd::core::QuantizeW8A8(at::randn({96 * at::get_num_threads(), k}) * 0.02));
  auto rate = [&](const std::vector<adapterd::core::Int8Matrix>& ws, int reps) {
    int64_t bytes = 0;
    for (const auto& w : ws) bytes += w.bytes();
    double best = 1e9;
    for (int rep = 0; rep < reps; ++rep) {
      const auto t0 = Clock::now();
      for (int r = 0; r < (ws.size() == 1 ? 64 : 1); ++r) {
        for (const auto& w : ws) {
          if (!adapterd::core::cpu::LinearW8A8(x, w.panels, w.panel_scales, w.out, at::Tensor()).defined()) {
            std::abort();
          }
        }
      }
      best = std::min(best, Seconds(t0, Clock::now()));
    }
    return static_cast<double>(bytes) * (ws.size() == 1 ? 64 : 1) / best;
  };
  rate(big, 1);
  const double memory = rate(big, 3);
  rate(small, 3);
  const double cache = rate(small, 200);
  std::printf("%-9s %lld row(s) by %lld x %lld: from memory %.2f GB/s (%.2f of read), from cache %.2f GB/s (%s)\n",
              "int8", static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(k), memory / 1e9,
              memory / read, cache / 1e9, adapterd::core::cpu::W8A8KernelName());
  return 0;
}
