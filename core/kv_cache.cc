#include "core/kv_cache.h"

#include <c10/util/Exception.h>

#include <algorithm>

namespace adapterd::core {
namespace {

int64_t BlocksOf(int64_t positions) { return (std::max<int64_t>(positions, 1) + KvCache::kBlock - 1) / KvCache::kBlock; }

}  // namespace

KvCache::KvCache(int64_t num_layers, int64_t kv_heads, int64_t head_dim,
                 int64_t initial_capacity, at::TensorOptions options)
    : num_layers_(static_cast<size_t>(num_layers)), kv_heads_(kv_heads), head_dim_(head_dim),
      options_(options) {
  Reserve(initial_capacity);
}

KvCache::Segment KvCache::NewBlock(int64_t begin) const {
  Segment b;
  b.begin = begin;
  b.length = kBlock;
  for (size_t l = 0; l < num_layers_; ++l) {
    b.keys.push_back(at::empty({kv_heads_, kBlock, head_dim_}, options_));
    b.values.push_back(at::empty({kv_heads_, kBlock, head_dim_}, options_));
  }
  return b;
}

void KvCache::Share(const std::vector<at::Tensor>& keys, const std::vector<at::Tensor>& values) {
  TORCH_CHECK(length_ == shared_length_, "KV segments can be shared only before own positions");
  TORCH_CHECK(skip_ == 0, "KV segments can be shared only before the own blocks are aligned");
  TORCH_CHECK(keys.size() == num_layers_ && values.size() == num_layers_,
              "a shared KV segment needs every layer's keys and values");
  Segment s;
  s.begin = length_;
  s.length = keys.empty() ? 0 : keys[0].size(1);
  if (s.length == 0) return;
  for (size_t l = 0; l < keys.size(); ++l) {
    for (const at::Tensor* t : {&keys[l], &values[l]}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == kv_heads_ && t->size(1) == s.length &&
                      t->size(2) == head_dim_,
                  "a shared KV segment has shape ", t->sizes(), ", expected [", kv_heads_, ", ",
                  s.length, ", ", head_dim_, "]");
    }
    // Shared as they are when they already have the cache's layout; else a private copy.
    auto fit = [&](const at::Tensor& t) {
      return t.scalar_type() == options_.dtype() && t.device() == options_.device() && t.is_contiguous()
                 ? t
                 : t.to(options_).contiguous();
    };
    s.keys.push_back(fit(keys[l]));
    s.values.push_back(fit(values[l]));
  }
  // The own blocks keep the room asked for in all: shared positions no longer need it. They
  // hold nothing yet, so they only move up.
  const int64_t keep = BlocksOf(own_capacity() - s.length);
  if (static_cast<int64_t>(blocks_.size()) > keep) blocks_.resize(static_cast<size_t>(keep));
  length_ += s.length;
  shared_length_ += s.length;
  for (size_t i = 0; i < blocks_.size(); ++i) blocks_[i].begin = shared_length_ + static_cast<int64_t>(i) * kBlock;
  segments_.push_back(std::move(s));
}

void KvCache::AlignBlocks(int64_t position) {
  TORCH_CHECK(length_ == shared_length_ && skip_ == 0 && position >= shared_length_,
              "KV blocks can be aligned only once, before own positions");
  const int64_t skip = (kBlock - (position - shared_length_) % kBlock) % kBlock;
  if (skip == 0) return;
  const int64_t room = capacity();
  Segment& first = blocks_.front();
  for (size_t l = 0; l < num_layers_; ++l) {
    first.keys[l] = first.keys[l].narrow(1, skip, kBlock - skip);
    first.values[l] = first.values[l].narrow(1, skip, kBlock - skip);
  }
  first.length = kBlock - skip;
  skip_ = skip;
  for (size_t i = 1; i < blocks_.size(); ++i) blocks_[i].begin = shared_length_ - skip + static_cast<int64_t>(i) * kBlock;
  Reserve(room);
}

int64_t KvCache::BlocksFor(int64_t positions) const {
  const int64_t held = static_cast<int64_t>(blocks_.size());
  return std::max({held, int64_t{1}, (positions - shared_length_ + skip_ + kBlock - 1) / kBlock});
}

void KvCache::Reserve(int64_t positions) {
  while (capacity() < positions || blocks_.empty()) blocks_.push_back(NewBlock(capacity()));
}

std::pair<at::Tensor, at::Tensor> KvCache::Append(int64_t layer, const at::Tensor& k,
                                                  const at::Tensor& v) {
  const int64_t t = k.size(1);
  Reserve(length_ + t);
  for (int64_t done = 0; done < t;) {
    const int64_t position = length_ + done;
    Segment& b = blocks_[static_cast<size_t>((position - shared_length_ + skip_) / kBlock)];
    const int64_t n = std::min(t - done, b.begin + b.length - position);
    b.keys[layer].narrow(1, position - b.begin, n).copy_(k.narrow(1, done, n));
    b.values[layer].narrow(1, position - b.begin, n).copy_(v.narrow(1, done, n));
    done += n;
  }
  return Read(layer, 0, length_ + t);
}

std::pair<at::Tensor, at::Tensor> KvCache::Read(int64_t layer, int64_t position, int64_t n) const {
  TORCH_CHECK(position >= 0 && n >= 0 && position + n <= capacity(), "KV positions [", position, ", ",
              position + n, ") are outside the cache's ", capacity());
  std::vector<at::Tensor> keys, values;
  const int64_t end = position + n;
  for (const std::vector<Segment>* part : {&segments_, &blocks_}) {
    for (const Segment& s : *part) {
      const int64_t lo = std::max(position, s.begin), hi = std::min(end, s.begin + s.length);
      if (lo >= hi) continue;
      keys.push_back(s.keys[layer].narrow(1, lo - s.begin, hi - lo));
      values.push_back(s.values[layer].narrow(1, lo - s.begin, hi - lo));
    }
  }
  if (keys.empty()) {
    const Segment& b = blocks_.front();
    return {b.keys[layer].narrow(1, 0, 0), b.values[layer].narrow(1, 0, 0)};
  }
  if (keys.size() == 1) return {keys[0], values[0]};
  return {at::cat(keys, 1), at::cat(values, 1)};
}

const KvCache::Segment* KvCache::OwnBlockAt(int64_t position) const {
  const int64_t offset = position - shared_length_ + skip_;
  if (offset < skip_ || offset % kBlock != 0 || offset / kBlock >= static_cast<int64_t>(blocks_.size())) return nullptr;
  return &blocks_[static_cast<size_t>(offset / kBlock)];
}

int64_t KvCache::bytes() const {
  int64_t alone = 0;
  for (const Segment& b : blocks_) {
    if (b.keys.front().use_count() == 1) ++alone;
  }
  return alone * 2 * static_cast<int64_t>(num_layers_) * kv_heads_ * kBlock * head_dim_ *
         static_cast<int64_t>(options_.dtype().itemsize());
}

int64_t KvCache::shared_bytes() const {
  int64_t total = 0;
  for (const Segment& s : segments_) {
    for (size_t i = 0; i < s.keys.size(); ++i) total += s.keys[i].nbytes() + s.values[i].nbytes();
  }
  return total;
}

}  // namespace adapterd::core
