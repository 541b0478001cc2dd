// adapterd: one base model, many adapters, served over gRPC. This binary also carries the
// offline subcommands operators use before the server is up.
#include <cstdio>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "server/commands.h"
#include "server/flags.h"
#include "server/serve.h"
#include "nlohmann/json.hpp"
#include "spdlog/pattern_formatter.h"
#include "spdlog/sinks/stdout_color_sinks.h"
#include "spdlog/spdlog.h"

namespace {

// The message as a JSON string literal (quotes, backslashes, control characters and invalid
// UTF-8 escaped or replaced), so that every --log_format=json line parses.
class JsonMessageFlag final : public spdlog::custom_flag_formatter {
 public:
  void format(const spdlog::details::log_msg& msg, const std::tm&,
              spdlog::memory_buf_t& dest) override {
    const std::string text = nlohmann::json(std::string(msg.payload.data(), msg.payload.size()))
                                 .dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
    dest.append(text.data(), text.data() + text.size());
  }
  std::unique_ptr<custom_flag_formatter> clone() const override {
    return std::make_unique<JsonMessageFlag>();
  }
};

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "adapterd SUBCOMMAND [flags]\n"
      "  serve     --model_dir DIR --listen HOST:PORT --admin_listen HOST:PORT\n"
      "            --metrics_listen HOST:PORT --adapter_root DIR [--admin_token_file F]\n"
      "            [--preload name=path,...] [--threads N]   run the gRPC server\n"
      "  inspect   --model_dir DIR [--adapter_dir DIR] [--json]\n"
      "            print the model's load report, or validate an adapter (dry run)\n"
      "  generate  --model_dir DIR [--adapter_dir DIR] --prompt_ids 1,2,3 --max_new_tokens N\n"
      "            [--json]   generate ids with their top log-probabilities\n"
      "            (or --prompt TEXT, tokenized with the model's tokenizer.json)\n"
      "  tokenize  --model_dir DIR --text TEXT [--json]\n"
      "  detokenize --model_dir DIR --ids 1,2,3 [--json]\n"
      "  chat-template --model_dir DIR --messages_json FILE [--add_generation_prompt]\n"
      "            [--chat_template_kwargs JSON]   print the prompt a chat request renders");
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("adapterd"));
  spdlog::set_level(spdlog::level::from_str(absl::GetFlag(FLAGS_log_level)));
  if (absl::GetFlag(FLAGS_log_format) == "json") {
    auto formatter = std::make_unique<spdlog::pattern_formatter>();
    formatter->add_flag<JsonMessageFlag>('*').set_pattern(
        R"({"time":"%Y-%m-%dT%H:%M:%S.%e%z","level":"%l","logger":"%n","thread":%t,"msg":%*})");
    spdlog::set_formatter(std::move(formatter));
  }
  if (args.size() < 2) {
    std::fprintf(stderr, "%s\n", absl::ProgramUsageMessage().data());
    return 2;
  }
  const std::string command = args[1];
  if (command == "serve") return adapterd::server::RunServe();
  if (command == "inspect") return adapterd::server::RunInspect();
  if (command == "generate") return adapterd::server::RunGenerate();
  if (command == "tokenize") return adapterd::server::RunTokenize();
  if (command == "detokenize") return adapterd::server::RunDetokenize();
  if (command == "chat-template") return adapterd::server::RunChatTemplate();
  std::fprintf(stderr, "unknown subcommand \"%s\"\n%s\n", command.c_str(),
               absl::ProgramUsageMessage().data());
  return 2;
}
