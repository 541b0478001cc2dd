#include "server/metrics.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "httplib.h"
#include "prometheus/text_serializer.h"

namespace adapterd::server {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

Histogram::BucketBoundaries LatencyBuckets() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
}

}  // namespace

Metrics::Metrics()
    : registry_(std::make_shared<prometheus::Registry>()),
      requests_(BuildCounter()
                    .Name("adapterd_requests_total")
                    .Help("Generation requests finished, by adapter and gRPC status code.")
                    .Register(*registry_)),
      duration_(BuildHistogram()
                    .Name("adapterd_request_duration_seconds")
                    .Help("Seconds from arrival to the end of a generation request.")
                    .Register(*registry_)),
      queue_time_(BuildHistogram()
                      .Name("adapterd_request_queue_time_seconds")
                      .Help("Seconds a request waited before its first model step.")
                      .Register(*registry_)),
      ttft_(BuildHistogram()
                .Name("adapterd_time_to_first_token_seconds")
                .Help("Seconds from arrival to the first generated token.")
                .Register(*registry_)),
      inter_token_(BuildHistogram()
                       .Name("adapterd_inter_token_latency_seconds")
                       .Help("Seconds between consecutive tokens of one request.")
                       .Register(*registry_)),
      prompt_tokens_(BuildCounter()
                         .Name("adapterd_prompt_tokens_total")
                         .Help("Prompt tokens processed, by adapter.")
                         .Register(*registry_)),
      generated_tokens_(BuildCounter()
                            .Name("adapterd_generated_tokens_total")
                            .Help("Tokens generated, by adapter.")
                            .Register(*registry_)),
      batch_rows_(BuildHistogram()
                      .Name("adapterd_batch_size")
                      .Help("Sequences in one model step.")
                      .Register(*registry_)),
      step_tokens_(BuildHistogram()
                       .Name("adapterd_batch_tokens")
                       .Help("Tokens processed in one model step.")
                       .Register(*registry_)),
      queue_depth_(BuildGauge()
                       .Name("adapterd_queue_depth")
                       .Help("Requests waiting for admission.")
                       .Register(*registry_)),
      running_(BuildGauge()
                   .Name("adapterd_running_requests")
                   .Help("Requests in the running batch.")
                   .Register(*registry_)),
      kv_usage_(BuildGauge()
                    .Name("adapterd_kv_cache_usage_ratio")
                    .Help("KV cache bytes held over the KV budget, 0 to 1.")
                    .Register(*registry_)),
      adapters_loaded_(BuildGauge()
                           .Name("adapterd_adapters_loaded")
                           .Help("Adapters in the adapter table.")
                           .Register(*registry_)),
      adapter_bytes_(BuildGauge()
                         .Name("adapterd_adapter_bytes")
                         .Help("Bytes held by each loaded adapter.")
                         .Register(*registry_)),
      adapter_loads_(BuildCounter()
                         .Name("adapterd_adapter_loads_total")
                         .Help("Adapter loads, by trigger (admin, preload, on_demand) and result "
                               "(loaded, validated, refused, timeout).")
                         .Register(*registry_)),
      adapter_unloads_(BuildCounter()
                           .Name("adapterd_adapter_unloads_total")
                           .Help("Adapter unload calls, by result (unloaded, not_found).")
                           .Register(*registry_)),
      adapter_load_duration_(BuildHistogram()
                                 .Name("adapterd_adapter_load_duration_seconds")
                                 .Help("Seconds spent reading and validating an adapter.")
                                 .Register(*registry_)),
      adapter_evictions_(BuildCounter()
                             .Name("adapterd_adapter_evictions_total")
                             .Help("Idle adapters evicted (least recently used) to make room for a load.")
                             .Register(*registry_)),
      adapter_wait_(BuildHistogram()
                        .Name("adapterd_adapter_wait_seconds")
                        .Help("Seconds a request waited for its adapter to load on demand.")
                        .Register(*registry_)),
      adapter_waiting_(BuildGauge()
                           .Name("adapterd_adapter_waiting_requests")
                           .Help("Requests waiting for their adapter to load on demand.")
                           .Register(*registry_)),
      adapter_resident_bytes_(BuildGauge()
                                  .Name("adapterd_adapter_resident_bytes")
                                  .Help("Bytes held by the resident adapters together.")
                                  .Register(*registry_)),
      model_info_(BuildGauge()
                      .Name("adapterd_model_info")
                      .Help("The base model served (the dtype its matrices are stored in, and --quantize) and "
                            "adapterd's version (value 1).")
                      .Register(*registry_)),
      lora_info_(BuildGauge()
                     .Name("adapterd_lora_requests_info")
                     .Help("LoRA adapters with running and waiting requests, for the Gateway API "
                           "Inference Extension's LoRA-affinity routing; value is a timestamp.")
                     .Register(*registry_)),
      queue_time_all_(queue_time_.Add({}, LatencyBuckets())),
      inter_token_all_(inter_token_.Add({}, Histogram::BucketBoundaries{
                                                0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                                                0.2, 0.3, 0.5, 1, 2})),
      batch_rows_all_(batch_rows_.Add({}, Histogram::BucketBoundaries{1, 2, 4, 8, 16, 32, 64, 128})),
      step_tokens_all_(step_tokens_.Add(
          {}, Histogram::BucketBoundaries{1, 4, 16, 64, 256, 1024, 4096, 16384})),
      queue_depth_all_(queue_depth_.Add({})),
      running_all_(running_.Add({})),
      kv_usage_all_(kv_usage_.Add({})),
      adapters_loaded_all_(adapters_loaded_.Add({})),
      adapter_load_duration_all_(adapter_load_duration_.Add(
          {}, Histogram::BucketBoundaries{0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30})),
      adapter_evictions_all_(adapter_evictions_.Add({})),
      adapter_wait_all_(adapter_wait_.Add({}, LatencyBuckets())),
      adapter_waiting_all_(adapter_waiting_.Add({})),
      adapter_resident_bytes_all_(adapter_resident_bytes_.Add({})) {
  prefix_queried_ = &BuildCounter()
                         .Name("adapterd_prefix_cache_queried_tokens_total")
                         .Help("Prompt tokens looked up in the prefix cache.")
                         .Register(*registry_)
                         .Add({});
  prefix_hits_ = &BuildCounter()
                      .Name("adapterd_prefix_cache_hit_tokens_total")
                      .Help("Prompt tokens whose keys and values came from the prefix cache.")
                      .Register(*registry_)
                      .Add({});
  prefix_bytes_ = &BuildGauge()
                       .Name("adapterd_prefix_cache_bytes")
                       .Help("Bytes of keys and values held by the prefix cache.")
                       .Register(*registry_)
                       .Add({});
  prefix_blocks_ = &BuildGauge()
                        .Name("adapterd_prefix_cache_blocks")
                        .Help("Blocks of 16 prompt positions held by the prefix cache.")
                        .Register(*registry_)
                        .Add({});
  preemptions_ = &BuildCounter()
                      .Name("adapterd_preemptions_total")
                      .Help("Running requests whose KV cache was freed for an older one to grow "
                            "(recomputed when room returns).")
                      .Register(*registry_)
                      .Add({});
  auto& kv_blocks = BuildGauge()
                        .Name("adapterd_kv_blocks")
                        .Help("Blocks of 16 positions of the --max_kv_bytes pool: used by running "
                              "requests, cached (prefix blocks, dropped first when room is needed), "
                              "and total.")
                        .Register(*registry_);
  kv_blocks_used_ = &kv_blocks.Add({{"state", "used"}});
  kv_blocks_cached_ = &kv_blocks.Add({{"state", "cached"}});
  kv_blocks_total_ = &kv_blocks.Add({{"state", "total"}});
}

void Metrics::SetPrefixCache(int64_t queried_tokens, int64_t hit_tokens, int64_t bytes, int64_t blocks) {
  const int64_t queried_before = prefix_queried_seen_.exchange(queried_tokens);
  const int64_t hits_before = prefix_hits_seen_.exchange(hit_tokens);
  if (queried_tokens > queried_before) prefix_queried_->Increment(static_cast<double>(queried_tokens - queried_before));
  if (hit_tokens > hits_before) prefix_hits_->Increment(static_cast<double>(hit_tokens - hits_before));
  prefix_bytes_->Set(static_cast<double>(bytes));
  prefix_blocks_->Set(static_cast<double>(blocks));
}

Metrics::~Metrics() {
  if (http_ != nullptr) StopHttpServer(*http_, http_thread_);
}

std::string Metrics::Scrape() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

absl::StatusOr<int> Metrics::Serve(const std::string& address, const TlsFiles& tls) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(address, &host, &port); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("metrics listener: ", s.message()));
  }
  ASSIGN_OR_RETURN(http_, NewHttpServer(tls, "metrics listener"));
  http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
    res.set_content(Scrape(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http_->Get("/", [](const httplib::Request&, httplib::Response& res) {
    res.set_content("<a href=\"/metrics\">/metrics</a>\n", "text/html");
  });
  const int bound = BindHttpServer(*http_, host, port);
  if (bound < 0) {
    return absl::UnavailableError(absl::StrCat("metrics listener ", address, ": cannot bind"));
  }
  http_thread_ = std::thread([this] { http_->listen_after_bind(); });
  return bound;
}

Metrics::PerAdapter& Metrics::Series(const std::string& adapter) {
  auto it = per_adapter_.find(adapter);
  if (it != per_adapter_.end()) return it->second;
  PerAdapter s;
  s.prompt_tokens = &prompt_tokens_.Add({{"adapter", adapter}});
  s.generated_tokens = &generated_tokens_.Add({{"adapter", adapter}});
  s.duration = &duration_.Add({{"adapter", adapter}}, LatencyBuckets());
  s.ttft = &ttft_.Add({{"adapter", adapter}}, LatencyBuckets());
  return per_adapter_.emplace(adapter, std::move(s)).first->second;
}

void Metrics::DropSeries(const std::string& adapter) {
  auto it = per_adapter_.find(adapter);
  if (it == per_adapter_.end()) return;
  PerAdapter& s = it->second;
  prompt_tokens_.Remove(s.prompt_tokens);
  generated_tokens_.Remove(s.generated_tokens);
  duration_.Remove(s.duration);
  ttft_.Remove(s.ttft);
  for (auto& [code, c] : s.requests_by_code) requests_.Remove(c);
  if (s.bytes != nullptr) adapter_bytes_.Remove(s.bytes);
  per_adapter_.erase(it);
}

void Metrics::RequestDone(const std::string& adapter, const std::string& code, double duration_s,
                          double queue_s, double ttft_s, int64_t prompt_tokens,
                          int64_t generated_tokens) {
  absl::MutexLock lock(&mu_);
  // Only names of adapters that are or were loaded become label values: clients choose the
  // rest.
  const std::string& label = adapter.empty() || per_adapter_.count(adapter)
                                 ? adapter
                                 : std::string(kNotLoadedAdapterLabel);
  PerAdapter& s = Series(label);
  auto& counter = s.requests_by_code[code];
  if (counter == nullptr) counter = &requests_.Add({{"adapter", label}, {"code", code}});
  counter->Increment();
  s.duration->Observe(duration_s);
  if (generated_tokens > 0) s.ttft->Observe(ttft_s);
  s.prompt_tokens->Increment(static_cast<double>(prompt_tokens));
  s.generated_tokens->Increment(static_cast<double>(generated_tokens));
  queue_time_all_.Observe(queue_s);
}

void Metrics::InterTokenLatency(double seconds) { inter_token_all_.Observe(seconds); }

void Metrics::Step(int64_t rows, int64_t tokens) {
  batch_rows_all_.Observe(static_cast<double>(rows));
  step_tokens_all_.Observe(static_cast<double>(tokens));
}

void Metrics::SetQueue(int64_t waiting, int64_t running, double kv_usage_ratio) {
  queue_depth_all_.Set(static_cast<double>(waiting));
  running_all_.Set(static_cast<double>(running));
  kv_usage_all_.Set(kv_usage_ratio);
}

void Metrics::Preempted() { preemptions_->Increment(); }

void Metrics::SetKvBlocks(int64_t used, int64_t cached, int64_t total) {
  kv_blocks_used_->Set(static_cast<double>(used));
  kv_blocks_cached_->Set(static_cast<double>(cached));
  kv_blocks_total_->Set(static_cast<double>(total));
}

void Metrics::SetLoraInfo(const std::vector<std::string>& running,
                          const std::vector<std::string>& waiting, int64_t max_lora) {
  absl::MutexLock lock(&mu_);
  const prometheus::Labels labels = {{"running_lora_adapters", absl::StrJoin(running, ",")},
                                     {"waiting_lora_adapters", absl::StrJoin(waiting, ",")},
                                     {"max_lora", absl::StrCat(max_lora)}};
  prometheus::Gauge& g = lora_info_.Add(labels);
  if (lora_info_series_ != nullptr && lora_info_series_ != &g) lora_info_.Remove(lora_info_series_);
  lora_info_series_ = &g;
  g.Set(std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count());
}

void Metrics::AdapterLoad(const std::string& trigger, const std::string& result, double seconds) {
  adapter_loads_.Add({{"trigger", trigger}, {"result", result}}).Increment();
  adapter_load_duration_all_.Observe(seconds);
}

void Metrics::AdapterEvicted() { adapter_evictions_all_.Increment(); }

void Metrics::AdapterWaited(double seconds) { adapter_wait_all_.Observe(seconds); }

void Metrics::SetAdapterWaiting(int64_t requests) { adapter_waiting_all_.Set(static_cast<double>(requests)); }

void Metrics::AdapterUnload(const std::string& result) {
  adapter_unloads_.Add({{"result", result}}).Increment();
}

void Metrics::SetAdapters(const std::map<std::string, int64_t>& bytes_by_adapter) {
  absl::MutexLock lock(&mu_);
  for (const std::string& name : loaded_) {
    if (bytes_by_adapter.count(name)) continue;
    // Unloaded: its bytes go, its counters stay (bounded below).
    auto it = per_adapter_.find(name);
    if (it != per_adapter_.end() && it->second.bytes != nullptr) {
      adapter_bytes_.Remove(it->second.bytes);
      it->second.bytes = nullptr;
    }
    unloaded_.push_back(name);
  }
  loaded_.clear();
  int64_t total = 0;
  for (const auto& [name, bytes] : bytes_by_adapter) {
    total += bytes;
    loaded_.insert(name);
    unloaded_.erase(std::remove(unloaded_.begin(), unloaded_.end(), name), unloaded_.end());
    PerAdapter& s = Series(name);
    if (s.bytes == nullptr) s.bytes = &adapter_bytes_.Add({{"adapter", name}});
    s.bytes->Set(static_cast<double>(bytes));
  }
  while (unloaded_.size() > retained_unloaded_) {
    DropSeries(unloaded_.front());
    unloaded_.pop_front();
  }
  adapters_loaded_all_.Set(static_cast<double>(bytes_by_adapter.size()));
  adapter_resident_bytes_all_.Set(static_cast<double>(total));
}

void Metrics::SetRetainedUnloaded(size_t n) {
  absl::MutexLock lock(&mu_);
  retained_unloaded_ = n;
}

void Metrics::SetModelInfo(const std::string& architecture, const std::string& name,
                           int64_t parameters, const std::string& weights_dtype,
                           const std::string& quantization) {
  model_info_.Add({{"architecture", architecture}, {"model", name},
                   {"parameters", absl::StrCat(parameters)}, {"quantization", quantization},
                   {"version", ADAPTERD_VERSION}, {"weights_dtype", weights_dtype}})
      .Set(1);
}

}  // namespace adapterd::server
