// A model's chat template, found and rendered as transformers' apply_chat_template does:
// tokenizer_config.json's `chat_template` (a string, or a list of named templates of which
// `default` is used) or else a chat_template.jinja file beside it, rendered with trim_blocks
// and lstrip_blocks, `messages`, `tools` and `documents` (None), `add_generation_prompt`, the
// special tokens (bos_token, eos_token, ...) and the globals `raise_exception` and
// `strftime_now`.
//
// Thread-safety: immutable once loaded; Render may run on many threads at once.
#pragma once

#include <ctime>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "jinja/jinja.h"
#include "nlohmann/json.hpp"

namespace adapterd::jinja {

class ChatTemplate {
 public:
  // NotFound when the folder has no template; InvalidArgument / Unimplemented (naming the
  // feature) when the template does not parse.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> FromModelDir(const std::string& dir);
  // `tokenizer_config` supplies the special tokens (may be an empty object).
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> FromSource(
      const std::string& source, const nlohmann::ordered_json& tokenizer_config);

  struct RenderOptions {
    bool add_generation_prompt = false;
    // Extra template variables (e.g. chat_template_kwargs such as enable_thinking); they
    // may not replace messages or add_generation_prompt.
    nlohmann::ordered_json extra = nlohmann::ordered_json::object();
    // The time strftime_now formats (local time); unset: now.
    std::optional<std::time_t> now;
  };
  // `messages` is a JSON array of message objects. A template's raise_exception comes back
  // as InvalidArgument with its message.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& messages,
                                     const RenderOptions& options) const;

  const std::string& source() const { return source_; }

 private:
  ChatTemplate() = default;
  std::string source_;
  Template template_;
  ValueDict special_tokens_;
};

}  // namespace adapterd::jinja
