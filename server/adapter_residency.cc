#include "server/adapter_residency.h"

#include <dirent.h>
#include <malloc.h>

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "server/adapter_paths.h"
#include "server/admin_service.h"
#include "server/serving_context.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {
namespace {

namespace v1 = adapterd::v1;

using SteadyClock = std::chrono::steady_clock;

// Converts a steady_clock reading in ns to Unix seconds.
double UnixSeconds(int64_t steady_ns) {
  const auto steady = SteadyClock::time_point(std::chrono::nanoseconds(steady_ns));
  const auto system = std::chrono::system_clock::now() +
                      std::chrono::duration_cast<std::chrono::system_clock::duration>(steady - SteadyClock::now());
  return std::chrono::duration<double>(system.time_since_epoch()).count();
}

// At most this many folders are listed with include_on_disk.
constexpr size_t kMaxListedOnDisk = 10000;

}  // namespace

const char* LoadTriggerName(LoadTrigger trigger) {
  switch (trigger) {
    case LoadTrigger::kAdmin: return "admin";
    case LoadTrigger::kPreload: return "preload";
    case LoadTrigger::kOnDemand: return "on_demand";
  }
  return "admin";
}

AdapterResidency::AdapterResidency(ServingContext& ctx, ResidencyOptions options)
    : ctx_(ctx), options_(options), loader_(LowerThreadPriority) {}

AdapterResidency::~AdapterResidency() { Shutdown(); }

void AdapterResidency::SetSettledHook(std::function<void()> hook) {
  absl::MutexLock lock(&mu_);
  settled_hook_ = std::move(hook);
}

void AdapterResidency::PublishMetrics() {
  std::map<std::string, int64_t> bytes;
  for (const auto& a : ctx_.table->List()) bytes[adapters::ReportOf(a).name] = adapters::ReportOf(a).bytes;
  ctx_.metrics.SetAdapters(bytes);
}

bool AdapterResidency::FitsBesidePinned(const adapters::AdapterRef& adapter) const {
  int64_t count = 1, bytes = adapters::ReportOf(adapter).bytes;
  for (const auto& e : ctx_.table->Entries()) {
    if (!e.pinned) continue;
    ++count;
    bytes += adapters::ReportOf(e.adapter).bytes;
  }
  return count <= ctx_.table->limits().max_adapters && bytes <= ctx_.table->limits().max_bytes;
}

absl::StatusOr<adapters::AdapterRef> AdapterResidency::Load(const LoadSpec& spec, v1::LoadAdapterResponse* response,
                                                            const std::function<bool()>& may_publish,
                                                            const std::function<bool()>& still_wanted) {
  const auto start = SteadyClock::now();
  const char* trigger = LoadTriggerName(spec.trigger);
  auto count = [&](const char* result) {
    ctx_.metrics.AdapterLoad(trigger, result, std::chrono::duration<double>(SteadyClock::now() - start).count());
  };
  if (!IsValidAdapterName(spec.name)) {
    count("refused");
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter name \"", spec.name, "\" must be 1-64 characters of letters, digits, '.', '_', '-'"));
  }
  auto dir = ResolveAdapterPath(ctx_.adapter_root, spec.path);
  if (!dir.ok()) {
    count("refused");
    return dir.status();
  }
  adapters::AdapterReport report;
  const adapters::AdapterFileRules rules{ctx_.adapter_root,
                                         static_cast<uint64_t>(ctx_.table->limits().max_bytes),
                                         options_.bf16_factors, ctx_.model_dir};
  auto adapter = adapters::LoadAdapterFor(*ctx_.engine, *dir, spec.name, &report, rules);
  report.path = spec.path;
  ToProto(report, response->mutable_report());
  if (!adapter.ok()) {
    count("refused");
    spdlog::warn("adapter {} from {} refused: {}", spec.name, spec.path, std::string(adapter.status().message()));
    return adapter.status();
  }
  if (spec.validate_only) {
    count("validated");
    return adapters::AdapterRef();
  }
  if (may_publish && !may_publish()) {
    return absl::DeadlineExceededError("the load was abandoned before it could be published");
  }
  adapters::AdapterTable::InsertOptions insert;
  insert.replace = spec.replace;
  insert.pinned = spec.pin;
  insert.evict_idle = options_.load_on_demand;
  auto evicted = ctx_.table->Insert(*adapter, insert);
  // On demand, a full table whose other adapters are in use makes room as their requests end:
  // wait for that (bounded by the load timeout), unless the pinned ones alone leave no room.
  while (spec.trigger == LoadTrigger::kOnDemand && absl::IsResourceExhausted(evicted.status()) &&
         FitsBesidePinned(*adapter) && (!still_wanted || still_wanted())) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    evicted = ctx_.table->Insert(*adapter, insert);
  }
  if (!evicted.ok()) {
    count("refused");
    return evicted.status();
  }
  response->set_loaded(true);
  count("loaded");
  if (!evicted->empty()) {
    int64_t freed = 0;
    for (const adapters::AdapterRef& e : *evicted) {
      ctx_.metrics.AdapterEvicted();
      spdlog::info("adapter {} evicted (least recently used) to make room for {}", adapters::ReportOf(e).name,
                   spec.name);
      freed += adapters::ReportOf(e).bytes;
    }
    // Nobody else held them: this frees their weights. Under churn malloc keeps freed blocks
    // in its arenas (RSS above the resident set), so they are handed back to the system, but
    // only once an eighth of the resident set's bytes (at least 16 MB) has been freed:
    // malloc_trim walks every arena under its lock, stalling the steps' allocations, and
    // after every eviction it ran hundreds of times per minute of churn.
    evicted->clear();
    const int64_t threshold = std::max<int64_t>(ctx_.table->bytes() / 8, int64_t{16} << 20);
    if (freed_since_trim_.fetch_add(freed) + freed >= threshold && freed_since_trim_.exchange(0) >= threshold) {
      ::malloc_trim(0);
    }
  }
  PublishMetrics();
  {
    absl::MutexLock lock(&mu_);
    failures_.erase(spec.name);
  }
  spdlog::info("adapter {} ({}) loaded from {} ({}{}) in {:.3f} s, {} bytes", spec.name, report.type, spec.path,
               trigger, spec.pin ? ", pinned" : "", report.load_seconds, report.bytes);
  return *adapter;
}

absl::StatusOr<int64_t> AdapterResidency::Unload(const std::string& name) {
  auto removed = ctx_.table->Remove(name);
  if (!removed.ok()) {
    ctx_.metrics.AdapterUnload("not_found");
    return removed.status();
  }
  const int64_t in_flight = removed->use_count() - 1;
  ctx_.metrics.AdapterUnload("unloaded");
  PublishMetrics();
  spdlog::info("adapter {} unloaded ({} in-flight references)", name, in_flight);
  return in_flight;
}

absl::StatusOr<AdapterResidency::Resolved> AdapterResidency::Resolve(const std::string& name) {
  Resolved out;
  out.adapter = ctx_.table->Acquire(name);
  if (out.adapter != nullptr) return out;
  auto not_loaded = [&name](absl::string_view why) {
    return absl::NotFoundError(absl::StrCat("adapter \"", name, "\" is not loaded", why));
  };
  if (!options_.load_on_demand) return not_loaded("");
  // Names are folder names directly under the root: no hidden folders, "." or "..".
  if (!IsValidAdapterName(name) || name[0] == '.') {
    return not_loaded(" and is not the name of an adapter folder");
  }
  {
    absl::MutexLock lock(&mu_);
    if (auto it = loading_.find(name); it != loading_.end()) {
      out.wait = it->second;
      return out;
    }
    // A load that finished since the miss above published before it left `loading_`.
    out.adapter = ctx_.table->Acquire(name);
    if (out.adapter != nullptr) return out;
    if (auto it = failures_.find(name); it != failures_.end()) {
      if (SteadyClock::now() < it->second.until) return it->second.status;
      failures_.erase(it);
    }
    out.wait = std::make_shared<AdapterWait>(name);
    loading_[name] = out.wait;
  }
  StartLoad(out.wait);
  return out;
}

void AdapterResidency::StartLoad(const std::shared_ptr<AdapterWait>& wait) {
  AdminWorker::Job job;
  job.timeout = options_.load_timeout;
  std::shared_ptr<std::atomic<bool>> claim = job.claim;
  job.run = [this, wait, claim] {
    v1::LoadAdapterResponse response;
    LoadSpec spec;
    spec.name = spec.path = wait->name();
    spec.trigger = LoadTrigger::kOnDemand;
    bool claimed = false;
    // Once claimed, the watchdog no longer answers for the job: the wait for room keeps to the
    // load timeout itself.
    const auto deadline = SteadyClock::now() + options_.load_timeout;
    auto loaded = Load(spec, &response, [&] { return claimed = AdminWorker::Claim(*claim); },
                       [deadline] { return SteadyClock::now() < deadline; });
    if (!loaded.ok() && absl::IsAlreadyExists(loaded.status())) {
      // An admin call published it meanwhile: use that one.
      if (adapters::AdapterRef now = ctx_.table->Acquire(wait->name())) loaded = now;
    }
    if (!claimed && !AdminWorker::Claim(*claim)) return;  // Abandoned: that settled the wait.
    Settle(wait, loaded.status(), loaded.ok() ? *loaded : nullptr);
  };
  const double timeout_s = std::chrono::duration<double>(options_.load_timeout).count();
  job.abandon = [this, wait, timeout_s](bool shutting_down) {
    if (shutting_down) {
      Settle(wait, absl::UnavailableError("the server is shutting down"), nullptr);
      return;
    }
    spdlog::error("on-demand load of adapter {} did not finish within {} s; abandoned", wait->name(), timeout_s);
    ctx_.metrics.AdapterLoad("on_demand", "timeout", timeout_s);
    Settle(wait,
           absl::DeadlineExceededError(absl::StrCat("loading adapter \"", wait->name(), "\" on demand did not finish within ",
                                                    timeout_s, " s (--adapter_load_timeout_s)")),
           nullptr);
  };
  loader_.Submit(std::move(job));
}

void AdapterResidency::Settle(const std::shared_ptr<AdapterWait>& wait, const absl::Status& status,
                              adapters::AdapterRef adapter) {
  wait->Settle(status, std::move(adapter));
  std::function<void()> hook;
  {
    absl::MutexLock lock(&mu_);
    if (auto it = loading_.find(wait->name()); it != loading_.end() && it->second == wait) loading_.erase(it);
    // Shutdown and a full table are not the adapter's fault: they are not remembered.
    if (!status.ok() && !absl::IsUnavailable(status) && !absl::IsResourceExhausted(status) &&
        options_.failure_ttl.count() > 0) {
      const auto now = SteadyClock::now();
      if (failures_.size() >= options_.max_remembered_failures) {
        for (auto it = failures_.begin(); it != failures_.end();) {
          it = it->second.until <= now ? failures_.erase(it) : std::next(it);
        }
      }
      if (failures_.size() >= options_.max_remembered_failures) {
        auto oldest = std::min_element(failures_.begin(), failures_.end(), [](const auto& a, const auto& b) {
          return a.second.until < b.second.until;
        });
        failures_.erase(oldest);
      }
      failures_[wait->name()] = Failure{status, now + options_.failure_ttl};
    }
    hook = settled_hook_;
  }
  if (hook) hook();
}

std::vector<v1::AdapterState> AdapterResidency::States(bool include_on_disk) const {
  std::map<std::string, v1::AdapterState> states;
  for (const auto& e : ctx_.table->Entries()) {
    const adapters::AdapterReport& report = adapters::ReportOf(e.adapter);
    v1::AdapterState& s = states[report.name];
    s.set_name(report.name);
    s.set_state(v1::AdapterState::RESIDENT);
    s.set_pinned(e.pinned);
    s.set_bytes(report.bytes);
    s.set_hits(e.hits);
    s.set_last_used_unix_seconds(UnixSeconds(e.last_use_ns));
    s.set_loaded_unix_seconds(UnixSeconds(e.inserted_ns));
    // This copy and the table's own are not requests'.
    s.set_in_use(std::max<int64_t>(0, e.adapter.use_count() - 2));
  }
  {
    absl::MutexLock lock(&mu_);
    const auto now = SteadyClock::now();
    for (const auto& [name, wait] : loading_) {
      if (states.count(name)) continue;
      v1::AdapterState& s = states[name];
      s.set_name(name);
      s.set_state(v1::AdapterState::LOADING);
    }
    for (const auto& [name, failure] : failures_) {
      if (states.count(name) || failure.until <= now) continue;
      v1::AdapterState& s = states[name];
      s.set_name(name);
      s.set_state(v1::AdapterState::FAILED);
      s.set_error(absl::StrCat(absl::StatusCodeToString(failure.status.code()), ": ", failure.status.message()));
      s.set_retry_after_seconds(std::chrono::duration<double>(failure.until - now).count());
    }
  }
  if (include_on_disk && !ctx_.adapter_root.empty()) {
    if (DIR* dir = ::opendir(ctx_.adapter_root.c_str())) {
      size_t listed = 0;
      while (const dirent* entry = ::readdir(dir)) {
        const std::string name = entry->d_name;
        if (entry->d_type != DT_DIR && entry->d_type != DT_LNK && entry->d_type != DT_UNKNOWN) continue;
        if (name[0] == '.' || !IsValidAdapterName(name) || states.count(name)) continue;
        if (++listed > kMaxListedOnDisk) break;
        v1::AdapterState& s = states[name];
        s.set_name(name);
        s.set_state(v1::AdapterState::ON_DISK);
      }
      ::closedir(dir);
    }
  }
  std::vector<v1::AdapterState> out;
  out.reserve(states.size());
  for (auto& [name, s] : states) out.push_back(std::move(s));
  return out;
}

}  // namespace adapterd::server
