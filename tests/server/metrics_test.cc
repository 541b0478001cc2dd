#include "server/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include <atomic>
#include <thread>

#include "httplib.h"

namespace adapterd::server {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(MetricsTest, OnlyLoadedAdaptersBecomeLabelValues) {
  Metrics m;
  m.RequestDone("ghost", "NOT_FOUND", 0, 0, 0, 0, 0);
  m.SetAdapters({{"sql", 1000}});
  m.RequestDone("sql", "OK", 0.5, 0.01, 0.1, 7, 3);
  m.RequestDone("", "OK", 0.5, 0.01, 0.1, 5, 2);
  m.RequestDone("other-ghost", "NOT_FOUND", 0, 0, 0, 0, 0);
  std::string text = m.Scrape();
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"<not loaded>\",code=\"NOT_FOUND\"} 2"));
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"sql\",code=\"OK\"} 1"));
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"\",code=\"OK\"} 1"));
  EXPECT_THAT(text, HasSubstr("adapterd_prompt_tokens_total{adapter=\"sql\"} 7"));
  EXPECT_THAT(text, HasSubstr("adapterd_adapter_bytes{adapter=\"sql\"} 1000"));
  EXPECT_THAT(text, Not(HasSubstr("ghost")));
  // Unloaded: its bytes go, its counters stay, and a request finishing after the unload
  // still counts under its name.
  m.SetAdapters({});
  m.RequestDone("sql", "OK", 0.5, 0.01, 0.1, 7, 3);
  text = m.Scrape();
  EXPECT_THAT(text, Not(HasSubstr("adapterd_adapter_bytes{adapter=\"sql\"}")));
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"sql\",code=\"OK\"} 2"));
  EXPECT_THAT(text, HasSubstr("adapterd_adapters_loaded 0"));
}

TEST(MetricsTest, UnloadedAdaptersKeepTheirSeriesUpToTheRetentionBound) {
  Metrics m;
  m.SetRetainedUnloaded(2);
  for (const std::string name : {"a", "b", "c", "d"}) {
    m.SetAdapters({{name, 10}});
    m.RequestDone(name, "OK", 0.1, 0, 0.1, 1, 1);
  }
  m.SetAdapters({});  // a, b, c, d unloaded in that order: a and b are dropped.
  const std::string text = m.Scrape();
  EXPECT_THAT(text, Not(HasSubstr("adapter=\"a\"")));
  EXPECT_THAT(text, Not(HasSubstr("adapter=\"b\"")));
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"c\",code=\"OK\"} 1"));
  EXPECT_THAT(text, HasSubstr("adapterd_requests_total{adapter=\"d\",code=\"OK\"} 1"));
  // Loading a retained name again continues its counters.
  m.SetAdapters({{"c", 10}});
  m.RequestDone("c", "OK", 0.1, 0, 0.1, 1, 1);
  EXPECT_THAT(m.Scrape(), HasSubstr("adapterd_requests_total{adapter=\"c\",code=\"OK\"} 2"));
}

TEST(MetricsTest, ServesConcurrentScrapesOverHttp) {
  Metrics m;
  auto port = m.Serve("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  std::vector<std::thread> threads;
  std::atomic<int> ok{0};
  for (int i = 0; i < 8; ++i) {
    threads.emplace_back([&] {
      httplib::Client c("127.0.0.1", *port);
      auto res = c.Get("/metrics");
      if (res && res->status == 200 && res->body.find("adapterd_queue_depth") != std::string::npos) {
        ++ok;
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 8);
  httplib::Client c("127.0.0.1", *port);
  auto missing = c.Get("/nope");
  ASSERT_TRUE(missing);
  EXPECT_EQ(missing->status, 404);
  EXPECT_FALSE(m.Serve("not an address").ok());
}

}  // namespace
}  // namespace adapterd::server
