#include "adapters/adapter.h"

#include "core/cpu_kernels.h"


namespace adapterd::adapters {
namespace {

constexpr int64_t kProjections = static_cast<int64_t>(core::Projection::kLmHead) + 1;

// The dense lookups' index of (layer, p); -1 for a negative layer (no module lives there).
int64_t Index(int64_t layer, core::Projection p) {
  return layer < 0 ? -1 : layer * kProjections + static_cast<int64_t>(p);
}

}  // namespace

Adapter::Adapter(AdapterReport report, AdapterWeights weights)
    : report_(std::move(report)),
      lora_(std::move(weights.lora)),
      ia3_(std::move(weights.ia3)),
      prefix_(std::move(weights.prefix)),
      soft_prompt_(std::move(weights.soft_prompt)),
      input_embedding_(std::move(weights.input_embedding)),
      output_embedding_(std::move(weights.output_embedding)),
      embedding_a_t_(std::move(weights.embedding_a_t)),
      embedding_bt_(std::move(weights.embedding_bt)),
      vocab_size_(weights.vocab_size),
      tokenizer_(std::move(weights.tokenizer)) {
  int64_t layers = 0;
  for (const auto& [key, m] : lora_) layers = std::max(layers, key.first + 1);
  lookup_.assign(layers * kProjections, nullptr);
  for (const auto& [key, m] : lora_) {
    lookup_[key.first * kProjections + static_cast<int64_t>(key.second)] = &m;
  }
  int64_t ia3_layers = 0;
  for (const auto& [key, m] : ia3_) ia3_layers = std::max(ia3_layers, key.first + 1);
  ia3_lookup_.assign(ia3_layers * kProjections, nullptr);
  for (const auto& [key, m] : ia3_) {
    ia3_lookup_[key.first * kProjections + static_cast<int64_t>(key.second)] = &m;
  }
}

bool Adapter::OutputAffine(int64_t layer, core::Projection p, const at::Tensor** scale,
                           const at::Tensor** shift) const {
  const int64_t i = Index(layer, p);
  const LoraModule* m = i >= 0 && i < static_cast<int64_t>(lookup_.size()) ? lookup_[i] : nullptr;
  if (m == nullptr || !m->dora_scale.defined()) return false;
  *scale = &m->dora_scale;
  *shift = m->dora_shift.defined() ? &m->dora_shift : nullptr;
  return true;
}

const at::Tensor* Adapter::Ia3Scale(int64_t layer, core::Projection p, bool* input) const {
  const int64_t i = Index(layer, p);
  if (i < 0 || i >= static_cast<int64_t>(ia3_lookup_.size()) || ia3_lookup_[i] == nullptr) return nullptr;
  *input = ia3_lookup_[i]->input;
  return &ia3_lookup_[i]->l;
}

bool Adapter::EmbeddingLora(const at::Tensor** at, const at::Tensor** bt, float* scale) const {
  if (!embedding_a_t_.defined()) return false;
  *at = &embedding_a_t_;
  *bt = &embedding_bt_;
  *scale = 1.0f;  // Folded into embedding_bt_ at load.
  return true;
}

int64_t Adapter::virtual_tokens() const {
  return soft_prompt_.defined() ? soft_prompt_.size(0) : 0;
}

int64_t Adapter::SeedCache(core::KvCache& cache) const {
  if (prefix_.empty()) return 0;
  // Every request of the adapter reads the same tensors in place (they are loaded in the KV
  // cache's dtype); nothing is copied per request.
  std::vector<at::Tensor> keys, values;
  for (const auto& [k, v] : prefix_) {
    keys.push_back(k);
    values.push_back(v);
  }
  cache.Share(keys, values);
  return prefix_[0].first.size(1);
}

bool Adapter::Adapts(int64_t layer, core::Projection p) const {
  const int64_t i = Index(layer, p);
  return i >= 0 && i < static_cast<int64_t>(lookup_.size()) && lookup_[i] != nullptr;
}

at::Tensor Adapter::Delta(int64_t layer, core::Projection p, const at::Tensor& x) const {
  const LoraModule& m = *lookup_[layer * kProjections + static_cast<int64_t>(p)];
  // scale·(x·Aᵀ)·Bᵀ. The CPU kernels read bfloat16 factors as they are and sum the expand as
  // the segmented kernel does; ATen gets the factors widened.
  auto widened = [&x](const at::Tensor& w) { return w.scalar_type() == x.scalar_type() ? w : w.to(x.scalar_type()); };
  at::Tensor t = core::cpu::Linear(x, m.a, at::Tensor());
  if (!t.defined()) t = core::LinearForward(x, widened(m.a), at::Tensor());
  at::Tensor delta = core::cpu::LoraExpand(t, m.bt, m.scale);
  if (delta.defined()) return delta;
  delta = at::matmul(t, widened(m.bt));
  if (m.scale != 1.0f) delta.mul_(m.scale);
  return delta;
}

bool Adapter::LoraFactors(int64_t layer, core::Projection p, const at::Tensor** a, const at::Tensor** bt,
                          float* scale) const {
  const int64_t i = Index(layer, p);
  const LoraModule* m = i >= 0 && i < static_cast<int64_t>(lookup_.size()) ? lookup_[i] : nullptr;
  if (m == nullptr) return false;
  *a = &m->a;
  *bt = &m->bt;
  *scale = m->scale;
  return true;
}

}  // namespace adapterd::adapters
