// The base model's hyper-parameters, read from a Hugging Face model folder's config.json
// (and generation_config.json for token ids). Missing keys take the architecture class's
// default, as transformers does. Architectures, activations and rope types we do not
// implement are refused with their names rather than approximated.
//
// Thread-safety: a plain value; immutable once loaded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "core/file_rules.h"

namespace adapterd::core {

enum class Architecture { kLlama, kGpt2 };

struct RopeScaling {
  std::string type = "default";  // default | linear | llama3
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture_name;  // As written in config.json, e.g. "Qwen2ForCausalLM".
  Architecture architecture = Architecture::kLlama;
  std::string model_type;
  std::string name_or_path;  // "_name_or_path", when the checkpoint recorded one.
  std::string torch_dtype;   // "torch_dtype" (v4) or "dtype" (v5); informational.

  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double norm_eps = 1e-6;
  std::string activation;  // silu | gelu_new | gelu_pytorch_tanh | gelu | relu

  // Llama family.
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool qkv_bias = false;  // Llama and Qwen3 attention_bias, always true for Qwen2.
  bool o_bias = false;    // Llama and Qwen3 attention_bias only.
  // Qwen3: an RMSNorm over each head of q and k (self_attn.q_norm / k_norm, [head_dim]) after
  // the projection, before the rotary embedding.
  bool qk_norm = false;
  bool mlp_bias = false;
  int64_t sliding_window = 0;  // 0 = plain causal attention.
  int64_t first_sliding_layer = 0;  // Layers >= this use the window (Qwen2 max_window_layers).

  // GPT-2.
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;

  bool tie_word_embeddings = false;
  std::optional<int64_t> bos_token_id;
  std::vector<int64_t> eos_token_ids;  // generation_config.json wins over config.json.
  std::optional<int64_t> pad_token_id;

  // Parses config.json text. `label` names the file in error messages.
  static absl::StatusOr<ModelConfig> FromJson(absl::string_view config_json, absl::string_view label);
  // Reads `dir`/config.json and, when present, `dir`/generation_config.json.
  static absl::StatusOr<ModelConfig> Load(const std::string& dir);
};

// Reads a whole regular file into a string, under `rules`; NotFound when it does not exist.
absl::StatusOr<std::string> ReadFileToString(const std::string& path,
                                             const FileRules& rules = FileRules());

}  // namespace adapterd::core
