// Per-sequence key/value cache on the model's device. Positions come in two parts:
//  - shared segments first: tensors this cache reads but never writes, held by reference
//    (a prefix-tuning adapter's virtual positions, prefix-cache blocks of an earlier request).
//    Many caches may hold the same segment; it lives while any of them, or its owner, does.
//  - then the cache's own positions, per layer one buffer [kv_heads, capacity, head_dim]
//    that Append grows by doubling; a caller that budgets memory (the server's scheduler)
//    grows it ahead with ReserveExactly instead.
// Attention reads both parts in place: the CPU kernels walk the segments (CachedAttention),
// the ATen path concatenates them (Append's result).
//
// Thread-safety: owned by one sequence and touched only by the thread that runs the model.
// Shared segments are immutable, so caches on other threads may read them at the same time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

namespace adapterd::core {

class KvCache {
 public:
  // Positions [begin, begin + length) held by reference: per layer keys and values
  // [kv_heads, length, head_dim], contiguous, in the cache's dtype.
  struct Segment {
    int64_t begin = 0;
    int64_t length = 0;
    std::vector<at::Tensor> keys, values;
  };

  KvCache(int64_t num_layers, int64_t kv_heads, int64_t head_dim, int64_t initial_capacity,
          at::TensorOptions options);

  // Number of positions committed so far (the past length of the next step).
  int64_t length() const { return length_; }
  // Makes `keys`/`values` (per layer [kv_heads, n, head_dim]) positions [length, length + n),
  // committed, without copying them when they are contiguous and of the cache's dtype (else a
  // converted copy is shared by this cache alone). Only before the cache has positions of its
  // own (length() == shared_length()); the own buffers keep their total capacity.
  void Share(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values);
  // Positions held by reference: the own positions start here.
  int64_t shared_length() const { return shared_length_; }
  const std::vector<Segment>& segments() const { return segments_; }

  // Writes `k`, `v` ([kv_heads, t, head_dim]) for `layer` at positions [length, length + t)
  // and returns every cached key and value up to length + t (views of the own buffers, or a
  // concatenation when segments are shared).
  std::pair<at::Tensor, at::Tensor> Append(int64_t layer, const at::Tensor& k,
                                           const at::Tensor& v);
  // The keys and values of `layer` at positions [position, position + n): views when they lie
  // in one part, else a concatenation.
  std::pair<at::Tensor, at::Tensor> Read(int64_t layer, int64_t position, int64_t n) const;
  // Makes room for `positions` positions (shared and own) in `layer`, keeping what is there.
  void Reserve(int64_t layer, int64_t positions);
  // Grows every layer to hold exactly `positions` positions when it holds fewer.
  void ReserveExactly(int64_t positions);
  // Positions every layer holds room for, shared and own.
  int64_t capacity() const { return shared_length_ + own_capacity(); }
  // Positions the own buffers hold room for.
  int64_t own_capacity() const { return keys_.empty() ? 0 : keys_[0].size(1); }
  // The own buffers of `layer`, [kv_heads, own_capacity, head_dim], contiguous: position p
  // is at index p - shared_length(); indices at and after length() - shared_length() are
  // scratch. For kernels that write the next position in place.
  at::Tensor& keys(int64_t layer) { return keys_[layer]; }
  at::Tensor& values(int64_t layer) { return values_[layer]; }
  // Makes `t` appended positions part of the past once every layer has written them.
  void Commit(int64_t t) { length_ += t; }
  size_t layers() const { return keys_.size(); }
  // Bytes of the own buffers (capacity, not length). Shared segments are their owners'.
  int64_t bytes() const;
  // Bytes of the shared segments this cache reads.
  int64_t shared_bytes() const;

 private:
  void Grow(int64_t layer, int64_t own_capacity);

  int64_t length_ = 0;
  int64_t shared_length_ = 0;
  std::vector<Segment> segments_;
  std::vector<at::Tensor> keys_;
  std::vector<at::Tensor> values_;
};

}  // namespace adapterd::core
