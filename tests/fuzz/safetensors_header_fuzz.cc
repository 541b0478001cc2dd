// libFuzzer target: arbitrary bytes as a safetensors image. The parser must return a status
// or a header whose every range lies inside the image, and never crash.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "core/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto header = adapterd::core::ParseSafetensorsHeader(data, size, "fuzz");
  if (!header.ok()) return 0;
  for (const auto& t : header->tensors) {
    if (header->data_start + t.end > size || t.begin > t.end) std::abort();
  }
  return 0;
}
