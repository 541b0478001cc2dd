// adapterd.v1.Generation over the gRPC callback API. Handlers validate, tokenize, pin the
// adapter and enqueue; they never run the model. Output arrives from the scheduler thread
// through a per-call sink that finishes the unary call or feeds the stream's writes.
//
// Thread-safety: gRPC calls the handlers on its own threads; the context is shared read-only.
#pragma once

#include "adapterd/v1/generation.grpc.pb.h"
#include "server/serving_context.h"

namespace adapterd::server {

class GenerationService final : public adapterd::v1::Generation::CallbackService {
 public:
  explicit GenerationService(ServingContext& context) : ctx_(context) {}

  grpc::ServerUnaryReactor* Generate(grpc::CallbackServerContext* context,
                                     const adapterd::v1::GenerateRequest* request,
                                     adapterd::v1::GenerateResponse* response) override;
  grpc::ServerWriteReactor<adapterd::v1::GenerateStreamResponse>* GenerateStream(
      grpc::CallbackServerContext* context, const adapterd::v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const adapterd::v1::TokenizeRequest* request,
                                     adapterd::v1::TokenizeResponse* response) override;

 private:
  // Counts a request refused before it reached the scheduler (validation, full queue).
  void CountRefusal(const std::string& adapter, const absl::Status& status);

  ServingContext& ctx_;
};

// Validates `request` and turns it into a scheduler request (prompt tokenized, adapter
// pinned). `resolved`, when set, is the adapter `request.adapter` names, already resolved by
// the caller (the OpenAI front resolves it to tokenize with it): it is used as is. Errors carry
// the gRPC code the client gets.
absl::StatusOr<std::unique_ptr<GenerationRequest>> BuildRequest(
    ServingContext& ctx, const adapterd::v1::GenerateRequest& request,
    std::chrono::system_clock::time_point deadline, adapters::AdapterRef resolved = nullptr);

}  // namespace adapterd::server
