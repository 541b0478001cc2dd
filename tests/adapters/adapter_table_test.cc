// The adapter table's contract: lock-free reads that see either the old or the new adapter,
// never a torn one; writers that fail leave the table as it was; unload keeps in-flight
// references alive. The concurrency tests are meant to run under ThreadSanitizer too.
#include "adapters/adapter_table.h"

#include <atomic>
#include <thread>

#include "absl/synchronization/notification.h"
#include "adapters/adapter.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace adapterd::adapters {
namespace {

using ::testing::HasSubstr;

// An adapter whose every weight equals `version`, so a reader can check it is whole.
AdapterRef MakeAdapter(const std::string& name, int64_t version, int64_t elements = 64) {
  AdapterReport report;
  report.name = name;
  report.path = std::to_string(version);
  AdapterWeights w;
  w.soft_prompt = at::full({elements}, static_cast<float>(version));
  report.bytes = w.soft_prompt.nbytes();
  return std::make_shared<const Adapter>(report, std::move(w));
}

bool Whole(const AdapterRef& a) {
  const float want = static_cast<float>(std::stoll(a->report().path));
  const at::Tensor t = a->soft_prompt();
  const float* p = t.data_ptr<float>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    if (p[i] != want) return false;
  }
  return true;
}

TEST(AdapterTableTest, InsertAcquireRemove) {
  AdapterTable table({4, 1 << 20});
  EXPECT_EQ(table.Acquire("a"), nullptr);
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  AdapterRef a = table.Acquire("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->name(), "a");
  EXPECT_EQ(table.size(), 1);
  EXPECT_EQ(table.bytes(), 64 * 4);
  auto removed = table.Remove("a");
  ASSERT_TRUE(removed.ok());
  EXPECT_EQ(*removed, a);
  EXPECT_EQ(table.Acquire("a"), nullptr);
  EXPECT_EQ(table.Remove("a").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(table.bytes(), 0);
}

TEST(AdapterTableTest, DuplicateNameIsRefusedUnlessReplacing) {
  AdapterTable table({4, 1 << 20});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  absl::Status dup = table.Insert(MakeAdapter("a", 2), false);
  EXPECT_EQ(dup.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(dup.message(), "adapter \"a\" is already loaded");
  EXPECT_EQ(table.Acquire("a")->report().path, "1");
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 2, 128), true).ok());
  EXPECT_EQ(table.Acquire("a")->report().path, "2");
  EXPECT_EQ(table.size(), 1);
  EXPECT_EQ(table.bytes(), 128 * 4);
}

TEST(AdapterTableTest, CapacityByCountAndBytesLeavesTheTableUnchanged) {
  AdapterTable table({2, 1000});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  ASSERT_TRUE(table.Insert(MakeAdapter("b", 1), false).ok());
  absl::Status count = table.Insert(MakeAdapter("c", 1), false);
  EXPECT_EQ(count.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(count.message()), HasSubstr("2 adapters are loaded and the limit is 2"));
  ASSERT_TRUE(table.Remove("b").ok());
  absl::Status bytes = table.Insert(MakeAdapter("big", 1, 200), false);  // 800 + 256 > 1000
  EXPECT_EQ(bytes.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(bytes.message()), HasSubstr("adapters would hold 1056 bytes"));
  EXPECT_EQ(table.size(), 1);
  EXPECT_EQ(table.bytes(), 256);
  EXPECT_EQ(table.Acquire("big"), nullptr);
}

TEST(AdapterTableTest, UnloadKeepsInFlightReferenceAlive) {
  AdapterTable table({4, 1 << 20});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 7), false).ok());
  AdapterRef in_flight = table.Acquire("a");
  std::weak_ptr<const Adapter> weak = in_flight;
  ASSERT_TRUE(table.Remove("a").ok());
  EXPECT_EQ(table.Acquire("a"), nullptr);  // New requests miss it at once.
  EXPECT_FALSE(weak.expired());
  EXPECT_TRUE(Whole(in_flight));
  in_flight.reset();
  EXPECT_TRUE(weak.expired());  // Freed with the last reference.
}

TEST(AdapterTableTest, ReadersProceedWhileAWriterIsHeldMidUpdate) {
  AdapterTable table({4, 1 << 20});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  absl::Notification writer_inside, let_writer_go;
  table.SetPublishHookForTesting([&] {
    writer_inside.Notify();
    let_writer_go.WaitForNotification();
  });
  std::thread writer([&] { ASSERT_TRUE(table.Insert(MakeAdapter("a", 2), true).ok()); });
  writer_inside.WaitForNotification();
  // The writer holds the write lock and has not published: reads complete and see version 1.
  for (int i = 0; i < 1000; ++i) ASSERT_EQ(table.Acquire("a")->report().path, "1");
  EXPECT_EQ(table.List().size(), 1u);
  let_writer_go.Notify();
  writer.join();
  table.SetPublishHookForTesting(nullptr);
  EXPECT_EQ(table.Acquire("a")->report().path, "2");
}

TEST(AdapterTableTest, ConcurrentReadersSeeOldOrNewNeverTorn) {
  AdapterTable table({8, 1 << 24});
  ASSERT_TRUE(table.Insert(MakeAdapter("hot", 0), false).ok());
  std::atomic<bool> stop{false};
  std::atomic<int64_t> reads{0}, misses{0}, torn{0};
  std::atomic<int> started{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&] {
      started.fetch_add(1);
      int64_t last_version = -1;
      while (!stop.load(std::memory_order_relaxed)) {
        AdapterRef a = table.Acquire("hot");
        AdapterRef b = table.Acquire("cold");
        if (a == nullptr) {
          misses.fetch_add(1);
          continue;
        }
        if (!Whole(a) || (b != nullptr && !Whole(b))) torn.fetch_add(1);
        const int64_t v = std::stoll(a->report().path);
        if (v < last_version) torn.fetch_add(1);  // Versions only move forward.
        last_version = v;
        reads.fetch_add(1);
      }
    });
  }
  while (started.load() < 4) std::this_thread::yield();
  // Writer: replace "hot" with newer versions; load and unload "cold". At least 300 updates,
  // and on until the readers have read through a good part of them (bounded).
  int64_t v = 1;
  for (; v <= 300 || (reads.load() < 5000 && v < 200000); ++v) {
    ASSERT_TRUE(table.Insert(MakeAdapter("hot", v, 32 + v % 64), true).ok());
    if (v % 2) {
      ASSERT_TRUE(table.Insert(MakeAdapter("cold", v), false).ok());
    } else {
      ASSERT_TRUE(table.Remove("cold").ok());
    }
  }
  stop = true;
  for (auto& r : readers) r.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_EQ(misses.load(), 0);  // "hot" is replaced atomically, never absent.
  EXPECT_GT(reads.load(), 0);
  EXPECT_EQ(table.Acquire("hot")->report().path, std::to_string(v - 1));
}

AdapterTable::InsertOptions Evicting(bool pinned = false) {
  AdapterTable::InsertOptions o;
  o.evict_idle = true;
  o.pinned = pinned;
  return o;
}

std::vector<std::string> Names(const std::vector<AdapterRef>& refs) {
  std::vector<std::string> out;
  for (const auto& r : refs) out.push_back(r->name());
  return out;
}

TEST(AdapterTableTest, AcquireCountsUsesAndContainsDoesNot) {
  AdapterTable table({4, 1 << 20});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  const int64_t inserted = table.Entries()[0].last_use_ns;
  EXPECT_EQ(table.Entries()[0].hits, 0);
  EXPECT_TRUE(table.Contains("a"));
  EXPECT_FALSE(table.Contains("b"));
  EXPECT_EQ(table.Entries()[0].hits, 0);
  table.Acquire("a");
  table.Acquire("a");
  const auto entries = table.Entries();
  ASSERT_EQ(entries.size(), 1u);
  EXPECT_EQ(entries[0].hits, 2);
  EXPECT_GE(entries[0].last_use_ns, inserted);
  EXPECT_EQ(entries[0].inserted_ns, inserted);
  EXPECT_FALSE(entries[0].pinned);
}

TEST(AdapterTableTest, EvictsTheLeastRecentlyUsedIdleAdaptersFirst) {
  AdapterTable table({3, 1 << 20});
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(table.Insert(MakeAdapter(n, 1), false).ok());
  table.Acquire("a");  // Order of last use now: b, c, a.
  auto evicted = table.Insert(MakeAdapter("d", 1), Evicting());
  ASSERT_TRUE(evicted.ok()) << evicted.status();
  EXPECT_EQ(Names(*evicted), std::vector<std::string>{"b"});
  EXPECT_FALSE(table.Contains("b"));
  EXPECT_TRUE(table.Contains("a"));
  EXPECT_EQ(table.size(), 3);
  // Without evict_idle a full table still refuses.
  EXPECT_EQ(table.Insert(MakeAdapter("e", 1), false).code(), absl::StatusCode::kResourceExhausted);
}

TEST(AdapterTableTest, EvictsAsManyAsTheBytesNeed) {
  AdapterTable table({8, 1000});  // Each small adapter holds 256 bytes.
  for (const char* n : {"a", "b", "c"}) ASSERT_TRUE(table.Insert(MakeAdapter(n, 1), false).ok());
  table.Acquire("c");
  table.Acquire("a");  // LRU order: b, c, a.
  auto evicted = table.Insert(MakeAdapter("big", 1, 160), Evicting());  // 640 bytes.
  ASSERT_TRUE(evicted.ok()) << evicted.status();
  EXPECT_EQ(Names(*evicted), (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(table.bytes(), 256 + 640);
}

TEST(AdapterTableTest, NeverEvictsPinnedOrHeldAdapters) {
  AdapterTable table({3, 1 << 20});
  ASSERT_TRUE(table.Insert(MakeAdapter("pinned", 1), Evicting(/*pinned=*/true)).ok());
  ASSERT_TRUE(table.Insert(MakeAdapter("held", 1), false).ok());
  ASSERT_TRUE(table.Insert(MakeAdapter("idle", 1), false).ok());
  AdapterRef in_flight = table.Acquire("held");
  table.Acquire("idle");  // Most recently used, but the only one that may go.
  auto evicted = table.Insert(MakeAdapter("new", 1), Evicting());
  ASSERT_TRUE(evicted.ok()) << evicted.status();
  EXPECT_EQ(Names(*evicted), std::vector<std::string>{"idle"});
  // Now nothing may go: the table is unchanged and says why.
  AdapterRef new_in_flight = table.Acquire("new");
  auto refused = table.Insert(MakeAdapter("newer", 1), Evicting());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_THAT(std::string(refused.status().message()), HasSubstr("3 of them are pinned or in use"));
  EXPECT_TRUE(table.Contains("pinned"));
  EXPECT_TRUE(table.Contains("held"));
  EXPECT_TRUE(table.Contains("new"));
  EXPECT_FALSE(table.Contains("newer"));
  EXPECT_TRUE(table.Entries()[2].pinned);  // Sorted: held, new, pinned.
  // Once its request ends, "held" is idle and goes first (least recently used).
  in_flight.reset();
  new_in_flight.reset();
  evicted = table.Insert(MakeAdapter("newer", 1), Evicting());
  ASSERT_TRUE(evicted.ok()) << evicted.status();
  EXPECT_EQ(Names(*evicted), std::vector<std::string>{"held"});
}

TEST(AdapterTableTest, ReplacingNeverEvictsTheReplacedEntryAsARoomMaker) {
  AdapterTable table({2, 1000});
  ASSERT_TRUE(table.Insert(MakeAdapter("a", 1), false).ok());
  ASSERT_TRUE(table.Insert(MakeAdapter("b", 1), false).ok());
  table.Acquire("a");
  AdapterTable::InsertOptions o = Evicting();
  o.replace = true;
  auto evicted = table.Insert(MakeAdapter("a", 2, 200), o);  // 800 + 256 > 1000: "b" must go.
  ASSERT_TRUE(evicted.ok()) << evicted.status();
  EXPECT_EQ(Names(*evicted), std::vector<std::string>{"b"});
  EXPECT_EQ(table.Acquire("a")->report().path, "2");
  EXPECT_EQ(table.bytes(), 800);
}

// Readers acquiring and dropping adapters while a writer evicts: every reader's adapter stays
// whole, and an adapter held across the writer's inserts is never evicted.
TEST(AdapterTableTest, ConcurrentEvictionNeverTakesAHeldAdapter) {
  AdapterTable table({4, 1 << 24});
  ASSERT_TRUE(table.Insert(MakeAdapter("kept", 7), false).ok());
  AdapterRef kept = table.Acquire("kept");
  std::atomic<bool> stop{false};
  std::atomic<int64_t> torn{0};
  std::vector<std::thread> readers;
  for (int t = 0; t < 3; ++t) {
    readers.emplace_back([&, t] {
      int64_t i = t;
      while (!stop.load(std::memory_order_relaxed)) {
        AdapterRef a = table.Acquire("n" + std::to_string(i++ % 16));
        if (a != nullptr && !Whole(a)) torn.fetch_add(1);
      }
    });
  }
  AdapterTable::InsertOptions o = Evicting();
  o.replace = true;
  for (int v = 0; v < 2000; ++v) {
    auto evicted = table.Insert(MakeAdapter("n" + std::to_string(v % 16), v), o);
    if (!evicted.ok()) {  // Everything else in use at that instant: allowed, table unchanged.
      ASSERT_EQ(evicted.status().code(), absl::StatusCode::kResourceExhausted);
      continue;
    }
    for (const auto& e : *evicted) ASSERT_NE(e->name(), "kept");
    ASSERT_TRUE(table.Contains("kept"));
  }
  stop = true;
  for (auto& r : readers) r.join();
  EXPECT_EQ(torn.load(), 0);
  EXPECT_TRUE(Whole(kept));
}

}  // namespace
}  // namespace adapterd::adapters
