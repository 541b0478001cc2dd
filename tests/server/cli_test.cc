// The adapterd executable's offline subcommands, run as a user would.
#include <algorithm>
#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "server/commands.h"
#include "tests/test_util.h"

namespace adapterd::server {
namespace {

using ::testing::HasSubstr;

struct CliRun {
  int exit_code;
  std::string out;
};

// Runs adapterd with `args`; the output holds stdout, and stderr too when `with_stderr`.
CliRun Adapterd(const std::string& args, bool with_stderr = false) {
  std::string cmd = testing::AdapterdBinary() + " " + args + " --log_level=warn " +
                    (with_stderr ? "2>&1" : "2>/dev/null");
  CliRun r{0, ""};
  FILE* p = ::popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  r.exit_code = WEXITSTATUS(::pclose(p));
  return r;
}

TEST(CliTest, InspectJsonReportsTiedPairs) {
  CliRun r = Adapterd("inspect --json --model_dir " + testing::Fixture("llama_tied"));
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["ok"], true);
  EXPECT_EQ(j["tied"][0]["target"], "lm_head.weight");
  EXPECT_EQ(j["tied"][0]["same_storage"], true);
}

TEST(CliTest, InspectExitsNonZeroAndListsTheMissingKey) {
  CliRun r = Adapterd("inspect --model_dir " + testing::Fixture("broken_missing"));
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.out, HasSubstr("MISSING      model.layers.1.mlp.up_proj.weight"));
}

TEST(CliTest, GenerateJsonEqualsTheReferenceGreedyContinuation) {
  auto ref = testing::ReadJson(testing::Fixture("qwen2_bias") + "/reference.json");
  std::string ids;
  for (int id : ref["prompt"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  CliRun r = Adapterd("generate --json --ignore_eos --max_new_tokens 8 --model_dir " +
                   testing::Fixture("qwen2_bias") + " --prompt_ids " + ids);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["tokens"], ref["greedy"]);
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_EQ(j["steps"][0]["top"].size(), 5u);
}

TEST(CliTest, EveryCpuKernelChoiceGivesTheReferenceContinuationAndBadOnesAreRefused) {
  auto ref = testing::ReadJson(testing::Fixture("llama_untied") + "/reference.json");
  std::string ids;
  for (int id : ref["prompt"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  for (const char* kernels : {"none", "auto"}) {
    CliRun r = Adapterd(std::string("generate --json --ignore_eos --max_new_tokens 8") +
                        " --cpu_kernels " + kernels + " --model_dir " +
                        testing::Fixture("llama_untied") + " --prompt_ids " + ids);
    ASSERT_EQ(r.exit_code, 0) << kernels << ": " << r.out;
    EXPECT_EQ(nlohmann::json::parse(r.out)["tokens"], ref["greedy"]) << kernels;
  }
  CliRun bad = Adapterd("generate --cpu_kernels sse9 --model_dir " +
                            testing::Fixture("llama_untied") + " --prompt_ids " + ids,
                        /*with_stderr=*/true);
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("cpu_kernels must be auto, avx512f, avx2 or none, got \"sse9\""));
}

TEST(CliTest, ServeRefusesAStepSlowdownThatCannotBeMet) {
  for (const char* bad : {"1", "0.5", "-2", "1000"}) {
    CliRun r = Adapterd(std::string("serve --listen 127.0.0.1:0 --max_step_slowdown=") + bad +
                            " --model_dir " + testing::Fixture("llama_untied"),
                        /*with_stderr=*/true);
    EXPECT_EQ(r.exit_code, 2) << bad << ": " << r.out;
    EXPECT_THAT(r.out, HasSubstr("--max_step_slowdown")) << bad;
    EXPECT_THAT(r.out, HasSubstr("must be 0 (off) or in (1, 100]")) << bad;
  }
}

TEST(CliTest, GenerateRejectsMalformedIds) {
  CliRun r = Adapterd("generate --model_dir " + testing::Fixture("gpt2") + " --prompt_ids 1,x");
  EXPECT_EQ(r.exit_code, 2);
}

TEST(CliTest, ParseIdListAcceptsOnlyIntegerLists) {
  std::vector<int32_t> ids;
  EXPECT_TRUE(ParseIdList("3,1,4", &ids));
  EXPECT_EQ(ids, (std::vector<int32_t>{3, 1, 4}));
  EXPECT_FALSE(ParseIdList("", &ids));
  EXPECT_FALSE(ParseIdList("1,,2", &ids));
  EXPECT_FALSE(ParseIdList("1;2", &ids));
}

}  // namespace
}  // namespace adapterd::server

namespace adapterd::server {
namespace {

TEST(CliTest, InspectAdapterPrintsItsReportAndRefusesBadOnes) {
  CliRun ok = Adapterd("inspect --json --model_dir " + testing::Fixture("llama_tied") +
                       " --adapter_dir " + testing::Fixture("adapters/lora_qv"));
  ASSERT_EQ(ok.exit_code, 0) << ok.out;
  auto j = nlohmann::json::parse(ok.out);
  EXPECT_EQ(j["name"], "lora_qv");
  EXPECT_EQ(j["type"], "LORA");
  EXPECT_EQ(j["matched_module_count"], 4);
  CliRun bad = Adapterd("inspect --model_dir " + testing::Fixture("llama_tied") +
                        " --adapter_dir " + testing::Fixture("adapters/bad_rank"));
  EXPECT_EQ(bad.exit_code, 1);
  EXPECT_THAT(bad.out, HasSubstr("REFUSED"));
  EXPECT_THAT(bad.out, HasSubstr("lora_B for model.layers.0.self_attn.q_proj has shape [64,3]"));
}

TEST(CliTest, GenerateWithAnAdapterEqualsTheMergedModel) {
  auto ref = testing::ReadJson(testing::Fixture("merged/lora_gpt2") + "/reference.json");
  std::string ids;
  for (int id : ref["prompt"]) ids += (ids.empty() ? "" : ",") + std::to_string(id);
  CliRun r = Adapterd("generate --json --ignore_eos --max_new_tokens 8 --model_dir " +
                      testing::Fixture("gpt2") + " --adapter_dir " +
                      testing::Fixture("adapters/lora_gpt2") + " --prompt_ids " + ids);
  ASSERT_EQ(r.exit_code, 0) << r.out;
  EXPECT_EQ(nlohmann::json::parse(r.out)["tokens"], ref["greedy"]);
}

}  // namespace
}  // namespace adapterd::server

namespace adapterd::server {
namespace {

TEST(CliTest, TokenizeDetokenizeAndGenerateFromText) {
  const std::string model = testing::Fixture("llama_tok");  // Ships the llama2 tokenizer.json.
  auto golden = testing::ReadJson(std::string(ADAPTERD_SOURCE_DIR) +
                                  "/tests/tokenizer/golden/llama2.json")["cases"][0];
  ASSERT_EQ(golden["text"], "Hello world");
  CliRun ids = Adapterd("tokenize --json --model_dir " + model + " --text 'Hello world'");
  ASSERT_EQ(ids.exit_code, 0) << ids.out;
  EXPECT_EQ(nlohmann::json::parse(ids.out)["ids"], golden["ids"]);
  std::string id_list;
  for (int id : golden["ids"]) id_list += (id_list.empty() ? "" : ",") + std::to_string(id);
  CliRun text = Adapterd("detokenize --json --skip_special_tokens --model_dir " + model +
                         " --ids " + id_list);
  ASSERT_EQ(text.exit_code, 0);
  EXPECT_EQ(nlohmann::json::parse(text.out)["text"], golden["decoded_skip_special"]);
  CliRun by_text = Adapterd("generate --json --ignore_eos --max_new_tokens 4 --model_dir " + model +
                            " --prompt 'Hello world'");
  CliRun by_ids = Adapterd("generate --json --ignore_eos --max_new_tokens 4 --model_dir " + model +
                           " --prompt_ids " + id_list);
  ASSERT_EQ(by_text.exit_code, 0) << by_text.out;
  auto a = nlohmann::json::parse(by_text.out), b = nlohmann::json::parse(by_ids.out);
  EXPECT_EQ(a["tokens"], b["tokens"]);
  EXPECT_EQ(a["prompt_ids"], b["prompt_ids"]);
  EXPECT_TRUE(a.contains("text"));
}

}  // namespace
}  // namespace adapterd::server

namespace adapterd::server {
namespace {

TEST(CliTest, GenerateStopsAtTheTokenizerConfigEosLikeTheServer) {
  // A copy of llama_tok whose configs name no EOS id; tokenizer_config.json names as its
  // eos_token a token the greedy continuation produces.
  const std::string model = testing::TempDir("cli_eos") + "/model";
  std::filesystem::copy(testing::Fixture("llama_tok"), model,
                        std::filesystem::copy_options::recursive);
  CliRun full = Adapterd("generate --json --ignore_eos --max_new_tokens 8 --model_dir " + model +
                         " --prompt_ids 1,450,4996,17354");
  ASSERT_EQ(full.exit_code, 0) << full.out;
  const std::vector<int> tokens = nlohmann::json::parse(full.out)["tokens"];
  const int eos = tokens[2];  // Its first occurrence ends generation.
  const size_t first = std::find(tokens.begin(), tokens.end(), eos) - tokens.begin();
  std::string eos_text;
  const nlohmann::json tokenizer = testing::ReadJson(model + "/tokenizer.json");
  for (const auto& [text, id] : tokenizer["model"]["vocab"].items()) {
    if (id == eos) eos_text = text;
  }
  ASSERT_FALSE(eos_text.empty());
  auto config = testing::ReadJson(model + "/config.json");
  config.erase("eos_token_id");
  testing::WriteFile(model + "/config.json", config.dump());
  testing::WriteFile(model + "/tokenizer_config.json",
                     nlohmann::json({{"eos_token", eos_text}}).dump());
  CliRun r = Adapterd("generate --json --max_new_tokens 8 --model_dir " + model +
                      " --prompt_ids 1,450,4996,17354");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  auto j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["finish_reason"], "eos");
  EXPECT_EQ(j["tokens"].get<std::vector<int>>(),
            std::vector<int>(tokens.begin(), tokens.begin() + first + 1));
}

}  // namespace
}  // namespace adapterd::server
