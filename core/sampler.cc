#include "core/sampler.h"

#include <ATen/CPUGeneratorImpl.h>

#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"

namespace adapterd::core {

at::Tensor ProcessLogits(const at::Tensor& logits, const SamplingParams& p,
                         const std::vector<int64_t>& seen, const GeneratedCounts& generated) {
  at::Tensor s = logits;
  if (generated.length < p.min_tokens && !p.min_tokens_suppressed.empty()) {
    s = s.clone();
    at::Tensor ids = at::tensor(p.min_tokens_suppressed, at::kLong).to(s.device());
    s.index_fill_(0, ids, -std::numeric_limits<float>::infinity());
  }
  if (p.repetition_penalty != 1.0f && !seen.empty()) {
    s = s.clone();
    at::Tensor ids = at::tensor(seen, at::kLong).to(s.device());
    at::Tensor score = s.index_select(0, ids);
    score = at::where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty);
    s.index_copy_(0, ids, score);
  }
  if ((p.frequency_penalty != 0.0f || p.presence_penalty != 0.0f) && !generated.ids.empty()) {
    s = s.clone();
    at::Tensor ids = at::tensor(generated.ids, at::kLong).to(s.device());
    at::Tensor counts = at::tensor(generated.counts, at::kFloat).to(s.device());
    at::Tensor delta = counts * p.frequency_penalty + p.presence_penalty;
    s.index_copy_(0, ids, s.index_select(0, ids) - delta);
  }
  if (IsGreedy(p)) return s;  // Greedy: no warpers.
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (p.temperature != 1.0f) s = s / p.temperature;
  if (p.top_k > 0) {
    const int64_t k = std::min<int64_t>(p.top_k, s.size(0));
    at::Tensor kth = std::get<0>(at::topk(s, k)).select(0, k - 1);
    s = s.masked_fill(s < kth, neg_inf);
  }
  if (p.top_p < 1.0f) {
    auto [sorted, order] = at::sort(s, /*dim=*/0, /*descending=*/false);
    at::Tensor cum = at::softmax(sorted, 0).cumsum(0);
    at::Tensor remove = cum <= (1.0f - p.top_p);
    remove.narrow(0, remove.size(0) - 1, 1).fill_(false);  // Keep at least one token.
    s = s.masked_fill(remove.scatter(0, order, remove), neg_inf);
  }
  return s;
}

absl::StatusOr<int64_t> ChooseToken(const at::Tensor& processed, const SamplingParams& p,
                                    at::Generator& generator) {
  // argmax returns a NaN's index when there is one; softmax subtracts the maximum, so a
  // finite maximum keeps every probability finite. One pass checks both.
  const int64_t best = processed.argmax().item<int64_t>();
  const float max = processed[best].item<float>();
  if (!std::isfinite(max)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "sampling failed: the processed scores' maximum is ", max,
        " (temperature=", p.temperature, ", repetition_penalty=", p.repetition_penalty,
        ", top_k=", p.top_k, ", top_p=", p.top_p, "); these values overflow float32"));
  }
  if (IsGreedy(p)) return best;
  at::Tensor probs = at::softmax(processed, 0);
  return at::multinomial(probs, 1, /*replacement=*/false, generator).item<int64_t>();
}

}  // namespace adapterd::core
