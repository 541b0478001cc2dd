// Benchmark (not a test) of the real server: aggregate decode tokens/s at 1, 4, 16 and 32
// concurrent streams, and the p99 inter-token latency of 16 streams without and with an
// adapter load/unload every 100 ms.
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
  std::vector<double> itl;  // Seconds per token between chunks, one entry per token.
};

Run Streams(const std::string& addr, int streams, int tokens, const std::string& adapter) {
  auto channel = grpc::CreateChannel(addr, grpc::InsecureChannelCredentials());
  auto stub = v1::Generation::NewStub(channel);
  std::vector<std::vector<double>> itl(streams);
  std::atomic<int64_t> total{0};
  const auto start = Clock::now();
  std::vector<std::thread> threads;
  for (int s = 0; s < streams; ++s) {
    threads.emplace_back([&, s] {
      v1::GenerateRequest req;
      for (int t = 0; t < 16; ++t) req.mutable_token_ids()->add_ids(100 + 13 * s + 7 * t);
      req.set_max_new_tokens(tokens);
      req.set_ignore_eos(true);
      req.set_adapter(adapter);
      grpc::ClientContext ctx;
      auto reader = stub->GenerateStream(&ctx, req);
      v1::GenerateStreamResponse chunk;
      Clock::time_point last{};
      while (reader->Read(&chunk)) {
        const auto now = Clock::now();
        const int n = chunk.token_ids_size();
        if (n == 0) continue;
        if (last != Clock::time_point{}) {
          const double per = std::chrono::duration<double>(now - last).count() / n;
          for (int k = 0; k < n; ++k) itl[s].push_back(per);
        }
        last = now;
        total.fetch_add(n);
      }
      if (!reader->Finish().ok()) std::fprintf(stderr, "stream %d failed\n", s);
    });
  }
  for (auto& t : threads) t.join();
  Run r;
  r.tokens_per_s = total.load() / std::chrono::duration<double>(Clock::now() - start).count();
  for (auto& v : itl) r.itl.insert(r.itl.end(), v.begin(), v.end());
  std::sort(r.itl.begin(), r.itl.end());
  return r;
}

double P99(const std::vector<double>& v) { return v.empty() ? 0 : v[v.size() * 99 / 100]; }

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ADDR ADMIN_ADDR ADAPTER_PATH\n", argv[0]);
    return 2;
  }
  const std::string addr = argv[1], admin_addr = argv[2], adapter_path = argv[3];
  Streams(addr, 2, 8, "");  // Warm-up.
  double single = 0;
  for (int streams : {1, 4, 16, 32}) {
    Run r = Streams(addr, streams, 64, "");
    if (streams == 1) single = r.tokens_per_s;
    std::printf("streams %2d       %7.1f tokens/s aggregate (%.2fx single stream)\n", streams,
                r.tokens_per_s, r.tokens_per_s / single);
  }
  Run quiet = Streams(addr, 16, 64, "");
  auto admin = v1::Admin::NewStub(grpc::CreateChannel(admin_addr, grpc::InsecureChannelCredentials()));
  std::atomic<bool> stop{false};
  std::atomic<int> swaps{0};
  std::thread churn([&] {
    while (!stop.load()) {
      grpc::ClientContext lctx;
      v1::LoadAdapterRequest load;
      load.set_name("bench_churn");
      load.set_path(adapter_path);
      load.set_replace(true);
      v1::LoadAdapterResponse lresp;
      if (!admin->LoadAdapter(&lctx, load, &lresp).ok()) std::fprintf(stderr, "load failed\n");
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      grpc::ClientContext uctx;
      v1::UnloadAdapterRequest unload;
      unload.set_name("bench_churn");
      v1::UnloadAdapterResponse uresp;
      (void)admin->UnloadAdapter(&uctx, unload, &uresp);
      swaps.fetch_add(1);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  });
  Run busy = Streams(addr, 16, 64, "");
  stop = true;
  churn.join();
  std::printf("p99 inter-token  %.2f ms quiet, %.2f ms with a load/unload every 100 ms "
              "(%d cycles): %+.1f%%\n",
              1e3 * P99(quiet.itl), 1e3 * P99(busy.itl), swaps.load(),
              100 * (P99(busy.itl) / P99(quiet.itl) - 1));
  return 0;
}
