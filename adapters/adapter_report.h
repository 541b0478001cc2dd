// What loading an adapter found: the validation report returned by a load, a dry run
// (validate only) and the admin API. Free of LibTorch types.
//
// Thread-safety: a plain value.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nlohmann/json_fwd.hpp"

namespace adapterd::adapters {

struct AdapterReport {
  std::string name;
  std::string path;
  std::string type;  // PEFT peft_type.
  std::string base_model_name_or_path;
  // LoRA.
  std::vector<int64_t> ranks;     // Distinct ranks over the matched modules.
  std::vector<double> alphas;     // Distinct lora_alpha values.
  std::vector<double> scalings;   // Distinct effective scalings (alpha/r or alpha/sqrt(r)).
  bool use_rslora = false;
  std::vector<std::string> matched_modules;  // Base module names the adapter modifies.
  std::vector<int64_t> skipped_layers;       // Layers with no adapted module.
  // IA3: the matched modules whose input is scaled (feed-forward); the others' output is.
  std::vector<std::string> ia3_input_modules;
  // Embeddings (LoRA and IA3): what replaces the base's input embedding / lm_head, one
  // line per saved module ("lm_head [259,64] float32, replaces the base's"), the vocabulary
  // when the adapter resizes it (0: the base's), the tokens it adds (ids past the base's
  // vocabulary) and where its tokenizer comes from ("" for the base's).
  std::vector<std::string> saved_modules;
  int64_t vocab_size = 0;
  std::vector<std::string> added_tokens;
  std::string tokenizer;
  // Prompt learning.
  int64_t num_virtual_tokens = 0;
  // Both.
  std::map<std::string, int64_t> file_bytes_by_dtype;
  int64_t bytes = 0;  // Held in memory after conversion.
  std::string compute_dtype;
  int64_t bf16_modules = 0;  // LoRA modules whose factors are held in bfloat16 (see LoraModule).
  int64_t bf16_rounded_modules = 0;  // Of those, the ones rounded at load (AdapterFileRules).
  int64_t dora_modules = 0;  // LoRA modules with a DoRA magnitude vector.
  double load_seconds = 0;
  std::vector<std::string> warnings;

  nlohmann::json ToJson() const;
  std::string ToText() const;
};

}  // namespace adapterd::adapters
