#include "server/bench.h"

#include <httplib.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <random>
#include <sstream>
#include <thread>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "adapterd/v1/generation.grpc.pb.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, scenario, "", "bench: scenario JSON file (replaces the scenario flags).");
ABSL_FLAG(std::string, out, "bench.json", "bench: results file; bench report: output folder.");
ABSL_FLAG(std::string, http, "", "bench: drive the OpenAI HTTP front at this base URL instead of gRPC.");
ABSL_FLAG(std::string, api_key_file, "", "bench --http: file holding the API key.");
ABSL_FLAG(std::string, metrics_url, "", "bench: the server's /metrics URL, scraped before and after.");
ABSL_FLAG(std::string, mode, "closed", "bench: closed (a concurrency sweep) or open (a rate sweep).");
ABSL_FLAG(std::string, concurrency, "1,2,4,8", "bench: closed-loop concurrencies, comma-separated.");
ABSL_FLAG(std::string, rates, "1,2,4", "bench: open-loop request rates per second, comma-separated.");
ABSL_FLAG(int64_t, requests, 32, "bench: requests per level (0: only --duration_s bounds a level).");
ABSL_FLAG(double, duration_s, 60, "bench: the most seconds one level sends requests.");
ABSL_FLAG(int64_t, warmup, 0, "bench: requests per level sent first and left out of the summary.");
ABSL_FLAG(std::string, prompt_tokens, "64", "bench: prompt length: N, uniform:MIN:MAX or normal:MEAN:SD.");
ABSL_FLAG(std::string, output_tokens, "32", "bench: output length: N, uniform:MIN:MAX or normal:MEAN:SD.");
ABSL_FLAG(std::string, prompts_file, "", "bench: JSONL prompts ({\"prompt\": TEXT} or {\"prompt_ids\": [...]}).");
ABSL_FLAG(std::string, adapter_choice, "", "bench: none, one, uniform or zipf (default: none, or one/uniform with --adapters).");
ABSL_FLAG(std::string, adapters, "", "bench: adapter names, comma-separated.");
ABSL_FLAG(std::string, adapter_dir, "", "bench: choose among every adapter folder under this folder.");
ABSL_FLAG(double, zipf_s, 1.1, "bench: Zipf exponent for --adapter_choice zipf.");
ABSL_FLAG(std::string, model, "", "bench --http: `model` for requests without an adapter (default: the first of /v1/models).");
ABSL_FLAG(double, bench_temperature, 0.0, "bench: sampling temperature.");
ABSL_FLAG(uint64_t, bench_seed, 1, "bench: seed of the scenario's random choices (and of sampling).");
ABSL_FLAG(std::string, report_script, "", "bench report: the report script (default: beside adapterctl).");

namespace adapterd::bench {
namespace {

using Json = nlohmann::ordered_json;
using Clock = std::chrono::steady_clock;
namespace v1 = adapterd::v1;

// A bad scenario, named.
struct ScenarioError {
  std::string message;
};

struct Dist {
  std::string kind = "fixed";  // fixed, uniform, normal
  double a = 0, b = 0;         // fixed: a; uniform: [a, b]; normal: mean a, stddev b
  int64_t Sample(std::mt19937_64& rng) const {
    double v = a;
    if (kind == "uniform") v = std::uniform_real_distribution<double>(a, b + 1)(rng);
    if (kind == "normal") v = std::normal_distribution<double>(a, b)(rng);
    return std::max<int64_t>(1, static_cast<int64_t>(v));
  }
  Json ToJson() const {
    if (kind == "fixed") return a;
    if (kind == "uniform") return Json{{"dist", "uniform"}, {"min", a}, {"max", b}};
    return Json{{"dist", "normal"}, {"mean", a}, {"stddev", b}};
  }
};

struct Scenario {
  std::string mode = "closed";
  std::vector<double> levels;  // Concurrencies or rates.
  int64_t requests = 32;
  double duration_s = 60;
  int64_t warmup = 0;
  Dist prompt_tokens, output_tokens;
  std::string prompts_file;
  std::string adapter_choice = "none";
  std::vector<std::string> adapters;
  std::string adapter_dir;
  double zipf_s = 1.1;
  double temperature = 0;
  uint64_t seed = 1;
  std::string model;

  Json ToJson() const {
    return Json{{"mode", mode},
                {mode == "closed" ? "concurrency" : "rates", levels},
                {"requests", requests},
                {"duration_s", duration_s},
                {"warmup", warmup},
                {"prompt_tokens", prompt_tokens.ToJson()},
                {"output_tokens", output_tokens.ToJson()},
                {"prompts_file", prompts_file},
                {"adapters", {{"choice", adapter_choice}, {"names", adapters}, {"dir", adapter_dir}, {"zipf_s", zipf_s}}},
                {"sampling", {{"temperature", temperature}, {"seed", seed}}},
                {"model", model}};
  }
};

std::optional<ScenarioError> ParseDistText(const std::string& name, const std::string& text, Dist* d) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  auto num = [&](const std::string& s, double* v) { return absl::SimpleAtod(s, v) && std::isfinite(*v) && *v >= 0; };
  if (parts.size() == 1 && num(parts[0], &d->a) && d->a >= 1) {
    d->kind = "fixed";
    return std::nullopt;
  }
  if (parts.size() == 3 && (parts[0] == "uniform" || parts[0] == "normal") && num(parts[1], &d->a) &&
      num(parts[2], &d->b) && (parts[0] != "uniform" || d->b >= d->a)) {
    d->kind = parts[0];
    return std::nullopt;
  }
  return ScenarioError{absl::StrCat(name, ": \"", text, "\" is not N, uniform:MIN:MAX or normal:MEAN:STDDEV")};
}

std::optional<ScenarioError> ParseDistJson(const std::string& name, const Json& j, Dist* d) {
  if (j.is_number()) {
    d->kind = "fixed";
    d->a = j.get<double>();
    if (d->a < 1) return ScenarioError{absl::StrCat(name, " must be at least 1")};
    return std::nullopt;
  }
  if (!j.is_object()) return ScenarioError{absl::StrCat(name, " must be a number or {\"dist\": ...}")};
  for (const auto& [k, v] : j.items()) {
    if (k != "dist" && k != "min" && k != "max" && k != "mean" && k != "stddev") {
      return ScenarioError{absl::StrCat(name, ": unknown key \"", k, "\"")};
    }
    if (k != "dist" && !v.is_number()) return ScenarioError{absl::StrCat(name, ".", k, " must be a number")};
  }
  const std::string kind = j.value("dist", "");
  if (kind == "uniform" && j.contains("min") && j.contains("max")) {
    d->kind = kind;
    d->a = j["min"].get<double>();
    d->b = j["max"].get<double>();
    if (d->a < 1 || d->b < d->a) return ScenarioError{absl::StrCat(name, ": need 1 <= min <= max")};
    return std::nullopt;
  }
  if (kind == "normal" && j.contains("mean") && j.contains("stddev")) {
    d->kind = kind;
    d->a = j["mean"].get<double>();
    d->b = j["stddev"].get<double>();
    if (d->a < 1 || d->b < 0) return ScenarioError{absl::StrCat(name, ": need mean >= 1 and stddev >= 0")};
    return std::nullopt;
  }
  return ScenarioError{absl::StrCat(name, ".dist must be \"uniform\" (min, max) or \"normal\" (mean, stddev)")};
}

std::optional<ScenarioError> ParseLevels(const std::string& name, const std::string& text, std::vector<double>* out) {
  for (absl::string_view p : absl::StrSplit(text, ',')) {
    double v = 0;
    if (!absl::SimpleAtod(p, &v) || !(v > 0) || !std::isfinite(v)) {
      return ScenarioError{absl::StrCat(name, ": \"", text, "\" must be positive numbers, comma-separated")};
    }
    out->push_back(v);
  }
  return std::nullopt;
}

std::optional<ScenarioError> ScenarioFromFlags(Scenario* s) {
  s->mode = absl::GetFlag(FLAGS_mode);
  if (s->mode != "closed" && s->mode != "open") return ScenarioError{"--mode must be closed or open"};
  if (auto e = ParseLevels(s->mode == "closed" ? "--concurrency" : "--rates",
                           absl::GetFlag(s->mode == "closed" ? FLAGS_concurrency : FLAGS_rates), &s->levels)) {
    return e;
  }
  s->requests = absl::GetFlag(FLAGS_requests);
  s->duration_s = absl::GetFlag(FLAGS_duration_s);
  s->warmup = absl::GetFlag(FLAGS_warmup);
  if (auto e = ParseDistText("--prompt_tokens", absl::GetFlag(FLAGS_prompt_tokens), &s->prompt_tokens)) return e;
  if (auto e = ParseDistText("--output_tokens", absl::GetFlag(FLAGS_output_tokens), &s->output_tokens)) return e;
  s->prompts_file = absl::GetFlag(FLAGS_prompts_file);
  if (!absl::GetFlag(FLAGS_adapters).empty()) s->adapters = absl::StrSplit(absl::GetFlag(FLAGS_adapters), ',');
  s->adapter_dir = absl::GetFlag(FLAGS_adapter_dir);
  s->adapter_choice = absl::GetFlag(FLAGS_adapter_choice);
  if (s->adapter_choice.empty()) {
    s->adapter_choice = s->adapters.empty() && s->adapter_dir.empty() ? "none" : s->adapters.size() == 1 ? "one" : "uniform";
  }
  s->zipf_s = absl::GetFlag(FLAGS_zipf_s);
  s->temperature = absl::GetFlag(FLAGS_bench_temperature);
  s->seed = absl::GetFlag(FLAGS_bench_seed);
  s->model = absl::GetFlag(FLAGS_model);
  return std::nullopt;
}

std::optional<ScenarioError> ScenarioFromFile(const std::string& path, Scenario* s) {
  std::ifstream in(path);
  if (!in) return ScenarioError{absl::StrCat("scenario ", path, " cannot be read")};
  std::stringstream text;
  text << in.rdbuf();
  const Json j = Json::parse(text.str(), nullptr, false);
  if (j.is_discarded() || !j.is_object()) return ScenarioError{absl::StrCat("scenario ", path, " is not a JSON object")};
  for (const auto& item : j.items()) {
    static const char* kKeys[] = {"mode", "concurrency", "rates", "requests", "duration_s", "warmup", "prompt_tokens",
                                  "output_tokens", "prompts_file", "adapters", "sampling", "model"};
    const std::string k = item.key();
    if (std::find_if(std::begin(kKeys), std::end(kKeys), [&](const char* x) { return k == x; }) == std::end(kKeys)) {
      return ScenarioError{absl::StrCat("scenario: unknown key \"", k, "\"")};
    }
  }
  auto need = [&](const char* key, bool ok, const char* what) -> std::optional<ScenarioError> {
    if (j.contains(key) && !ok) return ScenarioError{absl::StrCat("scenario: \"", key, "\" must be ", what)};
    return std::nullopt;
  };
  if (auto e = need("mode", j.contains("mode") && j["mode"].is_string() && (j["mode"] == "closed" || j["mode"] == "open"),
                    "\"closed\" or \"open\"")) {
    return e;
  }
  s->mode = j.value("mode", "closed");
  const char* levels_key = s->mode == "closed" ? "concurrency" : "rates";
  if (!j.contains(levels_key)) return ScenarioError{absl::StrCat("scenario: \"", levels_key, "\" is required in ", s->mode, " mode")};
  const Json& lv = j[levels_key];
  if (!lv.is_array() || lv.empty()) return ScenarioError{absl::StrCat("scenario: \"", levels_key, "\" must be a list of positive numbers")};
  for (const auto& v : lv) {
    if (!v.is_number() || !(v.get<double>() > 0)) {
      return ScenarioError{absl::StrCat("scenario: \"", levels_key, "\" must be a list of positive numbers")};
    }
    s->levels.push_back(v.get<double>());
  }
  if (auto e = need("requests", j.contains("requests") && j["requests"].is_number_integer() && j["requests"].get<int64_t>() >= 0,
                    "an integer >= 0")) {
    return e;
  }
  if (auto e = need("duration_s", j.contains("duration_s") && j["duration_s"].is_number() && j["duration_s"].get<double>() > 0,
                    "a positive number")) {
    return e;
  }
  if (auto e = need("warmup", j.contains("warmup") && j["warmup"].is_number_integer() && j["warmup"].get<int64_t>() >= 0,
                    "an integer >= 0")) {
    return e;
  }
  s->requests = j.value("requests", int64_t{32});
  s->duration_s = j.value("duration_s", 60.0);
  s->warmup = j.value("warmup", int64_t{0});
  s->prompt_tokens.a = 64;
  s->output_tokens.a = 32;
  if (j.contains("prompt_tokens")) {
    if (auto e = ParseDistJson("prompt_tokens", j["prompt_tokens"], &s->prompt_tokens)) return e;
  }
  if (j.contains("output_tokens")) {
    if (auto e = ParseDistJson("output_tokens", j["output_tokens"], &s->output_tokens)) return e;
  }
  if (auto e = need("prompts_file", j.contains("prompts_file") && j["prompts_file"].is_string(), "a string")) return e;
  s->prompts_file = j.value("prompts_file", "");
  if (auto e = need("model", j.contains("model") && j["model"].is_string(), "a string")) return e;
  s->model = j.value("model", "");
  if (j.contains("adapters")) {
    const Json& a = j["adapters"];
    if (!a.is_object()) return ScenarioError{"scenario: \"adapters\" must be an object"};
    for (const auto& [k, v] : a.items()) {
      if (k == "choice" && v.is_string()) {
        s->adapter_choice = v.get<std::string>();
      } else if (k == "names" && v.is_array()) {
        for (const auto& n : v) {
          if (!n.is_string()) return ScenarioError{"scenario: \"adapters.names\" must be strings"};
          s->adapters.push_back(n.get<std::string>());
        }
      } else if (k == "dir" && v.is_string()) {
        s->adapter_dir = v.get<std::string>();
      } else if (k == "zipf_s" && v.is_number() && v.get<double>() > 0) {
        s->zipf_s = v.get<double>();
      } else {
        return ScenarioError{absl::StrCat("scenario: \"adapters.", k, "\" is unknown or has the wrong type")};
      }
    }
  }
  if (j.contains("sampling")) {
    const Json& sm = j["sampling"];
    if (!sm.is_object()) return ScenarioError{"scenario: \"sampling\" must be an object"};
    for (const auto& [k, v] : sm.items()) {
      if (k == "temperature" && v.is_number() && v.get<double>() >= 0) {
        s->temperature = v.get<double>();
      } else if (k == "seed" && v.is_number_unsigned()) {
        s->seed = v.get<uint64_t>();
      } else {
        return ScenarioError{absl::StrCat("scenario: \"sampling.", k, "\" is unknown or has the wrong type")};
      }
    }
  }
  return std::nullopt;
}

struct Prompt {
  std::string text;
  std::vector<int32_t> ids;
};

// Checks the adapter choice and loads the prompts file.
std::optional<ScenarioError> Finish(Scenario* s, std::vector<Prompt>* prompts) {
  const std::string& c = s->adapter_choice;
  if (c != "none" && c != "one" && c != "uniform" && c != "zipf") {
    return ScenarioError{"adapter choice must be none, one, uniform or zipf"};
  }
  if (!s->adapter_dir.empty()) {
    std::error_code ec;
    for (const auto& entry : std::filesystem::directory_iterator(s->adapter_dir, ec)) {
      if (std::filesystem::exists(entry.path() / "adapter_config.json")) s->adapters.push_back(entry.path().filename());
    }
    if (ec) return ScenarioError{absl::StrCat("adapter folder ", s->adapter_dir, " cannot be listed")};
    std::sort(s->adapters.begin(), s->adapters.end());
  }
  if (c != "none" && s->adapters.empty()) return ScenarioError{absl::StrCat("adapter choice ", c, " needs adapter names or a folder")};
  if (c == "one" && s->adapters.size() != 1) return ScenarioError{"adapter choice one needs exactly one adapter"};
  if (s->levels.empty()) return ScenarioError{"no levels to run"};
  if (s->requests == 0 && !(s->duration_s > 0)) return ScenarioError{"requests or duration_s must bound each level"};
  if (!s->prompts_file.empty()) {
    std::ifstream in(s->prompts_file);
    if (!in) return ScenarioError{absl::StrCat("prompts file ", s->prompts_file, " cannot be read")};
    std::string line;
    int n = 0;
    while (std::getline(in, line)) {
      ++n;
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      const Json j = Json::parse(line, nullptr, false);
      Prompt p;
      if (!j.is_discarded() && j.is_object() && j.contains("prompt") && j["prompt"].is_string()) {
        p.text = j["prompt"].get<std::string>();
      } else if (!j.is_discarded() && j.is_object() && j.contains("prompt_ids") && j["prompt_ids"].is_array()) {
        for (const auto& id : j["prompt_ids"]) {
          if (!id.is_number_integer()) return ScenarioError{absl::StrCat("prompts file line ", n, ": prompt_ids must be integers")};
          p.ids.push_back(id.get<int32_t>());
        }
      } else {
        return ScenarioError{absl::StrCat("prompts file line ", n, ": expected {\"prompt\": TEXT} or {\"prompt_ids\": [...]}")};
      }
      prompts->push_back(std::move(p));
    }
    if (prompts->empty()) return ScenarioError{absl::StrCat("prompts file ", s->prompts_file, " holds no prompt")};
  }
  return std::nullopt;
}

struct Record {
  int level = 0;
  int64_t index = 0;
  bool warmup = false;
  std::string adapter;
  double start = 0, ttft = -1, end = 0;  // Seconds since the run began.
  double queue = -1;                     // The server's queue time (gRPC), seconds.
  double adapter_wait = 0;               // Waited for an on-demand adapter load (gRPC), seconds.
  std::vector<double> itl;
  std::string status = "OK";
  std::string message;
  int64_t prompt_tokens = 0, completion_tokens = 0;
};

// One request to send.
struct Spec {
  std::string adapter;
  Prompt prompt;
  int64_t max_tokens = 0;
  uint64_t seed = 0;
};

std::string HttpCode(int status) {
  switch (status) {
    case 400: return "INVALID_ARGUMENT";
    case 401: return "UNAUTHENTICATED";
    case 403: return "PERMISSION_DENIED";
    case 404: return "NOT_FOUND";
    case 413: return "INVALID_ARGUMENT";
    case 429: return "RESOURCE_EXHAUSTED";
    case 503: return "UNAVAILABLE";
    case 504: return "DEADLINE_EXCEEDED";
    default: return absl::StrCat("HTTP_", status);
  }
}

std::string GrpcCode(grpc::StatusCode c) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                                  "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                  "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                                  "UNAUTHENTICATED"};
  const int i = static_cast<int>(c);
  return i >= 0 && i < 17 ? kNames[i] : absl::StrCat("CODE_", i);
}

class Target {
 public:
  virtual ~Target() = default;
  virtual void Run(const Spec& spec, Clock::time_point t0, Record* r) = 0;
};

double Since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Token arrivals: the first sets TTFT, later ones add inter-token gaps (a chunk of k tokens
// splits its gap evenly).
void Arrive(Record* r, Clock::time_point t0, int64_t tokens, double* last) {
  if (tokens <= 0) return;
  const double now = Since(t0);
  if (r->ttft < 0) {
    r->ttft = now - r->start;
    if (tokens > 1) r->itl.insert(r->itl.end(), static_cast<size_t>(tokens - 1), 0.0);
  } else {
    r->itl.insert(r->itl.end(), static_cast<size_t>(tokens), (now - *last) / static_cast<double>(tokens));
  }
  *last = now;
}

class GrpcTarget final : public Target {
 public:
  GrpcTarget(std::shared_ptr<grpc::Channel> channel, double temperature)
      : stub_(v1::Generation::NewStub(std::move(channel))), temperature_(temperature) {}
  void Run(const Spec& spec, Clock::time_point t0, Record* r) override {
    v1::GenerateRequest req;
    if (!spec.prompt.ids.empty()) {
      req.mutable_token_ids()->mutable_ids()->Assign(spec.prompt.ids.begin(), spec.prompt.ids.end());
    } else {
      req.set_text(spec.prompt.text);
    }
    req.set_adapter(spec.adapter);
    req.set_max_new_tokens(static_cast<uint32_t>(spec.max_tokens));
    req.set_ignore_eos(true);
    req.set_temperature(static_cast<float>(temperature_));
    req.set_seed(spec.seed);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::minutes(10));
    r->start = Since(t0);
    double last = r->start;
    auto reader = stub_->GenerateStream(&ctx, req);
    v1::GenerateStreamResponse chunk;
    while (reader->Read(&chunk)) {
      Arrive(r, t0, chunk.token_ids_size(), &last);
      if (chunk.has_stats()) {
        r->prompt_tokens = chunk.stats().prompt_tokens();
        r->completion_tokens = chunk.stats().completion_tokens();
        r->queue = chunk.stats().queue_seconds();
        r->adapter_wait = chunk.stats().adapter_load_wait_seconds();
      }
    }
    const grpc::Status s = reader->Finish();
    r->end = Since(t0);
    r->status = GrpcCode(s.error_code());
    if (!s.ok()) r->message = s.error_message();
  }

 private:
  std::unique_ptr<v1::Generation::Stub> stub_;
  double temperature_;
};

// URL "http://host:port[/prefix]" split into scheme+host+port and the path prefix.
void SplitUrl(const std::string& url, std::string* origin, std::string* path) {
  const size_t scheme = url.find("://");
  const size_t slash = url.find('/', scheme == std::string::npos ? 0 : scheme + 3);
  *origin = slash == std::string::npos ? url : url.substr(0, slash);
  *path = slash == std::string::npos ? "" : url.substr(slash);
  while (!path->empty() && path->back() == '/') path->pop_back();
}

class HttpTarget final : public Target {
 public:
  HttpTarget(const std::string& url, std::string key, std::string model, double temperature)
      : key_(std::move(key)), model_(std::move(model)), temperature_(temperature) {
    SplitUrl(url, &origin_, &prefix_);
    if (absl::EndsWith(prefix_, "/v1")) prefix_.resize(prefix_.size() - 3);
  }
  void Run(const Spec& spec, Clock::time_point t0, Record* r) override {
    httplib::Client cli(origin_);
    cli.set_read_timeout(600, 0);
    cli.set_connection_timeout(10, 0);
    Json body{{"model", spec.adapter.empty() ? model_ : spec.adapter},
              {"max_tokens", spec.max_tokens},
              {"temperature", temperature_},
              {"seed", spec.seed},
              {"ignore_eos", true},
              {"stream", true},
              {"stream_options", {{"include_usage", true}}}};
    if (!spec.prompt.ids.empty()) {
      body["prompt"] = spec.prompt.ids;
    } else {
      body["prompt"] = spec.prompt.text;
    }
    httplib::Request req;
    req.method = "POST";
    req.path = prefix_ + "/v1/completions";
    req.set_header("Content-Type", "application/json");
    if (!key_.empty()) req.set_header("Authorization", "Bearer " + key_);
    req.body = body.dump();
    std::string buffer;
    r->start = Since(t0);
    double last = r->start;
    std::string error_code;
    req.content_receiver = [&](const char* data, size_t n, uint64_t, uint64_t) {
      buffer.append(data, n);
      size_t end;
      while ((end = buffer.find("\n\n")) != std::string::npos) {
        const std::string event = buffer.substr(0, end);
        buffer.erase(0, end + 2);
        if (event.rfind("data: ", 0) != 0 || event == "data: [DONE]") continue;
        const Json j = Json::parse(event.substr(6), nullptr, false);
        if (j.is_discarded()) continue;
        if (j.contains("error")) {
          error_code = "INTERNAL";
          r->message = j["error"].value("message", "");
          continue;
        }
        if (j.contains("usage") && j["usage"].is_object()) {
          r->prompt_tokens = j["usage"].value("prompt_tokens", int64_t{0});
          r->completion_tokens = j["usage"].value("completion_tokens", int64_t{0});
        }
        if (j.contains("choices") && !j["choices"].empty()) {
          // The server sends one chunk per step, so one chunk with text is one token.
          const bool has_text = !j["choices"][0].value("text", "").empty();
          if (has_text || (r->ttft < 0 && !j["choices"][0]["finish_reason"].is_null())) Arrive(r, t0, 1, &last);
        }
      }
      return true;
    };
    httplib::Response res;
    httplib::Error err = httplib::Error::Success;
    const bool sent = cli.send(req, res, err);
    r->end = Since(t0);
    if (!sent) {
      r->status = "UNAVAILABLE";
      r->message = httplib::to_string(err);
    } else if (res.status != 200) {
      r->status = HttpCode(res.status);
      const Json j = Json::parse(buffer + res.body, nullptr, false);
      if (!j.is_discarded() && j.contains("error")) r->message = j["error"].value("message", "");
    } else if (!error_code.empty()) {
      r->status = error_code;
    }
  }

 private:
  std::string origin_, prefix_, key_, model_;
  double temperature_;
};

// Builds the requests of one level from the scenario's seeded generator.
class Chooser {
 public:
  Chooser(const Scenario& s, const std::vector<Prompt>& prompts) : s_(s), prompts_(prompts), rng_(s.seed) {
    if (s.adapter_choice == "zipf") {
      double total = 0;
      for (size_t k = 1; k <= s.adapters.size(); ++k) total += 1.0 / std::pow(static_cast<double>(k), s.zipf_s);
      double acc = 0;
      for (size_t k = 1; k <= s.adapters.size(); ++k) {
        acc += 1.0 / std::pow(static_cast<double>(k), s.zipf_s) / total;
        zipf_cdf_.push_back(acc);
      }
    }
  }
  Spec Next() {
    std::lock_guard<std::mutex> lock(mu_);
    Spec spec;
    const std::string& c = s_.adapter_choice;
    if (c == "one") {
      spec.adapter = s_.adapters[0];
    } else if (c == "uniform") {
      spec.adapter = s_.adapters[std::uniform_int_distribution<size_t>(0, s_.adapters.size() - 1)(rng_)];
    } else if (c == "zipf") {
      const double u = std::uniform_real_distribution<double>(0, 1)(rng_);
      const size_t k = static_cast<size_t>(std::lower_bound(zipf_cdf_.begin(), zipf_cdf_.end(), u) - zipf_cdf_.begin());
      spec.adapter = s_.adapters[std::min(k, s_.adapters.size() - 1)];
    }
    if (!prompts_.empty()) {
      spec.prompt = prompts_[std::uniform_int_distribution<size_t>(0, prompts_.size() - 1)(rng_)];
    } else {
      const int64_t n = s_.prompt_tokens.Sample(rng_);
      std::uniform_int_distribution<int32_t> id(3, 258);  // Byte-level ids: in every vocabulary.
      for (int64_t i = 0; i < n; ++i) spec.prompt.ids.push_back(id(rng_));
    }
    spec.max_tokens = s_.output_tokens.Sample(rng_);
    spec.seed = rng_();
    return spec;
  }

 private:
  const Scenario& s_;
  const std::vector<Prompt>& prompts_;
  std::mt19937_64 rng_;
  std::vector<double> zipf_cdf_;
  std::mutex mu_;
};

// Nearest-rank percentile of sorted values.
double Percentile(const std::vector<double>& v, double p) {
  if (v.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(p / 100.0 * static_cast<double>(v.size())));
  return v[std::min(v.size() - 1, rank == 0 ? 0 : rank - 1)];
}

Json Stats(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += x;
  return Json{{"count", v.size()},
              {"mean", v.empty() ? 0.0 : sum / static_cast<double>(v.size())},
              {"p50", Percentile(v, 50)},
              {"p90", Percentile(v, 90)},
              {"p99", Percentile(v, 99)}};
}

// Summary of the records that count (not warm-up) among `records`.
Json Summarize(const std::vector<const Record*>& records) {
  std::map<std::string, int64_t> by_status;
  std::vector<double> ttft, itl, latency, ttft_resident, ttft_loaded;
  int64_t tokens = 0, ok = 0;
  double first = 1e300, last = 0;
  for (const Record* r : records) {
    ++by_status[r->status];
    first = std::min(first, r->start);
    last = std::max(last, r->end);
    if (r->status != "OK") continue;
    ++ok;
    tokens += r->completion_tokens;
    if (r->ttft >= 0) {
      ttft.push_back(r->ttft);
      if (!r->adapter.empty()) (r->adapter_wait > 0 ? ttft_loaded : ttft_resident).push_back(r->ttft);
    }
    itl.insert(itl.end(), r->itl.begin(), r->itl.end());
    latency.push_back(r->end - r->start);
  }
  const double wall = records.empty() ? 0 : std::max(1e-9, last - first);
  return Json{{"sent", records.size()},
              {"answered", records.size()},
              {"ok", ok},
              {"by_status", by_status},
              {"wall_s", wall},
              {"requests_per_s", records.empty() ? 0.0 : static_cast<double>(records.size()) / wall},
              {"output_tokens", tokens},
              {"output_tokens_per_s", records.empty() ? 0.0 : static_cast<double>(tokens) / wall},
              {"ttft_s", Stats(ttft)},
              // Requests naming an adapter that was resident, and ones that waited for it to
              // load on demand (adapterd --load_on_demand; gRPC only).
              {"ttft_adapter_resident_s", Stats(ttft_resident)},
              {"ttft_adapter_loaded_s", Stats(ttft_loaded)},
              {"itl_s", Stats(itl)},
              {"latency_s", Stats(latency)}};
}

// Prometheus text samples of adapterd_* families (histogram buckets left out).
Json Scrape(const std::string& url) {
  if (url.empty()) return nullptr;
  std::string origin, path;
  SplitUrl(url, &origin, &path);
  httplib::Client cli(origin);
  cli.set_read_timeout(10, 0);
  auto res = cli.Get(path.empty() ? "/metrics" : path);
  if (!res || res->status != 200) return Json{{"error", absl::StrCat("cannot scrape ", url)}};
  Json out = Json::object();
  std::istringstream lines(res->body);
  std::string line;
  while (std::getline(lines, line)) {
    if (line.rfind("adapterd_", 0) != 0 || line.find("_bucket") != std::string::npos) continue;
    const size_t sp = line.rfind(' ');
    double v = 0;
    if (sp == std::string::npos || !absl::SimpleAtod(line.substr(sp + 1), &v)) continue;
    out[line.substr(0, sp)] = v;
  }
  return out;
}

double CpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

// Live progress on the terminal (one line, rewritten), or a line per level elsewhere.
class Progress {
 public:
  Progress(std::string label, const std::atomic<int64_t>& done, const std::atomic<int64_t>& errors, int64_t total)
      : label_(std::move(label)), done_(done), errors_(errors), total_(total), tty_(isatty(2)),
        start_(Clock::now()) {
    if (tty_) thread_ = std::thread([this] { Loop(); });
  }
  ~Progress() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    Print(true);
  }

 private:
  void Loop() {
    while (!stop_.load()) {
      Print(false);
      std::this_thread::sleep_for(std::chrono::milliseconds(250));
    }
  }
  void Print(bool final) {
    const double t = std::chrono::duration<double>(Clock::now() - start_).count();
    const int64_t done = done_.load();
    std::string bar;
    if (total_ > 0) {
      const int width = 30;
      const int filled = static_cast<int>(width * std::min<double>(1.0, static_cast<double>(done) / static_cast<double>(total_)));
      bar = "[" + std::string(static_cast<size_t>(filled), '#') + std::string(static_cast<size_t>(width - filled), '.') + "] ";
    }
    std::fprintf(stderr, "%s%s %s%lld%s answered, %.1f req/s, %lld errors%s", tty_ ? "\r" : "", label_.c_str(),
                 bar.c_str(), static_cast<long long>(done),
                 total_ > 0 ? absl::StrCat("/", total_).c_str() : "", t > 0 ? static_cast<double>(done) / t : 0.0,
                 static_cast<long long>(errors_.load()), final ? "\n" : "");
    std::fflush(stderr);
  }
  std::string label_;
  const std::atomic<int64_t>& done_;
  const std::atomic<int64_t>& errors_;
  int64_t total_;
  bool tty_;
  Clock::time_point start_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

void RunLevel(const Scenario& s, int level, Target& target, Chooser& chooser, Clock::time_point t0,
              std::vector<Record>* out) {
  const double value = s.levels[static_cast<size_t>(level)];
  const int64_t total = s.requests > 0 ? s.requests + s.warmup : 0;
  const auto stop_at = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(s.duration_s * 1000));
  std::mutex mu;
  std::vector<Record> records;
  std::atomic<int64_t> next{0}, done{0}, errors{0};
  auto one = [&](int64_t index) {
    Record r;
    r.level = level;
    r.index = index;
    r.warmup = index < s.warmup;
    Spec spec = chooser.Next();
    r.adapter = spec.adapter;
    target.Run(spec, t0, &r);
    done.fetch_add(1);
    if (r.status != "OK") errors.fetch_add(1);
    std::lock_guard<std::mutex> lock(mu);
    records.push_back(std::move(r));
  };
  {
    Progress progress(absl::StrCat("level ", level + 1, "/", s.levels.size(), " (",
                                   s.mode == "closed" ? "concurrency " : "rate ", value, ")"),
                      done, errors, total);
    std::vector<std::thread> threads;
    if (s.mode == "closed") {
      for (int c = 0; c < static_cast<int>(value); ++c) {
        threads.emplace_back([&] {
          while (true) {
            const int64_t i = next.fetch_add(1);
            if (total > 0 && i >= total) break;
            if (i >= s.warmup && Clock::now() >= stop_at) break;
            one(i);
          }
        });
      }
    } else {
      std::mt19937_64 rng(s.seed + static_cast<uint64_t>(level));
      std::exponential_distribution<double> gap(value);
      auto when = Clock::now();
      for (int64_t i = 0; total == 0 || i < total; ++i) {
        if (i >= s.warmup && when >= stop_at) break;
        std::this_thread::sleep_until(when);
        threads.emplace_back(one, i);
        when += std::chrono::microseconds(static_cast<int64_t>(gap(rng) * 1e6));
      }
    }
    for (auto& t : threads) t.join();
  }
  std::sort(records.begin(), records.end(), [](const Record& a, const Record& b) { return a.index < b.index; });
  out->insert(out->end(), std::make_move_iterator(records.begin()), std::make_move_iterator(records.end()));
}

Json RecordJson(const Record& r) {
  Json j{{"level", r.level},       {"index", r.index}, {"warmup", r.warmup}, {"adapter", r.adapter},
         {"start_s", r.start},     {"queue_s", r.queue < 0 ? Json(nullptr) : Json(r.queue)},
         {"adapter_load_wait_s", r.adapter_wait},
         {"ttft_s", r.ttft < 0 ? Json(nullptr) : Json(r.ttft)},
         {"end_s", r.end},         {"itl_s", r.itl},   {"status", r.status},
         {"prompt_tokens", r.prompt_tokens}, {"completion_tokens", r.completion_tokens}};
  if (!r.message.empty()) j["message"] = r.message;
  return j;
}

std::string ReadKey(const std::string& path) {
  if (path.empty()) return "";
  std::ifstream in(path);
  std::string key;
  std::getline(in, key);
  while (!key.empty() && std::isspace(static_cast<unsigned char>(key.back()))) key.pop_back();
  return key;
}

}  // namespace

int RunBench(std::shared_ptr<grpc::Channel> channel) {
  Scenario s;
  std::vector<Prompt> prompts;
  std::optional<ScenarioError> e = absl::GetFlag(FLAGS_scenario).empty() ? ScenarioFromFlags(&s)
                                                                          : ScenarioFromFile(absl::GetFlag(FLAGS_scenario), &s);
  if (!e) e = Finish(&s, &prompts);
  if (e) {
    std::cerr << "bench: " << e->message << "\n";
    return 2;
  }
  const std::string http = absl::GetFlag(FLAGS_http);
  std::unique_ptr<Target> target;
  if (http.empty()) {
    target = std::make_unique<GrpcTarget>(channel, s.temperature);
  } else {
    const std::string key = ReadKey(absl::GetFlag(FLAGS_api_key_file));
    if (s.model.empty()) {
      std::string origin, prefix;
      SplitUrl(http, &origin, &prefix);
      if (absl::EndsWith(prefix, "/v1")) prefix.resize(prefix.size() - 3);
      httplib::Client cli(origin);
      httplib::Headers headers;
      if (!key.empty()) headers.emplace("Authorization", "Bearer " + key);
      auto res = cli.Get(prefix + "/v1/models", headers);
      const Json j = res && res->status == 200 ? Json::parse(res->body, nullptr, false) : Json();
      if (j.is_discarded() || !j.contains("data") || j["data"].empty()) {
        std::cerr << "bench: " << http << "/v1/models did not answer; give --model\n";
        return 1;
      }
      s.model = j["data"][0].value("id", "");
    }
    target = std::make_unique<HttpTarget>(http, key, s.model, s.temperature);
  }
  const std::string metrics_url = absl::GetFlag(FLAGS_metrics_url);
  Json before = Scrape(metrics_url);
  Chooser chooser(s, prompts);
  std::vector<Record> records;
  const auto t0 = Clock::now();
  const double cpu0 = CpuSeconds();
  for (int level = 0; level < static_cast<int>(s.levels.size()); ++level) {
    RunLevel(s, level, *target, chooser, t0, &records);
  }
  const double wall = Since(t0);
  const double cpu = CpuSeconds() - cpu0;
  Json after = Scrape(metrics_url);

  Json levels = Json::array();
  std::map<std::string, std::vector<const Record*>> all_by_adapter;
  std::vector<const Record*> counted;
  for (int level = 0; level < static_cast<int>(s.levels.size()); ++level) {
    std::vector<const Record*> in_level;
    std::map<std::string, std::vector<const Record*>> by_adapter;
    for (const Record& r : records) {
      if (r.level != level || r.warmup) continue;
      in_level.push_back(&r);
      by_adapter[r.adapter.empty() ? "(base)" : r.adapter].push_back(&r);
      all_by_adapter[r.adapter.empty() ? "(base)" : r.adapter].push_back(&r);
      counted.push_back(&r);
    }
    Json summary = Summarize(in_level);
    summary["level"] = s.levels[static_cast<size_t>(level)];
    Json per = Json::object();
    for (const auto& [name, rs] : by_adapter) per[name] = Summarize(rs);
    summary["per_adapter"] = per;
    levels.push_back(std::move(summary));
  }
  Json overall = Summarize(counted);
  Json per = Json::object();
  for (const auto& [name, rs] : all_by_adapter) per[name] = Summarize(rs);
  overall["per_adapter"] = per;
  Json requests = Json::array();
  for (const Record& r : records) requests.push_back(RecordJson(r));
  Json server_info = Json::object();
  if (after.is_object()) {
    for (const auto& [k, v] : after.items()) {
      if (k.rfind("adapterd_build_info", 0) == 0 || k.rfind("adapterd_model_info", 0) == 0) server_info[k] = v;
    }
  }
  const Json result{
      {"tool", "adapterctl bench"},
      {"target", {{"transport", http.empty() ? "grpc" : "http"}, {"address", http.empty() ? "" : http}}},
      {"scenario", s.ToJson()},
      {"started_unix", static_cast<int64_t>(std::time(nullptr) - static_cast<std::time_t>(wall))},
      {"wall_s", wall},
      {"sent", records.size()},
      {"answered", records.size()},
      {"levels", levels},
      {"overall", overall},
      {"client",
       {{"cpu_s", cpu},
        {"cpu_ms_per_request", records.empty() ? 0.0 : 1000 * cpu / static_cast<double>(records.size())},
        {"cores_used", wall > 0 ? cpu / wall : 0.0}}},
      {"server_info", server_info},
      {"metrics", {{"before", before}, {"after", after}}},
      {"requests", requests}};
  std::ofstream out(absl::GetFlag(FLAGS_out));
  out << result.dump(1, ' ', false, Json::error_handler_t::replace) << "\n";
  if (!out) {
    std::cerr << "bench: cannot write " << absl::GetFlag(FLAGS_out) << "\n";
    return 1;
  }
  // The summary on stdout.
  std::printf("%-12s %8s %6s %10s %10s %10s %10s %10s\n", s.mode == "closed" ? "concurrency" : "rate", "sent", "ok",
              "req/s", "tok/s", "ttft p50", "ttft p99", "itl p99");
  for (const Json& l : levels) {
    std::printf("%-12g %8lld %6lld %10.2f %10.1f %9.1fms %9.1fms %9.1fms\n", l["level"].get<double>(),
                static_cast<long long>(l["sent"].get<int64_t>()), static_cast<long long>(l["ok"].get<int64_t>()),
                l["requests_per_s"].get<double>(), l["output_tokens_per_s"].get<double>(),
                1000 * l["ttft_s"]["p50"].get<double>(), 1000 * l["ttft_s"]["p99"].get<double>(),
                1000 * l["itl_s"]["p99"].get<double>());
  }
  std::printf("client: %.2f ms CPU per request, %.1f%% of one core over %.1f s; %zu requests sent, %zu answered -> %s\n",
              records.empty() ? 0.0 : 1000 * cpu / static_cast<double>(records.size()), 100 * cpu / std::max(wall, 1e-9),
              wall, records.size(), records.size(), absl::GetFlag(FLAGS_out).c_str());
  return 0;
}

int RunReport(const std::vector<std::string>& args, const std::string& self_path) {
  if (args.size() != 1) {
    std::cerr << "usage: adapterctl bench report RESULTS.json --out DIR\n";
    return 2;
  }
  std::string script = absl::GetFlag(FLAGS_report_script);
  if (script.empty()) script = (std::filesystem::path(self_path).parent_path() / "bench_report.py").string();
  if (!std::filesystem::exists(script)) {
    std::cerr << "bench report: " << script << " not found (give --report_script)\n";
    return 1;
  }
  std::string out = absl::GetFlag(FLAGS_out);
  if (out == "bench.json") out = "bench-report";
  std::vector<std::string> argv_s = {"/usr/bin/python3", script, args[0], "--out", out};
  std::vector<char*> argv;
  for (auto& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  if (posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) {
    std::cerr << "bench report: cannot run /usr/bin/python3\n";
    return 1;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

}  // namespace adapterd::bench
