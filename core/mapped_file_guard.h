// Keeps the weights a server computes with from changing under it when their file is
// rewritten or truncated in place. A mapped model file is held with a read lease
// (fcntl F_SETLEASE): another process that opens it for writing or truncates it is held back
// by the kernel while this process is told; the guard then copies the mapping into private
// memory and moves the copy over the mapping's own addresses (mremap), so every pointer into
// it stays valid and reads the old bytes, and finally releases the lease. The writer proceeds;
// the server keeps serving the weights it loaded, and says so.
//
// Without a lease (a file of another user without CAP_LEASE, a network filesystem, a file
// already open for writing) in-place changes cannot be seen: Guard() says why, and the
// operator contract is to replace model files by atomic rename (or to run with --mmap=false).
//
// Thread-safety: every function may be called from any thread.
#pragma once

#include <cstddef>
#include <functional>
#include <string>

namespace adapterd::core {

// Receives the guard's notices (one line each); the default writes them to stderr.
void SetMappedFileNoticeHandler(std::function<void(const std::string&)> handler);

// Takes a read lease on `fd` (which the guard now owns and closes) for the PROT_READ private
// mapping [base, base + size) of `path`. Returns false, and sends a notice naming the reason,
// when no lease can be held; the mapping is used as it is then.
bool GuardMapping(int fd, const void* base, size_t size, const std::string& path);

// Ends the guard of the mapping at `base` (before it is unmapped); harmless when unguarded.
void UnguardMapping(const void* base);

}  // namespace adapterd::core
