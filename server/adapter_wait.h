// One on-demand adapter load as the requests waiting for it see it: shared by every request
// that named the adapter while it loaded, settled once with the adapter or with the load's
// error. The scheduler polls it for the requests it has parked (see Scheduler::Submit).
// A wait built by AllOf() stands for several (a weighted mix with a part loading): it settles
// once every part has, with the first failed part's error or what its `combine` makes of the
// parts' adapters, computed on the thread that settled the last part.
//
// Thread-safety: Settle() from the loader, Poll() and Await() from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "adapters/adapter_ref.h"

namespace adapterd::server {

class AdapterWait {
 public:
  using Combine =
      std::function<absl::StatusOr<adapters::AdapterRef>(const std::vector<adapters::AdapterRef>&)>;

  explicit AdapterWait(std::string name) : name_(std::move(name)) {}

  // A wait settled from the start (a resident part of a mix).
  static std::shared_ptr<AdapterWait> Settled(std::string name, adapters::AdapterRef adapter) {
    auto w = std::make_shared<AdapterWait>(std::move(name));
    w->Settle(absl::OkStatus(), std::move(adapter));
    return w;
  }
  // A wait for every one of `parts`; see the class comment. `combine` runs once, on the
  // thread that settles the last part (the on-demand loader, at low priority), or here when
  // every part has settled already: never on the scheduler thread, under its lock.
  static std::shared_ptr<AdapterWait> AllOf(std::string name, std::vector<std::shared_ptr<AdapterWait>> parts,
                                            Combine combine) {
    auto w = std::make_shared<AdapterWait>(std::move(name));
    w->parts_ = std::move(parts);
    w->combine_ = std::move(combine);
    for (const auto& part : w->parts_) {
      part->OnSettle([weak = std::weak_ptr<AdapterWait>(w)] {
        if (auto whole = weak.lock()) whole->TryCombine();
      });
    }
    return w;
  }

  const std::string& name() const { return name_; }
  std::chrono::steady_clock::time_point started() const { return started_; }

  // Settles the wait: `adapter` on success, else the error. Only the first call counts.
  void Settle(const absl::Status& status, adapters::AdapterRef adapter) ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<std::function<void()>> callbacks;
    {
      absl::MutexLock lock(&mu_);
      if (done_) return;
      done_ = true;
      status_ = status;
      adapter_ = std::move(adapter);
      callbacks.swap(on_settle_);
    }
    for (auto& f : callbacks) f();
  }
  // Runs `f` once the wait has settled: now (on this thread) if it has, else on the thread that
  // settles it, after the outcome is set and with no lock held.
  void OnSettle(std::function<void()> f) ABSL_LOCKS_EXCLUDED(mu_) {
    {
      absl::MutexLock lock(&mu_);
      if (!done_) {
        on_settle_.push_back(std::move(f));
        return;
      }
    }
    f();
  }
  // Blocks until the load settles, then gives its outcome. Every load settles: it finishes, is
  // abandoned at its timeout, or is answered at shutdown.
  void Await(absl::Status* status, adapters::AdapterRef* adapter) const ABSL_LOCKS_EXCLUDED(mu_) {
    for (const auto& part : parts_) {
      absl::Status s;
      adapters::AdapterRef a;
      part->Await(&s, &a);
    }
    if (!parts_.empty()) TryCombine();
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&done_));
    *status = status_;
    *adapter = adapter_;
  }
  // False while the load runs; then true with its outcome.
  bool Poll(absl::Status* status, adapters::AdapterRef* adapter) const ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (!done_) return false;
    *status = status_;
    *adapter = adapter_;
    return true;
  }

 private:
  // Settles a wait of parts once every part has (nothing while one still loads), then runs
  // its own callbacks.
  void TryCombine() const ABSL_LOCKS_EXCLUDED(mu_) {
    std::vector<std::function<void()>> callbacks;
    {
      absl::MutexLock lock(&mu_);
      CombineLocked();
      if (done_) callbacks.swap(on_settle_);
    }
    for (auto& f : callbacks) f();
  }
  void CombineLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (done_) return;
    std::vector<adapters::AdapterRef> adapters;
    absl::Status failed;
    for (const auto& part : parts_) {
      absl::Status s;
      adapters::AdapterRef a;
      if (!part->Poll(&s, &a)) return;
      if (!s.ok() && failed.ok()) failed = s;
      adapters.push_back(std::move(a));
    }
    done_ = true;
    if (!failed.ok()) {
      status_ = failed;
      return;
    }
    absl::StatusOr<adapters::AdapterRef> combined = combine_(adapters);
    status_ = combined.status();
    if (combined.ok()) adapter_ = *std::move(combined);
  }

  const std::string name_;
  // Set by AllOf() only, before the wait is shared.
  std::vector<std::shared_ptr<AdapterWait>> parts_;
  Combine combine_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  mutable absl::Mutex mu_;
  // Mutable: a wait of parts settles inside Poll() and Await().
  mutable bool done_ ABSL_GUARDED_BY(mu_) = false;
  mutable absl::Status status_ ABSL_GUARDED_BY(mu_);
  mutable adapters::AdapterRef adapter_ ABSL_GUARDED_BY(mu_);
  mutable std::vector<std::function<void()>> on_settle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace adapterd::server
