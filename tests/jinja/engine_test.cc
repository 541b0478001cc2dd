// The Jinja engine's refusals and limits: what it does not implement is refused by name,
// hostile templates end with a status instead of exhausting memory, stack or time.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "jinja/chat_template.h"

namespace adapterd::jinja {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<std::string> Render(const std::string& source, Value vars = Value::Dict(),
                                   size_t max_bytes = size_t{1} << 20) {
  Options o;
  o.trim_blocks = o.lstrip_blocks = true;
  absl::StatusOr<Template> t = Template::Parse(source, o);
  if (!t.ok()) return t.status();
  return t->Render(vars, max_bytes);
}

TEST(JinjaEngineTest, UnimplementedStatementsAreRefusedByNameAtParse) {
  for (const char* stmt : {"{% include 'x' %}", "{% extends 'x' %}", "{% import 'x' as y %}",
                           "{% call foo() %}x{% endcall %}", "{% filter upper %}x{% endfilter %}",
                           "{% with a = 1 %}{% endwith %}", "{% do x %}"}) {
    absl::StatusOr<std::string> r = Render(stmt);
    ASSERT_FALSE(r.ok()) << stmt;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented) << stmt;
    EXPECT_THAT(r.status().message(), HasSubstr("does not implement")) << stmt;
  }
}

TEST(JinjaEngineTest, UnknownFiltersAndTestsAreRefusedByName) {
  absl::StatusOr<std::string> r = Render("{{ 'x'|urlize }}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(r.status().message(), HasSubstr("'urlize' filter"));
  r = Render("{{ 1 is prime }}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("'prime' test"));
  r = Render("{{ '%s' % 1 }}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnimplemented);
}

TEST(JinjaEngineTest, SyntaxErrorsNameTheLine) {
  for (const char* src : {"a\n{% if x %}", "{{ x ", "{% endfor %}", "{% for %}", "{{ (1 }}",
                          "{# open", "{% foo %}", "{{ 'unterminated }}"}) {
    absl::StatusOr<std::string> r = Render(src);
    ASSERT_FALSE(r.ok()) << src;
    EXPECT_THAT(r.status().message(), HasSubstr("line")) << src;
  }
}

TEST(JinjaEngineTest, TemplatesCannotModifyValues) {
  absl::StatusOr<std::string> r = Render("{% set l = [1] %}{{ l.append(2) }}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("unsafe method 'append'"));
  r = Render("{% set d = {} %}{{ d.update({'a': 1}) }}");
  ASSERT_FALSE(r.ok());
  r = Render("{% set x = 1 %}{% set x.y = 2 %}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("non-namespace"));
}

TEST(JinjaEngineTest, HostileTemplatesEndWithAStatus) {
  // Output bounded.
  absl::StatusOr<std::string> r = Render("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}", Value::Dict(), 1000);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
  r = Render("{{ 'x' * 100000000 }}", Value::Dict(), 1000);
  ASSERT_FALSE(r.ok());
  // Work bounded, with no output at all.
  r = Render("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("budget"));
  r = Render("{{ range(100000000)|length }}");
  ASSERT_FALSE(r.ok());
  // Recursion bounded.
  r = Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("nested too deeply"));
  // Parser depth bounded.
  r = Render("{{ " + std::string(5000, '(') + "1" + std::string(5000, ')') + " }}");
  ASSERT_FALSE(r.ok());
  std::string nots = "{{ ";
  for (int i = 0; i < 5000; ++i) nots += "not ";
  r = Render(nots + "1 }}");
  ASSERT_FALSE(r.ok());
  r = Render("{{ " + std::string(5000, '-') + "1 }}");
  ASSERT_FALSE(r.ok());
  // Integer overflow is an error, not undefined behaviour.
  r = Render("{{ 9223372036854775807 + 1 }}");
  ASSERT_FALSE(r.ok());
  r = Render("{{ 2 ** 70 }}");
  ASSERT_FALSE(r.ok());
}

TEST(JinjaEngineTest, GenerationBlockRendersItsBody) {
  // transformers' AssistantTracker tag: only marks positions, so the text is the body's.
  absl::StatusOr<std::string> r = Render("a{% generation %}b{{ 1 }}{% endgeneration %}c");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "ab1c");
}

TEST(JinjaEngineTest, ValuesFromJsonKeepOrderAndTypes) {
  Value v = Value::FromJson(nlohmann::ordered_json::parse(R"({"z": 1, "a": [1.5, null, true, "s"]})"));
  ValueDict vars = {{"v", v}};
  absl::StatusOr<std::string> r = Render("{{ v }}|{{ v|tojson }}", Value::Dict(vars));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, R"({'z': 1, 'a': [1.5, None, True, 's']}|{"z": 1, "a": [1.5, null, true, "s"]})");
}

class ChatTemplateDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("adapterd_chat_template_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  void Write(const std::string& name, const std::string& text) {
    std::ofstream(dir_ / name) << text;
  }
  std::filesystem::path dir_;
};

TEST_F(ChatTemplateDirTest, NamedTemplatesUseDefault) {
  Write("tokenizer_config.json",
        R"({"bos_token": {"content": "<s>", "lstrip": false}, "chat_template": [
             {"name": "tool_use", "template": "TOOLS"},
             {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"}]})");
  auto t = ChatTemplate::FromModelDir(dir_.string());
  ASSERT_TRUE(t.ok()) << t.status();
  auto out = (*t)->Render(nlohmann::ordered_json::parse(R"([{"role": "user", "content": "hi"}])"), {});
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(*out, "<s>hi");
}

TEST_F(ChatTemplateDirTest, JinjaFileBesideTheConfig) {
  Write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  Write("chat_template.jinja", "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}\n");
  auto t = ChatTemplate::FromModelDir(dir_.string());
  ASSERT_TRUE(t.ok()) << t.status();
  auto out = (*t)->Render(nlohmann::ordered_json::parse(R"([{"role": "user", "content": "x"}])"), {});
  ASSERT_TRUE(out.ok());
  EXPECT_EQ(*out, "[user]x</s>");
}

TEST_F(ChatTemplateDirTest, NoTemplateIsNotFoundAndRaiseExceptionIsInvalidArgument) {
  Write("tokenizer_config.json", R"({"eos_token": "</s>"})");
  auto t = ChatTemplate::FromModelDir(dir_.string());
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(t.status().message(), HasSubstr("no chat template"));
  auto raising = ChatTemplate::FromSource("{{ raise_exception('roles must alternate') }}", {});
  ASSERT_TRUE(raising.ok());
  auto out = (*raising)->Render(nlohmann::ordered_json::array(), {});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(out.status().message(), HasSubstr("roles must alternate"));
}

}  // namespace
}  // namespace adapterd::jinja
