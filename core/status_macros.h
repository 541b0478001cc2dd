// Early-return helpers for absl::Status / absl::StatusOr, used across every module.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define ADAPTERD_STATUS_CONCAT_INNER(a, b) a##b
#define ADAPTERD_STATUS_CONCAT(a, b) ADAPTERD_STATUS_CONCAT_INNER(a, b)

// Returns the status of `expr` from the enclosing function when it is not OK.
#define RETURN_IF_ERROR(expr)                   \
  do {                                          \
    ::absl::Status adapterd_status_ = (expr);   \
    if (!adapterd_status_.ok()) return adapterd_status_; \
  } while (0)

// Evaluates `rexpr` (an absl::StatusOr<T>); returns its status when not OK, otherwise moves
// the value into `lhs` (which may be a declaration such as `auto x`).
#define ASSIGN_OR_RETURN(lhs, rexpr) \
  ADAPTERD_ASSIGN_OR_RETURN_IMPL(ADAPTERD_STATUS_CONCAT(adapterd_statusor_, __LINE__), lhs, rexpr)

#define ADAPTERD_ASSIGN_OR_RETURN_IMPL(statusor, lhs, rexpr) \
  auto statusor = (rexpr);                                   \
  if (!statusor.ok()) return std::move(statusor).status();   \
  lhs = std::move(statusor).value()
