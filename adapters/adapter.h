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
#include "core/tokenizer.h"

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

// The tensors of one adapter: one of lora, ia3, prefix and soft_prompt, plus, for LoRA and
// IA3, the embedding parts.
struct AdapterWeights {
  // LoRA: modules keyed by (layer, projection).
  std::map<std::pair<int64_t, core::Projection>, LoraModule> lora;
  // IA3: modules keyed by (layer, projection).
  std::map<std::pair<int64_t, core::Projection>, Ia3Module> ia3;
  // Prefix tuning: per-layer keys and values [kv_heads, virtual_tokens, head_dim].
  std::vector<std::pair<at::Tensor, at::Tensor>> prefix;
  // Prompt tuning / P-tuning: soft prompt [virtual_tokens, hidden].
  at::Tensor soft_prompt;
  // Saved copies (modules_to_save, or the embeddings PEFT saves with a resized vocabulary)
  // that replace the base's input embedding / lm_head for this adapter's rows: [vocab, hidden]
  // in the compute dtype; undefined when the adapter keeps the base's (also when the saved
  // copy equals it).
  at::Tensor input_embedding;
  at::Tensor output_embedding;
  int64_t vocab_size = 0;  // Rows of the saved embeddings when they resize the vocabulary; 0 otherwise.
  // LoRA on the input embedding: lora_embedding_Aᵀ [vocab, r] and scaling·lora_embedding_Bᵀ
  // [r, hidden], compute dtype.
  at::Tensor embedding_a_t;
  at::Tensor embedding_bt;
  // The tokenizer of an adapter that adds tokens (its own tokenizer.json, or the base's with
  // its added_tokens.json); null: the base's.
  std::shared_ptr<const core::Tokenizer> tokenizer;
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
  int64_t vocab_size() const override { return vocab_size_; }
  const at::Tensor* InputEmbedding() const override {
    return input_embedding_.defined() ? &input_embedding_ : nullptr;
  }
  bool EmbeddingLora(const at::Tensor** at, const at::Tensor** bt, float* scale) const override;
  const at::Tensor* OutputEmbedding() const override {
    return output_embedding_.defined() ? &output_embedding_ : nullptr;
  }
  // True when the adapter replaces or adapts an embedding or resizes the vocabulary.
  bool ChangesEmbeddings() const {
    return input_embedding_.defined() || output_embedding_.defined() || embedding_a_t_.defined() ||
           vocab_size_ > 0;
  }
  // The adapter's own tokenizer (null: the base model's).
  const core::Tokenizer* tokenizer() const { return tokenizer_.get(); }
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
  at::Tensor input_embedding_, output_embedding_, embedding_a_t_, embedding_bt_;
  int64_t vocab_size_ = 0;
  std::shared_ptr<const core::Tokenizer> tokenizer_;
};

}  // namespace adapterd::adapters
