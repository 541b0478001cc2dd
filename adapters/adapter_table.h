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
// Residency: each entry records when it was last acquired and how often (relaxed atomics the
// readers bump without a lock) and whether it is pinned. An insert that needs room may evict
// the least recently used entries that are not pinned and that no one else holds (only the
// table's own reference is left): what a request holds is never taken from it.
//
// Thread-safety: Acquire(), Contains(), List(), Entries(), size() and bytes() from any thread,
// concurrently with everything. Insert() and Remove() from any thread; they are serialised
// among themselves.
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

  struct InsertOptions {
    // Swap out an adapter of the same name in the same atomic step (requests already holding
    // it keep it). Otherwise a taken name is AlreadyExists.
    bool replace = false;
    // Never evicted.
    bool pinned = false;
    // When over the limits, evict least-recently-used idle unpinned entries to make room.
    bool evict_idle = false;
  };
  // One entry as List() sees it, with its use.
  struct Entry {
    AdapterRef adapter;
    bool pinned = false;
    int64_t hits = 0;           // Acquire() calls that returned it.
    int64_t last_use_ns = 0;    // steady_clock ns of the last Acquire() (or of the insert).
    int64_t inserted_ns = 0;    // steady_clock ns of the insert.
  };

  explicit AdapterTable(Limits limits);
  // Precondition: no thread is inside a method of the table.
  ~AdapterTable();
  AdapterTable(const AdapterTable&) = delete;
  AdapterTable& operator=(const AdapterTable&) = delete;

  // Returns a counted reference to the adapter named `name`, or null, and counts the use.
  // Lock-free.
  AdapterRef Acquire(absl::string_view name) const;
  // Whether `name` is loaded, without counting a use. Lock-free.
  bool Contains(absl::string_view name) const;
  // Returns every loaded adapter, sorted by name.
  std::vector<AdapterRef> List() const;
  // Returns every entry with its use, sorted by name.
  std::vector<Entry> Entries() const;
  int64_t size() const;
  int64_t bytes() const;
  const Limits& limits() const { return limits_; }

  // Publishes `adapter` under its name. With `replace`, an adapter of that name is swapped
  // out in the same atomic step (requests already holding it keep it). Errors, with the
  // table unchanged: AlreadyExists (name taken and !replace), ResourceExhausted (count or
  // bytes over the limits).
  absl::Status Insert(AdapterRef adapter, bool replace) ABSL_LOCKS_EXCLUDED(write_mu_);
  // Insert with options. With `evict_idle`, entries are evicted (least recently used first,
  // among those not pinned, not being replaced and held by no one but the table) until the new
  // one fits; they leave in the same atomic step and are returned. ResourceExhausted when even
  // that cannot make room (everything else is pinned or in use), with the table unchanged.
  absl::StatusOr<std::vector<AdapterRef>> Insert(AdapterRef adapter, const InsertOptions& options)
      ABSL_LOCKS_EXCLUDED(write_mu_);
  // Removes `name` at once (later Acquire() calls miss it) and returns it; NotFound if absent.
  absl::StatusOr<AdapterRef> Remove(absl::string_view name) ABSL_LOCKS_EXCLUDED(write_mu_);

  // Test hook: runs inside Insert/Remove after the new snapshot is built and before it is
  // published, with the writer lock held.
  void SetPublishHookForTesting(std::function<void()> hook) ABSL_LOCKS_EXCLUDED(write_mu_);

 private:
  // Shared by every snapshot that holds the entry, so uses survive republication.
  struct Usage {
    std::atomic<int64_t> hits{0};
    std::atomic<int64_t> last_use_ns{0};
    int64_t inserted_ns = 0;
  };
  struct Slot {
    AdapterRef adapter;
    std::shared_ptr<Usage> usage;
    bool pinned = false;
  };
  struct Snapshot {
    absl::flat_hash_map<std::string, Slot> adapters;
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
