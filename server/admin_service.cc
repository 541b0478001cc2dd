#include "server/admin_service.h"


#include <chrono>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/adapter_residency.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {
namespace {

namespace v1 = adapterd::v1;

bool ConstantTimeEquals(const std::string& a, const std::string& b) {
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  const size_t n = std::max(a.size(), b.size());
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? a[i] : 0;
    const unsigned char y = i < b.size() ? b[i] : 0;
    diff |= x ^ y;
  }
  return diff == 0;
}

}  // namespace

void ToProto(const adapters::AdapterReport& r, v1::AdapterReport* out) {
  out->set_name(r.name);
  out->set_path(r.path);
  out->set_type(r.type);
  out->set_base_model_name_or_path(r.base_model_name_or_path);
  for (int64_t x : r.ranks) out->add_ranks(x);
  for (double x : r.alphas) out->add_alphas(x);
  for (double x : r.scalings) out->add_scalings(x);
  out->set_use_rslora(r.use_rslora);
  for (const auto& m : r.matched_modules) out->add_matched_modules(m);
  for (const auto& m : r.ia3_input_modules) out->add_ia3_input_modules(m);
  out->set_dora_modules(r.dora_modules);
  for (const auto& m : r.saved_modules) out->add_saved_modules(m);
  out->set_vocab_size(r.vocab_size);
  for (const auto& t : r.added_tokens) out->add_added_tokens(t);
  out->set_tokenizer(r.tokenizer);
  for (int64_t l : r.skipped_layers) out->add_skipped_layers(l);
  out->set_num_virtual_tokens(r.num_virtual_tokens);
  out->set_bytes(r.bytes);
  out->set_compute_dtype(r.compute_dtype);
  out->set_load_seconds(r.load_seconds);
  for (const auto& w : r.warnings) out->add_warnings(w);
  for (const auto& [k, v] : r.file_bytes_by_dtype) (*out->mutable_file_bytes_by_dtype())[k] = v;
}

void ToProto(const core::LoadReport& r, v1::ModelLoadReport* out) {
  out->set_ok(r.ok());
  out->set_model_dir(r.model_dir);
  out->set_architecture(r.architecture);
  out->set_model_type(r.model_type);
  out->set_name_or_path(r.name_or_path);
  for (const auto& f : r.files) out->add_files(f);
  for (const auto& m : r.missing) out->add_missing(m);
  for (const auto& u : r.unexpected) out->add_unexpected(u);
  for (const auto& i : r.ignored) out->add_ignored(i);
  for (const auto& m : r.mismatched) {
    auto* p = out->add_mismatched();
    p->set_name(m.name);
    for (int64_t d : m.expected) p->add_expected(d);
    for (int64_t d : m.found) p->add_found(d);
  }
  for (const auto& t : r.tied) {
    auto* p = out->add_tied();
    p->set_target(t.target);
    p->set_source(t.source);
    p->set_same_storage(t.same_storage);
    p->set_bytes_saved(t.bytes_saved);
  }
  for (const auto& w : r.warnings) out->add_warnings(w);
  out->set_declared_parameters(r.declared_parameters);
  out->set_materialized_parameters(r.materialized_parameters);
  out->set_parameter_count(r.parameter_count);
  for (const auto& [k, v] : r.file_bytes_by_dtype) (*out->mutable_file_bytes_by_dtype())[k] = v;
  out->set_bytes_mapped(r.bytes_mapped);
  out->set_bytes_copied(r.bytes_copied);
  out->set_bytes_files_held(r.bytes_files_held);
  out->set_bytes_huge_pages(r.bytes_huge_pages);
  out->set_bytes_reread(r.bytes_reread);
  out->set_compute_dtype(r.compute_dtype);
  out->set_kv_cache_dtype(r.kv_cache_dtype);
  out->set_weights_dtype(r.weights_dtype);
  out->set_quantization(r.quantization);
  out->set_quantized_tensors(r.quantized_tensors);
  out->set_quantized_source_bytes(r.quantized_source_bytes);
  out->set_quantized_bytes(r.quantized_bytes);
  out->set_matmul_precision(r.matmul_precision.empty() ? "highest" : r.matmul_precision);
  out->set_bf16_products(r.bf16_products);
  out->set_device(r.device);
  for (const auto& c : r.conversions) out->add_conversions(c);
  out->set_load_seconds(r.load_seconds);
}


AdminService::AdminService(ServingContext& context,
                           std::chrono::steady_clock::duration load_timeout)
    : ctx_(context), load_timeout_(load_timeout), worker_(LowerThreadPriority) {}

AdminService::~AdminService() = default;

void AdminService::SubmitJob(const char* what,
                             std::function<void(const std::function<bool()>& may_answer)> work,
                             std::function<void(const absl::Status&)> abandoned) {
  AdminWorker::Job job;
  job.timeout = load_timeout_;
  std::shared_ptr<std::atomic<bool>> claim = job.claim;
  job.run = [claim, work = std::move(work)] { work([&claim] { return AdminWorker::Claim(*claim); }); };
  const double timeout_s = std::chrono::duration<double>(load_timeout_).count();
  job.abandon = [this, what, timeout_s, abandoned = std::move(abandoned)](bool shutting_down) {
    if (shutting_down) {
      abandoned(absl::UnavailableError("the server is shutting down"));
      return;
    }
    spdlog::error("{} did not finish within {} s (--adapter_load_timeout_s); abandoned", what,
                  timeout_s);
    ctx_.metrics.AdapterLoad("admin", "timeout", timeout_s);
    abandoned(absl::DeadlineExceededError(absl::StrCat(
        what, " did not finish within ", timeout_s, " s and was abandoned; the adapter table is unchanged")));
  };
  worker_.Submit(std::move(job));
}

void AdminService::Run(grpc::CallbackServerContext* context, grpc::ServerUnaryReactor* reactor,
                       const char* what,
                       std::function<void(const std::function<bool()>& may_answer)> work) {
  // Once an abandoned call is answered gRPC may free its context at any time: the job looks at
  // the context only under this lock and only while the call is not answered.
  struct CallGuard {
    absl::Mutex mu;
    bool answered ABSL_GUARDED_BY(mu) = false;
  };
  auto guard = std::make_shared<CallGuard>();
  SubmitJob(
      what,
      [context, reactor, guard, work = std::move(work)](const std::function<bool()>& may_answer) {
        bool cancelled = false;
        {
          absl::MutexLock lock(&guard->mu);
          if (guard->answered) return;  // Abandoned (timed out) while it waited in the queue.
          cancelled = context->IsCancelled();
        }
        if (cancelled) {  // The caller gave up while the job waited in the queue.
          if (may_answer()) {
            reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the call was cancelled"));
          }
          return;
        }
        work(may_answer);
      },
      [reactor, guard](const absl::Status& status) {
        {
          absl::MutexLock lock(&guard->mu);
          guard->answered = true;
        }
        reactor->Finish(ToGrpc(status));
      });
}

void AdminService::LoadJob(const std::function<bool()>& may_answer, const LoadSpec& spec,
                           const std::function<void(const absl::Status&, v1::LoadAdapterResponse)>& answer) {
  bool answered = false;
  auto gate = [&] { return answered = may_answer(); };
  v1::LoadAdapterResponse result;
  absl::Status s = Load(spec, &result, gate);
  if (!answered && !may_answer()) return;
  answer(s, std::move(result));
}

grpc::Status AdminService::Authorize(grpc::CallbackServerContext* context) const {
  if (ctx_.admin_token.empty()) return grpc::Status::OK;
  const auto& md = context->client_metadata();
  auto it = md.find("authorization");
  if (it == md.end()) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                        "admin calls need the metadata \"authorization: Bearer <token>\"");
  }
  const std::string value(it->second.data(), it->second.size());
  if (!absl::StartsWith(value, "Bearer ") || !ConstantTimeEquals(value.substr(7), ctx_.admin_token)) {
    return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "the admin token is not valid");
  }
  return grpc::Status::OK;
}

absl::Status AdminService::Load(const LoadSpec& spec, v1::LoadAdapterResponse* response,
                                const std::function<bool()>& may_publish) {
  return ctx_.residency->Load(spec, response, may_publish).status();
}

bool AdminService::Precheck(grpc::CallbackServerContext* context,
                            grpc::ServerUnaryReactor* reactor, bool needs_model) const {
  if (grpc::Status auth = Authorize(context); !auth.ok()) {
    reactor->Finish(auth);
    return false;
  }
  if (needs_model && !ctx_.ready.load()) {
    reactor->Finish(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the model is still loading"));
    return false;
  }
  return true;
}

grpc::ServerUnaryReactor* AdminService::LoadAdapter(grpc::CallbackServerContext* context,
                                                    const v1::LoadAdapterRequest* request,
                                                    v1::LoadAdapterResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (!Precheck(context, reactor, /*needs_model=*/true)) return reactor;
  // The request and response belong to the call, which an abandoned job outlives: the job
  // works on copies and touches `response` only once it is the one answering.
  Run(context, reactor, "loading an adapter",
      [this, reactor, request = *request, response](const std::function<bool()>& may_answer) {
        LoadSpec spec;
        spec.name = request.name();
        spec.path = request.path();
        spec.validate_only = request.validate_only();
        spec.replace = request.replace();
        spec.pin = request.pin();
        LoadJob(may_answer, spec, [reactor, response](const absl::Status& s, v1::LoadAdapterResponse result) {
                  *response = std::move(result);
                  reactor->Finish(ToGrpc(s));
                });
      });
  return reactor;
}

absl::StatusOr<int64_t> AdminService::Unload(const std::string& name) {
  return ctx_.residency->Unload(name);
}

void AdminService::LoadAsync(
    const std::string& name, const std::string& path,
    std::function<void(const absl::Status&, const v1::LoadAdapterResponse&)> done) {
  auto answer = std::make_shared<decltype(done)>(std::move(done));
  SubmitJob(
      "loading an adapter",
      [this, name, path, answer](const std::function<bool()>& may_answer) {
        LoadSpec spec;
        spec.name = name;
        spec.path = path;
        LoadJob(may_answer, spec, [answer](const absl::Status& s, v1::LoadAdapterResponse result) { (*answer)(s, result); });
      },
      [answer](const absl::Status& s) { (*answer)(s, v1::LoadAdapterResponse()); });
}

void AdminService::UnloadAsync(const std::string& name,
                               std::function<void(const absl::StatusOr<int64_t>&)> done) {
  auto answer = std::make_shared<decltype(done)>(std::move(done));
  SubmitJob(
      "unloading an adapter",
      [this, name, answer](const std::function<bool()>& may_answer) {
        if (may_answer()) (*answer)(Unload(name));
      },
      [answer](const absl::Status& s) { (*answer)(s); });
}

grpc::ServerUnaryReactor* AdminService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                      const v1::UnloadAdapterRequest* request,
                                                      v1::UnloadAdapterResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (!Precheck(context, reactor, /*needs_model=*/true)) return reactor;
  Run(context, reactor, "unloading an adapter",
      [this, reactor, request, response](const std::function<bool()>& may_answer) {
    if (!may_answer()) return;  // From here on this job answers: the call is alive.
    absl::StatusOr<int64_t> in_flight = Unload(request->name());
    if (!in_flight.ok()) {
      reactor->Finish(ToGrpc(in_flight.status()));
      return;
    }
    response->set_in_flight_references(*in_flight);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::ListAdapters(grpc::CallbackServerContext* context,
                                                     const v1::ListAdaptersRequest* request,
                                                     v1::ListAdaptersResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (!Precheck(context, reactor, /*needs_model=*/false)) return reactor;
  if (ctx_.ready.load()) {
    for (const auto& a : ctx_.table->List()) ToProto(adapters::ReportOf(a), response->add_adapters());
    for (auto& s : ctx_.residency->States(request->include_on_disk())) *response->add_states() = std::move(s);
  }
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

grpc::ServerUnaryReactor* AdminService::GetModelState(grpc::CallbackServerContext* context,
                                                      const v1::GetModelStateRequest*,
                                                      v1::ModelState* response) {
  auto* reactor = context->DefaultReactor();
  if (!Precheck(context, reactor, /*needs_model=*/true)) return reactor;
  ToProto(ctx_.engine->report(), response->mutable_base());
  for (const auto& a : ctx_.table->List()) ToProto(adapters::ReportOf(a), response->add_adapters());
  response->set_queue_depth(static_cast<uint32_t>(ctx_.scheduler->queue_depth()));
  response->set_running_requests(static_cast<uint32_t>(ctx_.scheduler->running()));
  response->set_kv_cache_bytes(static_cast<uint64_t>(ctx_.scheduler->kv_bytes()));
  response->set_kv_cache_capacity_bytes(static_cast<uint64_t>(ctx_.scheduler->kv_capacity_bytes()));
  response->set_uptime_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - ctx_.started).count());
  response->mutable_build()->set_version(ADAPTERD_VERSION);
  response->mutable_build()->set_threads(core::Engine::threads());
  response->mutable_build()->set_cpu_kernels(core::Engine::cpu_kernels());
  response->set_max_adapters(static_cast<uint32_t>(ctx_.table->limits().max_adapters));
  response->set_max_adapter_bytes(static_cast<uint64_t>(ctx_.table->limits().max_bytes));
  response->set_adapter_bytes(static_cast<uint64_t>(ctx_.table->bytes()));
  response->set_load_on_demand(ctx_.residency->load_on_demand());
  for (auto& s : ctx_.residency->States(false)) *response->add_adapter_states() = std::move(s);
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace adapterd::server
