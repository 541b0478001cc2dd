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
#include "adapters/adapter_ref.h"
#include "adapters/adapter_report.h"
#include "core/causal_lm.h"

namespace adapterd::adapters {

// One adapted projection: y += scale · (x · Aᵀ) · Bᵀ. A keeps PEFT's layout; B is held
// transposed, Bᵀ [r, out], so that the expand is one contiguous axpy per rank (see
// cpu::LoraSegments); the memory held is the tensors' own. Factors in the compute dtype have
// the scaling folded into Bᵀ (scale 1); bfloat16 factors of a float32 model stay as the file
// holds them (the CPU kernels widen them exactly) and carry their scaling apart.
struct LoraModule {
  at::Tensor a;   // [r, in]
  at::Tensor bt;  // [r, out], contiguous.
  float scale = 1.0f;
  // DoRA (PEFT's DoraLinearLayer at inference): with g = magnitude / ‖W + scaling·B·A‖ per
  // output row, y = g·(x·Wᵀ + scaling·x·Aᵀ·Bᵀ) + b, i.e. after the LoRA delta the rows become
  // y·dora_scale + dora_shift, dora_shift = (1 - g)·b (undefined without a bias). Both [out],
  // float32 or the compute dtype, computed once at load.
  at::Tensor dora_scale{};
  at::Tensor dora_shift{};
};

// One IA3-scaled projection: its output (or, for feed-forward modules, its input) times `l`.
struct Ia3Module {
  at::Tensor l;  // [out] or, with `input`, [in]; compute dtype.
  bool input = false;
};

// The tensors of one adapter; exactly one part is set.
struct AdapterWeights {
  // LoRA: modules keyed by (layer, projection).
  std::map<std::pair<int64_t, core::Projection>, LoraModule> lora;
  // IA3: modules keyed by (layer, projection).
  std::map<std::pair<int64_t, core::Projection>, Ia3Module> ia3;
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
  // LoRA modules by (layer, projection); empty for other kinds.
  const std::map<std::pair<int64_t, core::Projection>, LoraModule>& lora() const { return lora_; }

  // core::SequenceAdapter.
  int64_t virtual_tokens() const override;
  at::Tensor soft_prompt() const override { return soft_prompt_; }
  int64_t SeedCache(core::KvCache& cache) const override;
  bool Adapts(int64_t layer, core::Projection p) const override;
  at::Tensor Delta(int64_t layer, core::Projection p, const at::Tensor& x) const override;
  bool LoraFactors(int64_t layer, core::Projection p, const at::Tensor** a, const at::Tensor** bt,
                   float* scale) const override;
  const at::Tensor* Ia3Scale(int64_t layer, core::Projection p, bool* input) const override;
  bool OutputAffine(int64_t layer, core::Projection p, const at::Tensor** scale,
                    const at::Tensor** shift) const override;

 private:
  AdapterReport report_;
  std::map<std::pair<int64_t, core::Projection>, LoraModule> lora_;
  // Dense lookup for the hot path: index layer * kProjections + projection, -1 when absent.
  std::vector<const LoraModule*> lookup_;
  std::map<std::pair<int64_t, core::Projection>, Ia3Module> ia3_;
  std::vector<const Ia3Module*> ia3_lookup_;  // As lookup_.
  std::vector<std::pair<at::Tensor, at::Tensor>> prefix_;
  at::Tensor soft_prompt_;
};

}  // namespace adapterd::adapters
