#include "server/admin_worker.h"

namespace adapterd::server {

AdminWorker::AdminWorker(std::function<void()> thread_setup)
    : state_(std::make_shared<State>()) {
  state_->thread_setup = std::move(thread_setup);
  {
    std::lock_guard<std::mutex> lock(state_->mu);
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
    std::lock_guard<std::mutex> lock(s.mu);
    s.stop = true;
    queued.swap(s.queue);
  }
  s.cv.notify_all();
  watchdog_.join();
  for (Job& job : queued) {
    if (Claim(*job.claim)) job.abandon(/*shutting_down=*/true);
  }
  std::unique_lock<std::mutex> lock(s.mu);
  // A job about to finish (a load takes milliseconds) may; a stuck one is left behind.
  s.cv.wait_for(lock, std::chrono::seconds(1), [&] { return s.current == nullptr; });
  std::shared_ptr<Job> current = s.current;
  if (current != nullptr && Claim(*current->claim)) {
    // Still inside a job: answer its caller and leave the thread behind.
    s.abandoned.fetch_add(1);
    s.retired_running.fetch_add(1);
    ++s.generation;
    s.worker.detach();
    lock.unlock();
    current->abandon(/*shutting_down=*/true);
    return true;
  }
  std::thread worker = std::move(s.worker);
  lock.unlock();
  s.cv.notify_all();
  if (worker.joinable()) worker.join();
  return s.retired_running.load() > 0;
}

void AdminWorker::Submit(Job job) {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    if (!state_->stop) {
      state_->queue.push_back(std::move(job));
      state_->cv.notify_all();
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
  std::unique_lock<std::mutex> lock(s->mu);
  while (true) {
    s->cv.wait(lock, [&] { return s->stop || !s->queue.empty() || s->generation != generation; });
    if (s->generation != generation || s->stop) break;
    s->current = std::make_shared<Job>(std::move(s->queue.front()));
    s->queue.pop_front();
    s->deadline = std::chrono::steady_clock::now() + s->current->timeout;
    std::shared_ptr<Job> job = s->current;
    s->cv.notify_all();  // The watchdog learns the deadline.
    lock.unlock();
    job->run();
    lock.lock();
    if (s->generation != generation) break;  // Retired while inside the job.
    s->current.reset();
    s->cv.notify_all();
  }
  const bool retired = s->generation != generation;
  lock.unlock();
  if (retired) s->retired_running.fetch_sub(1);
}

void AdminWorker::Watch(std::shared_ptr<State> s) {
  std::unique_lock<std::mutex> lock(s->mu);
  while (!s->stop) {
    if (s->current == nullptr) {
      s->cv.wait(lock);
      continue;
    }
    std::shared_ptr<Job> job = s->current;
    if (s->cv.wait_until(lock, s->deadline, [&] { return s->stop || s->current != job; })) {
      continue;
    }
    if (!Claim(*job->claim)) {  // It is answering right now and ends on its own.
      s->cv.wait(lock, [&] { return s->stop || s->current != job; });
      continue;
    }
    // Retire the stuck thread and give the queue a fresh one.
    s->abandoned.fetch_add(1);
    s->retired_running.fetch_add(1);
    s->current.reset();
    s->worker.detach();
    StartThread(s);
    lock.unlock();
    job->abandon(/*shutting_down=*/false);
    lock.lock();
  }
}

}  // namespace adapterd::server
