#include "jinja/chat_template.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace adapterd::jinja {
namespace {

constexpr off_t kMaxFileBytes = off_t{64} << 20;

// Reads a regular file of bounded size; NotFound when absent.
absl::StatusOr<std::string> ReadSmallFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(absl::StrCat(path, " does not exist"));
    return absl::InvalidArgumentError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > kMaxFileBytes) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, " is not a regular file of at most ",
                                                   kMaxFileBytes, " bytes"));
  }
  std::string text(static_cast<size_t>(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  ::close(fd);
  text.resize(done);
  return text;
}

// A special token's text: a string, or an AddedToken object's content.
std::optional<std::string> TokenText(const nlohmann::ordered_json& v) {
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string()) {
    return v["content"].get<std::string>();
  }
  return std::nullopt;
}

absl::StatusOr<std::string> FormatTime(const std::string& format, std::time_t now) {
  std::tm tm{};
  localtime_r(&now, &tm);
  if (format.empty()) return std::string();
  std::string buf(256 + format.size() * 8, '\0');
  const size_t n = std::strftime(buf.data(), buf.size(), format.c_str(), &tm);
  if (n == 0) return absl::InvalidArgumentError("strftime_now: the format produced no text");
  buf.resize(n);
  return buf;
}

}  // namespace

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::FromSource(
    const std::string& source, const nlohmann::ordered_json& tokenizer_config) {
  auto t = std::unique_ptr<ChatTemplate>(new ChatTemplate());
  Options options;
  options.trim_blocks = true;
  options.lstrip_blocks = true;
  absl::StatusOr<Template> parsed = Template::Parse(source, options);
  if (!parsed.ok()) return parsed.status();
  t->template_ = *std::move(parsed);
  t->source_ = source;
  if (tokenizer_config.is_object()) {
    // transformers passes special_tokens_map: the set ones, as strings.
    for (const char* key : {"bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                            "cls_token", "mask_token"}) {
      auto it = tokenizer_config.find(key);
      if (it == tokenizer_config.end()) continue;
      if (std::optional<std::string> text = TokenText(*it)) {
        t->special_tokens_.emplace_back(key, Value::String(*text));
      }
    }
    auto extra = tokenizer_config.find("additional_special_tokens");
    if (extra != tokenizer_config.end() && extra->is_array() && !extra->empty()) {
      ValueList tokens;
      for (const auto& tok : *extra) {
        if (std::optional<std::string> text = TokenText(tok)) tokens.push_back(Value::String(*text));
      }
      t->special_tokens_.emplace_back("additional_special_tokens", Value::List(std::move(tokens)));
    }
  }
  return t;
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::FromModelDir(const std::string& dir) {
  nlohmann::ordered_json config = nlohmann::ordered_json::object();
  std::string source;
  const std::string config_path = dir + "/tokenizer_config.json";
  absl::StatusOr<std::string> config_text = ReadSmallFile(config_path);
  if (config_text.ok()) {
    config = nlohmann::ordered_json::parse(*config_text, nullptr, false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, " is not a JSON object"));
    }
    auto it = config.find("chat_template");
    if (it != config.end() && it->is_string()) {
      source = it->get<std::string>();
    } else if (it != config.end() && it->is_array()) {
      for (const auto& named : *it) {
        if (named.is_object() && named.value("name", "") == "default" && named.contains("template") &&
            named["template"].is_string()) {
          source = named["template"].get<std::string>();
        }
      }
      if (source.empty()) {
        return absl::NotFoundError(absl::StrCat(config_path, " lists chat templates but none named \"default\""));
      }
    } else if (it != config.end() && !it->is_null()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, " chat_template is neither a string nor a list"));
    }
  } else if (!absl::IsNotFound(config_text.status())) {
    return config_text.status();
  }
  if (source.empty()) {
    absl::StatusOr<std::string> file = ReadSmallFile(dir + "/chat_template.jinja");
    if (!file.ok()) {
      if (absl::IsNotFound(file.status())) {
        return absl::NotFoundError(absl::StrCat(
            "the model has no chat template (neither tokenizer_config.json's chat_template nor ",
            "chat_template.jinja in ", dir, ")"));
      }
      return file.status();
    }
    source = *std::move(file);
  }
  absl::StatusOr<std::unique_ptr<ChatTemplate>> t = FromSource(source, config);
  if (!t.ok()) {
    return absl::Status(t.status().code(), absl::StrCat("the model's chat template: ", t.status().message()));
  }
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& messages,
                                                 const RenderOptions& options) const {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be a list");
  Value vars = Value::Dict();
  for (const auto& [k, v] : special_tokens_) vars.Set(k, v);
  if (options.extra.is_object()) {
    for (const auto& [k, v] : options.extra.items()) {
      if (k == "messages" || k == "add_generation_prompt") continue;
      vars.Set(k, Value::FromJson(v));
    }
  }
  vars.Set("messages", Value::FromJson(messages));
  if (!vars.Find("tools")) vars.Set("tools", Value::None());
  if (!vars.Find("documents")) vars.Set("documents", Value::None());
  vars.Set("add_generation_prompt", Value::Bool(options.add_generation_prompt));
  vars.Set("raise_exception", Value::Callable([](const ValueList& args, const ValueDict&) -> absl::StatusOr<Value> {
    return absl::InvalidArgumentError(args.empty() ? std::string("the chat template refused the conversation")
                                                   : args[0].ToString());
  }));
  const std::time_t now = options.now ? *options.now : std::time(nullptr);
  vars.Set("strftime_now", Value::Callable([now](const ValueList& args, const ValueDict&) -> absl::StatusOr<Value> {
    if (args.empty() || !args[0].is_string()) return absl::InvalidArgumentError("strftime_now needs a format string");
    absl::StatusOr<std::string> s = FormatTime(args[0].str(), now);
    if (!s.ok()) return s.status();
    return Value::String(*std::move(s));
  }));
  return template_.Render(vars);
}

}  // namespace adapterd::jinja
