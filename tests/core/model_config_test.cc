#include "core/model_config.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace adapterd::core {
namespace {

using ::testing::HasSubstr;

TEST(ModelConfigTest, LlamaMissingKeysTakeTheClassDefaults) {
  auto c = ModelConfig::FromJson(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4})",
                                 "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 32000);
  EXPECT_EQ(c->num_kv_heads, 4);  // None → num_attention_heads.
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->max_position_embeddings, 2048);
  EXPECT_DOUBLE_EQ(c->norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 10000.0);
  EXPECT_FALSE(c->tie_word_embeddings);
  EXPECT_FALSE(c->qkv_bias);
  EXPECT_EQ(c->bos_token_id, std::nullopt);
}

TEST(ModelConfigTest, ValuesThatBreakTheForwardPassOrItsAllocationsAreRefused) {
  const std::string base = R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,)"
                           R"("num_attention_heads":4,)";
  struct Case {
    std::string fields, message;
  };
  for (const Case& c : std::vector<Case>{
           {R"("rope_theta":0})", "rope_theta must be a finite number > 1, found 0"},
           {R"("rms_norm_eps":-1e-6})", "must be in (0, 1), found -1e-06"},
           {R"("rms_norm_eps":0})", "must be in (0, 1), found 0"},
           {R"("num_hidden_layers":2147483647})",
            "number of layers is 2147483647, above adapterd's limit of 1024"},
           {R"("num_hidden_layers":100000})", "number of layers is 100000"},
           {R"("vocab_size":1099511627776})", "vocab_size is 1099511627776"},
           {R"("max_position_embeddings":1e12})", ""},
       }) {
    auto config = ModelConfig::FromJson(base + c.fields, "config.json");
    ASSERT_FALSE(config.ok()) << c.fields;
    EXPECT_EQ(config.status().code(), absl::StatusCode::kInvalidArgument) << c.fields;
    EXPECT_THAT(std::string(config.status().message()), HasSubstr(c.message)) << c.fields;
  }
  auto gpt2 = ModelConfig::FromJson(R"({"architectures":["GPT2LMHeadModel"],"n_embd":64,)"
                                    R"("n_head":4,"layer_norm_epsilon":-1})",
                                    "config.json");
  EXPECT_THAT(std::string(gpt2.status().message()), HasSubstr("must be in (0, 1), found -1"));
}

TEST(ModelConfigTest, Gpt2TiesByDefaultAndMapsItsKeyNames) {
  auto c = ModelConfig::FromJson(R"({"architectures":["GPT2LMHeadModel"],"n_embd":64,)"
                                 R"("n_head":4,"n_layer":2})",
                                 "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_TRUE(c->tie_word_embeddings);
  EXPECT_EQ(c->intermediate_size, 256);  // n_inner None → 4·n_embd.
  EXPECT_EQ(c->max_position_embeddings, 1024);
  EXPECT_EQ(c->vocab_size, 50257);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{50256});
  EXPECT_EQ(c->activation, "gelu_new");
}

TEST(ModelConfigTest, Qwen2HasQkvBiasAndMistralHasAWindow) {
  auto q = ModelConfig::FromJson(R"({"architectures":["Qwen2ForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4,"sliding_window":8})",
                                 "config.json");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->qkv_bias);
  EXPECT_FALSE(q->o_bias);
  EXPECT_EQ(q->sliding_window, 0);  // Only with use_sliding_window.
  auto m = ModelConfig::FromJson(R"({"architectures":["MistralForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":8})",
                                 "config.json");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->sliding_window, 4096);
  EXPECT_EQ(m->num_kv_heads, 8);
}

// Qwen3 as transformers' Qwen3Config reads it: q_norm/k_norm always, head_dim 128 unless
// given (not hidden_size / heads), attention_bias on all four attention projections (no
// default bias, unlike Qwen2), a window only with use_sliding_window, from max_window_layers.
TEST(ModelConfigTest, Qwen3HasQkNormItsOwnHeadDimAndOptionalBias) {
  auto q = ModelConfig::FromJson(R"({"architectures":["Qwen3ForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4,"sliding_window":8})",
                                 "config.json");
  ASSERT_TRUE(q.ok()) << q.status();
  EXPECT_TRUE(q->qk_norm);
  EXPECT_EQ(q->head_dim, 128);
  EXPECT_FALSE(q->qkv_bias);
  EXPECT_FALSE(q->o_bias);
  EXPECT_EQ(q->sliding_window, 0);
  EXPECT_EQ(q->vocab_size, 151936);
  auto b = ModelConfig::FromJson(R"({"architectures":["Qwen3ForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4,"head_dim":16,"attention_bias":true,)"
                                 R"("use_sliding_window":true,"sliding_window":8,)"
                                 R"("max_window_layers":1,"num_hidden_layers":2})",
                                 "config.json");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->head_dim, 16);
  EXPECT_TRUE(b->qkv_bias);
  EXPECT_TRUE(b->o_bias);
  EXPECT_EQ(b->sliding_window, 8);
  EXPECT_EQ(b->first_sliding_layer, 1);
  auto l = ModelConfig::FromJson(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4})",
                                 "config.json");
  ASSERT_TRUE(l.ok()) << l.status();
  EXPECT_FALSE(l->qk_norm);
}

TEST(ModelConfigTest, ReadsV5RopeParameters) {
  auto c = ModelConfig::FromJson(
      R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,"num_attention_heads":4,)"
      R"("rope_parameters":{"rope_type":"llama3","rope_theta":500000.0,"factor":8.0,)"
      R"("low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192}})",
      "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_EQ(c->rope_scaling.type, "llama3");
  EXPECT_DOUBLE_EQ(c->rope_scaling.factor, 8.0);
}

TEST(ModelConfigTest, RefusesUnknownArchitectureByName) {
  auto c = ModelConfig::FromJson(R"({"architectures":["BertForMaskedLM"]})", "m/config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(c.status().message()),
              HasSubstr("m/config.json: architecture \"BertForMaskedLM\" is not supported"));
}

TEST(ModelConfigTest, RefusesUnsupportedRopeTypeByName) {
  auto c = ModelConfig::FromJson(
      R"({"architectures":["LlamaForCausalLM"],"rope_scaling":{"type":"yarn","factor":4.0}})",
      "config.json");
  EXPECT_EQ(c.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("rope_scaling type \"yarn\""));
}

TEST(ModelConfigTest, RefusesWrongTypesAndInconsistentHeads) {
  auto t = ModelConfig::FromJson(R"({"architectures":["LlamaForCausalLM"],"hidden_size":"64"})",
                                 "config.json");
  EXPECT_THAT(std::string(t.status().message()), HasSubstr("\"hidden_size\" must be an integer"));
  auto h = ModelConfig::FromJson(R"({"architectures":["LlamaForCausalLM"],"hidden_size":64,)"
                                 R"("num_attention_heads":4,"num_key_value_heads":3})",
                                 "config.json");
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("not a multiple"));
  auto bad = ModelConfig::FromJson("{", "config.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ModelConfigTest, EosMayBeAList) {
  auto c = ModelConfig::FromJson(R"({"architectures":["LlamaForCausalLM"],)"
                                 R"("eos_token_id":[128001,128009]})",
                                 "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->eos_token_ids, (std::vector<int64_t>{128001, 128009}));
}

}  // namespace
}  // namespace adapterd::core
