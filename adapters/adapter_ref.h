// The LibTorch-free face of adapters for code outside core/ and adapters/ (the server): a
// counted reference to a loaded adapter, loading one against an Engine, and handing it to a
// sequence. The Adapter class itself (adapters/adapter.h) carries tensors.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "adapters/adapter_report.h"

namespace adapterd::core {
class Engine;
class SequenceAdapter;
class Tokenizer;
}  // namespace adapterd::core

namespace adapterd::adapters {

class Adapter;
// Held for the whole life of a request; the adapter's weights live while any reference does.
using AdapterRef = std::shared_ptr<const Adapter>;

// What an adapter load may read: every file it opens is a regular file (never a FIFO or a
// device) whose real path lies under `root` (when set), and the weights file holds at most
// `max_weight_bytes` (when non-zero). adapter_config.json is bounded by kMaxAdapterConfigBytes.
// With `bf16_factors` (--adapter_dtype bfloat16), LoRA factors stored in float32 or float16 are
// rounded to bfloat16 as a float32 CPU model holds those of bfloat16 files: half the memory
// and the bytes a step reads, at the cost of the rounding (bfloat16 factors are always kept).
struct AdapterFileRules {
  std::string root;
  uint64_t max_weight_bytes = 0;
  bool bf16_factors = false;
  // The base model's folder, whose tokenizer.json (and tokenizer_config.json) an adapter
  // folder's added_tokens.json adds its tokens to; empty: none.
  std::string base_model_dir;
};
inline constexpr uint64_t kMaxAdapterConfigBytes = 1 << 20;

// Loads and validates the PEFT adapter in `dir` against `engine`'s base model
// (see adapters/adapter_loader.h for the codes). `report` is filled also on failure.
absl::StatusOr<AdapterRef> LoadAdapterFor(const core::Engine& engine, const std::string& dir,
                                          const std::string& name, AdapterReport* report,
                                          const AdapterFileRules& rules = AdapterFileRules());

// Returns the report the adapter was admitted with.
const AdapterReport& ReportOf(const AdapterRef& adapter);

// Returns the tokenizer of an adapter that adds tokens to the vocabulary; null for the base
// model's (and for a null adapter).
const core::Tokenizer* TokenizerOf(const AdapterRef& adapter);

// Returns the adapter as the engine's per-sequence seam (null for null).
std::shared_ptr<const core::SequenceAdapter> ForSequence(AdapterRef adapter);

}  // namespace adapterd::adapters
