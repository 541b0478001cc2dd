#include "server/adapter_paths.h"

#include <climits>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace adapterd::server {

absl::StatusOr<std::string> ResolveAdapterPath(const std::string& root,
                                               const std::string& relative) {
  if (relative.empty()) return absl::InvalidArgumentError("adapter path is empty");
  if (relative[0] == '/') {
    return absl::InvalidArgumentError(absl::StrCat("adapter path \"", relative,
                                                   "\" is absolute; give it relative to the "
                                                   "adapter root"));
  }
  for (absl::string_view part : absl::StrSplit(relative, '/')) {
    if (part == "..") {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter path \"", relative, "\" contains \"..\""));
    }
  }
  char resolved[PATH_MAX];
  const std::string joined = root + "/" + relative;
  if (::realpath(joined.c_str(), resolved) == nullptr) {
    return absl::NotFoundError(absl::StrCat("adapter path \"", relative,
                                            "\" does not exist under the adapter root"));
  }
  const std::string real = resolved;
  if (real != root && real.compare(0, root.size() + 1, root + "/") != 0) {
    return absl::PermissionDeniedError(absl::StrCat(
        "adapter path \"", relative, "\" resolves outside the adapter root (through a symlink)"));
  }
  return real;
}

bool IsValidAdapterName(const std::string& name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

}  // namespace adapterd::server
