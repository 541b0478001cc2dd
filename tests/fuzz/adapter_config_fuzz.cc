// libFuzzer target: arbitrary text as adapter_config.json. Parsing returns a config or a
// status; the regular expressions a config carries run against real module names within
// their match budget (a status, never a hang or a crash).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "adapters/adapter_config.h"
#include "adapters/peft_regex.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using adapterd::adapters::AdapterConfig;
  using adapterd::adapters::PeftRegex;
  auto config = AdapterConfig::FromJson(
      absl::string_view(reinterpret_cast<const char*>(data), size), "fuzz.json");
  if (!config.ok()) return 0;
  std::vector<std::pair<std::string, const char*>> patterns;
  if (config->target_regex) patterns.emplace_back(*config->target_regex, "target_modules");
  if (config->exclude_regex) patterns.emplace_back(*config->exclude_regex, "exclude_modules");
  for (const auto& [p, v] : config->rank_pattern) patterns.emplace_back("(.*\\.)?(" + p + ")", "rank_pattern");
  for (const auto& [p, v] : config->alpha_pattern) patterns.emplace_back("(.*\\.)?(" + p + ")", "alpha_pattern");
  for (const auto& [pattern, field] : patterns) {
    auto regex = PeftRegex::Compile(pattern, field);
    if (!regex.ok()) continue;
    for (const char* module : {"model.layers.0.self_attn.q_proj", "model.layers.11.mlp.down_proj",
                               "transformer.h.3.attn.c_attn", "lm_head"}) {
      (void)(*regex)->FullMatch(module);
      (void)(*regex)->SearchGroup1(module);
    }
  }
  return 0;
}
