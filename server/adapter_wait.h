// One on-demand adapter load as the requests waiting for it see it: shared by every request
// that named the adapter while it loaded, settled once with the adapter or with the load's
// error. The scheduler polls it for the requests it has parked (see Scheduler::Submit).
//
// Thread-safety: Settle() from the loader, Poll() from any thread.
#pragma once

#include <chrono>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "adapters/adapter_ref.h"

namespace adapterd::server {

class AdapterWait {
 public:
  explicit AdapterWait(std::string name) : name_(std::move(name)) {}

  const std::string& name() const { return name_; }
  std::chrono::steady_clock::time_point started() const { return started_; }

  // Settles the wait: `adapter` on success, else the error. Only the first call counts.
  void Settle(const absl::Status& status, adapters::AdapterRef adapter) ABSL_LOCKS_EXCLUDED(mu_) {
    absl::MutexLock lock(&mu_);
    if (done_) return;
    done_ = true;
    status_ = status;
    adapter_ = std::move(adapter);
  }
  // Blocks until the load settles, then gives its outcome. Every load settles: it finishes, is
  // abandoned at its timeout, or is answered at shutdown.
  void Await(absl::Status* status, adapters::AdapterRef* adapter) const ABSL_LOCKS_EXCLUDED(mu_) {
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
  const std::string name_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  mutable absl::Mutex mu_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
  absl::Status status_ ABSL_GUARDED_BY(mu_);
  adapters::AdapterRef adapter_ ABSL_GUARDED_BY(mu_);
};

}  // namespace adapterd::server
