#include "adapters/adapter_report.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace adapterd::adapters {

nlohmann::json AdapterReport::ToJson() const {
  nlohmann::json j;
  j["name"] = name;
  j["path"] = path;
  j["type"] = type;
  j["base_model_name_or_path"] = base_model_name_or_path;
  j["ranks"] = ranks;
  j["alphas"] = alphas;
  j["scalings"] = scalings;
  j["use_rslora"] = use_rslora;
  j["matched_modules"] = matched_modules;
  j["matched_module_count"] = matched_modules.size();
  j["skipped_layers"] = skipped_layers;
  j["dora_modules"] = dora_modules;
  j["ia3_input_modules"] = ia3_input_modules;
  j["saved_modules"] = saved_modules;
  j["vocab_size"] = vocab_size;
  j["added_tokens"] = added_tokens;
  j["tokenizer"] = tokenizer;
  j["num_virtual_tokens"] = num_virtual_tokens;
  j["file_bytes_by_dtype"] = file_bytes_by_dtype;
  j["bytes"] = bytes;
  j["compute_dtype"] = compute_dtype;
  j["load_seconds"] = load_seconds;
  j["warnings"] = warnings;
  return j;
}

std::string AdapterReport::ToText() const {
  std::string out;
  absl::StrAppend(&out, "adapter      ", name, " (", type, ") from ", path, "\n");
  if (!base_model_name_or_path.empty()) {
    absl::StrAppend(&out, "trained on   ", base_model_name_or_path, "\n");
  }
  if (!ranks.empty()) {
    absl::StrAppend(&out, "rank         ", absl::StrJoin(ranks, ","), "\n");
    absl::StrAppend(&out, "alpha        ", absl::StrJoin(alphas, ","),
                    use_rslora ? " (rsLoRA: alpha/sqrt(r))" : " (alpha/r)", "\n");
    absl::StrAppend(&out, "scaling      ", absl::StrJoin(scalings, ","), "\n");
    absl::StrAppend(&out, "modules      ", matched_modules.size(), " matched",
                    dora_modules > 0 ? absl::StrCat(", ", dora_modules, " with DoRA magnitudes") : "", "\n");
    for (const std::string& m : matched_modules) absl::StrAppend(&out, "  ", m, "\n");
    if (!skipped_layers.empty()) {
      absl::StrAppend(&out, "skipped      layers ", absl::StrJoin(skipped_layers, ","), "\n");
    }
  }
  if (ranks.empty() && !matched_modules.empty()) {  // IA3.
    absl::StrAppend(&out, "modules      ", matched_modules.size(), " scaled\n");
    for (const std::string& m : matched_modules) {
      const bool input = std::count(ia3_input_modules.begin(), ia3_input_modules.end(), m) > 0;
      absl::StrAppend(&out, "  ", m, input ? " (input)" : " (output)", "\n");
    }
  }
  for (const std::string& m : saved_modules) absl::StrAppend(&out, "saved        ", m, "\n");
  if (vocab_size > 0) {
    absl::StrAppend(&out, "vocabulary   ", vocab_size, " ids, ", added_tokens.size(), " added tokens",
                    added_tokens.empty() ? "" : absl::StrCat(": ", absl::StrJoin(added_tokens, " ")), "\n");
  }
  if (!tokenizer.empty()) absl::StrAppend(&out, "tokenizer    ", tokenizer, "\n");
  if (num_virtual_tokens > 0) {
    absl::StrAppend(&out, "virtual      ", num_virtual_tokens, " tokens\n");
  }
  for (const auto& [dtype, b] : file_bytes_by_dtype) {
    absl::StrAppend(&out, "stored       ", dtype, ": ", b, " bytes\n");
  }
  absl::StrAppend(&out, "memory       ", bytes, " bytes as ", compute_dtype, "\n");
  for (const std::string& w : warnings) absl::StrAppend(&out, "warning      ", w, "\n");
  absl::StrAppend(&out, absl::StrFormat("load time    %.3f s\n", load_seconds));
  return out;
}

}  // namespace adapterd::adapters
