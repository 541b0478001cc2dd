#include "core/load_report.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace adapterd::core {

nlohmann::json LoadReport::ToJson() const {
  nlohmann::json j;
  j["ok"] = ok();
  j["model_dir"] = model_dir;
  j["architecture"] = architecture;
  j["model_type"] = model_type;
  j["name_or_path"] = name_or_path;
  j["files"] = files;
  j["missing"] = missing;
  j["unexpected"] = unexpected;
  j["ignored"] = ignored;
  j["mismatched"] = nlohmann::json::array();
  for (const ShapeMismatch& m : mismatched) {
    j["mismatched"].push_back({{"name", m.name}, {"expected", m.expected}, {"found", m.found}});
  }
  j["tied"] = nlohmann::json::array();
  for (const TiedPair& t : tied) {
    j["tied"].push_back({{"target", t.target},
                         {"source", t.source},
                         {"same_storage", t.same_storage},
                         {"bytes_saved", t.bytes_saved}});
  }
  j["warnings"] = warnings;
  j["declared_parameters"] = declared_parameters;
  j["materialized_parameters"] = materialized_parameters;
  j["parameter_count"] = parameter_count;
  j["file_bytes_by_dtype"] = file_bytes_by_dtype;
  j["bytes_mapped"] = bytes_mapped;
  j["bytes_copied"] = bytes_copied;
  j["bytes_files_held"] = bytes_files_held;
  j["bytes_huge_pages"] = bytes_huge_pages;
  j["bytes_reread"] = bytes_reread;
  j["compute_dtype"] = compute_dtype;
  j["weights_dtype"] = weights_dtype;
  j["kv_cache_dtype"] = kv_cache_dtype;
  j["matmul_precision"] = matmul_precision.empty() ? std::string("highest") : matmul_precision;
  j["bf16_products"] = bf16_products;
  j["quantization"] = quantization;
  j["quantized_tensors"] = quantized_tensors;
  j["quantized_source_bytes"] = quantized_source_bytes;
  j["quantized_bytes"] = quantized_bytes;
  j["device"] = device;
  j["conversions"] = conversions;
  j["load_seconds"] = load_seconds;
  return j;
}

std::string LoadReport::ToText() const {
  std::string out;
  absl::StrAppend(&out, "model        ", model_dir, "\n");
  absl::StrAppend(&out, "architecture ", architecture, " (", model_type, ")",
                  name_or_path.empty() ? "" : absl::StrCat(" from ", name_or_path), "\n");
  absl::StrAppend(&out, "status       ", ok() ? "OK" : "REFUSED", "\n");
  absl::StrAppend(&out, "files        ", absl::StrJoin(files, ", "), "\n");
  absl::StrAppend(&out, "parameters   ", parameter_count, " elements in ", materialized_parameters,
                  "/", declared_parameters, " declared tensors\n");
  for (const auto& [dtype, bytes] : file_bytes_by_dtype) {
    absl::StrAppend(&out, "stored       ", dtype, ": ", bytes, " bytes\n");
  }
  absl::StrAppend(&out, "memory       ", bytes_mapped, " bytes mapped zero-copy, ", bytes_copied,
                  " bytes copied\n");
  if (bytes_files_held > 0) {
    absl::StrAppend(
        &out, "pages        ", bytes_huge_pages, " of the weight files' ", bytes_files_held,
        " bytes in 2 MiB pages",
        absl::StrFormat(" (%.0f%%", 100.0 * static_cast<double>(bytes_huge_pages) /
                                        static_cast<double>(bytes_files_held)),
        bytes_reread > 0
            ? absl::StrCat("; ", bytes_reread,
                           " bytes held in small pages by the page cache were read again")
            : "",
        ")\n");
  }
  absl::StrAppend(&out, "compute      ", compute_dtype, " on ", device, "\n");
  const bool quantized = quantization != "none" && !quantization.empty();
  if (!weights_dtype.empty() && weights_dtype != compute_dtype) {
    const std::string how =
        quantized
            ? std::string(quantization == "bf16_packed"
                              ? "embedding read in place; projections and lm_head packed below"
                              : "embedding read in place; projections and lm_head quantized below")
            : absl::StrCat("matrices read in place, widened to ", compute_dtype);
    absl::StrAppend(&out, "weights      ", weights_dtype, " (", how, ")\n");
  }
  if (quantization == "bf16_packed") {
    absl::StrAppend(&out, "packed       ", quantization, ": ", quantized_tensors, " matrices, ",
                    quantized_source_bytes, " -> ", quantized_bytes,
                    " bytes (lossless: 12 bits a weight, escapes aside)\n");
  } else if (quantized) {
    absl::StrAppend(&out, "quantized    ", quantization, ": ", quantized_tensors, " matrices, ", quantized_source_bytes,
                    " -> ", quantized_bytes, " bytes (blocks of 32 inputs, a float32 scale each",
                    quantization == "int8" ? "; inputs quantized per block of 32 at run time, int32 sums"
                                           : "; float32 inputs times the dequantized weights",
                    ")\n");
  }
  if (!kv_cache_dtype.empty()) absl::StrAppend(&out, "kv cache     ", kv_cache_dtype, "\n");
  if (bf16_products) {
    absl::StrAppend(
        &out, "products     bfloat16 (--matmul_precision ", matmul_precision,
        "): inputs of the bfloat16 matrices rounded to bfloat16, AVX-512 BF16 dot products\n");
  } else if (!matmul_precision.empty() && matmul_precision != "highest") {
    absl::StrAppend(
        &out, "products     float32 (--matmul_precision ", matmul_precision,
        " computes as highest here: no bfloat16 matrices in float32, or no AVX-512 BF16)\n");
  }
  for (const std::string& c : conversions) absl::StrAppend(&out, "converted    ", c, "\n");
  for (const TiedPair& t : tied) {
    absl::StrAppend(&out, "tied         ", t.target, " -> ", t.source,
                    t.same_storage ? " (same storage, " : " (NOT shared, ", t.bytes_saved,
                    " bytes saved)\n");
  }
  for (const std::string& m : missing) absl::StrAppend(&out, "MISSING      ", m, "\n");
  for (const ShapeMismatch& m : mismatched) {
    absl::StrAppend(&out, "MISMATCHED   ", m.name, ": expected [", absl::StrJoin(m.expected, ","),
                    "], found [", absl::StrJoin(m.found, ","), "]\n");
  }
  for (const std::string& u : unexpected) absl::StrAppend(&out, "unexpected   ", u, "\n");
  for (const std::string& i : ignored) absl::StrAppend(&out, "ignored      ", i, "\n");
  for (const std::string& w : warnings) absl::StrAppend(&out, "warning      ", w, "\n");
  absl::StrAppend(&out, absl::StrFormat("load time    %.3f s\n", load_seconds));
  return out;
}

}  // namespace adapterd::core
