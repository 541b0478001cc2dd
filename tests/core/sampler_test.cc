#include "core/sampler.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "gtest/gtest.h"

namespace adapterd::core {
namespace {

const float kNegInf = -std::numeric_limits<float>::infinity();

std::vector<float> ToVector(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

TEST(SamplerTest, RepetitionPenaltyDividesPositiveAndMultipliesNegativeScores) {
  at::Tensor logits = at::tensor({2.0f, -1.0f, 0.5f, -3.0f});
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  auto out = ToVector(ProcessLogits(logits, p, {0, 1}));
  EXPECT_FLOAT_EQ(out[0], 1.0f);   // 2 / 2
  EXPECT_FLOAT_EQ(out[1], -2.0f);  // -1 * 2
  EXPECT_FLOAT_EQ(out[2], 0.5f);   // not seen
  EXPECT_FLOAT_EQ(out[3], -3.0f);
  EXPECT_FLOAT_EQ(logits[0].item<float>(), 2.0f);  // Input untouched.
}

TEST(SamplerTest, OpenAiPenaltiesFollowVllmOverGeneratedTokensOnly) {
  // vLLM: after the repetition penalty, logit -= frequency * count + presence * (count > 0),
  // counting generated tokens only (id 3 is in the prompt: `seen`, but not generated).
  at::Tensor logits = at::tensor({2.0f, -1.0f, 0.5f, -3.0f});
  SamplingParams p;
  p.repetition_penalty = 2.0f;
  p.frequency_penalty = 0.25f;
  p.presence_penalty = -0.5f;
  GeneratedCounts g;
  g.ids = {0, 2};
  g.counts = {3.0f, 1.0f};
  g.length = 4;
  auto out = ToVector(ProcessLogits(logits, p, {0, 2, 3}, g));
  EXPECT_FLOAT_EQ(out[0], 2.0f / 2 - (0.25f * 3 - 0.5f));
  EXPECT_FLOAT_EQ(out[1], -1.0f);
  EXPECT_FLOAT_EQ(out[2], 0.5f / 2 - (0.25f * 1 - 0.5f));
  EXPECT_FLOAT_EQ(out[3], -3.0f * 2);
  // Greedy decoding applies them too.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  p.repetition_penalty = 1.0f;
  p.frequency_penalty = 2.0f;
  p.presence_penalty = 0.0f;
  g.ids = {0};
  g.counts = {1.0f};
  auto chosen = ChooseToken(ProcessLogits(logits, p, {}, g), p, gen);
  ASSERT_TRUE(chosen.ok());
  EXPECT_EQ(*chosen, 2);  // 2 - 2 = 0 < 0.5
  // Out of range values are refused by name.
  p.frequency_penalty = 2.5f;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
}

TEST(SamplerTest, MinTokensHoldsBackEndIdsUntilEnoughAreGenerated) {
  at::Tensor logits = at::tensor({5.0f, 1.0f, 0.5f});
  SamplingParams p;
  p.min_tokens = 2;
  p.min_tokens_suppressed = {0};
  GeneratedCounts g;
  g.length = 1;
  auto out = ToVector(ProcessLogits(logits, p, {}, g));
  EXPECT_EQ(out[0], kNegInf);
  EXPECT_FLOAT_EQ(out[1], 1.0f);
  g.length = 2;
  out = ToVector(ProcessLogits(logits, p, {}, g));
  EXPECT_FLOAT_EQ(out[0], 5.0f);
}

TEST(SamplerTest, GreedyIgnoresWarpersButNotThePenalty) {
  at::Tensor logits = at::tensor({3.0f, 2.9f, 1.0f});
  SamplingParams p;
  p.top_k = 1;
  p.top_p = 0.1f;
  p.repetition_penalty = 1.5f;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(1);
  // 3 / 1.5 = 2 < 2.9: the penalty moves the argmax to id 1.
  EXPECT_EQ(ChooseToken(ProcessLogits(logits, p, {0}), p, gen).value(), 1);
  auto out = ToVector(ProcessLogits(logits, p, {0}));
  EXPECT_TRUE(std::isfinite(out[2]));  // No top-k / top-p in greedy mode.
}

TEST(SamplerTest, TopKKeepsTiesAtTheKthScore) {
  at::Tensor logits = at::tensor({1.0f, 3.0f, 2.0f, 2.0f, 0.0f});
  SamplingParams p;
  p.temperature = 1.0f;
  p.top_k = 2;
  auto out = ToVector(ProcessLogits(logits, p, {}));
  EXPECT_EQ(out, (std::vector<float>{kNegInf, 3.0f, 2.0f, 2.0f, kNegInf}));
}

// Brute-force nucleus rule from transformers' TopPLogitsWarper: a token is removed when the
// probability mass of it and every less likely token is <= 1 - top_p; the top token stays.
std::vector<bool> BruteForceTopPKeep(const std::vector<float>& scores, float top_p) {
  std::vector<double> probs(scores.size());
  double z = 0;
  for (float s : scores) z += std::exp(static_cast<double>(s));
  for (size_t i = 0; i < scores.size(); ++i) probs[i] = std::exp(scores[i]) / z;
  const size_t top = std::max_element(scores.begin(), scores.end()) - scores.begin();
  std::vector<bool> keep(scores.size());
  for (size_t i = 0; i < scores.size(); ++i) {
    double mass = 0;
    for (size_t j = 0; j < scores.size(); ++j) {
      if (scores[j] <= scores[i]) mass += probs[j];
    }
    keep[i] = i == top || mass > 1.0 - top_p;
  }
  return keep;
}

TEST(SamplerTest, TopPMatchesTheBruteForceRuleAfterTemperature) {
  at::Tensor logits = at::tensor({0.3f, 2.0f, -1.0f, 1.2f, 0.9f, -0.4f, 1.7f});
  for (float top_p : {0.05f, 0.3f, 0.5f, 0.8f, 0.95f}) {
    SamplingParams p;
    p.temperature = 0.7f;
    p.top_p = top_p;
    auto out = ToVector(ProcessLogits(logits, p, {}));
    std::vector<float> scaled = ToVector(logits / 0.7f);
    auto keep = BruteForceTopPKeep(scaled, top_p);
    for (size_t i = 0; i < out.size(); ++i) {
      if (keep[i]) {
        EXPECT_FLOAT_EQ(out[i], scaled[i]) << "top_p " << top_p << " id " << i;
      } else {
        EXPECT_EQ(out[i], kNegInf) << "top_p " << top_p << " id " << i;
      }
    }
  }
}

TEST(SamplerTest, SameSeedSameDrawsAndFilteredTokensNeverDrawn) {
  at::Tensor logits = at::tensor({1.0f, 1.1f, 0.9f, 1.05f, -5.0f, 0.2f});
  SamplingParams p;
  p.temperature = 1.3f;
  p.top_k = 3;
  auto draw = [&](uint64_t seed) {
    at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
    std::vector<int64_t> ids;
    for (int i = 0; i < 200; ++i) ids.push_back(ChooseToken(ProcessLogits(logits, p, {}), p, gen).value());
    return ids;
  };
  auto a = draw(7), b = draw(7), c = draw(8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  std::vector<int> counts(6);
  for (int64_t id : a) counts[id]++;
  EXPECT_EQ(counts[0] + counts[1] + counts[3], 200);  // Only the top 3 survive.
  // Empirical frequency of the most likely of the three near its processed probability.
  const double e0 = std::exp(1.0 / 1.3), e1 = std::exp(1.1 / 1.3), e3 = std::exp(1.05 / 1.3);
  EXPECT_NEAR(counts[1] / 200.0, e1 / (e0 + e1 + e3), 0.12);
}

TEST(SamplerTest, NearZeroTemperatureIsGreedyInsteadOfOverflowing) {
  // logits / 1e-45 is +-inf in float32: such temperatures decode greedily (vLLM's rule).
  at::Tensor logits = at::tensor({0.5f, 2.5f, -1.0f, 2.4f});
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  for (float t : {1e-45f, 1e-38f, 9e-6f}) {
    SamplingParams p;
    p.temperature = t;
    p.top_k = 1;
    ASSERT_TRUE(IsGreedy(p)) << t;
    auto out = ToVector(ProcessLogits(logits, p, {}));
    EXPECT_EQ(out, ToVector(logits)) << t;  // No warper touched the scores.
    EXPECT_EQ(ChooseToken(ProcessLogits(logits, p, {}), p, gen).value(), 1) << t;
  }
  SamplingParams p;
  p.temperature = kGreedyTemperature;
  EXPECT_FALSE(IsGreedy(p));
}

TEST(SamplerTest, OverflowingPenaltyFailsTheDrawWithItsValues) {
  // A positive score divided by 1e-38 overflows to +inf; softmax would be NaN.
  at::Tensor logits = at::tensor({5.0f, 2.0f, 1.0f});
  SamplingParams p;
  p.temperature = 0.8f;
  p.repetition_penalty = 1e-38f;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(3);
  auto token = ChooseToken(ProcessLogits(logits, p, {0}), p, gen);
  ASSERT_FALSE(token.ok());
  EXPECT_EQ(token.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(token.status().message().find("repetition_penalty=1e-38"), std::string::npos)
      << token.status().message();
  // NaN scores are refused too, in greedy mode as well.
  SamplingParams greedy;
  at::Tensor nan = at::tensor({1.0f, std::nanf(""), 0.0f});
  EXPECT_FALSE(ChooseToken(nan, greedy, gen).ok());
}

TEST(SamplerTest, ValidationNamesTheBadField) {
  SamplingParams p;
  p.temperature = -1;
  EXPECT_EQ(ValidateSamplingParams(p).message(), "temperature must be >= 0 (0 = greedy), got -1");
  p = SamplingParams();
  p.top_p = 0;
  EXPECT_EQ(ValidateSamplingParams(p).message(), "top_p must be in (0, 1], got 0");
  p = SamplingParams();
  p.top_k = -2;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = SamplingParams();
  p.repetition_penalty = 0;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  p = SamplingParams();
  p.top_logprobs = 21;
  EXPECT_FALSE(ValidateSamplingParams(p).ok());
  EXPECT_TRUE(ValidateSamplingParams(SamplingParams()).ok());
}

}  // namespace
}  // namespace adapterd::core
