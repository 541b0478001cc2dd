// adapterd.v1.Admin: load (or validate), unload and list adapters, report the model state.
// Served on its own listener. With an admin token configured every call must carry
// `authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED.
// Loading reads and validates files on a dedicated admin thread, never on a gRPC thread and
// never on the scheduler: generation does not pause. Admin writes are serialised.
//
// Thread-safety: handlers run on gRPC threads; the admin worker owns slow work.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

#include "adapterd/v1/admin.grpc.pb.h"
#include "server/serving_context.h"

namespace adapterd::server {

class AdminService final : public adapterd::v1::Admin::CallbackService {
 public:
  explicit AdminService(ServingContext& context);
  ~AdminService() override;

  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const adapterd::v1::LoadAdapterRequest* request,
                                        adapterd::v1::LoadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const adapterd::v1::UnloadAdapterRequest* request,
                                          adapterd::v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const adapterd::v1::ListAdaptersRequest* request,
                                         adapterd::v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* GetModelState(grpc::CallbackServerContext* context,
                                          const adapterd::v1::GetModelStateRequest* request,
                                          adapterd::v1::ModelState* response) override;

  // Loads an adapter synchronously (used for --preload and by the worker).
  absl::Status Load(const std::string& name, const std::string& path, bool validate_only,
                    bool replace, adapterd::v1::LoadAdapterResponse* response);

 private:
  grpc::Status Authorize(grpc::CallbackServerContext* context) const;
  // Returns true when the call may proceed; otherwise finishes `reactor` with
  // UNAUTHENTICATED (bad token) or, when `needs_model`, UNAVAILABLE (model still loading).
  bool Precheck(grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor,
                bool needs_model) const;
  void Run(std::function<void()> work);
  void PublishAdapterMetrics();

  ServingContext& ctx_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> work_;
  bool stop_ = false;
  std::thread worker_;
};

// Copies an adapter report into its proto.
void ToProto(const adapters::AdapterReport& report, adapterd::v1::AdapterReport* out);
// Copies the base model's load report into its proto.
void ToProto(const core::LoadReport& report, adapterd::v1::ModelLoadReport* out);

}  // namespace adapterd::server
