// Loads a Hugging Face model folder into a CausalLm: config, safetensors (zero-copy where the
// stored dtype, alignment and device allow), key reconciliation against the architecture's
// declared parameters, weight tying, and the LoadReport that proves what happened.
//
// Thread-safety: LoadModel is reentrant; the returned model is immutable.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/causal_lm.h"
#include "core/load_report.h"
#include "core/model_config.h"

namespace adapterd::core {

struct LoadOptions {
  std::string device = "cpu";           // Any device string LibTorch accepts ("cuda:0", ...).
  // float32 | float16 | bfloat16 | auto. "auto": activations in float32, and the weight
  // matrices of a Llama-family checkpoint stored in bfloat16 or float16 served in place from
  // the mapping (the CPU kernels widen them in registers; see LinearForward); its other tensors
  // (norms, biases) and every other dtype are converted to float32. The KV cache then defaults
  // to the matrices' dtype. float32 converts every tensor.
  std::string compute_dtype = "float32";
  // Map the weight files (zero copy; update them only by atomic rename while serving), or
  // read them into private memory (immune to any later change of the files).
  bool map_weights = true;
  // With map_weights: when the page cache holds a weight file in small folios (just written or
  // copied), so that under half of it would be mapped with 2 MiB pages, drop it from the cache
  // and read it again in 2 MiB folios (SafetensorsFile::Open). Costs one read of that file.
  bool refresh_small_pages = true;
  // "none" | "int8" | "int8_weight_only" ("w8a8": "int8") | "bf16_packed": serve every projection
  // matrix and lm_head of a Llama-family model from a compact copy (CausalLm::Compact) made here
  // from the loaded weights: int8, where int8 quantizes each projection's input rows too and sums
  // the products in int32 (w8a8) and int8_weight_only multiplies float32 inputs by the
  // dequantized weights; or bf16_packed, bfloat16 weights (kept in place) packed losslessly into
  // 12 bits (cpu::PackBf16), computing exactly what they would unpacked. Needs float32
  // activations (compute_dtype float32 or auto). The originals stay available to adapters;
  // those read in place from the mapping give their resident pages back to the page cache.
  std::string quantize = "none";
};

// Parses LoadOptions' strings into tensor options (the compute dtype: float32 for "auto").
absl::StatusOr<at::TensorOptions> ComputeOptions(const LoadOptions& options);

// Ties the output projection to the input embedding when the config asks for it and the
// checkpoint did not supply its own: both names then hold one tensor (same storage). Calling
// it again changes nothing. Returns the pair when tied.
std::optional<TiedPair> TieWeights(const ModelConfig& config, WeightMap& weights);

// Loads the model in `dir`. `report` is always filled, also when loading is refused (missing
// or mismatched keys → FailedPrecondition listing every offending name).
absl::StatusOr<std::unique_ptr<CausalLm>> LoadModel(const std::string& dir,
                                                    const LoadOptions& options,
                                                    LoadReport* report);

}  // namespace adapterd::core
