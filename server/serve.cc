#include "server/serve.h"

#include <climits>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"
#include "grpcpp/security/tls_certificate_provider.h"
#include "grpcpp/security/tls_credentials_options.h"
#include "nlohmann/json.hpp"
#include "core/mapped_file_guard.h"
#include "core/stop_criteria.h"
#include "server/adapter_residency.h"
#include "server/admin_service.h"
#include "server/commands.h"
#include "server/openai_http.h"
#include "server/flags.h"
#include "server/generation_service.h"
#include "server/tls.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

namespace {

// Plaintext, or TLS whose files are re-read every `reload_s` seconds (certificate rotation).
std::shared_ptr<grpc::ServerCredentials> Credentials(const TlsFiles& tls, int reload_s) {
  if (!tls.enabled()) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      tls.key, tls.cert, tls.client_ca, static_cast<unsigned>(std::max(1, reload_s)));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (!tls.client_ca.empty()) {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  } else {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

std::unique_ptr<grpc::Server> StartServer(const std::string& address,
                                          std::vector<grpc::Service*> services,
                                          const std::shared_ptr<grpc::ServerCredentials>& creds,
                                          int* port) {
  grpc::ServerBuilder builder;
  // gRPC sets SO_REUSEPORT by default, which lets a second server (another adapterd, or
  // anything else of the same user) bind the same port and silently take a share of the
  // connections. A port in use must instead fail this server's start.
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddListeningPort(address, creds, port);
  for (grpc::Service* s : services) builder.RegisterService(s);
  return builder.BuildAndStart();
}

void SetHealth(grpc::Server* server, bool serving) {
  if (server == nullptr || server->GetHealthCheckService() == nullptr) return;
  server->GetHealthCheckService()->SetServingStatus(serving);
  server->GetHealthCheckService()->SetServingStatus("adapterd.v1.Generation", serving);
  server->GetHealthCheckService()->SetServingStatus("adapterd.v1.Admin", serving);
}

}  // namespace

int RunServe() {
  const std::string model_dir = absl::GetFlag(FLAGS_model_dir);
  if (model_dir.empty()) {
    spdlog::error("serve: --model_dir is required");
    return 2;
  }
  if (const double slowdown = absl::GetFlag(FLAGS_max_step_slowdown);
      slowdown != 0 && !(slowdown > 1 && slowdown <= 100)) {
    spdlog::error("serve: --max_step_slowdown {} must be 0 (off) or in (1, 100]", slowdown);
    return 2;
  }
  // Termination signals are taken by a dedicated thread (sigwait), never by a handler.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto ctx = std::make_unique<ServingContext>();
  ctx->limits.default_max_new_tokens = absl::GetFlag(FLAGS_default_max_new_tokens);
  ctx->limits.max_new_tokens_limit = absl::GetFlag(FLAGS_max_new_tokens_limit);
  if (const std::string root = absl::GetFlag(FLAGS_adapter_root); !root.empty()) {
    char resolved[PATH_MAX];
    if (::realpath(root.c_str(), resolved) == nullptr) {
      spdlog::error("serve: --adapter_root {} does not exist", root);
      return 2;
    }
    ctx->adapter_root = resolved;
  }
  if (const std::string file = absl::GetFlag(FLAGS_admin_token_file); !file.empty()) {
    auto token = ReadAdminToken(file);
    if (!token.ok()) {
      spdlog::error("serve: {}", std::string(token.status().message()));
      return 2;
    }
    ctx->admin_token = *std::move(token);
  }
  TlsFiles tls{absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
               absl::GetFlag(FLAGS_tls_client_ca)};
  if (absl::Status s = tls.Validate(); !s.ok()) {
    spdlog::error("serve: {}", std::string(s.message()));
    return 2;
  }
  // The admin API changes what every client gets: off loopback it needs both a token and TLS,
  // or the token would cross the network in cleartext.
  if (!IsLoopbackAddress(absl::GetFlag(FLAGS_admin_listen)) &&
      (ctx->admin_token.empty() || !tls.enabled())) {
    spdlog::error("serve: --admin_listen {} is not a loopback address: it needs "
                  "--admin_token_file and TLS (--tls_cert, --tls_key)",
                  absl::GetFlag(FLAGS_admin_listen));
    return 2;
  }
  const std::string http_listen = absl::GetFlag(FLAGS_http_listen);
  if (absl::GetFlag(FLAGS_http_admin) && !http_listen.empty() && !IsLoopbackAddress(http_listen) &&
      (ctx->admin_token.empty() || !tls.enabled())) {
    spdlog::error("serve: --http_admin on --http_listen {} (not loopback) needs --admin_token_file and TLS",
                  http_listen);
    return 2;
  }
  const std::string adapter_dtype = absl::GetFlag(FLAGS_adapter_dtype);
  if (adapter_dtype != "auto" && adapter_dtype != "bfloat16") {
    spdlog::error("serve: --adapter_dtype must be auto or bfloat16, not \"{}\"", adapter_dtype);
    return 2;
  }
  if (absl::GetFlag(FLAGS_mix_cache_size) < 0) {
    spdlog::error("serve: --mix_cache_size must be >= 0");
    return 2;
  }
  std::string api_key;
  if (const std::string file = absl::GetFlag(FLAGS_api_key_file); !file.empty()) {
    auto key = ReadAdminToken(file, "--api_key_file");  // Same file rules as the admin token.
    if (!key.ok()) {
      spdlog::error("serve: {}", std::string(key.status().message()));
      return 2;
    }
    api_key = *std::move(key);
  }
  if (!tls.enabled() && !IsLoopbackAddress(absl::GetFlag(FLAGS_listen))) {
    spdlog::warn("serve: generation listener {} is not loopback and serves plaintext (no "
                 "--tls_cert)", absl::GetFlag(FLAGS_listen));
  }

  auto metrics_port = ctx->metrics.Serve(absl::GetFlag(FLAGS_metrics_listen), tls);
  if (!metrics_port.ok()) {
    spdlog::error("serve: {}", std::string(metrics_port.status().message()));
    return 1;
  }
  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  GenerationService generation(*ctx);
  const auto load_timeout =
      std::chrono::milliseconds(static_cast<int64_t>(1000 * absl::GetFlag(FLAGS_adapter_load_timeout_s)));
  ResidencyOptions residency;
  residency.load_on_demand = absl::GetFlag(FLAGS_load_on_demand);
  residency.load_timeout = load_timeout;
  residency.failure_ttl =
      std::chrono::milliseconds(static_cast<int64_t>(1000 * absl::GetFlag(FLAGS_adapter_failure_ttl_s)));
  residency.bf16_factors = adapter_dtype == "bfloat16";
  if (residency.load_on_demand && ctx->adapter_root.empty()) {
    spdlog::error("serve: --load_on_demand needs --adapter_root");
    return 2;
  }
  ctx->residency = std::make_unique<AdapterResidency>(*ctx, residency);
  AdminService admin(*ctx, load_timeout);
  OpenAiOptions http_options;
  http_options.model_id = absl::GetFlag(FLAGS_served_model_name);
  if (http_options.model_id.empty()) http_options.model_id = AdapterNameOf(model_dir);
  http_options.api_key = api_key;
  http_options.admin = absl::GetFlag(FLAGS_http_admin);
  http_options.threads = absl::GetFlag(FLAGS_http_threads);
  OpenAiServer http(*ctx, &admin, http_options);
  int http_port = 0;
  if (!http_listen.empty()) {
    auto bound = http.Start(http_listen, tls);
    if (!bound.ok()) {
      spdlog::error("serve: {}", std::string(bound.status().message()));
      return 1;
    }
    http_port = *bound;
  }
  int port = 0, admin_port = 0;
  const auto creds = Credentials(tls, absl::GetFlag(FLAGS_tls_reload_interval_s));
  auto server = StartServer(absl::GetFlag(FLAGS_listen), {&generation}, creds, &port);
  auto admin_server = StartServer(absl::GetFlag(FLAGS_admin_listen), {&admin}, creds, &admin_port);
  if (server == nullptr || admin_server == nullptr) {
    spdlog::error("serve: cannot listen on {} / {}", absl::GetFlag(FLAGS_listen),
                  absl::GetFlag(FLAGS_admin_listen));
    return 1;
  }
  SetHealth(server.get(), false);
  SetHealth(admin_server.get(), false);
  spdlog::info("listening: generation port {}, admin port {}, metrics port {}, HTTP port {}", port,
               admin_port, *metrics_port, http_listen.empty() ? std::string("off") : std::to_string(http_port));

  core::EngineOptions options;
  options.model_dir = model_dir;
  options.device = absl::GetFlag(FLAGS_device);
  options.dtype = absl::GetFlag(FLAGS_dtype);
  options.threads = absl::GetFlag(FLAGS_threads);
  options.cpu_kernels = absl::GetFlag(FLAGS_cpu_kernels);
  options.kv_cache_dtype = absl::GetFlag(FLAGS_kv_cache_dtype);
  options.matmul_precision = absl::GetFlag(FLAGS_matmul_precision);
  options.prefix_cache_bytes = absl::GetFlag(FLAGS_prefix_cache_bytes);
  options.map_weights = absl::GetFlag(FLAGS_mmap);
  options.refresh_small_pages = absl::GetFlag(FLAGS_mmap_refresh_small_pages);
  options.quantize = absl::GetFlag(FLAGS_quantize);
  core::SetMappedFileNoticeHandler([](const std::string& line) { spdlog::warn("{}", line); });
  core::LoadReport report;
  auto engine = core::Engine::Load(options, &report);
  if (!engine.ok()) {
    spdlog::error("serve: model refused: {}", std::string(engine.status().message()));
    std::fputs(report.ToText().c_str(), stderr);
    return 1;
  }
  ctx->engine = *std::move(engine);
  ctx->model_dir = model_dir;
  spdlog::info("model {} ({} parameters) loaded in {:.3f} s; {} intra-op threads, "
               "CPU kernels {}",
               report.architecture, report.parameter_count, report.load_seconds,
               core::Engine::threads(), core::Engine::cpu_kernels());
  if (report.quantization == "int8") spdlog::info("int8 products: {} kernel", core::Engine::w8a8_kernel());
  auto tokenizer = core::Tokenizer::FromModelDir(model_dir);
  if (tokenizer.ok()) {
    ctx->tokenizer = *std::move(tokenizer);
  } else if (absl::IsNotFound(tokenizer.status())) {
    spdlog::warn("no tokenizer.json in {}: text prompts are refused, token ids work", model_dir);
  } else {
    spdlog::error("serve: tokenizer refused: {}", std::string(tokenizer.status().message()));
    return 1;
  }
  auto chat_template = jinja::ChatTemplate::FromModelDir(model_dir);
  if (chat_template.ok()) {
    ctx->chat_template = *std::move(chat_template);
  } else {
    ctx->chat_template_error = std::string(chat_template.status().message());
    spdlog::warn("chat requests are refused: {}", ctx->chat_template_error);
  }
  ctx->table = std::make_unique<adapters::AdapterTable>(adapters::AdapterTable::Limits{
      absl::GetFlag(FLAGS_max_adapters), absl::GetFlag(FLAGS_max_adapter_bytes)});
  ctx->mixes = std::make_unique<adapters::MixCache>(static_cast<size_t>(absl::GetFlag(FLAGS_mix_cache_size)));
  SchedulerOptions sched;
  sched.max_batch_rows = absl::GetFlag(FLAGS_max_batch_rows);
  sched.max_tokens_per_step = absl::GetFlag(FLAGS_max_tokens_per_step);
  sched.max_step_slowdown = absl::GetFlag(FLAGS_max_step_slowdown);
  sched.max_queue = absl::GetFlag(FLAGS_max_queue);
  sched.max_kv_bytes = absl::GetFlag(FLAGS_max_kv_bytes);
  sched.eos_token_ids = core::EosTokenIds(ctx->engine->config(), ctx->tokenizer.get());
  ctx->scheduler = std::make_unique<Scheduler>(*ctx->engine, ctx->tokenizer.get(), &ctx->metrics, sched);
  ctx->residency->SetSettledHook([scheduler = ctx->scheduler.get()] { scheduler->Wake(); });
  ctx->metrics.SetModelInfo(report.architecture,
                            report.name_or_path.empty() ? model_dir : report.name_or_path,
                            report.parameter_count, report.weights_dtype, report.quantization);
  ctx->metrics.SetRetainedUnloaded(static_cast<size_t>(absl::GetFlag(FLAGS_max_adapters)));
  ctx->metrics.SetAdapters({});
  ctx->ready.store(true);

  for (const std::string& spec : absl::GetFlag(FLAGS_preload)) {
    std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    if (parts.size() != 2) {
      spdlog::error("serve: --preload takes name=relative/path, got \"{}\"", spec);
      return 2;
    }
    adapterd::v1::LoadAdapterResponse response;
    LoadSpec load;
    load.name = parts[0];
    load.path = parts[1];
    load.pin = absl::GetFlag(FLAGS_pin_preloaded);
    load.trigger = LoadTrigger::kPreload;
    if (absl::Status s = admin.Load(load, &response); !s.ok()) {
      spdlog::error("serve: preloading {} failed: {}", spec, std::string(s.message()));
      return 1;
    }
  }

  SetHealth(server.get(), true);
  SetHealth(admin_server.get(), true);
  if (const std::string file = absl::GetFlag(FLAGS_port_file); !file.empty()) {
    std::ofstream out(file + ".tmp");
    nlohmann::json ports = {{"listen", port}, {"admin", admin_port}, {"metrics", *metrics_port}};
    if (!http_listen.empty()) ports["http"] = http_port;
    out << ports.dump();
    out.close();
    std::rename((file + ".tmp").c_str(), file.c_str());
  }
  spdlog::info("serving");

  // A LoRA-affinity routing gauge, refreshed while serving (the scheduler publishes the
  // queue, running and KV gauges itself after every step).
  std::atomic<bool> stopping{false};
  std::thread lora_info([&] {
    while (!stopping.load()) {
      ctx->metrics.SetLoraInfo(ctx->scheduler->RunningAdapters(), ctx->scheduler->WaitingAdapters(),
                               ctx->table->limits().max_adapters);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });

  int sig = 0;
  sigwait(&signals, &sig);
  spdlog::info("signal {}: draining (grace period {} s)", sig, absl::GetFlag(FLAGS_grace_period_s));
  SetHealth(server.get(), false);
  SetHealth(admin_server.get(), false);
  ctx->draining.store(true);
  ctx->scheduler->StopAdmission();
  const auto grace = std::chrono::steady_clock::now() +
                     std::chrono::milliseconds(static_cast<int64_t>(
                         1000 * absl::GetFlag(FLAGS_grace_period_s)));
  if (!ctx->scheduler->WaitIdle(grace)) {
    spdlog::warn("grace period over: cancelling {} running and {} queued requests",
                 ctx->scheduler->running(), ctx->scheduler->queue_depth());
    ctx->scheduler->CancelAll();
    ctx->scheduler->WaitIdle(std::chrono::steady_clock::now() + std::chrono::seconds(5));
  }
  const auto deadline = std::chrono::system_clock::now() + std::chrono::seconds(2);
  server->Shutdown(deadline);
  admin_server->Shutdown(deadline);
  http.Stop();
  stopping.store(true);
  lora_info.join();
  const bool loader_stuck = ctx->residency->Shutdown();
  if (admin.StopWorker() || loader_stuck) {
    // A thread is still inside an abandoned adapter load and may touch the model: leave
    // without destroying anything (there is nothing left to save).
    spdlog::warn("an abandoned adapter load is still running; exiting without waiting for it");
    spdlog::shutdown();
    std::_Exit(0);
  }
  ctx->scheduler.reset();
  spdlog::info("stopped");
  return 0;
}

}  // namespace adapterd::server
