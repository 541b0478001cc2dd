// adapterd's Jinja engine against Jinja itself: every case in the golden file (written at
// test time by make_golden.py with Debian's python3-jinja2, configured as transformers
// configures it) must render byte-identically, or fail where Jinja fails.
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <sstream>

#include "gtest/gtest.h"
#include "jinja/chat_template.h"

namespace adapterd::jinja {
namespace {

nlohmann::ordered_json LoadGolden() {
  const std::string path = std::string(ADAPTERD_FIXTURES_DIR) + "/chat_templates.json";
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  std::stringstream text;
  text << in.rdbuf();
  return nlohmann::ordered_json::parse(text.str());
}

TEST(JinjaGoldenTest, EveryCaseMatchesJinja) {
  setenv("TZ", "UTC", 1);
  tzset();
  const nlohmann::ordered_json golden = LoadGolden();
  const auto& cases = golden.at("cases");
  ASSERT_GT(cases.size(), 200u);
  int rendered = 0, refused = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.at("name").get<std::string>());
    const nlohmann::ordered_json config =
        c.contains("config") ? c.at("config") : nlohmann::ordered_json::object();
    absl::StatusOr<std::unique_ptr<ChatTemplate>> t =
        ChatTemplate::FromSource(c.at("template").get<std::string>(), config);
    ChatTemplate::RenderOptions options;
    options.now = c.at("now").get<std::time_t>();
    nlohmann::ordered_json messages = nlohmann::ordered_json::array();
    if (c.contains("messages")) {
      messages = c.at("messages");
      options.add_generation_prompt = c.at("add_generation_prompt").get<bool>();
      options.extra = c.at("extra");
    } else {
      options.extra = c.at("vars");
      if (options.extra.contains("messages")) messages = options.extra.at("messages");
    }
    if (c.contains("expect")) {
      ASSERT_TRUE(t.ok()) << t.status();
      absl::StatusOr<std::string> out = (*t)->Render(messages, options);
      ASSERT_TRUE(out.ok()) << out.status();
      EXPECT_EQ(*out, c.at("expect").get<std::string>());
      ++rendered;
    } else {
      if (t.ok()) {
        absl::StatusOr<std::string> out = (*t)->Render(messages, options);
        EXPECT_FALSE(out.ok()) << "Jinja refused (" << c.at("error").get<std::string>()
                               << ") but adapterd rendered: " << *out;
      }
      ++refused;
    }
  }
  EXPECT_GT(rendered, 180);
  EXPECT_GT(refused, 5);
}

}  // namespace
}  // namespace adapterd::jinja
