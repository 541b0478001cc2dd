// adapterctl: the command-line client of adapterd.
//   adapterctl [--addr H:P] generate --prompt TEXT | --prompt_ids 1,2 [--adapter NAME] ...
//   adapterctl [--admin_addr H:P] load NAME PATH [--validate_only] [--replace] [--pin]
//   adapterctl [--admin_addr H:P] unload NAME | list [--on_disk] | state
//   adapterctl [--addr H:P] health
// --json prints the response as JSON. The admin token comes from --admin_token_file or the
// environment variable ADAPTERD_ADMIN_TOKEN.
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "server/bench.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "adapterd/v1/admin.grpc.pb.h"
#include "adapterd/v1/generation.grpc.pb.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"

ABSL_FLAG(std::string, addr, "127.0.0.1:50051", "adapterd generation listener.");
ABSL_FLAG(std::string, admin_addr, "127.0.0.1:50052", "adapterd admin listener.");
ABSL_FLAG(std::string, admin_token_file, "", "File holding the admin bearer token.");
ABSL_FLAG(bool, json, false, "Print responses as JSON.");
ABSL_FLAG(std::string, prompt, "", "Prompt text (generate).");
ABSL_FLAG(std::string, prompt_ids, "", "Prompt token ids, comma-separated (generate).");
ABSL_FLAG(std::string, adapter, "", "Adapter name (generate); empty: the base model.");
ABSL_FLAG(std::string, mix, "",
          "A weighted mix of LoRA adapters instead of --adapter (generate): name=weight,... "
          "e.g. a=0.7,b=-0.4.");
ABSL_FLAG(uint32_t, max_new_tokens, 64, "Most tokens to generate.");
ABSL_FLAG(float, temperature, 0.0f, "Sampling temperature; 0 = greedy.");
ABSL_FLAG(int32_t, top_k, 0, "Top-k; 0 = off.");
ABSL_FLAG(float, top_p, 1.0f, "Top-p; 1 = off.");
ABSL_FLAG(uint64_t, seed, 0, "Sampling seed.");
ABSL_FLAG(bool, ignore_eos, false, "Generate past end-of-sequence.");
ABSL_FLAG(bool, validate_only, false, "load: validate without publishing.");
ABSL_FLAG(bool, replace, false, "load: replace an adapter of the same name.");
ABSL_FLAG(bool, pin, false, "load: never evict the adapter (with adapterd --load_on_demand).");
ABSL_FLAG(bool, on_disk, false, "list: also list adapter folders that are not resident.");
ABSL_FLAG(double, timeout_s, 60, "Deadline of each call in seconds.");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA bundle: connect over TLS, trusting it (the server's --tls_cert issuer).");
ABSL_FLAG(std::string, tls_cert, "", "PEM client certificate, for servers with --tls_client_ca.");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls_cert.");

namespace {

namespace v1 = adapterd::v1;

std::string Json(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.always_print_primitive_fields = true;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

int Fail(const grpc::Status& s) {
  std::cerr << "error: " << s.error_code() << " " << s.error_message() << "\n";
  return 1;
}

std::string ReadPem(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  if (!in) std::cerr << "warning: cannot read " << path << "\n";
  return ss.str();
}

// Plaintext, or TLS with --tls_ca (and a client certificate for mutual TLS).
std::shared_ptr<grpc::Channel> Channel(const std::string& address) {
  if (absl::GetFlag(FLAGS_tls_ca).empty()) {
    return grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  }
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadPem(absl::GetFlag(FLAGS_tls_ca));
  if (!absl::GetFlag(FLAGS_tls_cert).empty()) {
    ssl.pem_cert_chain = ReadPem(absl::GetFlag(FLAGS_tls_cert));
    ssl.pem_private_key = ReadPem(absl::GetFlag(FLAGS_tls_key));
  }
  return grpc::CreateChannel(address, grpc::SslCredentials(ssl));
}

void SetDeadline(grpc::ClientContext& ctx) {
  ctx.set_deadline(std::chrono::system_clock::now() +
                   std::chrono::milliseconds(static_cast<int64_t>(1000 * absl::GetFlag(FLAGS_timeout_s))));
}

void AddToken(grpc::ClientContext& ctx) {
  std::string token;
  if (const std::string f = absl::GetFlag(FLAGS_admin_token_file); !f.empty()) {
    std::ifstream in(f);
    std::getline(in, token);
  } else if (const char* env = std::getenv("ADAPTERD_ADMIN_TOKEN")) {
    token = env;
  }
  while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
}

int Generate() {
  auto stub = v1::Generation::NewStub(
      Channel(absl::GetFlag(FLAGS_addr)));
  v1::GenerateRequest req;
  if (!absl::GetFlag(FLAGS_prompt_ids).empty()) {
    for (absl::string_view p : absl::StrSplit(absl::GetFlag(FLAGS_prompt_ids), ',')) {
      int32_t id;
      if (!absl::SimpleAtoi(p, &id)) {
        std::cerr << "--prompt_ids must be comma-separated integers\n";
        return 2;
      }
      req.mutable_token_ids()->add_ids(id);
    }
  } else {
    req.set_text(absl::GetFlag(FLAGS_prompt));
  }
  req.set_adapter(absl::GetFlag(FLAGS_adapter));
  if (const std::string mix = absl::GetFlag(FLAGS_mix); !mix.empty()) {
    for (absl::string_view part : absl::StrSplit(mix, ',')) {
      std::pair<std::string, std::string> nw = absl::StrSplit(part, absl::MaxSplits('=', 1));
      float weight = 0;
      if (nw.first.empty() || !absl::SimpleAtof(nw.second, &weight)) {
        std::cerr << "--mix must be name=weight,... (e.g. a=0.7,b=-0.4), not \"" << mix << "\"\n";
        return 2;
      }
      v1::WeightedAdapter* w = req.add_adapters();
      w->set_name(nw.first);
      w->set_weight(weight);
    }
  }
  req.set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
  req.set_temperature(absl::GetFlag(FLAGS_temperature));
  req.set_top_k(absl::GetFlag(FLAGS_top_k));
  req.set_top_p(absl::GetFlag(FLAGS_top_p));
  req.set_seed(absl::GetFlag(FLAGS_seed));
  req.set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  auto reader = stub->GenerateStream(&ctx, req);
  v1::GenerateStreamResponse chunk;
  while (reader->Read(&chunk)) {
    if (absl::GetFlag(FLAGS_json)) {
      std::cout << Json(chunk) << "\n";
    } else {
      std::cout << chunk.text() << std::flush;
      if (chunk.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
        std::cerr << "\n[" << v1::FinishReason_Name(chunk.finish_reason()) << ", "
                  << chunk.stats().completion_tokens() << " tokens, "
                  << chunk.stats().total_seconds() << " s]\n";
      }
    }
  }
  grpc::Status s = reader->Finish();
  return s.ok() ? 0 : Fail(s);
}

int Admin(const std::string& command, const std::vector<std::string>& args) {
  auto stub = v1::Admin::NewStub(
      Channel(absl::GetFlag(FLAGS_admin_addr)));
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  AddToken(ctx);
  grpc::Status s;
  if (command == "load") {
    if (args.size() != 2) {
      std::cerr << "usage: adapterctl load NAME PATH\n";
      return 2;
    }
    v1::LoadAdapterRequest req;
    req.set_name(args[0]);
    req.set_path(args[1]);
    req.set_validate_only(absl::GetFlag(FLAGS_validate_only));
    req.set_replace(absl::GetFlag(FLAGS_replace));
    req.set_pin(absl::GetFlag(FLAGS_pin));
    v1::LoadAdapterResponse resp;
    s = stub->LoadAdapter(&ctx, req, &resp);
    if (s.ok()) {
      if (absl::GetFlag(FLAGS_json)) {
        std::cout << Json(resp) << "\n";
      } else {
        const auto& r = resp.report();
        std::cout << (resp.loaded() ? "loaded " : "validated ") << r.name() << " (" << r.type()
                  << ", " << r.matched_modules_size() << " modules, " << r.num_virtual_tokens()
                  << " virtual tokens, " << r.bytes() << " bytes, " << r.load_seconds() << " s)\n";
        for (const auto& w : r.warnings()) std::cout << "warning: " << w << "\n";
      }
    }
  } else if (command == "unload") {
    if (args.size() != 1) {
      std::cerr << "usage: adapterctl unload NAME\n";
      return 2;
    }
    v1::UnloadAdapterRequest req;
    req.set_name(args[0]);
    v1::UnloadAdapterResponse resp;
    s = stub->UnloadAdapter(&ctx, req, &resp);
    if (s.ok()) {
      std::cout << (absl::GetFlag(FLAGS_json) ? Json(resp) : "unloaded " + args[0]) << "\n";
    }
  } else if (command == "list") {
    v1::ListAdaptersRequest req;
    req.set_include_on_disk(absl::GetFlag(FLAGS_on_disk));
    v1::ListAdaptersResponse resp;
    s = stub->ListAdapters(&ctx, req, &resp);
    if (s.ok()) {
      if (absl::GetFlag(FLAGS_json)) {
        std::cout << Json(resp) << "\n";
      } else {
        std::map<std::string, const v1::AdapterReport*> reports;
        for (const auto& r : resp.adapters()) reports[r.name()] = &r;
        // name, state, type, path, bytes, hits, pinned / the error of a failed load.
        for (const auto& st : resp.states()) {
          std::string state = v1::AdapterState::State_Name(st.state());
          std::transform(state.begin(), state.end(), state.begin(), ::tolower);
          std::cout << st.name() << "\t" << state;
          if (auto it = reports.find(st.name()); it != reports.end()) {
            std::cout << "\t" << it->second->type() << "\t" << it->second->path() << "\t" << st.bytes()
                      << " bytes\t" << st.hits() << " hits" << (st.pinned() ? "\tpinned" : "");
          }
          if (!st.error().empty()) std::cout << "\t" << st.error();
          std::cout << "\n";
        }
      }
    }
  } else {  // state
    v1::ModelState resp;
    s = stub->GetModelState(&ctx, v1::GetModelStateRequest(), &resp);
    if (s.ok()) {
      if (absl::GetFlag(FLAGS_json)) {
        std::cout << Json(resp) << "\n";
      } else {
        const auto& b = resp.base();
        std::cout << "model     " << b.architecture() << " " << b.name_or_path() << " ("
                  << b.parameter_count() << " parameters, " << (b.ok() ? "OK" : "REFUSED") << ")\n";
        for (const auto& t : b.tied()) {
          std::cout << "tied      " << t.target() << " -> " << t.source()
                    << (t.same_storage() ? " (same storage)" : "") << "\n";
        }
        std::cout << "adapters  " << resp.adapters_size() << "/" << resp.max_adapters() << "\n"
                  << "queue     " << resp.queue_depth() << " waiting, " << resp.running_requests()
                  << " running\n"
                  << "kv cache  " << resp.kv_cache_bytes() << " / " << resp.kv_cache_capacity_bytes()
                  << " bytes\n"
                  << "uptime    " << resp.uptime_seconds() << " s, version "
                  << resp.build().version() << ", " << resp.build().threads()
                  << " threads, CPU kernels " << resp.build().cpu_kernels() << "\n";
      }
    }
  }
  return s.ok() ? 0 : Fail(s);
}

int Health() {
  auto channel = Channel(absl::GetFlag(FLAGS_addr));
  grpc::ByteBuffer request_buf, response_buf;
  // grpc.health.v1.HealthCheckRequest{service: ""} is the empty message.
  grpc::GenericStub stub(channel);
  grpc::ClientContext ctx;
  SetDeadline(ctx);
  grpc::Slice empty("");
  request_buf = grpc::ByteBuffer(&empty, 1);
  grpc::CompletionQueue cq;
  auto call = stub.PrepareUnaryCall(&ctx, "/grpc.health.v1.Health/Check", request_buf, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&response_buf, &status, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  cq.Next(&tag, &ok);
  if (!status.ok()) return Fail(status);
  // HealthCheckResponse{status = 1 (SERVING)} is encoded as 08 01.
  std::vector<grpc::Slice> slices;
  (void)response_buf.Dump(&slices);
  std::string bytes;
  for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  const bool serving = bytes.size() == 2 && bytes[0] == 0x08 && bytes[1] == 0x01;
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << "{\"status\":\"" << (serving ? "SERVING" : "NOT_SERVING") << "\"}\n";
  } else {
    std::cout << (serving ? "SERVING" : "NOT_SERVING") << "\n";
  }
  return serving ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "adapterctl COMMAND [flags]\n"
      "  generate --prompt TEXT | --prompt_ids 1,2,3 [--adapter NAME] [--max_new_tokens N]\n"
      "  load NAME PATH [--validate_only] [--replace] [--pin]\n"
      "  unload NAME\n  list [--on_disk]\n  state\n  health\n"
      "  bench [--scenario F | --mode closed --concurrency 1,2,4 | --mode open --rates 1,2]\n"
      "        [--requests N] [--duration_s S] [--prompt_tokens 64] [--output_tokens 32]\n"
      "        [--adapters a,b --adapter_choice uniform|zipf] [--http URL] [--metrics_url URL] --out F\n"
      "  bench report RESULTS.json --out DIR");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() < 2) {
    std::cerr << absl::ProgramUsageMessage() << "\n";
    return 2;
  }
  const std::string command = args[1];
  std::vector<std::string> rest(args.begin() + 2, args.end());
  if (command == "generate") return Generate();
  if (command == "health") return Health();
  if (command == "bench") {
    if (!rest.empty() && rest[0] == "report") {
      char self[4096];
      const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
      return adapterd::bench::RunReport(std::vector<std::string>(rest.begin() + 1, rest.end()),
                                        n > 0 ? std::string(self, static_cast<size_t>(n)) : std::string(argv[0]));
    }
    if (!rest.empty()) {
      std::cerr << "bench takes flags only (or: bench report RESULTS.json --out DIR)\n";
      return 2;
    }
    return adapterd::bench::RunBench(Channel(absl::GetFlag(FLAGS_addr)));
  }
  if (command == "load" || command == "unload" || command == "list" || command == "state") {
    return Admin(command, rest);
  }
  std::cerr << "unknown command \"" << command << "\"\n" << absl::ProgramUsageMessage() << "\n";
  return 2;
}
