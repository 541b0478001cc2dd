// The OpenAI-compatible HTTP front (`adapterd serve --http_listen`): /v1/completions and
// /v1/chat/completions (JSON or Server-Sent Events), /v1/models, vLLM's /tokenize and
// /detokenize, /health, /metrics, and, with --http_admin, vLLM's /v1/load_lora_adapter and
// /v1/unload_lora_adapter. A request's `model` names the base model or a loaded adapter.
//
// Requests become the same scheduler requests as gRPC ones (through BuildRequest), so an HTTP
// answer equals the gRPC answer for the same prompt, adapter and sampling values. Errors are
// OpenAI's error object with the matching HTTP status.
//
// Thread-safety: cpp-httplib runs handlers on its pool threads; each request owns its state,
// and the scheduler thread only pushes into a request's channel.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/admin_service.h"
#include "server/serving_context.h"
#include "server/tls.h"

namespace httplib {
class Server;
}

namespace adapterd::server {

struct OpenAiOptions {
  std::string model_id;   // The base model's id in `model` and /v1/models.
  std::string api_key;    // Non-empty: every call but /health and /metrics needs it as Bearer.
  bool admin = false;     // Serve the adapter load/unload endpoints (admin token as Bearer).
  int threads = 256;      // Pool threads: each open request (a stream) holds one.
  int max_n = 16;         // Largest `n`.
  size_t max_body_bytes = size_t{8} << 20;
};

class OpenAiServer {
 public:
  // `admin` may be null when options.admin is false.
  OpenAiServer(ServingContext& ctx, AdminService* admin, OpenAiOptions options);
  ~OpenAiServer();

  // Binds `address` ("host:port", port 0 picks one) and serves on a thread; returns the port.
  absl::StatusOr<int> Start(const std::string& address, const TlsFiles& tls);
  void Stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<httplib::Server> http_;
  std::thread thread_;
};

}  // namespace adapterd::server
