// The forward pass against the independent PyTorch reference (tests/reference), and the
// engine's own invariants: incremental decode equals full prefill, a batched step equals each
// row alone.
#include "core/engine.h"

#include <algorithm>
#include <cmath>
#include <set>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "core/cpu_kernels.h"
#include "core/prefix_cache.h"
#include "tests/test_util.h"

namespace adapterd::core {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<Engine> LoadEngine(const std::string& fixture,
                                   const std::string& cpu_kernels = "auto",
                                   const std::string& kv_cache_dtype = "auto",
                                   const std::string& quantize = "none") {
  EngineOptions o;
  o.model_dir = testing::Fixture(fixture);
  o.cpu_kernels = cpu_kernels;
  o.kv_cache_dtype = kv_cache_dtype;
  o.quantize = quantize;
  LoadReport report;
  auto engine = Engine::Load(o, &report);
  EXPECT_TRUE(engine.ok()) << fixture << ": " << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

std::vector<float> LogSoftmax(const float* row, int64_t n) {
  double max = row[0];
  for (int64_t i = 1; i < n; ++i) max = std::max<double>(max, row[i]);
  double z = 0;
  for (int64_t i = 0; i < n; ++i) z += std::exp(row[i] - max);
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(row[i] - max - std::log(z));
  return out;
}

// The largest difference between `logits` (the reference prompt's, [tokens, vocab]) and the
// reference's, and the largest reference logit in magnitude.
std::pair<double, double> WorstAndLargestLogit(const std::vector<float>& logits, const nlohmann::json& ref,
                                               int64_t vocab) {
  double worst = 0, largest = 0;
  for (size_t t = 0; t < ref["prompt"].size(); ++t) {
    for (int64_t v = 0; v < vocab; ++v) {
      const double want = ref["logits"][t][v].get<double>();
      worst = std::max(worst, std::abs(logits[t * vocab + v] - want));
      largest = std::max(largest, std::abs(want));
    }
  }
  return {worst, largest};
}

// Generates greedily from the reference's prompt for as many tokens as the reference did,
// expects its tokens, and returns the steps (none when generation failed).
std::vector<StepOutput> GreedyLikeReference(const Engine& engine, const nlohmann::json& ref) {
  GenerateRequest req;
  req.prompt = ref["prompt"].get<std::vector<int32_t>>();
  req.max_new_tokens = static_cast<int64_t>(ref["greedy"].size());
  req.ignore_eos = true;
  auto result = Generate(engine, req);
  EXPECT_TRUE(result.ok()) << result.status();
  if (!result.ok()) return {};
  std::vector<int32_t> tokens;
  for (const StepOutput& s : result->steps) tokens.push_back(s.token);
  EXPECT_EQ(tokens, ref["greedy"].get<std::vector<int32_t>>());
  return result->steps;
}

// Every fixture on every CPU kernel set this machine has: "none" is the ATen/BLAS path.
class ReferenceTest
    : public ::testing::TestWithParam<std::tuple<const char*, const char*>> {
 protected:
  void SetUp() override {
    if (!Supported(kernels())) GTEST_SKIP() << kernels() << " kernels are not supported here";
  }
  static bool Supported(const std::string& kernels) {
    cpu::Isa isa;
    return cpu::IsaFromName(kernels, &isa) && isa <= cpu::SupportedIsa();
  }
  const char* fixture() const { return std::get<0>(GetParam()); }
  const char* kernels() const { return std::get<1>(GetParam()); }
  // With a float32 KV cache, as the reference holds (--dtype auto serves llama_bf16's matrices
  // in place, and its cache would default to bfloat16: see Bf16InPlaceTest).
  std::unique_ptr<Engine> Load() const {
    auto engine = LoadEngine(fixture(), kernels(), "float32");
    if (engine != nullptr) {
      EXPECT_STREQ(Engine::cpu_kernels(), kernels());
    }
    return engine;
  }
};

TEST_P(ReferenceTest, PromptLogitsMatchTheReferenceTo1e4) {
  auto engine = Load();
  ASSERT_NE(engine, nullptr);
  auto ref = testing::ReadJson(testing::Fixture(fixture()) + "/reference.json");
  std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
  auto logits = engine->PromptLogits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const int64_t vocab = engine->config().vocab_size;
  ASSERT_EQ(logits->size(), prompt.size() * vocab);
  double worst = 0;
  for (size_t t = 0; t < prompt.size(); ++t) {
    for (int64_t v = 0; v < vocab; ++v) {
      worst = std::max(worst, std::abs((*logits)[t * vocab + v] - ref["logits"][t][v].get<double>()));
    }
  }
  EXPECT_LT(worst, 1e-4) << fixture();
}

TEST_P(ReferenceTest, GreedyDecodeMatchesTheReference) {
  auto engine = Load();
  ASSERT_NE(engine, nullptr);
  auto ref = testing::ReadJson(testing::Fixture(fixture()) + "/reference.json");
  const std::vector<StepOutput> steps = GreedyLikeReference(*engine, ref);
  for (size_t i = 0; i < steps.size(); ++i) {
    EXPECT_NEAR(steps[i].logprob, ref["greedy_logprobs"][i].get<double>(), 1e-4);
  }
}

TEST_P(ReferenceTest, StepByStepDecodeEqualsFullPrefill) {
  auto engine = Load();
  ASSERT_NE(engine, nullptr);
  auto ref = testing::ReadJson(testing::Fixture(fixture()) + "/reference.json");
  GenerateRequest req;
  req.prompt = ref["prompt"].get<std::vector<int32_t>>();
  req.max_new_tokens = 10;
  req.ignore_eos = true;
  req.params.top_logprobs = 5;
  auto result = Generate(*engine, req);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<int32_t> all = req.prompt;
  for (const StepOutput& s : result->steps) all.push_back(s.token);
  auto full = engine->PromptLogits(all);
  ASSERT_TRUE(full.ok()) << full.status();
  const int64_t vocab = engine->config().vocab_size;
  for (size_t i = 0; i < result->steps.size(); ++i) {
    const size_t pos = req.prompt.size() - 1 + i;  // Logits there predict generated token i.
    std::vector<float> lp = LogSoftmax(full->data() + pos * vocab, vocab);
    const StepOutput& s = result->steps[i];
    EXPECT_NEAR(s.logprob, lp[s.token], 1e-4) << "step " << i;
    for (const TokenLogprob& t : s.top) EXPECT_NEAR(t.logprob, lp[t.id], 1e-4) << "step " << i;
    EXPECT_EQ(std::max_element(lp.begin(), lp.end()) - lp.begin(), s.token) << "step " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, ReferenceTest,
    ::testing::Combine(::testing::Values("llama_tied", "llama_untied", "qwen2_bias",
                                         "qwen3_qk_norm", "mistral_window", "gpt2", "gpt2_noprefix",
                                         "llama_sharded", "llama_bf16", "llama_f16",
                                         "llama_bf16_wide"),
                       ::testing::Values("none", "avx2", "avx512f")),
    [](const auto& info) {
      return std::string(std::get<0>(info.param)) + "_" + std::get<1>(info.param);
    });

// --dtype auto on a bfloat16 or float16 checkpoint: the matrices are read in place and widened,
// so the logits equal the float32 conversion's — bit for bit on the CPU kernels (the same fused
// sums over exactly widened weights), within 1e-5 on ATen (blocks of widened weights through
// BLAS) — with the same KV cache dtype.
TEST(HalfInPlaceTest, AutoEqualsTheFloat32ConversionOnEveryKernelSet) {
  for (const char* fixture : {"llama_bf16", "llama_f16"}) {
    SCOPED_TRACE(fixture);
    auto ref = testing::ReadJson(testing::Fixture(fixture) + "/reference.json");
    std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
    for (const char* kernels : {"none", "avx2", "avx512f"}) {
      cpu::Isa isa;
      if (!cpu::IsaFromName(kernels, &isa) || isa > cpu::SupportedIsa()) continue;
      SCOPED_TRACE(kernels);
      for (const char* kv : {"float32", "bfloat16", "float16"}) {
        EngineOptions o;
        o.model_dir = testing::Fixture(fixture);
        o.cpu_kernels = kernels;
        o.kv_cache_dtype = kv;
        LoadReport in_place_report, converted_report;
        o.dtype = "auto";
        auto in_place = Engine::Load(o, &in_place_report);
        o.dtype = "float32";
        auto converted = Engine::Load(o, &converted_report);
        ASSERT_TRUE(in_place.ok() && converted.ok());
        EXPECT_EQ(in_place_report.weights_dtype, std::string(fixture) == "llama_bf16" ? "bfloat16" : "float16");
        EXPECT_EQ(converted_report.weights_dtype, "float32");
        auto a = (*in_place)->PromptLogits(prompt);
        auto b = (*converted)->PromptLogits(prompt);
        ASSERT_TRUE(a.ok() && b.ok());
        double worst = 0;
        for (size_t i = 0; i < a->size(); ++i) worst = std::max(worst, static_cast<double>(std::abs((*a)[i] - (*b)[i])));
        if (isa == cpu::Isa::kNone) {
          EXPECT_LT(worst, 1e-5) << kv;
        } else {
          EXPECT_EQ(worst, 0.0) << kv;
        }
      }
    }
  }
  cpu::SelectIsa(cpu::SupportedIsa());
}

// Under auto the KV cache takes the weights' dtype (half the bytes per position of a float32
// one), and the greedy continuation still equals the float32 PyTorch reference's.
TEST(HalfInPlaceTest, AutoKvCacheTakesTheWeightsDtypeAndKeepsTheReferenceContinuation) {
  auto f32 = LoadEngine("llama_tied");
  ASSERT_NE(f32, nullptr);
  EXPECT_EQ(f32->report().kv_cache_dtype, "float32");
  for (const char* fixture : {"llama_bf16", "llama_f16"}) {
    SCOPED_TRACE(fixture);
    auto engine = LoadEngine(fixture);
    ASSERT_NE(engine, nullptr);
    EXPECT_EQ(engine->report().kv_cache_dtype, std::string(fixture) == "llama_bf16" ? "bfloat16" : "float16");
    EXPECT_EQ(2 * engine->kv_bytes_per_position(), f32->kv_bytes_per_position());
    GreedyLikeReference(*engine, testing::ReadJson(testing::Fixture(fixture) + "/reference.json"));
  }
}

// Runs `prompts` together: row i joins at step join[i]; returns every row's outputs.
std::vector<std::vector<StepOutput>> RunBatched(const Engine& engine,
                                                const std::vector<std::vector<int32_t>>& prompts,
                                                const std::vector<int>& join,
                                                const SamplingParams& params, int steps) {
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (const auto& p : prompts) seqs.push_back(*engine.NewSequence(p, params));
  std::vector<std::vector<StepOutput>> out(prompts.size());
  for (int step = 0; step < steps + *std::max_element(join.begin(), join.end()); ++step) {
    std::vector<Sequence*> batch;
    std::vector<size_t> rows;
    for (size_t i = 0; i < seqs.size(); ++i) {
      if (step >= join[i] && static_cast<int>(out[i].size()) < steps) {
        batch.push_back(seqs[i].get());
        rows.push_back(i);
      }
    }
    if (batch.empty()) break;
    auto res = engine.Step(batch);
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) return out;
    for (size_t r = 0; r < rows.size(); ++r) out[rows[r]].push_back((*res)[r]);
  }
  return out;
}

// Same tokens and alternatives; log-probs within `tolerance`.
void ExpectSameOutputs(const std::vector<StepOutput>& a, const std::vector<StepOutput>& b,
                       double tolerance = 1e-4) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].token, b[i].token) << "step " << i;
    EXPECT_NEAR(a[i].logprob, b[i].logprob, tolerance) << "step " << i;
    ASSERT_EQ(a[i].top.size(), b[i].top.size());
    for (size_t k = 0; k < a[i].top.size(); ++k) {
      EXPECT_EQ(a[i].top[k].id, b[i].top[k].id);
      EXPECT_NEAR(a[i].top[k].logprob, b[i].top[k].logprob, tolerance);
    }
  }
}

class BatchTest : public ::testing::TestWithParam<const char*> {};

TEST_P(BatchTest, BatchedStepWithMixedPrefillAndDecodeEqualsEachRowAlone) {
  auto engine = LoadEngine(GetParam());
  ASSERT_NE(engine, nullptr);
  std::vector<std::vector<int32_t>> prompts = {
      {5, 17, 33, 9, 101, 7, 64, 12, 90}, {44, 3}, {200, 150, 100, 50, 25, 12}};
  SamplingParams params;
  params.top_logprobs = 4;
  auto together = RunBatched(*engine, prompts, {0, 0, 3}, params, 7);
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = RunBatched(*engine, {prompts[i]}, {0}, params, 7);
    ExpectSameOutputs(together[i], alone[0]);
  }
}

TEST_P(BatchTest, SeededSamplingDoesNotDependOnTheBatch) {
  auto engine = LoadEngine(GetParam());
  ASSERT_NE(engine, nullptr);
  SamplingParams params;
  params.temperature = 1.5f;
  params.top_k = 40;
  params.top_p = 0.9f;
  params.repetition_penalty = 1.2f;
  params.seed = 99;
  std::vector<std::vector<int32_t>> prompts = {{1, 2, 3, 4}, {9, 8, 7}};
  auto together = RunBatched(*engine, prompts, {0, 1}, params, 6);
  auto alone = RunBatched(*engine, {prompts[0]}, {0}, params, 6);
  ExpectSameOutputs(together[0], alone[0]);
  auto again = RunBatched(*engine, {prompts[0]}, {0}, params, 6);
  ExpectSameOutputs(alone[0], again[0]);
}

// Chunked prefill: a prompt run a few tokens per step (Step's limits), beside another row
// decoding, reaches the same continuation as the prompt run at once: the same greedy tokens,
// log-probs to 1e-4, and the chunks before the last choose nothing.
TEST_P(BatchTest, APromptPrefilledInChunksEqualsItRunAtOnce) {
  auto engine = LoadEngine(GetParam());
  ASSERT_NE(engine, nullptr);
  SamplingParams params;
  params.top_logprobs = 3;
  std::vector<int32_t> prompt;
  for (int i = 0; i < 23; ++i) prompt.push_back(static_cast<int32_t>((7 * i + 3) % 200 + 1));
  auto at_once = RunBatched(*engine, {prompt}, {0}, params, 6);
  for (int64_t chunk : {1, 5, 8}) {
    auto seq = *engine->NewSequence(prompt, params);
    auto other = *engine->NewSequence({5, 6, 7}, params);
    std::vector<StepOutput> got;
    int chunks = 0;
    while (got.size() < 6) {
      const int64_t before = seq->pending_tokens();
      auto res = engine->Step({other.get(), seq.get()}, {0, chunk});
      ASSERT_TRUE(res.ok()) << res.status();
      EXPECT_FALSE((*res)[0].prefill_only);
      if ((*res)[1].prefill_only) {
        ++chunks;
        EXPECT_EQ(seq->pending_tokens(), before - chunk);
        EXPECT_EQ(seq->generated(), 0);
        continue;
      }
      got.push_back((*res)[1]);
    }
    EXPECT_EQ(chunks, (23 + chunk - 1) / chunk - 1) << "chunk " << chunk;
    ExpectSameOutputs(got, at_once[0]);
  }
  auto seq = *engine->NewSequence(prompt, params);
  EXPECT_EQ(engine->Step({seq.get()}, {1, 2}).status().code(), absl::StatusCode::kInvalidArgument);
}

// Under --quantize the float32 weights' auto cache is float16 (llama.cpp's default beside
// Q8_0): the same logits as asking for float16, half the bytes per position, and the greedy
// continuation of the float32 PyTorch reference kept. A bfloat16 checkpoint's cache stays
// bfloat16 (its embedding is served in place in it); an explicit dtype is kept.
TEST(HalfInPlaceTest, QuantizedFloat32WeightsTakeAFloat16CacheUnderAuto) {
  for (const char* quantize : {"int8", "int8_weight_only"}) {
    SCOPED_TRACE(quantize);
    auto automatic = LoadEngine("llama_tied", "auto", "auto", quantize);
    auto half = LoadEngine("llama_tied", "auto", "float16", quantize);
    auto full = LoadEngine("llama_tied", "auto", "float32", quantize);
    auto bf16 = LoadEngine("llama_bf16", "auto", "auto", quantize);
    ASSERT_TRUE(automatic && half && full && bf16);
    EXPECT_EQ(automatic->report().kv_cache_dtype, "float16");
    EXPECT_EQ(full->report().kv_cache_dtype, "float32");
    EXPECT_EQ(bf16->report().kv_cache_dtype, "bfloat16");
    EXPECT_EQ(2 * automatic->kv_bytes_per_position(), full->kv_bytes_per_position());
    const auto ref = testing::ReadJson(testing::Fixture("llama_tied") + "/reference.json");
    const std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
    auto a = automatic->PromptLogits(prompt);
    auto h = half->PromptLogits(prompt);
    auto f = full->PromptLogits(prompt);
    ASSERT_TRUE(a.ok() && h.ok() && f.ok());
    EXPECT_EQ(*a, *h);
    EXPECT_NE(*a, *f);  // The cache's rounding shows: it is not a float32 cache.
    GreedyLikeReference(*automatic, ref);
  }
}

// --quantize bf16_packed serves exactly the model it packs: on every kernel set (the packed
// kernel where AVX-512 BW is, the matrices unpacked block by block elsewhere) and at both
// precisions, the prompt's logits and a greedy generation (prefill, then one-row decode steps)
// equal the unpacked bfloat16 model's bit for bit. The load report counts every projection and
// lm_head, held in fewer bytes.
TEST(PackedBf16Test, ServesExactlyTheModelItPacks) {
  const auto ref = testing::ReadJson(testing::Fixture("llama_bf16_wide") + "/reference.json");
  const std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
  for (const char* kernels : {"none", "avx2", "avx512f"}) {
    cpu::Isa isa;
    if (!cpu::IsaFromName(kernels, &isa) || isa > cpu::SupportedIsa()) continue;
    for (const char* precision : {"highest", "medium"}) {
      SCOPED_TRACE(std::string(kernels) + " " + precision);
      EngineOptions o;
      o.model_dir = testing::Fixture("llama_bf16_wide");
      o.cpu_kernels = kernels;
      o.matmul_precision = precision;
      LoadReport plain_report, packed_report;
      auto plain = Engine::Load(o, &plain_report);
      o.quantize = "bf16_packed";
      auto packed = Engine::Load(o, &packed_report);
      ASSERT_TRUE(plain.ok() && packed.ok()) << plain.status() << " " << packed.status();
      EXPECT_EQ(packed_report.quantization, "bf16_packed");
      EXPECT_EQ(packed_report.quantized_tensors, 2 * 7 + 1);
      EXPECT_GT(packed_report.quantized_bytes, packed_report.quantized_source_bytes * 3 / 4);
      // 12 bits a weight, plus 24 bytes a row (table, escape offset): 0.84 of rows of 128.
      EXPECT_LT(packed_report.quantized_bytes, packed_report.quantized_source_bytes * 17 / 20);
      EXPECT_EQ(packed_report.kv_cache_dtype, "bfloat16");
      EXPECT_EQ(packed_report.bf16_products, plain_report.bf16_products);
      EXPECT_NE(packed_report.ToText().find("packed       bf16_packed: 15 matrices, "),
                std::string::npos)
          << packed_report.ToText();
      auto a = (*plain)->PromptLogits(prompt);
      auto b = (*packed)->PromptLogits(prompt);
      ASSERT_TRUE(a.ok() && b.ok());
      EXPECT_EQ(*a, *b);
      GenerateRequest req;
      req.prompt = prompt;
      req.max_new_tokens = 12;
      req.ignore_eos = true;
      auto x = Generate(**plain, req);
      auto y = Generate(**packed, req);
      ASSERT_TRUE(x.ok() && y.ok());
      ASSERT_EQ(x->steps.size(), y->steps.size());
      for (size_t i = 0; i < x->steps.size(); ++i) {
        EXPECT_EQ(x->steps[i].token, y->steps[i].token) << i;
        EXPECT_EQ(x->steps[i].logprob, y->steps[i].logprob) << i;
      }
    }
  }
}

// What bf16_packed refuses, with the reason: matrices too narrow to pack (llama_bf16: hidden
// 64), float32 weights, bfloat16 activations.
TEST(PackedBf16Test, RefusesWhatItCannotPack) {
  EngineOptions o;
  o.quantize = "bf16_packed";
  LoadReport report;
  o.model_dir = testing::Fixture("llama_bf16");
  auto narrow = Engine::Load(o, &report);
  ASSERT_FALSE(narrow.ok());
  EXPECT_EQ(narrow.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(narrow.status().message().find("multiples of 128"), std::string::npos)
      << narrow.status();
  o.model_dir = testing::Fixture("llama_tied");
  auto f32 = Engine::Load(o, &report);
  ASSERT_FALSE(f32.ok());
  EXPECT_EQ(f32.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(f32.status().message().find("float32 weights"), std::string::npos) << f32.status();
  o.model_dir = testing::Fixture("llama_bf16_wide");
  o.dtype = "bfloat16";
  auto bf16 = Engine::Load(o, &report);
  ASSERT_FALSE(bf16.ok());
  EXPECT_EQ(bf16.status().code(), absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, BatchTest,
                         ::testing::Values("llama_tied", "mistral_window", "gpt2"));

// --kv_cache_dtype: keys and values are cached in half precision and read in float32. The
// fused decode kernel and the ATen path ("none") read the same rounded cache, so step-by-step
// decode equals a full prefill over the same cache dtype to 1e-4 on either; against the float32
// reference the logits move by the rounding of K and V (bfloat16 keeps 8 significant bits, a
// relative error of at most 2^-9 per element; float16 11, 2^-12). The tolerance is relative
// to the largest logit: 2% for bfloat16, 0.25% for float16 (8 times finer, its 3 more bits),
// about 3 times the worst measured on these fixtures (0.65% and 0.06% of logits up to 15).
// The greedy continuations stay equal to the reference's.
class KvCacheDtypeTest
    : public ::testing::TestWithParam<std::tuple<const char*, const char*, const char*>> {};

TEST_P(KvCacheDtypeTest, HalfPrecisionCacheStaysCloseToTheReference) {
  const auto [fixture, kernels, kv] = GetParam();
  cpu::Isa isa;
  if (!cpu::IsaFromName(kernels, &isa) || isa > cpu::SupportedIsa()) GTEST_SKIP();
  auto engine = LoadEngine(fixture, kernels, kv);
  auto f32 = LoadEngine(fixture, kernels, "float32");
  ASSERT_NE(engine, nullptr);
  ASSERT_NE(f32, nullptr);
  EXPECT_EQ(engine->report().kv_cache_dtype, kv);
  EXPECT_EQ(2 * engine->kv_bytes_per_position(), f32->kv_bytes_per_position());
  auto ref = testing::ReadJson(testing::Fixture(fixture) + "/reference.json");
  const std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
  const int64_t vocab = engine->config().vocab_size;
  auto logits = engine->PromptLogits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const auto [worst, largest] = WorstAndLargestLogit(*logits, ref, vocab);
  std::printf("%s %s: worst logit error %.4g, largest logit %.4g\n", fixture, kv, worst, largest);
  const double tolerance = (std::string(kv) == "bfloat16" ? 0.02 : 0.0025) * largest;
  EXPECT_LT(worst, tolerance) << fixture << " " << kv;
  EXPECT_GT(worst, 0.0) << "the cache must really be " << kv;
  // Greedy continuation: equal to the float32 reference's; each step's logits equal a full
  // prefill's over the same cache dtype.
  GenerateRequest req;
  req.prompt = prompt;
  req.max_new_tokens = static_cast<int64_t>(ref["greedy"].size());
  req.ignore_eos = true;
  auto result = Generate(*engine, req);
  ASSERT_TRUE(result.ok()) << result.status();
  std::vector<int32_t> all = prompt;
  for (const StepOutput& s : result->steps) all.push_back(s.token);
  EXPECT_EQ(std::vector<int32_t>(all.begin() + static_cast<int64_t>(prompt.size()), all.end()),
            ref["greedy"].get<std::vector<int32_t>>());
  auto full = engine->PromptLogits(all);
  ASSERT_TRUE(full.ok()) << full.status();
  for (size_t i = 0; i < result->steps.size(); ++i) {
    std::vector<float> lp = LogSoftmax(full->data() + (prompt.size() - 1 + i) * vocab, vocab);
    EXPECT_NEAR(result->steps[i].logprob, lp[result->steps[i].token], 1e-4) << "step " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Fixtures, KvCacheDtypeTest,
    ::testing::Combine(::testing::Values("llama_tied", "qwen2_bias", "qwen3_qk_norm",
                                         "mistral_window", "gpt2"),
                       ::testing::Values("none", "avx2"), ::testing::Values("bfloat16", "float16")),
    [](const auto& info) {
      return std::string(std::get<0>(info.param)) + "_" + std::get<1>(info.param) + "_" +
             std::get<2>(info.param);
    });

// --matmul_precision medium on a bfloat16 checkpoint (AVX-512 BF16): the inputs of every base
// matrix are rounded to bfloat16, a relative error of at most 2^-8 each, the rounding the bfloat16
// KV cache makes to K and V (KvCacheDtypeTest), here at every matrix; the tolerance is the
// same 2% of the largest logit, about 3 times the worst measured (0.63% on llama_bf16, logits
// up to 15). The greedy continuation stays the float32 reference's, step-by-step
// decode equals a full prefill (a row's sums do not depend on its batch), the report says the
// products are bfloat16, and highest's logits differ (the products really changed).
TEST(MatmulPrecisionTest, MediumStaysCloseToTheReferenceOnBfloat16Weights) {
  EngineOptions o;
  o.model_dir = testing::Fixture("llama_bf16");
  o.kv_cache_dtype = "float32";
  o.matmul_precision = "medium";
  LoadReport report;
  auto loaded = Engine::Load(o, &report);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  const Engine& engine = **loaded;
  auto ref = testing::ReadJson(testing::Fixture("llama_bf16") + "/reference.json");
  const std::vector<int32_t> prompt = ref["prompt"].get<std::vector<int32_t>>();
  auto highest = LoadEngine("llama_bf16", "auto", "float32");
  ASSERT_NE(highest, nullptr);
  auto exact = highest->PromptLogits(prompt);
  ASSERT_TRUE(exact.ok());
  EXPECT_EQ(report.matmul_precision, "medium");
  if (!cpu::Bf16ProductsAvailable()) {
    EXPECT_FALSE(report.bf16_products);
    EXPECT_THAT(report.ToText(), HasSubstr("computes as highest here"));
    auto logits = engine.PromptLogits(prompt);
    ASSERT_TRUE(logits.ok());
    EXPECT_EQ(*logits, *exact);  // No AVX-512 BF16 here: medium computes as highest.
    return;
  }
  EXPECT_TRUE(report.bf16_products);
  EXPECT_THAT(report.ToText(), HasSubstr("products     bfloat16 (--matmul_precision medium)"));
  EXPECT_EQ(report.ToJson()["bf16_products"], true);
  const int64_t vocab = engine.config().vocab_size;
  auto logits = engine.PromptLogits(prompt);
  ASSERT_TRUE(logits.ok()) << logits.status();
  const auto [worst, largest] = WorstAndLargestLogit(*logits, ref, vocab);
  std::printf("llama_bf16 medium: worst logit error %.4g, largest logit %.4g\n", worst, largest);
  EXPECT_LT(worst, 0.02 * largest);
  EXPECT_NE(*logits, *exact);
  const std::vector<StepOutput> steps = GreedyLikeReference(engine, ref);
  std::vector<int32_t> all = prompt;
  for (const StepOutput& s : steps) all.push_back(s.token);
  auto full = engine.PromptLogits(all);
  ASSERT_TRUE(full.ok()) << full.status();
  for (size_t i = 0; i < steps.size(); ++i) {
    std::vector<float> lp = LogSoftmax(full->data() + (prompt.size() - 1 + i) * vocab, vocab);
    EXPECT_NEAR(steps[i].logprob, lp[steps[i].token], 1e-4) << "step " << i;
  }
}

// medium changes nothing where there are no bfloat16 matrices to multiply in float32 (a float16
// checkpoint, float32 weights), and an unknown level is refused by name.
TEST(MatmulPrecisionTest, MediumLeavesOtherWeightsAloneAndUnknownLevelsAreRefused) {
  for (const char* fixture : {"llama_f16", "llama_tied"}) {
    SCOPED_TRACE(fixture);
    EngineOptions o;
    o.model_dir = testing::Fixture(fixture);
    o.matmul_precision = "medium";
    LoadReport report;
    auto medium = Engine::Load(o, &report);
    ASSERT_TRUE(medium.ok()) << medium.status();
    EXPECT_FALSE(report.bf16_products);
    EXPECT_THAT(report.ToText(), HasSubstr("computes as highest here"));
    auto highest = LoadEngine(fixture);
    ASSERT_NE(highest, nullptr);
    const std::vector<int32_t> prompt = {5, 9, 2, 77, 31};
    auto a = (*medium)->PromptLogits(prompt);
    auto b = highest->PromptLogits(prompt);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b);
  }
  EngineOptions o;
  o.model_dir = testing::Fixture("llama_bf16");
  o.matmul_precision = "low";
  LoadReport report;
  auto refused = Engine::Load(o, &report);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("matmul_precision must be highest, high or medium, got \"low\""));
}

TEST(EngineTest, RefusesAnUnknownKvCacheDtype) {
  EngineOptions o;
  o.model_dir = testing::Fixture("gpt2");
  o.kv_cache_dtype = "int4";
  LoadReport report;
  auto engine = Engine::Load(o, &report);
  EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(engine.status().message()),
              HasSubstr("kv_cache_dtype must be auto, float32, bfloat16 or float16, got \"int4\""));
}

// Prefix reuse (--prefix_cache_bytes): a request whose prompt starts with the full 16-token
// blocks of an earlier one copies their keys and values and prefills only the rest; its
// outputs, greedy and seeded, equal those of the same request on an engine without the cache
// (bit for bit on the Llama-family fixtures: see ExpectSameAnswers). A tiny budget drops blocks
// least recently used and changes no answer.
class PrefixCacheTest : public ::testing::TestWithParam<const char*> {};

std::unique_ptr<Engine> LoadWithPrefixCache(const std::string& fixture, int64_t bytes) {
  EngineOptions o;
  o.model_dir = testing::Fixture(fixture);
  o.prefix_cache_bytes = bytes;
  LoadReport report;
  auto engine = Engine::Load(o, &report);
  EXPECT_TRUE(engine.ok()) << engine.status();
  return engine.ok() ? *std::move(engine) : nullptr;
}

std::vector<StepOutput> RunAlone(const Engine& engine, const std::vector<int32_t>& prompt,
                                 const SamplingParams& params, int steps, int64_t* cached = nullptr) {
  auto seq = engine.NewSequence(prompt, params);
  EXPECT_TRUE(seq.ok()) << seq.status();
  if (!seq.ok()) return {};
  if (cached != nullptr) *cached = (*seq)->cached_tokens();
  std::vector<StepOutput> out;
  for (int i = 0; i < steps; ++i) {
    auto res = engine.Step({seq->get()});
    EXPECT_TRUE(res.ok()) << res.status();
    if (!res.ok()) break;
    out.push_back((*res)[0]);
  }
  return out;
}

// Bit for bit where a prefill's sums do not depend on its rows (the CPU kernels on the
// Llama-family fixtures, as ChunkedBitsTest checks); elsewhere tokens equal and log-probs to
// 1e-5 (GPT-2's Conv1D goes through BLAS GEMMs, whose sums over fewer rows may round
// differently in the last bit).
void ExpectSameAnswers(const std::vector<StepOutput>& a, const std::vector<StepOutput>& b,
                       const std::string& fixture) {
  const bool exact = fixture != "gpt2" && std::string(Engine::cpu_kernels()) != "none";
  ExpectSameOutputs(a, b, exact ? 0.0 : 1e-5);
}

TEST_P(PrefixCacheTest, ReusedPrefixesAnswerAsColdRuns) {
  auto cold = LoadEngine(GetParam());
  auto warm = LoadWithPrefixCache(GetParam(), 64 << 20);
  ASSERT_NE(cold, nullptr);
  ASSERT_NE(warm, nullptr);
  std::vector<int32_t> shared;
  for (int i = 0; i < 37; ++i) shared.push_back(static_cast<int32_t>((11 * i + 5) % 250 + 1));
  auto with_tail = [&](std::vector<int32_t> tail) {
    std::vector<int32_t> p = shared;
    p.insert(p.end(), tail.begin(), tail.end());
    return p;
  };
  SamplingParams greedy;
  greedy.top_logprobs = 3;
  SamplingParams seeded = greedy;
  seeded.temperature = 0.9f;
  seeded.top_p = 0.9f;
  seeded.seed = 77;
  int64_t cached = -1;
  RunAlone(*warm, with_tail({3, 4, 5}), greedy, 2, &cached);
  EXPECT_EQ(cached, 0);
  for (const SamplingParams& params : {greedy, seeded}) {
    const std::vector<int32_t> prompt = with_tail({9, 8, 7, 6, 5, 4});
    auto want = RunAlone(*cold, prompt, params, 6);
    auto got = RunAlone(*warm, prompt, params, 6, &cached);
    EXPECT_EQ(cached, 32);  // Two full blocks of the 37 shared tokens.
    ExpectSameAnswers(got, want, GetParam());
  }
  // A prompt that is exactly cached blocks still runs its last token.
  const std::vector<int32_t> exact(shared.begin(), shared.begin() + 32);
  auto want = RunAlone(*cold, exact, greedy, 3);
  auto got = RunAlone(*warm, exact, greedy, 3, &cached);
  EXPECT_EQ(cached, 16);
  ExpectSameAnswers(got, want, GetParam());
  const PrefixCacheStats stats = warm->prefix_cache_stats();
  EXPECT_EQ(stats.hit_tokens, 32 + 32 + 16);
  EXPECT_EQ(stats.queried_tokens, 40 + 43 + 43 + 32);
  EXPECT_GT(stats.blocks, 0);
  EXPECT_LE(stats.bytes, stats.max_bytes);

  // Room for about three blocks: blocks come and go, answers stay.
  auto tiny = LoadWithPrefixCache(GetParam(), 3 * 16 * warm->kv_bytes_per_position() + 1);
  ASSERT_NE(tiny, nullptr);
  for (int round = 0; round < 3; ++round) {
    for (int32_t t : {21, 22}) {
      std::vector<int32_t> prompt = with_tail({t});
      prompt.insert(prompt.begin(), static_cast<int32_t>(round + 1));
      ExpectSameAnswers(RunAlone(*tiny, prompt, greedy, 3), RunAlone(*cold, prompt, greedy, 3), GetParam());
    }
    EXPECT_LE(tiny->prefix_cache_stats().bytes, tiny->prefix_cache_stats().max_bytes);
  }
  EXPECT_GT(tiny->prefix_cache_stats().hit_tokens, 0);
}

// A prompt prefilled in chunks hands its full blocks to the cache chunk by chunk, so a request
// that shares them is served from the cache before the first prompt has finished.
TEST_P(PrefixCacheTest, AChunkedPromptsBlocksAreReusableBeforeItCompletes) {
  auto cold = LoadEngine(GetParam());
  auto warm = LoadWithPrefixCache(GetParam(), 64 << 20);
  ASSERT_NE(cold, nullptr);
  ASSERT_NE(warm, nullptr);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 44; ++i) prompt.push_back(static_cast<int32_t>((7 * i + 3) % 250 + 1));
  SamplingParams greedy;
  greedy.top_logprobs = 2;
  auto first = warm->NewSequence(prompt, greedy);
  ASSERT_TRUE(first.ok()) << first.status();
  for (int64_t want_blocks : {1, 2}) {
    auto step = warm->Step({first->get()}, {16});
    ASSERT_TRUE(step.ok()) << step.status();
    EXPECT_TRUE((*step)[0].prefill_only);
    EXPECT_EQ(warm->prefix_cache_stats().blocks, want_blocks);
  }
  // 32 of 44 prompt tokens run; a second request with the same first 32 reuses both blocks.
  std::vector<int32_t> other(prompt.begin(), prompt.begin() + 32);
  for (int32_t t : {201, 202, 203}) other.push_back(t);
  int64_t cached = -1;
  auto got = RunAlone(*warm, other, greedy, 4, &cached);
  EXPECT_EQ(cached, 32);
  ExpectSameAnswers(got, RunAlone(*cold, other, greedy, 4), GetParam());
  // The first request completes as it would have alone.
  std::vector<StepOutput> rest;
  for (int i = 0; i < 4; ++i) {
    auto step = warm->Step({first->get()});
    ASSERT_TRUE(step.ok()) << step.status();
    rest.push_back((*step)[0]);
  }
  ExpectSameAnswers(rest, RunAlone(*cold, prompt, greedy, 4), GetParam());
}

// Reused blocks are read in place, not copied: two sequences that reuse the same two blocks
// hold only their own positions, the blocks count once (pinned while read, so a shrink to
// nothing keeps them), both answer as cold runs, and once they finish the blocks can go.
TEST_P(PrefixCacheTest, ReusedBlocksAreSharedAndKeptWhileRead) {
  auto cold = LoadEngine(GetParam());
  auto warm = LoadWithPrefixCache(GetParam(), 64 << 20);
  ASSERT_NE(cold, nullptr);
  ASSERT_NE(warm, nullptr);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 37; ++i) prompt.push_back(static_cast<int32_t>((5 * i + 2) % 250 + 1));
  SamplingParams greedy;
  greedy.top_logprobs = 2;
  RunAlone(*warm, prompt, greedy, 1);
  const int64_t block_bytes = 16 * warm->kv_bytes_per_position();
  EXPECT_EQ(warm->prefix_cache_stats().blocks, 2);
  EXPECT_EQ(warm->prefix_cache_stats().bytes, 2 * block_bytes);
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 0);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<std::unique_ptr<Sequence>> seqs;
  for (int32_t t : {201, 202}) {
    prompts.emplace_back(prompt.begin(), prompt.begin() + 32);
    prompts.back().insert(prompts.back().end(), {t, 7, t});
    auto seq = warm->NewSequence(prompts.back(), greedy, nullptr, 48);
    ASSERT_TRUE(seq.ok()) << seq.status();
    EXPECT_EQ((*seq)->cached_tokens(), 32);
    EXPECT_EQ((*seq)->kv_shared_positions(), 32);
    EXPECT_EQ((*seq)->kv_capacity(), 48);
    EXPECT_EQ((*seq)->kv_bytes(), 16 * warm->kv_bytes_per_position());
    seqs.push_back(*std::move(seq));
  }
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 2 * block_bytes);
  warm->ShrinkPrefixCache(0);
  EXPECT_EQ(warm->prefix_cache_stats().blocks, 2);
  for (size_t i = 0; i < seqs.size(); ++i) {
    std::vector<StepOutput> got;
    for (int s = 0; s < 4; ++s) {
      auto step = warm->Step({seqs[i].get()});
      ASSERT_TRUE(step.ok()) << step.status();
      got.push_back((*step)[0]);
    }
    ExpectSameAnswers(got, RunAlone(*cold, prompts[i], greedy, 4), GetParam());
  }
  seqs.clear();
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 0);
  warm->ShrinkPrefixCache(0);
  EXPECT_EQ(warm->prefix_cache_stats().blocks, 0);
  EXPECT_EQ(warm->prefix_cache_stats().bytes, 0);
}

// A prefill hands its full prompt blocks to the prefix cache without a copy: the entries are
// the sequence's own blocks, so they count once (the sequence's kv_bytes drop by them, the
// cache holds them, pinned while the sequence reads them), a later request reads them in
// place, and both answer as cold runs.
TEST_P(PrefixCacheTest, PrefillHandsItsFullBlocksOverWithoutACopy) {
  auto cold = LoadEngine(GetParam());
  auto warm = LoadWithPrefixCache(GetParam(), 64 << 20);
  ASSERT_NE(cold, nullptr);
  ASSERT_NE(warm, nullptr);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 37; ++i) prompt.push_back(static_cast<int32_t>((3 * i + 5) % 250 + 1));
  SamplingParams greedy;
  greedy.top_logprobs = 2;
  const int64_t block_bytes = 16 * warm->kv_bytes_per_position();
  auto first = warm->NewSequence(prompt, greedy, nullptr, 64);
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ((*first)->kv_bytes(), 4 * block_bytes);
  std::vector<StepOutput> first_got;
  auto step = warm->Step({first->get()});
  ASSERT_TRUE(step.ok()) << step.status();
  first_got.push_back((*step)[0]);
  EXPECT_EQ(warm->prefix_cache_stats().blocks, 2);
  EXPECT_EQ(warm->prefix_cache_stats().bytes, 2 * block_bytes);
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 2 * block_bytes);
  EXPECT_EQ((*first)->kv_bytes(), 2 * block_bytes) << "the handed-over blocks count in the prefix cache only";
  std::vector<int32_t> other(prompt.begin(), prompt.begin() + 32);
  other.insert(other.end(), {201, 7, 201});
  auto second = warm->NewSequence(other, greedy, nullptr, 48);
  ASSERT_TRUE(second.ok()) << second.status();
  EXPECT_EQ((*second)->cached_tokens(), 32);
  EXPECT_EQ((*second)->kv_bytes(), block_bytes);
  std::vector<StepOutput> second_got;
  for (int s = 0; s < 4; ++s) {
    auto a = warm->Step({first->get(), second->get()});
    ASSERT_TRUE(a.ok()) << a.status();
    first_got.push_back((*a)[0]);
    second_got.push_back((*a)[1]);
  }
  ExpectSameAnswers(first_got, RunAlone(*cold, prompt, greedy, 5), GetParam());
  ExpectSameAnswers(second_got, RunAlone(*cold, other, greedy, 4), GetParam());
  first->reset();
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 2 * block_bytes) << "the second request still reads both";
  second->reset();
  EXPECT_EQ(warm->prefix_cache_stats().pinned_bytes, 0);
  warm->ShrinkPrefixCache(0);
  EXPECT_EQ(warm->prefix_cache_stats().bytes, 0);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PrefixCacheTest,
                         ::testing::Values("llama_tied", "mistral_window", "gpt2", "qwen2_bias"));

// The prefix cache stores a full own block of a KV cache by reference: a later cache reads the
// very tensors the first one wrote, while the first goes on writing its next block. Token
// blocks that a soft prompt of other than whole blocks shifts off the own blocks are copied,
// unless the cache aligned its blocks after the soft prompt.
TEST(PrefixCacheBlocksTest, FullOwnBlocksAreStoredByReference) {
  at::manual_seed(5);
  const at::TensorOptions options = at::TensorOptions().dtype(at::kFloat);
  const int64_t layers = 2, heads = 2, d = 8;
  const int64_t block_bytes = 2 * layers * heads * 16 * d * 4;
  PrefixCache prefix(1 << 20);
  std::vector<int32_t> tokens;
  for (int32_t i = 1; i <= 45; ++i) tokens.push_back(i);
  at::Tensor k = at::randn({layers, heads, 45, d}), v = at::randn({layers, heads, 45, d});
  KvCache first(layers, heads, d, 48, options);
  for (int64_t layer = 0; layer < layers; ++layer) first.Append(layer, k[layer].narrow(1, 0, 40), v[layer].narrow(1, 0, 40));
  first.Commit(40);
  prefix.Insert(nullptr, tokens, 40, 0, 0, first);
  EXPECT_EQ(prefix.blocks(), 2);
  EXPECT_EQ(prefix.bytes(), 2 * block_bytes);
  EXPECT_EQ(prefix.pinned_bytes(), 2 * block_bytes);
  EXPECT_EQ(first.bytes(), block_bytes);
  KvCache second(layers, heads, d, 48, options);
  EXPECT_EQ(prefix.Reuse(nullptr, tokens, 39, 0, 0, second), 32);
  for (int64_t layer = 0; layer < layers; ++layer) {
    for (int64_t b = 0; b < 2; ++b) {
      EXPECT_EQ(second.Read(layer, 16 * b, 16).first.data_ptr(), first.blocks()[b].keys[layer].data_ptr());
      EXPECT_EQ(second.Read(layer, 16 * b, 16).second.data_ptr(), first.blocks()[b].values[layer].data_ptr());
    }
    // The first cache writes on into its third block; what the second reads stays as it was.
    first.Append(layer, k[layer].narrow(1, 40, 5), v[layer].narrow(1, 40, 5));
    EXPECT_TRUE(at::equal(second.Read(layer, 0, 32).first, k[layer].narrow(1, 0, 32)));
    EXPECT_TRUE(at::equal(second.Read(layer, 0, 32).second, v[layer].narrow(1, 0, 32)));
  }
  // A 5-position soft prompt: its segment and the blocks after it are copies.
  KvCache shifted(layers, heads, d, 48, options);
  for (int64_t layer = 0; layer < layers; ++layer) shifted.Append(layer, k[layer], v[layer]);
  shifted.Commit(45);
  prefix.Insert(nullptr, tokens, 40, 0, 5, shifted);
  EXPECT_EQ(prefix.blocks(), 5);
  EXPECT_EQ(shifted.bytes(), 3 * block_bytes);
  KvCache third(layers, heads, d, 48, options);
  EXPECT_EQ(prefix.Reuse(nullptr, tokens, 39, 0, 5, third), 32);
  for (int64_t layer = 0; layer < layers; ++layer) {
    EXPECT_NE(third.Read(layer, 5, 16).first.data_ptr(), shifted.Read(layer, 5, 16).first.data_ptr());
    EXPECT_TRUE(at::equal(third.Read(layer, 0, 37).first, k[layer].narrow(1, 0, 37)));
    EXPECT_TRUE(at::equal(third.Read(layer, 0, 37).second, v[layer].narrow(1, 0, 37)));
  }
  // With the own blocks aligned after the soft prompt (the first one leaves 11 positions
  // unused), the token blocks are whole own blocks again and are stored by reference.
  std::vector<int32_t> other_tokens;
  for (int32_t t : tokens) other_tokens.push_back(t + 100);
  KvCache aligned(layers, heads, d, 48, options);
  aligned.AlignBlocks(5);
  EXPECT_GE(aligned.capacity(), 48);
  ASSERT_EQ(aligned.blocks().size(), 4u);
  EXPECT_EQ(aligned.blocks()[0].length, 5);
  EXPECT_EQ(aligned.blocks()[1].begin, 5);
  for (int64_t layer = 0; layer < layers; ++layer) aligned.Append(layer, k[layer], v[layer]);
  aligned.Commit(45);
  prefix.Insert(nullptr, other_tokens, 40, 0, 5, aligned);
  EXPECT_EQ(prefix.blocks(), 7);  // Two more blocks; the soft-prompt segment is cached already.
  EXPECT_EQ(aligned.bytes(), 2 * block_bytes);
  KvCache fourth(layers, heads, d, 48, options);
  EXPECT_EQ(prefix.Reuse(nullptr, other_tokens, 39, 0, 5, fourth), 32);
  for (int64_t layer = 0; layer < layers; ++layer) {
    EXPECT_EQ(fourth.Read(layer, 5, 16).first.data_ptr(), aligned.blocks()[1].keys[layer].data_ptr());
    EXPECT_EQ(fourth.Read(layer, 21, 16).second.data_ptr(), aligned.blocks()[2].values[layer].data_ptr());
    EXPECT_TRUE(at::equal(fourth.Read(layer, 0, 37).first, k[layer].narrow(1, 0, 37)));
    EXPECT_TRUE(at::equal(fourth.Read(layer, 0, 37).second, v[layer].narrow(1, 0, 37)));
    EXPECT_TRUE(at::equal(aligned.Read(layer, 0, 45).first, k[layer]));
  }
}

// Preemption by recomputation (the scheduler's answer to a full KV pool): Preempt frees a
// sequence's cache and keeps its tokens and sampling state; after Resume its next steps
// prefill prompt and generated tokens again (here also in chunks, and from the prefix cache)
// and it goes on exactly as a run never interrupted, greedy and seeded with penalties.
class PreemptTest : public ::testing::TestWithParam<const char*> {};

TEST_P(PreemptTest, AResumedSequenceAnswersAsIfNeverPreempted) {
  auto plain = LoadEngine(GetParam());
  auto cached = LoadWithPrefixCache(GetParam(), 64 << 20);
  ASSERT_NE(plain, nullptr);
  ASSERT_NE(cached, nullptr);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 21; ++i) prompt.push_back(static_cast<int32_t>((5 * i + 7) % 240 + 1));
  SamplingParams greedy;
  greedy.top_logprobs = 3;
  SamplingParams seeded = greedy;
  seeded.temperature = 0.8f;
  seeded.top_k = 40;
  seeded.seed = 1234;
  seeded.repetition_penalty = 1.3f;
  seeded.frequency_penalty = 0.4f;
  constexpr int kSteps = 24;
  for (const Engine* engine : {plain.get(), cached.get()}) {
    for (const SamplingParams& params : {greedy, seeded}) {
      const auto want = RunAlone(*plain, prompt, params, kSteps);
      auto seq = engine->NewSequence(prompt, params, nullptr, 1);
      ASSERT_TRUE(seq.ok()) << seq.status();
      Sequence& q = **seq;
      std::vector<StepOutput> got;
      std::set<int> preempted_at;
      while (static_cast<int>(got.size()) < kSteps) {
        const int n = static_cast<int>(got.size());
        if ((n == 3 || n == 9 || n == 17) && preempted_at.insert(n).second) {
          engine->Preempt(q);
          EXPECT_TRUE(q.preempted());
          EXPECT_EQ(q.kv_bytes(), 0);
          EXPECT_EQ(q.kv_capacity(), 0);
          EXPECT_EQ(q.pending_tokens(), static_cast<int64_t>(q.tokens().size()));
          EXPECT_EQ(engine->Step({&q}).status().code(), absl::StatusCode::kFailedPrecondition);
          // Room for only part of it: the forward pass grows the cache as it needs.
          ASSERT_TRUE(engine->Resume(q, 5).ok());
          EXPECT_FALSE(q.preempted());
          EXPECT_EQ(engine->Resume(q, 5).code(), absl::StatusCode::kFailedPrecondition);
        }
        // The second resume recomputes in chunks of 8 tokens.
        const int64_t limit = n >= 9 && n < 17 ? 8 : 0;
        auto step = engine->Step({&q}, {limit});
        ASSERT_TRUE(step.ok()) << step.status();
        if ((*step)[0].prefill_only) continue;
        got.push_back((*step)[0]);
      }
      EXPECT_EQ(preempted_at.size(), 3u);
      ExpectSameAnswers(got, want, GetParam());
    }
  }
  // The recomputations found their blocks in the prefix cache: the prompt's first block at
  // least, every time.
  EXPECT_GT(cached->prefix_cache_stats().hit_tokens, 0);
}

// ReserveKv grows a cache by whole blocks to hold the positions asked, and never shrinks it.
TEST(EngineKvTest, ReserveKvGrowsToTheBlocksOfThePositionsAsked) {
  auto engine = LoadEngine("llama_tied");
  ASSERT_NE(engine, nullptr);
  auto seq = engine->NewSequence({1, 2, 3}, SamplingParams(), nullptr, 16);
  ASSERT_TRUE(seq.ok()) << seq.status();
  EXPECT_EQ((*seq)->kv_capacity(), 16);
  EXPECT_EQ((*seq)->kv_bytes(), 16 * engine->kv_bytes_per_position());
  ASSERT_TRUE(engine->ReserveKv(**seq, 40).ok());
  EXPECT_EQ((*seq)->kv_capacity(), 48);
  ASSERT_TRUE(engine->ReserveKv(**seq, 20).ok());
  EXPECT_EQ((*seq)->kv_capacity(), 48);
  EXPECT_EQ((*seq)->kv_bytes(), 48 * engine->kv_bytes_per_position());
  engine->Preempt(**seq);
  EXPECT_EQ(engine->ReserveKv(**seq, 48).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(engine->NewSequence({1, 2}, SamplingParams(), nullptr, -1).status().code(),
            absl::StatusCode::kInvalidArgument);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, PreemptTest,
                         ::testing::Values("llama_tied", "mistral_window", "gpt2", "qwen2_bias"));

// Without the CPU kernels (cpu_kernels "none": the ATen path, as on a GPU), a long prompt's
// attention runs in blocks of queries (EngineOptions::attention_block_bytes). With blocks of
// 16 queries, every prompt position's logits equal those of the whole prompt at once (which
// other tests hold to the PyTorch reference), here for a sliding window too, and so do the
// answers of a prompt prefilled in chunks whose blocks start past cached positions.
class AttentionBlockTest : public ::testing::TestWithParam<const char*> {};

TEST_P(AttentionBlockTest, QueryBlocksEqualTheWholePromptAtOnce) {
  auto whole = LoadEngine(GetParam(), "none");
  EngineOptions o;
  o.model_dir = testing::Fixture(GetParam());
  o.cpu_kernels = "none";
  o.attention_block_bytes = 1;  // Blocks of 16 queries, the least.
  LoadReport report;
  auto blocked = Engine::Load(o, &report);
  ASSERT_TRUE(blocked.ok()) << blocked.status();
  ASSERT_NE(whole, nullptr);
  std::vector<int32_t> prompt;
  for (int i = 0; i < 50; ++i) prompt.push_back(static_cast<int32_t>((13 * i + 2) % 250 + 1));
  auto want = whole->PromptLogits(prompt);
  auto got = (*blocked)->PromptLogits(prompt);
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_EQ(want->size(), got->size());
  float largest = 0, worst = 0;
  for (size_t i = 0; i < want->size(); ++i) {
    largest = std::max(largest, std::abs((*want)[i]));
    worst = std::max(worst, std::abs((*want)[i] - (*got)[i]));
  }
  EXPECT_LE(worst, 1e-5f * largest) << "largest logit " << largest;

  SamplingParams greedy;
  greedy.top_logprobs = 2;
  auto seq = (*blocked)->NewSequence(prompt, greedy);
  ASSERT_TRUE(seq.ok()) << seq.status();
  std::vector<StepOutput> chunked;
  auto first = (*blocked)->Step({seq->get()}, {21});
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_TRUE((*first)[0].prefill_only);
  for (int i = 0; i < 4; ++i) {
    auto step = (*blocked)->Step({seq->get()});
    ASSERT_TRUE(step.ok()) << step.status();
    chunked.push_back((*step)[0]);
  }
  ExpectSameOutputs(chunked, RunAlone(*whole, prompt, greedy, 4), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, AttentionBlockTest,
                         ::testing::Values("llama_tied", "mistral_window", "gpt2", "qwen2_bias"));

// With the CPU kernels, every query's attention is computed alone over the cache in place
// (cpu::CachedAttention) and the Llama-family projections are row-independent (cpu::Linear),
// so a prompt prefilled in chunks of any size, or one token at a time, gives the bits of the
// whole prompt at once: the same logprobs and the same continuation, for a sliding window too.
// (GPT-2's Conv1D weights are [in, out]; they go through BLAS, whose sums depend on the number
// of rows, so GPT-2 is held to 1e-5 by the other tests instead.)
class ChunkedBitsTest : public ::testing::TestWithParam<const char*> {};

TEST_P(ChunkedBitsTest, ChunkedPrefillGivesTheWholePromptsBits) {
  auto engine = LoadEngine(GetParam());
  ASSERT_NE(engine, nullptr);
  ASSERT_NE(std::string(Engine::cpu_kernels()), "none") << "these bits need the CPU kernels (AVX2 or AVX-512F)";
  std::vector<int32_t> prompt;
  for (int i = 0; i < 50; ++i) prompt.push_back(static_cast<int32_t>((7 * i + 3) % 250 + 1));
  SamplingParams greedy;
  greedy.top_logprobs = 3;
  const std::vector<StepOutput> whole = RunAlone(*engine, prompt, greedy, 5);
  for (const int64_t chunk : {int64_t{1}, int64_t{7}, int64_t{16}, int64_t{33}}) {
    auto seq = engine->NewSequence(prompt, greedy);
    ASSERT_TRUE(seq.ok()) << seq.status();
    std::vector<StepOutput> got;
    while (got.size() < whole.size()) {
      auto step = engine->Step({seq->get()}, {chunk});
      ASSERT_TRUE(step.ok()) << step.status();
      if (!(*step)[0].prefill_only) got.push_back((*step)[0]);
    }
    ExpectSameOutputs(got, whole, 0.0);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ChunkedBitsTest,
                         ::testing::Values("llama_tied", "mistral_window", "qwen2_bias"));

TEST(EngineTest, RefusesPromptsThatDoNotFit) {
  auto engine = LoadEngine("gpt2");  // n_positions 64.
  ASSERT_NE(engine, nullptr);
  auto too_long = engine->NewSequence(std::vector<int32_t>(64, 7), SamplingParams());
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(too_long.status().message()), HasSubstr("context holds 64"));
  auto bad_id = engine->NewSequence({1, 256}, SamplingParams());
  EXPECT_THAT(std::string(bad_id.status().message()),
              HasSubstr("prompt token 1 is 256, outside the vocabulary [0, 256)"));
  EXPECT_FALSE(engine->NewSequence({}, SamplingParams()).ok());
  SamplingParams bad;
  bad.top_p = 1.5f;
  EXPECT_EQ(engine->NewSequence({1}, bad).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, GenerationStopsAtTheContextAndAtEos) {
  auto engine = LoadEngine("gpt2");
  ASSERT_NE(engine, nullptr);
  GenerateRequest req;
  req.prompt = std::vector<int32_t>(60, 7);
  req.max_new_tokens = 100;
  req.ignore_eos = true;
  auto result = Generate(*engine, req);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->steps.size(), 4u);  // 60 + 4 = n_positions.
  EXPECT_EQ(result->finish_reason, FinishReason::kLength);
  // Stop on the first generated id: the run ends after one token with reason "stop".
  req.prompt = {1, 2, 3};
  req.max_new_tokens = 5;
  auto first = Generate(*engine, req);
  ASSERT_TRUE(first.ok());
  req.stop_token_ids = {first->steps[0].token};
  auto stopped = Generate(*engine, req);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->steps.size(), 1u);
  EXPECT_EQ(stopped->finish_reason, FinishReason::kStop);
}

}  // namespace
}  // namespace adapterd::core
