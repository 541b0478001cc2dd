// When a generation ends: the one rule that the scheduler and the command-line generate share.
//
// Thread-safety: immutable after construction; Check() is const.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "core/engine.h"
#include "core/model_config.h"

namespace adapterd::core {

class Tokenizer;

// Returns the ids generation stops at: config.json / generation_config.json's eos_token_id,
// or, when they name none, tokenizer_config.json's eos_token (`tokenizer` may be null).
std::vector<int64_t> EosTokenIds(const ModelConfig& config, const Tokenizer* tokenizer);

struct StopCriteria {
  std::vector<int64_t> eos_token_ids;   // Not checked when ignore_eos.
  bool ignore_eos = false;
  std::vector<int64_t> stop_token_ids;  // Finish with kStop (the token is kept).
  std::vector<std::string> stop;        // Stop strings, searched in the stable text.
  int64_t max_new_tokens = 0;

  // Returns why generation ends after the `generated`-th token `token`, or nothing. `text` is
  // the stable text so far, of which the first `text_before` bytes were there before this
  // token; `positions` is the context the sequence now fills out of `context_length`.
  std::optional<FinishReason> Check(int32_t token, const std::string& text, size_t text_before,
                                    int64_t generated, int64_t positions,
                                    int64_t context_length) const;
};

}  // namespace adapterd::core
