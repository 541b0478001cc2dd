// adapterd's Prometheus metrics: one registry, every family declared here, served at /metrics
// by cpp-httplib (a thread pool, read/write timeouts, optional TLS) on a listener of its own.
// Per-adapter series exist only for adapters that are or were loaded (and "" for the base
// model): a request naming anything else is counted under adapter="<not loaded>". An unloaded
// adapter keeps its counters (so no count is lost when requests finish after the unload, or
// when one name is loaded and unloaded again) until more than `retained_unloaded` other
// adapters were unloaded after it; so label cardinality stays bounded by the adapter table's
// capacity plus that number.
//
// Thread-safety: every method may be called from any thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <deque>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "server/tls.h"
#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace httplib {
class Server;
}

namespace adapterd::server {

// The adapter label of requests for names that are not (or no longer) loaded.
inline constexpr char kNotLoadedAdapterLabel[] = "<not loaded>";

class Metrics {
 public:
  Metrics();
  // Stops the /metrics listener.
  ~Metrics();
  // Serves GET /metrics (Prometheus text format) on `address` ("host:port", port 0 picks
  // one) from threads of its own, over TLS when `tls` is enabled; returns the bound port.
  absl::StatusOr<int> Serve(const std::string& address, const TlsFiles& tls = TlsFiles());
  // Returns the text exposition of every family.
  std::string Scrape() const;

  // Requests.
  void RequestDone(const std::string& adapter, const std::string& code, double duration_s,
                   double queue_s, double ttft_s, int64_t prompt_tokens, int64_t generated_tokens);
  void InterTokenLatency(double seconds);
  void Step(int64_t rows, int64_t tokens);
  void SetQueue(int64_t waiting, int64_t running, double kv_usage_ratio);
  // A running request gave up its KV cache (preemption by recomputation).
  void Preempted();
  // Blocks of the KV pool used by running requests, held by the prefix cache, and in all.
  void SetKvBlocks(int64_t used, int64_t cached, int64_t total);
  void SetLoraInfo(const std::vector<std::string>& running, const std::vector<std::string>& waiting,
                   int64_t max_lora);
  // Adapters.
  // `trigger`: admin, preload or on_demand; `result`: loaded, validated, refused, timeout.
  void AdapterLoad(const std::string& trigger, const std::string& result, double seconds);
  void AdapterEvicted();
  // A request that waited `seconds` for an on-demand load (whatever its outcome).
  void AdapterWaited(double seconds);
  void SetAdapterWaiting(int64_t requests);
  void AdapterUnload(const std::string& result);
  // The adapters loaded now, with their bytes; adapters missing from it count as unloaded.
  void SetAdapters(const std::map<std::string, int64_t>& bytes_by_adapter);
  // How many unloaded adapters keep their series (default 64; serve sets --max_adapters).
  void SetRetainedUnloaded(size_t n);
  void SetModelInfo(const std::string& architecture, const std::string& name, int64_t parameters,
                    const std::string& weights_dtype, const std::string& quantization);
  // Prefix reuse (--prefix_cache_bytes): the engine's running totals of prompt tokens looked
  // up and found cached, and the cache's bytes and blocks now. One caller at a time.
  void SetPrefixCache(int64_t queried_tokens, int64_t hit_tokens, int64_t bytes, int64_t blocks);

  prometheus::Registry& registry() { return *registry_; }

 private:
  struct PerAdapter {
    prometheus::Counter* prompt_tokens;
    prometheus::Counter* generated_tokens;
    prometheus::Histogram* duration;
    prometheus::Histogram* ttft;
    std::map<std::string, prometheus::Counter*> requests_by_code;
    prometheus::Gauge* bytes = nullptr;
  };
  PerAdapter& Series(const std::string& adapter) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void DropSeries(const std::string& adapter) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::shared_ptr<prometheus::Registry> registry_;
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_;
  prometheus::Family<prometheus::Counter>& requests_;
  prometheus::Family<prometheus::Histogram>& duration_;
  prometheus::Family<prometheus::Histogram>& queue_time_;
  prometheus::Family<prometheus::Histogram>& ttft_;
  prometheus::Family<prometheus::Histogram>& inter_token_;
  prometheus::Family<prometheus::Counter>& prompt_tokens_;
  prometheus::Family<prometheus::Counter>& generated_tokens_;
  prometheus::Family<prometheus::Histogram>& batch_rows_;
  prometheus::Family<prometheus::Histogram>& step_tokens_;
  prometheus::Family<prometheus::Gauge>& queue_depth_;
  prometheus::Family<prometheus::Gauge>& running_;
  prometheus::Family<prometheus::Gauge>& kv_usage_;
  prometheus::Family<prometheus::Gauge>& adapters_loaded_;
  prometheus::Family<prometheus::Gauge>& adapter_bytes_;
  prometheus::Family<prometheus::Counter>& adapter_loads_;
  prometheus::Family<prometheus::Counter>& adapter_unloads_;
  prometheus::Family<prometheus::Histogram>& adapter_load_duration_;
  prometheus::Family<prometheus::Counter>& adapter_evictions_;
  prometheus::Family<prometheus::Histogram>& adapter_wait_;
  prometheus::Family<prometheus::Gauge>& adapter_waiting_;
  prometheus::Family<prometheus::Gauge>& adapter_resident_bytes_;
  prometheus::Family<prometheus::Gauge>& model_info_;
  prometheus::Family<prometheus::Gauge>& lora_info_;

  prometheus::Histogram& queue_time_all_;
  prometheus::Histogram& inter_token_all_;
  prometheus::Histogram& batch_rows_all_;
  prometheus::Histogram& step_tokens_all_;
  prometheus::Gauge& queue_depth_all_;
  prometheus::Gauge& running_all_;
  prometheus::Gauge& kv_usage_all_;
  prometheus::Gauge& adapters_loaded_all_;
  prometheus::Histogram& adapter_load_duration_all_;
  prometheus::Counter& adapter_evictions_all_;
  prometheus::Histogram& adapter_wait_all_;
  prometheus::Gauge& adapter_waiting_all_;
  prometheus::Gauge& adapter_resident_bytes_all_;
  prometheus::Counter* prefix_queried_ = nullptr;
  prometheus::Counter* prefix_hits_ = nullptr;
  prometheus::Gauge* prefix_bytes_ = nullptr;
  prometheus::Gauge* prefix_blocks_ = nullptr;
  prometheus::Counter* preemptions_ = nullptr;
  prometheus::Gauge* kv_blocks_used_ = nullptr;
  prometheus::Gauge* kv_blocks_cached_ = nullptr;
  prometheus::Gauge* kv_blocks_total_ = nullptr;
  std::atomic<int64_t> prefix_queried_seen_{0};
  std::atomic<int64_t> prefix_hits_seen_{0};

  absl::Mutex mu_;
  std::map<std::string, PerAdapter> per_adapter_ ABSL_GUARDED_BY(mu_);
  std::set<std::string> loaded_ ABSL_GUARDED_BY(mu_);  // As of the last SetAdapters().
  std::deque<std::string> unloaded_ ABSL_GUARDED_BY(mu_);  // Oldest unload first.
  size_t retained_unloaded_ ABSL_GUARDED_BY(mu_) = 64;
  prometheus::Gauge* lora_info_series_ ABSL_GUARDED_BY(mu_) = nullptr;
};

}  // namespace adapterd::server
