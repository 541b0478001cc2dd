// Text of an exception thrown by LibTorch, for Status messages and logs.
#pragma once

#include <c10/util/Exception.h>

#include <exception>
#include <string>

namespace adapterd::core {

// Returns the exception's message without the C++ backtrace that c10::Error::what() appends
// (library paths and addresses are for the log at most, never for a client).
inline std::string TorchErrorMessage(const std::exception& e) {
  if (const auto* c10_error = dynamic_cast<const c10::Error*>(&e)) {
    return c10_error->what_without_backtrace();
  }
  return e.what();
}

}  // namespace adapterd::core
