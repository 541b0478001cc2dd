// The prompt rule every entry point shares (gRPC, the CLI, the engine itself): a prompt is
// non-empty, its ids lie in the vocabulary, and it leaves the context room for one token.
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace adapterd::core {

// InvalidArgument naming the first problem. `virtual_tokens` are positions an adapter adds
// in front of the prompt (prefix or prompt tuning).
absl::Status ValidatePrompt(const std::vector<int32_t>& prompt, int64_t vocab_size,
                            int64_t context_length, int64_t virtual_tokens = 0);

}  // namespace adapterd::core
