// Benchmark (not a test) of the real server over gRPC.
//  - Aggregate decode tokens/s at 1, 4, 16 and 32 concurrent streams (median of 3 runs each).
//  - p99 inter-token latency of 16 streams without and with an adapter load/unload every
//    100 ms. Quiet and busy runs alternate (4 rounds) so that a slow spell of the machine hits
//    both; samples are pooled per kind. Inter-token gaps count once every stream has its first
//    token (steady decode): before that, the prefills of late arrivals share steps with the
//    early streams whether or not adapters churn. The all-samples p99 is printed too.
// Usage: serve_bench ADDR ADMIN_ADDR ADAPTER_PATH  (adapterd serve already running)
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

#include "adapterd/v1/admin.grpc.pb.h"
#include "adapterd/v1/generation.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace v1 = adapterd::v1;
using Clock = std::chrono::steady_clock;

struct Run {
  double tokens_per_s = 0;
  std::vector<double> itl;         // Seconds per token between chunks, every gap.
  std::vector<double> steady_itl;  // Gaps that start after every stream's first token.
};

Run Streams(v1::Generation::Stub& stub, int streams, int tokens) {
  struct Chunk {
    Clock::time_point at;
    int tokens;
  };
  std::vector<std::vector<Chunk>> chunks(streams);
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      v1::GenerateRequest req;
      for (int t = 0; t < 16; ++t) req.mutable_token_ids()->add_ids(100 + 13 * s + 7 * t);
      req.set_max_new_tokens(tokens);
      req.set_ignore_eos(true);
      grpc::ClientContext ctx;
      auto reader = stub.GenerateStream(&ctx, req);
      v1::GenerateStreamResponse chunk;
      while (reader->Read(&chunk)) {
        if (chunk.token_ids_size() > 0) chunks[s].push_back({Clock::now(), chunk.token_ids_size()});
      }
      if (!reader->Finish().ok()) std::fprintf(stderr, "stream %d failed\n", s);
    });
  }
  for (auto& t : threads) t.join();
  const auto end = Clock::now();
  Run r;
  int64_t total = 0;
  Clock::time_point all_started = start;
  for (const auto& c : chunks) {
    if (!c.empty()) all_started = std::max(all_started, c.front().at);
  }
  for (const auto& c : chunks) {
    for (size_t i = 0; i < c.size(); ++i) {
      total += c[i].tokens;
      if (i == 0) continue;
      const double per = std::chrono::duration<double>(c[i].at - c[i - 1].at).count() / c[i].tokens;
      for (int k = 0; k < c[i].tokens; ++k) {
        r.itl.push_back(per);
        if (c[i - 1].at >= all_started) r.steady_itl.push_back(per);
      }
    }
  }
  r.tokens_per_s = static_cast<double>(total) / std::chrono::duration<double>(end - start).count();
  return r;
}

double P99(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() * 99 / 100];
}

// Loads and unloads an adapter every 100 ms (load, 50 ms, unload, 50 ms) while alive.
class Churn {
 public:
  Churn(v1::Admin::Stub& admin, std::string path) {
    thread_ = std::thread([this, &admin, path] {
      while (!stop_.load()) {
        grpc::ClientContext lctx;
        v1::LoadAdapterRequest load;
        load.set_name("bench_churn");
        load.set_path(path);
        load.set_replace(true);
        v1::LoadAdapterResponse lresp;
        if (!admin.LoadAdapter(&lctx, load, &lresp).ok()) std::fprintf(stderr, "load failed\n");
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        grpc::ClientContext uctx;
        v1::UnloadAdapterRequest unload;
        unload.set_name("bench_churn");
        v1::UnloadAdapterResponse uresp;
        (void)admin.UnloadAdapter(&uctx, unload, &uresp);
        cycles_.fetch_add(1);
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
    });
  }
  ~Churn() {
    stop_ = true;
    thread_.join();
  }
  int cycles() const { return cycles_.load(); }

 private:
  std::atomic<bool> stop_{false};
  std::atomic<int> cycles_{0};
  std::thread thread_;
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ADDR ADMIN_ADDR ADAPTER_PATH\n", argv[0]);
    return 2;
  }
  const std::string addr = argv[1], admin_addr = argv[2], adapter_path = argv[3];
  auto stub =
      v1::Generation::NewStub(grpc::CreateChannel(addr, grpc::InsecureChannelCredentials()));
  auto admin =
      v1::Admin::NewStub(grpc::CreateChannel(admin_addr, grpc::InsecureChannelCredentials()));
  Streams(*stub, 2, 8);  // Warm-up.
  double single = 0;
  for (int streams : {1, 4, 16, 32}) {
    std::vector<double> rates;
    for (int rep = 0; rep < 3; ++rep) rates.push_back(Streams(*stub, streams, 64).tokens_per_s);
    std::sort(rates.begin(), rates.end());
    if (streams == 1) single = rates[1];
    std::printf("streams %2d       %7.1f tokens/s aggregate (%.2fx single stream; runs "
                "%.1f..%.1f)\n",
                streams, rates[1], rates[1] / single, rates[0], rates[2]);
  }
  std::vector<double> quiet, busy, quiet_all, busy_all;
  int cycles = 0;
  for (int round = 0; round < 4; ++round) {
    Run q = Streams(*stub, 16, 64);
    Run b;
    {
      Churn churn(*admin, adapter_path);
      b = Streams(*stub, 16, 64);
      cycles += churn.cycles();
    }
    std::printf("round %d          p99 inter-token %.2f ms quiet, %.2f ms busy\n", round,
                1e3 * P99(q.steady_itl), 1e3 * P99(b.steady_itl));
    quiet.insert(quiet.end(), q.steady_itl.begin(), q.steady_itl.end());
    busy.insert(busy.end(), b.steady_itl.begin(), b.steady_itl.end());
    quiet_all.insert(quiet_all.end(), q.itl.begin(), q.itl.end());
    busy_all.insert(busy_all.end(), b.itl.begin(), b.itl.end());
  }
  std::printf("p99 inter-token  %.2f ms quiet, %.2f ms with a load/unload every 100 ms "
              "(%d cycles): %+.1f%% (steady decode, %zu + %zu samples)\n",
              1e3 * P99(quiet), 1e3 * P99(busy), cycles, 100 * (P99(busy) / P99(quiet) - 1),
              quiet.size(), busy.size());
  std::printf("p99 all gaps     %.2f ms quiet, %.2f ms busy: %+.1f%% (includes prefills of late "
              "arrivals)\n",
              1e3 * P99(quiet_all), 1e3 * P99(busy_all),
              100 * (P99(busy_all) / P99(quiet_all) - 1));
  return 0;
}
