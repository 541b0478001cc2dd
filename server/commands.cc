#include "server/commands.h"

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/flags/flag.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "adapters/adapter_ref.h"
#include "core/engine.h"
#include "core/tokenizer.h"
#include "core/stop_criteria.h"
#include "jinja/chat_template.h"
#include "nlohmann/json.hpp"
#include "server/flags.h"
#include "spdlog/spdlog.h"

namespace adapterd::server {
namespace {

core::EngineOptions EngineOptionsFromFlags() {
  core::EngineOptions o;
  o.model_dir = absl::GetFlag(FLAGS_model_dir);
  o.device = absl::GetFlag(FLAGS_device);
  o.dtype = absl::GetFlag(FLAGS_dtype);
  o.threads = absl::GetFlag(FLAGS_threads);
  o.cpu_kernels = absl::GetFlag(FLAGS_cpu_kernels);
  o.kv_cache_dtype = absl::GetFlag(FLAGS_kv_cache_dtype);
  o.matmul_precision = absl::GetFlag(FLAGS_matmul_precision);
  o.map_weights = absl::GetFlag(FLAGS_mmap);
  o.refresh_small_pages = absl::GetFlag(FLAGS_mmap_refresh_small_pages);
  o.quantize = absl::GetFlag(FLAGS_quantize);
  return o;
}

}  // namespace

std::string AdapterNameOf(const std::string& dir) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  const size_t slash = d.rfind('/');
  return slash == std::string::npos ? d : d.substr(slash + 1);
}

bool ParseIdList(const std::string& text, std::vector<int32_t>* ids) {
  ids->clear();
  if (text.empty()) return false;
  for (absl::string_view part : absl::StrSplit(text, ',')) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id)) return false;
    ids->push_back(id);
  }
  return true;
}

// What the command-line loads of --adapter_dir may read: the base's tokenizer for an adapter's
// added_tokens.json.
adapters::AdapterFileRules CommandAdapterRules() {
  adapters::AdapterFileRules rules;
  rules.base_model_dir = absl::GetFlag(FLAGS_model_dir);
  return rules;
}

// Validates --adapter_dir against the loaded base and prints the adapter's report.
int InspectAdapter(const core::Engine& engine) {
  const std::string dir = absl::GetFlag(FLAGS_adapter_dir);
  adapters::AdapterReport report;
  auto adapter = adapters::LoadAdapterFor(engine, dir, AdapterNameOf(dir), &report, CommandAdapterRules());
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = report.ToJson();
    j["ok"] = adapter.ok();
    if (!adapter.ok()) j["error"] = std::string(adapter.status().message());
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << report.ToText();
    std::cout << "status       " << (adapter.ok() ? "OK" : "REFUSED") << "\n";
    if (!adapter.ok()) std::cout << "error        " << adapter.status().message() << "\n";
  }
  return adapter.ok() ? 0 : 1;
}

int RunInspect() {
  if (absl::GetFlag(FLAGS_model_dir).empty()) {
    std::cerr << "inspect: --model_dir is required\n";
    return 2;
  }
  core::LoadReport report;
  auto engine = core::Engine::Load(EngineOptionsFromFlags(), &report);
  if (!absl::GetFlag(FLAGS_adapter_dir).empty()) {
    if (!engine.ok()) {
      std::cerr << "inspect: base model refused: " << engine.status().message() << "\n";
      return 1;
    }
    return InspectAdapter(**engine);
  }
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j = report.ToJson();
    if (!engine.ok()) j["error"] = std::string(engine.status().message());
    std::cout << j.dump(2) << "\n";
  } else {
    std::cout << report.ToText();
    if (!engine.ok()) std::cout << "error        " << engine.status().message() << "\n";
  }
  return engine.ok() ? 0 : 1;
}

// Loads `dir`/tokenizer.json or prints why not.
std::unique_ptr<core::Tokenizer> LoadTokenizerOrComplain(const char* command) {
  auto tok = core::Tokenizer::FromModelDir(absl::GetFlag(FLAGS_model_dir));
  if (!tok.ok()) {
    std::cerr << command << ": " << tok.status().message() << "\n";
    return nullptr;
  }
  return *std::move(tok);
}

int RunTokenize() {
  auto tok = LoadTokenizerOrComplain("tokenize");
  if (tok == nullptr) return 1;
  auto ids = tok->Encode(absl::GetFlag(FLAGS_text), absl::GetFlag(FLAGS_add_special_tokens));
  if (!ids.ok()) {
    std::cerr << "tokenize: " << ids.status().message() << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << nlohmann::json({{"ids", *ids}}).dump() << "\n";
  } else {
    for (size_t i = 0; i < ids->size(); ++i) std::cout << (i ? "," : "") << (*ids)[i];
    std::cout << "\n";
  }
  return 0;
}

int RunDetokenize() {
  auto tok = LoadTokenizerOrComplain("detokenize");
  if (tok == nullptr) return 1;
  std::vector<int32_t> ids;
  if (!ParseIdList(absl::GetFlag(FLAGS_ids), &ids)) {
    std::cerr << "detokenize: --ids must be a comma-separated list of token ids\n";
    return 2;
  }
  auto text = tok->Decode(ids, absl::GetFlag(FLAGS_skip_special_tokens));
  if (!text.ok()) {
    std::cerr << "detokenize: " << text.status().message() << "\n";
    return 2;
  }
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << nlohmann::json({{"text", *text}}).dump() << "\n";
  } else {
    std::cout << *text << "\n";
  }
  return 0;
}

int RunChatTemplate() {
  const std::string dir = absl::GetFlag(FLAGS_model_dir);
  const std::string messages_path = absl::GetFlag(FLAGS_messages_json);
  if (dir.empty() || messages_path.empty()) {
    std::cerr << "chat-template: --model_dir and --messages_json are required\n";
    return 2;
  }
  auto t = jinja::ChatTemplate::FromModelDir(dir);
  if (!t.ok()) {
    std::cerr << "chat-template: " << t.status().message() << "\n";
    return 1;
  }
  std::ifstream in(messages_path);
  if (!in) {
    std::cerr << "chat-template: cannot read " << messages_path << "\n";
    return 2;
  }
  std::stringstream text;
  text << in.rdbuf();
  const auto messages = nlohmann::ordered_json::parse(text.str(), nullptr, false);
  if (messages.is_discarded() || !messages.is_array()) {
    std::cerr << "chat-template: " << messages_path << " is not a JSON list of messages\n";
    return 2;
  }
  jinja::ChatTemplate::RenderOptions options;
  options.add_generation_prompt = absl::GetFlag(FLAGS_add_generation_prompt);
  if (const std::string kwargs = absl::GetFlag(FLAGS_chat_template_kwargs); !kwargs.empty()) {
    options.extra = nlohmann::ordered_json::parse(kwargs, nullptr, false);
    if (options.extra.is_discarded() || !options.extra.is_object()) {
      std::cerr << "chat-template: --chat_template_kwargs is not a JSON object\n";
      return 2;
    }
  }
  auto rendered = (*t)->Render(messages, options);
  if (!rendered.ok()) {
    std::cerr << "chat-template: " << rendered.status().message() << "\n";
    return 1;
  }
  std::cout << *rendered;
  return 0;
}

int RunGenerate() {
  if (absl::GetFlag(FLAGS_model_dir).empty()) {
    std::cerr << "generate: --model_dir is required\n";
    return 2;
  }
  core::GenerateRequest request;
  std::unique_ptr<core::Tokenizer> tokenizer;
  if (!absl::GetFlag(FLAGS_prompt).empty()) {
    tokenizer = LoadTokenizerOrComplain("generate");
    if (tokenizer == nullptr) return 1;
    auto ids = tokenizer->Encode(absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_add_special_tokens));
    if (!ids.ok()) {
      std::cerr << "generate: " << ids.status().message() << "\n";
      return 2;
    }
    request.prompt = *std::move(ids);
  } else if (!ParseIdList(absl::GetFlag(FLAGS_prompt_ids), &request.prompt)) {
    std::cerr << "generate: give --prompt TEXT or --prompt_ids as comma-separated token ids\n";
    return 2;
  }
  request.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  request.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  request.params.temperature = absl::GetFlag(FLAGS_temperature);
  request.params.top_k = absl::GetFlag(FLAGS_top_k);
  request.params.top_p = absl::GetFlag(FLAGS_top_p);
  request.params.repetition_penalty = absl::GetFlag(FLAGS_repetition_penalty);
  request.params.seed = absl::GetFlag(FLAGS_seed);
  request.params.top_logprobs = absl::GetFlag(FLAGS_top_logprobs);

  adapters::AdapterRef adapter_tokenizer;  // Set when the adapter brings its own tokenizer.
  core::LoadReport report;
  auto engine = core::Engine::Load(EngineOptionsFromFlags(), &report);
  if (!engine.ok()) {
    std::cerr << "generate: " << engine.status().message() << "\n";
    return 1;
  }
  spdlog::info("loaded {} in {:.3f} s, {} intra-op threads, CPU kernels {}", report.architecture,
               report.load_seconds, core::Engine::threads(), core::Engine::cpu_kernels());
  if (const std::string dir = absl::GetFlag(FLAGS_adapter_dir); !dir.empty()) {
    adapters::AdapterReport adapter_report;
    auto adapter = adapters::LoadAdapterFor(**engine, dir, AdapterNameOf(dir), &adapter_report, CommandAdapterRules());
    if (!adapter.ok()) {
      std::cerr << "generate: " << adapter.status().message() << "\n";
      return 1;
    }
    spdlog::info("adapter {} ({}) loaded in {:.3f} s", adapter_report.name, adapter_report.type,
                 adapter_report.load_seconds);
    // An adapter that adds tokens tokenizes (and detokenizes) with its own tokenizer.
    if (const core::Tokenizer* own = adapters::TokenizerOf(*adapter); own != nullptr && tokenizer != nullptr) {
      auto ids = own->Encode(absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_add_special_tokens));
      if (!ids.ok()) {
        std::cerr << "generate: " << ids.status().message() << "\n";
        return 2;
      }
      request.prompt = *std::move(ids);
      adapter_tokenizer = *adapter;
    }
    request.adapter = adapters::ForSequence(*adapter);
  }
  if (tokenizer == nullptr) {  // Only for its EOS token: ids in, ids out.
    auto from_dir = core::Tokenizer::FromModelDir(absl::GetFlag(FLAGS_model_dir));
    if (from_dir.ok()) tokenizer = *std::move(from_dir);
  }
  request.eos_token_ids = core::EosTokenIds((*engine)->config(), tokenizer.get());
  auto result = core::Generate(**engine, request);
  if (!result.ok()) {
    std::cerr << "generate: " << result.status().message() << "\n";
    return absl::IsInvalidArgument(result.status()) ? 2 : 1;
  }
  std::vector<int32_t> generated;
  for (const core::StepOutput& s : result->steps) generated.push_back(s.token);
  std::string text;
  if (tokenizer != nullptr) {
    const core::Tokenizer* decoder = adapter_tokenizer ? adapters::TokenizerOf(adapter_tokenizer) : tokenizer.get();
    auto decoded = decoder->Decode(generated, absl::GetFlag(FLAGS_skip_special_tokens));
    if (decoded.ok()) text = *decoded;
  }
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json j;
    j["prompt_ids"] = request.prompt;
    if (tokenizer != nullptr) j["text"] = text;
    j["finish_reason"] = core::FinishReasonName(result->finish_reason);
    j["tokens"] = nlohmann::json::array();
    j["steps"] = nlohmann::json::array();
    for (const core::StepOutput& s : result->steps) {
      j["tokens"].push_back(s.token);
      nlohmann::json step = {{"token", s.token}, {"logprob", s.logprob}};
      step["top"] = nlohmann::json::array();
      for (const core::TokenLogprob& t : s.top) {
        step["top"].push_back({{"id", t.id}, {"logprob", t.logprob}});
      }
      j["steps"].push_back(step);
    }
    std::cout << j.dump() << "\n";
    return 0;
  }
  if (tokenizer != nullptr) std::cout << "text: " << text << "\n";
  std::cout << "ids:";
  for (const core::StepOutput& s : result->steps) std::cout << " " << s.token;
  std::cout << "\nfinish: " << core::FinishReasonName(result->finish_reason) << "\n";
  for (size_t i = 0; i < result->steps.size(); ++i) {
    const core::StepOutput& s = result->steps[i];
    std::printf("step %zu: %d (%.4f)", i, s.token, s.logprob);
    for (const core::TokenLogprob& t : s.top) std::printf("  %d:%.4f", t.id, t.logprob);
    std::printf("\n");
  }
  return 0;
}

}  // namespace adapterd::server
