// Transport security shared by every listener: the TLS files (--tls_cert, --tls_key and, for
// mutual TLS, --tls_client_ca), listener addresses, and the admin token's file rules.
//
// Thread-safety: free functions; TlsFiles is a plain value.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace httplib {
class Server;
}

namespace adapterd::server {

struct TlsFiles {
  std::string cert;       // PEM certificate chain; empty: plaintext.
  std::string key;        // PEM private key of `cert`.
  std::string client_ca;  // PEM CA bundle; non-empty: clients must present a certificate it signed.

  bool enabled() const { return !cert.empty(); }
  // InvalidArgument unless cert and key come together (client_ca only with them) and every
  // named file is a readable regular file.
  absl::Status Validate() const;
};

// Splits "host:port" ("[v6]:port" too); the port must be 0-65535.
absl::Status SplitHostPort(const std::string& address, std::string* host, int* port);

// True when `address` ("host:port") listens on loopback only (127.0.0.0/8, ::1, localhost).
bool IsLoopbackAddress(const std::string& address);

// Returns an HTTP server (TLS when `tls` is enabled) with read/write timeouts set; `what`
// names the listener in errors.
absl::StatusOr<std::unique_ptr<httplib::Server>> NewHttpServer(const TlsFiles& tls,
                                                               const std::string& what);

// Binds `server` to `host`:`port` (port 0: any free port) and returns the port, or -1. The
// listen backlog is raised to 1024: Debian's cpp-httplib library listens with 5, which a burst
// of clients connecting at once (64 streams) overflows.
int BindHttpServer(httplib::Server& server, const std::string& host, int port);

// Stops `server`, whose listen_after_bind() runs on `thread`, and joins that thread. httplib's
// stop() does nothing until the accept loop has started (is_running()), and a loop that starts
// after it would then wait in accept() for ever, as a listener did when a later one failed to
// bind at once; so it first waits (up to 10 s) for the loop to start.
void StopHttpServer(httplib::Server& server, std::thread& thread);

// Reads a bearer token (the admin token, or the HTTP API key) from `path`: refused when the
// file is not a regular file, when others (not owner or group) may read it, or when the token
// is empty after trimming or holds characters that gRPC metadata cannot carry. `flag` names
// the file in messages.
absl::StatusOr<std::string> ReadAdminToken(const std::string& path,
                                           const std::string& flag = "--admin_token_file");

}  // namespace adapterd::server
