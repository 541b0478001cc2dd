#include "core/model_loader.h"

#include <sys/mman.h>
#include <unistd.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <set>
#include <thread>
#include <unordered_set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/status_macros.h"
#include "core/torch_error.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data is little-endian");

namespace adapterd::core {
namespace {

absl::StatusOr<at::ScalarType> ToScalarType(DType d) {
  switch (d) {
    case DType::kBool: return at::kBool;
    case DType::kU8: return at::kByte;
    case DType::kI8: return at::kChar;
    case DType::kI16: return at::kShort;
    case DType::kF16: return at::kHalf;
    case DType::kBF16: return at::kBFloat16;
    case DType::kI32: return at::kInt;
    case DType::kF32: return at::kFloat;
    case DType::kF64: return at::kDouble;
    case DType::kI64: return at::kLong;
    case DType::kC64: return at::kComplexFloat;
    default:
      return absl::UnimplementedError(
          absl::StrCat("dtype ", DTypeName(d), " cannot be loaded by this LibTorch"));
  }
}

// True when every value of `t` is finite. CPU tensors of float32, bfloat16 or float16 with
// contiguous storage are scanned over their bits, with no temporaries: a value is NaN or
// infinite exactly when its exponent bits are all ones. (at::isfinite allocates several
// tensors of the input's size and ran at about 8.7 s per GB of bfloat16 here, most of the 8B
// shape's load.) Large tensors are split over plain threads, one per intra-op thread: std::thread
// rather than at::parallel_for, whose OpenMP fork and join ThreadSanitizer cannot see. Other
// tensors go through at::isfinite.
template <typename Bits>
bool BitsFinite(const at::Tensor& t, Bits mask) {
  const Bits* p = static_cast<const Bits*>(t.data_ptr());
  auto scan = [p, mask](int64_t begin, int64_t end) {
    Bits any = 0;  // Becomes non-zero at the first non-finite value.
    for (int64_t i = begin; i < end; ++i) any |= static_cast<Bits>((p[i] & mask) == mask);
    return any == 0;
  };
  const int64_t n = t.numel();
  constexpr int64_t kPerThread = int64_t{1} << 18;  // A thread costs far less than 256K values.
  const int64_t threads = std::min<int64_t>(std::max(at::get_num_threads(), 1), n / kPerThread);
  if (threads < 2) return scan(0, n);
  std::vector<char> ok(static_cast<size_t>(threads), 0);
  std::vector<std::thread> pool;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t i = 1; i < threads; ++i) {
    pool.emplace_back([&, i] { ok[static_cast<size_t>(i)] = scan(i * chunk, std::min(n, (i + 1) * chunk)); });
  }
  ok[0] = scan(0, chunk);
  for (std::thread& th : pool) th.join();
  return std::all_of(ok.begin(), ok.end(), [](char c) { return c != 0; });
}

bool AllFinite(const at::Tensor& t) {
  if (t.device().is_cpu() && t.is_contiguous()) {
    switch (t.scalar_type()) {
      case at::kFloat: return BitsFinite<uint32_t>(t, 0x7F800000u);
      case at::kBFloat16: return BitsFinite<uint16_t>(t, 0x7F80u);
      case at::kHalf: return BitsFinite<uint16_t>(t, 0x7C00u);
      default: break;
    }
  }
  return at::isfinite(t).all().item<bool>();
}

// Legacy buffers transformers ignores on load (non-persistent or obsolete).
bool IsIgnoredKey(const std::string& name) {
  return absl::EndsWith(name, "rotary_emb.inv_freq") || absl::EndsWith(name, ".attn.bias") ||
         absl::EndsWith(name, ".attn.masked_bias");
}

struct TensorStats {
  int64_t mapped = 0;
  int64_t copied = 0;
  std::map<std::string, std::pair<int64_t, int64_t>> conversions;  // "BF16 -> F32" → n, bytes
};

// Returns the tensor as `options` wants it: a view of the mapping when dtype, alignment and
// device allow, a converted copy otherwise.
absl::StatusOr<at::Tensor> Materialize(const Checkpoint::Entry& e, const at::TensorOptions& options,
                                       TensorStats& stats) {
  ASSIGN_OR_RETURN(at::ScalarType stored, ToScalarType(e.info->dtype));
  const uint8_t* data = e.file->Data(*e.info);
  const int64_t elem = static_cast<int64_t>(at::elementSize(stored));
  const bool aligned = reinterpret_cast<uintptr_t>(data) % elem == 0;
  std::shared_ptr<const SafetensorsFile> keep = e.file;
  at::Tensor view;
  if (aligned) {
    view = at::from_blob(const_cast<uint8_t*>(data), e.info->shape,
                         [keep](void*) mutable { keep.reset(); }, at::TensorOptions(stored));
  } else {
    // from_blob needs element alignment: go through an aligned byte copy.
    at::Tensor bytes = at::empty({static_cast<int64_t>(e.info->NumBytes())}, at::kByte);
    std::memcpy(bytes.data_ptr(), data, e.info->NumBytes());
    view = bytes.view(stored).view(e.info->shape);
  }
  const bool zero_copy = aligned && stored == options.dtype().toScalarType() &&
                         options.device().is_cpu();
  if (zero_copy) {
    stats.mapped += static_cast<int64_t>(e.info->NumBytes());
    return view;
  }
  at::Tensor out = view.to(options.device(), options.dtype().toScalarType(), /*non_blocking=*/false,
                           /*copy=*/true);
  stats.copied += out.nbytes();
  if (stored != options.dtype().toScalarType()) {
    auto& c = stats.conversions[absl::StrCat(DTypeName(e.info->dtype), " -> ",
                                             c10::toString(options.dtype().toScalarType()))];
    c.first += 1;
    c.second += out.nbytes();
  }
  return out;
}

std::string ScalarTypeName(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    default: return c10::toString(t);
  }
}

}  // namespace

absl::StatusOr<at::TensorOptions> ComputeOptions(const LoadOptions& options) {
  at::ScalarType dtype;
  if (options.compute_dtype == "float32" || options.compute_dtype == "auto") {
    dtype = at::kFloat;
  } else if (options.compute_dtype == "float16") {
    dtype = at::kHalf;
  } else if (options.compute_dtype == "bfloat16") {
    dtype = at::kBFloat16;
  } else {
    return absl::InvalidArgumentError(absl::StrCat("compute dtype \"", options.compute_dtype,
                                                   "\" is not one of auto, float32, float16, bfloat16"));
  }
  try {
    return at::TensorOptions().dtype(dtype).device(at::Device(options.device));
  } catch (const std::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("device \"", options.device,
                                                   "\" is not a valid device: ", TorchErrorMessage(e)));
  }
}

namespace {

// Drops this process's resident pages of `t` when it is a view of one of the checkpoint's file
// mappings (never of memory it owns, which MADV_DONTNEED would zero): only whole pages inside
// the tensor, so a neighbour's bytes stay mapped.
void ReleaseMappedPages(const Checkpoint& ckpt, const at::Tensor& t) {
  if (!t.defined() || !t.device().is_cpu()) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  for (const auto& f : ckpt.files()) {
    if (!f->mapped()) continue;
    const auto base = reinterpret_cast<uintptr_t>(f->base());
    if (begin < base || end > base + f->file_size()) continue;
    const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
    const uintptr_t first = (begin + page - 1) & ~(page - 1), last = end & ~(page - 1);
    if (last > first) ::madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
    return;
  }
}

}  // namespace

std::optional<TiedPair> TieWeights(const ModelConfig& config, WeightMap& weights) {
  if (!config.tie_word_embeddings) return std::nullopt;
  const std::string source = InputEmbeddingName(config);
  auto src = weights.find(source);
  if (src == weights.end() || !src->second.defined()) return std::nullopt;
  at::Tensor& target = weights[kOutputEmbeddingName];
  if (target.defined() && !target.is_same(src->second)) return std::nullopt;  // Kept apart.
  target = src->second;
  TiedPair pair;
  pair.target = kOutputEmbeddingName;
  pair.source = source;
  pair.same_storage = target.data_ptr() == src->second.data_ptr();
  pair.bytes_saved = pair.same_storage ? target.nbytes() : 0;
  return pair;
}

absl::StatusOr<std::unique_ptr<CausalLm>> LoadModel(const std::string& dir,
                                                    const LoadOptions& options,
                                                    LoadReport* report) {
  const auto start = std::chrono::steady_clock::now();
  *report = LoadReport();
  report->model_dir = dir;
  report->compute_dtype = options.compute_dtype;
  report->device = options.device;
  ASSIGN_OR_RETURN(at::TensorOptions tensor_options, ComputeOptions(options));
  // "w8a8" (its earlier name) is "int8".
  const std::string quantize = options.quantize == "w8a8" ? "int8" : options.quantize;
  if (quantize != "none" && quantize != "int8" && quantize != "int8_weight_only" &&
      quantize != "bf16_packed") {
    return absl::InvalidArgumentError(
        absl::StrCat("quantize must be none, int8, int8_weight_only or bf16_packed, got \"",
                     options.quantize, "\""));
  }
  if (quantize != "none" && tensor_options.dtype().toScalarType() != at::kFloat) {
    return absl::InvalidArgumentError(absl::StrCat("quantize ", quantize,
                                                   " needs float32 activations (dtype auto or float32), not ",
                                                   options.compute_dtype));
  }
  report->compute_dtype = ScalarTypeName(tensor_options.dtype().toScalarType());
  report->weights_dtype = report->compute_dtype;
  ASSIGN_OR_RETURN(ModelConfig config, ModelConfig::Load(dir));
  report->architecture = config.architecture_name;
  report->model_type = config.model_type;
  report->name_or_path = config.name_or_path;
  ASSIGN_OR_RETURN(Checkpoint ckpt,
                   Checkpoint::Open(dir,
                                    options.map_weights ? SafetensorsFile::Mode::kMapGuarded
                                                        : SafetensorsFile::Mode::kRead,
                                    options.refresh_small_pages));
  for (const auto& f : ckpt.files()) {
    report->files.push_back(f->path());
    for (const TensorInfo& t : f->tensors()) {
      report->file_bytes_by_dtype[std::string(DTypeName(t.dtype))] +=
          static_cast<int64_t>(t.NumBytes());
    }
  }

  // Reconcile names: GPT-2 checkpoints saved without the "transformer." prefix (as the
  // original openai-community/gpt2 is) are matched to the prefixed names.
  const std::vector<ParamSpec> declared = DeclareParameters(config);
  std::map<std::string, const Checkpoint::Entry*> by_canonical;
  bool has_prefix = config.architecture != Architecture::kGpt2;
  for (const auto& [name, entry] : ckpt.entries()) {
    if (absl::StartsWith(name, "transformer.")) has_prefix = true;
  }
  std::set<std::string> declared_names;
  for (const ParamSpec& p : declared) declared_names.insert(p.name);
  for (const auto& [name, entry] : ckpt.entries()) {
    std::string canonical = name;
    if (!has_prefix && name != kOutputEmbeddingName) canonical = "transformer." + name;
    if (declared_names.count(canonical)) {
      by_canonical[canonical] = &entry;
    } else if (IsIgnoredKey(name)) {
      report->ignored.push_back(name);
    } else {
      report->unexpected.push_back(name);
    }
  }
  const std::string input_embedding = InputEmbeddingName(config);
  const bool tie_output = config.tie_word_embeddings && !by_canonical.count(kOutputEmbeddingName);
  if (config.tie_word_embeddings && by_canonical.count(kOutputEmbeddingName)) {
    report->warnings.push_back(absl::StrCat(
        "tie_word_embeddings is true but the checkpoint holds its own ", kOutputEmbeddingName,
        "; it is kept untied (transformers v5 behaviour)"));
  }
  for (const ParamSpec& p : declared) {
    auto it = by_canonical.find(p.name);
    if (it == by_canonical.end()) {
      if (!(tie_output && p.name == kOutputEmbeddingName)) report->missing.push_back(p.name);
      continue;
    }
    if (it->second->info->shape != p.shape) {
      report->mismatched.push_back({p.name, p.shape, it->second->info->shape});
    }
  }
  if (!report->unexpected.empty()) {
    report->warnings.push_back(absl::StrCat(report->unexpected.size(),
                                            " tensors in the checkpoint are not used by ",
                                            config.architecture_name));
  }
  report->declared_parameters = static_cast<int64_t>(declared.size());
  auto finish = [&] {
    report->load_seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  if (!report->missing.empty() || !report->mismatched.empty()) {
    finish();
    std::vector<std::string> problems;
    for (const std::string& m : report->missing) problems.push_back("missing " + m);
    for (const ShapeMismatch& m : report->mismatched) {
      problems.push_back(absl::StrCat("shape of ", m.name, " is [", absl::StrJoin(m.found, ","),
                                      "], expected [", absl::StrJoin(m.expected, ","), "]"));
    }
    // The report lists every name; the message stays readable.
    constexpr size_t kShown = 20;
    const size_t total = problems.size();
    if (total > kShown) problems.resize(kShown);
    return absl::FailedPreconditionError(absl::StrCat(
        dir, ": checkpoint does not fit ", config.architecture_name, ": ",
        absl::StrJoin(problems, "; "),
        total > kShown ? absl::StrCat("; and ", total - kShown, " more") : ""));
  }

  WeightMap weights;
  TensorStats stats;
  // --dtype auto: the weight matrices stored in bfloat16 or float16 stay so (GPT-2's Conv1D
  // matrices are [in, out], a layout the kernels do not read: they are converted).
  const bool keep_half = options.compute_dtype == "auto" && config.architecture != Architecture::kGpt2;
  std::set<at::ScalarType> kept;
  try {
    for (const auto& [name, entry] : by_canonical) {
      const bool half = entry->info->dtype == DType::kBF16 || entry->info->dtype == DType::kF16;
      const bool keep = keep_half && half && entry->info->shape.size() == 2;
      const at::ScalarType stored = entry->info->dtype == DType::kBF16 ? at::kBFloat16 : at::kHalf;
      if (keep) kept.insert(stored);
      auto tensor = Materialize(*entry, keep ? tensor_options.dtype(stored) : tensor_options, stats);
      if (!tensor.ok()) {
        finish();
        return absl::Status(tensor.status().code(),
                            absl::StrCat(entry->file->path(), ": tensor \"", entry->info->name,
                                         "\": ", tensor.status().message()));
      }
      if (!AllFinite(*tensor)) {
        finish();
        return absl::InvalidArgumentError(absl::StrCat(entry->file->path(), ": tensor \"",
                                                       entry->info->name,
                                                       "\" holds NaN or infinite values"));
      }
      weights[name] = *std::move(tensor);
    }
  } catch (const std::exception& e) {
    finish();
    return absl::InternalError(absl::StrCat(dir, ": materialising tensors failed: ", TorchErrorMessage(e)));
  }
  if (tie_output) {
    if (auto pair = TieWeights(config, weights)) report->tied.push_back(*pair);
  }
  // The report names the dtypes the matrices are served in ("bfloat16"; a checkpoint mixing
  // bfloat16 and float16 matrices is served as stored all the same, named "float16+bfloat16",
  // and its KV cache takes float16, the first).
  if (!kept.empty()) {
    std::vector<std::string> names;
    for (at::ScalarType t : kept) names.push_back(ScalarTypeName(t));
    report->weights_dtype = absl::StrJoin(names, "+");
  }
  report->bytes_mapped = stats.mapped;
  report->bytes_copied = stats.copied;
  for (const auto& [what, nb] : stats.conversions) {
    report->conversions.push_back(
        absl::StrCat(what, ": ", nb.first, " tensors, ", nb.second, " bytes"));
  }
  std::unordered_set<const void*> storages;
  for (const ParamSpec& p : declared) {
    auto it = weights.find(p.name);
    if (it == weights.end() || !it->second.defined() ||
        it->second.sizes().vec() != p.shape) {
      continue;
    }
    ++report->materialized_parameters;
    if (storages.insert(it->second.data_ptr()).second) report->parameter_count += it->second.numel();
  }
  if (report->materialized_parameters != report->declared_parameters) {
    finish();
    return absl::InternalError(absl::StrCat(
        dir, ": only ", report->materialized_parameters, " of ", report->declared_parameters,
        " declared parameters were materialised"));
  }
  std::unique_ptr<CausalLm> model;
  try {
    model = config.architecture == Architecture::kGpt2
                ? BuildGpt2(config, weights, tensor_options)
                : BuildLlama(config, weights, tensor_options);
  } catch (const std::exception& e) {
    finish();
    return absl::InternalError(absl::StrCat(dir, ": building the model failed: ", TorchErrorMessage(e)));
  }
  // The KV cache defaults to the dtype the weights are served in. Quantized float32 weights
  // take a float16 cache, as llama.cpp's default cache is beside its Q8_0 weights: the
  // rounding of keys and values (measured with the reference, tests/bench/int8_fidelity.py)
  // is a small fraction of int8's own error, and a decode step reads half the cache bytes.
  if (!kept.empty()) {
    model->set_kv_dtype(*kept.begin());
  } else if ((quantize == "int8" || quantize == "int8_weight_only") &&
             model->kv_dtype() == at::kFloat) {
    model->set_kv_dtype(at::kHalf);
  }
  if (quantize != "none") {
    CausalLm::CompactSummary summary;
    // Matrices read in place from the mapping give their pages back as soon as they are
    // copied: the forward pass no longer touches them (the loader's scan did), and an
    // adapter that reads one later faults it back in from the page cache. The input embedding
    // (a tied lm_head's storage) is still looked up, so it stays.
    const void* embedding = weights.count(input_embedding) ? weights[input_embedding].data_ptr() : nullptr;
    auto release = [&](const at::Tensor& t) {
      if (t.data_ptr() != embedding) ReleaseMappedPages(ckpt, t);
    };
    bool done = false;
    try {
      using Compaction = CausalLm::Compaction;
      const Compaction how = quantize == "int8"               ? Compaction::kW8A8
                             : quantize == "int8_weight_only" ? Compaction::kInt8WeightOnly
                                                              : Compaction::kBf16Packed;
      done = model->Compact(how, &summary, release);
    } catch (const std::exception& e) {
      finish();
      return absl::InternalError(
          absl::StrCat(dir, ": --quantize ", quantize, " failed: ", TorchErrorMessage(e)));
    }
    if (!done && quantize == "bf16_packed") {
      finish();
      return absl::FailedPreconditionError(
          absl::StrCat(dir,
                       ": --quantize bf16_packed packs Llama-family models served in bfloat16 on "
                       "the CPU (a bfloat16 "
                       "checkpoint with --dtype auto or bfloat16 weights kept) whose matrices' "
                       "input widths are multiples of "
                       "128; this one is ",
                       config.architecture_name, " (hidden ", config.hidden_size, ") with ",
                       report->weights_dtype, " weights"));
    }
    if (!done) {
      finish();
      return absl::FailedPreconditionError(absl::StrCat(
          dir, ": --quantize ", quantize,
          " serves Llama-family models whose matrices' input widths are multiples of 32; ",
          config.architecture_name, " (hidden ", config.hidden_size, ") is not one"));
    }
    report->quantization = quantize;
    report->quantized_tensors = summary.matrices;
    report->quantized_source_bytes = summary.source_bytes;
    report->quantized_bytes = summary.bytes;
  }
  // Counted last: the scan above touched every weight, and quantizing gave pages back.
  for (const auto& f : ckpt.files()) {
    report->bytes_files_held += static_cast<int64_t>(f->file_size());
    report->bytes_huge_pages += static_cast<int64_t>(f->HugePageBytes());
    report->bytes_reread += static_cast<int64_t>(f->reread_bytes());
  }
  finish();
  return model;
}

}  // namespace adapterd::core
