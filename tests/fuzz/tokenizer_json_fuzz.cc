// libFuzzer target: arbitrary text as tokenizer.json. Loading returns a tokenizer or a status;
// a tokenizer that loads must encode, decode and stream-decode without crashing, and every id
// it produces must lie in its vocabulary.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "core/tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using adapterd::core::Tokenizer;
  auto tok = Tokenizer::FromJson(absl::string_view(reinterpret_cast<const char*>(data), size),
                                 "fuzz.json");
  if (!tok.ok()) return 0;
  for (const char* text : {"Hello world", " a  b\n\tc", "\xc3\xa9t\xc3\xa9 \xe2\x82\xac 12345",
                           "<s>[INST] x [/INST]</s>", ""}) {
    for (bool special : {true, false}) {
      auto ids = (*tok)->Encode(text, special);
      if (!ids.ok()) continue;
      for (int32_t id : *ids) {
        if (id < 0 || id >= (*tok)->vocab_size()) std::abort();
      }
      (void)(*tok)->Decode(*ids, false);
      (void)(*tok)->Decode(*ids, true);
      Tokenizer::DecodeStream stream(**tok, false);
      for (int32_t id : *ids) (void)stream.Step(id);
      (void)stream.Finish();
    }
  }
  return 0;
}
