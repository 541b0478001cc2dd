// Opening files that someone else controls (adapter folders uploaded by users): only regular
// files, opened without blocking (a FIFO or device never stalls the caller), optionally
// confined to a folder by their real path and bounded in size.
//
// Thread-safety: free functions, reentrant.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace adapterd::core {

struct FileRules {
  std::string root;        // Non-empty: the opened file's real path must lie under this folder.
  uint64_t max_bytes = 0;  // Non-zero: larger files are refused.
};

// Opens `path` read-only and returns the descriptor (the caller closes it). NotFound when it
// does not exist; InvalidArgument when it is not a regular file or is too large;
// PermissionDenied when its real path (symlinks resolved, checked on the open descriptor, so
// a path swapped in between cannot escape) leaves `rules.root`.
absl::StatusOr<int> OpenRegularFile(const std::string& path, const FileRules& rules);

}  // namespace adapterd::core
