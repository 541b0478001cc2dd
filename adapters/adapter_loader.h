// Loads a PEFT adapter folder (adapter_config.json + adapter_model.safetensors) against a
// loaded base model, validating everything before anything is returned: every tensor maps to
// a base module, every module the config targets has weights, shapes agree with the base and
// with the ranks, prompt-learning dimensions equal the base's. A refused adapter yields a
// Status naming the file, tensor or field; nothing is ever partially loaded.
//
// Thread-safety: reentrant; reads the immutable base model only.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "adapters/adapter.h"
#include "adapters/adapter_ref.h"
#include "core/causal_lm.h"

namespace adapterd::adapters {

// Loads the adapter in `dir` under `name`. `report` is filled as far as loading got, also on
// failure. Codes: NotFound (no folder or config), InvalidArgument (malformed files),
// FailedPrecondition (incompatible with the base or an unsupported option).
absl::StatusOr<std::shared_ptr<const Adapter>> LoadAdapter(
    const std::string& dir, const std::string& name, const core::CausalLm& base,
    AdapterReport* report, const AdapterFileRules& rules = AdapterFileRules());

// A projection of the base model that LoRA can target.
struct BaseModule {
  std::string name;  // e.g. "model.layers.3.self_attn.q_proj"
  int64_t layer = -1;
  core::Projection projection = core::Projection::kQ;
  bool supported = true;
  bool output = false;     // lm_head (layer = core::OutputLayer, projection kLmHead).
  bool embedding = false;  // The input embedding (LoRA as lora_embedding_A/B).
};

// Returns every Linear/Conv1D module name of the base model and its input embedding, in PEFT's
// naming.
std::vector<BaseModule> BaseModules(const core::ModelConfig& config);

// Returns whether `config` targets `module` under PEFT's rules (exclude_modules,
// target_modules list/regex/all-linear/default, layers_to_transform with layers_pattern).
absl::StatusOr<bool> IsTargeted(const AdapterConfig& config, const core::ModelConfig& base,
                                const BaseModule& module);

}  // namespace adapterd::adapters
