// libFuzzer target: arbitrary text as config.json. Parsing returns a config or a status.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/model_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto config = adapterd::core::ModelConfig::FromJson(
      absl::string_view(reinterpret_cast<const char*>(data), size), "fuzz");
  if (config.ok() && (config->num_kv_heads <= 0 || config->head_dim <= 0)) std::abort();
  return 0;
}
