// Hugging Face tokenizers' tokenizer.json, implemented to give byte-identical ids and text:
// added tokens matched before the model, normalizers (Sequence, NFC/NFKC/NFD/NFKD,
// Lowercase, Prepend, Replace, Strip), pre-tokenizers (Sequence, Split, ByteLevel, Metaspace)
// with PCRE2 (UTF + Unicode properties) for the regexes, the BPE model (byte fallback,
// ignore_merges, unk fusing), TemplateProcessing, and the decoders (ByteLevel, Metaspace,
// Replace, ByteFallback, Fuse, Strip, Sequence). A component the file uses that is not
// implemented is refused at load with its name, never approximated.
//
// Thread-safety: immutable after loading; Encode/Decode may run on any thread concurrently.
// A DecodeStream belongs to one request.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace adapterd::core {

// Special tokens named by tokenizer_config.json (bos_token, eos_token, pad_token, unk_token,
// each a string or an AddedToken object), resolved to ids.
struct SpecialTokenIds {
  std::optional<int32_t> bos, eos, pad, unk;
};

class Tokenizer {
 public:
  // Parses tokenizer.json text and, when given, tokenizer_config.json text; `label` names
  // the file in errors. A special token the config names but the vocabulary lacks is an error.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(
      absl::string_view json, absl::string_view label, absl::string_view tokenizer_config = {});
  // Reads `dir`/tokenizer.json and, when present, `dir`/tokenizer_config.json.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromModelDir(const std::string& dir);

  // The special tokens of tokenizer_config.json (empty without one). The template that
  // Encode(…, true) applies is tokenizer.json's post-processor, as in the tokenizers library.
  const SpecialTokenIds& special_tokens() const;
  ~Tokenizer();

  // Returns the ids of `text` (which must be valid UTF-8). With `add_special_tokens` the
  // post-processor's template (e.g. BOS) is applied.
  absl::StatusOr<std::vector<int32_t>> Encode(absl::string_view text,
                                              bool add_special_tokens) const;
  // Returns the text of `ids`; InvalidArgument for an id outside the vocabulary.
  absl::StatusOr<std::string> Decode(const std::vector<int32_t>& ids,
                                     bool skip_special_tokens) const;

  // Ids of the vocabulary plus added tokens: every id is < vocab_size().
  int32_t vocab_size() const;
  // Returns the id of `token` (model vocabulary or added token), if any.
  std::optional<int32_t> TokenToId(absl::string_view token) const;
  // True for added tokens flagged special.
  bool IsSpecial(int32_t id) const;

  // Incremental detokenization for streaming (the algorithm of tokenizers' DecodeStream):
  // text is emitted as soon as it is stable and never ends in a broken UTF-8 sequence; the
  // pieces from Step() followed by Finish() concatenate to Decode(all ids).
  class DecodeStream {
   public:
    DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens);
    // Adds `id`; returns the newly stable text (possibly empty).
    absl::StatusOr<std::string> Step(int32_t id);
    // Returns whatever text was held back (e.g. an incomplete UTF-8 sequence at the end).
    absl::StatusOr<std::string> Finish();

   private:
    const Tokenizer& tokenizer_;
    bool skip_special_;
    std::vector<int32_t> all_ids_;
    std::vector<int32_t> window_;
    std::string prefix_;
    size_t prefix_index_ = 0;
    size_t emitted_bytes_ = 0;
  };

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Returns true when `text` is valid UTF-8.
bool IsValidUtf8(absl::string_view text);

}  // namespace adapterd::core
