#include "server/tls.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/match.h"
#include "absl/strings/strip.h"
#include "httplib.h"

namespace adapterd::server {
namespace {

absl::Status CheckReadableFile(const std::string& path, const char* flag) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " is not a regular file"));
  }
  if (::access(path.c_str(), R_OK) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " is not readable"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status TlsFiles::Validate() const {
  if (cert.empty() != key.empty()) {
    return absl::InvalidArgumentError("--tls_cert and --tls_key must be given together");
  }
  if (!client_ca.empty() && cert.empty()) {
    return absl::InvalidArgumentError("--tls_client_ca needs --tls_cert and --tls_key");
  }
  if (!enabled()) return absl::OkStatus();
  if (absl::Status s = CheckReadableFile(cert, "--tls_cert"); !s.ok()) return s;
  if (absl::Status s = CheckReadableFile(key, "--tls_key"); !s.ok()) return s;
  if (!client_ca.empty()) return CheckReadableFile(client_ca, "--tls_client_ca");
  return absl::OkStatus();
}

absl::Status SplitHostPort(const std::string& address, std::string* host, int* port) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("\"", address, "\" is not HOST:PORT"));
  }
  *host = address.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  if (host->empty() || *host == "*") *host = "0.0.0.0";
  if (!absl::SimpleAtoi(address.substr(colon + 1), port) || *port < 0 || *port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("\"", address, "\" has no valid port"));
  }
  return absl::OkStatus();
}

bool IsLoopbackAddress(const std::string& address) {
  std::string host;
  int port = 0;
  if (!SplitHostPort(address, &host, &port).ok()) return false;
  return host == "localhost" || host == "::1" || absl::StartsWith(host, "127.");
}

absl::StatusOr<std::unique_ptr<httplib::Server>> NewHttpServer(const TlsFiles& tls,
                                                               const std::string& what) {
  std::unique_ptr<httplib::Server> server;
  if (tls.enabled()) {
    auto ssl = std::make_unique<httplib::SSLServer>(
        tls.cert.c_str(), tls.key.c_str(),
        tls.client_ca.empty() ? nullptr : tls.client_ca.c_str());
    if (!ssl->is_valid()) {
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": the TLS certificate, key or client CA cannot be used (", tls.cert, ", ",
          tls.key, tls.client_ca.empty() ? "" : ", ", tls.client_ca, ")"));
    }
    server = std::move(ssl);
  } else {
    server = std::make_unique<httplib::Server>();
  }
  // A slow or stalled client holds one pool thread at most this long per read or write.
  server->set_read_timeout(5, 0);
  server->set_write_timeout(5, 0);
  server->set_keep_alive_timeout(5);
  server->set_payload_max_length(1 << 20);
  return server;
}

void StopHttpServer(httplib::Server& server, std::thread& thread) {
  if (thread.joinable()) {
    for (int i = 0; i < 10000 && !server.is_running(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }
  server.stop();
  if (thread.joinable()) thread.join();
}

int BindHttpServer(httplib::Server& server, const std::string& host, int port) {
  auto fd = std::make_shared<int>(-1);
  server.set_socket_options([fd](socket_t sock) {
    // httplib's default sets SO_REUSEPORT, which would let another process share a port in
    // use; SO_REUSEADDR alone allows a restart over TIME_WAIT connections and nothing more.
    int yes = 1;
    ::setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof(yes));
    *fd = sock;
  });
  const int bound = port == 0 ? server.bind_to_any_port(host) : (server.bind_to_port(host, port) ? port : -1);
  if (bound >= 0 && *fd >= 0) ::listen(*fd, 1024);  // On a listening socket: a new backlog.
  return bound;
}

absl::StatusOr<std::string> ReadAdminToken(const std::string& path, const std::string& flag) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, " ", path, " is not a regular file"));
  }
  if (st.st_mode & S_IROTH) {
    return absl::PermissionDeniedError(absl::StrCat(
        flag, " ", path, " is readable by every user (mode ",
        absl::StrFormat("%03o", st.st_mode & 0777),
        "); restrict it, e.g. chmod 600 (or 640 for a group such as Kubernetes' fsGroup)"));
  }
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (!in || !(text << in.rdbuf())) {
    return absl::InvalidArgumentError(absl::StrCat(flag, " ", path, " cannot be read"));
  }
  const std::string token(absl::StripAsciiWhitespace(text.str()));
  if (token.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        flag, " ", path,
        " holds no token (it is empty or only whitespace); an empty token would turn "
        "authentication off"));
  }
  for (unsigned char c : token) {
    if (c < 0x21 || c > 0x7e) {
      return absl::InvalidArgumentError(absl::StrCat(
          flag, " ", path,
          ": the token must be one line of printable ASCII without spaces"));
    }
  }
  return token;
}

}  // namespace adapterd::server
