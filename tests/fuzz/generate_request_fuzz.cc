// libFuzzer target: arbitrary bytes as a serialized adapterd.v1.GenerateRequest, through the
// server's request rules (tokenizing text prompts with a small BPE tokenizer). A request the
// rules accept must be one the scheduler can run: a prompt inside the vocabulary and the
// context, valid sampling values, bounded tokens and stops.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/sampling_params.h"
#include "google/protobuf/stubs/logging.h"
#include "server/generate_request.h"

namespace {

const adapterd::core::Tokenizer* SmallTokenizer() {
  static auto* tok = [] {
    auto t = adapterd::core::Tokenizer::FromJson(
        R"({"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"c":3,"<s>":4},"merges":["a b"],)"
        R"("byte_fallback":false},"added_tokens":[{"id":4,"content":"<s>","special":true}]})",
        "fuzz-tokenizer.json");
    return t.ok() ? t->release() : nullptr;
  }();
  return tok;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  google::protobuf::SetLogHandler(nullptr);  // Invalid UTF-8 in `text` is logged otherwise.
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  adapterd::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  adapterd::server::RequestRules rules;
  rules.vocab_size = 5;
  rules.context_length = 64;
  adapterd::server::GenerationRequest out;
  if (!adapterd::server::ParseGenerateRequest(request, rules, SmallTokenizer(), &out).ok()) {
    return 0;
  }
  if (out.prompt.empty() || static_cast<int64_t>(out.prompt.size()) >= rules.context_length) {
    std::abort();
  }
  for (int32_t id : out.prompt) {
    if (id < 0 || id >= rules.vocab_size) std::abort();
  }
  if (!adapterd::core::ValidateSamplingParams(out.params).ok()) std::abort();
  if (out.max_new_tokens < 0 || out.max_new_tokens > rules.max_new_tokens_limit) std::abort();
  if (static_cast<int64_t>(out.stop.size()) > rules.max_stop_strings) std::abort();
  for (const std::string& s : out.stop) {
    if (s.empty() || static_cast<int64_t>(s.size()) > rules.max_stop_string_bytes) std::abort();
  }
  return 0;
}
