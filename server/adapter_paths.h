// Resolution of adapter folders named by admin calls: always inside the adapter root.
#pragma once

#include <string>

#include "absl/status/statusor.h"

namespace adapterd::server {

// Returns the canonical absolute path of `relative` inside `root` (itself canonical).
// InvalidArgument for an empty or absolute path or one with a ".." component;
// NotFound when it does not exist; PermissionDenied when it resolves (through symlinks)
// outside the root.
absl::StatusOr<std::string> ResolveAdapterPath(const std::string& root,
                                               const std::string& relative);

// True for names of 1-64 characters from [A-Za-z0-9._-].
bool IsValidAdapterName(const std::string& name);

}  // namespace adapterd::server
