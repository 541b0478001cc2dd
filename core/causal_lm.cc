#include "core/causal_lm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/cpu_kernels.h"
#include "core/cpu_kernels_isa.h"

namespace adapterd::core {

const char* ProjectionName(Projection p) {
  switch (p) {
    case Projection::kQ: return "q_proj";
    case Projection::kK: return "k_proj";
    case Projection::kV: return "v_proj";
    case Projection::kO: return "o_proj";
    case Projection::kGate: return "gate_proj";
    case Projection::kUp: return "up_proj";
    case Projection::kDown: return "down_proj";
    case Projection::kCAttn: return "c_attn";
    case Projection::kAttnOut: return "c_proj";
    case Projection::kFc: return "c_fc";
    case Projection::kMlpOut: return "c_proj";
    case Projection::kLmHead: return "lm_head";
  }
  return "?";
}

namespace {

// Output rows of W widened per GEMM in LinearForward's mixed-dtype path: ~4 MiB of float32,
// so the widened block is still in cache when the GEMM packs it.
constexpr int64_t kWidenBytes = int64_t{4} << 20;

// y = x·Wᵀ + b for W [n, k] given a block of output rows at a time by widen(n0, rows), each
// block one GEMM in x's dtype: no widened copy of W is held whole.
template <class Widen>
at::Tensor BlockedLinear(const at::Tensor& x, int64_t n, int64_t k, const at::Tensor& b, const Widen& widen) {
  at::Tensor y = at::empty({x.size(0), n}, x.options());
  const int64_t element = static_cast<int64_t>(x.element_size());
  const int64_t block = std::max<int64_t>(64, kWidenBytes / std::max<int64_t>(1, k * element));
  for (int64_t n0 = 0; n0 < n; n0 += block) {
    const int64_t nb = std::min(block, n - n0);
    const at::Tensor wb = widen(n0, nb).to(x.scalar_type());
    at::Tensor yb = y.narrow(1, n0, nb);
    if (b.defined()) {
      at::addmm_out(yb, b.narrow(0, n0, nb).to(x.scalar_type()), x, wb.t());
    } else {
      at::mm_out(yb, x, wb.t());
    }
  }
  return y;
}

at::Tensor WidenedLinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return BlockedLinear(x, w.size(0), w.size(1), b, [&](int64_t n0, int64_t nb) { return w.narrow(0, n0, nb); });
}

}  // namespace

at::Tensor LinearForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                         cpu::MatmulPrecision precision) {
  at::Tensor y = cpu::Linear(x, w, b, precision);
  if (y.defined()) return y;
  if (w.scalar_type() != x.scalar_type()) return WidenedLinear(x, w, b);
  if (x.size(0) != 1) return at::linear(x, w, b);
  y = at::mv(w, x[0]);
  if (b.defined()) y.add_(b);
  return y.unsqueeze(0);
}

std::vector<at::Tensor> LinearForwardShared(const at::Tensor& x,
                                            const std::vector<const at::Tensor*>& w,
                                            const std::vector<const at::Tensor*>& b,
                                            cpu::MatmulPrecision precision) {
  std::vector<cpu::LinearMatrix> matrices;
  for (size_t i = 0; i < w.size(); ++i) matrices.push_back({w[i], b[i]});
  std::vector<at::Tensor> y = cpu::LinearShared(x, matrices, precision);
  if (!y.empty()) return y;
  for (size_t i = 0; i < w.size(); ++i) y.push_back(LinearForward(x, *w[i], *b[i], precision));
  return y;
}

bool Int8Quantizable(const at::Tensor& w) {
  return w.defined() && w.dim() == 2 && w.size(1) % cpu::kInt8Block == 0;
}

namespace {

// Rows [r, k] (any floating dtype, k a multiple of 32) quantized per block of 32: scale =
// max|x| / 127 ([r, k / 32] float32) and the values round-half-even(x · (1 / scale)), clamped
// to ±127 ([r, k / 32, 32], integer-valued float32); 0 where a block is all zeros. The weights
// at load and, under w8a8 without the CPU kernel, the activations at run time.
std::pair<at::Tensor, at::Tensor> QuantizeBlocks(const at::Tensor& rows) {
  const at::Tensor x = rows.to(at::kFloat).reshape({rows.size(0), rows.size(1) / cpu::kInt8Block, cpu::kInt8Block});
  at::Tensor scale = x.abs().amax(-1).div_(127.0f);
  const at::Tensor inverse = at::where(scale > 0, scale.reciprocal(), at::zeros_like(scale));
  return {x.mul(inverse.unsqueeze(-1)).round_().clamp_(-127, 127), scale};
}

}  // namespace

CompactMatrix QuantizeInt8(const at::Tensor& w) {
  const int64_t n = w.size(0), k = w.size(1), blocks = k / cpu::kInt8Block;
  CompactMatrix m;
  m.q = at::empty({n, k}, w.options().dtype(at::kChar));
  m.scales = at::empty({n, blocks}, w.options().dtype(at::kFloat));
  const int64_t rows = std::max<int64_t>(1, kWidenBytes / std::max<int64_t>(1, k * 4));
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t nr = std::min(rows, n - r0);
    const auto [q, scale] = QuantizeBlocks(w.narrow(0, r0, nr));
    m.q.narrow(0, r0, nr).copy_(q.view({nr, k}));
    m.scales.narrow(0, r0, nr).copy_(scale);
  }
  return m;
}

at::Tensor DequantizeInt8(const CompactMatrix& m, int64_t row0, int64_t rows) {
  const int64_t k = m.q.size(1);
  return m.q.narrow(0, row0, rows)
      .to(at::kFloat)
      .view({rows, k / cpu::kInt8Block, cpu::kInt8Block})
      .mul_(m.scales.narrow(0, row0, rows).unsqueeze(-1))
      .view({rows, k});
}

CompactMatrix QuantizeW8A8(const at::Tensor& w) {
  constexpr int64_t kPanel = cpu::kW8A8Panel;
  const int64_t n = w.size(0), k = w.size(1), blocks = k / cpu::kInt8Block;
  const int64_t count = (n + kPanel - 1) / kPanel;
  CompactMatrix m;
  m.out = n;
  m.panels = at::zeros({count, k / 4, kPanel, 4}, w.options().dtype(at::kChar));
  m.panel_scales = at::zeros({count, blocks, kPanel}, w.options().dtype(at::kFloat));
  // Whole panels at a time, a few MiB of rows each; a short last panel is padded with zeros.
  const int64_t rows = std::max<int64_t>(1, kWidenBytes / std::max<int64_t>(1, k * 4 * kPanel)) * kPanel;
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t nr = std::min(rows, n - r0), pc = (nr + kPanel - 1) / kPanel;
    CompactMatrix part = QuantizeInt8(w.narrow(0, r0, nr));
    if (nr % kPanel != 0) {
      part.q = at::cat({part.q, at::zeros({pc * kPanel - nr, k}, part.q.options())});
      part.scales = at::cat({part.scales, at::zeros({pc * kPanel - nr, blocks}, part.scales.options())});
    }
    m.panels.narrow(0, r0 / kPanel, pc).copy_(part.q.view({pc, kPanel, k / 4, 4}).permute({0, 2, 1, 3}));
    m.panel_scales.narrow(0, r0 / kPanel, pc).copy_(part.scales.view({pc, kPanel, blocks}).permute({0, 2, 1}));
  }
  return m;
}

CompactMatrix UnpackPanels(const CompactMatrix& m, int64_t row0, int64_t rows) {
  constexpr int64_t kPanel = cpu::kW8A8Panel;
  const int64_t k = m.panels.size(1) * 4, blocks = m.panel_scales.size(1);
  const int64_t p0 = row0 / kPanel, pc = (rows + kPanel - 1) / kPanel;
  CompactMatrix out;
  out.q = m.panels.narrow(0, p0, pc).permute({0, 2, 1, 3}).reshape({pc * kPanel, k}).narrow(0, 0, rows);
  out.scales = m.panel_scales.narrow(0, p0, pc).permute({0, 2, 1}).reshape({pc * kPanel, blocks}).narrow(0, 0, rows);
  return out;
}

namespace {

// The w8a8 product in ATen (CUDA, or no CPU kernel): per block, integer-valued float32
// products whose sums stay exact (|sum| <= 32·127·127 < 2^24), scaled by both scales.
at::Tensor W8A8Linear(const at::Tensor& x, const CompactMatrix& w, const at::Tensor& b) {
  constexpr int64_t kPanel = cpu::kW8A8Panel;
  const int64_t m = x.size(0), blocks = x.size(1) / cpu::kInt8Block, n = w.out;
  const auto [values, xs] = QuantizeBlocks(x);      // [m, blocks, 32], [m, blocks]
  const at::Tensor xq = values.permute({1, 0, 2});  // [blocks, m, 32]
  at::Tensor y = at::empty({m, n}, x.options().dtype(at::kFloat));
  // Output rows per pass: the [blocks, m, rows] products within ~64 MiB.
  const int64_t per = std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, blocks * m * 4 * kPanel));
  const int64_t rows = per * kPanel;
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t nb = std::min(rows, n - n0);
    const CompactMatrix part = UnpackPanels(w, n0, nb);
    const at::Tensor wq = part.q.to(at::kFloat).view({nb, blocks, cpu::kInt8Block}).permute({1, 2, 0});  // [blocks, 32, nb]
    at::Tensor sums = at::bmm(xq, wq);                                   // [blocks, m, nb]
    sums.mul_(xs.t().unsqueeze(2) * part.scales.t().unsqueeze(1));       // × xs[i, b]·ws[n, b]
    y.narrow(1, n0, nb).copy_(sums.sum(0));
  }
  if (b.defined()) y.add_(b.to(at::kFloat));
  return y.to(x.scalar_type());
}

}  // namespace

at::Tensor LinearForward(const at::Tensor& x, const CompactMatrix& w, const at::Tensor& b,
                         cpu::MatmulPrecision precision) {
  if (w.packed.defined()) {
    std::vector<at::Tensor> y = cpu::LinearPacked(x, {cpu::PackedMatrix{&w.packed, &b}}, precision);
    if (!y.empty()) return y[0];
    // Otherwise a block of output rows at a time unpacked (BlockedLinear's blocks) and multiplied
    // as LinearForward multiplies the unpacked matrix: each output is computed as it would be
    // unpacked (the CPU kernels' outputs do not depend on the rows beside them, and a block here
    // is the one GEMM BlockedLinear would run).
    const int64_t n = w.packed.rows(), k = w.packed.k;
    const int64_t block =
        std::max<int64_t>(64, kWidenBytes / std::max<int64_t>(1, k * x.element_size()));
    at::Tensor out = at::empty({x.size(0), n}, x.options());
    for (int64_t n0 = 0; n0 < n; n0 += block) {
      const int64_t nb = std::min(block, n - n0);
      out.narrow(1, n0, nb).copy_(LinearForward(x, cpu::UnpackBf16(w.packed, n0, nb),
                                                b.defined() ? b.narrow(0, n0, nb) : b, precision));
    }
    return out;
  }
  if (w.panels.defined()) {
    at::Tensor y = cpu::LinearW8A8(x, w.panels, w.panel_scales, w.out, b);
    return y.defined() ? y : W8A8Linear(x, w, b);
  }
  at::Tensor y = cpu::LinearInt8(x, w.q, w.scales, b);
  if (y.defined()) return y;
  return BlockedLinear(x, w.q.size(0), w.q.size(1), b,
                       [&](int64_t n0, int64_t nb) { return DequantizeInt8(w, n0, nb); });
}

std::vector<at::Tensor> LinearForwardShared(const at::Tensor& x,
                                            const std::vector<const CompactMatrix*>& w,
                                            const std::vector<const at::Tensor*>& b,
                                            cpu::MatmulPrecision precision) {
  std::vector<cpu::PackedMatrix> packed;
  for (size_t i = 0; i < w.size() && w[i]->packed.defined(); ++i)
    packed.push_back({&w[i]->packed, b[i]});
  if (!packed.empty() && packed.size() == w.size()) {
    std::vector<at::Tensor> y = cpu::LinearPacked(x, packed, precision);
    if (!y.empty()) return y;
  }
  std::vector<cpu::W8A8Matrix> matrices;
  for (size_t i = 0; i < w.size(); ++i) {
    if (!w[i]->panels.defined()) break;
    matrices.push_back({&w[i]->panels, &w[i]->panel_scales, w[i]->out, b[i]});
  }
  if (matrices.size() == w.size()) {
    std::vector<at::Tensor> y = cpu::LinearW8A8Shared(x, matrices);
    if (!y.empty()) return y;
  }
  std::vector<at::Tensor> y;
  for (size_t i = 0; i < w.size(); ++i) y.push_back(LinearForward(x, *w[i], *b[i], precision));
  return y;
}

at::Tensor EmbeddingRows(const at::Tensor& table, const at::Tensor& tokens, at::ScalarType dtype) {
  at::Tensor rows = at::embedding(table, tokens);
  return rows.scalar_type() == dtype ? rows : rows.to(dtype);
}

at::Tensor Conv1dForward(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  if (x.size(0) != 1) return at::addmm(b, x, w);
  return at::mv(w.t(), x[0]).add_(b).unsqueeze(0);
}

AdapterBatch::AdapterBatch(std::vector<Range> ranges) {
  for (const Range& r : ranges) {
    if (r.adapter == nullptr || r.length == 0) continue;
    if (!ranges_.empty() && ranges_.back().adapter == r.adapter && r.soft_prompt_rows == 0 &&
        ranges_.back().offset + ranges_.back().length == r.offset &&
        ranges_.back().soft_prompt_rows == 0) {
      ranges_.back().length += r.length;
      continue;
    }
    ranges_.push_back(r);
  }
}

void AdapterBatch::AddDelta(int64_t layer, Projection p, const at::Tensor& x,
                            at::Tensor& y) const {
  auto add_alone = [&](const Range& r) {
    if (r.offset == 0 && r.length == x.size(0)) {
      y.add_(r.adapter->Delta(layer, p, x));
    } else {
      y.narrow(0, r.offset, r.length).add_(r.adapter->Delta(layer, p, x.narrow(0, r.offset, r.length)));
    }
  };
  std::vector<cpu::LoraSegment> segments;
  std::vector<const Range*> segment_ranges;
  for (const Range& r : ranges_) {
    bool input = false;
    if (const at::Tensor* l = r.adapter->Ia3Scale(layer, p, &input)) {
      if (!input) y.narrow(0, r.offset, r.length).mul_(*l);
      continue;
    }
    if (!r.adapter->Adapts(layer, p)) continue;
    cpu::LoraSegment s{r.offset, r.length, nullptr, nullptr, 1.0f};
    if (r.length <= cpu::kLinearMaxRows && r.adapter->LoraFactors(layer, p, &s.a, &s.bt, &s.scale)) {
      segments.push_back(s);
      segment_ranges.push_back(&r);
      continue;
    }
    add_alone(r);
  }
  if (!segments.empty() && !cpu::LoraSegments(x, y, segments)) {
    for (const Range* r : segment_ranges) add_alone(*r);
  }
  for (const Range& r : ranges_) {
    const at::Tensor *scale = nullptr, *shift = nullptr;
    if (!r.adapter->OutputAffine(layer, p, &scale, &shift)) continue;
    at::Tensor rows = y.narrow(0, r.offset, r.length);
    rows.mul_(*scale);
    if (shift != nullptr) rows.add_(*shift);
  }
}

at::Tensor AdapterBatch::ScaleInputs(int64_t layer, Projection p, const at::Tensor& x) const {
  at::Tensor scaled;
  for (const Range& r : ranges_) {
    bool input = false;
    const at::Tensor* l = r.adapter->Ia3Scale(layer, p, &input);
    if (l == nullptr || !input) continue;
    if (!scaled.defined()) scaled = x.clone();
    scaled.narrow(0, r.offset, r.length).mul_(*l);
  }
  return scaled.defined() ? scaled : x;
}

void AdapterBatch::WriteSoftPrompts(at::Tensor& embeddings) const {
  for (const Range& r : ranges_) {
    if (r.soft_prompt_rows == 0) continue;
    embeddings.narrow(0, r.offset, r.soft_prompt_rows).copy_(r.adapter->soft_prompt());
  }
}

at::Tensor AdapterBatch::Embed(const at::Tensor& table, const at::Tensor& tokens, at::ScalarType dtype) const {
  bool changed = false;
  for (const Range& r : ranges_) {
    const at::Tensor *a = nullptr, *bt = nullptr;
    float scale = 1.0f;
    changed = changed || r.adapter->InputEmbedding() != nullptr || r.adapter->EmbeddingLora(&a, &bt, &scale);
  }
  if (!changed) return EmbeddingRows(table, tokens, dtype);
  // Ids of a resized vocabulary exist only in their adapter's table: the base lookup of those
  // rows (overwritten below) reads a valid row instead.
  at::Tensor x = EmbeddingRows(table, tokens.clamp_max(table.size(0) - 1), dtype);
  for (const Range& r : ranges_) {
    at::Tensor ids = tokens.narrow(0, r.offset, r.length);
    at::Tensor rows = x.narrow(0, r.offset, r.length);
    if (const at::Tensor* own = r.adapter->InputEmbedding()) rows.copy_(at::embedding(*own, ids));
    const at::Tensor *a = nullptr, *bt = nullptr;
    float scale = 1.0f;
    if (r.adapter->EmbeddingLora(&a, &bt, &scale)) {
      // PEFT: result + (F.embedding(x, Aᵀ) @ Bᵀ)·scaling.
      at::Tensor delta = at::matmul(at::embedding(*a, ids), *bt);
      rows.add_(scale == 1.0f ? delta : delta.mul_(scale));
    }
  }
  return x;
}

at::Tensor AdapterBatch::OutputLogits(const at::Tensor& x, const at::Tensor& lm_head,
                                      int64_t output_layer, const std::vector<RowSpan>& rows,
                                      bool all_positions, const CompactMatrix& lm_head_compact,
                                      cpu::MatmulPrecision precision) const {
  auto base_logits = [&] {
    return (lm_head_compact.defined() ? LinearForward(x, lm_head_compact, at::Tensor(), precision)
                                      : LinearForward(x, lm_head, at::Tensor(), precision))
        .to(at::kFloat);
  };
  // The ranges in rows of `x`: each row's last token when not all_positions.
  std::vector<Range> out;
  for (const Range& r : ranges_) {
    if (r.adapter->OutputEmbedding() == nullptr && !r.adapter->Adapts(output_layer, Projection::kLmHead)) continue;
    if (all_positions) {
      out.push_back(r);
      continue;
    }
    Range mapped{0, 0, r.adapter, 0};
    bool first = true;
    for (size_t i = 0; i < rows.size(); ++i) {
      if (rows[i].offset < r.offset || rows[i].offset + rows[i].length > r.offset + r.length) continue;
      if (first) mapped.offset = static_cast<int64_t>(i);
      first = false;
      ++mapped.length;
    }
    if (mapped.length > 0) out.push_back(mapped);
  }
  if (out.empty()) return base_logits();
  int64_t width = lm_head.size(0);
  for (const Range& r : out) {
    if (const at::Tensor* own = r.adapter->OutputEmbedding()) width = std::max(width, own->size(0));
  }
  at::Tensor base = base_logits();
  at::Tensor logits = base;
  if (width != base.size(1)) {
    logits = at::zeros({x.size(0), width}, base.options());
    logits.narrow(1, 0, base.size(1)).copy_(base);
  }
  for (const Range& r : out) {
    at::Tensor h = x.narrow(0, r.offset, r.length);
    at::Tensor rows_out = logits.narrow(0, r.offset, r.length);
    if (const at::Tensor* own = r.adapter->OutputEmbedding()) {
      rows_out.narrow(1, 0, own->size(0)).copy_(LinearForward(h, *own, at::Tensor()));
    }
    if (r.adapter->Adapts(output_layer, Projection::kLmHead)) {
      at::Tensor delta = r.adapter->Delta(output_layer, Projection::kLmHead, h);
      rows_out.narrow(1, 0, delta.size(1)).add_(delta.to(at::kFloat));
    }
  }
  return logits;
}

std::unique_ptr<KvCache> CausalLm::NewCache(int64_t capacity) const {
  return std::make_unique<KvCache>(config_.num_layers, config_.num_kv_heads, config_.head_dim,
                                   capacity, options_.dtype(kv_dtype_));
}

at::Tensor CausalLm::Positions(const std::vector<RowSpan>& rows, int64_t n, at::Device device) {
  std::vector<int64_t> pos;
  pos.reserve(n);
  for (const RowSpan& r : rows) {
    for (int64_t i = 0; i < r.length; ++i) pos.push_back(r.cache->length() + i);
  }
  return at::tensor(pos, at::kLong).to(device);
}

at::Tensor CausalLm::FinishRows(const at::Tensor& x, const std::vector<RowSpan>& rows,
                                bool all_positions) {
  for (const RowSpan& r : rows) r.cache->Commit(r.length);
  if (all_positions) return x;
  std::vector<int64_t> last;
  for (const RowSpan& r : rows) last.push_back(r.offset + r.length - 1);
  return x.index_select(0, at::tensor(last, at::kLong).to(x.device()));
}

void CausalLm::Attend(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const std::vector<RowSpan>& rows, double scale,
                      int64_t window, at::Tensor& out) const {
  const bool fuse = !rows.empty() && cpu::CachedAttentionApplies(q, k, v, out) &&
                    cpu::KvCacheApplies(*rows.front().cache);
  if (!fuse) {
    for (const RowSpan& r : rows) {
      RowAttention(layer, q.narrow(0, r.offset, r.length), k.narrow(0, r.offset, r.length),
                   v.narrow(0, r.offset, r.length), *r.cache, scale, window,
                   out.narrow(0, r.offset, r.length));
    }
    return;
  }
  std::vector<cpu::CachedRow> cached;
  cached.reserve(rows.size());
  for (const RowSpan& r : rows) cached.push_back({r.offset, r.cache, r.length});
  cpu::CachedAttention(layer, q, k, v, cached, config_.num_heads, config_.num_kv_heads,
                       config_.head_dim, scale, window, out);
}

void CausalLm::RowAttention(int64_t layer, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, KvCache& cache, double scale, int64_t window,
                            at::Tensor out) const {
  const int64_t t = q.size(0);
  const int64_t n_heads = config_.num_heads;
  const int64_t n_kv = config_.num_kv_heads;
  const int64_t d = config_.head_dim;
  const int64_t group = n_heads / n_kv;
  const int64_t past = cache.length();
  auto [keys, values] = cache.Append(layer, k.view({t, n_kv, d}).transpose(0, 1),
                                     v.view({t, n_kv, d}).transpose(0, 1));
  if (keys.scalar_type() != q.scalar_type()) {
    // A cache in another dtype (--kv_cache_dtype) is read in the compute dtype.
    keys = keys.to(q.scalar_type());
    values = values.to(q.scalar_type());
  }
  const int64_t total = past + t;
  if (t == 1 && (window <= 0 || total <= window)) {
    // Decode: one query per head. [n_heads, d] is already [n_kv, group, d]; the output is
    // written straight into its row of the batch (a few ops per row on the per-token path).
    at::Tensor qh = q.view({n_kv, group, d});
    at::Tensor scores = at::bmm(qh, keys.transpose(1, 2)).mul_(scale);
    at::Tensor probs = at::softmax(scores, -1);
    at::Tensor o = out.view({n_kv, group, d});
    at::bmm_out(o, probs, values);
    return;
  }
  // Queries go in blocks whose scores take a few MiB. A long prompt's [heads, t, total]
  // scores at once would be fresh memory in every layer (for 1,000 tokens and 12 heads, 48 MB
  // of scores and as much again of probabilities, each page faulted in), which made prefill
  // cost grow with the square of the prompt; and a block needs only the keys up to its last
  // query. Each query's scores, softmax and sum are the same in any block.
  const int64_t per_query = n_heads * total * static_cast<int64_t>(sizeof(float));
  const int64_t block = std::clamp<int64_t>(attention_block_bytes_ / per_query, 16, std::max<int64_t>(t, 16));
  for (int64_t i0 = 0; i0 < t; i0 += block) {
    const int64_t tb = std::min(block, t - i0);
    const int64_t seen = past + i0 + tb;  // Keys [0, seen): later ones are masked anyway.
    // Query head h reads kv head h / group: fold the group into the query axis.
    at::Tensor qh = q.narrow(0, i0, tb)
                        .view({tb, n_kv, group, d})
                        .permute({1, 2, 0, 3})
                        .reshape({n_kv, group * tb, d});
    at::Tensor scores = at::bmm(qh, keys.narrow(1, 0, seen).transpose(1, 2));  // [n_kv, group*tb, seen]
    scores.mul_(scale);
    // Query i (absolute position past + i) sees key j iff j <= past + i and, with a window,
    // j > past + i - window.
    at::Tensor qpos = at::arange(past + i0, past + i0 + tb,
                                 at::TensorOptions().dtype(at::kLong).device(q.device()))
                          .unsqueeze(1);
    at::Tensor kpos =
        at::arange(0, seen, at::TensorOptions().dtype(at::kLong).device(q.device())).unsqueeze(0);
    at::Tensor blocked = kpos > qpos;
    if (window > 0) blocked = blocked.logical_or(kpos <= qpos - window);
    scores.view({n_kv, group, tb, seen})
        .masked_fill_(blocked, -std::numeric_limits<float>::infinity());
    at::Tensor probs = at::softmax(scores, -1);
    at::Tensor o = at::bmm(probs, values.narrow(1, 0, seen));  // [n_kv, group*tb, d]
    out.narrow(0, i0, tb).copy_(o.view({n_kv, group, tb, d}).permute({2, 0, 1, 3}).reshape({tb, n_heads * d}));
  }
}

std::string InputEmbeddingName(const ModelConfig& config) {
  return config.architecture == Architecture::kGpt2 ? "transformer.wte.weight"
                                                    : "model.embed_tokens.weight";
}

std::vector<ParamSpec> DeclareParameters(const ModelConfig& c) {
  std::vector<ParamSpec> p;
  const int64_t H = c.hidden_size, I = c.intermediate_size, V = c.vocab_size;
  if (c.architecture == Architecture::kGpt2) {
    p.push_back({"transformer.wte.weight", {V, H}});
    p.push_back({"transformer.wpe.weight", {c.max_position_embeddings, H}});
    for (int64_t i = 0; i < c.num_layers; ++i) {
      const std::string pre = absl::StrCat("transformer.h.", i, ".");
      p.push_back({pre + "ln_1.weight", {H}});
      p.push_back({pre + "ln_1.bias", {H}});
      p.push_back({pre + "attn.c_attn.weight", {H, 3 * H}});
      p.push_back({pre + "attn.c_attn.bias", {3 * H}});
      p.push_back({pre + "attn.c_proj.weight", {H, H}});
      p.push_back({pre + "attn.c_proj.bias", {H}});
      p.push_back({pre + "ln_2.weight", {H}});
      p.push_back({pre + "ln_2.bias", {H}});
      p.push_back({pre + "mlp.c_fc.weight", {H, I}});
      p.push_back({pre + "mlp.c_fc.bias", {I}});
      p.push_back({pre + "mlp.c_proj.weight", {I, H}});
      p.push_back({pre + "mlp.c_proj.bias", {H}});
    }
    p.push_back({"transformer.ln_f.weight", {H}});
    p.push_back({"transformer.ln_f.bias", {H}});
    p.push_back({kOutputEmbeddingName, {V, H}});
    return p;
  }
  const int64_t QD = c.num_heads * c.head_dim, KD = c.num_kv_heads * c.head_dim;
  p.push_back({"model.embed_tokens.weight", {V, H}});
  for (int64_t i = 0; i < c.num_layers; ++i) {
    const std::string pre = absl::StrCat("model.layers.", i, ".");
    p.push_back({pre + "input_layernorm.weight", {H}});
    p.push_back({pre + "self_attn.q_proj.weight", {QD, H}});
    p.push_back({pre + "self_attn.k_proj.weight", {KD, H}});
    p.push_back({pre + "self_attn.v_proj.weight", {KD, H}});
    if (c.qkv_bias) {
      p.push_back({pre + "self_attn.q_proj.bias", {QD}});
      p.push_back({pre + "self_attn.k_proj.bias", {KD}});
      p.push_back({pre + "self_attn.v_proj.bias", {KD}});
    }
    if (c.qk_norm) {
      p.push_back({pre + "self_attn.q_norm.weight", {c.head_dim}});
      p.push_back({pre + "self_attn.k_norm.weight", {c.head_dim}});
    }
    p.push_back({pre + "self_attn.o_proj.weight", {H, QD}});
    if (c.o_bias) p.push_back({pre + "self_attn.o_proj.bias", {H}});
    p.push_back({pre + "post_attention_layernorm.weight", {H}});
    p.push_back({pre + "mlp.gate_proj.weight", {I, H}});
    p.push_back({pre + "mlp.up_proj.weight", {I, H}});
    p.push_back({pre + "mlp.down_proj.weight", {H, I}});
    if (c.mlp_bias) {
      p.push_back({pre + "mlp.gate_proj.bias", {I}});
      p.push_back({pre + "mlp.up_proj.bias", {I}});
      p.push_back({pre + "mlp.down_proj.bias", {H}});
    }
  }
  p.push_back({"model.norm.weight", {H}});
  p.push_back({kOutputEmbeddingName, {V, H}});
  return p;
}

}  // namespace adapterd::core
