// Benchmark (not a test) of the decode matrix kernels alone (cpu::Linear, and cpu::LinearW8A8
// for --quantize int8) over a few rows: weight bytes read per second from memory (matrices
// larger than any cache together, visited in turn as a step visits a model's layers) and from
// cache (one matrix of 96 outputs per thread, repeated), for float32, bfloat16, float16 and
// int8 weights, each next to the read bandwidth of the same threads summing a 1 GiB buffer. A
// from-memory figure near that bandwidth says a kernel is bound by memory; a from-cache figure
// near it says by its arithmetic or its per-call costs.
// Usage: linear_kernel_bench [THREADS] [ROWS] [OUTPUTS] [INPUTS]
//   (default 1 row by 5632 × 2048, the 1.1B's MLP; INPUTS a multiple of 32 for int8).
//   LINEAR_BENCH_INT8_ONLY=1 prints the int8 line alone.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <thread>
#include <vector>

#include "core/causal_lm.h"
#include "core/cpu_kernels.h"
#include "tests/bench/bandwidth.h"

namespace {

using adapterd::bench::PassRate;

// Prints a line: one pass of over(matrices) from memory and 64 of over(one) from cache.
template <class Over>
void Report(const char* name, int64_t rows, int64_t n, int64_t k, double big_bytes, double small_bytes, double read,
            const Over& over_big, const Over& over_small) {
  PassRate(big_bytes, 1, over_big);  // Warm-up.
  const double memory = PassRate(big_bytes, 3, over_big);
  PassRate(small_bytes, 3, over_small);
  const double cache = PassRate(small_bytes, 200, over_small);
  std::printf("%-9s %lld row(s) by %lld x %lld: from memory %.2f GB/s (%.2f of read), from cache %.2f GB/s\n", name,
              static_cast<long long>(rows), static_cast<long long>(n), static_cast<long long>(k), memory / 1e9,
              memory / read, cache / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  const int64_t rows = argc > 2 ? std::atoll(argv[2]) : 1;
  const int64_t n = argc > 3 ? std::atoll(argv[3]) : 5632, k = argc > 4 ? std::atoll(argv[4]) : 2048;
  if (threads < 1 || rows < 1 || rows > adapterd::core::cpu::kLinearMaxRows || n < 1 || k < 32 || k % 32 != 0 ||
      n * k > (int64_t{3} << 28)) {
    std::fprintf(stderr, "usage: %s [THREADS >= 1] [ROWS 1-%lld] [OUTPUTS >= 1] [INPUTS, a multiple of 32] "
                 "(OUTPUTS x INPUTS at most 3 << 28)\n", argv[0],
                 static_cast<long long>(adapterd::core::cpu::kLinearMaxRows));
    return 2;
  }
  at::set_num_threads(threads);
  const double read = adapterd::bench::ReadRate(threads, adapterd::bench::Counting(size_t{1} << 30), 5);
  std::printf("read bandwidth %.2f GB/s (%d threads, CPU kernels %s, w8a8 kernel %s)\n", read / 1e9, threads,
              adapterd::core::cpu::IsaName(adapterd::core::cpu::SelectedIsa()),
              adapterd::core::cpu::W8A8KernelName());
  at::manual_seed(1);
  const at::Tensor x = at::randn({rows, k});
  // From memory: n × k matrices, 1.5 GB of them in float32 (0.75 GB in 16 bits, ~0.4 GB in int8).
  const int64_t count = (int64_t{3} << 28) / (n * k);
  const int64_t small_n = 96 * threads;  // From cache: 96 outputs a thread.
  const bool int8_only = std::getenv("LINEAR_BENCH_INT8_ONLY") != nullptr;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    if (int8_only) break;
    std::vector<at::Tensor> big;
    for (int64_t i = 0; i < count; ++i) big.push_back((at::randn({n, k}) * 0.02).to(dtype));
    const at::Tensor small = (at::randn({small_n, k}) * 0.02).to(dtype);
    auto run = [&](const at::Tensor& w) {
      if (!adapterd::core::cpu::Linear(x, w, at::Tensor()).defined()) std::abort();
    };
    const std::function<void()> over_big = [&] {
      for (const at::Tensor& w : big) run(w);
    };
    const std::function<void()> over_small = [&] {
      for (int r = 0; r < 64; ++r) run(small);
    };
    const double element = static_cast<double>(c10::elementSize(dtype));
    Report(c10::toString(dtype), rows, n, k, count * n * k * element, 64 * small_n * k * element, read, over_big,
           over_small);
  }
  // int8: w8a8 panels and their scales, as --quantize int8 holds them.
  std::vector<adapterd::core::CompactMatrix> big;
  for (int64_t i = 0; i < count; ++i) big.push_back(adapterd::core::QuantizeW8A8(at::randn({n, k}) * 0.02));
  const adapterd::core::CompactMatrix small =
      adapterd::core::QuantizeW8A8(at::randn({small_n, k}) * 0.02);
  auto run = [&](const adapterd::core::CompactMatrix& w) {
    if (!adapterd::core::cpu::LinearW8A8(x, w.panels, w.panel_scales, w.out, at::Tensor())
             .defined())
      std::abort();
  };
  const std::function<void()> over_big = [&] {
    for (const adapterd::core::CompactMatrix& w : big) run(w);
  };
  const std::function<void()> over_small = [&] {
    for (int r = 0; r < 64; ++r) run(small);
  };
  Report("int8", rows, n, k, static_cast<double>(count * big[0].bytes()), 64.0 * static_cast<double>(small.bytes()),
         read, over_big, over_small);
  return 0;
}
