// Benchmark (not a test) of the segmented LoRA kernel alone (cpu::LoraSegments): one decode
// row per adapter, 32 adapters of ranks 8/16/32/64 on a 768-wide projection, over 48 distinct
// sets of factors (4 projections x 12 layers of the 110M model) so that they come from memory
// as in a real step. Prints the factor bytes read per second against memcpy's bandwidth.
// Usage: lora_kernel_bench [THREADS]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "core/cpu_kernels.h"

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }

double CopyBandwidth() {
  const size_t bytes = size_t{1} << 28;
  std::vector<char> src(bytes, 1), dst(bytes, 0);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    auto t0 = Clock::now();
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t b, int64_t e) {
      const size_t chunk = bytes / static_cast<size_t>(at::get_num_threads());
      for (int64_t t = b; t < e; ++t) std::memcpy(dst.data() + t * chunk, src.data() + t * chunk, chunk);
    });
    best = std::max(best, 2.0 * bytes / Seconds(t0, Clock::now()));  // Read + write.
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  at::set_num_threads(argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency()));
  const int64_t width = 768, adapters = 32, sets = 48;
  const double bw = CopyBandwidth();
  // Factors in float32, then in bfloat16 (as held from bfloat16 files or --adapter_dtype).
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    at::manual_seed(3);
    std::vector<std::vector<at::Tensor>> as(sets), bs(sets);
    std::vector<std::vector<adapterd::core::cpu::LoraSegment>> segments(sets);
    int64_t bytes = 0;
    for (int64_t s = 0; s < sets; ++s) {
      for (int64_t i = 0; i < adapters; ++i) {
        const int64_t rank = int64_t{8} << (i % 4);
        as[s].push_back(at::randn({rank, width}).to(dtype));
        bs[s].push_back(at::randn({rank, width}).to(dtype));  // Bᵀ.
        bytes += 2 * rank * width * static_cast<int64_t>(c10::elementSize(dtype));
      }
      for (int64_t i = 0; i < adapters; ++i) {
        segments[s].push_back({i, 1, &as[s][static_cast<size_t>(i)], &bs[s][static_cast<size_t>(i)]});
      }
    }
    at::Tensor x = at::randn({adapters, width}), y = at::zeros({adapters, width});
    for (int rep = 0; rep < 2; ++rep) {
      for (int64_t s = 0; s < sets; ++s) adapterd::core::cpu::LoraSegments(x, y, segments[s]);
    }
    // The fastest of 10 steps: neighbours on a shared machine only ever add time.
    double per_step = 1e9;
    for (int rep = 0; rep < 10; ++rep) {
      auto t0 = Clock::now();
      for (int64_t s = 0; s < sets; ++s) {
        if (!adapterd::core::cpu::LoraSegments(x, y, segments[s])) return 1;
      }
      per_step = std::min(per_step, Seconds(t0, Clock::now()));
    }
    std::printf("segmented LoRA   %-8s %.2f ms per step (%d threads, %s): %.1f MB of factors, %.2f GB/s; "
                "memcpy %.2f GB/s (ratio %.2f)\n",
                c10::toString(dtype), 1e3 * per_step, at::get_num_threads(),
                adapterd::core::cpu::IsaName(adapterd::core::cpu::SelectedIsa()), bytes / 1e6,
                bytes / per_step / 1e9, bw / 1e9, bytes / per_step / bw);
  }
  return 0;
}
