#include "adapters/adapter_table.h"

#include <urcu/urcu-bp.h>

#include <algorithm>

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

AdapterRef AdapterTable::Acquire(absl::string_view name) const {
  AdapterRef ref;
  ReadSection section;
  const Snapshot* s = current_.load(std::memory_order_acquire);
  auto it = s->adapters.find(name);
  if (it != s->adapters.end()) ref = it->second;
  ADAPTERD_RCU_READER_DONE(s);
  return ref;
}

std::vector<AdapterRef> AdapterTable::List() const {
  std::vector<AdapterRef> out;
  {
    ReadSection section;
    const Snapshot* s = current_.load(std::memory_order_acquire);
    for (const auto& [name, ref] : s->adapters) out.push_back(ref);
    ADAPTERD_RCU_READER_DONE(s);
  }
  std::sort(out.begin(), out.end(),
            [](const AdapterRef& a, const AdapterRef& b) { return a->name() < b->name(); });
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
  absl::MutexLock lock(&write_mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  const std::string& name = adapter->name();
  auto existing = old->adapters.find(name);
  const bool exists = existing != old->adapters.end();
  if (exists && !replace) {
    return absl::AlreadyExistsError(absl::StrCat("adapter \"", name, "\" is already loaded"));
  }
  const int64_t count = static_cast<int64_t>(old->adapters.size()) + (exists ? 0 : 1);
  const int64_t bytes = old->bytes + adapter->bytes() - (exists ? existing->second->bytes() : 0);
  if (count > limits_.max_adapters) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cannot load adapter \"", name, "\": ", old->adapters.size(),
                     " adapters are loaded and the limit is ", limits_.max_adapters));
  }
  if (bytes > limits_.max_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "cannot load adapter \"", name, "\" (", adapter->bytes(), " bytes): adapters would hold ",
        bytes, " bytes and the limit is ", limits_.max_bytes));
  }
  auto next = std::make_unique<Snapshot>(*old);
  next->adapters[name] = std::move(adapter);
  next->bytes = bytes;
  Publish(std::move(next));
  return absl::OkStatus();
}

absl::StatusOr<AdapterRef> AdapterTable::Remove(absl::string_view name) {
  absl::MutexLock lock(&write_mu_);
  const Snapshot* old = current_.load(std::memory_order_relaxed);
  auto it = old->adapters.find(name);
  if (it == old->adapters.end()) {
    return absl::NotFoundError(absl::StrCat("adapter \"", name, "\" is not loaded"));
  }
  AdapterRef removed = it->second;
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
