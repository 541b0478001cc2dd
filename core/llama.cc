// Llama-family forward (Llama, Mistral, Qwen2, Qwen3), following transformers' modeling_llama:
// pre-norm RMSNorm, rotary embeddings (rotate_half layout) with default, linear or llama3
// frequency scaling, grouped-query attention, SiLU-gated MLP, optional biases, and Qwen3's
// per-head RMSNorm of q and k before the rotation (modeling_qwen3).
#include <cmath>

#include "absl/strings/str_cat.h"
#include "core/causal_lm.h"
#include "core/cpu_kernels.h"

namespace adapterd::core {
namespace {

struct LlamaLayer {
  at::Tensor input_norm, post_norm;
  at::Tensor q_norm, k_norm;  // Qwen3 only: [head_dim].
  at::Tensor q_w, q_b, k_w, k_b, v_w, v_b, o_w, o_b;
  at::Tensor gate_w, gate_b, up_w, up_b, down_w, down_b;
  // --quantize: the matrices above as the forward pass reads them instead.
  CompactMatrix q_c, k_c, v_c, o_c, gate_c, up_c, down_c;
  int64_t window = 0;
};

at::Tensor Get(const WeightMap& w, const std::string& name) {
  auto it = w.find(name);
  return it == w.end() ? at::Tensor() : it->second;
}

class Llama final : public CausalLm {
 public:
  Llama(const ModelConfig& config, const WeightMap& w, at::TensorOptions options)
      : CausalLm(config, w, options) {
    embed_ = Get(w, "model.embed_tokens.weight");
    final_norm_ = Get(w, "model.norm.weight");
    lm_head_ = Get(w, kOutputEmbeddingName);
    for (int64_t i = 0; i < config.num_layers; ++i) {
      const std::string pre = absl::StrCat("model.layers.", i, ".");
      LlamaLayer l;
      l.input_norm = Get(w, pre + "input_layernorm.weight");
      l.post_norm = Get(w, pre + "post_attention_layernorm.weight");
      l.q_w = Get(w, pre + "self_attn.q_proj.weight");
      l.q_b = Get(w, pre + "self_attn.q_proj.bias");
      l.k_w = Get(w, pre + "self_attn.k_proj.weight");
      l.k_b = Get(w, pre + "self_attn.k_proj.bias");
      l.v_w = Get(w, pre + "self_attn.v_proj.weight");
      l.v_b = Get(w, pre + "self_attn.v_proj.bias");
      l.q_norm = Get(w, pre + "self_attn.q_norm.weight");
      l.k_norm = Get(w, pre + "self_attn.k_norm.weight");
      l.o_w = Get(w, pre + "self_attn.o_proj.weight");
      l.o_b = Get(w, pre + "self_attn.o_proj.bias");
      l.gate_w = Get(w, pre + "mlp.gate_proj.weight");
      l.gate_b = Get(w, pre + "mlp.gate_proj.bias");
      l.up_w = Get(w, pre + "mlp.up_proj.weight");
      l.up_b = Get(w, pre + "mlp.up_proj.bias");
      l.down_w = Get(w, pre + "mlp.down_proj.weight");
      l.down_b = Get(w, pre + "mlp.down_proj.bias");
      l.window = (config.sliding_window > 0 && i >= config.first_sliding_layer)
                     ? config.sliding_window
                     : 0;
      layers_.push_back(std::move(l));
    }
    inv_freq_ = InverseFrequencies(config).to(options.device());
  }

  bool Compact(Compaction how, CompactSummary* summary,
               const std::function<void(const at::Tensor&)>& done) override {
    std::vector<std::pair<const at::Tensor*, CompactMatrix*>> targets;
    for (LlamaLayer& l : layers_) {
      targets.insert(targets.end(), {{&l.q_w, &l.q_c},
                                     {&l.k_w, &l.k_c},
                                     {&l.v_w, &l.v_c},
                                     {&l.o_w, &l.o_c},
                                     {&l.gate_w, &l.gate_c},
                                     {&l.up_w, &l.up_c},
                                     {&l.down_w, &l.down_c}});
    }
    targets.emplace_back(&lm_head_, &lm_head_c_);
    for (const auto& [w, q] : targets) {
      if (how == Compaction::kBf16Packed ? !cpu::PackBf16Takes(*w) : !Int8Quantizable(*w))
        return false;
    }
    *summary = CompactSummary();
    for (const auto& [w, q] : targets) {
      switch (how) {
        case Compaction::kBf16Packed:
          q->packed = cpu::PackBf16(*w);
          break;
        case Compaction::kW8A8:
          *q = core::QuantizeW8A8(*w);
          break;
        case Compaction::kInt8WeightOnly:
          *q = core::QuantizeInt8(*w);
          break;
      }
      ++summary->matrices;
      summary->source_bytes += static_cast<int64_t>(w->nbytes());
      summary->bytes += q->bytes();
      if (done) done(*w);
    }
    return true;
  }

  at::Tensor Forward(const at::Tensor& tokens, const std::vector<RowSpan>& rows,
                     bool all_positions, const AdapterBatch* adapters) const override {
    const ModelConfig& c = config_;
    at::Tensor positions = Positions(rows, tokens.size(0), tokens.device());
    // RoPE tables in float32: freqs = pos ⊗ inv_freq, emb = cat(freqs, freqs).
    at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq_.unsqueeze(0);
    at::Tensor emb = at::cat({freqs, freqs}, -1);
    const at::Tensor cos = emb.cos().to(options_.dtype());  // [N, d]
    const at::Tensor sin = emb.sin().to(options_.dtype());

    const int64_t n = tokens.size(0);
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    at::Tensor x = adapters != nullptr ? adapters->Embed(embed_, tokens, options_.dtype().toScalarType())
                                           : EmbeddingRows(embed_, tokens, options_.dtype().toScalarType());
    if (adapters != nullptr) adapters->WriteSoftPrompts(x);
    for (int64_t li = 0; li < c.num_layers; ++li) {
      const LlamaLayer& l = layers_[li];
      at::Tensor h = RmsNorm(x, l.input_norm);
      std::vector<at::Tensor> qkv = ProjectShared(li, h,
                                                  {{Projection::kQ, &l.q_w, &l.q_c, &l.q_b},
                                                   {Projection::kK, &l.k_w, &l.k_c, &l.k_b},
                                                   {Projection::kV, &l.v_w, &l.v_c, &l.v_b}},
                                                  adapters);
      at::Tensor q = std::move(qkv[0]), k = std::move(qkv[1]), v = std::move(qkv[2]);
      if (c.qk_norm) {
        q = RmsNorm(q.reshape({n * c.num_heads, c.head_dim}), l.q_norm).view({n, -1});
        k = RmsNorm(k.reshape({n * c.num_kv_heads, c.head_dim}), l.k_norm).view({n, -1});
      }
      q = Rotate(q, c.num_heads, cos, sin);
      k = Rotate(k, c.num_kv_heads, cos, sin);
      at::Tensor attn = at::empty({n, c.num_heads * c.head_dim}, x.options());
      Attend(li, q, k, v, rows, scale, l.window, attn);
      x = x + Project(li, Projection::kO, attn, l.o_w, l.o_c, l.o_b, adapters);
      h = RmsNorm(x, l.post_norm);
      std::vector<at::Tensor> gate_up =
          ProjectShared(li, h,
                        {{Projection::kGate, &l.gate_w, &l.gate_c, &l.gate_b},
                         {Projection::kUp, &l.up_w, &l.up_c, &l.up_b}},
                        adapters);
      at::Tensor gate = std::move(gate_up[0]), up = std::move(gate_up[1]);
      x = x + Project(li, Projection::kDown, at::silu(gate).mul_(up), l.down_w, l.down_c, l.down_b,
                      adapters);
    }
    x = FinishRows(x, rows, all_positions);
    x = RmsNorm(x, final_norm_);
    if (adapters != nullptr) {
      return adapters->OutputLogits(x, lm_head_, OutputLayer(config_), rows, all_positions,
                                    lm_head_c_, matmul_precision());
    }
    return Linear(x, lm_head_, lm_head_c_, at::Tensor()).to(at::kFloat);
  }

 private:
  static at::Tensor InverseFrequencies(const ModelConfig& c) {
    const int64_t dim = c.head_dim;
    at::Tensor inv = 1.0 / at::pow(c.rope_theta, at::arange(0, dim, 2, at::kLong).to(at::kFloat) /
                                                     static_cast<double>(dim));
    const RopeScaling& s = c.rope_scaling;
    if (s.type == "linear") return inv / s.factor;
    if (s.type == "llama3") {
      const double low_wavelen = s.original_max_position_embeddings / s.low_freq_factor;
      const double high_wavelen = s.original_max_position_embeddings / s.high_freq_factor;
      at::Tensor wavelen = 2 * M_PI / inv;
      at::Tensor scaled = at::where(wavelen > low_wavelen, inv / s.factor, inv);
      at::Tensor smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) /
                          (s.high_freq_factor - s.low_freq_factor);
      at::Tensor smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled;
      at::Tensor medium = (wavelen >= high_wavelen).logical_and(wavelen <= low_wavelen);
      return at::where(medium, smoothed, scaled);
    }
    return inv;
  }

  // On the CPU kernels one fused pass per row (cpu::RmsNorm); otherwise the formula in ATen.
  at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w) const {
    if (at::Tensor y = cpu::RmsNorm(x, w, config_.norm_eps); y.defined()) return y;
    at::Tensor xf = x.to(at::kFloat);
    at::Tensor var = xf.pow(2).mean(-1, /*keepdim=*/true);
    return w * (xf * at::rsqrt(var + config_.norm_eps)).to(x.scalar_type());
  }

  // Rotary embedding of x [N, heads·d] (a projection's fresh output) by cos/sin [N, d]: in place
  // on the CPU kernels, the same bits as the formula, which runs in ATen otherwise.
  at::Tensor Rotate(at::Tensor x, int64_t heads, const at::Tensor& cos, const at::Tensor& sin) const {
    const int64_t d = config_.head_dim, half = d / 2;
    if (cpu::RotateInPlace(x, cos, sin, d)) return x;
    const int64_t n = x.size(0);
    at::Tensor h = x.view({n, heads, d});
    at::Tensor rotated = at::cat({-h.narrow(-1, half, half), h.narrow(-1, 0, half)}, -1);
    return (h * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).view({n, -1});
  }

  at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const CompactMatrix& w8,
                    const at::Tensor& b) const {
    return w8.defined() ? LinearForward(x, w8, b, matmul_precision())
                        : LinearForward(x, w, b, matmul_precision());
  }

  at::Tensor Project(int64_t layer, Projection p, const at::Tensor& x, const at::Tensor& w,
                     const CompactMatrix& w8, const at::Tensor& b,
                     const AdapterBatch* adapters) const {
    if (adapters == nullptr) return Linear(x, w, w8, b);
    at::Tensor y = Linear(adapters->ScaleInputs(layer, p, x), w, w8, b);
    adapters->AddDelta(layer, p, x, y);
    return y;
  }

  struct SharedProjection {
    Projection p;
    const at::Tensor* w;
    const CompactMatrix* w8;
    const at::Tensor* b;
  };
  // Project() for projections of the same x. When no adapter of the batch scales that input
  // (IA3 on inputs) and the matrices are all compact or all not, the group goes through
  // LinearForwardShared (one parallel pass; int8: x quantized once); otherwise each takes its
  // own (scaled) input. The adapters' deltas are added after, as Project() does.
  std::vector<at::Tensor> ProjectShared(int64_t layer, const at::Tensor& x,
                                        const std::vector<SharedProjection>& group,
                                        const AdapterBatch* adapters) const {
    std::vector<at::Tensor> inputs;
    bool same_input = true, all_compact = true, no_compact = true;
    for (const SharedProjection& g : group) {
      inputs.push_back(adapters != nullptr ? adapters->ScaleInputs(layer, g.p, x) : x);
      same_input = same_input && inputs.back().is_same(x);
      all_compact = all_compact && g.w8->defined();
      no_compact = no_compact && !g.w8->defined();
    }
    std::vector<at::Tensor> y;
    std::vector<const at::Tensor*> b;
    for (const SharedProjection& g : group) b.push_back(g.b);
    if (same_input && all_compact) {
      std::vector<const CompactMatrix*> w8;
      for (const SharedProjection& g : group) w8.push_back(g.w8);
      y = LinearForwardShared(x, w8, b, matmul_precision());
    } else if (same_input && no_compact) {
      std::vector<const at::Tensor*> w;
      for (const SharedProjection& g : group) w.push_back(g.w);
      y = LinearForwardShared(x, w, b, matmul_precision());
    } else {
      for (size_t i = 0; i < group.size(); ++i) y.push_back(Linear(inputs[i], *group[i].w, *group[i].w8, *group[i].b));
    }
    if (adapters != nullptr) {
      for (size_t i = 0; i < group.size(); ++i) adapters->AddDelta(layer, group[i].p, x, y[i]);
    }
    return y;
  }

  at::Tensor embed_, final_norm_, lm_head_, inv_freq_;
  CompactMatrix lm_head_c_;
  std::vector<LlamaLayer> layers_;
};

}  // namespace

std::unique_ptr<CausalLm> BuildLlama(const ModelConfig& config, const WeightMap& weights,
                                     at::TensorOptions options) {
  return std::make_unique<Llama>(config, weights, options);
}

}  // namespace adapterd::core
