#include "adapters/adapter_loader.h"

#include <sys/stat.h>

#include <chrono>
#include <cmath>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "adapters/peft_regex.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/engine.h"
#include "core/model_config.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/tokenizer.h"
#include "core/torch_error.h"
#include "nlohmann/json.hpp"

namespace adapterd::adapters {
namespace {

constexpr absl::string_view kPeftPrefix = "base_model.model.";
constexpr uint64_t kMaxAdapterTokenizerBytes = 64ull << 20;

// The input embedding's module name ("model.embed_tokens", "transformer.wte").
std::string InputEmbeddingModule(const core::ModelConfig& config) {
  std::string name = core::InputEmbeddingName(config);
  return name.substr(0, name.size() - std::string(".weight").size());
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0;
}

std::string Shape(at::IntArrayRef s) { return absl::StrCat("[", absl::StrJoin(s, ","), "]"); }

absl::StatusOr<bool> FullMatch(const std::string& pattern, const std::string& text,
                               const char* field) {
  ASSIGN_OR_RETURN(auto regex, PeftRegex::Compile(pattern, field));
  return regex->FullMatch(text);
}

// PEFT: the layer index is the first `.<pattern>.<digits>.` in the name.
absl::StatusOr<std::optional<int64_t>> LayerIndex(const std::string& key,
                                                  const std::vector<std::string>& patterns) {
  std::vector<std::string> regexes;
  if (patterns.empty()) {
    regexes.push_back(R"(^.*?\.[^.]*\.(\d+)\.)");
  } else {
    for (const std::string& p : patterns) regexes.push_back("^.*?\\." + p + R"(\.(\d+)\.)");
  }
  for (const std::string& r : regexes) {
    ASSIGN_OR_RETURN(auto regex, PeftRegex::Compile(r, "layers_pattern"));
    ASSIGN_OR_RETURN(std::optional<std::string> digits, regex->SearchGroup1(key));
    int64_t index = 0;
    if (digits && absl::SimpleAtoi(*digits, &index)) return index;
  }
  return std::optional<int64_t>();
}

// PEFT's get_pattern_key: the first pattern with re.match(rf"(.*\.)?({pattern})$", key).
template <typename T>
absl::StatusOr<std::optional<T>> PatternValue(
    const std::vector<std::pair<std::string, T>>& patterns, const std::string& key,
    const char* field) {
  for (const auto& [pattern, value] : patterns) {
    ASSIGN_OR_RETURN(auto regex, PeftRegex::Compile("(.*\\.)?(" + pattern + ")", field));
    ASSIGN_OR_RETURN(bool match, regex->FullMatch(key));
    if (match) return std::optional<T>(value);
  }
  return std::optional<T>();
}

absl::StatusOr<at::Tensor> ToTensor(const core::SafetensorsFile& file, const core::TensorInfo& info,
                                    const at::TensorOptions& options) {
  at::ScalarType stored;
  switch (info.dtype) {
    case core::DType::kF32: stored = at::kFloat; break;
    case core::DType::kF16: stored = at::kHalf; break;
    case core::DType::kBF16: stored = at::kBFloat16; break;
    case core::DType::kF64: stored = at::kDouble; break;
    default:
      return absl::FailedPreconditionError(absl::StrCat(
          file.path(), ": tensor \"", info.name, "\" has dtype ", core::DTypeName(info.dtype),
          "; adapters must be F32, F16, BF16 or F64"));
  }
  // Copied straight into its final buffer: adapters outlive their file's mapping.
  at::Tensor t = at::empty(info.shape, stored);
  std::memcpy(t.data_ptr(), file.Data(info), info.NumBytes());
  if (!at::isfinite(t).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(
        file.path(), ": tensor \"", info.name, "\" holds NaN or infinite values"));
  }
  // PEFT upcasts half-precision adapter weights to float32 (autocast_adapter_dtype).
  return t.to(options.device(), options.dtype().toScalarType());
}

// The base modules `cfg` targets; an error when it selects one adapterd does not adapt, or none.
absl::StatusOr<std::set<std::string>> TargetedModules(const AdapterConfig& cfg, const core::ModelConfig& bc,
                                                      const std::map<std::string, BaseModule>& modules,
                                                      const std::string& label) {
  std::set<std::string> targeted;
  for (const auto& [mname, m] : modules) {
    ASSIGN_OR_RETURN(bool hit, IsTargeted(cfg, bc, m));
    if (!hit) continue;
    if (!m.supported) {
      return absl::FailedPreconditionError(
          absl::StrCat(label, ": target_modules selects ", mname, ", which adapterd does not adapt"));
    }
    targeted.insert(mname);
  }
  if (targeted.empty()) {
    return absl::FailedPreconditionError(absl::StrCat(
        label, ": target_modules matches no module of the base ", bc.architecture_name));
  }
  return targeted;
}

struct LoraPair {
  const core::TensorInfo* a = nullptr;
  const core::TensorInfo* b = nullptr;
  const core::TensorInfo* magnitude = nullptr;  // DoRA.
};

// DoRA at inference, as PEFT's DoraLinearLayer computes it: g = magnitude / ‖W + scaling·B·A‖
// (the 2-norm of each output row of the combined weight, W as [out, in]), then
// y = g·(x·Wᵀ + scaling·x·Aᵀ·Bᵀ) + b. Fills lm.dora_scale (g) and lm.dora_shift ((1 - g)·b)
// from the factors as held (so the step and the norm see the same numbers).
absl::Status AddDora(const core::SafetensorsFile& file, const core::TensorInfo& info, const core::CausalLm& base,
                     const std::string& module, bool conv1d, int64_t out, const std::string& label,
                     LoraModule& lm) {
  if (info.shape != std::vector<int64_t>{out}) {
    return absl::FailedPreconditionError(absl::StrCat(
        label, ": lora_magnitude_vector for ", module, " has shape ", Shape(info.shape), ", base expects [", out,
        "]"));
  }
  ASSIGN_OR_RETURN(at::Tensor magnitude, ToTensor(file, info, base.options().dtype(at::kFloat)));
  const at::Tensor& w = base.weights().at(module + ".weight");
  // A copy (never the base's own weights, which may be mapped read-only).
  at::Tensor combined = (conv1d ? w.t() : w).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
  combined.add_(at::matmul(lm.bt.to(at::kFloat).t(), lm.a.to(at::kFloat)), lm.scale);
  const at::Tensor norm = combined.mul(combined).sum(1).sqrt();
  at::Tensor g = magnitude.cpu().div(norm.cpu());
  if (!at::isfinite(g).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(
        label, ": DoRA scale magnitude / ||W + scaling*B*A|| for ", module,
        " is not finite (a row of the combined weight has norm 0)"));
  }
  const at::TensorOptions options = base.options();
  const at::ScalarType dtype = options.dtype().toScalarType();
  lm.dora_scale = g.to(options.device(), dtype);
  auto bias = base.weights().find(module + ".bias");
  if (bias != base.weights().end() && bias->second.defined()) {
    lm.dora_shift = (1.0 - g).mul(bias->second.to(at::kFloat).cpu()).to(options.device(), dtype);
  }
  return absl::OkStatus();
}

// A module's LoRA rank, alpha and scaling (rank_pattern and alpha_pattern applied).
struct RankScaling {
  int64_t r = 0;
  double alpha = 0;
  double scaling = 0;
};

absl::StatusOr<RankScaling> LoraScaling(const AdapterConfig& cfg, const std::string& module) {
  ASSIGN_OR_RETURN(std::optional<int64_t> rank_override, PatternValue(cfg.rank_pattern, module, "rank_pattern"));
  ASSIGN_OR_RETURN(std::optional<double> alpha_override, PatternValue(cfg.alpha_pattern, module, "alpha_pattern"));
  RankScaling rs;
  rs.r = rank_override.value_or(cfg.r);
  rs.alpha = alpha_override.value_or(cfg.lora_alpha);
  rs.scaling = cfg.use_rslora ? rs.alpha / std::sqrt(static_cast<double>(rs.r)) : rs.alpha / rs.r;
  return rs;
}

// LoRA on the input embedding (PEFT's lora.Embedding): lora_embedding_A [r, vocab] and
// lora_embedding_B [hidden, r]; a row gains scaling·(A[:, id]ᵀ·Bᵀ). Held as Aᵀ [vocab, r] (a
// row lookup per token) and scaling·Bᵀ [r, hidden] in the compute dtype.
absl::Status LoadEmbeddingLora(const core::SafetensorsFile& file, const core::CausalLm& base,
                               const std::string& module, const LoraPair& pair, const RankScaling& rs,
                               int64_t vocab, const std::string& label, AdapterWeights& weights,
                               AdapterReport& report) {
  const int64_t hidden = base.config().hidden_size;
  const std::vector<int64_t> want_a = {rs.r, vocab}, want_b = {hidden, rs.r};
  if (pair.a->shape != want_a || pair.b->shape != want_b) {
    return absl::FailedPreconditionError(absl::StrCat(
        label, ": lora_embedding_A/B for ", module, " have shapes ", Shape(pair.a->shape), " and ",
        Shape(pair.b->shape), ", the base expects ", Shape(want_a), " and ", Shape(want_b), " (r=", rs.r, ")"));
  }
  ASSIGN_OR_RETURN(at::Tensor a, ToTensor(file, *pair.a, base.options()));
  ASSIGN_OR_RETURN(at::Tensor b, ToTensor(file, *pair.b, base.options()));
  b.mul_(rs.scaling);  // This loader's own copy.
  if (!std::isfinite(rs.scaling) || !at::isfinite(b).all().item<bool>()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": lora_embedding_B for ", module, " times its scaling ",
                                                   rs.scaling, " is not finite"));
  }
  weights.embedding_a_t = a.t().contiguous();
  weights.embedding_bt = b.t().contiguous();
  report.bytes += weights.embedding_a_t.nbytes() + weights.embedding_bt.nbytes();
  return absl::OkStatus();
}

// Whole embeddings saved with the adapter: modules_to_save copies ("<module>.weight") and the
// base layers PEFT saves beside an embedding LoRA or a resized vocabulary
// ("<module>.base_layer.weight"). A copy equal to the base's is not held. Fills the embedding
// fields of `weights` and records the tensors it took in `consumed`.
absl::Status LoadSavedModules(const AdapterConfig& cfg, const core::SafetensorsFile& file,
                              const core::CausalLm& base, const std::string& label,
                              AdapterWeights& weights, AdapterReport& report, std::set<std::string>& consumed) {
  const core::ModelConfig& bc = base.config();
  const std::string input = InputEmbeddingModule(bc);
  struct Saved {
    const core::TensorInfo* info = nullptr;
    std::string module;
  };
  Saved in, out;
  for (const core::TensorInfo& t : file.tensors()) {
    std::string key = t.name;
    if (absl::StartsWith(key, kPeftPrefix)) key = key.substr(kPeftPrefix.size());
    Saved* slot = nullptr;
    std::string module;
    for (const char* suffix : {".weight", ".base_layer.weight"}) {
      if (key == input + suffix) slot = &in, module = input;
      if (key == absl::StrCat("lm_head", suffix)) slot = &out, module = "lm_head";
    }
    if (slot == nullptr) continue;
    if (slot->info != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(label, ": ", file.path(), " holds two copies of ", module,
                                                        ": ", slot->info->name, " and ", t.name));
    }
    slot->info = &t;
    slot->module = module;
    consumed.insert(t.name);
  }
  for (const std::string& m : cfg.modules_to_save) {
    const bool is_output = m == "lm_head";
    if ((is_output ? out : in).info == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": modules_to_save lists \"", m, "\" but ", file.path(), " holds no ",
          is_output ? "lm_head" : input, ".weight"));
    }
  }
  const int64_t base_vocab = bc.vocab_size;
  int64_t rows[2] = {base_vocab, base_vocab};
  const at::TensorOptions options = base.options();
  for (int i = 0; i < 2; ++i) {
    const Saved& saved = i == 0 ? in : out;
    if (saved.info == nullptr) continue;
    const std::vector<int64_t>& shape = saved.info->shape;
    if (shape.size() != 2 || shape[1] != bc.hidden_size || shape[0] < 1) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": saved ", saved.module, " (", saved.info->name, ") has shape ", Shape(shape),
          ", expected [vocabulary, ", bc.hidden_size, "]"));
    }
    rows[i] = shape[0];
    ASSIGN_OR_RETURN(at::Tensor t, ToTensor(file, *saved.info, options));
    const at::Tensor& own = base.weights().at(i == 0 ? core::InputEmbeddingName(bc) : core::kOutputEmbeddingName);
    if (shape[0] == base_vocab && at::equal(t, own.to(t.scalar_type()))) {
      report.saved_modules.push_back(absl::StrCat(saved.module, " ", Shape(shape), ": equal to the base's, not held"));
      continue;
    }
    report.saved_modules.push_back(absl::StrCat(saved.module, " ", Shape(shape), " ",
                                                c10::toString(t.scalar_type()), ": replaces the base's (",
                                                t.nbytes(), " bytes)"));
    report.bytes += t.nbytes();
    (i == 0 ? weights.input_embedding : weights.output_embedding) = t.contiguous();
  }
  if (rows[0] != rows[1]) {
    return absl::FailedPreconditionError(absl::StrCat(
        label, ": the adapter's input embedding has ", rows[0], " rows but its lm_head ", rows[1],
        "; an adapter that resizes the vocabulary must save both (modules_to_save: [\"", input.substr(input.rfind('.') + 1),
        "\", \"lm_head\"])"));
  }
  if (rows[0] != base_vocab) {
    weights.vocab_size = rows[0];
    report.vocab_size = rows[0];
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterWeights> LoadLora(
    const AdapterConfig& cfg, const core::SafetensorsFile& file, const core::CausalLm& base,
    const std::string& name, bool bf16_factors, const std::set<std::string>& consumed, int64_t vocab,
    AdapterReport& report) {
  const core::ModelConfig& bc = base.config();
  const std::string label = absl::StrCat("adapter \"", name, "\"");
  std::map<std::string, BaseModule> modules;
  for (BaseModule& m : BaseModules(bc)) modules[m.name] = m;

  std::map<std::string, LoraPair> pairs;
  for (const core::TensorInfo& t : file.tensors()) {
    if (consumed.count(t.name)) continue;
    std::string key = t.name;
    if (absl::StartsWith(key, kPeftPrefix)) key = key.substr(kPeftPrefix.size());
    std::string module;
    bool is_a = false;
    if (absl::EndsWith(key, ".lora_magnitude_vector")) {
      if (!cfg.use_dora) {
        return absl::FailedPreconditionError(absl::StrCat(
            label, ": tensor ", t.name, " is a DoRA magnitude vector but the config does not set use_dora"));
      }
      module = key.substr(0, key.size() - std::string(".lora_magnitude_vector").size());
      auto it = modules.find(module);
      if (it == modules.end() || !it->second.supported) {
        return absl::FailedPreconditionError(absl::StrCat(
            label, ": tensor ", t.name, " targets \"", module, "\", which is not a projection of the base ",
            bc.architecture_name, " that adapterd adapts"));
      }
      pairs[module].magnitude = &t;
      continue;
    }
    if (absl::EndsWith(key, ".lora_A.weight")) {
      module = key.substr(0, key.size() - std::string(".lora_A.weight").size());
      is_a = true;
    } else if (absl::EndsWith(key, ".lora_B.weight")) {
      module = key.substr(0, key.size() - std::string(".lora_B.weight").size());
    } else if (absl::EndsWith(key, ".lora_embedding_A") || absl::EndsWith(key, ".lora_embedding_B")) {
      module = key.substr(0, key.size() - std::string(".lora_embedding_A").size());
      is_a = absl::EndsWith(key, "_A");
      auto it = modules.find(module);
      if (it == modules.end() || !it->second.embedding) {
        return absl::FailedPreconditionError(absl::StrCat(
            label, ": tensor ", t.name, " adapts \"", module, "\", which is not the input embedding of the base ",
            bc.architecture_name));
      }
      (is_a ? pairs[module].a : pairs[module].b) = &t;
      continue;
    } else if (absl::EndsWith(key, ".lora_B.bias")) {
      return absl::FailedPreconditionError(
          absl::StrCat(label, ": tensor ", t.name, " is a LoRA bias (lora_bias), not supported"));
    } else {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name,
          " is not a LoRA weight (full weights are accepted for the input embedding and lm_head only)"));
    }
    auto it = modules.find(module);
    if (it == modules.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name, " targets \"", module,
          "\", which is not a projection of the base ", bc.architecture_name));
    }
    if (!it->second.supported) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name, " adapts ", module, ", which adapterd does not adapt"));
    }
    (is_a ? pairs[module].a : pairs[module].b) = &t;
  }

  ASSIGN_OR_RETURN(const std::set<std::string> targeted, TargetedModules(cfg, bc, modules, label));
  for (const std::string& m : targeted) {
    auto it = pairs.find(m);
    if (it == pairs.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": the config targets ", m, " but ", file.path(), " holds no LoRA weights for it"));
    }
  }
  for (const auto& [m, pair] : pairs) {
    if (!targeted.count(m)) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": ", file.path(), " holds LoRA weights for ", m,
          ", which the config's target_modules / layers_to_transform do not select"));
    }
    if (pair.a == nullptr || pair.b == nullptr) {
      if (pair.a == nullptr && pair.b == nullptr) {
        return absl::FailedPreconditionError(
            absl::StrCat(label, ": ", m, " has a DoRA magnitude vector but no lora_A or lora_B"));
      }
      return absl::FailedPreconditionError(absl::StrCat(label, ": ", m, " has lora_",
                                                        pair.a ? "A" : "B", " but no lora_",
                                                        pair.a ? "B" : "A"));
    }
    if (cfg.use_dora && pair.magnitude == nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": the config sets use_dora but ", file.path(), " holds no lora_magnitude_vector for ", m));
    }
  }

  AdapterWeights weights;
  std::set<int64_t> ranks;
  std::set<double> alphas, scalings;
  std::set<int64_t> adapted_layers;
  const at::TensorOptions options = base.options();
  for (const auto& [mname, pair] : pairs) {
    const BaseModule& m = modules.at(mname);
    if ((m.embedding || m.output) && pair.magnitude != nullptr) {
      return absl::FailedPreconditionError(absl::StrCat(label, ": DoRA on ", mname, " is not supported"));
    }
    ASSIGN_OR_RETURN(const RankScaling rs, LoraScaling(cfg, mname));
    ranks.insert(rs.r);
    alphas.insert(rs.alpha);
    scalings.insert(rs.scaling);
    if (m.embedding) {
      RETURN_IF_ERROR(LoadEmbeddingLora(file, base, mname, pair, rs, vocab, label, weights, report));
      report.matched_modules.push_back(mname);
      continue;
    }
    const at::Tensor& w = base.weights().at(mname + ".weight");
    // GPT-2's lm_head is an nn.Linear, its blocks Conv1D.
    const bool conv1d = bc.architecture == core::Architecture::kGpt2 && !m.output;
    const int64_t in = conv1d ? w.size(0) : w.size(1);
    const int64_t out = m.output ? vocab : conv1d ? w.size(1) : w.size(0);
    const int64_t r = rs.r;
    const double alpha = rs.alpha;
    const std::vector<int64_t> want_a = {r, in}, want_b = {out, r};
    if (pair.a->shape != want_a) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": lora_A for ", mname, " has shape ", Shape(pair.a->shape), ", base expects ",
          Shape(want_a), " (r=", r, ")"));
    }
    if (pair.b->shape != want_b) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": lora_B for ", mname, " has shape ", Shape(pair.b->shape), ", base expects ",
          Shape(want_b), " (r=", r, ")"));
    }
    const double scaling = rs.scaling;
    // bfloat16 factors of a float32 CPU model stay bfloat16 (half the memory and the bytes a
    // step reads; the CPU kernels widen them exactly, so the sums are those of the float32
    // copy PEFT would make); their scaling is applied after B, which rounding them would alter.
    // With bf16_factors, other factors are rounded to bfloat16 (once, at load) and held so too.
    const bool file_bf16 = pair.a->dtype == core::DType::kBF16 && pair.b->dtype == core::DType::kBF16;
    const bool keep_bf16 = (file_bf16 || bf16_factors) && options.dtype().toScalarType() == at::kFloat &&
                           options.device().is_cpu();
    const at::TensorOptions held = keep_bf16 ? options.dtype(at::kBFloat16) : options;
    ASSIGN_OR_RETURN(at::Tensor a, ToTensor(file, *pair.a, held));
    ASSIGN_OR_RETURN(at::Tensor b, ToTensor(file, *pair.b, held));
    LoraModule lm;
    lm.a = std::move(a);
    if (keep_bf16) {
      lm.scale = static_cast<float>(scaling);
      ++report.bf16_modules;
      if (!file_bf16) ++report.bf16_rounded_modules;
    } else {
      b.mul_(scaling);  // `b` is this loader's own copy.
    }
    lm.bt = b.t().contiguous();
    if (!std::isfinite(scaling) || !std::isfinite(lm.scale) ||
        !at::isfinite(lm.scale == 1.0f ? lm.bt : lm.bt.to(at::kFloat).mul_(lm.scale)).all().item<bool>()) {
      return absl::InvalidArgumentError(absl::StrCat(
          label, ": lora_B for ", mname, " times its scaling ", scaling, " (lora_alpha ", alpha,
          ", r ", r, ") is not finite in ", c10::toString(options.dtype().toScalarType())));
    }
    if (pair.magnitude != nullptr) {
      RETURN_IF_ERROR(AddDora(file, *pair.magnitude, base, mname, conv1d, out, label, lm));
      report.bytes += lm.dora_scale.nbytes() + (lm.dora_shift.defined() ? lm.dora_shift.nbytes() : 0);
      ++report.dora_modules;
    }
    report.bytes += lm.a.nbytes() + lm.bt.nbytes();
    weights.lora[{m.layer, m.projection}] = std::move(lm);
    adapted_layers.insert(m.layer);
    report.matched_modules.push_back(mname);
  }
  report.ranks.assign(ranks.begin(), ranks.end());
  report.alphas.assign(alphas.begin(), alphas.end());
  report.scalings.assign(scalings.begin(), scalings.end());
  report.use_rslora = cfg.use_rslora;
  for (int64_t l = 0; l < bc.num_layers; ++l) {
    if (!adapted_layers.count(l)) report.skipped_layers.push_back(l);
  }
  return weights;
}

// IA3 (PEFT's IA3Layer): a vector per targeted module, `ia3_l`, shaped [out, 1] to scale the
// module's output or, for feed-forward modules, [1, in] to scale its input.
absl::StatusOr<AdapterWeights> LoadIa3(AdapterConfig cfg, const core::SafetensorsFile& file,
                                       const core::CausalLm& base, const std::string& name,
                                       const std::set<std::string>& consumed, AdapterReport& report) {
  const core::ModelConfig& bc = base.config();
  const std::string label = absl::StrCat("adapter \"", name, "\"");
  const bool conv1d = bc.architecture == core::Architecture::kGpt2;
  // PEFT's per-architecture defaults (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
  // ..._FEEDFORWARD_MODULES_MAPPING) when the config leaves them unset.
  if (!cfg.target_list && !cfg.target_regex && !cfg.target_all_linear) {
    cfg.target_list = conv1d ? std::vector<std::string>{"c_attn", "mlp.c_proj"}
                             : std::vector<std::string>{"k_proj", "v_proj", "down_proj"};
  }
  AdapterConfig feedforward;  // The feed-forward selection, matched as targets are.
  if (cfg.feedforward_regex) {
    feedforward.target_regex = cfg.feedforward_regex;
  } else {
    feedforward.target_list = cfg.feedforward_list.value_or(
        conv1d ? std::vector<std::string>{"mlp.c_proj"} : std::vector<std::string>{"down_proj"});
  }
  std::map<std::string, BaseModule> modules;
  for (BaseModule& m : BaseModules(bc)) modules[m.name] = m;
  std::map<std::string, const core::TensorInfo*> vectors;
  for (const core::TensorInfo& t : file.tensors()) {
    if (consumed.count(t.name)) continue;
    std::string key = t.name;
    if (absl::StartsWith(key, kPeftPrefix)) key = key.substr(kPeftPrefix.size());
    if (!absl::EndsWith(key, ".ia3_l")) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name, " is not an IA3 vector (ia3_l); full weights are accepted for "
          "the input embedding and lm_head only"));
    }
    const std::string module = key.substr(0, key.size() - std::string(".ia3_l").size());
    auto it = modules.find(module);
    if (it == modules.end() || !it->second.supported || it->second.output || it->second.embedding) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name, " targets \"", module, "\", which is not a projection of the base ",
          bc.architecture_name, " that adapterd adapts"));
    }
    vectors[module] = &t;
  }
  ASSIGN_OR_RETURN(const std::set<std::string> targeted, TargetedModules(cfg, bc, modules, label));
  for (const std::string& mname : targeted) {
    if (modules.at(mname).output || modules.at(mname).embedding) {
      return absl::FailedPreconditionError(absl::StrCat(label, ": IA3 on ", mname, " is not supported"));
    }
    if (!vectors.count(mname)) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": the config targets ", mname, " but ", file.path(), " holds no ia3_l for it"));
    }
  }
  AdapterWeights weights;
  std::set<int64_t> adapted_layers;
  for (const auto& [mname, info] : vectors) {
    if (!targeted.count(mname)) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": ", file.path(), " holds ia3_l for ", mname, ", which the config's target_modules do not select"));
    }
    const BaseModule& m = modules.at(mname);
    ASSIGN_OR_RETURN(bool input, IsTargeted(feedforward, bc, m));
    const at::Tensor& w = base.weights().at(mname + ".weight");
    const int64_t in = conv1d ? w.size(0) : w.size(1);
    const int64_t out = conv1d ? w.size(1) : w.size(0);
    const std::vector<int64_t> want = input ? std::vector<int64_t>{1, in} : std::vector<int64_t>{out, 1};
    if (info->shape != want) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": ia3_l for ", mname, " has shape ", Shape(info->shape), ", base expects ", Shape(want),
          input ? " (a feed-forward module: its input is scaled)" : " (its output is scaled)"));
    }
    ASSIGN_OR_RETURN(at::Tensor l, ToTensor(file, *info, base.options()));
    Ia3Module module;
    module.l = l.reshape({input ? in : out}).contiguous();
    module.input = input;
    report.bytes += module.l.nbytes();
    weights.ia3[{m.layer, m.projection}] = std::move(module);
    adapted_layers.insert(m.layer);
    report.matched_modules.push_back(mname);
    if (input) report.ia3_input_modules.push_back(mname);
  }
  for (int64_t l = 0; l < bc.num_layers; ++l) {
    if (!adapted_layers.count(l)) report.skipped_layers.push_back(l);
  }
  return weights;
}

absl::StatusOr<AdapterWeights> LoadPromptLearning(
    const AdapterConfig& cfg, const core::SafetensorsFile& file, const core::CausalLm& base,
    const std::string& name, AdapterReport& report) {
  const core::ModelConfig& bc = base.config();
  const std::string label = absl::StrCat("adapter \"", name, "\"");
  const core::TensorInfo* emb = nullptr;
  for (const core::TensorInfo& t : file.tensors()) {
    if (t.name == "prompt_embeddings") {
      emb = &t;
    } else {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": tensor ", t.name, " is not expected in a ", AdapterTypeName(cfg.type),
          " adapter (only prompt_embeddings)"));
    }
  }
  if (emb == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(label, ": ", file.path(), " has no prompt_embeddings tensor"));
  }
  const int64_t nvt = cfg.num_virtual_tokens;
  report.num_virtual_tokens = nvt;
  auto mismatch = [&](const char* field, int64_t found, int64_t want, const char* what) {
    return absl::FailedPreconditionError(absl::StrCat(label, ": ", field, " is ", found,
                                                      ", the base model has ", want, " ", what));
  };
  if (cfg.type == AdapterType::kPrefixTuning) {
    // PEFT #1901: with grouped-query attention the prefix has the key/value heads' width.
    const int64_t heads = bc.num_kv_heads;
    const int64_t token_dim = heads * bc.head_dim;
    if (cfg.num_layers != bc.num_layers) {
      return mismatch("num_layers", cfg.num_layers, bc.num_layers, "layers");
    }
    if (cfg.token_dim != token_dim) {
      return mismatch("token_dim", cfg.token_dim, token_dim, "(key/value heads × head_dim)");
    }
    if (cfg.num_attention_heads != heads) {
      return mismatch("num_attention_heads", cfg.num_attention_heads, heads, "key/value heads");
    }
    const std::vector<int64_t> want = {nvt, bc.num_layers * 2 * token_dim};
    if (emb->shape != want) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": prompt_embeddings has shape ", Shape(emb->shape), ", expected ", Shape(want),
          " (num_virtual_tokens, num_layers·2·token_dim)"));
    }
    ASSIGN_OR_RETURN(at::Tensor p, ToTensor(file, *emb, base.options()));
    // [nvt, L·2, heads, d] → [L·2, heads, nvt, d]; row 2ℓ is layer ℓ's keys, 2ℓ+1 its values.
    at::Tensor kv = p.view({nvt, bc.num_layers * 2, heads, bc.head_dim}).permute({1, 2, 0, 3});
    AdapterWeights weights;
    for (int64_t l = 0; l < bc.num_layers; ++l) {
      // In the KV cache's dtype, so that every request's cache shares them as they are.
      weights.prefix.emplace_back(kv[2 * l].to(base.kv_dtype()).contiguous(),
                                  kv[2 * l + 1].to(base.kv_dtype()).contiguous());
      report.bytes += weights.prefix.back().first.nbytes() + weights.prefix.back().second.nbytes();
    }
    return weights;
  }
  if (cfg.token_dim != bc.hidden_size) {
    return mismatch("token_dim", cfg.token_dim, bc.hidden_size, "hidden size");
  }
  const std::vector<int64_t> want = {nvt, bc.hidden_size};
  if (emb->shape != want) {
    return absl::FailedPreconditionError(absl::StrCat(label, ": prompt_embeddings has shape ",
                                                      Shape(emb->shape), ", expected ", Shape(want),
                                                      " (num_virtual_tokens, token_dim)"));
  }
  ASSIGN_OR_RETURN(at::Tensor p, ToTensor(file, *emb, base.options()));
  AdapterWeights weights;
  weights.soft_prompt = p.contiguous();
  report.bytes += weights.soft_prompt.nbytes();
  return weights;
}

// The tokenizer of an adapter that resizes the vocabulary: its folder's tokenizer.json (with
// tokenizer_config.json), or else the base's tokenizer.json with the folder's added_tokens.json
// ({"content": id}) added as transformers' add_tokens adds them (non-special, normalized).
// Without either, token ids past the base's vocabulary can only be sent as ids (a warning).
absl::Status LoadAdapterTokenizer(const std::string& dir, const std::string& label, const core::CausalLm& base,
                                  const AdapterFileRules& rules, AdapterWeights& weights, AdapterReport& report) {
  const core::FileRules limits{rules.root, kMaxAdapterTokenizerBytes};
  std::string json, config;
  if (Exists(dir + "/tokenizer.json")) {
    ASSIGN_OR_RETURN(json, core::ReadFileToString(dir + "/tokenizer.json", limits));
    if (Exists(dir + "/tokenizer_config.json")) {
      ASSIGN_OR_RETURN(config, core::ReadFileToString(dir + "/tokenizer_config.json", limits));
    }
    report.tokenizer = "tokenizer.json";
  } else if (Exists(dir + "/added_tokens.json")) {
    const std::string base_json = rules.base_model_dir + "/tokenizer.json";
    if (rules.base_model_dir.empty() || !Exists(base_json)) {
      return absl::FailedPreconditionError(absl::StrCat(
          label, ": added_tokens.json adds to the base's tokenizer.json, and the base model has none"));
    }
    ASSIGN_OR_RETURN(std::string added_text, core::ReadFileToString(dir + "/added_tokens.json", limits));
    ASSIGN_OR_RETURN(std::string base_text, core::ReadFileToString(base_json, {"", kMaxAdapterTokenizerBytes}));
    if (Exists(rules.base_model_dir + "/tokenizer_config.json")) {
      ASSIGN_OR_RETURN(config, core::ReadFileToString(rules.base_model_dir + "/tokenizer_config.json",
                                                      {"", kMaxAdapterTokenizerBytes}));
    }
    nlohmann::json added = nlohmann::json::parse(added_text, nullptr, /*allow_exceptions=*/false);
    nlohmann::json tok = nlohmann::json::parse(base_text, nullptr, false);
    if (!added.is_object() || tok.is_discarded()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": added_tokens.json is not a JSON object of token: id"));
    }
    ASSIGN_OR_RETURN(auto base_tok, core::Tokenizer::FromJson(base_text, base_json, config));
    std::map<int64_t, std::string> by_id;
    for (const auto& [content, id] : added.items()) {
      if (!id.is_number_integer() || content.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(label, ": added_tokens.json: \"", content,
                                                       "\" must map a non-empty token to an integer id"));
      }
      const int64_t i = id.get<int64_t>();
      if (i >= weights.vocab_size) {
        return absl::FailedPreconditionError(absl::StrCat(label, ": added_tokens.json gives \"", content, "\" id ", i,
                                                          " but the adapter's embeddings have ", weights.vocab_size,
                                                          " rows"));
      }
      if (i < base_tok->vocab_size() || !by_id.emplace(i, content).second) {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": added_tokens.json gives \"", content, "\" id ", i, ", which the base's tokenizer (",
            base_tok->vocab_size(), " ids) or another added token already holds"));
      }
    }
    if (!tok.contains("added_tokens") || !tok["added_tokens"].is_array()) tok["added_tokens"] = nlohmann::json::array();
    for (const auto& [id, content] : by_id) {
      tok["added_tokens"].push_back({{"id", id}, {"content", content}, {"single_word", false}, {"lstrip", false},
                                     {"rstrip", false}, {"normalized", true}, {"special", false}});
    }
    json = tok.dump();
    report.tokenizer = "the base's tokenizer.json with added_tokens.json";
  } else {
    report.warnings.push_back(absl::StrCat(
        "the adapter resizes the vocabulary to ", weights.vocab_size,
        " ids but its folder has no tokenizer.json or added_tokens.json: text is tokenized with the base's "
        "tokenizer, which never produces the new ids"));
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(std::unique_ptr<core::Tokenizer> tokenizer,
                   core::Tokenizer::FromJson(json, absl::StrCat(dir, "/tokenizer.json"), config));
  if (tokenizer->vocab_size() > weights.vocab_size) {
    return absl::FailedPreconditionError(absl::StrCat(
        label, ": its tokenizer has ", tokenizer->vocab_size(), " ids but its embeddings only ", weights.vocab_size,
        " rows"));
  }
  for (int32_t id = static_cast<int32_t>(base.config().vocab_size); id < tokenizer->vocab_size(); ++id) {
    auto text = tokenizer->Decode({id}, /*skip_special_tokens=*/false);
    if (text.ok() && !text->empty()) report.added_tokens.push_back(*text);
  }
  weights.tokenizer = std::move(tokenizer);
  return absl::OkStatus();
}

}  // namespace

std::vector<BaseModule> BaseModules(const core::ModelConfig& config) {
  using core::Projection;
  std::vector<BaseModule> out;
  for (int64_t i = 0; i < config.num_layers; ++i) {
    if (config.architecture == core::Architecture::kGpt2) {
      const std::string pre = absl::StrCat("transformer.h.", i, ".");
      out.push_back({pre + "attn.c_attn", i, Projection::kCAttn, true});
      out.push_back({pre + "attn.c_proj", i, Projection::kAttnOut, true});
      out.push_back({pre + "mlp.c_fc", i, Projection::kFc, true});
      out.push_back({pre + "mlp.c_proj", i, Projection::kMlpOut, true});
    } else {
      const std::string pre = absl::StrCat("model.layers.", i, ".");
      out.push_back({pre + "self_attn.q_proj", i, Projection::kQ, true});
      out.push_back({pre + "self_attn.k_proj", i, Projection::kK, true});
      out.push_back({pre + "self_attn.v_proj", i, Projection::kV, true});
      out.push_back({pre + "self_attn.o_proj", i, Projection::kO, true});
      out.push_back({pre + "mlp.gate_proj", i, Projection::kGate, true});
      out.push_back({pre + "mlp.up_proj", i, Projection::kUp, true});
      out.push_back({pre + "mlp.down_proj", i, Projection::kDown, true});
    }
  }
  out.push_back({"lm_head", core::OutputLayer(config), Projection::kLmHead, true, true, false});
  out.push_back({InputEmbeddingModule(config), -1, Projection::kQ, true, false, true});
  return out;
}

absl::StatusOr<bool> IsTargeted(const AdapterConfig& c, const core::ModelConfig& base,
                                const BaseModule& m) {
  const std::string& key = m.name;
  auto in_list = [&](const std::vector<std::string>& list) {
    for (const std::string& t : list) {
      if (key == t || absl::EndsWith(key, "." + t)) return true;
    }
    return false;
  };
  if (in_list(c.exclude_list)) return false;
  if (c.exclude_regex) {
    ASSIGN_OR_RETURN(bool excluded, FullMatch(*c.exclude_regex, key, "exclude_modules"));
    if (excluded) return false;
  }
  if (c.target_regex) return FullMatch(*c.target_regex, key, "target_modules");
  if (c.target_all_linear) return m.supported && !m.output && !m.embedding;  // Linear/Conv1D but the output layer.
  std::vector<std::string> targets;
  if (c.target_list) {
    targets = *c.target_list;
  } else if (base.architecture == core::Architecture::kGpt2) {
    targets = {"c_attn"};
  } else {
    targets = {"q_proj", "v_proj"};
  }
  if (!in_list(targets)) return false;
  if (!c.layers_to_transform) return true;
  ASSIGN_OR_RETURN(std::optional<int64_t> index, LayerIndex(key, c.layers_pattern));
  if (!index) return false;
  return std::count(c.layers_to_transform->begin(), c.layers_to_transform->end(), *index) > 0;
}

absl::StatusOr<std::shared_ptr<const Adapter>> LoadAdapter(const std::string& dir,
                                                           const std::string& name,
                                                           const core::CausalLm& base,
                                                           AdapterReport* report,
                                                           const AdapterFileRules& rules) {
  const auto start = std::chrono::steady_clock::now();
  *report = AdapterReport();
  report->name = name;
  report->path = dir;
  report->compute_dtype = c10::toString(base.options().dtype().toScalarType());
  auto finish = [&] {
    report->load_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (report->bf16_modules > 0) {
      absl::StrAppend(&report->compute_dtype, " (LoRA factors of ", report->bf16_modules,
                      " modules held in BFloat16");
      if (report->bf16_rounded_modules > 0) {
        absl::StrAppend(&report->compute_dtype, ", ", report->bf16_rounded_modules,
                        " of them rounded from their file's dtype by --adapter_dtype bfloat16");
      }
      report->compute_dtype += ")";
    }
  };
  const std::string config_path = dir + "/adapter_config.json";
  ASSIGN_OR_RETURN(std::string text,
                   core::ReadFileToString(config_path, {rules.root, kMaxAdapterConfigBytes}));
  ASSIGN_OR_RETURN(AdapterConfig cfg, AdapterConfig::FromJson(text, config_path));
  report->type = AdapterTypeName(cfg.type);
  report->base_model_name_or_path = cfg.base_model_name_or_path;
  const std::string& base_name = base.config().name_or_path;
  if (!cfg.base_model_name_or_path.empty() && !base_name.empty() &&
      cfg.base_model_name_or_path != base_name) {
    report->warnings.push_back(absl::StrCat("trained on \"", cfg.base_model_name_or_path,
                                            "\" but the loaded base is \"", base_name, "\""));
  }
  const std::string weights_path = dir + "/adapter_model.safetensors";
  if (!Exists(weights_path)) {
    if (Exists(dir + "/adapter_model.bin")) {
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": only a pickled adapter_model.bin is present; adapterd loads "
               "adapter_model.safetensors only (save with safe_serialization=True)"));
    }
    return absl::NotFoundError(absl::StrCat(weights_path, ": no such file"));
  }
  // Read, not mapped: a file truncated or rewritten during the load cannot fault the process.
  ASSIGN_OR_RETURN(auto file,
                   core::SafetensorsFile::Open(weights_path, {rules.root, rules.max_weight_bytes},
                                               core::SafetensorsFile::Mode::kRead));
  for (const core::TensorInfo& t : file->tensors()) {
    report->file_bytes_by_dtype[std::string(core::DTypeName(t.dtype))] +=
        static_cast<int64_t>(t.NumBytes());
  }
  absl::StatusOr<AdapterWeights> weights;
  try {
    const std::string label = absl::StrCat("adapter \"", name, "\"");
    AdapterWeights saved;
    std::set<std::string> consumed;
    absl::Status s = absl::OkStatus();
    if (cfg.type == AdapterType::kLora || cfg.type == AdapterType::kIa3) {
      s = LoadSavedModules(cfg, *file, base, label, saved, *report, consumed);
    }
    const int64_t vocab = saved.vocab_size > 0 ? saved.vocab_size : base.config().vocab_size;
    if (!s.ok()) {
      weights = s;
    } else if (cfg.type == AdapterType::kLora) {
      weights = LoadLora(cfg, *file, base, name, rules.bf16_factors, consumed, vocab, *report);
    } else if (cfg.type == AdapterType::kIa3) {
      weights = LoadIa3(cfg, *file, base, name, consumed, *report);
    } else {
      weights = LoadPromptLearning(cfg, *file, base, name, *report);
    }
    if (weights.ok()) {
      weights->input_embedding = std::move(saved.input_embedding);
      weights->output_embedding = std::move(saved.output_embedding);
      weights->vocab_size = saved.vocab_size;
      if (saved.vocab_size > 0) {
        absl::Status t = LoadAdapterTokenizer(dir, label, base, rules, *weights, *report);
        if (!t.ok()) weights = t;
      }
    }
  } catch (const std::exception& e) {
    weights = absl::InternalError(
        absl::StrCat(dir, ": converting adapter weights failed: ", core::TorchErrorMessage(e)));
  }
  finish();
  if (!weights.ok()) return weights.status();
  return std::make_shared<const Adapter>(*report, *std::move(weights));
}

absl::StatusOr<AdapterRef> LoadAdapterFor(const core::Engine& engine, const std::string& dir,
                                          const std::string& name, AdapterReport* report,
                                          const AdapterFileRules& rules) {
  return LoadAdapter(dir, name, engine.model(), report, rules);
}

const AdapterReport& ReportOf(const AdapterRef& adapter) { return adapter->report(); }

const core::Tokenizer* TokenizerOf(const AdapterRef& adapter) {
  return adapter == nullptr ? nullptr : adapter->tokenizer();
}

std::shared_ptr<const core::SequenceAdapter> ForSequence(AdapterRef adapter) { return adapter; }

}  // namespace adapterd::adapters
