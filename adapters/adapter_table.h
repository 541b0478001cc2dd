// The table of loaded adapters, read on every request and written only by admin calls.
//
// Reads take no lock and never wait for a writer: the table is an immutable snapshot behind
// one atomic pointer, read inside a userspace-RCU read-side critical section (liburcu's
// bulletproof flavour, which needs no registration of gRPC's threads). A writer builds a new
// snapshot outside the table's view, publishes it with one atomic store, waits for a grace
// period, then frees the old snapshot. Adapters themselves are reference counted: Acquire()
// hands out a counted reference that keeps the weights alive after an unload until the last
// in-flight request drops it.
//
// Thread-safety: Acquire(), List(), size() and bytes() from any thread, concurrently with
// everything. Insert() and Remove() from any thread; they are serialised among themselves.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "adapters/adapter_ref.h"

namespace adapterd::adapters {

class AdapterTable {
 public:
  struct Limits {
    int64_t max_adapters = 64;
    int64_t max_bytes = int64_t{8} << 30;
  };

  explicit AdapterTable(Limits limits);
  // Precondition: no thread is inside a method of the table.
  ~AdapterTable();
  AdapterTable(const AdapterTable&) = delete;
  AdapterTable& operator=(const AdapterTable&) = delete;

  // Returns a counted reference to the adapter named `name`, or null. Lock-free.
  AdapterRef Acquire(absl::string_view name) const;
  // Returns every loaded adapter, sorted by name.
  std::vector<AdapterRef> List() const;
  int64_t size() const;
  int64_t bytes() const;
  const Limits& limits() const { return limits_; }

  // Publishes `adapter` under its name. With `replace`, an adapter of that name is swapped
  // out in the same atomic step (requests already holding it keep it). Errors, with the
  // table unchanged: AlreadyExists (name taken and !replace), ResourceExhausted (count or
  // bytes over the limits).
  absl::Status Insert(AdapterRef adapter, bool replace) ABSL_LOCKS_EXCLUDED(write_mu_);
  // Removes `name` at once (later Acquire() calls miss it) and returns it; NotFound if absent.
  absl::StatusOr<AdapterRef> Remove(absl::string_view name) ABSL_LOCKS_EXCLUDED(write_mu_);

  // Test hook: runs inside Insert/Remove after the new snapshot is built and before it is
  // published, with the writer lock held.
  void SetPublishHookForTesting(std::function<void()> hook) ABSL_LOCKS_EXCLUDED(write_mu_);

 private:
  struct Snapshot {
    absl::flat_hash_map<std::string, AdapterRef> adapters;
    int64_t bytes = 0;
  };

  // Publishes `next` and frees the previous snapshot after a grace period.
  void Publish(std::unique_ptr<Snapshot> next) ABSL_EXCLUSIVE_LOCKS_REQUIRED(write_mu_);

  const Limits limits_;
  std::atomic<const Snapshot*> current_;
  absl::Mutex write_mu_;
  std::function<void()> publish_hook_ ABSL_GUARDED_BY(write_mu_);
};

}  // namespace adapterd::adapters
