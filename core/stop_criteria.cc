#include "core/stop_criteria.h"

#include <algorithm>

#include "core/tokenizer.h"

namespace adapterd::core {

std::vector<int64_t> EosTokenIds(const ModelConfig& config, const Tokenizer* tokenizer) {
  if (!config.eos_token_ids.empty()) return config.eos_token_ids;
  if (tokenizer != nullptr && tokenizer->special_tokens().eos) {
    return {*tokenizer->special_tokens().eos};
  }
  return {};
}

std::optional<FinishReason> StopCriteria::Check(int32_t token, const std::string& text,
                                                size_t text_before, int64_t generated,
                                                int64_t positions, int64_t context_length) const {
  if (!ignore_eos && std::count(eos_token_ids.begin(), eos_token_ids.end(), token)) {
    return FinishReason::kEos;
  }
  if (std::count(stop_token_ids.begin(), stop_token_ids.end(), token)) return FinishReason::kStop;
  for (const std::string& s : stop) {
    // Only a match that ends in the new text counts: earlier text was checked before.
    const size_t from = text_before >= s.size() ? text_before - s.size() + 1 : 0;
    if (!s.empty() && text.find(s, from) != std::string::npos) return FinishReason::kStop;
  }
  if (generated >= max_new_tokens || positions >= context_length) return FinishReason::kLength;
  return std::nullopt;
}

}  // namespace adapterd::core
