#include "server/generate_request.h"

#include <cmath>
#include <set>

#include "absl/strings/str_cat.h"
#include "adapters/adapter_mix.h"
#include "core/prompt_rules.h"

namespace adapterd::server {

namespace v1 = adapterd::v1;

absl::Status ParseGenerateRequest(const v1::GenerateRequest& request, const RequestRules& rules,
                                  const core::Tokenizer* tokenizer, GenerationRequest* r) {
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (tokenizer == nullptr) {
        return absl::FailedPreconditionError(
            "the model folder has no tokenizer.json; send token_ids instead of text");
      }
      r->add_special_tokens = !request.has_add_special_tokens() || request.add_special_tokens();
      auto ids = tokenizer->Encode(request.text(), r->add_special_tokens);
      if (!ids.ok()) return ids.status();
      r->prompt = *std::move(ids);
      r->text = request.text();
      break;
    }
    case v1::GenerateRequest::kTokenIds:
      r->prompt.assign(request.token_ids().ids().begin(), request.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("prompt is missing: set text or token_ids");
  }
  if (absl::Status s = core::ValidatePrompt(r->prompt, rules.vocab_size, rules.context_length);
      !s.ok()) {
    return s;
  }
  r->params.temperature = request.temperature();
  r->params.top_k = request.top_k();
  r->params.top_p = request.has_top_p() ? request.top_p() : 1.0f;
  r->params.repetition_penalty =
      request.has_repetition_penalty() ? request.repetition_penalty() : 1.0f;
  r->params.seed = request.seed();
  r->params.presence_penalty = request.presence_penalty();
  r->params.frequency_penalty = request.frequency_penalty();
  r->params.min_tokens = request.min_tokens();
  if (request.top_logprobs() > static_cast<uint32_t>(core::kMaxTopLogprobs)) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, ",
                                                   core::kMaxTopLogprobs, "], got ",
                                                   request.top_logprobs()));
  }
  r->params.top_logprobs = static_cast<int32_t>(request.top_logprobs());
  if (absl::Status s = core::ValidateSamplingParams(r->params); !s.ok()) return s;
  r->max_new_tokens = request.max_new_tokens() ? request.max_new_tokens()
                                               : rules.default_max_new_tokens;
  if (r->max_new_tokens > rules.max_new_tokens_limit) {
    return absl::InvalidArgumentError(absl::StrCat("max_new_tokens ", r->max_new_tokens,
                                                   " exceeds the server's limit of ",
                                                   rules.max_new_tokens_limit));
  }
  if (request.stop_size() > rules.max_stop_strings) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", rules.max_stop_strings, " stop strings are allowed"));
  }
  for (const std::string& s : request.stop()) {
    if (s.empty()) return absl::InvalidArgumentError("stop strings must not be empty");
    if (static_cast<int64_t>(s.size()) > rules.max_stop_string_bytes) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop strings must be at most ", rules.max_stop_string_bytes, " bytes"));
    }
    r->stop.push_back(s);
  }
  if (request.stop_token_ids_size() > rules.max_stop_token_ids) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", rules.max_stop_token_ids, " stop_token_ids are allowed"));
  }
  r->stop_token_ids.assign(request.stop_token_ids().begin(), request.stop_token_ids().end());
  for (int64_t id : r->stop_token_ids) {
    if (id < 0 || id >= rules.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat("stop_token_ids: ", id, " is outside the vocabulary [0, ",
                                                     rules.vocab_size, ")"));
    }
  }
  if (r->params.min_tokens > r->max_new_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("min_tokens ", r->params.min_tokens,
                                                   " exceeds max_new_tokens ", r->max_new_tokens));
  }
  r->ignore_eos = request.ignore_eos();
  r->skip_special_tokens = request.skip_special_tokens();
  if (request.adapters_size() > 0) {
    if (!request.adapter().empty()) {
      return absl::InvalidArgumentError("set adapter or adapters (a weighted mix), not both");
    }
    if (static_cast<size_t>(request.adapters_size()) > adapters::kMaxMixParts) {
      return absl::InvalidArgumentError(absl::StrCat("adapters: a mix names at most ", adapters::kMaxMixParts,
                                                     " adapters, got ", request.adapters_size()));
    }
    std::set<std::string> names;
    for (int i = 0; i < request.adapters_size(); ++i) {
      const v1::WeightedAdapter& part = request.adapters(i);
      if (part.name().empty()) return absl::InvalidArgumentError(absl::StrCat("adapters[", i, "].name is empty"));
      if (!std::isfinite(part.weight())) {
        return absl::InvalidArgumentError(absl::StrCat("adapters[", i, "].weight is not finite"));
      }
      if (!names.insert(part.name()).second) {
        return absl::InvalidArgumentError(absl::StrCat("adapters: '", part.name(), "' is named twice"));
      }
      r->mix.emplace_back(part.name(), part.weight());
    }
  }
  return absl::OkStatus();
}

}  // namespace adapterd::server
