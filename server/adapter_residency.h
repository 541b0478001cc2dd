// The resident set of adapters above the lock-free table: the one path every load takes
// (admin calls, --preload, on demand), loads on demand when a request names an adapter folder
// that is not resident, evicts least-recently-used idle adapters to make room, remembers
// failed on-demand loads for a while, and reports each adapter's state.
//
// On demand (--load_on_demand): Resolve() of a name that is not resident starts one load on a
// low-priority loader thread of its own (the admin worker's kind, with its timeout) and hands
// every request naming it meanwhile the same AdapterWait; the scheduler parks those requests
// while everyone else keeps running. The folder is the name under the adapter root, with the
// admin loads' confinement rules. A failed load settles every waiter with its error and is
// remembered for `failure_ttl`, so a bad folder is not re-read by every request.
//
// Eviction happens only with on-demand loading on: an evicted adapter comes back on the next
// request that names it. Without it, a full table refuses loads (RESOURCE_EXHAUSTED) as before.
//
// Thread-safety: every method from any thread. Loads publish through the table's writer lock;
// `mu_` guards the loading and failure maps only and is never held while loading.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "adapterd/v1/admin.pb.h"
#include "adapters/adapter_ref.h"
#include "server/adapter_wait.h"
#include "server/admin_worker.h"

namespace adapterd::server {

struct ServingContext;

struct ResidencyOptions {
  bool load_on_demand = false;
  // How long a failed on-demand load answers requests without a retry.
  std::chrono::steady_clock::duration failure_ttl = std::chrono::seconds(10);
  // On-demand loads still running after this are abandoned (DEADLINE_EXCEEDED).
  std::chrono::steady_clock::duration load_timeout = std::chrono::seconds(30);
  // Failures remembered at most (the oldest go first).
  size_t max_remembered_failures = 4096;
  // --adapter_dtype bfloat16: LoRA factors of every file are held in bfloat16.
  bool bf16_factors = false;
};

// What made a load happen (the `trigger` label of adapterd_adapter_loads_total).
enum class LoadTrigger { kAdmin, kPreload, kOnDemand };
const char* LoadTriggerName(LoadTrigger trigger);

struct LoadSpec {
  std::string name;
  std::string path;  // Relative to the adapter root.
  bool validate_only = false;
  bool replace = false;
  bool pin = false;
  LoadTrigger trigger = LoadTrigger::kAdmin;
};

class AdapterResidency {
 public:
  AdapterResidency(ServingContext& ctx, ResidencyOptions options);
  // Shutdown(), if not done yet.
  ~AdapterResidency();
  AdapterResidency(const AdapterResidency&) = delete;
  AdapterResidency& operator=(const AdapterResidency&) = delete;

  bool load_on_demand() const { return options_.load_on_demand; }

  // A request's adapter: resident (`adapter` set, its use counted) or loading (`wait` set).
  struct Resolved {
    adapters::AdapterRef adapter;
    std::shared_ptr<AdapterWait> wait;
  };
  // NotFound when `name` is not resident and cannot be loaded on demand; the remembered
  // error of a recent failed load of it.
  absl::StatusOr<Resolved> Resolve(const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);

  // Loads `spec` synchronously on the calling thread (see AdminService::Load). When given,
  // `may_publish` is asked right before the adapter enters the table; false leaves the table
  // untouched. Returns the published adapter (null for validate_only). An on-demand load that
  // finds the table full of adapters in use waits for room while `still_wanted()` holds.
  absl::StatusOr<adapters::AdapterRef> Load(const LoadSpec& spec, adapterd::v1::LoadAdapterResponse* response,
                                            const std::function<bool()>& may_publish = nullptr,
                                            const std::function<bool()>& still_wanted = nullptr)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Removes `name`; returns the references requests in flight still hold.
  absl::StatusOr<int64_t> Unload(const std::string& name);

  // Every known adapter's state, sorted by name; with `include_on_disk`, also the folders
  // under the adapter root that are not resident.
  std::vector<adapterd::v1::AdapterState> States(bool include_on_disk) const ABSL_LOCKS_EXCLUDED(mu_);

  // Called (on the loader thread, with no lock held) whenever an on-demand load settles.
  void SetSettledHook(std::function<void()> hook) ABSL_LOCKS_EXCLUDED(mu_);

  // Stops the loader (see AdminWorker::Shutdown): true when a thread was left inside an
  // abandoned load.
  bool Shutdown() { return loader_.Shutdown(); }

 private:
  struct Failure {
    absl::Status status;
    std::chrono::steady_clock::time_point until;
  };
  void StartLoad(const std::shared_ptr<AdapterWait>& wait) ABSL_LOCKS_EXCLUDED(mu_);
  void Settle(const std::shared_ptr<AdapterWait>& wait, const absl::Status& status,
              adapters::AdapterRef adapter) ABSL_LOCKS_EXCLUDED(mu_);
  void PublishMetrics();
  // Whether `adapter` fits in the limits beside the pinned adapters alone.
  bool FitsBesidePinned(const adapters::AdapterRef& adapter) const;

  ServingContext& ctx_;
  const ResidencyOptions options_;
  std::atomic<int64_t> freed_since_trim_{0};  // Evicted bytes not yet handed back (malloc_trim).
  mutable absl::Mutex mu_;
  std::map<std::string, std::shared_ptr<AdapterWait>> loading_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Failure> failures_ ABSL_GUARDED_BY(mu_);
  std::function<void()> settled_hook_ ABSL_GUARDED_BY(mu_);
  AdminWorker loader_;
};

}  // namespace adapterd::server
