#include "core/kv_cache.h"

#include <c10/util/Exception.h>

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

void KvCache::Share(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values) {
  TORCH_CHECK(length_ == shared_length_, "KV segments can be shared only before own positions");
  TORCH_CHECK(keys.size() == keys_.size() && values.size() == keys_.size(),
              "a shared KV segment needs every layer's keys and values");
  Segment s;
  s.begin = length_;
  s.length = keys.empty() ? 0 : keys[0].size(1);
  if (s.length == 0) return;
  for (size_t l = 0; l < keys.size(); ++l) {
    for (const at::Tensor* t : {&keys[l], &values[l]}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == keys_[l].size(0) && t->size(1) == s.length &&
                      t->size(2) == keys_[l].size(2),
                  "a shared KV segment has shape ", t->sizes(), ", expected [", keys_[l].size(0), ", ",
                  s.length, ", ", keys_[l].size(2), "]");
    }
    // Shared as they are when they already have the cache's layout; else a private copy.
    auto fit = [&](const at::Tensor& t) {
      return t.scalar_type() == keys_[l].scalar_type() && t.device() == keys_[l].device() &&
                     t.is_contiguous()
                 ? t
                 : t.to(keys_[l].options()).contiguous();
    };
    s.keys.push_back(fit(keys[l]));
    s.values.push_back(fit(values[l]));
  }
  // The own buffers keep the capacity asked for in all: shared positions no longer need it.
  const int64_t own = std::max<int64_t>(own_capacity() - s.length, 1);
  for (size_t l = 0; l < keys_.size(); ++l) {
    keys_[l] = at::empty({keys_[l].size(0), own, keys_[l].size(2)}, keys_[l].options());
    values_[l] = at::empty({values_[l].size(0), own, values_[l].size(2)}, values_[l].options());
  }
  length_ += s.length;
  shared_length_ += s.length;
  segments_.push_back(std::move(s));
}

void KvCache::Reserve(int64_t layer, int64_t needed) {
  const int64_t own_needed = needed - shared_length_;
  int64_t cap = keys_[layer].size(1);
  if (own_needed <= cap) return;
  while (cap < own_needed) cap *= 2;
  Grow(layer, cap);
}

void KvCache::ReserveExactly(int64_t positions) {
  const int64_t own = positions - shared_length_;
  for (size_t layer = 0; layer < keys_.size(); ++layer) {
    if (keys_[layer].size(1) < own) Grow(static_cast<int64_t>(layer), own);
  }
}

void KvCache::Grow(int64_t layer, int64_t cap) {
  at::Tensor& k = keys_[layer];
  at::Tensor& v = values_[layer];
  const int64_t own_length = length_ - shared_length_;
  at::Tensor nk = at::empty({k.size(0), cap, k.size(2)}, k.options());
  at::Tensor nv = at::empty({v.size(0), cap, v.size(2)}, v.options());
  nk.narrow(1, 0, own_length).copy_(k.narrow(1, 0, own_length));
  nv.narrow(1, 0, own_length).copy_(v.narrow(1, 0, own_length));
  k = std::move(nk);
  v = std::move(nv);
}

std::pair<at::Tensor, at::Tensor> KvCache::Append(int64_t layer, const at::Tensor& k,
                                                  const at::Tensor& v) {
  const int64_t t = k.size(1);
  Reserve(layer, length_ + t);
  keys_[layer].narrow(1, length_ - shared_length_, t).copy_(k);
  values_[layer].narrow(1, length_ - shared_length_, t).copy_(v);
  return Read(layer, 0, length_ + t);
}

std::pair<at::Tensor, at::Tensor> KvCache::Read(int64_t layer, int64_t position, int64_t n) const {
  TORCH_CHECK(position >= 0 && n >= 0 && position + n <= capacity(), "KV positions [", position, ", ",
              position + n, ") are outside the cache's ", capacity());
  std::vector<at::Tensor> keys, values;
  const int64_t end = position + n;
  for (const Segment& s : segments_) {
    const int64_t lo = std::max(position, s.begin), hi = std::min(end, s.begin + s.length);
    if (lo >= hi) continue;
    keys.push_back(s.keys[layer].narrow(1, lo - s.begin, hi - lo));
    values.push_back(s.values[layer].narrow(1, lo - s.begin, hi - lo));
  }
  const int64_t lo = std::max(position, shared_length_);
  if (end > lo || keys.empty()) {
    const int64_t from = std::max<int64_t>(lo - shared_length_, 0);
    keys.push_back(keys_[layer].narrow(1, from, std::max<int64_t>(end - lo, 0)));
    values.push_back(values_[layer].narrow(1, from, std::max<int64_t>(end - lo, 0)));
  }
  if (keys.size() == 1) return {keys[0], values[0]};
  return {at::cat(keys, 1), at::cat(values, 1)};
}

int64_t KvCache::bytes() const {
  int64_t total = 0;
  for (size_t i = 0; i < keys_.size(); ++i) {
    total += keys_[i].nbytes() + values_[i].nbytes();
  }
  return total;
}

int64_t KvCache::shared_bytes() const {
  int64_t total = 0;
  for (const Segment& s : segments_) {
    for (size_t i = 0; i < s.keys.size(); ++i) total += s.keys[i].nbytes() + s.values[i].nbytes();
  }
  return total;
}

}  // namespace adapterd::core
