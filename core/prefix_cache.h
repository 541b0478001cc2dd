// Automatic prefix reuse across requests: the keys and values of every full block of
// kBlock prompt positions a prefill computed, content-addressed by the adapter the sequence
// runs with and the token ids up to and including the block. A new sequence of the same
// adapter whose prompt starts with cached blocks shares them (its cache reads them in place,
// core/kv_cache.h) and prefills only the rest. Prompt-tuning adapters' soft-prompt positions are cached as one more segment
// (the same for every request of the adapter).
//
// Identity: an entry remembers its adapter by a weak reference and matches only that very
// object (the control block, not the address), so an adapter unloaded and loaded again under
// the same name, or a new one at a recycled address, never meets the old one's blocks. The
// base model is the null adapter.
//
// Memory: an entry is the very own block of the KV cache whose prefill computed it (held by
// reference: that cache never writes a committed block again, and the block outlives the
// request when the entry does; a cache after a soft prompt aligns its blocks to the token
// blocks, KvCache::AlignBlocks). Only a soft prompt's segment, or a block that lies across own
// blocks, is a copy, made once.
// Every later request of the same prefix reads that one block. Past `max_bytes` the least
// recently used entries that no running sequence reads are dropped; entries in use (by the
// request that made them too) stay until their readers finish.
//
// Thread-safety: every method may be called from any thread (one mutex).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "core/kv_cache.h"

namespace adapterd::core {

class SequenceAdapter;

class PrefixCache {
 public:
  static constexpr int64_t kBlock = KvCache::kBlock;

  explicit PrefixCache(int64_t max_bytes) : max_bytes_(max_bytes) {}

  // Shares into `cache` (whose first `first` positions are already there: a prefix-tuning
  // adapter's seeded ones; it must have no positions of its own yet) the soft prompt of
  // `adapter` when it has one (`soft_rows` > 0) and the cached leading blocks of `tokens`, at
  // most `limit` tokens' worth, committed.
  // Returns the number of tokens covered (0 when nothing was reused; the soft prompt is
  // reused only together with at least one block).
  int64_t Reuse(const std::shared_ptr<const SequenceAdapter>& adapter,
                const std::vector<int32_t>& tokens, int64_t limit, int64_t first,
                int64_t soft_rows, KvCache& cache);
  // The positions Reuse would share now (the soft prompt's and the blocks'), touching nothing.
  int64_t Cached(const std::shared_ptr<const SequenceAdapter>& adapter, const std::vector<int32_t>& tokens,
                 int64_t limit, int64_t soft_rows);
  // Stores the soft prompt (positions [first, first + soft_rows) of `cache`) and every full
  // block of the first `length` tokens (positions from first + soft_rows on) not yet cached.
  void Insert(const std::shared_ptr<const SequenceAdapter>& adapter,
              const std::vector<int32_t>& tokens, int64_t length, int64_t first,
              int64_t soft_rows, KvCache& cache);

  // Drops least recently used entries no cache reads until the cache holds at most
  // `max_bytes` (or only entries in use are left).
  void Shrink(int64_t max_bytes);

  int64_t bytes() const;
  // Bytes of the entries running sequences read (not evictable now).
  int64_t pinned_bytes() const;
  int64_t blocks() const;
  int64_t max_bytes() const { return max_bytes_; }

 private:
  struct Entry {
    std::weak_ptr<const SequenceAdapter> adapter;
    const SequenceAdapter* raw = nullptr;
    uint64_t parent = 0;          // Key of the block before (0: the first block).
    std::vector<int32_t> tokens;  // This block's ids (empty: the soft-prompt segment).
    std::vector<at::Tensor> keys, values;  // Per layer, [kv_heads, positions, head_dim].
    int64_t bytes = 0;
    std::list<uint64_t>::iterator lru;
  };

  static uint64_t KeyOf(const SequenceAdapter* adapter, uint64_t parent, const int32_t* tokens,
                        int64_t n);
  // The cached leading blocks of `tokens` (at most `limit` tokens' worth) into `chain`, after
  // the soft-prompt entry when `soft_rows` > 0, which it returns (null when not cached: then
  // the chain is empty too). With mu_ held.
  Entry* Chain(const std::shared_ptr<const SequenceAdapter>& adapter, const std::vector<int32_t>& tokens,
               int64_t limit, int64_t soft_rows, std::vector<Entry*>* chain);
  // The entry under `key` when it is this adapter's, with this parent and these tokens.
  Entry* Find(uint64_t key, const std::shared_ptr<const SequenceAdapter>& adapter, uint64_t parent,
              const int32_t* tokens, int64_t n);
  void Store(uint64_t key, const std::shared_ptr<const SequenceAdapter>& adapter, uint64_t parent,
             const int32_t* tokens, int64_t n, KvCache& cache, int64_t position, int64_t length);
  void Touch(Entry& e);
  static bool InUse(const Entry& e);
  void EvictTo(int64_t max_bytes);  // With mu_ held.

  const int64_t max_bytes_;
  mutable std::mutex mu_;
  std::unordered_map<uint64_t, Entry> entries_;
  std::list<uint64_t> lru_;  // Most recently used first.
  int64_t bytes_ = 0;
};

}  // namespace adapterd::core
