#include "adapters/adapter_table.h"

#include <urcu/urcu-bp.h>

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "adapters/adapter.h"

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
// ThreadSanitizer cannot see liburcu's grace period: tell it that every reader's accesses to
// a snapshot happen before the writer frees it (which synchronize_rcu guarantees).
#define ADAPTERD_RCU_READER_DONE(p) __tsan_release(const_cast<void*>(static_cast<const void*>(p)))
#define ADAPTERD_RCU_GRACE_PERIOD_OVER(p) __tsan_acquire(const_cast<void*>(static_cast<const void*>(p)))
#else
#define ADAPTERD_RCU_READER_DONE(p) (void)(p)
#define ADAPTERD_RCU_GRACE_PERIOD_OVER(p) (void)(p)
#endif

namespace adapterd::adapters {
namespace {

// RAII read-side critical section.
class ReadSection {
 public:
  ReadSection() { urcu_bp_read_lock(); }
  ~ReadSection() { urcu_bp_read_unlock(); }
  ReadSection(const ReadSection&) = delete;
  ReadSection& operator=(const ReadSection&) = delete;
};

}  // namespace

AdapterTable::AdapterTable(Limits limits) : limits_(limits), current_(new Snapshot()) {}

AdapterTable::~AdapterTable() { delete current_.load(std::memory_order_acquire); }

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

AdapterRef AdapterTable::Acquire(absl::string_view name) const {
  AdapterRef ref;
  ReadSection section;
  const Snapshot* s = current_.load(std::memory_order_acquire);
  auto it = s->adapters.find(name);
  if (it != s->adapters.end()) {
    ref = it->second.adapter;
    Usage& usage = *it->second.usage;
    usage.hits.fetch_add(1, std::memory_order_relaxed);
    usage.last_use_ns.store(NowNs(), std::memory_order_relaxed);
  }
  ADAPTERD_RCU_READER_DONE(s);
  return ref;
}

bool AdapterTable::Contains(absl::string_view name) const {
  ReadSection section;
  const Snapshot* s = current_.load(std::memory_order_acquire);
  const bool found = s->adapters.contains(name);
  ADAPTERD_RCU_READER_DONE(s);
  return found;
}

std::vector<AdapterRef> AdapterTable::List() const {
  std::vector<AdapterRef> out;
  for (Entry& e : Entries()) out.push_back(std::move(e.adapter));
  return out;
}

std::vector<AdapterTable::Entry> AdapterTable::Entries() const {
  std::vector<Entry> out;
  {
    ReadSection section;
    const Snapshot* s = current_.load(std::memory_order_acquire);
    for (const auto& [name, slot] : s->adapters) {
      out.push_back(Entry{slot.adapter, slot.pinned, slot.usage->hits.load(std::memory_order_relaxed),
                          slot.usage->last_use_ns.load(std::memory_order_relaxed), slot.usage->inserted_ns});
    }
    ADAPTERD_RCU_READER_DONE(s);
  }
  std::sort(out.begin(), out.end(),
            [](const Entry& a, const Entry& b) { return a.adapter->name() < b.adapter->name(); });
  return out;
}

int64_t AdapterTable::size() const {
  ReadSection section;
  const Snapshot* s = current_.load(std::memory_order_acquire);
  const int64_t n = static_cast<int64_t>(s->adapters.size());
  ADAPTERD_RCU_READER_DONE(s);
  return n;
}

int64_t AdapterTable::bytes() const {
  ReadSection section;
  const Snapshot* s = current_.load(std::memory_order_acquire);
  const int64_t n = s->bytes;
  ADAPTERD_RCU_READER_DONE(s);
  return n;
}

absl::Status AdapterTable::Insert(AdapterRef adapter, bool replace) {
  InsertOptions options;
  options.replace = replace;
  return Insert(std::move(adapter), options).status();
}

absl::StatusOr<std::vector<AdapterRef>> AdapterTable::Insert(AdapterRef adapter,
                                                             const InsertOptions& options) {
  absl::MutexLock lock(&write_mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  const std::string name = adapter->name();
  auto existing = old->adapters.find(name);
  const bool exists = existing != old->adapters.end();
  if (exists && !options.replace) {
    return absl::AlreadyExistsError(absl::StrCat("adapter \"", name, "\" is already loaded"));
  }
  int64_t count = static_cast<int64_t>(old->adapters.size()) + (exists ? 0 : 1);
  int64_t bytes = old->bytes + adapter->bytes() - (exists ? existing->second.adapter->bytes() : 0);
  std::vector<AdapterRef> evicted;
  int64_t held = 0;  // Entries that may not be evicted.
  if (options.evict_idle && (count > limits_.max_adapters || bytes > limits_.max_bytes)) {
    // Candidates: not pinned, not the one replaced, and held only by this snapshot (old
    // snapshots are freed before a writer returns, so one reference means nobody else's).
    std::vector<std::pair<int64_t, const Slot*>> idle;
    for (const auto& [n, slot] : old->adapters) {
      if (n == name) continue;
      if (slot.pinned || slot.adapter.use_count() > 1) {
        ++held;
        continue;
      }
      idle.emplace_back(slot.usage->last_use_ns.load(std::memory_order_relaxed), &slot);
    }
    std::sort(idle.begin(), idle.end(), [](const auto& a, const auto& b) {
      return a.first != b.first ? a.first < b.first : a.second->adapter->name() < b.second->adapter->name();
    });
    for (const auto& [last_use, slot] : idle) {
      if (count <= limits_.max_adapters && bytes <= limits_.max_bytes) break;
      evicted.push_back(slot->adapter);
      --count;
      bytes -= slot->adapter->bytes();
    }
  }
  const std::string why =
      options.evict_idle ? absl::StrCat("; ", held, " of them are pinned or in use") : std::string();
  if (count > limits_.max_adapters) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot load adapter \"", name, "\": ", old->adapters.size(),
                     " adapters are loaded and the limit is ", limits_.max_adapters, why));
  }
  if (bytes > limits_.max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot load adapter \"", name, "\" (", adapter->bytes(), " bytes): adapters would hold ",
        bytes, " bytes and the limit is ", limits_.max_bytes, why));
  }
  auto next = std::make_unique<Snapshot>(*old);
  for (const AdapterRef& e : evicted) next->adapters.erase(e->name());
  Slot& slot = next->adapters[name];
  slot.adapter = std::move(adapter);
  slot.pinned = options.pinned;
  slot.usage = std::make_shared<Usage>();
  slot.usage->inserted_ns = NowNs();
  slot.usage->last_use_ns.store(slot.usage->inserted_ns, std::memory_order_relaxed);
  next->bytes = bytes;
  Publish(std::move(next));
  return evicted;
}

absl::StatusOr<AdapterRef> AdapterTable::Remove(absl::string_view name) {
  absl::MutexLock lock(&write_mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  auto it = old->adapters.find(name);
  if (it == old->adapters.end()) {
    return absl::NotFoundError(absl::StrCat("adapter \"", name, "\" is not loaded"));
  }
  AdapterRef removed = it->second.adapter;
  auto next = std::make_unique<Snapshot>(*old);
  next->adapters.erase(std::string(name));
  next->bytes -= removed->bytes();
  Publish(std::move(next));
  return removed;
}

void AdapterTable::Publish(std::unique_ptr<Snapshot> next) {
  if (publish_hook_) publish_hook_();
  const Snapshot* old = current_.exchange(next.release(), std::memory_order_acq_rel);
  urcu_bp_synchronize_rcu();  // Every reader that could see `old` has left.
  ADAPTERD_RCU_GRACE_PERIOD_OVER(old);
  delete old;
}

void AdapterTable::SetPublishHookForTesting(std::function<void()> hook) {
  absl::MutexLock lock(&write_mu_);
  publish_hook_ = std::move(hook);
}

}  // namespace adapterd::adapters
