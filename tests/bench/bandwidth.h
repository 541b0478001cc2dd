// The bandwidth probes the benchmarks measure their kernels against (header-only; benchmarks,
// not the product).
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <thread>
#include <vector>

namespace adapterd::bench {

// Returns the best of `reps` rates of `bytes` over the time `threads` threads take to each run
// work(t) once.
template <class Work>
inline double BestRate(int threads, double bytes, const Work& work, int reps = 5) {
  double best = 0;
  for (int rep = 0; rep < reps; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) pool.emplace_back([&work, t] { work(t); });
    for (auto& th : pool) th.join();
    best = std::max(best, bytes / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// Bytes per second of `bytes` over the fastest of `reps` runs of pass() (on this thread; a
// kernel's own parallelism inside).
template <class Pass>
inline double PassRate(double bytes, int reps, const Pass& pass) {
  double best = 1e9;
  for (int rep = 0; rep < reps; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pass();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return bytes / best;
}

// Words 0, 1, 2... filling `bytes`: ReadRate()'s buffer.
inline std::vector<uint64_t> Counting(size_t bytes) {
  std::vector<uint64_t> buf(bytes / sizeof(uint64_t));
  for (size_t i = 0; i < buf.size(); ++i) buf[i] = i;
  return buf;
}

// Returns bytes read per second (best of `reps`) by `threads` threads each summing its share
// of `buf` (from Counting(), far larger than the caches), without asking for huge pages (as
// mapped weights get none): what a decode step does with its weights (it reads them, writes
// nothing). memcpy's figure counts each byte once though it moves it twice, so it understates
// what a reading kernel can reach.
inline double ReadRate(int threads, const std::vector<uint64_t>& buf, int reps) {
  std::vector<uint64_t> sums(threads);
  const size_t chunk = buf.size() / threads / 8 * 8;
  const double rate = BestRate(
      threads, static_cast<double>(chunk * threads * sizeof(uint64_t)),
      [&](int t) {
        const uint64_t* p = buf.data() + t * chunk;
        uint64_t s[8] = {};
        for (size_t i = 0; i < chunk; i += 8) {
          for (int u = 0; u < 8; ++u) s[u] += p[i + u];
        }
        sums[t] = s[0] + s[1] + s[2] + s[3] + s[4] + s[5] + s[6] + s[7];
      },
      reps);
  // The threads' sums add up to 0 + 1 + ... + (n - 1): a check that every word was read.
  uint64_t total = 0;
  for (uint64_t s : sums) total += s;
  const uint64_t n = chunk * threads;
  if (total != n * (n - 1) / 2) std::fprintf(stderr, "read bandwidth: the sums are wrong\n");
  return rate;
}

}  // namespace adapterd::bench
