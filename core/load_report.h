// What loading a base model found and did: the report an operator reads before trusting a
// model. `adapterd inspect` prints it; the admin API returns the same structure as JSON.
//
// Thread-safety: a plain value; immutable once the loader returns it.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nlohmann/json_fwd.hpp"

namespace adapterd::core {

struct ShapeMismatch {
  std::string name;
  std::vector<int64_t> expected;
  std::vector<int64_t> found;
};

// An output parameter that shares the storage of an input parameter.
struct TiedPair {
  std::string target;  // e.g. "lm_head.weight"
  std::string source;  // e.g. "model.embed_tokens.weight"
  bool same_storage = false;  // Verified on the materialised tensors, not assumed.
  int64_t bytes_saved = 0;
};

struct LoadReport {
  std::string model_dir;
  std::string architecture;
  std::string model_type;
  std::string name_or_path;
  std::vector<std::string> files;  // Safetensors files read, in order.

  std::vector<std::string> missing;     // Declared by the architecture, absent from the files.
  std::vector<std::string> unexpected;  // In the files, unknown to the architecture.
  std::vector<std::string> ignored;     // Known legacy buffers skipped (rotary inv_freq, ...).
  std::vector<ShapeMismatch> mismatched;
  std::vector<TiedPair> tied;
  std::vector<std::string> warnings;

  int64_t declared_parameters = 0;      // Tensors the architecture declares.
  int64_t materialized_parameters = 0;  // Of those, present with the declared shape.
  int64_t parameter_count = 0;          // Elements, counting tied storage once.
  std::map<std::string, int64_t> file_bytes_by_dtype;  // As stored, e.g. {"BF16": 123}.
  int64_t bytes_mapped = 0;  // Served zero-copy from the memory map.
  int64_t bytes_copied = 0;  // Converted or copied (dtype, alignment or device).
  // Of the weight files' images (mapped, or read into private memory with --mmap=false), the
  // bytes held and those the process maps with 2 MiB pages at the end of the load (a decode
  // step streams every weight: 4 KiB pages cost it page-table walks from memory).
  int64_t bytes_files_held = 0;
  int64_t bytes_huge_pages = 0;
  // Of the mapped files, the bytes dropped from the page cache (held there in small folios) and
  // read again to get 2 MiB pages (--mmap_refresh_small_pages).
  int64_t bytes_reread = 0;
  std::string compute_dtype;  // Of the activations: "float32", "bfloat16" or "float16".
  // Of the weight matrices: the compute dtype, or "bfloat16" when served in place under
  // float32 activations (--dtype auto).
  std::string weights_dtype;
  std::string kv_cache_dtype;  // The KV cache's dtype (--kv_cache_dtype), e.g. "bfloat16".
  // --matmul_precision as given ("highest" when empty), and whether bfloat16 products are in
  // effect: medium, bfloat16 matrices computed in float32, the CPU kernels on a CPU with
  // AVX-512 BF16 (otherwise medium computes as highest).
  std::string matmul_precision;
  bool bf16_products = false;
  // --quantize: "none", "int8" (inputs quantized too), "int8_weight_only" or "bf16_packed".
  // Otherwise, the matrices copied (every projection and lm_head), their bytes as held before and
  // the copies' bytes (int8: values and scales; bf16_packed: codes, low bytes, tables and escapes).
  std::string quantization = "none";
  int64_t quantized_tensors = 0;
  int64_t quantized_source_bytes = 0;
  int64_t quantized_bytes = 0;
  std::string device;
  std::vector<std::string> conversions;  // e.g. "BF16 -> F32: 57 tensors".
  double load_seconds = 0;

  // True when the model may serve: nothing missing or mismatched, every declared parameter
  // materialised.
  bool ok() const {
    return missing.empty() && mismatched.empty() &&
           materialized_parameters == declared_parameters;
  }

  nlohmann::json ToJson() const;
  // Returns a human-readable multi-line rendering.
  std::string ToText() const;
};

}  // namespace adapterd::core
