// Per-sequence key/value cache: for each layer, keys and values of shape
// [kv_heads, capacity, head_dim] on the model's device. Append grows it by doubling; a caller
// that budgets memory (the server's scheduler) grows it ahead with ReserveExactly instead.
//
// Thread-safety: owned by one sequence and touched only by the thread that runs the model.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace adapterd::core {

class KvCache {
 public:
  KvCache(int64_t num_layers, int64_t kv_heads, int64_t head_dim, int64_t initial_capacity,
          at::TensorOptions options);

  // Number of positions committed so far (the past length of the next step).
  int64_t length() const { return length_; }
  // Writes `k`, `v` ([kv_heads, t, head_dim]) for `layer` at positions [length, length + t)
  // and returns views of every cached key and value up to length + t.
  std::pair<at::Tensor, at::Tensor> Append(int64_t layer, const at::Tensor& k,
                                           const at::Tensor& v);
  // Makes room for `positions` positions in `layer` (keeping what is there).
  void Reserve(int64_t layer, int64_t positions);
  // Grows every layer to hold exactly `positions` positions when it holds fewer.
  void ReserveExactly(int64_t positions);
  // Positions every layer holds room for.
  int64_t capacity() const { return keys_.empty() ? 0 : keys_[0].size(1); }
  // The whole buffers of `layer`, [kv_heads, capacity, head_dim], contiguous; positions at
  // and after length() are scratch. For kernels that write the next position in place.
  at::Tensor& keys(int64_t layer) { return keys_[layer]; }
  at::Tensor& values(int64_t layer) { return values_[layer]; }
  // Makes `t` appended positions part of the past once every layer has written them.
  void Commit(int64_t t) { length_ += t; }
  size_t layers() const { return keys_.size(); }
  // Bytes held by the cache (capacity, not length).
  int64_t bytes() const;

 private:
  void Grow(int64_t layer, int64_t capacity);

  int64_t length_ = 0;
  std::vector<at::Tensor> keys_;
  std::vector<at::Tensor> values_;
};

}  // namespace adapterd::core
