// libFuzzer target: arbitrary text as a chat template (a model folder's tokenizer_config.json
// is operator input). Parsing returns a template or a status; rendering over a conversation
// returns text or a status within its output, work and depth limits: never a crash or a hang.
#include <cstddef>
#include <cstdint>
#include <string>

#include "jinja/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using adapterd::jinja::ChatTemplate;
  static const nlohmann::ordered_json config = nlohmann::ordered_json::parse(
      R"({"bos_token": "<s>", "eos_token": {"content": "</s>"}, "additional_special_tokens": ["<x>"]})");
  static const nlohmann::ordered_json messages = nlohmann::ordered_json::parse(
      R"([{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo 🤖"},
          {"role": "assistant", "content": "<think>a</think>b", "tool_calls": [{"function": {"name": "f", "arguments": {"x": [1, 2.5, null]}}}]},
          {"role": "user", "content": ""}])");
  auto t = ChatTemplate::FromSource(std::string(reinterpret_cast<const char*>(data), size), config);
  if (!t.ok()) return 0;
  ChatTemplate::RenderOptions options;
  options.add_generation_prompt = true;
  options.now = 1722000309;
  (void)(*t)->Render(messages, options);
  return 0;
}
