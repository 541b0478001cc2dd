#include "core/kv_cache.h"

#include <algorithm>

namespace adapterd::core {

KvCache::KvCache(int64_t num_layers, int64_t kv_heads, int64_t head_dim,
                 int64_t initial_capacity, at::TensorOptions options) {
  const int64_t cap = std::max<int64_t>(initial_capacity, 1);
  for (int64_t i = 0; i < num_layers; ++i) {
    keys_.push_back(at::empty({kv_heads, cap, head_dim}, options));
    values_.push_back(at::empty({kv_heads, cap, head_dim}, options));
  }
}

void KvCache::Reserve(int64_t layer, int64_t needed) {
  int64_t cap = keys_[layer].size(1);
  if (needed <= cap) return;
  while (cap < needed) cap *= 2;
  Grow(layer, cap);
}

void KvCache::ReserveExactly(int64_t positions) {
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    if (keys_[layer].size(1) < positions) Grow(static_cast<int64_t>(layer), positions);
  }
}

void KvCache::Grow(int64_t layer, int64_t cap) {
  at::Tensor& k = keys_[layer];
  at::Tensor& v = values_[layer];
  at::Tensor nk = at::empty({k.size(0), cap, k.size(2)}, k.options());
  at::Tensor nv = at::empty({v.size(0), cap, v.size(2)}, v.options());
  nk.narrow(1, 0, length_).copy_(k.narrow(1, 0, length_));
  nv.narrow(1, 0, length_).copy_(v.narrow(1, 0, length_));
  k = std::move(nk);
  v = std::move(nv);
}

std::pair<at::Tensor, at::Tensor> KvCache::Append(int64_t layer, const at::Tensor& k,
                                                  const at::Tensor& v) {
  const int64_t t = k.size(1);
  Reserve(layer, length_ + t);
  keys_[layer].narrow(1, length_, t).copy_(k);
  values_[layer].narrow(1, length_, t).copy_(v);
  return {keys_[layer].narrow(1, 0, length_ + t), values_[layer].narrow(1, 0, length_ + t)};
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (size_t i = 0; i < keys_.size(); ++i) {
    total += keys_[i].nbytes() + values_[i].nbytes();
  }
  return total;
}

}  // namespace adapterd::core
