// adapter_config.json as Hugging Face PEFT writes it (LoraConfig, IA3Config,
// PrefixTuningConfig, PromptTuningConfig, PromptEncoderConfig). Every field that changes the math and that
// adapterd does not implement is refused by name; a config is never partially honoured.
//
// Thread-safety: a plain value.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace adapterd::adapters {

enum class AdapterType { kLora, kPrefixTuning, kPromptTuning, kPTuning, kIa3 };

// Returns PEFT's peft_type string ("LORA", "PREFIX_TUNING", ...).
const char* AdapterTypeName(AdapterType type);

struct AdapterConfig {
  AdapterType type = AdapterType::kLora;
  std::string base_model_name_or_path;
  std::string task_type;

  // LoRA.
  int64_t r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  bool use_dora = false;  // DoRA: each module also has a magnitude vector.
  bool fan_in_fan_out = false;
  // target_modules: a list of names, one regex (full match), or "all-linear"; unset → the
  // architecture's PEFT default.
  std::optional<std::vector<std::string>> target_list;
  std::optional<std::string> target_regex;
  bool target_all_linear = false;
  std::vector<std::string> exclude_list;
  std::optional<std::string> exclude_regex;
  std::optional<std::vector<int64_t>> layers_to_transform;
  std::vector<std::string> layers_pattern;
  // In file order: PEFT applies the first pattern that matches.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;

  // LoRA and IA3: modules trained in full and saved with the adapter (only the input
  // embedding and lm_head are accepted), as the config names them.
  std::vector<std::string> modules_to_save;

  // IA3 (targets and fan_in_fan_out as above): the modules whose input, not output, is scaled;
  // a list of names or one regex (full match); unset → the architecture's PEFT default.
  std::optional<std::vector<std::string>> feedforward_list;
  std::optional<std::string> feedforward_regex;

  // Prompt learning.
  int64_t num_virtual_tokens = 0;
  int64_t num_layers = 0;
  int64_t token_dim = 0;
  int64_t num_attention_heads = 0;
  int64_t num_transformer_submodules = 1;

  // Parses `text` (the file `label`).
  static absl::StatusOr<AdapterConfig> FromJson(absl::string_view text, absl::string_view label);
};

}  // namespace adapterd::adapters
