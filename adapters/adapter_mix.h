// Weighted mixes of loaded LoRA adapters, chosen per request (LoRAX's linear mix): a request
// names adapters with weights w_i, and every projection they adapt adds Σ w_i·s_i·B_i·A_i·x,
// the weighted sum of their deltas, unmerged. The mix is itself a LoRA adapter whose factors
// are the parts' stacked along the rank (A = [A_1; …; A_n], Bᵀ = [w_1·s_1·B_1ᵀ; …]), so the
// segmented kernel runs it like any other and one row's cost is that of the summed rank.
// Building one copies the parts' factors; MixCache keeps the recent mixes so that requests
// naming the same mix share one copy. Free of LibTorch types (the server uses it).
//
// Thread-safety: MixAdapters is reentrant; MixCache's methods from any thread.
#pragma once

#include <cstddef>
#include <list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "adapters/adapter_ref.h"

namespace adapterd::adapters {

// Most adapters one mix may name.
inline constexpr size_t kMaxMixParts = 8;

struct MixPart {
  AdapterRef adapter;
  float weight = 1.0f;
};

// Returns the mix's name as responses and logs show it: "mix(a*0.5+b*-0.25)".
std::string MixName(const std::vector<std::pair<std::string, float>>& parts);

// Builds the mix of `parts` (1..kMaxMixParts distinct adapters, finite weights) for `engine`'s
// base model. InvalidArgument, naming the part, when one is not a plain LoRA adapter (prefix or
// prompt tuning, IA3, DoRA: their steps are not linear in the weights) or when the parts name
// different base models in their configs. Factors keep their dtype when every part holds the
// model's compute dtype with its scaling folded in; otherwise they are widened to float32.
absl::StatusOr<AdapterRef> MixAdapters(const core::Engine& engine, const std::vector<MixPart>& parts,
                                       const std::string& name);

// The most recently used mixes, keyed by their parts (the very adapters, so an adapter
// unloaded or replaced under its name never matches an old mix) and weights.
class MixCache {
 public:
  explicit MixCache(size_t capacity) : capacity_(capacity) {}

  // Returns the cached mix of `parts` or builds (and keeps) it.
  absl::StatusOr<AdapterRef> Get(const core::Engine& engine, const std::vector<MixPart>& parts,
                                 const std::string& name) ABSL_LOCKS_EXCLUDED(mu_);
  // Mixes held now; their bytes count until they leave the cache and every request using
  // them ends.
  size_t size() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  struct Entry {
    std::vector<std::weak_ptr<const Adapter>> parts;
    std::vector<float> weights;
    AdapterRef mix;
  };
  static bool Matches(const Entry& e, const std::vector<MixPart>& parts);

  const size_t capacity_;
  mutable absl::Mutex mu_;
  std::list<Entry> entries_ ABSL_GUARDED_BY(mu_);  // Most recently used first.
};

}  // namespace adapterd::adapters
