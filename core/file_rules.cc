#include "core/file_rules.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace adapterd::core {

absl::StatusOr<int> OpenRegularFile(const std::string& path, const FileRules& rules) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever.
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(path, ": no such file"));
    return absl::PermissionDeniedError(absl::StrCat(path, ": cannot open: ", std::strerror(err)));
  }
  auto fail = [fd](absl::Status s) {
    ::close(fd);
    return s;
  };
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    return fail(absl::InvalidArgumentError(
        absl::StrCat(path, ": not a regular file (FIFOs, devices and folders are refused)")));
  }
  if (rules.max_bytes > 0 && static_cast<uint64_t>(st.st_size) > rules.max_bytes) {
    return fail(absl::InvalidArgumentError(absl::StrCat(
        path, ": ", st.st_size, " bytes, more than the limit of ", rules.max_bytes)));
  }
  if (!rules.root.empty()) {
    char real[PATH_MAX];
    const std::string link = absl::StrCat("/proc/self/fd/", fd);
    const ssize_t n = ::readlink(link.c_str(), real, sizeof(real) - 1);
    if (n <= 0) return fail(absl::InternalError(absl::StrCat(path, ": cannot resolve its path")));
    const std::string resolved(real, static_cast<size_t>(n));
    const std::string prefix = rules.root.back() == '/' ? rules.root : rules.root + "/";
    if (resolved.compare(0, prefix.size(), prefix) != 0) {
      return fail(absl::PermissionDeniedError(absl::StrCat(
          path, " resolves outside the adapter root (through a symlink)")));
    }
  }
  ::fcntl(fd, F_SETFL, 0);  // Plain blocking reads from here on.
  return fd;
}

}  // namespace adapterd::core
