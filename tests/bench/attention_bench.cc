// Benchmark (not a test) of the decode attention kernel alone (cpu::CachedAttention, one new
// query row per call): KV bytes read per second as a decode step reads them, every layer of one
// sequence in turn, the sequences (and so the bytes) taken in turn too, enough of them that the
// set is far larger than any cache; for a float32, bfloat16 and float16 cache, each next to the
// read bandwidth of the same threads summing a 1 GiB buffer. The KV cache holds its positions
// in blocks of KvCache::kBlock, so a head's keys are short contiguous runs: a figure well under
// the read bandwidth says the kernel waits on memory latency rather than streams.
// Usage: attention_bench [THREADS] [CONTEXT=1024] [LAYERS=12] [HEADS=12] [KV_HEADS=12] [HEAD_DIM=64]
//   (default: the 110M fixture's shape at 1,024 positions).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#include "core/cpu_kernels.h"
#include "core/kv_cache.h"
#include "tests/bench/bandwidth.h"

int main(int argc, char** argv) {
  namespace cpu = adapterd::core::cpu;
  using adapterd::core::KvCache;
  const int threads = argc > 1 ? std::atoi(argv[1]) : static_cast<int>(std::thread::hardware_concurrency());
  const int64_t context = argc > 2 ? std::atoll(argv[2]) : 1024;
  const int64_t layers = argc > 3 ? std::atoll(argv[3]) : 12;
  const int64_t heads = argc > 4 ? std::atoll(argv[4]) : 12;
  const int64_t kv_heads = argc > 5 ? std::atoll(argv[5]) : 12;
  const int64_t head_dim = argc > 6 ? std::atoll(argv[6]) : 64;
  if (threads < 1 || context < 1 || context > (int64_t{1} << 20) || layers < 1 || layers > 256 || kv_heads < 1 ||
      heads < kv_heads || heads % kv_heads != 0 || heads > 1024 || head_dim < 1 || head_dim > 512 ||
      layers * kv_heads * (context + 1) * head_dim * 2 * 4 > (int64_t{2} << 30)) {
    std::fprintf(stderr, "usage: %s [THREADS >= 1] [CONTEXT 1-2^20] [LAYERS 1-256] [HEADS 1-1024, a multiple of "
                 "KV_HEADS] [KV_HEADS >= 1] [HEAD_DIM 1-512] (one sequence's float32 cache at most 2 GiB)\n", argv[0]);
    return 2;
  }
  at::set_num_threads(threads);
  const double read = adapterd::bench::ReadRate(threads, adapterd::bench::Counting(size_t{1} << 30), 5);
  std::printf("read bandwidth %.2f GB/s (%d threads, CPU kernels %s); %lld layers, %lld heads (%lld KV) of %lld, "
              "one query row over %lld cached positions\n",
              read / 1e9, threads, cpu::IsaName(cpu::SelectedIsa()), static_cast<long long>(layers),
              static_cast<long long>(heads), static_cast<long long>(kv_heads), static_cast<long long>(head_dim),
              static_cast<long long>(context));
  at::manual_seed(1);
  const at::Tensor q = at::randn({1, heads * head_dim});
  const at::Tensor kv = at::randn({1, 2 * kv_heads * head_dim});
  const at::Tensor k = kv.narrow(1, 0, kv_heads * head_dim), v = kv.narrow(1, kv_heads * head_dim, kv_heads * head_dim);
  at::Tensor out = at::empty({1, heads * head_dim});
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim));
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    const double element = static_cast<double>(c10::elementSize(dtype));
    // Bytes one step reads: every layer's keys and values at context + 1 positions.
    const double step_bytes = static_cast<double>(layers * kv_heads * (context + 1) * head_dim * 2) * element;
    const int64_t sequences = std::max<int64_t>(2, static_cast<int64_t>(std::ceil(768e6 / step_bytes)));
    std::vector<std::unique_ptr<KvCache>> caches;
    for (int64_t s = 0; s < sequences; ++s) {
      caches.push_back(std::make_unique<KvCache>(layers, kv_heads, head_dim, context + 1, at::TensorOptions().dtype(dtype)));
      // Appended a block at a time, as decoding and chunked prefill fill a cache.
      for (int64_t done = 0; done < context;) {
        const int64_t n = std::min<int64_t>(KvCache::kBlock, context - done);
        for (int64_t l = 0; l < layers; ++l) {
          caches.back()->Append(l, at::randn({kv_heads, n, head_dim}), at::randn({kv_heads, n, head_dim}));
        }
        caches.back()->Commit(n);
        done += n;
      }
      caches.back()->Reserve(context + 1);
    }
    if (!cpu::KvCacheApplies(*caches[0]) || !cpu::CachedAttentionApplies(q, k, v, out)) {
      std::fprintf(stderr, "the CPU attention kernel does not apply here\n");
      return 1;
    }
    // One step of sequence s: every layer in turn (the new position is written, not committed).
    auto step = [&](int64_t s) {
      const std::vector<cpu::CachedRow> rows = {{0, caches[s].get(), 1}};
      for (int64_t l = 0; l < layers; ++l) cpu::CachedAttention(l, q, k, v, rows, heads, kv_heads, head_dim, scale, 0, out);
    };
    const double all_bytes = step_bytes * static_cast<double>(sequences);
    auto all = [&] {
      for (int64_t s = 0; s < sequences; ++s) step(s);
    };
    adapterd::bench::PassRate(all_bytes, 1, all);  // Warm-up.
    const double rate = adapterd::bench::PassRate(all_bytes, 5, all);
    // From cache: one layer of one sequence, repeated (its bytes stay in L2 or L3).
    const std::vector<cpu::CachedRow> first = {{0, caches[0].get(), 1}};
    const double layer_bytes = step_bytes / static_cast<double>(layers);
    const double cache_rate = adapterd::bench::PassRate(layer_bytes, 200, [&] {
      cpu::CachedAttention(0, q, k, v, first, heads, kv_heads, head_dim, scale, 0, out);
    });
    std::printf("%-9s %.2f MB a step: %.3f ms a step, %.2f GB/s (%.2f of read); one layer from cache %.2f GB/s\n",
                c10::toString(dtype), step_bytes / 1e6, 1e3 * step_bytes / rate, rate / 1e9, rate / read,
                cache_rate / 1e9);
  }
  return 0;
}
