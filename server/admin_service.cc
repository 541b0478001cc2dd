#include "server/admin_service.h"

#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <map>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "server/adapter_paths.h"
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
  out->set_compute_dtype(r.compute_dtype);
  out->set_device(r.device);
  for (const auto& c : r.conversions) out->add_conversions(c);
  out->set_load_seconds(r.load_seconds);
}

namespace {
// The kernel's struct sched_attr (SCHED_ATTR_SIZE_VER1), which glibc does not declare.
struct SchedAttr {
  uint32_t size;
  uint32_t sched_policy;
  uint64_t sched_flags;
  int32_t sched_nice;
  uint32_t sched_priority;
  uint64_t sched_runtime;
  uint64_t sched_deadline;
  uint64_t sched_period;
  uint32_t sched_util_min;
  uint32_t sched_util_max;
};

// Loading reads, checks and copies files: a few ms of CPU that must not stall the model's
// steps (a parallel step waits for its slowest thread). At nice 19 the thread takes little CPU
// while the cores are busy, and with a 100 µs slice (Linux >= 6.12 EEVDF; older kernels ignore
// it) a waking step thread preempts it at once instead of after a full 3 ms slice.
// (SCHED_IDLE would protect the steps too, but starves loads for seconds.)
void LowerAdminThreadPriority() {
  ::setpriority(PRIO_PROCESS, static_cast<id_t>(::syscall(SYS_gettid)), 19);
  SchedAttr attr{};
  attr.size = sizeof(attr);
  attr.sched_policy = SCHED_OTHER;
  attr.sched_nice = 19;
  attr.sched_runtime = 100 * 1000;  // ns
  (void)::syscall(SYS_sched_setattr, 0, &attr, 0);
}

}  // namespace

AdminService::AdminService(ServingContext& context,
                           std::chrono::steady_clock::duration load_timeout)
    : ctx_(context), load_timeout_(load_timeout), worker_(LowerAdminThreadPriority) {}

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
    ctx_.metrics.AdapterLoad("timeout", timeout_s);
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

void AdminService::LoadJob(const std::function<bool()>& may_answer, const std::string& name,
                           const std::string& path, bool validate_only, bool replace,
                           const std::function<void(const absl::Status&, v1::LoadAdapterResponse)>& answer) {
  bool answered = false;
  auto gate = [&] { return answered = may_answer(); };
  v1::LoadAdapterResponse result;
  absl::Status s = Load(name, path, validate_only, replace, &result, gate);
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

void AdminService::PublishAdapterMetrics() {
  std::map<std::string, int64_t> bytes;
  for (const auto& a : ctx_.table->List()) bytes[adapters::ReportOf(a).name] = adapters::ReportOf(a).bytes;
  ctx_.metrics.SetAdapters(bytes);
}

absl::Status AdminService::Load(const std::string& name, const std::string& path,
                                bool validate_only, bool replace, v1::LoadAdapterResponse* response,
                                const std::function<bool()>& may_publish) {
  const auto start = std::chrono::steady_clock::now();
  auto seconds = [&] {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  };
  if (!IsValidAdapterName(name)) {
    ctx_.metrics.AdapterLoad("refused", seconds());
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter name \"", name, "\" must be 1-64 characters of letters, digits, '.', '_', '-'"));
  }
  auto dir = ResolveAdapterPath(ctx_.adapter_root, path);
  if (!dir.ok()) {
    ctx_.metrics.AdapterLoad("refused", seconds());
    return dir.status();
  }
  adapters::AdapterReport report;
  const adapters::AdapterFileRules rules{
      ctx_.adapter_root, static_cast<uint64_t>(ctx_.table->limits().max_bytes)};
  auto adapter = adapters::LoadAdapterFor(*ctx_.engine, *dir, name, &report, rules);
  report.path = path;
  ToProto(report, response->mutable_report());
  if (!adapter.ok()) {
    ctx_.metrics.AdapterLoad("refused", seconds());
    spdlog::warn("adapter {} from {} refused: {}", name, path, std::string(adapter.status().message()));
    return adapter.status();
  }
  if (validate_only) {
    ctx_.metrics.AdapterLoad("validated", seconds());
    return absl::OkStatus();
  }
  if (may_publish && !may_publish()) {
    return absl::DeadlineExceededError("the load was abandoned before it could be published");
  }
  absl::Status inserted = ctx_.table->Insert(*adapter, replace);
  if (!inserted.ok()) {
    ctx_.metrics.AdapterLoad("refused", seconds());
    return inserted;
  }
  response->set_loaded(true);
  ctx_.metrics.AdapterLoad("loaded", seconds());
  PublishAdapterMetrics();
  spdlog::info("adapter {} ({}) loaded from {} in {:.3f} s, {} bytes", name, report.type, path,
               report.load_seconds, report.bytes);
  return absl::OkStatus();
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
        LoadJob(may_answer, request.name(), request.path(), request.validate_only(), request.replace(),
                [reactor, response](const absl::Status& s, v1::LoadAdapterResponse result) {
                  *response = std::move(result);
                  reactor->Finish(ToGrpc(s));
                });
      });
  return reactor;
}

absl::StatusOr<int64_t> AdminService::Unload(const std::string& name) {
  auto removed = ctx_.table->Remove(name);
  if (!removed.ok()) {
    ctx_.metrics.AdapterUnload("not_found");
    return removed.status();
  }
  const int64_t in_flight = removed->use_count() - 1;
  ctx_.metrics.AdapterUnload("unloaded");
  PublishAdapterMetrics();
  spdlog::info("adapter {} unloaded ({} in-flight references)", name, in_flight);
  return in_flight;
}

void AdminService::LoadAsync(
    const std::string& name, const std::string& path,
    std::function<void(const absl::Status&, const v1::LoadAdapterResponse&)> done) {
  auto answer = std::make_shared<decltype(done)>(std::move(done));
  SubmitJob(
      "loading an adapter",
      [this, name, path, answer](const std::function<bool()>& may_answer) {
        LoadJob(may_answer, name, path, false, false,
                [answer](const absl::Status& s, v1::LoadAdapterResponse result) { (*answer)(s, result); });
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
                                                     const v1::ListAdaptersRequest*,
                                                     v1::ListAdaptersResponse* response) {
  auto* reactor = context->DefaultReactor();
  if (!Precheck(context, reactor, /*needs_model=*/false)) return reactor;
  if (ctx_.ready.load()) {
    for (const auto& a : ctx_.table->List()) ToProto(adapters::ReportOf(a), response->add_adapters());
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
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace adapterd::server
