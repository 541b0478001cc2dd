// The rules of a generation request, apart from anything that needs the model loaded: the
// prompt (text tokenized, or ids), sampling values, token and stop limits. One function, used
// by the gRPC service and fuzzed on its own (tests/fuzz/generate_request_fuzz.cc).
//
// Thread-safety: pure functions.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "adapterd/v1/generation.pb.h"
#include "core/tokenizer.h"
#include "server/scheduler.h"

namespace adapterd::server {

struct RequestRules {
  int64_t vocab_size = 0;
  int64_t context_length = 0;
  int64_t default_max_new_tokens = 256;
  int64_t max_new_tokens_limit = 4096;
  int64_t max_stop_strings = 16;
  int64_t max_stop_string_bytes = 1024;
  int64_t max_stop_token_ids = 256;
};

// Fills `out`'s prompt, sampling, limits and stop criteria from `request` (not its id,
// adapter or deadline). `tokenizer` may be null: text prompts are then FAILED_PRECONDITION.
// Other problems are INVALID_ARGUMENT naming the field.
absl::Status ParseGenerateRequest(const adapterd::v1::GenerateRequest& request,
                                  const RequestRules& rules, const core::Tokenizer* tokenizer,
                                  GenerationRequest* out);

}  // namespace adapterd::server
