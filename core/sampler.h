// Token selection following transformers' generate(): repetition penalty first (also in
// greedy mode), then — only when sampling — temperature, top-k, top-p, and a draw from the
// softmax with the sequence's own seeded generator.
//
// Thread-safety: stateless functions; the generator belongs to one sequence.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "core/sampling_params.h"

namespace adapterd::core {

// Returns `logits` ([V] float32) after the processors `params` enables, in transformers'
// order. `seen` lists the ids already in the sequence (prompt and generated), each once.
at::Tensor ProcessLogits(const at::Tensor& logits, const SamplingParams& params,
                         const std::vector<int64_t>& seen);

// Returns the chosen id: argmax when params.temperature == 0, else a draw from
// softmax(processed) with `generator`.
int64_t ChooseToken(const at::Tensor& processed, const SamplingParams& params,
                    at::Generator& generator);

}  // namespace adapterd::core
