// adapterd.v1.Admin: load (or validate), unload and list adapters, report the model state.
// Served on its own listener. With an admin token configured every call must carry
// `authorization: Bearer <token>` (compared in constant time), else UNAUTHENTICATED.
// Loading reads and validates files on a dedicated admin thread, never on a gRPC thread and
// never on the scheduler: generation does not pause. Admin writes are serialised.
//
// Thread-safety: handlers run on gRPC threads; the admin worker owns slow work.
#pragma once

#include <chrono>
#include <functional>
#include <memory>

#include "adapterd/v1/admin.grpc.pb.h"
#include "server/adapter_residency.h"
#include "server/admin_worker.h"
#include "server/serving_context.h"

namespace adapterd::server {

class AdminService final : public adapterd::v1::Admin::CallbackService {
 public:
  // Loads still running after `load_timeout` are abandoned (DEADLINE_EXCEEDED).
  AdminService(ServingContext& context, std::chrono::steady_clock::duration load_timeout);
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

  // Loads an adapter synchronously (used for --preload and by the worker) through the
  // residency (AdapterResidency::Load). When given, `may_publish` is asked right before the
  // adapter enters the table; false (the load was abandoned meanwhile) leaves it untouched.
  absl::Status Load(const LoadSpec& spec, adapterd::v1::LoadAdapterResponse* response,
                    const std::function<bool()>& may_publish = nullptr);

  // Unloads `name` (NotFound when it is not loaded); returns the references requests in flight
  // still hold (they finish with the adapter).
  absl::StatusOr<int64_t> Unload(const std::string& name);

  // For callers outside gRPC (the HTTP front): runs a load or an unload on the admin worker,
  // with the same timeout, and calls `done` exactly once with the outcome (DeadlineExceeded
  // when abandoned, Unavailable when the server shuts down).
  void LoadAsync(const std::string& name, const std::string& path,
                 std::function<void(const absl::Status&, const adapterd::v1::LoadAdapterResponse&)> done);
  void UnloadAsync(const std::string& name, std::function<void(const absl::StatusOr<int64_t>&)> done);

  // Stops the admin worker (see AdminWorker::Shutdown); true when a thread was left inside
  // an abandoned load, so that the process should exit without destroying the model.
  bool StopWorker() { return worker_.Shutdown(); }

 private:
  grpc::Status Authorize(grpc::CallbackServerContext* context) const;
  // Returns true when the call may proceed; otherwise finishes `reactor` with
  // UNAUTHENTICATED (bad token) or, when `needs_model`, UNAVAILABLE (model still loading).
  bool Precheck(grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor,
                bool needs_model) const;
  // Runs `work(may_answer)` on the admin worker; `may_answer()` is true once, for whichever
  // of the work and the abandonment (timeout, shutdown, cancelled call) answers `reactor`.
  void Run(grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor,
           const char* what, std::function<void(const std::function<bool()>& may_answer)> work);
  // Queues `work(may_answer)` on the admin worker with the load timeout. `abandoned` answers
  // instead (DeadlineExceeded after the timeout, Unavailable at shutdown) when the worker gives
  // up first; `may_answer()` is true for whichever of the two answers.
  void SubmitJob(const char* what, std::function<void(const std::function<bool()>& may_answer)> work,
                 std::function<void(const absl::Status&)> abandoned);
  // Loads on the worker and hands the outcome to `answer`, unless the job was abandoned first.
  void LoadJob(const std::function<bool()>& may_answer, const LoadSpec& spec,
               const std::function<void(const absl::Status&, adapterd::v1::LoadAdapterResponse)>& answer);

  ServingContext& ctx_;
  const std::chrono::steady_clock::duration load_timeout_;
  AdminWorker worker_;
};

// Copies an adapter report into its proto.
void ToProto(const adapters::AdapterReport& report, adapterd::v1::AdapterReport* out);
// Copies the base model's load report into its proto.
void ToProto(const core::LoadReport& report, adapterd::v1::ModelLoadReport* out);

}  // namespace adapterd::server
