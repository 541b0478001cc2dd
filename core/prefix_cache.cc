#include "core/prefix_cache.h"

#include <algorithm>
#include <cstring>

namespace adapterd::core {
namespace {

// The parent of a soft-prompt segment: no block key is this (KeyOf never returns it for a
// block, bar a 2^-64 chance).
constexpr uint64_t kSoftParent = 0x50F7'9809'7A1E'D5E5ull;

uint64_t Mix(uint64_t h, uint64_t v) {
  // splitmix64's finaliser over the running hash and the next word.
  h ^= v + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
  h ^= h >> 30;
  h *= 0xBF58476D1CE4E5B9ull;
  h ^= h >> 27;
  h *= 0x94D049BB133111EBull;
  h ^= h >> 31;
  return h;
}

bool SameAdapter(const std::weak_ptr<const SequenceAdapter>& held, const SequenceAdapter* raw,
                 const std::shared_ptr<const SequenceAdapter>& adapter) {
  if (raw != adapter.get()) return false;
  if (adapter == nullptr) return true;
  // The very object: same control block (an address can be recycled, a live control block
  // cannot, and `held` keeps it alive).
  return !held.owner_before(adapter) && !adapter.owner_before(held);
}

}  // namespace

uint64_t PrefixCache::KeyOf(const SequenceAdapter* adapter, uint64_t parent, const int32_t* tokens,
                            int64_t n) {
  uint64_t h = Mix(reinterpret_cast<uintptr_t>(adapter), parent);
  for (int64_t i = 0; i < n; ++i) h = Mix(h, static_cast<uint32_t>(tokens[i]));
  return h == 0 || h == kSoftParent ? h + 1 : h;
}

PrefixCache::Entry* PrefixCache::Find(uint64_t key, const std::shared_ptr<const SequenceAdapter>& adapter,
                                      uint64_t parent, const int32_t* tokens, int64_t n) {
  auto it = entries_.find(key);
  if (it == entries_.end()) return nullptr;
  Entry& e = it->second;
  if (e.raw != nullptr && e.adapter.expired()) {
    // Its adapter is gone: nothing can match it again.
    bytes_ -= e.bytes;
    lru_.erase(e.lru);
    entries_.erase(it);
    return nullptr;
  }
  if (!SameAdapter(e.adapter, e.raw, adapter) || e.parent != parent ||
      static_cast<int64_t>(e.tokens.size()) != n ||
      (n > 0 && std::memcmp(e.tokens.data(), tokens, static_cast<size_t>(n) * sizeof(int32_t)) != 0)) {
    return nullptr;
  }
  return &e;
}

void PrefixCache::Touch(Entry& e) { lru_.splice(lru_.begin(), lru_, e.lru); }

void PrefixCache::Store(uint64_t key, const std::shared_ptr<const SequenceAdapter>& adapter,
                        uint64_t parent, const int32_t* tokens, int64_t n, KvCache& cache,
                        int64_t position, int64_t length) {
  if (entries_.count(key) > 0) return;  // Another block under this key (a hash collision).
  Entry e;
  e.adapter = adapter;
  e.raw = adapter.get();
  e.parent = parent;
  e.tokens.assign(tokens, tokens + n);
  const int64_t layers = static_cast<int64_t>(cache.layers());
  // A full own block of the cache that lies exactly where the entry does becomes the entry:
  // the same tensors, no copy (the cache never writes a committed block again). Else, as for
  // a soft prompt's segment, a copy.
  const KvCache::Segment* block = length == KvCache::kBlock ? cache.OwnBlockAt(position) : nullptr;
  for (int64_t l = 0; l < layers; ++l) {
    if (block != nullptr) {
      e.keys.push_back(block->keys[static_cast<size_t>(l)]);
      e.values.push_back(block->values[static_cast<size_t>(l)]);
    } else {
      auto [keys, values] = cache.Read(l, position, length);
      e.keys.push_back(keys.clone(at::MemoryFormat::Contiguous));
      e.values.push_back(values.clone(at::MemoryFormat::Contiguous));
    }
    e.bytes += e.keys.back().nbytes() + e.values.back().nbytes();
  }
  lru_.push_front(key);
  e.lru = lru_.begin();
  bytes_ += e.bytes;
  entries_.emplace(key, std::move(e));
}

PrefixCache::Entry* PrefixCache::Chain(const std::shared_ptr<const SequenceAdapter>& adapter,
                                       const std::vector<int32_t>& tokens, int64_t limit, int64_t soft_rows,
                                       std::vector<Entry*>* chain) {
  chain->clear();
  const int64_t most = std::min<int64_t>(limit, static_cast<int64_t>(tokens.size())) / kBlock;
  if (most <= 0) return nullptr;
  uint64_t parent = 0;
  Entry* soft = nullptr;
  if (soft_rows > 0) {
    const uint64_t key = KeyOf(adapter.get(), kSoftParent, nullptr, 0);
    soft = Find(key, adapter, kSoftParent, nullptr, 0);
    if (soft == nullptr) return nullptr;
    parent = key;
  }
  for (int64_t b = 0; b < most; ++b) {
    const int32_t* block = tokens.data() + b * kBlock;
    const uint64_t key = KeyOf(adapter.get(), parent, block, kBlock);
    Entry* e = Find(key, adapter, parent, block, kBlock);
    if (e == nullptr) break;
    chain->push_back(e);
    parent = key;
  }
  return chain->empty() ? nullptr : soft;
}

int64_t PrefixCache::Cached(const std::shared_ptr<const SequenceAdapter>& adapter,
                            const std::vector<int32_t>& tokens, int64_t limit, int64_t soft_rows) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Entry*> chain;
  Entry* soft = Chain(adapter, tokens, limit, soft_rows, &chain);
  if (chain.empty()) return 0;
  return (soft != nullptr ? soft_rows : 0) + static_cast<int64_t>(chain.size()) * kBlock;
}

int64_t PrefixCache::Reuse(const std::shared_ptr<const SequenceAdapter>& adapter,
                           const std::vector<int32_t>& tokens, int64_t limit, int64_t first,
                           int64_t soft_rows, KvCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);
  if (cache.length() != first || cache.shared_length() != first) return 0;
  std::vector<Entry*> chain;
  Entry* soft = Chain(adapter, tokens, limit, soft_rows, &chain);
  if (chain.empty()) return 0;
  // Shared by reference, not copied: the cache reads the entries' tensors in place, and an
  // entry a cache holds is not evicted (EvictTo) until that cache lets go of it.
  if (soft != nullptr) cache.Share(soft->keys, soft->values);
  for (Entry* e : chain) cache.Share(e->keys, e->values);
  const int64_t reused = static_cast<int64_t>(chain.size()) * kBlock;
  // Children first, so that a chain's leading blocks are the last of it to be dropped.
  for (auto it = chain.rbegin(); it != chain.rend(); ++it) Touch(**it);
  if (soft != nullptr) Touch(*soft);
  return reused;
}

void PrefixCache::Insert(const std::shared_ptr<const SequenceAdapter>& adapter,
                         const std::vector<int32_t>& tokens, int64_t length, int64_t first,
                         int64_t soft_rows, KvCache& cache) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t blocks = std::min<int64_t>(length, static_cast<int64_t>(tokens.size())) / kBlock;
  if (blocks <= 0 || cache.length() < first + soft_rows + blocks * kBlock) return;
  uint64_t parent = 0;
  std::vector<uint64_t> keys;
  if (soft_rows > 0) {
    parent = KeyOf(adapter.get(), kSoftParent, nullptr, 0);
    if (Find(parent, adapter, kSoftParent, nullptr, 0) == nullptr) {
      Store(parent, adapter, kSoftParent, nullptr, 0, cache, first, soft_rows);
    }
    keys.push_back(parent);
  }
  for (int64_t b = 0; b < blocks; ++b) {
    const int32_t* block = tokens.data() + b * kBlock;
    const uint64_t key = KeyOf(adapter.get(), parent, block, kBlock);
    if (Find(key, adapter, parent, block, kBlock) == nullptr) {
      Store(key, adapter, parent, block, kBlock, cache, first + soft_rows + b * kBlock, kBlock);
    }
    keys.push_back(key);
    parent = key;
  }
  for (auto it = keys.rbegin(); it != keys.rend(); ++it) {
    auto e = entries_.find(*it);
    if (e != entries_.end()) Touch(e->second);
  }
  EvictTo(max_bytes_);
}

bool PrefixCache::InUse(const Entry& e) {
  // The entry's own handles count one each; a cache sharing the entry holds more.
  for (const std::vector<at::Tensor>* part : {&e.keys, &e.values}) {
    for (const at::Tensor& t : *part) {
      if (t.use_count() > 1 || t.storage().use_count() > 1) return true;
    }
  }
  return false;
}

void PrefixCache::EvictTo(int64_t max_bytes) {
  // Least recently used first, passing over the entries running sequences read.
  auto it = lru_.end();
  while (bytes_ > max_bytes && it != lru_.begin()) {
    --it;
    auto e = entries_.find(*it);
    if (InUse(e->second)) continue;
    bytes_ -= e->second.bytes;
    entries_.erase(e);
    it = lru_.erase(it);
  }
}

void PrefixCache::Shrink(int64_t max_bytes) {
  std::lock_guard<std::mutex> lock(mu_);
  EvictTo(max_bytes);
}

int64_t PrefixCache::bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  return bytes_;
}

int64_t PrefixCache::pinned_bytes() const {
  std::lock_guard<std::mutex> lock(mu_);
  int64_t pinned = 0;
  for (const auto& [key, e] : entries_) {
    if (InUse(e)) pinned += e.bytes;
  }
  return pinned;
}

int64_t PrefixCache::blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(entries_.size());
}

}  // namespace adapterd::core
