#include "core/model_loader.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/cpu_kernels.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/test_util.h"

namespace adapterd::core {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Not;

struct Loaded {
  absl::StatusOr<std::unique_ptr<CausalLm>> model;
  LoadReport report;
};

Loaded Load(const std::string& fixture, LoadOptions options = LoadOptions()) {
  Loaded l;
  l.model = LoadModel(testing::Fixture(fixture), options, &l.report);
  return l;
}

// Sum of declared parameter elements, computed from the config alone.
int64_t DeclaredElements(const ModelConfig& c, bool count_output) {
  int64_t n = 0;
  for (const ParamSpec& p : DeclareParameters(c)) {
    if (!count_output && p.name == kOutputEmbeddingName) continue;
    int64_t e = 1;
    for (int64_t d : p.shape) e *= d;
    n += e;
  }
  return n;
}

TEST(ModelLoaderTest, TiedOutputSharesTheEmbeddingStorage) {
  Loaded l = Load("llama_tied");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  const auto& w = (*l.model)->weights();
  EXPECT_EQ(w.at("lm_head.weight").data_ptr(), w.at("model.embed_tokens.weight").data_ptr());
  ASSERT_EQ(l.report.tied.size(), 1u);
  EXPECT_EQ(l.report.tied[0].target, "lm_head.weight");
  EXPECT_EQ(l.report.tied[0].source, "model.embed_tokens.weight");
  EXPECT_TRUE(l.report.tied[0].same_storage);
  EXPECT_EQ(l.report.tied[0].bytes_saved, 256 * 64 * 4);
  const ModelConfig& c = (*l.model)->config();
  EXPECT_EQ(l.report.parameter_count, DeclaredElements(c, /*count_output=*/false));
  EXPECT_TRUE(l.report.ok());
  EXPECT_TRUE(l.report.missing.empty());
}

TEST(ModelLoaderTest, F32CheckpointIsServedZeroCopyFromTheMapping) {
  Loaded l = Load("llama_tied");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  EXPECT_EQ(l.report.bytes_copied, 0);
  EXPECT_EQ(l.report.bytes_mapped, l.report.file_bytes_by_dtype.at("F32"));
  EXPECT_TRUE(l.report.conversions.empty());
}

// The files held are the checkpoint's, by size; of them, no more than their size is in 2 MiB
// pages or read again, and nothing is read again when the files are not mapped.
TEST(ModelLoaderTest, ReportCountsTheWeightFilesAndTheirPages) {
  for (bool map : {true, false}) {
    LoadOptions o;
    o.map_weights = map;
    Loaded l = Load("llama_tied", o);
    ASSERT_TRUE(l.model.ok()) << l.model.status();
    const auto size = static_cast<int64_t>(
        std::filesystem::file_size(testing::Fixture("llama_tied") + "/model.safetensors"));
    EXPECT_EQ(l.report.bytes_files_held, size) << map;
    EXPECT_GE(l.report.bytes_huge_pages, 0) << map;
    EXPECT_LE(l.report.bytes_huge_pages, size) << map;
    EXPECT_TRUE(l.report.bytes_reread == 0 || (map && l.report.bytes_reread == size)) << map;
    EXPECT_THAT(l.report.ToText(),
                HasSubstr(absl::StrCat(" of the weight files' ", size, " bytes in 2 MiB pages")));
  }
}

TEST(ModelLoaderTest, TyingIsIdempotent) {
  Loaded l = Load("llama_tied");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  WeightMap w = (*l.model)->weights();
  const void* before = w.at("lm_head.weight").data_ptr();
  auto again = TieWeights((*l.model)->config(), w);
  ASSERT_TRUE(again.has_value());
  EXPECT_TRUE(again->same_storage);
  EXPECT_EQ(w.at("lm_head.weight").data_ptr(), before);
  auto third = TieWeights((*l.model)->config(), w);
  EXPECT_EQ(w.at("lm_head.weight").data_ptr(), before);
  EXPECT_EQ(third->bytes_saved, again->bytes_saved);
}

TEST(ModelLoaderTest, UntiedModelKeepsBothAndIgnoresLegacyRotaryBuffer) {
  Loaded l = Load("llama_untied");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  const auto& w = (*l.model)->weights();
  EXPECT_NE(w.at("lm_head.weight").data_ptr(), w.at("model.embed_tokens.weight").data_ptr());
  EXPECT_TRUE(l.report.tied.empty());
  EXPECT_THAT(l.report.ignored, ElementsAre("model.layers.0.self_attn.rotary_emb.inv_freq"));
  EXPECT_EQ(l.report.parameter_count, DeclaredElements((*l.model)->config(), true));
  EXPECT_EQ((*l.model)->config().eos_token_ids, (std::vector<int64_t>{2, 3}));
}

TEST(ModelLoaderTest, Gpt2WithoutPrefixIsMatchedAndTiedToWte) {
  for (const char* name : {"gpt2", "gpt2_noprefix"}) {
    Loaded l = Load(name);
    ASSERT_TRUE(l.model.ok()) << name << ": " << l.model.status();
    const auto& w = (*l.model)->weights();
    EXPECT_EQ(w.at("lm_head.weight").data_ptr(), w.at("transformer.wte.weight").data_ptr());
    EXPECT_TRUE(l.report.unexpected.empty()) << name;
    EXPECT_EQ(l.report.ignored.size(), 4u) << name;  // attn.bias + masked_bias × 2 layers.
  }
}

TEST(ModelLoaderTest, ShardedCheckpointReadsEveryShard) {
  Loaded l = Load("llama_sharded");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  EXPECT_EQ(l.report.files.size(), 3u);
  EXPECT_EQ(l.report.materialized_parameters, l.report.declared_parameters);
}

TEST(ModelLoaderTest, Bf16WeightsAreConvertedAndReported) {
  Loaded l = Load("llama_bf16");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  const int64_t stored = l.report.file_bytes_by_dtype.at("BF16");
  EXPECT_EQ(l.report.bytes_copied, 2 * stored);
  EXPECT_EQ(l.report.bytes_mapped, 0);
  ASSERT_EQ(l.report.conversions.size(), 1u);
  EXPECT_THAT(l.report.conversions[0], HasSubstr("BF16 -> Float"));
  EXPECT_EQ((*l.model)->weights().at("model.norm.weight").scalar_type(), at::kFloat);
}

// --dtype auto: the bfloat16 or float16 matrices are the mapping itself (their values are the
// float32 load's, widened), the norms are converted, and the report and the KV cache say so.
TEST(ModelLoaderTest, HalfPrecisionMatricesAreServedInPlaceUnderAuto) {
  for (const auto& [fixture, dtype, stored, name] :
       {std::tuple{"llama_bf16", at::kBFloat16, "BF16", "bfloat16"}, std::tuple{"llama_f16", at::kHalf, "F16", "float16"}}) {
    SCOPED_TRACE(fixture);
    LoadOptions o;
    o.compute_dtype = "auto";
    Loaded l = Load(fixture, o);
    ASSERT_TRUE(l.model.ok()) << l.model.status();
    Loaded f = Load(fixture);  // float32: every tensor converted.
    ASSERT_TRUE(f.model.ok()) << f.model.status();
    int64_t matrix_bytes = 0, vector_bytes = 0;
    for (const auto& [tensor, w] : (*l.model)->weights()) {
      if (tensor == kOutputEmbeddingName) continue;  // Tied: the embedding's storage.
      const at::Tensor& converted = (*f.model)->weights().at(tensor);
      if (w.dim() == 2) {
        EXPECT_EQ(w.scalar_type(), dtype) << tensor;
        matrix_bytes += w.nbytes();
      } else {
        EXPECT_EQ(w.scalar_type(), at::kFloat) << tensor;
        vector_bytes += w.nbytes() / 2;  // As stored.
      }
      EXPECT_TRUE(at::equal(w.to(at::kFloat), converted)) << tensor;
    }
    EXPECT_EQ(matrix_bytes + vector_bytes, l.report.file_bytes_by_dtype.at(stored));
    EXPECT_EQ(l.report.bytes_mapped, matrix_bytes);
    EXPECT_EQ(l.report.bytes_copied, 2 * vector_bytes);
    ASSERT_EQ(l.report.conversions.size(), 1u);
    EXPECT_THAT(l.report.conversions[0], HasSubstr(std::string(stored) + " -> Float"));
    EXPECT_EQ(l.report.compute_dtype, "float32");
    EXPECT_EQ(l.report.weights_dtype, name);
    EXPECT_THAT(l.report.ToText(), HasSubstr(std::string("weights      ") + name + " (matrices read in place"));
    EXPECT_EQ((*l.model)->kv_dtype(), dtype);
    EXPECT_EQ((*f.model)->kv_dtype(), at::kFloat);
    EXPECT_EQ(f.report.weights_dtype, "float32");
    const auto& w = (*l.model)->weights();
    EXPECT_EQ(w.at("lm_head.weight").data_ptr(), w.at("model.embed_tokens.weight").data_ptr());
  }
}

// A float32 checkpoint under auto is served as under float32, zero copy.
TEST(ModelLoaderTest, AutoServesFloat32CheckpointsAsFloat32) {
  LoadOptions o;
  o.compute_dtype = "auto";
  for (const char* fixture : {"llama_tied", "gpt2"}) {
    Loaded l = Load(fixture, o);
    ASSERT_TRUE(l.model.ok()) << l.model.status();
    EXPECT_EQ(l.report.weights_dtype, "float32") << fixture;
    EXPECT_EQ(l.report.bytes_copied, 0) << fixture;
    EXPECT_EQ((*l.model)->kv_dtype(), at::kFloat) << fixture;
  }
}

// --quantize int8_weight_only replaces every projection matrix and lm_head (tied or not) for
// the forward pass and reports it; weights() keeps the originals, equal to the plain load's.
// int8 (w8a8; "w8a8" is its other name) holds the same values in panels of 8 rows (a short
// last panel padded with zeros).
TEST(ModelLoaderTest, Int8QuantizesEveryProjectionAndLmHeadAndKeepsTheOriginals) {
  for (const auto& [fixture, quantize] :
       {std::pair{"llama_tied", "int8_weight_only"}, {"llama_untied", "int8_weight_only"},
        {"qwen2_bias", "int8_weight_only"}, {"llama_bf16", "int8_weight_only"}, {"llama_tied", "int8"},
        {"llama_untied", "int8"}, {"llama_bf16", "int8"}, {"llama_untied", "w8a8"}}) {
    SCOPED_TRACE(absl::StrCat(fixture, " ", quantize));
    // What the report names it.
    const std::string reported = std::string(quantize) == "w8a8" ? "int8" : quantize;
    LoadOptions o;
    o.compute_dtype = "auto";
    o.quantize = quantize;
    Loaded q = Load(fixture, o);
    ASSERT_TRUE(q.model.ok()) << q.model.status();
    Loaded f = Load(fixture);
    ASSERT_TRUE(f.model.ok()) << f.model.status();
    const ModelConfig& c = (*q.model)->config();
    int64_t source_bytes = 0, bytes = 0, matrices = 0;
    for (const auto& [name, w] : (*q.model)->weights()) {
      EXPECT_TRUE(at::equal(w.to(at::kFloat), (*f.model)->weights().at(name))) << name;
      const bool projection = absl::StrContains(name, "_proj.weight") || name == kOutputEmbeddingName;
      if (!projection) continue;
      ++matrices;
      source_bytes += w.nbytes();
      // int8 values, a float32 scale per 32; the panels (int8) count whole panels of 8 rows.
      const int64_t rows = reported == "int8" ? (w.size(0) + 7) / 8 * 8 : w.size(0);
      bytes += rows * w.size(1) + rows * w.size(1) / 32 * 4;
    }
    EXPECT_EQ(matrices, 7 * c.num_layers + 1);
    EXPECT_EQ(q.report.quantization, reported);
    EXPECT_EQ(q.report.quantized_tensors, matrices);
    EXPECT_EQ(q.report.quantized_source_bytes, source_bytes);
    EXPECT_EQ(q.report.quantized_bytes, bytes);
    EXPECT_EQ(q.report.ToJson()["quantized_bytes"], bytes);
    EXPECT_THAT(q.report.ToText(), HasSubstr(absl::StrCat("quantized    ", reported, ": ", matrices, " matrices, ",
                                                          source_bytes, " -> ", bytes, " bytes")));
    EXPECT_THAT(q.report.ToText(), HasSubstr(reported == "int8" ? "inputs quantized per block of 32 at run time"
                                                                : "float32 inputs times the dequantized weights"));
    if (std::string(fixture) == "llama_bf16") {
      EXPECT_THAT(q.report.ToText(),
                  HasSubstr("weights      bfloat16 (embedding read in place; projections and lm_head quantized below)"));
    }
    EXPECT_EQ(f.report.quantization, "none");
    EXPECT_THAT(f.report.ToText(), Not(HasSubstr("quantized")));
  }
}

TEST(ModelLoaderTest, Int8RefusesWhatItCannotServe) {
  LoadOptions o;
  o.quantize = "int8";
  Loaded gpt2 = Load("gpt2", o);
  ASSERT_FALSE(gpt2.model.ok());
  EXPECT_EQ(gpt2.model.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(gpt2.model.status().message()), HasSubstr("--quantize int8 serves Llama-family models"));
  o.compute_dtype = "bfloat16";
  Loaded bf16 = Load("llama_tied", o);
  ASSERT_FALSE(bf16.model.ok());
  EXPECT_EQ(bf16.model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bf16.model.status().message()), HasSubstr("quantize int8 needs float32 activations"));
  o.compute_dtype = "auto";
  o.quantize = "int4";
  Loaded int4 = Load("llama_tied", o);
  ASSERT_FALSE(int4.model.ok());
  EXPECT_THAT(
      std::string(int4.model.status().message()),
      HasSubstr("quantize must be none, int8, int8_weight_only or bf16_packed, got \"int4\""));
  o.quantize = "int8_weight_only";
  o.compute_dtype = "float16";
  Loaded f16 = Load("llama_tied", o);
  ASSERT_FALSE(f16.model.ok());
  EXPECT_THAT(std::string(f16.model.status().message()), HasSubstr("quantize int8_weight_only needs float32 activations"));
  o.compute_dtype = "auto";
  Loaded gpt2_weight_only = Load("gpt2", o);
  ASSERT_FALSE(gpt2_weight_only.model.ok());
  EXPECT_THAT(std::string(gpt2_weight_only.model.status().message()), HasSubstr("--quantize int8_weight_only serves Llama-family models"));
}

// QuantizeW8A8 lays QuantizeInt8's values and scales out in panels (UnpackPanels gives them
// back, a short last panel's padding dropped), and its product (the CPU kernel, or ATen without
// one) stays within the error of quantizing x: half a step of x per input, times |w|.
TEST(ModelLoaderTest, W8A8PanelsHoldTheInt8ValuesAndBothPathsAgree) {
  at::manual_seed(13);
  for (int64_t n : {5, 8, 19}) {
    const at::Tensor w = at::randn({n, 96}) * 0.2;
    const CompactMatrix q = QuantizeInt8(w);
    const CompactMatrix p = QuantizeW8A8(w);
    EXPECT_EQ(p.out, n);
    EXPECT_EQ(p.panels.sizes(), (std::vector<int64_t>{(n + 7) / 8, 24, 8, 4}));
    const CompactMatrix u = UnpackPanels(p, 0, n);
    EXPECT_TRUE(at::equal(u.q, q.q));
    EXPECT_TRUE(at::equal(u.scales, q.scales));
    if (n > 8) {
      EXPECT_TRUE(at::equal(UnpackPanels(p, 8, n - 8).q, q.q.narrow(0, 8, n - 8)));
    }
    const at::Tensor x = at::randn({3, 96});
    const at::Tensor b = at::randn({n});
    const at::Tensor kernel = LinearForward(x, p, b);
    ASSERT_TRUE(cpu::SelectIsa(cpu::Isa::kNone));
    const at::Tensor aten = LinearForward(x, p, b);
    cpu::SelectIsa(cpu::SupportedIsa());
    const at::Tensor dequantized = DequantizeInt8(q, 0, n).to(at::kDouble);
    const at::Tensor exact = at::linear(x.to(at::kDouble), dequantized, b.to(at::kDouble));
    const at::Tensor step = x.abs().view({3, 3, 32}).amax(-1).div(127.0).repeat_interleave(32, 1);
    const at::Tensor bound = at::linear(step.to(at::kDouble) * 0.5, dequantized.abs()) + 1e-4;
    EXPECT_TRUE(((kernel.to(at::kDouble) - exact).abs() <= bound).all().item<bool>());
    EXPECT_TRUE(((aten.to(at::kDouble) - exact).abs() <= bound).all().item<bool>());
    // The two differ only in how the per-block terms are added up.
    EXPECT_TRUE(at::allclose(kernel, aten, 1e-5, 1e-5)) << (kernel - aten).abs().max();
  }
}

// The quantizer follows its formula, computed here element by element: per block of 32,
// scale = max|w| / 127, q = w / scale rounded half to even; an all-zero block has scale 0.
TEST(ModelLoaderTest, Int8QuantizerFollowsTheQ8Formula) {
  at::manual_seed(12);
  at::Tensor w = at::randn({5, 96}) * 0.2;
  w.narrow(0, 2, 1).narrow(1, 32, 32).zero_();
  w[3][64] = 2.54f;  // A block's maximum: q = 127 exactly.
  const CompactMatrix m = QuantizeInt8(w.to(at::kBFloat16));
  const at::Tensor wb = w.to(at::kBFloat16).to(at::kFloat);
  auto wa = wb.accessor<float, 2>();
  auto qa = m.q.accessor<int8_t, 2>();
  auto sa = m.scales.accessor<float, 2>();
  for (int64_t n = 0; n < 5; ++n) {
    for (int64_t b = 0; b < 3; ++b) {
      float amax = 0;
      for (int64_t k = b * 32; k < b * 32 + 32; ++k) amax = std::max(amax, std::abs(wa[n][k]));
      const float scale = amax / 127.0f;
      EXPECT_EQ(sa[n][b], scale) << n << "," << b;
      for (int64_t k = b * 32; k < b * 32 + 32; ++k) {
        const float want = scale == 0 ? 0.0f : std::nearbyint(wa[n][k] * (1.0f / scale));
        EXPECT_EQ(qa[n][k], static_cast<int8_t>(want)) << n << "," << k;
        // Dequantized within half a step of the weight.
        EXPECT_LE(std::abs(qa[n][k] * scale - wa[n][k]), scale * 0.5f + 1e-7f) << n << "," << k;
      }
    }
  }
  EXPECT_EQ(qa[3][64], 127);
  const at::Tensor d = DequantizeInt8(m, 1, 3);
  EXPECT_TRUE(at::equal(d, m.q.narrow(0, 1, 3).to(at::kFloat) * m.scales.narrow(0, 1, 3).repeat_interleave(32, 1)));
}

TEST(ModelLoaderTest, MissingKeyRefusesNamingIt) {
  Loaded l = Load("broken_missing");
  ASSERT_FALSE(l.model.ok());
  EXPECT_EQ(l.model.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(l.model.status().message()),
              HasSubstr("missing model.layers.1.mlp.up_proj.weight"));
  EXPECT_THAT(l.report.missing, ElementsAre("model.layers.1.mlp.up_proj.weight"));
  EXPECT_FALSE(l.report.ok());
}

TEST(ModelLoaderTest, UntiedModelWithoutHeadIsMissingIt) {
  Loaded l = Load("broken_untied_no_head");
  ASSERT_FALSE(l.model.ok());
  EXPECT_THAT(l.report.missing, ElementsAre("lm_head.weight"));
}

TEST(ModelLoaderTest, ShapeMismatchIsListedWithBothShapes) {
  Loaded l = Load("broken_shape");
  ASSERT_FALSE(l.model.ok());
  ASSERT_EQ(l.report.mismatched.size(), 1u);
  EXPECT_EQ(l.report.mismatched[0].name, "model.layers.0.self_attn.k_proj.weight");
  EXPECT_EQ(l.report.mismatched[0].expected, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(l.report.mismatched[0].found, (std::vector<int64_t>{40, 64}));
  EXPECT_THAT(std::string(l.model.status().message()),
              HasSubstr("shape of model.layers.0.self_attn.k_proj.weight is [40,64], "
                        "expected [32,64]"));
}

TEST(ModelLoaderTest, UnexpectedKeyIsAWarningNotARefusal) {
  Loaded l = Load("extra_key");
  ASSERT_TRUE(l.model.ok()) << l.model.status();
  EXPECT_THAT(l.report.unexpected, ElementsAre("model.layers.0.self_attn.extra_scale"));
  EXPECT_FALSE(l.report.warnings.empty());
}

std::string CopyFixture(const std::string& fixture, const std::string& tag) {
  std::string dir = testing::TempDir(tag);
  std::string cmd = "cp -r '" + testing::Fixture(fixture) + "/.' '" + dir + "/'";
  EXPECT_EQ(std::system(cmd.c_str()), 0);
  return dir;
}

TEST(ModelLoaderTest, TruncatedFileIsAPreciseStatus) {
  std::string dir = CopyFixture("llama_tied", "truncated");
  std::string bytes = testing::ReadBytes(dir + "/model.safetensors");
  testing::WriteFile(dir + "/model.safetensors", bytes.substr(0, bytes.size() / 2));
  LoadReport report;
  auto model = LoadModel(dir, LoadOptions(), &report);
  ASSERT_FALSE(model.ok());
  EXPECT_EQ(model.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr(dir + "/model.safetensors: tensor data ends at byte"));
}

// Writes `bits` (2 or 4 bytes, little-endian) over element `index` of tensor `name` in the
// single-file checkpoint of `dir`.
void PokeElement(const std::string& dir, const std::string& name, int64_t index, uint32_t bits, int width) {
  const std::string path = dir + "/model.safetensors";
  std::string bytes = testing::ReadBytes(path);
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  const nlohmann::json j = nlohmann::json::parse(bytes.substr(8, header));
  const uint64_t off = 8 + header + j.at(name)["data_offsets"][0].get<uint64_t>() + index * width;
  std::memcpy(bytes.data() + off, &bits, width);
  testing::WriteFile(path, bytes);
}

// Every weight is checked for NaN and infinities at load, in its stored dtype or after the
// conversion to the compute dtype (float32 values past float16's range become infinite).
TEST(ModelLoaderTest, NonFiniteWeightsAreRefusedInEveryDtype) {
  const std::string q = "model.layers.1.self_attn.q_proj.weight";
  auto load = [](const std::string& dir, const std::string& dtype) {
    LoadOptions o;
    o.compute_dtype = dtype;
    LoadReport report;
    return LoadModel(dir, o, &report).status();
  };
  // bfloat16 served in place: +inf, -inf, NaN with a payload, at the first and the last element.
  for (uint32_t bits : {0x7F80u, 0xFF80u, 0xFFC1u, 0x7FFFu}) {
    for (int64_t index : {int64_t{0}, int64_t{64 * 64 - 1}}) {
      const std::string dir = CopyFixture("llama_bf16", "nonfinite_bf16");
      PokeElement(dir, q, index, bits, 2);
      absl::Status st = load(dir, "bfloat16");
      EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << std::hex << bits << " at " << index;
      EXPECT_THAT(std::string(st.message()), HasSubstr("\"" + q + "\" holds NaN or infinite values"));
    }
  }
  // The largest finite bfloat16 loads.
  const std::string max_dir = CopyFixture("llama_bf16", "max_bf16");
  PokeElement(max_dir, q, 5, 0x7F7Fu, 2);
  EXPECT_TRUE(load(max_dir, "bfloat16").ok());
  // float32: -inf is refused.
  const std::string f32 = CopyFixture("llama_tied", "nonfinite_f32");
  PokeElement(f32, q, 17, 0xFF800000u, 4);
  EXPECT_EQ(load(f32, "float32").code(), absl::StatusCode::kInvalidArgument);
  // 1e5 is finite in float32 and infinite in float16.
  const std::string big = CopyFixture("llama_tied", "overflow_f16");
  const float value = 1e5f;
  uint32_t bits = 0;
  std::memcpy(&bits, &value, 4);
  PokeElement(big, q, 3, bits, 4);
  EXPECT_TRUE(load(big, "float32").ok());
  absl::Status st = load(big, "float16");
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
  EXPECT_THAT(std::string(st.message()), HasSubstr("holds NaN or infinite values"));
  // A tensor large enough to be scanned by several threads (32000 x 64 float32): a NaN in the
  // last thread's share, or in the first's, is found.
  const std::string embed = "model.embed_tokens.weight";
  for (int64_t index : {int64_t{32000 * 64 - 1}, int64_t{17}}) {
    const std::string wide = CopyFixture("llama_tok", "nonfinite_wide");
    PokeElement(wide, embed, index, 0x7FC00000u, 4);
    absl::Status wide_st = load(wide, "float32");
    EXPECT_EQ(wide_st.code(), absl::StatusCode::kInvalidArgument) << index;
    EXPECT_THAT(std::string(wide_st.message()), HasSubstr("\"" + embed + "\" holds NaN or infinite values"));
  }
}

TEST(ModelLoaderTest, CorruptHeaderIsAPreciseStatus) {
  std::string dir = CopyFixture("llama_tied", "corrupt");
  std::string bytes = testing::ReadBytes(dir + "/model.safetensors");
  bytes[8] = '#';  // The header's opening brace.
  testing::WriteFile(dir + "/model.safetensors", bytes);
  LoadReport report;
  auto model = LoadModel(dir, LoadOptions(), &report);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("not valid UTF-8 JSON"));
}

TEST(ModelLoaderTest, IndexNamingTheWrongShardIsRefused) {
  std::string dir = CopyFixture("llama_sharded", "badindex");
  auto index = testing::ReadJson(dir + "/model.safetensors.index.json");
  std::string& shard = index["weight_map"]["model.norm.weight"].get_ref<std::string&>();
  shard = shard == "model-00001-of-00003.safetensors" ? "model-00002-of-00003.safetensors"
                                                      : "model-00001-of-00003.safetensors";
  testing::WriteFile(dir + "/model.safetensors.index.json", index.dump());
  LoadReport report;
  auto model = LoadModel(dir, LoadOptions(), &report);
  ASSERT_FALSE(model.ok());
  EXPECT_THAT(std::string(model.status().message()),
              HasSubstr("weight_map puts \"model.norm.weight\""));
}

TEST(ModelLoaderTest, MissingCheckpointAndPickleAreRefused) {
  std::string dir = CopyFixture("llama_tied", "pickle");
  std::remove((dir + "/model.safetensors").c_str());
  testing::WriteFile(dir + "/pytorch_model.bin", "not loaded");
  LoadReport report;
  auto model = LoadModel(dir, LoadOptions(), &report);
  EXPECT_EQ(model.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(model.status().message()), HasSubstr("pickled pytorch_model.bin"));
}

TEST(ModelLoaderTest, ReportJsonCarriesTheSameFacts) {
  Loaded l = Load("llama_tied");
  ASSERT_TRUE(l.model.ok());
  nlohmann::json j = l.report.ToJson();
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["architecture"], "LlamaForCausalLM");
  EXPECT_EQ(j["tied"][0]["same_storage"], true);
  EXPECT_EQ(j["parameter_count"], l.report.parameter_count);
  EXPECT_EQ(j["declared_parameters"], l.report.declared_parameters);
  EXPECT_EQ(j["bytes_mapped"], l.report.bytes_mapped);
  EXPECT_EQ(j["bytes_files_held"], l.report.bytes_files_held);
  EXPECT_EQ(j["bytes_huge_pages"], l.report.bytes_huge_pages);
  EXPECT_EQ(j["bytes_reread"], l.report.bytes_reread);
  EXPECT_THAT(l.report.ToText(), HasSubstr("lm_head.weight -> model.embed_tokens.weight"));
}

TEST(ModelLoaderTest, BadDeviceOrDtypeIsInvalidArgument) {
  LoadOptions o;
  o.compute_dtype = "float8";
  EXPECT_EQ(Load("llama_tied", o).model.status().code(), absl::StatusCode::kInvalidArgument);
  o = LoadOptions();
  o.device = "toaster";
  EXPECT_EQ(Load("llama_tied", o).model.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace adapterd::core
