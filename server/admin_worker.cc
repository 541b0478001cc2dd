#include "server/admin_worker.h"

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace adapterd::server {
namespace {
// The kernel's struct sched_attr (SCHED_ATTR_SIZE_VER1), which glibc does not declare.
struct SchedAttr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;
  uint64_t sched_deadline;
  uint64_t sched_period;
  uint32_t sched_util_min;
  uint32_t sched_util_max;
};

}  // namespace

// Loading reads, checks and copies files: a few ms of CPU that must not stall the model's
// steps (a parallel step waits for its slowest thread). At nice 19 the thread takes little CPU
// while the cores are busy, and with a 100 µs slice (Linux >= 6.12 EEVDF; older kernels ignore
// it) a waking step thread preempts it at once instead of after a full 3 ms slice.
// (SCHED_IDLE would protect the steps too, but starves loads for seconds.)
void LowerThreadPriority() {
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 19);
  SchedAttr attr{};
  attr.size = sizeof(attr);
  attr.sched_policy = SCHED_OTHER;
  attr.sched_nice = 19;
  attr.sched_runtime = 100 * 1000;  // ns
  (void)::syscall(SYS_sched_setattr, 0, &attr, 0);
}

AdminWorker::AdminWorker(std::function<void()> thread_setup)
    : state_(std::make_shared<State>()) {
  state_->thread_setup = std::move(thread_setup);
  {
    absl::MutexLock lock(&state_->mu);
    StartThread(state_);
  }
  watchdog_ = std::thread([s = state_] { Watch(s); });
}

AdminWorker::~AdminWorker() { Shutdown(); }

bool AdminWorker::Shutdown() {
  State& s = *state_;
  if (!watchdog_.joinable()) return s.retired_running.load() > 0;
  std::deque<Job> queued;
  {
    absl::MutexLock lock(&s.mu);
    s.stop = true;
    queued.swap(s.queue);
  }
  watchdog_.join();
  for (Job& job : queued) {
    if (Claim(*job.claim)) job.abandon(/*shutting_down=*/true);
  }
  std::shared_ptr<Job> current;
  std::thread worker;
  {
    absl::MutexLock lock(&s.mu);
    // A job about to finish (a load takes milliseconds) may; a stuck one is left behind.
    auto idle = [&s]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s.mu) { return s.current == nullptr; };
    s.mu.AwaitWithTimeout(absl::Condition(&idle), absl::Seconds(1));
    current = s.current;
    if (current != nullptr && Claim(*current->claim)) {
      // Still inside a job: answer its caller and leave the thread behind.
      s.abandoned.fetch_add(1);
      s.retired_running.fetch_add(1);
      ++s.generation;
      s.worker.detach();
    } else {
      current = nullptr;
      worker = std::move(s.worker);
    }
  }
  if (current != nullptr) {
    current->abandon(/*shutting_down=*/true);
    return true;
  }
  if (worker.joinable()) worker.join();
  return s.retired_running.load() > 0;
}

void AdminWorker::Submit(Job job) {
  {
    absl::MutexLock lock(&state_->mu);
    if (!state_->stop) {
      state_->queue.push_back(std::move(job));
      return;
    }
  }
  if (Claim(*job.claim)) job.abandon(/*shutting_down=*/true);
}

void AdminWorker::StartThread(const std::shared_ptr<State>& s) {
  const uint64_t generation = ++s->generation;
  s->worker = std::thread([s, generation] { Work(s, generation); });
}

void AdminWorker::Work(std::shared_ptr<State> s, uint64_t generation) {
  s->thread_setup();
  bool retired = false;
  while (true) {
    std::shared_ptr<Job> job;
    {
      absl::MutexLock lock(&s->mu);
      auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
        return s->stop || !s->queue.empty() || s->generation != generation;
      };
      s->mu.Await(absl::Condition(&ready));
      retired = s->generation != generation;
      if (retired || s->stop) break;
      job = s->current = std::make_shared<Job>(std::move(s->queue.front()));
      s->queue.pop_front();
      s->deadline = absl::Now() + absl::FromChrono(job->timeout);
    }
    job->run();
    absl::MutexLock lock(&s->mu);
    retired = s->generation != generation;
    if (retired) break;  // Abandoned while inside the job: a fresh thread took over.
    s->current.reset();
  }
  if (retired) s->retired_running.fetch_sub(1);
}

void AdminWorker::Watch(std::shared_ptr<State> s) {
  while (true) {
    std::shared_ptr<Job> job;
    {
      absl::MutexLock lock(&s->mu);
      auto busy = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
        return s->stop || s->current != nullptr;
      };
      s->mu.Await(absl::Condition(&busy));
      if (s->stop) return;
      job = s->current;
      auto moved_on = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu) {
        return s->stop || s->current != job;
      };
      if (s->mu.AwaitWithDeadline(absl::Condition(&moved_on), s->deadline)) continue;
      if (!Claim(*job->claim)) {
        // It is answering right now and ends on its own.
        s->mu.Await(absl::Condition(&moved_on));
        continue;
      }
      // Retire the stuck thread and give the queue a fresh one.
      s->abandoned.fetch_add(1);
      s->retired_running.fetch_add(1);
      s->current.reset();
      s->worker.detach();
      StartThread(s);
    }
    job->abandon(/*shutting_down=*/false);
  }
}

}  // namespace adapterd::server
