#include "core/prompt_rules.h"

#include "absl/strings/str_cat.h"

namespace adapterd::core {

absl::Status ValidatePrompt(const std::vector<int32_t>& prompt, int64_t vocab_size,
                            int64_t context_length, int64_t virtual_tokens) {
  if (prompt.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("prompt token ", i, " is ", prompt[i],
                                                     ", outside the vocabulary [0, ",
                                                     vocab_size, ")"));
    }
  }
  if (static_cast<int64_t>(prompt.size()) + virtual_tokens >= context_length) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt has ", prompt.size(), " tokens",
        virtual_tokens ? absl::StrCat(" (+", virtual_tokens, " virtual)") : "",
        "; the model's context holds ", context_length,
        " and at least one must be left to generate"));
  }
  return absl::OkStatus();
}

}  // namespace adapterd::core
