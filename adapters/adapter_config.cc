#include "adapters/adapter_config.h"

#include <algorithm>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace adapterd::adapters {
namespace {

using Json = nlohmann::ordered_json;  // rank_pattern / alpha_pattern order matters.

bool IsSet(const Json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return false;
  if (it->is_boolean()) return it->get<bool>();
  if (it->is_array() || it->is_object() || it->is_string()) return !it->empty();
  return true;
}

absl::Status Refuse(absl::string_view label, absl::string_view what) {
  return absl::FailedPreconditionError(absl::StrCat(label, ": ", what));
}

absl::StatusOr<std::vector<std::string>> StringOrList(const Json& v, absl::string_view label,
                                                      const char* key) {
  std::vector<std::string> out;
  if (v.is_string()) {
    out.push_back(v.get<std::string>());
  } else if (v.is_array()) {
    for (const auto& e : v) {
      if (!e.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": \"", key, "\" must hold strings, found ", e.dump()));
      }
      out.push_back(e.get<std::string>());
    }
  } else if (!v.is_null()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": \"", key, "\" must be a string or a list, found ", v.dump()));
  }
  return out;
}

absl::StatusOr<int64_t> Int(const Json& j, const char* key, int64_t def, absl::string_view label) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return def;
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat(label, ": \"", key, "\" must be an integer, found ", it->dump()));
  }
  return it->get<int64_t>();
}

// target_modules and exclude_modules, as LoRA and IA3 configs spell them.
absl::Status ParseTargets(const Json& j, absl::string_view label, AdapterConfig& c) {
  if (auto it = j.find("target_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      if (absl::AsciiStrToLower(it->get<std::string>()) == "all-linear") {
        c.target_all_linear = true;
      } else {
        c.target_regex = it->get<std::string>();
      }
    } else {
      ASSIGN_OR_RETURN(auto list, StringOrList(*it, label, "target_modules"));
      c.target_list = std::move(list);
    }
  }
  if (auto it = j.find("exclude_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.exclude_regex = it->get<std::string>();
    } else {
      ASSIGN_OR_RETURN(c.exclude_list, StringOrList(*it, label, "exclude_modules"));
    }
  }
  return absl::OkStatus();
}

// modules_to_save: whole modules trained alongside the adapter and saved with it. adapterd
// serves the input embedding and lm_head (typically saved because tokens were added); any other
// module is refused by name.
absl::Status ParseModulesToSave(const Json& j, absl::string_view label, AdapterConfig& c) {
  if (!IsSet(j, "modules_to_save")) return absl::OkStatus();
  ASSIGN_OR_RETURN(c.modules_to_save, StringOrList(j["modules_to_save"], label, "modules_to_save"));
  for (const std::string& m : c.modules_to_save) {
    if (m != "lm_head" && m != "embed_tokens" && m != "wte" && m != "model.embed_tokens" &&
        m != "transformer.wte") {
      return Refuse(label, absl::StrCat("modules_to_save \"", m,
                                        "\" is not supported: adapterd serves saved copies of the input "
                                        "embedding (embed_tokens, wte) and lm_head only"));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseIa3(const Json& j, absl::string_view label, AdapterConfig& c) {
  c.fan_in_fan_out = j.value("fan_in_fan_out", false);
  RETURN_IF_ERROR(ParseModulesToSave(j, label, c));
  RETURN_IF_ERROR(ParseTargets(j, label, c));
  if (auto it = j.find("feedforward_modules"); it != j.end() && !it->is_null()) {
    if (it->is_string()) {
      c.feedforward_regex = it->get<std::string>();
    } else {
      ASSIGN_OR_RETURN(auto list, StringOrList(*it, label, "feedforward_modules"));
      c.feedforward_list = std::move(list);
    }
  }
  // PEFT's IA3Config check: listed feed-forward modules must be listed targets too.
  if (c.feedforward_list && c.target_list) {
    for (const std::string& f : *c.feedforward_list) {
      if (std::find(c.target_list->begin(), c.target_list->end(), f) == c.target_list->end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": feedforward_modules must be a subset of target_modules; \"", f, "\" is not"));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status ParseLora(const Json& j, absl::string_view label, AdapterConfig& c) {
  ASSIGN_OR_RETURN(c.r, Int(j, "r", 8, label));
  if (c.r <= 0) return absl::InvalidArgumentError(absl::StrCat(label, ": r must be > 0"));
  if (auto it = j.find("lora_alpha"); it != j.end() && !it->is_null()) {
    if (!it->is_number()) {
      return absl::InvalidArgumentError(absl::StrCat(label, ": lora_alpha must be a number"));
    }
    c.lora_alpha = it->get<double>();
  }
  c.use_rslora = j.value("use_rslora", false);
  c.fan_in_fan_out = j.value("fan_in_fan_out", false);

  // Options that change the math and are not implemented: refused, by name.
  c.use_dora = j.value("use_dora", false);
  RETURN_IF_ERROR(ParseModulesToSave(j, label, c));
  if (auto it = j.find("bias"); it != j.end() && !it->is_null() && *it != "none") {
    return Refuse(label, absl::StrCat("bias \"", it->get<std::string>(),
                                      "\" is not supported (only \"none\")"));
  }
  if (IsSet(j, "lora_bias")) return Refuse(label, "lora_bias is not supported");
  for (const char* key : {"layer_replication", "target_parameters", "trainable_token_indices",
                          "alora_invocation_tokens", "megatron_config", "use_qalora"}) {
    if (IsSet(j, key)) return Refuse(label, absl::StrCat(key, " is not supported"));
  }
  if (auto it = j.find("init_lora_weights"); it != j.end() && it->is_string()) {
    const std::string init = absl::AsciiStrToLower(it->get<std::string>());
    if (init != "gaussian" && init != "eva") {
      return Refuse(label, absl::StrCat("init_lora_weights \"", it->get<std::string>(),
                                        "\" mutates the base weights; convert the adapter to a "
                                        "plain LoRA when saving"));
    }
  }

  RETURN_IF_ERROR(ParseTargets(j, label, c));
  if (auto it = j.find("layers_to_transform"); it != j.end() && !it->is_null()) {
    if (c.target_regex) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": layers_to_transform cannot be used with a regex target_modules"));
    }
    std::vector<int64_t> layers;
    if (it->is_number_integer()) {
      layers.push_back(it->get<int64_t>());
    } else if (it->is_array()) {
      for (const auto& e : *it) {
        if (!e.is_number_integer()) {
          return absl::InvalidArgumentError(
              absl::StrCat(label, ": layers_to_transform must hold integers"));
        }
        layers.push_back(e.get<int64_t>());
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": layers_to_transform must be an integer or a list"));
    }
    c.layers_to_transform = std::move(layers);
  }
  if (auto it = j.find("layers_pattern"); it != j.end()) {
    ASSIGN_OR_RETURN(c.layers_pattern, StringOrList(*it, label, "layers_pattern"));
  }
  if (auto it = j.find("rank_pattern"); it != j.end() && it->is_object()) {
    for (auto& [k, v] : it->items()) {
      if (!v.is_number_integer() || v.get<int64_t>() <= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": rank_pattern[\"", k, "\"] must be a positive integer"));
      }
      c.rank_pattern.emplace_back(k, v.get<int64_t>());
    }
  }
  if (auto it = j.find("alpha_pattern"); it != j.end() && it->is_object()) {
    for (auto& [k, v] : it->items()) {
      if (!v.is_number()) {
        return absl::InvalidArgumentError(
            absl::StrCat(label, ": alpha_pattern[\"", k, "\"] must be a number"));
      }
      c.alpha_pattern.emplace_back(k, v.get<double>());
    }
  }
  return absl::OkStatus();
}

absl::Status ParsePromptLearning(const Json& j, absl::string_view label, AdapterConfig& c) {
  ASSIGN_OR_RETURN(c.num_virtual_tokens, Int(j, "num_virtual_tokens", 0, label));
  ASSIGN_OR_RETURN(c.num_layers, Int(j, "num_layers", 0, label));
  ASSIGN_OR_RETURN(c.token_dim, Int(j, "token_dim", 0, label));
  ASSIGN_OR_RETURN(c.num_attention_heads, Int(j, "num_attention_heads", 0, label));
  ASSIGN_OR_RETURN(c.num_transformer_submodules, Int(j, "num_transformer_submodules", 1, label));
  if (c.num_virtual_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": num_virtual_tokens must be > 0"));
  }
  if (c.num_transformer_submodules != 1) {
    return Refuse(label, absl::StrCat("num_transformer_submodules ",
                                      c.num_transformer_submodules,
                                      " (encoder-decoder) is not supported"));
  }
  return absl::OkStatus();
}

}  // namespace

const char* AdapterTypeName(AdapterType type) {
  switch (type) {
    case AdapterType::kLora: return "LORA";
    case AdapterType::kPrefixTuning: return "PREFIX_TUNING";
    case AdapterType::kPromptTuning: return "PROMPT_TUNING";
    case AdapterType::kPTuning: return "P_TUNING";
    case AdapterType::kIa3: return "IA3";
  }
  return "?";
}

absl::StatusOr<AdapterConfig> AdapterConfig::FromJson(absl::string_view text,
                                                      absl::string_view label) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not a valid JSON object"));
  }
  AdapterConfig c;
  auto type = j.find("peft_type");
  if (type == j.end() || !type->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": \"peft_type\" is required"));
  }
  const std::string t = type->get<std::string>();
  if (t == "LORA") {
    c.type = AdapterType::kLora;
  } else if (t == "PREFIX_TUNING") {
    c.type = AdapterType::kPrefixTuning;
  } else if (t == "PROMPT_TUNING") {
    c.type = AdapterType::kPromptTuning;
  } else if (t == "P_TUNING") {
    c.type = AdapterType::kPTuning;
  } else if (t == "IA3") {
    c.type = AdapterType::kIa3;
  } else {
    return Refuse(label, absl::StrCat("peft_type \"", t,
                                      "\" is not supported (supported: LORA, IA3, PREFIX_TUNING, "
                                      "PROMPT_TUNING, P_TUNING)"));
  }
  if (auto it = j.find("base_model_name_or_path"); it != j.end() && it->is_string()) {
    c.base_model_name_or_path = it->get<std::string>();
  }
  if (auto it = j.find("task_type"); it != j.end() && it->is_string()) {
    c.task_type = it->get<std::string>();
  }
  if (!c.task_type.empty() && c.task_type != "CAUSAL_LM") {
    return Refuse(label, absl::StrCat("task_type \"", c.task_type,
                                      "\" is not supported (only CAUSAL_LM)"));
  }
  try {
    if (c.type == AdapterType::kLora) {
      RETURN_IF_ERROR(ParseLora(j, label, c));
    } else if (c.type == AdapterType::kIa3) {
      RETURN_IF_ERROR(ParseIa3(j, label, c));
    } else {
      RETURN_IF_ERROR(ParsePromptLearning(j, label, c));
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", e.what()));
  }
  return c;
}

}  // namespace adapterd::adapters
