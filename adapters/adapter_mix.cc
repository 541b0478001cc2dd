#include "adapters/adapter_mix.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "adapters/adapter.h"
#include "core/engine.h"
#include "core/status_macros.h"
#include "core/torch_error.h"

namespace adapterd::adapters {

std::string MixName(const std::vector<std::pair<std::string, float>>& parts) {
  std::vector<std::string> terms;
  terms.reserve(parts.size());
  for (const auto& [name, weight] : parts) terms.push_back(absl::StrCat(name, "*", weight));
  return absl::StrCat("mix(", absl::StrJoin(terms, "+"), ")");
}

namespace {

// Why `a` cannot be part of a mix; empty when it can.
std::string NotMixable(const Adapter& a) {
  const AdapterReport& r = a.report();
  if (r.type != "LORA") {
    return absl::StrCat("adapter '", r.name, "' is ", r.type,
                        "; a weighted mix takes LoRA adapters only (their deltas add linearly)");
  }
  if (r.dora_modules > 0) {
    return absl::StrCat("adapter '", r.name,
                        "' is a DoRA adapter: its magnitude rescales the whole output, so its effect "
                        "is not a delta that can be weighted and summed with others");
  }
  if (a.ChangesEmbeddings()) {
    return absl::StrCat("adapter '", r.name,
                        "' replaces or adapts the embeddings (saved modules, embedding LoRA or added tokens); "
                        "a weighted mix takes LoRA adapters of linear projections only");
  }
  return "";
}

}  // namespace

absl::StatusOr<AdapterRef> MixAdapters(const core::Engine& engine, const std::vector<MixPart>& parts,
                                       const std::string& name) {
  if (parts.empty() || parts.size() > kMaxMixParts) {
    return absl::InvalidArgumentError(
        absl::StrCat("a mix names 1 to ", kMaxMixParts, " adapters, not ", parts.size()));
  }
  std::string base_name;
  std::set<const Adapter*> seen;
  for (const MixPart& p : parts) {
    if (p.adapter == nullptr) return absl::InvalidArgumentError("a mix part has no adapter");
    if (!std::isfinite(p.weight)) {
      return absl::InvalidArgumentError(
          absl::StrCat("the weight of adapter '", p.adapter->name(), "' in a mix is not finite"));
    }
    if (!seen.insert(p.adapter.get()).second) {
      return absl::InvalidArgumentError(absl::StrCat("a mix names adapter '", p.adapter->name(), "' twice"));
    }
    if (std::string why = NotMixable(*p.adapter); !why.empty()) return absl::InvalidArgumentError(why);
    const std::string& b = p.adapter->report().base_model_name_or_path;
    if (!b.empty() && !base_name.empty() && b != base_name) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapters of a mix must share their base model: '", parts.front().adapter->name(), "' names \"",
          base_name, "\" and '", p.adapter->name(), "' names \"", b, "\""));
    }
    if (base_name.empty()) base_name = b;
  }

  const at::ScalarType compute = engine.model().options().dtype().toScalarType();
  // Keep the compute dtype only when every part holds it with its scaling folded into Bᵀ; a
  // part held otherwise (bfloat16 factors of a float32 model carry their scaling apart) has its
  // factors widened, exactly, so that w·s·Bᵀ is rounded once, in float32.
  bool keep = true;
  for (const MixPart& p : parts) {
    for (const auto& [key, m] : p.adapter->lora()) {
      if (m.a.scalar_type() != compute || m.bt.scalar_type() != compute || m.scale != 1.0f) keep = false;
    }
  }
  const at::ScalarType dtype = keep ? compute : at::kFloat;

  AdapterReport report;
  report.name = name;
  report.path = "";
  report.type = "LORA";
  report.base_model_name_or_path = base_name;
  report.compute_dtype = std::string(c10::toString(dtype));
  std::set<std::string> modules;
  std::set<double> alphas, scalings;
  std::map<std::pair<int64_t, core::Projection>, std::vector<std::pair<const LoraModule*, float>>> stacked;
  for (const MixPart& p : parts) {
    const AdapterReport& r = p.adapter->report();
    modules.insert(r.matched_modules.begin(), r.matched_modules.end());
    alphas.insert(r.alphas.begin(), r.alphas.end());
    scalings.insert(r.scalings.begin(), r.scalings.end());
    report.use_rslora = report.use_rslora || r.use_rslora;
    for (const auto& [key, m] : p.adapter->lora()) stacked[key].push_back({&m, p.weight});
  }
  report.matched_modules.assign(modules.begin(), modules.end());
  report.alphas.assign(alphas.begin(), alphas.end());
  report.scalings.assign(scalings.begin(), scalings.end());

  AdapterWeights weights;
  std::set<int64_t> ranks;
  try {
    for (const auto& [key, list] : stacked) {
      std::vector<at::Tensor> as, bts;
      for (const auto& [m, weight] : list) {
        as.push_back(m->a.to(dtype));
        // The part's scaling times its weight, applied to its rows of Bᵀ in float32.
        bts.push_back((m->bt.to(at::kFloat) * (static_cast<double>(m->scale) * weight)).to(dtype));
      }
      LoraModule module;
      module.a = at::cat(as, 0).contiguous();
      module.bt = at::cat(bts, 0).contiguous();
      ranks.insert(module.a.size(0));
      report.bytes += static_cast<int64_t>(module.a.nbytes() + module.bt.nbytes());
      weights.lora.emplace(key, std::move(module));
    }
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat("building ", name, " failed: ", core::TorchErrorMessage(e)));
  }
  report.ranks.assign(ranks.begin(), ranks.end());
  return std::make_shared<const Adapter>(std::move(report), std::move(weights));
}

bool MixCache::Matches(const Entry& e, const std::vector<MixPart>& parts) {
  if (e.parts.size() != parts.size()) return false;
  for (size_t i = 0; i < parts.size(); ++i) {
    // A part still alive is the very adapter the entry was built from: an adapter freed since
    // cannot match, even if a new one reuses its address.
    if (e.weights[i] != parts[i].weight || e.parts[i].expired() || e.parts[i].lock() != parts[i].adapter) {
      return false;
    }
  }
  return true;
}

absl::StatusOr<AdapterRef> MixCache::Get(const core::Engine& engine, const std::vector<MixPart>& parts,
                                         const std::string& name) {
  absl::MutexLock lock(&mu_);
  // Mixes of an unloaded or replaced part can never match again: let their memory go.
  entries_.remove_if([](const Entry& e) {
    return std::any_of(e.parts.begin(), e.parts.end(), [](const auto& w) { return w.expired(); });
  });
  for (auto it = entries_.begin(); it != entries_.end(); ++it) {
    if (Matches(*it, parts)) {
      entries_.splice(entries_.begin(), entries_, it);
      return entries_.front().mix;
    }
  }
  ASSIGN_OR_RETURN(AdapterRef mix, MixAdapters(engine, parts, name));
  if (capacity_ == 0) return mix;
  Entry e;
  for (const MixPart& p : parts) {
    e.parts.push_back(p.adapter);
    e.weights.push_back(p.weight);
  }
  e.mix = mix;
  entries_.push_front(std::move(e));
  while (entries_.size() > capacity_) entries_.pop_back();
  return mix;
}

size_t MixCache::size() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

}  // namespace adapterd::adapters
