// Runs admin jobs (adapter loads and unloads) one at a time on a low-priority thread, so that
// they never run on gRPC threads or the scheduler. A job still running at its deadline is
// abandoned: its caller is answered at once through the job's `abandon` callback, the thread
// stuck in it is retired (it exits once the job returns) and a fresh thread takes the queue,
// so one stuck load never blocks the loads and unloads behind it.
//
// Exactly one of `run`'s own answer and `abandon` reaches the caller: both go through
// Job::claim, and `run` must claim before it publishes anything (see Claim()).
//
// Thread-safety: Submit() and the accessors from any thread. Jobs run on worker threads.
#pragma once

#include <atomic>
#include <chrono>
#include <deque>
#include <functional>
#include <memory>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace adapterd::server {

// Lowers the calling thread's priority so that the file reading and copying of adapter loads
// never stalls the model's steps (see admin_worker.cc).
void LowerThreadPriority();

class AdminWorker {
 public:
  struct Job {
    // Does the work. Before answering or publishing, it calls Claim(*claim) and stops without
    // effect when that returns false (the job was abandoned meanwhile).
    std::function<void()> run;
    // Answers the caller of an abandoned job (deadline passed, or the worker shut down);
    // `shutting_down` tells which.
    std::function<void(bool shutting_down)> abandon;
    std::chrono::steady_clock::duration timeout = std::chrono::seconds(30);
    std::shared_ptr<std::atomic<bool>> claim = std::make_shared<std::atomic<bool>>(false);
  };

  // `thread_setup` runs first on every worker thread (priority settings).
  explicit AdminWorker(std::function<void()> thread_setup);
  // Shutdown(), if not done yet.
  ~AdminWorker();

  // Refuses new jobs, answers every queued job as shut down, gives the job in progress a
  // second to end and otherwise answers it as shut down too (its thread is left inside it),
  // and joins the rest. Returns true when some thread is
  // still inside an abandoned job: the caller must then not destroy what jobs use, and should
  // end the process instead (an abandoned load holds nothing worth saving). Idempotent.
  bool Shutdown();

  void Submit(Job job);
  // True once: the caller is the one that answers (see the class comment).
  static bool Claim(std::atomic<bool>& claim) { return !claim.exchange(true); }
  // Jobs abandoned so far, and whether a retired thread may still be inside one.
  int64_t abandoned() const { return state_->abandoned.load(); }
  bool retired_thread_running() const { return state_->retired_running.load() > 0; }

 private:
  // Shared with the threads, so that a retired thread left inside a job past this object's
  // life still finds its bookkeeping.
  struct State {
    std::function<void()> thread_setup;
    absl::Mutex mu;
    std::deque<Job> queue ABSL_GUARDED_BY(mu);
    std::shared_ptr<Job> current ABSL_GUARDED_BY(mu);  // The job running now.
    absl::Time deadline ABSL_GUARDED_BY(mu);           // Of `current`.
    uint64_t generation ABSL_GUARDED_BY(mu) = 0;       // The live worker thread's.
    bool stop ABSL_GUARDED_BY(mu) = false;
    std::thread worker ABSL_GUARDED_BY(mu);            // The live worker thread.
    std::atomic<int64_t> abandoned{0};
    std::atomic<int> retired_running{0};
  };
  static void StartThread(const std::shared_ptr<State>& s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu);
  static void Work(std::shared_ptr<State> s, uint64_t generation);
  static void Watch(std::shared_ptr<State> s);

  std::shared_ptr<State> state_;
  std::thread watchdog_;
};

}  // namespace adapterd::server
