#include "core/model_config.h"

#include <fstream>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace adapterd::core {
namespace {

using nlohmann::json;

// Typed accessors that name the file and key on a type error; a missing key or a null
// takes the default.
class Fields {
 public:
  Fields(const json& j, absl::string_view label) : j_(j), label_(label) {}

  absl::StatusOr<int64_t> Int(const char* key, int64_t def) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return def;
    if (!it->is_number_integer()) return TypeError(key, "an integer", *it);
    return it->get<int64_t>();
  }
  absl::StatusOr<double> Double(const char* key, double def) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return def;
    if (!it->is_number()) return TypeError(key, "a number", *it);
    return it->get<double>();
  }
  absl::StatusOr<bool> Bool(const char* key, bool def) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return def;
    if (!it->is_boolean()) return TypeError(key, "true or false", *it);
    return it->get<bool>();
  }
  absl::StatusOr<std::string> String(const char* key, std::string def) const {
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return def;
    if (!it->is_string()) return TypeError(key, "a string", *it);
    return it->get<std::string>();
  }
  // An int or a list of ints (eos_token_id may be either).
  absl::StatusOr<std::vector<int64_t>> IntList(const char* key) const {
    std::vector<int64_t> out;
    auto it = j_.find(key);
    if (it == j_.end() || it->is_null()) return out;
    if (it->is_number_integer()) return std::vector<int64_t>{it->get<int64_t>()};
    if (!it->is_array()) return TypeError(key, "an integer or a list of integers", *it);
    for (const auto& v : *it) {
      if (!v.is_number_integer()) return TypeError(key, "a list of integers", *it);
      out.push_back(v.get<int64_t>());
    }
    return out;
  }
  bool Has(const char* key) const {
    auto it = j_.find(key);
    return it != j_.end() && !it->is_null();
  }

 private:
  absl::Status TypeError(const char* key, const char* want, const json& got) const {
    return absl::InvalidArgumentError(
        absl::StrCat(label_, ": \"", key, "\" must be ", want, ", found ", got.dump()));
  }
  const json& j_;
  absl::string_view label_;
};

absl::Status ParseRope(const json& j, absl::string_view label, ModelConfig& c) {
  Fields f(j, label);
  ASSIGN_OR_RETURN(c.rope_theta, f.Double("rope_theta", 10000.0));
  const json* scaling = nullptr;
  if (auto it = j.find("rope_scaling"); it != j.end() && !it->is_null()) scaling = &*it;
  // transformers v5 folds rope_theta and rope_scaling into rope_parameters.
  if (auto it = j.find("rope_parameters"); it != j.end() && !it->is_null()) {
    if (!it->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(label, ": rope_parameters must be an object"));
    }
    Fields rp(*it, label);
    ASSIGN_OR_RETURN(c.rope_theta, rp.Double("rope_theta", c.rope_theta));
    scaling = &*it;
  }
  if (scaling == nullptr) return absl::OkStatus();
  if (!scaling->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": rope_scaling must be an object"));
  }
  Fields s(*scaling, label);
  ASSIGN_OR_RETURN(std::string type, s.String("rope_type", ""));
  if (type.empty()) {
    ASSIGN_OR_RETURN(type, s.String("type", "default"));
  }
  RopeScaling& r = c.rope_scaling;
  r.type = type;
  if (type == "default") return absl::OkStatus();
  if (type != "linear" && type != "llama3") {
    return absl::UnimplementedError(
        absl::StrCat(label, ": rope_scaling type \"", type,
                     "\" is not supported (supported: default, linear, llama3)"));
  }
  if (!s.Has("factor")) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": rope_scaling type \"", type, "\" needs \"factor\""));
  }
  ASSIGN_OR_RETURN(r.factor, s.Double("factor", 1.0));
  if (r.factor <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": rope_scaling factor must be > 0"));
  }
  if (type == "llama3") {
    ASSIGN_OR_RETURN(r.low_freq_factor, s.Double("low_freq_factor", 1.0));
    ASSIGN_OR_RETURN(r.high_freq_factor, s.Double("high_freq_factor", 4.0));
    ASSIGN_OR_RETURN(r.original_max_position_embeddings,
                     s.Int("original_max_position_embeddings", 8192));
    if (r.high_freq_factor <= r.low_freq_factor) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": llama3 rope_scaling needs high_freq_factor > low_freq_factor"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseLlamaFamily(const json& j, absl::string_view label, ModelConfig& c) {
  Fields f(j, label);
  const bool qwen2 = c.architecture_name == "Qwen2ForCausalLM";
  const bool qwen3 = c.architecture_name == "Qwen3ForCausalLM";
  const bool mistral = c.architecture_name == "MistralForCausalLM";
  // (Defaults: each family's configuration class in transformers.)
  ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size", qwen2 || qwen3 ? 151936 : 32000));
  ASSIGN_OR_RETURN(c.hidden_size, f.Int("hidden_size", 4096));
  ASSIGN_OR_RETURN(c.intermediate_size,
                   f.Int("intermediate_size", qwen2 || qwen3 ? 22016 : mistral ? 14336 : 11008));
  ASSIGN_OR_RETURN(c.num_layers, f.Int("num_hidden_layers", 32));
  ASSIGN_OR_RETURN(c.num_heads, f.Int("num_attention_heads", 32));
  ASSIGN_OR_RETURN(c.num_kv_heads,
                   f.Int("num_key_value_heads", mistral ? 8 : c.num_heads));
  ASSIGN_OR_RETURN(c.max_position_embeddings,
                   f.Int("max_position_embeddings", qwen2 || qwen3 ? 32768 : mistral ? 131072 : 2048));
  ASSIGN_OR_RETURN(c.norm_eps, f.Double("rms_norm_eps", 1e-6));
  ASSIGN_OR_RETURN(c.activation, f.String("hidden_act", "silu"));
  if (c.num_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": num_attention_heads must be > 0"));
  }
  ASSIGN_OR_RETURN(c.head_dim, f.Int("head_dim", qwen3 ? 128 : c.hidden_size / c.num_heads));
  RETURN_IF_ERROR(ParseRope(j, label, c));
  if (qwen2 || qwen3) {
    if (qwen2) {
      c.qkv_bias = true;
    } else {
      ASSIGN_OR_RETURN(bool attention_bias, f.Bool("attention_bias", false));
      c.qkv_bias = c.o_bias = attention_bias;
      c.qk_norm = true;
    }
    ASSIGN_OR_RETURN(bool use_window, f.Bool("use_sliding_window", false));
    if (use_window) {
      ASSIGN_OR_RETURN(c.sliding_window, f.Int("sliding_window", 4096));
      ASSIGN_OR_RETURN(c.first_sliding_layer, f.Int("max_window_layers", 28));
    }
  } else {
    ASSIGN_OR_RETURN(bool attention_bias, f.Bool("attention_bias", false));
    c.qkv_bias = c.o_bias = attention_bias;
    ASSIGN_OR_RETURN(c.mlp_bias, f.Bool("mlp_bias", false));
    if (mistral) {
      ASSIGN_OR_RETURN(c.sliding_window, f.Int("sliding_window", 4096));
    }
  }
  ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", false));
  if (c.activation != "silu") {
    return absl::UnimplementedError(absl::StrCat(label, ": hidden_act \"", c.activation,
                                                 "\" is not supported for ",
                                                 c.architecture_name, " (supported: silu)"));
  }
  return absl::OkStatus();
}

absl::Status ParseGpt2(const json& j, absl::string_view label, ModelConfig& c) {
  Fields f(j, label);
  ASSIGN_OR_RETURN(c.vocab_size, f.Int("vocab_size", 50257));
  ASSIGN_OR_RETURN(c.hidden_size, f.Int("n_embd", 768));
  ASSIGN_OR_RETURN(c.num_layers, f.Int("n_layer", 12));
  ASSIGN_OR_RETURN(c.num_heads, f.Int("n_head", 12));
  ASSIGN_OR_RETURN(c.max_position_embeddings, f.Int("n_positions", 1024));
  ASSIGN_OR_RETURN(c.intermediate_size, f.Int("n_inner", 4 * c.hidden_size));
  ASSIGN_OR_RETURN(c.norm_eps, f.Double("layer_norm_epsilon", 1e-5));
  ASSIGN_OR_RETURN(c.activation, f.String("activation_function", "gelu_new"));
  ASSIGN_OR_RETURN(c.scale_attn_weights, f.Bool("scale_attn_weights", true));
  ASSIGN_OR_RETURN(c.scale_attn_by_inverse_layer_idx,
                   f.Bool("scale_attn_by_inverse_layer_idx", false));
  ASSIGN_OR_RETURN(c.tie_word_embeddings, f.Bool("tie_word_embeddings", true));
  if (c.num_heads <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": n_head must be > 0"));
  }
  c.num_kv_heads = c.num_heads;
  c.head_dim = c.hidden_size / c.num_heads;
  if (c.activation != "gelu_new" && c.activation != "gelu_pytorch_tanh" &&
      c.activation != "gelu" && c.activation != "relu") {
    return absl::UnimplementedError(
        absl::StrCat(label, ": activation_function \"", c.activation,
                     "\" is not supported (supported: gelu_new, gelu_pytorch_tanh, gelu, relu)"));
  }
  return absl::OkStatus();
}

absl::Status Validate(const ModelConfig& c, absl::string_view label) {
  auto positive = [&](const char* what, int64_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", what, " must be > 0, found ", v));
  };
  RETURN_IF_ERROR(positive("vocab_size", c.vocab_size));
  RETURN_IF_ERROR(positive("hidden size", c.hidden_size));
  RETURN_IF_ERROR(positive("intermediate size", c.intermediate_size));
  RETURN_IF_ERROR(positive("number of layers", c.num_layers));
  RETURN_IF_ERROR(positive("number of key/value heads", c.num_kv_heads));
  RETURN_IF_ERROR(positive("head_dim", c.head_dim));
  RETURN_IF_ERROR(positive("max_position_embeddings", c.max_position_embeddings));
  // Upper bounds, checked before anything is sized from them: far above every released model
  // (Llama 3.1 405B: 126 layers, hidden 16384, 128 heads, context 131072; vocabularies to ~262k).
  auto at_most = [&](const char* what, int64_t v, int64_t limit) -> absl::Status {
    if (v <= limit) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": ", what, " is ", v, ", above adapterd's limit of ", limit));
  };
  RETURN_IF_ERROR(at_most("vocab_size", c.vocab_size, int64_t{1} << 22));
  RETURN_IF_ERROR(at_most("hidden size", c.hidden_size, int64_t{1} << 17));
  RETURN_IF_ERROR(at_most("intermediate size", c.intermediate_size, int64_t{1} << 19));
  RETURN_IF_ERROR(at_most("number of layers", c.num_layers, 1024));
  RETURN_IF_ERROR(at_most("number of attention heads", c.num_heads, 4096));
  RETURN_IF_ERROR(at_most("max_position_embeddings", c.max_position_embeddings, int64_t{1} << 24));
  RETURN_IF_ERROR(at_most("head_dim", c.head_dim, 4096));
  // Values a forward pass divides by, takes the log or the root of: garbage in, NaN out.
  if (!(c.norm_eps > 0 && c.norm_eps < 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        label, ": the normalisation epsilon (rms_norm_eps / layer_norm_epsilon) must be in "
               "(0, 1), found ", c.norm_eps));
  }
  if (c.architecture == Architecture::kLlama && !(c.rope_theta > 1 && std::isfinite(c.rope_theta))) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": rope_theta must be a finite number > 1, found ", c.rope_theta));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": num_attention_heads ", c.num_heads,
                     " is not a multiple of num_key_value_heads ", c.num_kv_heads));
  }
  if (c.head_dim % 2 != 0 && c.architecture == Architecture::kLlama) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": head_dim ", c.head_dim,
                                                   " must be even for rotary embeddings"));
  }
  if (c.architecture == Architecture::kGpt2 && c.hidden_size % c.num_heads != 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": n_embd ", c.hidden_size,
                                                   " is not a multiple of n_head ", c.num_heads));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ReadFileToString(const std::string& path, const FileRules& rules) {
  ASSIGN_OR_RETURN(const int fd, OpenRegularFile(path, rules));
  std::string text;
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      ::close(fd);
      return absl::PermissionDeniedError(absl::StrCat(path, ": read failed"));
    }
    if (n == 0) break;
    text.append(buf, static_cast<size_t>(n));
    if (rules.max_bytes > 0 && text.size() > rules.max_bytes) {  // It grew while being read.
      ::close(fd);
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": more than the limit of ", rules.max_bytes, " bytes"));
    }
  }
  ::close(fd);
  return text;
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(absl::string_view config_json,
                                                  absl::string_view label) {
  json j = json::parse(config_json.begin(), config_json.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not a valid JSON object"));
  }
  ModelConfig c;
  Fields f(j, label);
  auto archs = j.find("architectures");
  if (archs == j.end() || !archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": \"architectures\" must be a non-empty list of names"));
  }
  c.architecture_name = (*archs)[0].get<std::string>();
  ASSIGN_OR_RETURN(c.model_type, f.String("model_type", ""));
  ASSIGN_OR_RETURN(c.name_or_path, f.String("_name_or_path", ""));
  ASSIGN_OR_RETURN(c.torch_dtype, f.String("torch_dtype", ""));
  if (c.torch_dtype.empty()) {
    ASSIGN_OR_RETURN(c.torch_dtype, f.String("dtype", ""));
  }
  if (c.architecture_name == "LlamaForCausalLM" || c.architecture_name == "MistralForCausalLM" ||
      c.architecture_name == "Qwen2ForCausalLM" || c.architecture_name == "Qwen3ForCausalLM") {
    c.architecture = Architecture::kLlama;
    RETURN_IF_ERROR(ParseLlamaFamily(j, label, c));
  } else if (c.architecture_name == "GPT2LMHeadModel") {
    c.architecture = Architecture::kGpt2;
    RETURN_IF_ERROR(ParseGpt2(j, label, c));
  } else {
    return absl::UnimplementedError(absl::StrCat(
        label, ": architecture \"", c.architecture_name,
        "\" is not supported (supported: LlamaForCausalLM, MistralForCausalLM, "
        "Qwen2ForCausalLM, Qwen3ForCausalLM, GPT2LMHeadModel)"));
  }
  const bool gpt2 = c.architecture == Architecture::kGpt2;
  ASSIGN_OR_RETURN(int64_t bos, f.Int("bos_token_id", gpt2 ? 50256 : -1));
  if (bos >= 0) c.bos_token_id = bos;
  ASSIGN_OR_RETURN(c.eos_token_ids, f.IntList("eos_token_id"));
  if (c.eos_token_ids.empty() && gpt2) c.eos_token_ids = {50256};
  ASSIGN_OR_RETURN(int64_t pad, f.Int("pad_token_id", -1));
  if (pad >= 0) c.pad_token_id = pad;
  RETURN_IF_ERROR(Validate(c, label));
  return c;
}

absl::StatusOr<ModelConfig> ModelConfig::Load(const std::string& dir) {
  const std::string path = dir + "/config.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  ASSIGN_OR_RETURN(ModelConfig c, FromJson(text, path));
  const std::string gen_path = dir + "/generation_config.json";
  auto gen_text = ReadFileToString(gen_path);
  if (gen_text.ok()) {
    json g = json::parse(*gen_text, nullptr, /*allow_exceptions=*/false);
    if (g.is_discarded() || !g.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(gen_path, ": not a valid JSON object"));
    }
    Fields f(g, gen_path);
    ASSIGN_OR_RETURN(auto eos, f.IntList("eos_token_id"));
    if (!eos.empty()) c.eos_token_ids = eos;
    if (f.Has("bos_token_id")) {
      ASSIGN_OR_RETURN(c.bos_token_id, f.Int("bos_token_id", -1));
    }
    if (f.Has("pad_token_id")) {
      ASSIGN_OR_RETURN(c.pad_token_id, f.Int("pad_token_id", -1));
    }
  } else if (!absl::IsNotFound(gen_text.status())) {
    return gen_text.status();
  }
  return c;
}

}  // namespace adapterd::core
