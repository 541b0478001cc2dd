// Helpers shared by the test binaries: where the generated fixtures are, JSON files.
#pragma once

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <unistd.h>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace adapterd::testing {

// Returns the folder the ctest fixture step generated (ADAPTERD_FIXTURES overrides it).
inline std::string FixturesDir() {
  const char* dir = std::getenv("ADAPTERD_FIXTURES");
  return dir != nullptr ? dir : ADAPTERD_FIXTURES_DIR;
}

// Returns the path of the adapterd executable under test.
inline std::string AdapterdBinary() { return ADAPTERD_BINARY_PATH; }

inline std::string Fixture(const std::string& name) { return FixturesDir() + "/" + name; }

inline nlohmann::json ReadJson(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return nlohmann::json::parse(ss.str());
}

// Writes `bytes` to `path`, replacing it.
inline void WriteFile(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << bytes;
}

// Returns a fresh empty folder under the test's temporary directory.
inline std::string TempDir(const std::string& name) {
  std::string dir = ::testing::TempDir() + "adapterd_" + name + "_" +
                    std::to_string(::getpid());
  std::string cmd = "rm -rf '" + dir + "' && mkdir -p '" + dir + "'";
  if (std::system(cmd.c_str()) != 0) ADD_FAILURE() << "cannot create " << dir;
  return dir;
}

}  // namespace adapterd::testing

namespace adapterd::testing {

inline std::string ReadBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace adapterd::testing
