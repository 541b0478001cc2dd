// A loaded PEFT adapter: its weights converted to the base model's compute dtype and device,
// indexed by (layer, projection), and the validation report that admitted it. Immutable once
// built and shared (shared_ptr<const Adapter>) by every request that uses it; the last
// reference frees the weights, which is how unloading never breaks an in-flight request.
//
// Thread-safety: immutable; any thread may use it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "adapters/adapter_config.h"
#include "core/causal_lm.h"
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
  // Prompt learning.
  int64_t num_virtual_tokens = 0;
  // Both.
  std::map<std::string, int64_t> file_bytes_by_dtype;
  int64_t bytes = 0;  // Held in memory after conversion.
  std::string compute_dtype;
  double load_seconds = 0;
  std::vector<std::string> warnings;

  nlohmann::json ToJson() const;
  std::string ToText() const;
};

// One adapted projection: y += (x · A_t) · B_t, with the scaling folded into B_t.
struct LoraModule {
  at::Tensor a_t;  // [in, r]
  at::Tensor b_t;  // [r, out], already multiplied by the scaling.
};

// The tensors of one adapter; exactly one part is set.
struct AdapterWeights {
  // LoRA: modules keyed by (layer, projection).
  std::map<std::pair<int64_t, core::Projection>, LoraModule> lora;
  // Prefix tuning: per-layer keys and values [kv_heads, virtual_tokens, head_dim].
  std::vector<std::pair<at::Tensor, at::Tensor>> prefix;
  // Prompt tuning / P-tuning: soft prompt [virtual_tokens, hidden].
  at::Tensor soft_prompt;
};

class Adapter final : public core::SequenceAdapter {
 public:
  Adapter(AdapterReport report, AdapterWeights weights);

  Adapter(const Adapter&) = delete;
  Adapter& operator=(const Adapter&) = delete;

  const AdapterReport& report() const { return report_; }
  const std::string& name() const { return report_.name; }
  int64_t bytes() const { return report_.bytes; }

  // core::SequenceAdapter.
  int64_t virtual_tokens() const override;
  at::Tensor soft_prompt() const override { return soft_prompt_; }
  int64_t SeedCache(core::KvCache& cache) const override;
  bool Adapts(int64_t layer, core::Projection p) const override;
  at::Tensor Delta(int64_t layer, core::Projection p, const at::Tensor& x) const override;

 private:
  AdapterReport report_;
  std::map<std::pair<int64_t, core::Projection>, LoraModule> lora_;
  // Dense lookup for the hot path: index layer * kProjections + projection, -1 when absent.
  std::vector<const LoraModule*> lookup_;
  std::vector<std::pair<at::Tensor, at::Tensor>> prefix_;
  at::Tensor soft_prompt_;
};

}  // namespace adapterd::adapters
