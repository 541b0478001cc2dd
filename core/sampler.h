// Token selection following transformers' generate(): repetition penalty first (also in
// greedy mode), then — only when sampling — temperature, top-k, top-p, and a draw from the
// softmax with the sequence's own seeded generator.
//
// Thread-safety: stateless functions; the generator belongs to one sequence.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "core/sampling_params.h"

namespace adapterd::core {

// How often each id occurs among a sequence's generated tokens (for OpenAI's penalties) and
// how many were generated (for min_tokens).
struct GeneratedCounts {
  std::vector<int64_t> ids;
  std::vector<float> counts;  // counts[i] is the number of occurrences of ids[i].
  int64_t length = 0;
};

// Returns `logits` ([V] float32) after the processors `params` enables, in transformers'
// order. `seen` lists the ids already in the sequence (prompt and generated), each once.
// min_tokens and OpenAI's penalties (vLLM's semantics) read `generated`.
at::Tensor ProcessLogits(const at::Tensor& logits, const SamplingParams& params,
                         const std::vector<int64_t>& seen,
                         const GeneratedCounts& generated = GeneratedCounts());

// Returns the chosen id: argmax when IsGreedy(params), else a draw from softmax(processed)
// with `generator`. InvalidArgument when the processed scores are not usable (NaN, +inf, or
// every token masked): an odd sampling value overflowed, and only this row is affected.
absl::StatusOr<int64_t> ChooseToken(const at::Tensor& processed, const SamplingParams& params,
                                    at::Generator& generator);

}  // namespace adapterd::core
