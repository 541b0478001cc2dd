#include "server/admin_worker.h"

#include <algorithm>
#include <atomic>
#include <future>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace adapterd::server {
namespace {

using namespace std::chrono_literals;

// What happened to each job, in order, from any thread.
struct Log {
  std::mutex mu;
  std::vector<std::string> events;
  void Add(const std::string& e) {
    std::lock_guard<std::mutex> lock(mu);
    events.push_back(e);
  }
  std::vector<std::string> Get() {
    std::lock_guard<std::mutex> lock(mu);
    return events;
  }
};

AdminWorker::Job Answering(Log& log, const std::string& name,
                           std::function<void()> body = nullptr,
                           std::chrono::steady_clock::duration timeout = 30s) {
  AdminWorker::Job job;
  job.timeout = timeout;
  auto claim = job.claim;
  job.run = [&log, name, claim, body] {
    if (body) body();
    if (AdminWorker::Claim(*claim)) log.Add(name + " done");
  };
  job.abandon = [&log, name](bool shutting_down) {
    log.Add(name + (shutting_down ? " shut down" : " timed out"));
  };
  return job;
}

TEST(AdminWorkerTest, JobsRunOneAtATimeInOrder) {
  Log log;
  std::atomic<int> running{0}, most{0};
  {
    AdminWorker worker([] {});
    std::promise<void> last;
    for (int i = 0; i < 5; ++i) {
      worker.Submit(Answering(log, std::to_string(i), [&] {
        most = std::max(most.load(), ++running);
        std::this_thread::sleep_for(2ms);
        --running;
      }));
    }
    AdminWorker::Job end = Answering(log, "end", [&] { last.set_value(); });
    worker.Submit(std::move(end));
    last.get_future().wait();
    EXPECT_FALSE(worker.Shutdown());
  }
  EXPECT_EQ(log.Get(), (std::vector<std::string>{"0 done", "1 done", "2 done", "3 done",
                                                 "4 done", "end done"}));
  EXPECT_EQ(most.load(), 1);
}

TEST(AdminWorkerTest, AStuckJobIsAbandonedAndTheQueueMovesOn) {
  Log log;
  std::promise<void> release;
  std::shared_future<void> released = release.get_future().share();
  std::promise<void> second_ran;
  AdminWorker worker([] {});
  worker.Submit(Answering(log, "stuck", [released] { released.wait(); }, 50ms));
  worker.Submit(Answering(log, "next", [&] { second_ran.set_value(); }));
  // The second job runs although the first never returned.
  ASSERT_EQ(second_ran.get_future().wait_for(10s), std::future_status::ready);
  EXPECT_EQ(worker.abandoned(), 1);
  EXPECT_TRUE(worker.retired_thread_running());
  release.set_value();  // The stuck job returns now, and must not answer a second time.
  for (int i = 0; i < 500 && worker.retired_thread_running(); ++i) std::this_thread::sleep_for(2ms);
  EXPECT_FALSE(worker.retired_thread_running());
  EXPECT_FALSE(worker.Shutdown());
  auto events = log.Get();
  std::sort(events.begin(), events.end());  // The two answers race each other.
  EXPECT_EQ(events, (std::vector<std::string>{"next done", "stuck timed out"}));
}

TEST(AdminWorkerTest, ShutdownAnswersQueuedJobsAndLeavesAStuckOneBehind) {
  Log log;
  std::promise<void> release, started;
  std::shared_future<void> released = release.get_future().share();
  {
    AdminWorker worker([] {});
    worker.Submit(Answering(log, "stuck", [&started, released] {
      started.set_value();
      released.wait();
    }));
    started.get_future().wait();
    worker.Submit(Answering(log, "queued"));
    EXPECT_TRUE(worker.Shutdown());  // One thread is still inside "stuck".
    worker.Submit(Answering(log, "late"));
  }
  release.set_value();  // The left-behind thread ends without answering again.
  std::this_thread::sleep_for(50ms);
  EXPECT_EQ(log.Get(), (std::vector<std::string>{"queued shut down", "stuck shut down",
                                                 "late shut down"}));
}

TEST(AdminWorkerTest, EveryJobIsAnsweredExactlyOnceUnderTimeoutRaces) {
  // Jobs that take about as long as their timeout: each is answered once, by one side.
  Log log;
  std::atomic<int> finished{0};
  {
    AdminWorker worker([] {});
    for (int i = 0; i < 40; ++i) {
      AdminWorker::Job job = Answering(log, "j" + std::to_string(i), [&, i] {
        std::this_thread::sleep_for(std::chrono::microseconds(200 + 50 * (i % 9)));
        ++finished;
      }, std::chrono::microseconds(400));
      worker.Submit(std::move(job));
    }
    for (int i = 0; i < 2000 && finished.load() < 40; ++i) std::this_thread::sleep_for(2ms);
    worker.Shutdown();
  }
  const auto events = log.Get();
  EXPECT_EQ(events.size(), 40u);
  std::set<std::string> names;
  for (const std::string& e : events) names.insert(e.substr(0, e.find(' ')));
  EXPECT_EQ(names.size(), 40u);
}

}  // namespace
}  // namespace adapterd::server
