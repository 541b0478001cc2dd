#include "core/mapped_file_guard.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"

namespace adapterd::core {
namespace {

struct Guarded {
  void* base;
  size_t size;
  std::string path;
};

struct State {
  std::mutex mu;
  std::map<int, Guarded> by_fd;  // Guarded by mu.
  std::function<void(const std::string&)> notice = [](const std::string& line) {
    std::fprintf(stderr, "%s\n", line.c_str());
  };
  int pipe_read = -1;
  int pipe_write = -1;
};

State& state() {
  static State* s = new State();  // Never destroyed: the watcher thread outlives main().
  return *s;
}

int LeaseSignal() { return SIGRTMIN + 3; }

// Async-signal-safe: forwards the descriptor whose lease is being broken to the watcher.
void OnLeaseBreak(int, siginfo_t* info, void*) {
  const int saved = errno;
  const int fd = info->si_fd;
  [[maybe_unused]] ssize_t n = ::write(state().pipe_write, &fd, sizeof(fd));
  errno = saved;
}

void Notice(const std::string& line) {
  std::function<void(const std::string&)> notice;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    notice = state().notice;
  }
  notice(line);
}

// Copies the mapping into private memory at the same addresses, then lets the writer go.
void Detach(int fd) {
  Guarded g;
  {
    std::lock_guard<std::mutex> lock(state().mu);
    auto it = state().by_fd.find(fd);
    if (it == state().by_fd.end()) return;  // Unguarded meanwhile.
    g = it->second;
    state().by_fd.erase(it);
  }
  void* copy = ::mmap(nullptr, g.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  bool moved = false;
  if (copy != MAP_FAILED) {
    std::memcpy(copy, g.base, g.size);
    ::mprotect(copy, g.size, PROT_READ);
    moved = ::mremap(copy, g.size, g.size, MREMAP_MAYMOVE | MREMAP_FIXED, g.base) != MAP_FAILED;
    if (!moved) ::munmap(copy, g.size);
  }
  ::fcntl(fd, F_SETLEASE, F_UNLCK);
  ::close(fd);
  if (moved) {
    Notice(absl::StrCat("model file ", g.path,
                        " is being changed by another process: its ", g.size,
                        " bytes were copied into memory and the server keeps serving the weights "
                        "it loaded; restart to load the new file (replace model files by atomic "
                        "rename to avoid this copy)"));
  } else {
    Notice(absl::StrCat("model file ", g.path,
                        " is being changed by another process and could not be copied into "
                        "memory (", std::strerror(errno), "): answers may change; restart"));
  }
}

void StartWatcher() {
  static std::once_flag once;
  std::call_once(once, [] {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) != 0) return;
    state().pipe_read = fds[0];
    state().pipe_write = fds[1];
    struct sigaction sa {};
    sa.sa_sigaction = OnLeaseBreak;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    ::sigaction(LeaseSignal(), &sa, nullptr);
    std::thread([] {
      while (true) {
        int fd = -1;
        const ssize_t n = ::read(state().pipe_read, &fd, sizeof(fd));
        if (n == sizeof(fd)) {
          Detach(fd);
        } else if (n < 0 && errno != EINTR) {
          return;
        }
      }
    }).detach();
  });
}

}  // namespace

void SetMappedFileNoticeHandler(std::function<void(const std::string&)> handler) {
  std::lock_guard<std::mutex> lock(state().mu);
  state().notice = std::move(handler);
}

bool GuardMapping(int fd, const void* base, size_t size, const std::string& path) {
  StartWatcher();
  if (state().pipe_write < 0 || ::fcntl(fd, F_SETSIG, LeaseSignal()) != 0 ||
      ::fcntl(fd, F_SETLEASE, F_RDLCK) != 0) {
    const int err = errno;
    ::close(fd);
    Notice(absl::StrCat("model file ", path, ": no read lease (", std::strerror(err),
                        "), so a change made to it in place while serving cannot be caught; "
                        "replace model files by atomic rename, or serve with --mmap=false"));
    return false;
  }
  std::lock_guard<std::mutex> lock(state().mu);
  state().by_fd[fd] = Guarded{const_cast<void*>(base), size, path};
  return true;
}

void UnguardMapping(const void* base) {
  std::lock_guard<std::mutex> lock(state().mu);
  for (auto it = state().by_fd.begin(); it != state().by_fd.end(); ++it) {
    if (it->second.base == base) {
      ::fcntl(it->first, F_SETLEASE, F_UNLCK);
      ::close(it->first);
      state().by_fd.erase(it);
      return;
    }
  }
}

}  // namespace adapterd::core
