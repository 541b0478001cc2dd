#include "server/openai_http.h"

#include <httplib.h>

#include <algorithm>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <future>
#include <mutex>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "adapters/adapter_ref.h"
#include "jinja/chat_template.h"
#include "nlohmann/json.hpp"
#include "server/adapter_residency.h"
#include "server/generation_service.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {
namespace {

using Json = nlohmann::ordered_json;
namespace v1 = adapterd::v1;

// An error a client sees: HTTP status, OpenAI's type and code, and the field at fault.
struct ApiError {
  int http = 400;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;
};

constexpr int kMaxJsonDepth = 64;

// The deepest nesting of arrays and objects in JSON text (brackets inside strings do not count).
int JsonDepth(const std::string& text) {
  int depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) {
        escaped = false;
      } else if (c == '\\') {
        escaped = true;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

ApiError BadRequest(std::string message, std::string param = "") {
  return ApiError{400, std::move(message), "invalid_request_error", std::move(param), ""};
}

ApiError FromStatus(const absl::Status& s) {
  ApiError e;
  e.message = std::string(s.message());
  switch (s.code()) {
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kOutOfRange: e.http = 400; break;
    case absl::StatusCode::kUnauthenticated:
      e = ApiError{401, e.message, "authentication_error", "", "invalid_api_key"};
      break;
    case absl::StatusCode::kPermissionDenied: e = ApiError{403, e.message, "permission_error", "", ""}; break;
    // Only models are looked up by name here (the base, a loaded adapter, one on disk).
    case absl::StatusCode::kNotFound: e = ApiError{404, e.message, "not_found_error", "model", "model_not_found"}; break;
    case absl::StatusCode::kResourceExhausted:
      e = ApiError{429, e.message, "rate_limit_error", "", "rate_limit_exceeded"};
      break;
    case absl::StatusCode::kUnavailable: e = ApiError{503, e.message, "server_error", "", "service_unavailable"}; break;
    case absl::StatusCode::kDeadlineExceeded: e = ApiError{504, e.message, "server_error", "", "timeout"}; break;
    case absl::StatusCode::kUnimplemented: e.http = 400; break;
    default: e = ApiError{500, e.message, "server_error", "", ""}; break;
  }
  return e;
}

Json ErrorBody(const ApiError& e) {
  return Json{{"error",
               {{"message", e.message},
                {"type", e.type},
                {"param", e.param.empty() ? Json(nullptr) : Json(e.param)},
                {"code", e.code.empty() ? Json(nullptr) : Json(e.code)}}}};
}

std::string Dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

void SendError(httplib::Response& res, const ApiError& e) {
  res.status = e.http;
  res.set_content(Dump(ErrorBody(e)), "application/json");
}

std::string RandomHex(size_t n) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  static const char* kHex = "0123456789abcdef";
  std::string s;
  for (size_t i = 0; i < n; ++i) s += kHex[rng() % 16];
  return s;
}

uint64_t RandomSeed() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

const char* FinishName(core::FinishReason r) {
  switch (r) {
    case core::FinishReason::kLength: return "length";
    case core::FinishReason::kEos:
    case core::FinishReason::kStop: return "stop";
    case core::FinishReason::kCancelled: return "abort";
  }
  return "stop";
}

// One event from the scheduler thread for one choice.
struct Event {
  int choice = 0;
  std::vector<core::StepOutput> tokens;
  std::string text;
  bool done = false;
  absl::Status status;
  core::FinishReason reason = core::FinishReason::kLength;
  GenerationStats stats;
};

// Events of every choice of one HTTP request; the scheduler pushes (never blocks), the HTTP
// thread waits.
class Channel {
 public:
  void Push(Event e) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(std::move(e));
    }
    cv_.notify_one();
  }
  // Moves the pending events into `out`, waiting up to `timeout` for the first.
  void Pop(std::vector<Event>& out, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return !events_.empty(); });
    while (!events_.empty()) {
      out.push_back(std::move(events_.front()));
      events_.pop_front();
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
};

class ChannelSink final : public RequestSink {
 public:
  ChannelSink(std::shared_ptr<Channel> channel, int choice) : channel_(std::move(channel)), choice_(choice) {}
  void OnTokens(const std::vector<core::StepOutput>& tokens, const std::string& text) override {
    Event e;
    e.choice = choice_;
    e.tokens = tokens;
    e.text = text;
    channel_->Push(std::move(e));
  }
  void OnDone(const absl::Status& status, core::FinishReason reason, const GenerationStats& stats,
              const std::string& text) override {
    Event e;
    e.choice = choice_;
    e.text = text;
    e.done = true;
    e.status = status;
    e.reason = reason;
    e.stats = stats;
    channel_->Push(std::move(e));
  }

 private:
  std::shared_ptr<Channel> channel_;
  int choice_;
};

// Typed field access with OpenAI-style errors naming the field.
class Fields {
 public:
  explicit Fields(const Json& body) : body_(body) {}
  bool Has(const char* name) const { return body_.contains(name) && !body_[name].is_null(); }
  const Json& At(const char* name) const { return body_[name]; }

  std::optional<ApiError> Number(const char* name, double* out) const {
    if (!Has(name)) return std::nullopt;
    if (!body_[name].is_number()) return BadRequest(absl::StrCat(name, " must be a number"), name);
    *out = body_[name].get<double>();
    return std::nullopt;
  }
  std::optional<ApiError> Integer(const char* name, int64_t* out) const {
    if (!Has(name)) return std::nullopt;
    if (!body_[name].is_number_integer()) return BadRequest(absl::StrCat(name, " must be an integer"), name);
    *out = body_[name].get<int64_t>();
    return std::nullopt;
  }
  std::optional<ApiError> Bool(const char* name, bool* out) const {
    if (!Has(name)) return std::nullopt;
    if (!body_[name].is_boolean()) return BadRequest(absl::StrCat(name, " must be a boolean"), name);
    *out = body_[name].get<bool>();
    return std::nullopt;
  }

 private:
  const Json& body_;
};

#define API_TRY(expr)                                  \
  do {                                                 \
    if (std::optional<ApiError> _e = (expr)) return *_e; \
  } while (0)

// What a completion or chat request asks for, apart from its prompts.
struct Ask {
  bool chat = false;
  std::string model;  // As the client named it (echoed back).
  std::string adapter;
  // The adapter, resolved (and held) before tokenizing, so that an adapter bringing its own
  // tokenizer (added tokens) tokenizes the prompt; null for the base model.
  adapters::AdapterRef resolved;
  int n = 1;
  bool stream = false;
  bool include_usage = false;
  bool echo = false;
  bool logprobs = false;
  int top_logprobs = 0;
  bool max_tokens_given = false;
  int64_t max_tokens = 0;
  std::optional<uint64_t> seed;
  v1::GenerateRequest base;  // Sampling and stop values; prompt and seed set per choice.
  std::vector<std::string> stop;
};

struct PromptIds {
  std::vector<int32_t> ids;
  std::string text;  // For echo.
};

// Per-choice output as it arrives.
struct Choice {
  int prompt = 0;
  std::string text;         // Everything received.
  size_t sent = 0;          // Bytes of `text` already streamed.
  std::vector<core::StepOutput> tokens;
  size_t tokens_sent = 0;
  bool done = false;
  absl::Status status;
  core::FinishReason reason = core::FinishReason::kLength;
  GenerationStats stats;
  bool role_sent = false;
};

// Where the first stop string starts in `text` at or after `from`, or npos. Nothing before
// what was sent can start one (Sendable never sends past a possible start), so each step
// searches only the unsent tail, not the whole text again.
size_t StopAt(const std::string& text, const std::vector<std::string>& stop, size_t from) {
  size_t at = std::string::npos;
  for (const std::string& s : stop) at = std::min(at, text.find(s, from));
  return at;
}

// How many bytes of `c.text` may be sent now: all of it once done (cut at a stop string);
// before that, everything that cannot be the start of a stop string, at a UTF-8 boundary.
size_t Sendable(const Choice& c, const std::vector<std::string>& stop) {
  if (c.done) {
    const size_t at = c.reason == core::FinishReason::kStop ? StopAt(c.text, stop, c.sent) : std::string::npos;
    return std::min(c.text.size(), at);
  }
  // A stop string already in the text (its done event not yet seen) ends what may be sent.
  const size_t at = StopAt(c.text, stop, c.sent);
  if (at != std::string::npos) return std::max(c.sent, at);
  size_t hold = 0;
  for (const std::string& s : stop) hold = std::max(hold, s.size() - 1);
  if (c.text.size() <= hold) return c.sent;
  size_t end = c.text.size() - hold;
  while (end > c.sent && (static_cast<unsigned char>(c.text[end]) & 0xC0) == 0x80) --end;
  return std::max(end, c.sent);
}

}  // namespace

struct OpenAiServer::Impl {
  ServingContext& ctx;
  AdminService* admin;
  OpenAiOptions options;
  std::time_t started = std::time(nullptr);

  bool Authorized(const httplib::Request& req, const std::string& key) const {
    if (key.empty()) return true;
    const std::string header = req.get_header_value("Authorization");
    return header == "Bearer " + key;
  }

  std::optional<ApiError> CheckKey(const httplib::Request& req) const {
    if (Authorized(req, options.api_key)) return std::nullopt;
    return ApiError{401, "a valid API key is required: send \"Authorization: Bearer <key>\"",
                    "authentication_error", "", "invalid_api_key"};
  }

  std::optional<ApiError> Ready() const {
    if (ctx.draining.load()) return ApiError{503, "the server is shutting down", "server_error", "", "service_unavailable"};
    if (!ctx.ready.load()) return ApiError{503, "the model is still loading", "server_error", "", "service_unavailable"};
    return std::nullopt;
  }

  // Parses the body as a JSON object.
  std::optional<ApiError> ParseBody(const httplib::Request& req, Json* body) const {
    // nlohmann parses without recursion, but copying a value and turning it into template
    // variables recurse: a body of nested brackets would overflow the handler's stack.
    if (JsonDepth(req.body) > kMaxJsonDepth) {
      return BadRequest(absl::StrCat("the request body nests deeper than ", kMaxJsonDepth, " levels"));
    }
    *body = Json::parse(req.body, nullptr, false);
    if (body->is_discarded()) return BadRequest("the request body is not valid JSON");
    if (!body->is_object()) return BadRequest("the request body must be a JSON object");
    return std::nullopt;
  }

  // `model`: the base model's id, or a loaded adapter's name (with --load_on_demand, any
  // name: BuildRequest answers for one that cannot be loaded). Empty or absent: the base.
  std::optional<ApiError> ResolveModel(const Json& body, std::string* model, std::string* adapter) const {
    *adapter = "";
    *model = options.model_id;
    if (!body.contains("model") || body["model"].is_null()) return std::nullopt;
    if (!body["model"].is_string()) return BadRequest("model must be a string", "model");
    *model = body["model"].get<std::string>();
    if (model->empty() || *model == options.model_id) return std::nullopt;
    if (!ctx.residency->load_on_demand() && !ctx.table->Contains(*model)) {
      return ApiError{404, absl::StrCat("The model `", *model, "` does not exist."), "invalid_request_error",
                      "model", "model_not_found"};
    }
    *adapter = *model;
    return std::nullopt;
  }

  // Fields that change the answer but that adapterd does not implement are refused by name.
  std::optional<ApiError> RefuseUnsupported(const Json& body, bool chat) const {
    auto non_empty = [&](const char* name) {
      return body.contains(name) && !body[name].is_null() &&
             !((body[name].is_array() || body[name].is_object() || body[name].is_string()) && body[name].empty());
    };
    for (const char* name : {"tools", "functions", "logit_bias", "suffix", "prediction", "guided_json",
                             "guided_regex", "guided_choice", "guided_grammar", "prompt_logprobs"}) {
      if (non_empty(name)) return BadRequest(absl::StrCat(name, " is not supported by this server"), name);
    }
    if (body.contains("tool_choice") && !body["tool_choice"].is_null() &&
        !(body["tool_choice"].is_string() && (body["tool_choice"] == "none" || body["tool_choice"] == "auto"))) {
      return BadRequest("tool_choice is not supported by this server", "tool_choice");
    }
    if (body.contains("function_call") && !body["function_call"].is_null() && body["function_call"] != "none") {
      return BadRequest("function_call is not supported by this server", "function_call");
    }
    if (body.contains("response_format") && !body["response_format"].is_null()) {
      const Json& f = body["response_format"];
      if (!f.is_object() || f.value("type", "") != "text") {
        return BadRequest("response_format other than {\"type\": \"text\"} is not supported by this server",
                          "response_format");
      }
    }
    if (body.contains("best_of") && !body["best_of"].is_null() &&
        !(body["best_of"].is_number_integer() && body["best_of"].get<int64_t>() <= 1)) {
      return BadRequest("best_of > 1 is not supported by this server", "best_of");
    }
    for (const char* name : {"use_beam_search", "continue_final_message"}) {
      if (body.contains(name) && body[name].is_boolean() && body[name].get<bool>()) {
        return BadRequest(absl::StrCat(name, " is not supported by this server"), name);
      }
    }
    if (chat && body.contains("chat_template") && !body["chat_template"].is_null()) {
      return BadRequest("chat_template: requests cannot replace the model's chat template", "chat_template");
    }
    if (body.contains("modalities") && body["modalities"].is_array()) {
      for (const auto& m : body["modalities"]) {
        if (m != "text") return BadRequest("only the text modality is supported", "modalities");
      }
    }
    return std::nullopt;
  }

  std::optional<ApiError> ParseAsk(const Json& body, bool chat, Ask* ask) const {
    ask->chat = chat;
    API_TRY(RefuseUnsupported(body, chat));
    API_TRY(ResolveModel(body, &ask->model, &ask->adapter));
    Fields f(body);
    int64_t n = 1;
    API_TRY(f.Integer("n", &n));
    if (n < 1 || n > options.max_n) {
      return BadRequest(absl::StrCat("n must be in [1, ", options.max_n, "], got ", n), "n");
    }
    ask->n = static_cast<int>(n);
    API_TRY(f.Bool("stream", &ask->stream));
    if (f.Has("stream_options")) {
      if (!ask->stream) return BadRequest("stream_options is only allowed when stream is true", "stream_options");
      const Json& so = f.At("stream_options");
      if (!so.is_object()) return BadRequest("stream_options must be an object", "stream_options");
      if (so.contains("include_usage") && !so["include_usage"].is_null()) {
        if (!so["include_usage"].is_boolean()) {
          return BadRequest("stream_options.include_usage must be a boolean", "stream_options");
        }
        ask->include_usage = so["include_usage"].get<bool>();
      }
    }
    v1::GenerateRequest& g = ask->base;
    double temperature = 1.0, top_p = 1.0, presence = 0.0, frequency = 0.0, repetition = 1.0;
    API_TRY(f.Number("temperature", &temperature));
    API_TRY(f.Number("top_p", &top_p));
    API_TRY(f.Number("presence_penalty", &presence));
    API_TRY(f.Number("frequency_penalty", &frequency));
    API_TRY(f.Number("repetition_penalty", &repetition));
    g.set_temperature(static_cast<float>(temperature));
    g.set_top_p(static_cast<float>(top_p));
    g.set_presence_penalty(static_cast<float>(presence));
    g.set_frequency_penalty(static_cast<float>(frequency));
    g.set_repetition_penalty(static_cast<float>(repetition));
    int64_t top_k = 0, min_tokens = 0, seed = 0;
    API_TRY(f.Integer("top_k", &top_k));
    if (top_k == -1) top_k = 0;  // vLLM's "off".
    if (top_k < 0 || top_k > (int64_t{1} << 30)) return BadRequest("top_k must be -1, 0 or positive", "top_k");
    g.set_top_k(static_cast<int32_t>(top_k));
    API_TRY(f.Integer("min_tokens", &min_tokens));
    if (min_tokens < 0 || min_tokens > (int64_t{1} << 30)) return BadRequest("min_tokens must be >= 0", "min_tokens");
    g.set_min_tokens(static_cast<uint32_t>(min_tokens));
    if (f.Has("seed")) {
      API_TRY(f.Integer("seed", &seed));
      ask->seed = static_cast<uint64_t>(seed);
    }
    bool ignore_eos = false, skip_special = true;
    API_TRY(f.Bool("ignore_eos", &ignore_eos));
    API_TRY(f.Bool("skip_special_tokens", &skip_special));
    g.set_ignore_eos(ignore_eos);
    g.set_skip_special_tokens(skip_special);
    // max_tokens (max_completion_tokens wins in chat, as OpenAI deprecated max_tokens there).
    for (const char* name : {"max_tokens", "max_completion_tokens"}) {
      if (!f.Has(name)) continue;
      if (!chat && std::string(name) == "max_completion_tokens") continue;
      API_TRY(f.Integer(name, &ask->max_tokens));
      if (ask->max_tokens < 1) return BadRequest(absl::StrCat(name, " must be at least 1"), name);
      ask->max_tokens_given = true;
    }
    if (f.Has("stop")) {
      const Json& stop = f.At("stop");
      if (stop.is_string()) {
        ask->stop.push_back(stop.get<std::string>());
      } else if (stop.is_array()) {
        for (const auto& s : stop) {
          if (!s.is_string()) return BadRequest("stop must be a string or a list of strings", "stop");
          ask->stop.push_back(s.get<std::string>());
        }
      } else {
        return BadRequest("stop must be a string or a list of strings", "stop");
      }
      for (const std::string& s : ask->stop) g.add_stop(s);
    }
    if (f.Has("stop_token_ids")) {
      const Json& ids = f.At("stop_token_ids");
      if (!ids.is_array()) return BadRequest("stop_token_ids must be a list of integers", "stop_token_ids");
      for (const auto& id : ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return BadRequest("stop_token_ids must be a list of token ids", "stop_token_ids");
        }
        g.add_stop_token_ids(id.get<int32_t>());
      }
    }
    if (chat) {
      API_TRY(f.Bool("logprobs", &ask->logprobs));
      int64_t top = 0;
      API_TRY(f.Integer("top_logprobs", &top));
      if (top != 0 && !ask->logprobs) return BadRequest("top_logprobs needs logprobs: true", "top_logprobs");
      if (top < 0 || top > core::kMaxTopLogprobs) {
        return BadRequest(absl::StrCat("top_logprobs must be in [0, ", core::kMaxTopLogprobs, "]"), "top_logprobs");
      }
      ask->top_logprobs = static_cast<int>(top);
    } else {
      if (f.Has("logprobs")) {
        int64_t top = 0;
        API_TRY(f.Integer("logprobs", &top));
        if (top < 0 || top > core::kMaxTopLogprobs) {
          return BadRequest(absl::StrCat("logprobs must be in [0, ", core::kMaxTopLogprobs, "]"), "logprobs");
        }
        ask->logprobs = true;
        ask->top_logprobs = static_cast<int>(top);
      }
      API_TRY(f.Bool("echo", &ask->echo));
      if (ask->echo && ask->logprobs) {
        return BadRequest("echo with logprobs needs prompt log-probabilities, which this server does not compute",
                          "echo");
      }
    }
    g.set_top_logprobs(static_cast<uint32_t>(ask->top_logprobs));
    g.set_adapter(ask->adapter);
    return ParseMix(body, ask);
  }

  // adapterd's extension: "adapters": [{"name": "a", "weight": 0.7}, ...], a weighted mix of
  // LoRA adapters over the base model (GenerateRequest.adapters; BuildRequest validates it).
  std::optional<ApiError> ParseMix(const Json& body, Ask* ask) const {
    if (!body.contains("adapters") || body["adapters"].is_null()) return std::nullopt;
    const Json& list = body["adapters"];
    if (!list.is_array()) return BadRequest("adapters must be a list of {\"name\", \"weight\"} objects", "adapters");
    if (!ask->adapter.empty()) {
      return BadRequest("adapters (a weighted mix) runs over the base model: set model to the base model's id",
                        "adapters");
    }
    for (const Json& part : list) {
      if (!part.is_object() || !part.contains("name") || !part["name"].is_string() || !part.contains("weight") ||
          !part["weight"].is_number()) {
        return BadRequest("each entry of adapters must be {\"name\": string, \"weight\": number}", "adapters");
      }
      v1::WeightedAdapter* w = ask->base.add_adapters();
      w->set_name(part["name"].get<std::string>());
      w->set_weight(part["weight"].get<float>());
    }
    return std::nullopt;
  }

  // The tokenizer of a request: its adapter's own when it adds tokens, else the base model's.
  const core::Tokenizer* Tok(const Ask& ask) const {
    const core::Tokenizer* own = adapters::TokenizerOf(ask.resolved);
    return own != nullptr ? own : ctx.tokenizer.get();
  }

  // Resolves (waiting for an on-demand load) the adapter a request names, so that its prompt
  // is tokenized with the adapter's tokenizer when it has one.
  std::optional<ApiError> ResolveTokenizer(Ask* ask) const {
    if (ask->adapter.empty()) return std::nullopt;
    auto resolved = ctx.residency->Resolve(ask->adapter);
    if (!resolved.ok()) return FromStatus(resolved.status());
    adapters::AdapterRef adapter = std::move(resolved->adapter);
    if (resolved->wait != nullptr) {
      absl::Status loaded;
      resolved->wait->Await(&loaded, &adapter);
      if (!loaded.ok()) return FromStatus(loaded);
    }
    ask->resolved = std::move(adapter);
    return std::nullopt;
  }

  std::optional<ApiError> NeedTokenizer() const {
    if (ctx.tokenizer == nullptr) {
      return BadRequest("the model folder has no tokenizer.json; text prompts and messages cannot be used");
    }
    return std::nullopt;
  }

  // Completions' `prompt`: a string, a list of strings, a list of ids or a list of id lists.
  std::optional<ApiError> CompletionPrompts(const Json& body, bool add_special, const core::Tokenizer* tok,
                                           std::vector<PromptIds>* out) const {
    if (!body.contains("prompt") || body["prompt"].is_null()) return BadRequest("prompt is required", "prompt");
    const Json& p = body["prompt"];
    auto from_text = [&](const std::string& text) -> std::optional<ApiError> {
      API_TRY(NeedTokenizer());
      auto ids = tok->Encode(text, add_special);
      if (!ids.ok()) return BadRequest(absl::StrCat("prompt: ", ids.status().message()), "prompt");
      out->push_back({*std::move(ids), text});
      return std::nullopt;
    };
    auto from_ids = [&](const Json& list) -> std::optional<ApiError> {
      PromptIds pi;
      for (const auto& id : list) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return BadRequest("prompt token ids must be non-negative integers", "prompt");
        }
        pi.ids.push_back(id.get<int32_t>());
      }
      out->push_back(std::move(pi));
      return std::nullopt;
    };
    if (p.is_string()) return from_text(p.get<std::string>());
    if (!p.is_array() || p.empty()) return BadRequest("prompt must be a string, a list of strings or token ids", "prompt");
    if (p[0].is_number()) return from_ids(p);
    if (p.size() > 64) return BadRequest("at most 64 prompts per request", "prompt");
    for (const auto& item : p) {
      if (item.is_string()) {
        API_TRY(from_text(item.get<std::string>()));
      } else if (item.is_array() && !item.empty() && item[0].is_number()) {
        API_TRY(from_ids(item));
      } else {
        return BadRequest("prompt must be a string, a list of strings or token ids", "prompt");
      }
    }
    return std::nullopt;
  }

  // Chat messages as the template receives them: text parts joined (with "\n", as vLLM
  // does for text-only models); other fields passed through.
  std::optional<ApiError> Messages(const Json& body, Json* messages) const {
    if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty()) {
      return BadRequest("messages must be a non-empty list", "messages");
    }
    *messages = Json::array();
    for (const auto& m : body["messages"]) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string()) {
        return BadRequest("every message needs a string role", "messages");
      }
      const std::string role = m["role"].get<std::string>();
      if (role != "system" && role != "user" && role != "assistant" && role != "tool" && role != "developer") {
        return BadRequest(absl::StrCat("unknown message role \"", role, "\""), "messages");
      }
      Json copy = m;
      if (m.contains("content") && m["content"].is_array()) {
        std::string text;
        bool first = true;
        for (const auto& part : m["content"]) {
          if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
              !part["text"].is_string()) {
            return BadRequest("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported",
                              "messages");
          }
          if (!first) text += "\n";
          first = false;
          text += part["text"].get<std::string>();
        }
        copy["content"] = text;
      } else if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null()) {
        return BadRequest("message content must be a string or a list of text parts", "messages");
      } else if (!m.contains("content")) {
        copy["content"] = nullptr;
      }
      messages->push_back(std::move(copy));
    }
    return std::nullopt;
  }

  std::optional<ApiError> ChatPrompt(const Json& body, bool add_special_default, const core::Tokenizer* tok,
                                     PromptIds* out) const {
    API_TRY(NeedTokenizer());
    if (ctx.chat_template == nullptr) {
      return BadRequest(absl::StrCat("this model has no usable chat template, so chat requests cannot be served: ",
                                     ctx.chat_template_error, "; use /v1/completions"));
    }
    Json messages;
    API_TRY(Messages(body, &messages));
    Fields f(body);
    jinja::ChatTemplate::RenderOptions ro;
    ro.add_generation_prompt = true;
    API_TRY(f.Bool("add_generation_prompt", &ro.add_generation_prompt));
    if (f.Has("chat_template_kwargs")) {
      if (!f.At("chat_template_kwargs").is_object()) {
        return BadRequest("chat_template_kwargs must be an object", "chat_template_kwargs");
      }
      ro.extra = f.At("chat_template_kwargs");
    }
    absl::StatusOr<std::string> text = ctx.chat_template->Render(messages, ro);
    if (!text.ok()) {
      ApiError e = FromStatus(text.status());
      e.message = absl::StrCat("the chat template could not render these messages: ", text.status().message());
      if (e.http >= 500) e.http = 400;
      return e;
    }
    bool add_special = add_special_default;
    API_TRY(f.Bool("add_special_tokens", &add_special));
    auto ids = tok->Encode(*text, add_special);
    if (!ids.ok()) return BadRequest(absl::StrCat("messages: ", ids.status().message()), "messages");
    out->ids = *std::move(ids);
    out->text = *std::move(text);
    return std::nullopt;
  }

  struct Running {
    std::shared_ptr<Channel> channel = std::make_shared<Channel>();
    std::vector<std::shared_ptr<std::atomic<bool>>> cancelled;
    std::vector<Choice> choices;
    std::vector<PromptIds> prompts;
    std::shared_ptr<AdapterWait> adapter_wait;  // The on-demand load its requests wait for.
    Ask ask;
    std::string id;
    std::time_t created = std::time(nullptr);

    void CancelAll() {
      for (auto& c : cancelled) c->store(true);
    }
    ~Running() { CancelAll(); }
  };

  // Builds and submits every choice; on failure cancels what was submitted.
  std::optional<ApiError> Submit(Running& run) {
    const int64_t context = ctx.engine->context_length();
    for (size_t p = 0; p < run.prompts.size(); ++p) {
      const int64_t prompt_len = static_cast<int64_t>(run.prompts[p].ids.size());
      int64_t max_tokens = run.ask.max_tokens;
      if (!run.ask.max_tokens_given) {
        max_tokens = run.ask.chat ? std::min(ctx.limits.max_new_tokens_limit, context - prompt_len) : 16;
      } else if (prompt_len + max_tokens > context) {
        return ApiError{400,
                        absl::StrCat("This model's maximum context length is ", context, " tokens. However, you requested ",
                                     prompt_len + max_tokens, " tokens (", prompt_len, " in the messages, ", max_tokens,
                                     " in the completion). Please reduce the length of the messages or completion."),
                        "invalid_request_error", run.ask.chat ? "messages" : "prompt", "context_length_exceeded"};
      }
      if (max_tokens < 1) {
        return ApiError{400, absl::StrCat("the prompt fills the model's context of ", context, " tokens"),
                        "invalid_request_error", run.ask.chat ? "messages" : "prompt", "context_length_exceeded"};
      }
      const uint64_t seed = run.ask.seed ? *run.ask.seed : RandomSeed();
      for (int j = 0; j < run.ask.n; ++j) {
        v1::GenerateRequest g = run.ask.base;
        g.mutable_token_ids()->mutable_ids()->Assign(run.prompts[p].ids.begin(), run.prompts[p].ids.end());
        g.set_max_new_tokens(static_cast<uint32_t>(max_tokens));
        g.set_seed(seed + static_cast<uint64_t>(j));
        auto built = BuildRequest(ctx, g, std::chrono::system_clock::time_point::max(), run.ask.resolved);
        if (!built.ok()) {
          ctx.metrics.RequestDone(run.ask.adapter, absl::StatusCodeToString(built.status().code()), 0, 0, 0, 0, 0);
          return FromStatus(built.status());
        }
        const int index = static_cast<int>(run.choices.size());
        Choice c;
        c.prompt = static_cast<int>(p);
        run.choices.push_back(c);
        run.cancelled.push_back((*built)->cancelled);
        if ((*built)->adapter_wait != nullptr) run.adapter_wait = (*built)->adapter_wait;
        absl::Status s = ctx.scheduler->Submit(*std::move(built), std::make_shared<ChannelSink>(run.channel, index));
        if (!s.ok()) {
          ctx.metrics.RequestDone(run.ask.adapter, absl::StatusCodeToString(s.code()), 0, 0, 0, 0, 0);
          run.choices.pop_back();
          run.cancelled.pop_back();
          return FromStatus(s);
        }
      }
    }
    return std::nullopt;
  }

  // Applies events to the choices; returns the indexes of choices that changed.
  static std::vector<int> Apply(Running& run, std::vector<Event>& events) {
    std::vector<int> changed;
    for (Event& e : events) {
      Choice& c = run.choices[static_cast<size_t>(e.choice)];
      c.text += e.text;
      for (auto& t : e.tokens) c.tokens.push_back(std::move(t));
      if (e.done) {
        c.done = true;
        c.status = e.status;
        c.reason = e.reason;
        c.stats = e.stats;
      }
      if (std::find(changed.begin(), changed.end(), e.choice) == changed.end()) changed.push_back(e.choice);
    }
    events.clear();
    return changed;
  }

  static bool AllDone(const Running& run) {
    return std::all_of(run.choices.begin(), run.choices.end(), [](const Choice& c) { return c.done; });
  }

  static std::string TokenText(const core::Tokenizer* tok, int32_t id) {
    if (tok == nullptr) return absl::StrCat("token_id:", id);
    auto text = tok->Decode({id}, false);
    return text.ok() ? *text : absl::StrCat("token_id:", id);
  }

  static Json Bytes(const std::string& s) {
    Json b = Json::array();
    for (unsigned char c : s) b.push_back(static_cast<int>(c));
    return b;
  }

  // Logprobs of tokens [from, to) of a choice, in the endpoint's shape. `text_offset` starts
  // at `offset` (completions).
  Json Logprobs(const Running& run, const Choice& c, size_t from, size_t to, size_t offset) const {
    const core::Tokenizer* tok = Tok(run.ask);
    if (run.ask.chat) {
      Json content = Json::array();
      for (size_t i = from; i < to; ++i) {
        const core::StepOutput& t = c.tokens[i];
        const std::string text = TokenText(tok, t.token);
        Json top = Json::array();
        for (const core::TokenLogprob& alt : t.top) {
          const std::string at = TokenText(tok, alt.id);
          top.push_back({{"token", at}, {"logprob", alt.logprob}, {"bytes", Bytes(at)}});
        }
        content.push_back({{"token", text}, {"logprob", t.logprob}, {"bytes", Bytes(text)}, {"top_logprobs", top}});
      }
      return Json{{"content", content}};
    }
    Json tokens = Json::array(), lps = Json::array(), tops = Json::array(), offsets = Json::array();
    for (size_t i = from; i < to; ++i) {
      const core::StepOutput& t = c.tokens[i];
      const std::string text = TokenText(tok, t.token);
      tokens.push_back(text);
      lps.push_back(t.logprob);
      Json top = Json::object();
      for (const core::TokenLogprob& alt : t.top) top[TokenText(tok, alt.id)] = alt.logprob;
      tops.push_back(run.ask.top_logprobs > 0 ? top : Json(nullptr));
      offsets.push_back(offset);
      offset += text.size();
    }
    return Json{{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
  }

  // OpenAI's usage object. prompt_tokens_details.cached_tokens: prompt tokens taken from the
  // prefix cache; a prompt counts once, so with n > 1 choices its first choice's count.
  Json Usage(const Running& run) const {
    int64_t prompt = 0, completion = 0, cached = 0;
    for (const PromptIds& p : run.prompts) prompt += static_cast<int64_t>(p.ids.size());
    std::vector<bool> counted(run.prompts.size(), false);
    for (const Choice& c : run.choices) {
      completion += c.stats.completion_tokens;
      const size_t p = static_cast<size_t>(c.prompt);
      if (p < counted.size() && !counted[p]) {
        counted[p] = true;
        cached += c.stats.cached_prompt_tokens;
      }
    }
    return Json{{"prompt_tokens", prompt},
                {"completion_tokens", completion},
                {"total_tokens", prompt + completion},
                {"prompt_tokens_details", Json{{"cached_tokens", cached}}}};
  }

  Json Envelope(const Running& run, bool chunk) const {
    const char* object = run.ask.chat ? (chunk ? "chat.completion.chunk" : "chat.completion") : "text_completion";
    return Json{{"id", run.id}, {"object", object}, {"created", static_cast<int64_t>(run.created)}, {"model", run.ask.model}};
  }

  void Respond(Running& run, httplib::Response& res) const {
    std::vector<Event> events;
    while (!AllDone(run)) {
      run.channel->Pop(events, std::chrono::milliseconds(200));
      Apply(run, events);
    }
    for (const Choice& c : run.choices) {
      if (!c.status.ok()) {
        SendError(res, FromStatus(c.status));
        return;
      }
    }
    Json body = Envelope(run, false);
    Json choices = Json::array();
    for (size_t i = 0; i < run.choices.size(); ++i) {
      const Choice& c = run.choices[i];
      std::string text = c.text.substr(0, Sendable(c, run.ask.stop));
      Json choice{{"index", i}};
      if (run.ask.chat) {
        choice["message"] = {{"role", "assistant"}, {"content", text}, {"refusal", nullptr}};
        choice["logprobs"] = run.ask.logprobs ? Logprobs(run, c, 0, c.tokens.size(), 0) : Json(nullptr);
      } else {
        const std::string echo = run.ask.echo ? EchoText(run.ask, run.prompts[static_cast<size_t>(c.prompt)]) : "";
        choice["text"] = echo + text;
        choice["logprobs"] = run.ask.logprobs ? Logprobs(run, c, 0, c.tokens.size(), echo.size()) : Json(nullptr);
      }
      choice["finish_reason"] = FinishName(c.reason);
      choices.push_back(std::move(choice));
    }
    body["choices"] = choices;
    body["usage"] = Usage(run);
    res.set_content(Dump(body), "application/json");
  }

  std::string EchoText(const Ask& ask, const PromptIds& p) const {
    if (!p.text.empty() || Tok(ask) == nullptr) return p.text;
    auto text = Tok(ask)->Decode(p.ids, false);
    return text.ok() ? *text : "";
  }

  // One SSE chunk per changed choice; returns false when the client is gone.
  bool StreamChanges(Running& run, const std::vector<int>& changed, httplib::DataSink& sink) const {
    for (int index : changed) {
      Choice& c = run.choices[static_cast<size_t>(index)];
      if (!c.status.ok()) continue;  // Reported once all are done.
      const size_t upto = Sendable(c, run.ask.stop);
      const bool finishing = c.done;
      const bool has_text = upto > c.sent;
      const bool has_tokens = run.ask.logprobs && c.tokens.size() > c.tokens_sent;
      const bool first_chat = run.ask.chat && !c.role_sent;
      if (!has_text && !has_tokens && !finishing && !first_chat) continue;
      Json chunk = Envelope(run, true);
      Json choice{{"index", index}};
      const std::string piece = c.text.substr(c.sent, upto - c.sent);
      if (run.ask.chat) {
        Json delta = Json::object();
        if (!c.role_sent) delta["role"] = "assistant";
        if (has_text || !c.role_sent) delta["content"] = piece;
        c.role_sent = true;
        choice["delta"] = delta;
        choice["logprobs"] = has_tokens ? Logprobs(run, c, c.tokens_sent, c.tokens.size(), 0) : Json(nullptr);
      } else {
        choice["text"] = piece;
        choice["logprobs"] = has_tokens ? Logprobs(run, c, c.tokens_sent, c.tokens.size(), c.sent) : Json(nullptr);
      }
      choice["finish_reason"] = finishing ? Json(FinishName(c.reason)) : Json(nullptr);
      chunk["choices"] = Json::array({choice});
      if (run.ask.include_usage) chunk["usage"] = nullptr;
      c.sent = upto;
      if (run.ask.logprobs) c.tokens_sent = c.tokens.size();
      const std::string line = absl::StrCat("data: ", Dump(chunk), "\n\n");
      if (!sink.write(line.data(), line.size())) return false;
    }
    return true;
  }

  void Stream(std::shared_ptr<Running> run, httplib::Response& res) const {
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    res.set_chunked_content_provider("text/event-stream", [this, run](size_t, httplib::DataSink& sink) {
      std::vector<Event> events;
      if (run->ask.echo) {
        for (size_t i = 0; i < run->choices.size(); ++i) {
          Json chunk = Envelope(*run, true);
          chunk["choices"] = Json::array({Json{{"index", i},
                                               {"text", EchoText(run->ask, run->prompts[static_cast<size_t>(run->choices[i].prompt)])},
                                               {"logprobs", nullptr},
                                               {"finish_reason", nullptr}}});
          const std::string line = absl::StrCat("data: ", Dump(chunk), "\n\n");
          if (!sink.write(line.data(), line.size())) {
            run->CancelAll();
            return false;
          }
        }
      }
      while (true) {
        run->channel->Pop(events, std::chrono::milliseconds(100));
        const std::vector<int> changed = Apply(*run, events);
        if (!StreamChanges(*run, changed, sink)) {
          run->CancelAll();  // The client went away: its requests leave the batch next step.
          return false;
        }
        if (AllDone(*run)) break;
      }
      for (const Choice& c : run->choices) {
        if (!c.status.ok()) {
          const std::string line = absl::StrCat("data: ", Dump(ErrorBody(FromStatus(c.status))), "\n\n");
          sink.write(line.data(), line.size());
          break;
        }
      }
      if (run->ask.include_usage) {
        Json chunk = Envelope(*run, true);
        chunk["choices"] = Json::array();
        chunk["usage"] = Usage(*run);
        const std::string line = absl::StrCat("data: ", Dump(chunk), "\n\n");
        sink.write(line.data(), line.size());
      }
      const std::string done = "data: [DONE]\n\n";
      sink.write(done.data(), done.size());
      sink.done();
      return true;
    });
  }

  void Generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    if (auto e = CheckKey(req)) return SendError(res, *e);
    if (auto e = Ready()) return SendError(res, *e);
    Json body;
    if (auto e = ParseBody(req, &body)) return SendError(res, *e);
    auto run = std::make_shared<Running>();
    if (auto e = ParseAsk(body, chat, &run->ask)) return SendError(res, *e);
    if (auto e = ResolveTokenizer(&run->ask)) return SendError(res, *e);
    if (chat) {
      PromptIds p;
      if (auto e = ChatPrompt(body, false, Tok(run->ask), &p)) return SendError(res, *e);
      run->prompts.push_back(std::move(p));
    } else {
      bool add_special = true;
      if (auto e = Fields(body).Bool("add_special_tokens", &add_special)) return SendError(res, *e);
      if (auto e = CompletionPrompts(body, add_special, Tok(run->ask), &run->prompts)) return SendError(res, *e);
    }
    run->id = (chat ? "chatcmpl-" : "cmpl-") + RandomHex(32);
    if (auto e = Submit(*run)) {
      run->CancelAll();
      return SendError(res, *e);
    }
    if (run->ask.stream) {
      // A stream commits to 200 with its first byte: wait for an adapter loading on demand
      // first, so that a failed load is answered with its own status.
      if (run->adapter_wait != nullptr) {
        absl::Status loaded;
        adapters::AdapterRef adapter;
        run->adapter_wait->Await(&loaded, &adapter);
        if (!loaded.ok()) return SendError(res, FromStatus(loaded));  // Its requests end with it.
      }
      Stream(run, res);
    } else {
      Respond(*run, res);
    }
  }

  void Models(const httplib::Request& req, httplib::Response& res) {
    if (auto e = CheckKey(req)) return SendError(res, *e);
    Json data = Json::array();
    const int64_t created = static_cast<int64_t>(started);
    Json base{{"id", options.model_id}, {"object", "model"}, {"created", created}, {"owned_by", "adapterd"},
              {"root", options.model_id}, {"parent", nullptr}};
    if (ctx.ready.load()) base["max_model_len"] = ctx.engine->context_length();
    data.push_back(base);
    if (ctx.ready.load()) {
      for (const auto& a : ctx.table->List()) {
        const adapters::AdapterReport& r = adapters::ReportOf(a);
        data.push_back({{"id", r.name}, {"object", "model"}, {"created", created}, {"owned_by", "adapterd"},
                        {"root", r.path}, {"parent", options.model_id}});
      }
    }
    res.set_content(Dump(Json{{"object", "list"}, {"data", data}}), "application/json");
  }

  // The checks every tokenizer endpoint starts with: key, readiness, body, model (an adapter
  // that adds tokens tokenizes with its own tokenizer).
  std::optional<ApiError> TokenizerCall(const httplib::Request& req, Json* body, Ask* ask) const {
    API_TRY(CheckKey(req));
    API_TRY(Ready());
    API_TRY(ParseBody(req, body));
    API_TRY(ResolveModel(*body, &ask->model, &ask->adapter));
    return ResolveTokenizer(ask);
  }

  void Tokenize(const httplib::Request& req, httplib::Response& res) {
    Json body;
    Ask ask;
    if (auto e = TokenizerCall(req, &body, &ask)) return SendError(res, *e);
    PromptIds p;
    if (body.contains("messages")) {
      if (auto e = ChatPrompt(body, false, Tok(ask), &p)) return SendError(res, *e);
    } else {
      if (!body.contains("prompt") || !body["prompt"].is_string()) {
        return SendError(res, BadRequest("prompt must be a string (or send messages)", "prompt"));
      }
      if (auto e = NeedTokenizer()) return SendError(res, *e);
      bool add_special = true;
      if (auto e = Fields(body).Bool("add_special_tokens", &add_special)) return SendError(res, *e);
      auto ids = Tok(ask)->Encode(body["prompt"].get<std::string>(), add_special);
      if (!ids.ok()) return SendError(res, BadRequest(std::string(ids.status().message()), "prompt"));
      p.ids = *std::move(ids);
    }
    res.set_content(Dump(Json{{"count", p.ids.size()}, {"max_model_len", ctx.engine->context_length()}, {"tokens", p.ids}}),
                    "application/json");
  }

  void Detokenize(const httplib::Request& req, httplib::Response& res) {
    Json body;
    Ask ask;
    if (auto e = TokenizerCall(req, &body, &ask)) return SendError(res, *e);
    if (auto e = NeedTokenizer()) return SendError(res, *e);
    if (!body.contains("tokens") || !body["tokens"].is_array()) {
      return SendError(res, BadRequest("tokens must be a list of token ids", "tokens"));
    }
    std::vector<int32_t> ids;
    for (const auto& id : body["tokens"]) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
        return SendError(res, BadRequest("tokens must be a list of token ids", "tokens"));
      }
      ids.push_back(id.get<int32_t>());
    }
    auto text = Tok(ask)->Decode(ids, false);
    if (!text.ok()) return SendError(res, BadRequest(std::string(text.status().message()), "tokens"));
    res.set_content(Dump(Json{{"prompt", *text}}), "application/json");
  }

  std::optional<ApiError> CheckAdmin(const httplib::Request& req) const {
    const std::string& key = ctx.admin_token.empty() ? options.api_key : ctx.admin_token;
    if (Authorized(req, key)) return std::nullopt;
    return ApiError{401, "adapter management needs \"Authorization: Bearer <admin token>\"", "authentication_error",
                    "", "invalid_api_key"};
  }

  // The checks both adapter endpoints start with: admin token, readiness, body, lora_name.
  std::optional<ApiError> AdminCall(const httplib::Request& req, Json* body, std::string* name) const {
    API_TRY(CheckAdmin(req));
    API_TRY(Ready());
    API_TRY(ParseBody(req, body));
    if (!body->contains("lora_name") || !(*body)["lora_name"].is_string()) {
      return BadRequest("lora_name must be a string", "lora_name");
    }
    *name = (*body)["lora_name"].get<std::string>();
    return std::nullopt;
  }

  void LoadLora(const httplib::Request& req, httplib::Response& res) {
    Json body;
    std::string name;
    if (auto e = AdminCall(req, &body, &name)) return SendError(res, *e);
    if (!body.contains("lora_path") || !body["lora_path"].is_string()) {
      return SendError(res, BadRequest("lora_path must be a string", "lora_path"));
    }
    if (name == options.model_id) {
      return SendError(res, BadRequest("lora_name must differ from the base model's id", "lora_name"));
    }
    auto result = std::make_shared<std::promise<absl::Status>>();
    std::future<absl::Status> done = result->get_future();
    admin->LoadAsync(name, body["lora_path"].get<std::string>(),
                     [result](const absl::Status& s, const v1::LoadAdapterResponse&) { result->set_value(s); });
    absl::Status s = done.get();
    if (!s.ok()) {
      ApiError e = FromStatus(s);
      if (absl::IsNotFound(s)) e.http = 400;  // A missing folder is a bad path, not a bad URL.
      return SendError(res, e);
    }
    res.set_content(absl::StrCat("Success: LoRA adapter '", name, "' added successfully."), "text/plain");
  }

  void UnloadLora(const httplib::Request& req, httplib::Response& res) {
    Json body;
    std::string name;
    if (auto e = AdminCall(req, &body, &name)) return SendError(res, *e);
    auto result = std::make_shared<std::promise<absl::StatusOr<int64_t>>>();
    std::future<absl::StatusOr<int64_t>> done = result->get_future();
    admin->UnloadAsync(name, [result](const absl::StatusOr<int64_t>& r) { result->set_value(r); });
    absl::StatusOr<int64_t> r = done.get();
    if (!r.ok()) return SendError(res, FromStatus(r.status()));
    res.set_content(absl::StrCat("Success: LoRA adapter '", name, "' removed successfully."), "text/plain");
  }
};

OpenAiServer::OpenAiServer(ServingContext& ctx, AdminService* admin, OpenAiOptions options)
    : impl_(new Impl{ctx, admin, std::move(options)}) {}

OpenAiServer::~OpenAiServer() { Stop(); }

absl::StatusOr<int> OpenAiServer::Start(const std::string& address, const TlsFiles& tls) {
  std::string host;
  int port = 0;
  if (absl::Status s = SplitHostPort(address, &host, &port); !s.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--http_listen: ", s.message()));
  }
  auto server = NewHttpServer(tls, "HTTP listener");
  if (!server.ok()) return server.status();
  http_ = *std::move(server);
  const int threads = std::max(4, impl_->options.threads);
  http_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  http_->set_payload_max_length(impl_->options.max_body_bytes);
  // A stream may pause between tokens longer than the read timeout: writes keep their own.
  http_->set_write_timeout(10, 0);
  Impl* impl = impl_.get();
  http_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    ApiError e{res.status, "", res.status >= 500 ? "server_error" : "invalid_request_error", "", ""};
    e.message = res.status == 413 ? "the request body is too large"
                : res.status == 404 ? "no such endpoint"
                                    : absl::StrCat("HTTP ", res.status);
    res.set_content(Dump(ErrorBody(e)), "application/json");
  });
  http_->Post("/v1/completions", [impl](const httplib::Request& q, httplib::Response& r) { impl->Generate(q, r, false); });
  http_->Post("/v1/chat/completions", [impl](const httplib::Request& q, httplib::Response& r) { impl->Generate(q, r, true); });
  http_->Get("/v1/models", [impl](const httplib::Request& q, httplib::Response& r) { impl->Models(q, r); });
  http_->Post("/tokenize", [impl](const httplib::Request& q, httplib::Response& r) { impl->Tokenize(q, r); });
  http_->Post("/detokenize", [impl](const httplib::Request& q, httplib::Response& r) { impl->Detokenize(q, r); });
  http_->Get("/health", [impl](const httplib::Request&, httplib::Response& r) {
    if (auto e = impl->Ready()) return SendError(r, *e);
    r.set_content("", "text/plain");
  });
  http_->Get("/metrics", [impl](const httplib::Request&, httplib::Response& r) {
    r.set_content(impl->ctx.metrics.Scrape(), "text/plain; version=0.0.4; charset=utf-8");
  });
  if (impl_->options.admin && impl_->admin != nullptr) {
    http_->Post("/v1/load_lora_adapter", [impl](const httplib::Request& q, httplib::Response& r) { impl->LoadLora(q, r); });
    http_->Post("/v1/unload_lora_adapter", [impl](const httplib::Request& q, httplib::Response& r) { impl->UnloadLora(q, r); });
  }
  const int bound = BindHttpServer(*http_, host, port);
  if (bound < 0) return absl::UnavailableError(absl::StrCat("HTTP listener ", address, ": cannot bind"));
  thread_ = std::thread([this] { http_->listen_after_bind(); });
  return bound;
}

void OpenAiServer::Stop() {
  if (http_) StopHttpServer(*http_, thread_);
}

}  // namespace adapterd::server
