// StepGovernor against a simulated model whose step time is a fixed decode cost plus what the
// prompt chunk costs, growing with the context it attends over, as on a real CPU: it must keep
// governed steps near slowdown × the decode-only step while still finishing the prompt, measure
// its baseline before governing, and re-measure it when the batch changes or it gets old.
#include "server/step_governor.h"

#include <algorithm>
#include <vector>

#include "gtest/gtest.h"

namespace adapterd::server {
namespace {

// Seconds of a step of `rows` decode rows and `tokens` prompt tokens whose chunk starts at
// `context`: per-row decode cost, a fixed cost to read the prompt's cache once, and per-token
// compute over the context.
double SimulatedStep(int64_t rows, int64_t tokens, int64_t context) {
  double s = 0.015 + 0.0008 * static_cast<double>(rows);
  if (tokens > 0) {
    s += 2e-6 * static_cast<double>(context) + static_cast<double>(tokens) * (2e-4 + 1e-7 * static_cast<double>(context));
  }
  return s;
}

TEST(StepGovernorTest, OffGivesEveryStepTheTokenBudget) {
  StepGovernor g(0, 512);
  EXPECT_FALSE(g.enabled());
  EXPECT_EQ(g.Budget(8), 512);
  g.Observe(1.0, 8, 504);
  EXPECT_EQ(g.Budget(8), 512);
}

TEST(StepGovernorTest, StepsWithoutDecodeRowsAreNotGoverned) {
  StepGovernor g(1.5, 512);
  EXPECT_EQ(g.Budget(0), 512);
}

TEST(StepGovernorTest, MeasuresTheDecodeOnlyStepBeforeGoverning) {
  StepGovernor g(1.5, 512);
  EXPECT_EQ(g.Budget(8), 8);  // No baseline yet: decode-only.
  g.Observe(0.02, 8, 0);
  EXPECT_DOUBLE_EQ(g.baseline_seconds(), 0.02);
  EXPECT_GT(g.Budget(8), 8);
  EXPECT_LE(g.Budget(8), 512);
}

TEST(StepGovernorTest, KeepsGovernedStepsNearTheTargetAndFinishesTheLongPrompt) {
  const double slowdown = 1.5;
  const int64_t rows = 8, prompt = 4000;
  StepGovernor g(slowdown, 512);
  const double decode_only = SimulatedStep(rows, 0, 0);
  int64_t done = 0, steps = 0, over = 0;
  double worst = 0;
  std::vector<int64_t> chunks;
  while (done < prompt) {
    ASSERT_LT(++steps, 5000) << "the prompt stalled at " << done << " tokens";
    const int64_t take = std::min(prompt - done, g.Budget(rows) - rows);
    const double s = SimulatedStep(rows, take, done);
    g.Observe(s, rows, take);
    if (take == 0) continue;
    chunks.push_back(take);
    done += take;
    worst = std::max(worst, s / decode_only);
    // The smallest chunk alone may cost more than the target near the end of the prompt:
    // only count steps the governor could have kept under it.
    if (s > slowdown * decode_only * 1.2 && SimulatedStep(rows, 1, done - take) <= slowdown * decode_only) {
      ++over;
    }
  }
  // The growth step is a sixth, so an overshoot is at most about that before the cut.
  EXPECT_LE(over * 20, static_cast<int64_t>(chunks.size())) << "steps over 1.2x the target";
  EXPECT_LT(worst, 2 * slowdown) << "a step ran far past the target";
  // It must not crawl either: an oracle that knows the cost model and takes the largest chunk
  // within the target (at least one token) needs `ideal` steps; the governor, probing from
  // below with a 15% band, may take at most twice as many.
  int64_t ideal = 0;
  for (int64_t at = 0; at < prompt; ++ideal) {
    int64_t n = 1;
    while (at + n < prompt && SimulatedStep(rows, n + 1, at) <= slowdown * decode_only) ++n;
    at += n;
  }
  EXPECT_LE(static_cast<int64_t>(chunks.size()), 2 * ideal) << "oracle: " << ideal << " steps";
  EXPECT_LT(steps, 400);
}

TEST(StepGovernorTest, RemeasuresWhenTheBatchChangesOrTheBaselineAges) {
  StepGovernor g(1.5, 512);
  g.Observe(0.02, 8, 0);
  EXPECT_GT(g.Budget(8), 8);
  EXPECT_GT(g.Budget(9), 9);      // Within a quarter of 8 rows.
  EXPECT_EQ(g.Budget(11), 11);    // More than a quarter away: decode-only to re-measure.
  g.Observe(0.03, 11, 0);
  EXPECT_DOUBLE_EQ(g.baseline_seconds(), 0.03);  // A new row count starts the samples over.
  EXPECT_GT(g.Budget(11), 11);
  for (int64_t i = 0; i < StepGovernor::kRefreshSteps; ++i) g.Observe(0.035, 11, 16);
  EXPECT_EQ(g.Budget(11), 11);    // Aged.
  g.Observe(0.05, 11, 0);
  EXPECT_GT(g.Budget(11), 11);
  EXPECT_DOUBLE_EQ(g.baseline_seconds(), 0.05);  // The upper of two samples' middle.
  g.Observe(0.031, 11, 0);
  EXPECT_DOUBLE_EQ(g.baseline_seconds(), 0.031);  // The median of three: one outlier moves nothing.
  for (int i = 0; i < 20; ++i) g.Observe(0.02, 11, 0);
  EXPECT_DOUBLE_EQ(g.baseline_seconds(), 0.02);  // Only the last eight count.
}

TEST(StepGovernorTest, ShrinksAfterASlowStepAndGrowsAfterAFastOne) {
  StepGovernor g(1.5, 512);
  g.Observe(0.02, 8, 0);
  EXPECT_EQ(g.chunk(), StepGovernor::kStartChunk);
  g.Observe(0.021, 8, 16);  // Under 85% of 0.03 before any step went over: doubles.
  EXPECT_EQ(g.chunk(), 2 * StepGovernor::kStartChunk);
  const int64_t start = g.chunk();
  g.Observe(0.05, 8, start);  // Over 0.03.
  EXPECT_LT(g.chunk(), start);
  const int64_t shrunk = g.chunk();
  g.Observe(0.021, 8, shrunk);  // Under 85% of 0.03: grows by a sixth from now on.
  EXPECT_EQ(g.chunk(), shrunk + shrunk / 6);
  const int64_t grown = g.chunk();
  g.Observe(0.028, 8, grown);  // Between: unchanged.
  EXPECT_EQ(g.chunk(), grown);
  for (int i = 0; i < 50; ++i) g.Observe(1.0, 8, 16);
  EXPECT_EQ(g.chunk(), 1);
  EXPECT_EQ(g.Budget(8), 8);  // 50 governed steps: the baseline is re-measured first.
  g.Observe(0.02, 8, 0);
  EXPECT_EQ(g.Budget(8), 9);  // A prompt always gets a token on a governed step.
  for (int i = 0; i < 200; ++i) g.Observe(0.001, 8, 16);
  EXPECT_EQ(g.chunk(), 512);
  StepGovernor small(1.5, 8);  // A token budget under the starting chunk bounds it.
  small.Observe(0.02, 4, 0);
  EXPECT_EQ(small.Budget(4), 8);
}

}  // namespace
}  // namespace adapterd::server
