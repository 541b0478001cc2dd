#include "adapters/peft_regex.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"

namespace adapterd::adapters {
namespace {

pcre2_code* Code(void* p) { return static_cast<pcre2_code*>(p); }

}  // namespace

absl::StatusOr<std::unique_ptr<PeftRegex>> PeftRegex::Compile(const std::string& pattern,
                                                              const std::string& field) {
  int err = 0;
  PCRE2_SIZE offset = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                   PCRE2_UTF, &err, &offset, nullptr);
  if (code == nullptr) {
    PCRE2_UCHAR msg[256];
    pcre2_get_error_message(err, msg, sizeof(msg));
    return absl::InvalidArgumentError(absl::StrCat(field, " \"", pattern,
                                                   "\" is not a valid regular expression (at ",
                                                   offset, ": ",
                                                   reinterpret_cast<const char*>(msg), ")"));
  }
  // No JIT: the interpreter honours the match and depth limits exactly.
  return std::unique_ptr<PeftRegex>(new PeftRegex(code, pattern, field));
}

PeftRegex::PeftRegex(void* code, std::string pattern, std::string field)
    : code_(code), pattern_(std::move(pattern)), field_(std::move(field)) {}

PeftRegex::~PeftRegex() { pcre2_code_free(Code(code_)); }

absl::StatusOr<int> PeftRegex::Run(const std::string& text, bool full, void* md) const {
  pcre2_match_context* context = pcre2_match_context_create(nullptr);
  pcre2_set_match_limit(context, kMatchBudget);
  pcre2_set_depth_limit(context, kMatchBudget);
  const uint32_t options = full ? (PCRE2_ANCHORED | PCRE2_ENDANCHORED) : 0;
  const int rc = pcre2_match(Code(code_), reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                             0, options, static_cast<pcre2_match_data*>(md), context);
  pcre2_match_context_free(context);
  if (rc == PCRE2_ERROR_MATCHLIMIT || rc == PCRE2_ERROR_DEPTHLIMIT ||
      rc == PCRE2_ERROR_HEAPLIMIT) {
    return absl::InvalidArgumentError(absl::StrCat(
        field_, " \"", pattern_, "\" needs more than ", kMatchBudget,
        " backtracking steps to match \"", text, "\"; simplify the regular expression"));
  }
  if (rc < 0 && rc != PCRE2_ERROR_NOMATCH) {
    return absl::InvalidArgumentError(
        absl::StrCat(field_, " \"", pattern_, "\" failed on \"", text, "\" (PCRE2 error ", rc, ")"));
  }
  return rc;
}

absl::StatusOr<bool> PeftRegex::FullMatch(const std::string& text) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(Code(code_), nullptr);
  absl::StatusOr<int> rc = Run(text, /*full=*/true, md);
  pcre2_match_data_free(md);
  if (!rc.ok()) return rc.status();
  return *rc >= 0;
}

absl::StatusOr<std::optional<std::string>> PeftRegex::SearchGroup1(const std::string& text) const {
  pcre2_match_data* md = pcre2_match_data_create_from_pattern(Code(code_), nullptr);
  absl::StatusOr<int> rc = Run(text, /*full=*/false, md);
  std::optional<std::string> group;
  if (rc.ok() && *rc >= 2) {
    PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
    if (ov[2] != PCRE2_UNSET) group = text.substr(ov[2], ov[3] - ov[2]);
  }
  pcre2_match_data_free(md);
  if (!rc.ok()) return rc.status();
  return group;
}

}  // namespace adapterd::adapters
