// The regular expressions of PEFT configs (target_modules, exclude_modules, rank_pattern,
// alpha_pattern, layers_pattern), which come from whoever wrote the adapter. PCRE2 (Python-like
// syntax) with a match budget: a pattern that backtracks catastrophically, such as (.*.*)*X,
// is refused by name instead of stalling the loader.
//
// Thread-safety: immutable after Compile(); Match() may be called from any thread.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace adapterd::adapters {

class PeftRegex {
 public:
  // Compiles `pattern`; `field` names the config field in errors.
  static absl::StatusOr<std::unique_ptr<PeftRegex>> Compile(const std::string& pattern,
                                                            const std::string& field);
  ~PeftRegex();
  PeftRegex(const PeftRegex&) = delete;
  PeftRegex& operator=(const PeftRegex&) = delete;

  // Python's re.fullmatch(pattern, text) is not None. InvalidArgument when the match budget
  // runs out.
  absl::StatusOr<bool> FullMatch(const std::string& text) const;
  // Python's re.search: returns the text of capture group 1 of the first match, if any.
  absl::StatusOr<std::optional<std::string>> SearchGroup1(const std::string& text) const;

  // Backtracking steps one match may take before it is abandoned.
  static constexpr uint32_t kMatchBudget = 200000;

 private:
  PeftRegex(void* code, std::string pattern, std::string field);
  absl::StatusOr<int> Run(const std::string& text, bool full, void* match_data) const;

  void* code_;  // pcre2_code*
  std::string pattern_;
  std::string field_;
};

}  // namespace adapterd::adapters
