// Per-sequence key/value cache on the model's device, paged: positions lie in segments, each
// per layer a tensor [kv_heads, length, head_dim]. They come in two parts:
//  - shared segments first: tensors this cache reads but never writes, held by reference
//    (a prefix-tuning adapter's virtual positions, prefix-cache blocks of an earlier request).
//    Many caches may hold the same segment; it lives while any of them, or its owner, does.
//  - then the cache's own blocks of kBlock positions each, from shared_length() on: the
//    positions this sequence computes. Room grows a block at a time and nothing is ever
//    moved, so growing costs no copy; a caller that budgets memory (the server's scheduler)
//    grows the cache ahead with Reserve, in the blocks it counts.
// Attention reads every segment in place: the CPU kernels walk them (CachedAttention), the
// ATen path concatenates them (Append's result).
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
  // Positions of an own block.
  static constexpr int64_t kBlock = 16;

  // Positions [begin, begin + length): per layer keys and values [kv_heads, length, head_dim]
  // in the cache's dtype, each head's rows contiguous, heads keys[l].stride(0) elements apart
  // (contiguous but for an aligned cache's first own block, see AlignBlocks).
  struct Segment {
    int64_t begin = 0;
    int64_t length = 0;
    std::vector<at::Tensor> keys, values;
  };

  // Room for `initial_capacity` positions (at least one block).
  KvCache(int64_t num_layers, int64_t kv_heads, int64_t head_dim, int64_t initial_capacity,
          at::TensorOptions options);

  // Number of positions committed so far (the past length of the next step).
  int64_t length() const { return length_; }
  // Makes `keys`/`values` (per layer [kv_heads, n, head_dim]) positions [length, length + n),
  // committed, without copying them when they are contiguous and of the cache's dtype (else a
  // converted copy is shared by this cache alone). Only before the cache has positions of its
  // own (length() == shared_length()); the own blocks keep the room asked for in all.
  void Share(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values);
  // Positions held by reference: the own blocks start here.
  int64_t shared_length() const { return shared_length_; }
  const std::vector<Segment>& segments() const { return segments_; }
  // The own blocks, in order: block i holds positions [shared_length() + i·kBlock, + kBlock)
  // (shifted down by the skip of AlignBlocks, the first block starting at shared_length()).
  // Positions at and after length() are scratch, for kernels that write the next ones in place.
  // A block whose positions are all committed is never written again, so others (the prefix
  // cache) may hold its tensors and read them.
  const std::vector<Segment>& blocks() const { return blocks_; }
  // The full own block that starts at `position`, or null.
  const Segment* OwnBlockAt(int64_t position) const;
  // Makes the own block boundaries fall at `position` + k·kBlock (a prompt-tuning soft prompt's
  // end, so that token blocks are whole own blocks the prefix cache can hold): the first own
  // block then leaves its first positions unused. Before own positions, after any Share; the
  // room there was is kept.
  void AlignBlocks(int64_t position);

  // Writes `k`, `v` ([kv_heads, t, head_dim]) for `layer` at positions [length, length + t)
  // and returns every cached key and value up to length + t (a view when they lie in one
  // segment, else a concatenation).
  std::pair<at::Tensor, at::Tensor> Append(int64_t layer, const at::Tensor& k,
                                           const at::Tensor& v);
  // The keys and values of `layer` at positions [position, position + n): views when they lie
  // in one segment, else a concatenation.
  std::pair<at::Tensor, at::Tensor> Read(int64_t layer, int64_t position, int64_t n) const;
  // Adds own blocks until there is room for `positions` positions (shared and own). Never
  // shrinks.
  void Reserve(int64_t positions);
  // The own blocks there are after Reserve(positions).
  int64_t BlocksFor(int64_t positions) const;
  // Positions there is room for, shared and own.
  int64_t capacity() const { return shared_length_ + own_capacity(); }
  // Positions the own blocks hold room for.
  int64_t own_capacity() const { return static_cast<int64_t>(blocks_.size()) * kBlock - skip_; }
  // Makes `t` appended positions part of the past once every layer has written them.
  void Commit(int64_t t) { length_ += t; }
  size_t layers() const { return num_layers_; }
  const at::TensorOptions& options() const { return options_; }
  // Bytes of the own blocks that this cache alone holds (room, not length). Shared segments
  // are their owners', and so are own blocks someone else holds too (the prefix cache).
  int64_t bytes() const;
  // Bytes of the shared segments this cache reads.
  int64_t shared_bytes() const;

 private:
  Segment NewBlock(int64_t begin) const;

  size_t num_layers_;
  int64_t kv_heads_;
  int64_t head_dim_;
  at::TensorOptions options_;
  int64_t length_ = 0;
  int64_t shared_length_ = 0;
  int64_t skip_ = 0;  // Unused positions at the start of the first own block (AlignBlocks).
  std::vector<Segment> segments_;
  std::vector<Segment> blocks_;
};

}  // namespace adapterd::core
