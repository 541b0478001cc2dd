// GPT-2 forward, following transformers' modeling_gpt2: learned absolute positions, pre-norm
// LayerNorm, fused c_attn (q|k|v), Conv1D projections whose weights are [in, out]
// (y = x·W + b, no transpose), gelu_new MLP, output tied to wte by default.
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/causal_lm.h"

namespace adapterd::core {
namespace {

struct Gpt2Layer {
  at::Tensor ln1_w, ln1_b, ln2_w, ln2_b;
  at::Tensor attn_w, attn_b, attn_proj_w, attn_proj_b;
  at::Tensor fc_w, fc_b, mlp_proj_w, mlp_proj_b;
};

class Gpt2 final : public CausalLm {
 public:
  Gpt2(const ModelConfig& config, const WeightMap& w, at::TensorOptions options)
      : CausalLm(config, w, options) {
    auto get = [&](const std::string& name) { return w.at(name); };
    wte_ = get("transformer.wte.weight");
    wpe_ = get("transformer.wpe.weight");
    lnf_w_ = get("transformer.ln_f.weight");
    lnf_b_ = get("transformer.ln_f.bias");
    lm_head_ = get(kOutputEmbeddingName);
    for (int64_t i = 0; i < config.num_layers; ++i) {
      const std::string pre = absl::StrCat("transformer.h.", i, ".");
      Gpt2Layer l;
      l.ln1_w = get(pre + "ln_1.weight");
      l.ln1_b = get(pre + "ln_1.bias");
      l.ln2_w = get(pre + "ln_2.weight");
      l.ln2_b = get(pre + "ln_2.bias");
      l.attn_w = get(pre + "attn.c_attn.weight");
      l.attn_b = get(pre + "attn.c_attn.bias");
      l.attn_proj_w = get(pre + "attn.c_proj.weight");
      l.attn_proj_b = get(pre + "attn.c_proj.bias");
      l.fc_w = get(pre + "mlp.c_fc.weight");
      l.fc_b = get(pre + "mlp.c_fc.bias");
      l.mlp_proj_w = get(pre + "mlp.c_proj.weight");
      l.mlp_proj_b = get(pre + "mlp.c_proj.bias");
      layers_.push_back(std::move(l));
    }
  }

  at::Tensor Forward(const at::Tensor& tokens, const std::vector<RowSpan>& rows,
                     bool all_positions, const AdapterBatch* adapters) const override {
    const ModelConfig& c = config_;
    at::Tensor positions = Positions(rows, tokens.size(0), tokens.device());
    const int64_t E = c.hidden_size;
    at::Tensor x = adapters != nullptr ? adapters->Embed(wte_, tokens, options_.dtype().toScalarType())
                                           : EmbeddingRows(wte_, tokens, options_.dtype().toScalarType());
    if (adapters != nullptr) adapters->WriteSoftPrompts(x);  // wpe is added to them too.
    x = x + at::embedding(wpe_, positions);
    for (int64_t li = 0; li < c.num_layers; ++li) {
      const Gpt2Layer& l = layers_[li];
      double scale = c.scale_attn_weights ? 1.0 / std::sqrt(static_cast<double>(c.head_dim)) : 1.0;
      if (c.scale_attn_by_inverse_layer_idx) scale /= static_cast<double>(li + 1);
      at::Tensor h = at::layer_norm(x, {E}, l.ln1_w, l.ln1_b, c.norm_eps);
      at::Tensor qkv = Project(li, Projection::kCAttn, h, l.attn_w, l.attn_b, adapters);
      at::Tensor q = qkv.narrow(1, 0, E), k = qkv.narrow(1, E, E), v = qkv.narrow(1, 2 * E, E);
      at::Tensor attn = at::empty({tokens.size(0), E}, x.options());
      Attend(li, q, k, v, rows, scale, /*window=*/0, attn);
      x = x + Project(li, Projection::kAttnOut, attn, l.attn_proj_w, l.attn_proj_b, adapters);
      h = at::layer_norm(x, {E}, l.ln2_w, l.ln2_b, c.norm_eps);
      at::Tensor fc = Activation(Project(li, Projection::kFc, h, l.fc_w, l.fc_b, adapters));
      x = x + Project(li, Projection::kMlpOut, fc, l.mlp_proj_w, l.mlp_proj_b, adapters);
    }
    x = FinishRows(x, rows, all_positions);
    x = at::layer_norm(x, {E}, lnf_w_, lnf_b_, c.norm_eps);
    if (adapters != nullptr) return adapters->OutputLogits(x, lm_head_, OutputLayer(config_), rows, all_positions);
    return LinearForward(x, lm_head_, at::Tensor()).to(at::kFloat);
  }

 private:
  at::Tensor Activation(const at::Tensor& x) const {
    const std::string& a = config_.activation;
    if (a == "gelu") return at::gelu(x);
    if (a == "relu") return at::relu(x);
    // gelu_new / gelu_pytorch_tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    const double k = std::sqrt(2.0 / M_PI);
    return 0.5 * x * (1.0 + at::tanh(k * (x + 0.044715 * at::pow(x, 3.0))));
  }

  // Conv1D: y = b + x·W with W [in, out].
  static at::Tensor Project(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w,
                            const at::Tensor& b, const AdapterBatch* adapters) {
    if (adapters == nullptr) return Conv1dForward(x, w, b);
    at::Tensor y = Conv1dForward(adapters->ScaleInputs(layer, p, x), w, b);
    adapters->AddDelta(layer, p, x, y);
    return y;
  }

  at::Tensor wte_, wpe_, lnf_w_, lnf_b_, lm_head_;
  std::vector<Gpt2Layer> layers_;
};

}  // namespace

std::unique_ptr<CausalLm> BuildGpt2(const ModelConfig& config, const WeightMap& weights,
                                    at::TensorOptions options) {
  return std::make_unique<Gpt2>(config, weights, options);
}

}  // namespace adapterd::core
