// Per-request decoding parameters, free of LibTorch so the server can fill them.
#pragma once

#include <cstdint>
#include <vector>

#include "absl/status/status.h"

namespace adapterd::core {

struct SamplingParams {
  float temperature = 0.0f;         // Below kGreedyTemperature (0 included): greedy decoding.
  int32_t top_k = 0;                // 0 disables top-k (transformers' generate defaults to 50).
  float top_p = 1.0f;               // 1 disables nucleus filtering; otherwise in (0, 1).
  float repetition_penalty = 1.0f;  // 1 disables; otherwise > 0.
  uint64_t seed = 0;                // Seeds this request's own generator.
  int32_t top_logprobs = 0;         // How many alternatives to report per token (0..20).
  // OpenAI's penalties over generated tokens (vLLM's order: after the repetition penalty,
  // before temperature; greedy decoding too): logit -= frequency * count + presence * (count > 0).
  float presence_penalty = 0.0f;    // In [-2, 2].
  float frequency_penalty = 0.0f;   // In [-2, 2].
  // Until this many tokens are generated, `min_tokens_suppressed` (the end-of-sequence and
  // stop token ids) cannot be chosen.
  int64_t min_tokens = 0;
  std::vector<int64_t> min_tokens_suppressed;
};

inline constexpr int32_t kMaxTopLogprobs = 20;

// Temperatures below this select greedy decoding, as vLLM does (its _SAMPLING_EPS): dividing
// logits by a near-zero temperature overflows float32 (anything under ~1e-38 turns every
// logit into +-inf), and the limit of softmax(logits / t) as t -> 0 is the argmax anyway.
inline constexpr float kGreedyTemperature = 1e-5f;

// True when `params` decodes greedily (argmax after the repetition penalty).
inline bool IsGreedy(const SamplingParams& params) {
  return params.temperature < kGreedyTemperature;
}

// Returns InvalidArgument naming the first field out of range.
absl::Status ValidateSamplingParams(const SamplingParams& params);

}  // namespace adapterd::core
