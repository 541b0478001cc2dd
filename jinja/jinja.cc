#include "jinja/jinja.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "jinja/ast.h"
#include "jinja/text.h"

namespace adapterd::jinja {

// ---------------------------------------------------------------------------------------------
// Values

Value Value::Undefined(std::string name) {
  Value v;
  v.s_ = std::make_shared<const std::string>(std::move(name));
  return v;
}
Value Value::None() {
  Value v;
  v.kind_ = Kind::kNone;
  return v;
}
Value Value::Bool(bool b) {
  Value v;
  v.kind_ = Kind::kBool;
  v.b_ = b;
  return v;
}
Value Value::Int(int64_t i) {
  Value v;
  v.kind_ = Kind::kInt;
  v.i_ = i;
  return v;
}
Value Value::Float(double d) {
  Value v;
  v.kind_ = Kind::kFloat;
  v.d_ = d;
  return v;
}
Value Value::String(std::string s) {
  Value v;
  v.kind_ = Kind::kString;
  v.s_ = std::make_shared<const std::string>(std::move(s));
  return v;
}
Value Value::List(ValueList items) {
  Value v;
  v.kind_ = Kind::kList;
  v.list_ = std::make_shared<ValueList>(std::move(items));
  return v;
}
Value Value::Tuple(ValueList items) {
  Value v = List(std::move(items));
  v.tuple_ = true;
  return v;
}
Value Value::Dict(ValueDict items) {
  Value v;
  v.kind_ = Kind::kDict;
  v.dict_ = std::make_shared<ValueDict>(std::move(items));
  return v;
}
Value Value::Namespace(ValueDict items) {
  Value v = Dict(std::move(items));
  v.namespace_ = true;
  return v;
}
Value Value::Callable(Function fn) {
  Value v;
  v.kind_ = Kind::kFunction;
  v.fn_ = std::make_shared<const Function>(std::move(fn));
  return v;
}

Value Value::FromJson(const nlohmann::ordered_json& json) {
  switch (json.type()) {
    case nlohmann::ordered_json::value_t::null: return None();
    case nlohmann::ordered_json::value_t::boolean: return Bool(json.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer: return Int(json.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned: {
      const uint64_t u = json.get<uint64_t>();
      if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Float(static_cast<double>(u));
      }
      return Int(static_cast<int64_t>(u));
    }
    case nlohmann::ordered_json::value_t::number_float: return Float(json.get<double>());
    case nlohmann::ordered_json::value_t::string: return String(json.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList items;
      items.reserve(json.size());
      for (const auto& item : json) items.push_back(FromJson(item));
      return List(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      ValueDict items;
      items.reserve(json.size());
      for (const auto& [key, item] : json.items()) items.emplace_back(key, FromJson(item));
      return Dict(std::move(items));
    }
    default: return None();
  }
}

double Value::number() const {
  switch (kind_) {
    case Kind::kBool: return b_ ? 1.0 : 0.0;
    case Kind::kInt: return static_cast<double>(i_);
    case Kind::kFloat: return d_;
    default: return 0.0;
  }
}

const Value* Value::Find(std::string_view key) const {
  if (kind_ != Kind::kDict) return nullptr;
  for (const auto& [k, v] : *dict_) {
    if (k == key) return &v;
  }
  return nullptr;
}

void Value::Set(const std::string& key, Value value) {
  for (auto& [k, v] : *dict_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  dict_->emplace_back(key, std::move(value));
}

bool Value::Truthy() const {
  switch (kind_) {
    case Kind::kUndefined:
    case Kind::kNone: return false;
    case Kind::kBool: return b_;
    case Kind::kInt: return i_ != 0;
    case Kind::kFloat: return d_ != 0.0;
    case Kind::kString: return !s_->empty();
    case Kind::kList: return !list_->empty();
    case Kind::kDict: return !dict_->empty();
    case Kind::kFunction: return true;
  }
  return false;
}

std::string Value::ToString() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kString: return *s_;
    default: return Repr();
  }
}

std::string Value::Repr() const {
  switch (kind_) {
    case Kind::kUndefined: return "";
    case Kind::kNone: return "None";
    case Kind::kBool: return b_ ? "True" : "False";
    case Kind::kInt: return std::to_string(i_);
    case Kind::kFloat: return PyFloatRepr(d_);
    case Kind::kString: return PyStringRepr(*s_);
    case Kind::kList: {
      std::string out = tuple_ ? "(" : "[";
      for (size_t i = 0; i < list_->size(); ++i) {
        if (i) out += ", ";
        out += (*list_)[i].Repr();
      }
      if (tuple_ && list_->size() == 1) out += ",";
      return out + (tuple_ ? ")" : "]");
    }
    case Kind::kDict: {
      if (namespace_) return "<Namespace>";
      std::string out = "{";
      bool first = true;
      for (const auto& [k, v] : *dict_) {
        if (!first) out += ", ";
        first = false;
        out += PyStringRepr(k) + ": " + v.Repr();
      }
      return out + "}";
    }
    case Kind::kFunction: return "<function>";
  }
  return "";
}

bool Equal(const Value& a, const Value& b) {
  using K = Value::Kind;
  if (a.is_number() && b.is_number()) {
    if (a.kind() == K::kFloat || b.kind() == K::kFloat) return a.number() == b.number();
    return a.integer() == b.integer();
  }
  if (a.kind() != b.kind()) return false;
  switch (a.kind()) {
    case K::kUndefined:
    case K::kNone: return true;
    case K::kString: return a.str() == b.str();
    case K::kList: {
      if (a.is_tuple() != b.is_tuple() || a.list().size() != b.list().size()) return false;
      for (size_t i = 0; i < a.list().size(); ++i) {
        if (!Equal(a.list()[i], b.list()[i])) return false;
      }
      return true;
    }
    case K::kDict: {
      if (a.dict().size() != b.dict().size()) return false;
      for (const auto& [k, v] : a.dict()) {
        const Value* other = b.Find(k);
        if (other == nullptr || !Equal(v, *other)) return false;
      }
      return true;
    }
    case K::kFunction: return &a.function() == &b.function();
    default: return false;
  }
}

namespace {

void JsonString(const std::string& s, bool ensure_ascii, std::string& out) {
  out += '"';
  if (!ensure_ascii) {
    for (unsigned char c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\r': out += "\\r"; break;
        case '\t': out += "\\t"; break;
        case '\b': out += "\\b"; break;
        case '\f': out += "\\f"; break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof(buf), "\\u%04x", c);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
  } else {
    for (char32_t cp : DecodeUtf8(s)) {
      if (cp < 0x80) {
        const std::string one(1, static_cast<char>(cp));
        std::string escaped;
        JsonString(one, false, escaped);
        out += escaped.substr(1, escaped.size() - 2);
        continue;
      }
      char buf[16];
      if (cp >= 0x10000) {
        const char32_t v = cp - 0x10000;
        std::snprintf(buf, sizeof(buf), "\\u%04x\\u%04x", 0xD800 + static_cast<unsigned>(v >> 10),
                      0xDC00 + static_cast<unsigned>(v & 0x3FF));
      } else {
        std::snprintf(buf, sizeof(buf), "\\u%04x", static_cast<unsigned>(cp));
      }
      out += buf;
    }
  }
  out += '"';
}

absl::Status JsonValue(const Value& v, int indent, bool sort_keys, bool ensure_ascii, int depth,
                       std::string& out) {
  using K = Value::Kind;
  if (depth > 512) return absl::InvalidArgumentError("tojson: value nested too deeply");
  const std::string item_sep = indent >= 0 ? "," : ", ";
  auto newline = [&](int level) {
    if (indent < 0) return;
    out += '\n';
    out.append(static_cast<size_t>(indent) * static_cast<size_t>(level), ' ');
  };
  switch (v.kind()) {
    case K::kUndefined:
      return absl::InvalidArgumentError("tojson: Object of type Undefined is not JSON serializable");
    case K::kFunction:
      return absl::InvalidArgumentError("tojson: a function is not JSON serializable");
    case K::kNone: out += "null"; return absl::OkStatus();
    case K::kBool: out += v.boolean() ? "true" : "false"; return absl::OkStatus();
    case K::kInt: out += std::to_string(v.integer()); return absl::OkStatus();
    case K::kFloat: {
      const double d = v.number();
      if (std::isnan(d)) {
        out += "NaN";
      } else if (std::isinf(d)) {
        out += d > 0 ? "Infinity" : "-Infinity";
      } else {
        out += PyFloatRepr(d);
      }
      return absl::OkStatus();
    }
    case K::kString: JsonString(v.str(), ensure_ascii, out); return absl::OkStatus();
    case K::kList: {
      if (v.list().empty()) {
        out += "[]";
        return absl::OkStatus();
      }
      out += '[';
      for (size_t i = 0; i < v.list().size(); ++i) {
        if (i) out += item_sep;
        newline(depth + 1);
        if (absl::Status s = JsonValue(v.list()[i], indent, sort_keys, ensure_ascii, depth + 1, out);
            !s.ok()) {
          return s;
        }
      }
      newline(depth);
      out += ']';
      return absl::OkStatus();
    }
    case K::kDict: {
      if (v.dict().empty()) {
        out += "{}";
        return absl::OkStatus();
      }
      std::vector<const std::pair<std::string, Value>*> items;
      for (const auto& item : v.dict()) items.push_back(&item);
      if (sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](auto* a, auto* b) { return CodePointLess(a->first, b->first); });
      }
      out += '{';
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += item_sep;
        newline(depth + 1);
        JsonString(items[i]->first, ensure_ascii, out);
        out += ": ";
        if (absl::Status s =
                JsonValue(items[i]->second, indent, sort_keys, ensure_ascii, depth + 1, out);
            !s.ok()) {
          return s;
        }
      }
      newline(depth);
      out += '}';
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> ToJson(const Value& value, int indent, bool sort_keys) {
  std::string out;
  if (absl::Status s = JsonValue(value, indent, sort_keys, false, 0, out); !s.ok()) return s;
  return out;
}

// ---------------------------------------------------------------------------------------------
// Lexer

namespace {

enum class Tok { kText, kBlockBegin, kBlockEnd, kVarBegin, kVarEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok type;
  std::string text;
  int line;
};

absl::Status SyntaxError(int line, const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("template syntax error at line ", line, ": ", message));
}
absl::Status Unsupported(int line, const std::string& what) {
  return absl::UnimplementedError(
      absl::StrCat("template uses ", what, " (line ", line, "), which adapterd's Jinja engine does not implement"));
}

bool IsNameStart(char c) { return std::isalpha(static_cast<unsigned char>(c)) || c == '_'; }
bool IsNameChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// Python's \s+ prefix length at `pos` (ASCII whitespace and the Unicode spaces).
size_t SkipSpace(const std::string& s, size_t pos) {
  while (pos < s.size()) {
    const size_t n = PyWhitespaceAt(s, pos);
    if (n == 0) break;
    pos += n;
  }
  return pos;
}

class Lexer {
 public:
  Lexer(std::string source, const Options& options) : src_(std::move(source)), opt_(options) {}

  absl::StatusOr<std::vector<Token>> Run() {
    NormalizeNewlines();
    size_t pos = 0;
    bool line_starting = true;
    while (pos < src_.size()) {
      size_t tag = FindTag(pos);
      std::string text = src_.substr(pos, tag - pos);
      if (tag == src_.size()) {
        Emit(Tok::kText, std::move(text), pos);
        break;
      }
      const char kind = src_[tag + 1];  // '{', '%' or '#'
      const char mod = tag + 2 < src_.size() ? src_[tag + 2] : '\0';
      if (mod == '-') {
        text = PyRstrip(text);
      } else if (mod != '+' && opt_.lstrip_blocks && kind != '{') {
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if ((l_pos > 0 || line_starting) && l_pos < text.size() &&
            SkipSpace(text, l_pos) == text.size()) {
          text.resize(l_pos);
        }
      }
      Emit(Tok::kText, std::move(text), pos);
      size_t inner = tag + 2 + ((mod == '-' || mod == '+') ? 1 : 0);
      size_t end = 0;
      if (kind == '#') {
        absl::StatusOr<size_t> e = Comment(tag, inner);
        if (!e.ok()) return e.status();
        end = *e;
      } else if (kind == '%' && IsRaw(inner, &end)) {
        absl::StatusOr<size_t> e = Raw(tag, end);
        if (!e.ok()) return e.status();
        end = *e;
      } else {
        absl::StatusOr<size_t> e = Tag(kind == '%', tag, inner);
        if (!e.ok()) return e.status();
        end = *e;
      }
      line_starting = end > 0 && src_[end - 1] == '\n';
      pos = end;
    }
    tokens_.push_back({Tok::kEof, "", Line(src_.size())});
    return std::move(tokens_);
  }

 private:
  void NormalizeNewlines() {
    std::string out;
    out.reserve(src_.size());
    for (size_t i = 0; i < src_.size(); ++i) {
      if (src_[i] == '\r') {
        out += '\n';
        if (i + 1 < src_.size() && src_[i + 1] == '\n') ++i;
      } else {
        out += src_[i];
      }
    }
    if (!opt_.keep_trailing_newline && !out.empty() && out.back() == '\n') out.pop_back();
    src_ = std::move(out);
  }

  int Line(size_t pos) const {
    return 1 + static_cast<int>(std::count(src_.begin(), src_.begin() + static_cast<long>(std::min(pos, src_.size())), '\n'));
  }

  void Emit(Tok type, std::string text, size_t pos) {
    if (type == Tok::kText && text.empty()) return;
    tokens_.push_back({type, std::move(text), Line(pos)});
  }

  size_t FindTag(size_t pos) const {
    while (true) {
      const size_t i = src_.find('{', pos);
      if (i == std::string::npos || i + 1 >= src_.size()) return src_.size();
      const char c = src_[i + 1];
      if (c == '{' || c == '%' || c == '#') return i;
      pos = i + 1;
    }
  }

  // After a tag's closing delimiter at `close` (just past it): whitespace control.
  size_t AfterEnd(size_t close, char mod, bool block_like) const {
    if (mod == '-') return SkipSpace(src_, close);
    if (mod != '+' && block_like && opt_.trim_blocks && close < src_.size() && src_[close] == '\n') {
      return close + 1;
    }
    return close;
  }

  absl::StatusOr<size_t> Comment(size_t tag, size_t inner) {
    const size_t e = src_.find("#}", inner);
    if (e == std::string::npos) return SyntaxError(Line(tag), "unterminated comment");
    const char mod = e > inner && (src_[e - 1] == '-' || src_[e - 1] == '+') ? src_[e - 1] : '\0';
    return AfterEnd(e + 2, mod, true);
  }

  // {% raw %}: `*end` receives the position just past the opening tag.
  bool IsRaw(size_t inner, size_t* end) const {
    size_t p = SkipSpace(src_, inner);
    if (src_.compare(p, 3, "raw") != 0) return false;
    p = SkipSpace(src_, p + 3);
    char mod = '\0';
    if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) mod = src_[p++];
    if (src_.compare(p, 2, "%}") != 0) return false;
    *end = AfterEnd(p + 2, mod, true);
    return true;
  }

  absl::StatusOr<size_t> Raw(size_t tag, size_t body) {
    size_t search = body;
    while (true) {
      const size_t open = src_.find("{%", search);
      if (open == std::string::npos) return SyntaxError(Line(tag), "unterminated raw block");
      size_t p = open + 2;
      char lmod = '\0';
      if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) lmod = src_[p++];
      p = SkipSpace(src_, p);
      if (src_.compare(p, 6, "endraw") == 0) {
        p = SkipSpace(src_, p + 6);
        char rmod = '\0';
        if (p < src_.size() && (src_[p] == '-' || src_[p] == '+')) rmod = src_[p++];
        if (src_.compare(p, 2, "%}") == 0) {
          std::string text = src_.substr(body, open - body);
          if (lmod == '-') text = PyRstrip(text);
          Emit(Tok::kText, std::move(text), body);
          return AfterEnd(p + 2, rmod, true);
        }
      }
      search = open + 2;
    }
  }

  absl::StatusOr<size_t> Tag(bool block, size_t tag, size_t p) {
    Emit(block ? Tok::kBlockBegin : Tok::kVarBegin, block ? "{%" : "{{", tag);
    int depth = 0;
    while (true) {
      p = SkipSpace(src_, p);
      if (p >= src_.size()) {
        return SyntaxError(Line(tag), block ? "unexpected end of template, expected '%}'"
                                            : "unexpected end of template, expected '}}'");
      }
      const char* close = block ? "%}" : "}}";
      if (depth == 0) {
        char mod = '\0';
        size_t q = p;
        if (src_[q] == '-' || (block && src_[q] == '+')) {
          if (src_.compare(q + 1, 2, close) == 0) mod = src_[q++];
        }
        if (src_.compare(q, 2, close) == 0) {
          Emit(block ? Tok::kBlockEnd : Tok::kVarEnd, close, q);
          return AfterEnd(q + 2, mod, block);
        }
      }
      const char c = src_[p];
      if (IsNameStart(c)) {
        size_t q = p;
        while (q < src_.size() && IsNameChar(src_[q])) ++q;
        Emit(Tok::kName, src_.substr(p, q - p), p);
        p = q;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t q = p;
        bool is_float = false;
        while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        if (q + 1 < src_.size() && src_[q] == '.' && std::isdigit(static_cast<unsigned char>(src_[q + 1]))) {
          is_float = true;
          ++q;
          while (q < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[q])) || src_[q] == '_')) ++q;
        }
        if (q < src_.size() && (src_[q] == 'e' || src_[q] == 'E')) {
          size_t r = q + 1;
          if (r < src_.size() && (src_[r] == '+' || src_[r] == '-')) ++r;
          if (r < src_.size() && std::isdigit(static_cast<unsigned char>(src_[r]))) {
            is_float = true;
            q = r;
            while (q < src_.size() && std::isdigit(static_cast<unsigned char>(src_[q]))) ++q;
          }
        }
        std::string digits;
        for (size_t i = p; i < q; ++i) {
          if (src_[i] != '_') digits += src_[i];
        }
        Emit(is_float ? Tok::kFloat : Tok::kInt, std::move(digits), p);
        p = q;
      } else if (c == '\'' || c == '"') {
        absl::StatusOr<size_t> q = String(p);
        if (!q.ok()) return q.status();
        p = *q;
      } else {
        static const char* kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%",
                                     "~", "<", ">", "=", "(", ")", "[", "]", "{", "}", ",", ".",
                                     ":", "|"};
        const char* found = nullptr;
        for (const char* op : kOps) {
          if (src_.compare(p, std::strlen(op), op) == 0) {
            found = op;
            break;
          }
        }
        if (found == nullptr) {
          return SyntaxError(Line(p), absl::StrCat("unexpected character '", std::string(1, c), "'"));
        }
        const std::string op = found;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") {
          if (depth == 0) return SyntaxError(Line(p), absl::StrCat("unexpected '", op, "'"));
          --depth;
        }
        Emit(Tok::kOp, op, p);
        p += op.size();
      }
    }
  }

  // A string literal with Python's escapes.
  absl::StatusOr<size_t> String(size_t p) {
    const char quote = src_[p];
    std::string out;
    size_t q = p + 1;
    while (true) {
      if (q >= src_.size()) return SyntaxError(Line(p), "unterminated string");
      const char c = src_[q];
      if (c == quote) break;
      if (c != '\\') {
        out += c;
        ++q;
        continue;
      }
      if (q + 1 >= src_.size()) return SyntaxError(Line(p), "unterminated string");
      const char e = src_[q + 1];
      q += 2;
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\n': break;
        case '0': case '1': case '2': case '3': case '4': case '5': case '6': case '7': {
          int v = e - '0';
          for (int k = 0; k < 2 && q < src_.size() && src_[q] >= '0' && src_[q] <= '7'; ++k) {
            v = v * 8 + (src_[q++] - '0');
          }
          out += EncodeUtf8(std::u32string(1, static_cast<char32_t>(v)));
          break;
        }
        case 'x': case 'u': case 'U': {
          const int n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
          if (q + static_cast<size_t>(n) > src_.size()) return SyntaxError(Line(p), "truncated escape in string");
          const std::string hex = src_.substr(q, static_cast<size_t>(n));
          char* endp = nullptr;
          const unsigned long v = std::strtoul(hex.c_str(), &endp, 16);
          if (endp != hex.c_str() + n || v > 0x10FFFF) return SyntaxError(Line(p), "bad escape in string");
          out += EncodeUtf8(std::u32string(1, static_cast<char32_t>(v)));
          q += static_cast<size_t>(n);
          break;
        }
        default:
          out += '\\';
          out += e;
      }
    }
    Emit(Tok::kString, std::move(out), p);
    return q + 1;
  }

  std::string src_;
  Options opt_;
  std::vector<Token> tokens_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Syntax tree

namespace {

NodePtr Make(Node::Kind kind, int line) {
  auto n = std::make_shared<Node>();
  n->kind = kind;
  n->line = line;
  return n;
}

class Parser {
 public:
  explicit Parser(std::vector<Token> tokens) : t_(std::move(tokens)) {}

  absl::StatusOr<NodePtr> ParseTemplate() {
    absl::StatusOr<NodePtr> body = Body({});
    if (!body.ok()) return body.status();
    if (Cur().type != Tok::kEof) {
      return SyntaxError(Cur().line, absl::StrCat("unexpected '", Peek(1).text, "'"));
    }
    return body;
  }

 private:
  const Token& Cur() const { return t_[i_]; }
  const Token& Peek(size_t k) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool IsOp(std::string_view op) const { return Cur().type == Tok::kOp && Cur().text == op; }
  bool IsName(std::string_view n) const { return Cur().type == Tok::kName && Cur().text == n; }
  absl::Status Expect(Tok type, const std::string& text = "") {
    if (Cur().type != type || (!text.empty() && Cur().text != text)) {
      const std::string got = Cur().type == Tok::kEof ? "end of template"
                              : Cur().type == Tok::kBlockEnd ? "end of statement"
                              : Cur().type == Tok::kVarEnd ? "end of print statement"
                                                           : absl::StrCat("'", Cur().text, "'");
      return SyntaxError(Cur().line, absl::StrCat("expected ", text.empty() ? "a name" : absl::StrCat("'", text, "'"),
                                                  ", got ", got));
    }
    ++i_;
    return absl::OkStatus();
  }

  // Statements until one of `ends` (a block tag name) is the next tag; leaves the stream at
  // that tag's name.
  absl::StatusOr<NodePtr> Body(const std::vector<std::string>& ends) {
    NodePtr body = Make(Node::Kind::kBody, Cur().line);
    while (true) {
      const Token& tok = Cur();
      if (tok.type == Tok::kEof) {
        if (!ends.empty()) {
          return SyntaxError(tok.line, absl::StrCat("unexpected end of template, expected '",
                                                    absl::StrJoin(ends, "' or '"), "'"));
        }
        return body;
      }
      if (tok.type == Tok::kText) {
        NodePtr n = Make(Node::Kind::kText, tok.line);
        n->value = Value::String(tok.text);
        body->kids.push_back(n);
        ++i_;
        continue;
      }
      if (tok.type == Tok::kVarBegin) {
        ++i_;
        absl::StatusOr<NodePtr> e = TupleExpr(true);
        if (!e.ok()) return e.status();
        if (absl::Status s = Expect(Tok::kVarEnd, "}}"); !s.ok()) return s;
        NodePtr n = Make(Node::Kind::kOutput, tok.line);
        n->kids.push_back(*e);
        body->kids.push_back(n);
        continue;
      }
      if (tok.type != Tok::kBlockBegin) return SyntaxError(tok.line, "unexpected token");
      const Token& name = Peek(1);
      if (name.type != Tok::kName) return SyntaxError(name.line, "expected a statement name");
      if (std::find(ends.begin(), ends.end(), name.text) != ends.end()) {
        ++i_;  // At the name.
        return body;
      }
      ++i_;
      absl::StatusOr<NodePtr> st = Statement();
      if (!st.ok()) return st.status();
      if (*st) body->kids.push_back(*st);
    }
  }

  absl::Status EndTag() { return Expect(Tok::kBlockEnd, "%}"); }

  absl::StatusOr<NodePtr> Statement() {
    const Token name = Cur();
    const int line = name.line;
    ++i_;
    if (name.text == "if") return If(line);
    if (name.text == "for") return For(line);
    if (name.text == "set") return Set(line);
    if (name.text == "macro") return Macro(line);
    if (name.text == "break" || name.text == "continue") {
      if (loop_depth_ == 0) return SyntaxError(line, absl::StrCat("'", name.text, "' outside of a loop"));
      if (absl::Status s = EndTag(); !s.ok()) return s;
      return Make(name.text == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, line);
    }
    if (name.text == "generation") {  // transformers' assistant-mask block: renders its body.
      if (absl::Status s = EndTag(); !s.ok()) return s;
      absl::StatusOr<NodePtr> body = Body({"endgeneration"});
      if (!body.ok()) return body;
      ++i_;
      if (absl::Status s = EndTag(); !s.ok()) return s;
      return body;
    }
    static const char* kKnown[] = {"extends", "include", "import", "from", "block", "call",
                                   "filter", "with", "autoescape", "do", "trans", "print"};
    for (const char* k : kKnown) {
      if (name.text == k) return Unsupported(line, absl::StrCat("the '", k, "' statement"));
    }
    return SyntaxError(line, absl::StrCat("unknown tag '", name.text, "'"));
  }

  absl::StatusOr<NodePtr> If(int line) {
    NodePtr n = Make(Node::Kind::kIf, line);
    while (true) {
      absl::StatusOr<NodePtr> cond = TupleExpr(false);
      if (!cond.ok()) return cond;
      if (absl::Status s = EndTag(); !s.ok()) return s;
      absl::StatusOr<NodePtr> body = Body({"elif", "else", "endif"});
      if (!body.ok()) return body;
      n->kids.push_back(*cond);
      n->kids.push_back(*body);
      const std::string tag = Cur().text;
      ++i_;
      if (tag == "elif") continue;
      if (tag == "else") {
        if (absl::Status s = EndTag(); !s.ok()) return s;
        absl::StatusOr<NodePtr> other = Body({"endif"});
        if (!other.ok()) return other;
        ++i_;
        n->kids.push_back(nullptr);
        n->kids.push_back(*other);
      }
      if (absl::Status s = EndTag(); !s.ok()) return s;
      return n;
    }
  }

  // A name, or a tuple of names (for targets and set).
  absl::StatusOr<NodePtr> AssignTarget(bool allow_attr) {
    NodePtr tuple = Make(Node::Kind::kTuple, Cur().line);
    bool paren = false;
    if (IsOp("(")) {
      paren = true;
      ++i_;
    }
    while (true) {
      if (Cur().type != Tok::kName) return SyntaxError(Cur().line, "expected a name to assign to");
      NodePtr target = Make(Node::Kind::kName, Cur().line);
      target->name = Cur().text;
      ++i_;
      if (allow_attr && IsOp(".")) {
        ++i_;
        if (Cur().type != Tok::kName) return SyntaxError(Cur().line, "expected an attribute name");
        NodePtr attr = Make(Node::Kind::kGetAttr, Cur().line);
        attr->kids.push_back(target);
        attr->name = Cur().text;
        ++i_;
        return attr;
      }
      tuple->kids.push_back(target);
      if (!IsOp(",")) break;
      ++i_;
    }
    if (paren) {
      if (absl::Status s = Expect(Tok::kOp, ")"); !s.ok()) return s;
    }
    if (tuple->kids.size() == 1 && !paren) return tuple->kids[0];
    return tuple;
  }

  absl::StatusOr<NodePtr> For(int line) {
    NodePtr n = Make(Node::Kind::kFor, line);
    absl::StatusOr<NodePtr> target = AssignTarget(false);
    if (!target.ok()) return target;
    if (absl::Status s = Expect(Tok::kName, "in"); !s.ok()) return s;
    absl::StatusOr<NodePtr> iter = TupleExpr(false, /*with_cond=*/false);
    if (!iter.ok()) return iter;
    NodePtr filter;
    if (IsName("if")) {
      ++i_;
      absl::StatusOr<NodePtr> f = Expression(true);
      if (!f.ok()) return f;
      filter = *f;
    }
    if (IsName("recursive")) return Unsupported(line, "recursive loops");
    if (absl::Status s = EndTag(); !s.ok()) return s;
    ++loop_depth_;
    absl::StatusOr<NodePtr> body = Body({"else", "endfor"});
    --loop_depth_;
    if (!body.ok()) return body;
    NodePtr other;
    if (Cur().text == "else") {
      ++i_;
      if (absl::Status s = EndTag(); !s.ok()) return s;
      absl::StatusOr<NodePtr> e = Body({"endfor"});
      if (!e.ok()) return e;
      other = *e;
    }
    ++i_;
    if (absl::Status s = EndTag(); !s.ok()) return s;
    n->kids = {*target, *iter, filter, *body, other};
    return n;
  }

  absl::StatusOr<NodePtr> Set(int line) {
    absl::StatusOr<NodePtr> target = AssignTarget(true);
    if (!target.ok()) return target;
    if (IsOp("=")) {
      ++i_;
      absl::StatusOr<NodePtr> value = TupleExpr(true);
      if (!value.ok()) return value;
      if (absl::Status s = EndTag(); !s.ok()) return s;
      NodePtr n = Make(Node::Kind::kSet, line);
      n->kids = {*target, *value};
      return n;
    }
    if (IsOp("|")) return Unsupported(line, "filtered set blocks");
    if ((*target)->kind != Node::Kind::kName) return SyntaxError(line, "a set block assigns one name");
    if (absl::Status s = EndTag(); !s.ok()) return s;
    absl::StatusOr<NodePtr> body = Body({"endset"});
    if (!body.ok()) return body;
    ++i_;
    if (absl::Status s = EndTag(); !s.ok()) return s;
    NodePtr n = Make(Node::Kind::kSetBlock, line);
    n->kids = {*target, *body};
    return n;
  }

  absl::StatusOr<NodePtr> Macro(int line) {
    NodePtr n = Make(Node::Kind::kMacro, line);
    if (Cur().type != Tok::kName) return SyntaxError(line, "expected a macro name");
    n->name = Cur().text;
    ++i_;
    if (absl::Status s = Expect(Tok::kOp, "("); !s.ok()) return s;
    std::vector<NodePtr> defaults;
    while (!IsOp(")")) {
      if (Cur().type != Tok::kName) return SyntaxError(Cur().line, "expected a parameter name");
      n->names.push_back(Cur().text);
      ++i_;
      NodePtr def;
      if (IsOp("=")) {
        ++i_;
        absl::StatusOr<NodePtr> d = Expression(true);
        if (!d.ok()) return d;
        def = *d;
      }
      defaults.push_back(def);
      if (!IsOp(",")) break;
      ++i_;
    }
    if (absl::Status s = Expect(Tok::kOp, ")"); !s.ok()) return s;
    if (absl::Status s = EndTag(); !s.ok()) return s;
    const int saved = loop_depth_;
    loop_depth_ = 0;
    absl::StatusOr<NodePtr> body = Body({"endmacro"});
    loop_depth_ = saved;
    if (!body.ok()) return body;
    ++i_;
    if (Cur().type == Tok::kName) ++i_;  // {% endmacro name %}
    if (absl::Status s = EndTag(); !s.ok()) return s;
    n->kids.push_back(*body);
    for (NodePtr& d : defaults) n->kids.push_back(d);
    return n;
  }

  // Expressions, following jinja2/parser.py's precedence.

  absl::StatusOr<NodePtr> TupleExpr(bool allow_empty_end, bool with_cond = true) {
    (void)allow_empty_end;
    const int line = Cur().line;
    absl::StatusOr<NodePtr> first = Expression(with_cond);
    if (!first.ok()) return first;
    if (!IsOp(",")) return first;
    NodePtr tuple = Make(Node::Kind::kTuple, line);
    tuple->kids.push_back(*first);
    while (IsOp(",")) {
      ++i_;
      if (Cur().type == Tok::kBlockEnd || Cur().type == Tok::kVarEnd || IsOp(")")) break;
      absl::StatusOr<NodePtr> e = Expression(with_cond);
      if (!e.ok()) return e;
      tuple->kids.push_back(*e);
    }
    return tuple;
  }

  absl::StatusOr<NodePtr> Expression(bool with_cond) {
    if (++depth_ > 200) return SyntaxError(Cur().line, "expression nested too deeply");
    absl::StatusOr<NodePtr> r = with_cond ? CondExpr() : Or();
    --depth_;
    return r;
  }

  absl::StatusOr<NodePtr> CondExpr() {
    absl::StatusOr<NodePtr> expr = Or();
    if (!expr.ok()) return expr;
    NodePtr e = *expr;
    while (IsName("if")) {
      const int line = Cur().line;
      ++i_;
      absl::StatusOr<NodePtr> cond = Or();
      if (!cond.ok()) return cond;
      NodePtr other;
      if (IsName("else")) {
        ++i_;
        absl::StatusOr<NodePtr> o = CondExpr();
        if (!o.ok()) return o;
        other = *o;
      }
      NodePtr n = Make(Node::Kind::kCond, line);
      n->kids = {e, *cond, other};
      e = n;
    }
    return e;
  }

  // `left (word right)*`, left-associative: `or` over `and`, `and` over `not`.
  absl::StatusOr<NodePtr> Logical(const char* word, Node::Kind kind, absl::StatusOr<NodePtr> (Parser::*next)()) {
    absl::StatusOr<NodePtr> left = (this->*next)();
    if (!left.ok()) return left;
    NodePtr l = *left;
    while (IsName(word)) {
      const int line = Cur().line;
      ++i_;
      absl::StatusOr<NodePtr> right = (this->*next)();
      if (!right.ok()) return right;
      NodePtr n = Make(kind, line);
      n->kids = {l, *right};
      l = n;
    }
    return l;
  }
  absl::StatusOr<NodePtr> Or() { return Logical("or", Node::Kind::kOr, &Parser::And); }
  absl::StatusOr<NodePtr> And() { return Logical("and", Node::Kind::kAnd, &Parser::Not); }

  absl::StatusOr<NodePtr> Not() {
    if (IsName("not")) {
      const int line = Cur().line;
      ++i_;
      if (++depth_ > 200) return SyntaxError(line, "expression nested too deeply");
      absl::StatusOr<NodePtr> e = Not();
      --depth_;
      if (!e.ok()) return e;
      NodePtr n = Make(Node::Kind::kUnary, line);
      n->name = "not";
      n->kids = {*e};
      return n;
    }
    return Compare();
  }

  absl::StatusOr<NodePtr> Compare() {
    const int line = Cur().line;
    absl::StatusOr<NodePtr> first = Math1();
    if (!first.ok()) return first;
    NodePtr n;
    while (true) {
      std::string op;
      if (Cur().type == Tok::kOp && (Cur().text == "==" || Cur().text == "!=" || Cur().text == "<" ||
                                     Cur().text == "<=" || Cur().text == ">" || Cur().text == ">=")) {
        op = Cur().text;
        ++i_;
      } else if (IsName("in")) {
        op = "in";
        ++i_;
      } else if (IsName("not") && Peek(1).type == Tok::kName && Peek(1).text == "in") {
        op = "notin";
        i_ += 2;
      } else {
        break;
      }
      absl::StatusOr<NodePtr> operand = Math1();
      if (!operand.ok()) return operand;
      if (!n) {
        n = Make(Node::Kind::kCompare, line);
        n->kids.push_back(*first);
      }
      n->names.push_back(op);
      n->kids.push_back(*operand);
    }
    return n ? n : *first;
  }

  absl::StatusOr<NodePtr> BinaryLevel(const std::vector<std::string>& ops,
                                      absl::StatusOr<NodePtr> (Parser::*next)()) {
    absl::StatusOr<NodePtr> left = (this->*next)();
    if (!left.ok()) return left;
    NodePtr l = *left;
    while (Cur().type == Tok::kOp && std::find(ops.begin(), ops.end(), Cur().text) != ops.end()) {
      NodePtr n = Make(Node::Kind::kBinary, Cur().line);
      n->name = Cur().text;
      ++i_;
      absl::StatusOr<NodePtr> right = (this->*next)();
      if (!right.ok()) return right;
      n->kids = {l, *right};
      l = n;
    }
    return l;
  }
  absl::StatusOr<NodePtr> Math1() { return BinaryLevel({"+", "-"}, &Parser::Concat); }
  absl::StatusOr<NodePtr> Concat() { return BinaryLevel({"~"}, &Parser::Math2); }
  absl::StatusOr<NodePtr> Math2() { return BinaryLevel({"*", "/", "//", "%"}, &Parser::Pow); }
  absl::StatusOr<NodePtr> Pow() { return BinaryLevel({"**"}, &Parser::UnaryWithFilter); }
  absl::StatusOr<NodePtr> UnaryWithFilter() { return Unary(true); }

  absl::StatusOr<NodePtr> Unary(bool with_filter) {
    NodePtr node;
    if (IsOp("-") || IsOp("+")) {
      const int line = Cur().line;
      const std::string op = Cur().text;
      ++i_;
      if (++depth_ > 200) return SyntaxError(line, "expression nested too deeply");
      absl::StatusOr<NodePtr> e = Unary(false);
      --depth_;
      if (!e.ok()) return e;
      node = Make(Node::Kind::kUnary, line);
      node->name = op;
      node->kids = {*e};
    } else {
      absl::StatusOr<NodePtr> p = Primary();
      if (!p.ok()) return p;
      node = *p;
    }
    absl::StatusOr<NodePtr> post = Postfix(node);
    if (!post.ok()) return post;
    node = *post;
    if (with_filter) return FilterExpr(node);
    return node;
  }

  absl::StatusOr<NodePtr> Primary() {
    const Token tok = Cur();
    switch (tok.type) {
      case Tok::kName: {
        ++i_;
        NodePtr n = Make(Node::Kind::kLiteral, tok.line);
        if (tok.text == "true" || tok.text == "True") {
          n->value = Value::Bool(true);
        } else if (tok.text == "false" || tok.text == "False") {
          n->value = Value::Bool(false);
        } else if (tok.text == "none" || tok.text == "None") {
          n->value = Value::None();
        } else {
          n->kind = Node::Kind::kName;
          n->name = tok.text;
        }
        return n;
      }
      case Tok::kString: {
        std::string s;
        while (Cur().type == Tok::kString) {
          s += Cur().text;
          ++i_;
        }
        NodePtr n = Make(Node::Kind::kLiteral, tok.line);
        n->value = Value::String(std::move(s));
        return n;
      }
      case Tok::kInt: {
        ++i_;
        errno = 0;
        char* end = nullptr;
        const long long v = std::strtoll(tok.text.c_str(), &end, 10);
        if (errno == ERANGE) return Unsupported(tok.line, "an integer literal beyond 64 bits");
        NodePtr n = Make(Node::Kind::kLiteral, tok.line);
        n->value = Value::Int(v);
        return n;
      }
      case Tok::kFloat: {
        ++i_;
        NodePtr n = Make(Node::Kind::kLiteral, tok.line);
        n->value = Value::Float(std::strtod(tok.text.c_str(), nullptr));
        return n;
      }
      case Tok::kOp: {
        if (tok.text == "(") {
          ++i_;
          if (IsOp(")")) {
            ++i_;
            return Make(Node::Kind::kTuple, tok.line);
          }
          absl::StatusOr<NodePtr> e = TupleExpr(true);
          if (!e.ok()) return e;
          if (absl::Status s = Expect(Tok::kOp, ")"); !s.ok()) return s;
          return e;
        }
        if (tok.text == "[") {
          ++i_;
          NodePtr n = Make(Node::Kind::kList, tok.line);
          while (!IsOp("]")) {
            absl::StatusOr<NodePtr> e = Expression(true);
            if (!e.ok()) return e;
            n->kids.push_back(*e);
            if (!IsOp(",")) break;
            ++i_;
          }
          if (absl::Status s = Expect(Tok::kOp, "]"); !s.ok()) return s;
          return n;
        }
        if (tok.text == "{") {
          ++i_;
          NodePtr n = Make(Node::Kind::kDict, tok.line);
          while (!IsOp("}")) {
            absl::StatusOr<NodePtr> k = Expression(true);
            if (!k.ok()) return k;
            if (absl::Status s = Expect(Tok::kOp, ":"); !s.ok()) return s;
            absl::StatusOr<NodePtr> v = Expression(true);
            if (!v.ok()) return v;
            n->kids.push_back(*k);
            n->kids.push_back(*v);
            if (!IsOp(",")) break;
            ++i_;
          }
          if (absl::Status s = Expect(Tok::kOp, "}"); !s.ok()) return s;
          return n;
        }
        break;
      }
      default: break;
    }
    const std::string got = tok.type == Tok::kEof ? "end of template"
                            : tok.type == Tok::kBlockEnd || tok.type == Tok::kVarEnd
                                ? "end of tag"
                                : absl::StrCat("'", tok.text, "'");
    return SyntaxError(tok.line, absl::StrCat("unexpected ", got));
  }

  // Call arguments after '(' up to and including ')'.
  absl::Status CallArgs(NodePtr& n) {
    bool keyword = false;
    while (!IsOp(")")) {
      if (IsOp("*") || IsOp("**")) return Unsupported(Cur().line, "*args/**kwargs in calls");
      if (Cur().type == Tok::kName && Peek(1).type == Tok::kOp && Peek(1).text == "=") {
        n->names.push_back(Cur().text);
        i_ += 2;
        keyword = true;
      } else if (keyword) {
        return SyntaxError(Cur().line, "positional argument after keyword argument");
      } else {
        ++n->positional;
      }
      absl::StatusOr<NodePtr> e = Expression(true);
      if (!e.ok()) return e.status();
      n->kids.push_back(*e);
      if (!IsOp(",")) break;
      ++i_;
    }
    return Expect(Tok::kOp, ")");
  }

  absl::StatusOr<NodePtr> Postfix(NodePtr node) {
    while (true) {
      if (IsOp(".")) {
        ++i_;
        NodePtr n = Make(Node::Kind::kGetAttr, Cur().line);
        if (Cur().type == Tok::kName) {
          n->name = Cur().text;
        } else if (Cur().type == Tok::kInt) {
          n->kind = Node::Kind::kGetItem;
          NodePtr idx = Make(Node::Kind::kLiteral, Cur().line);
          idx->value = Value::Int(std::strtoll(Cur().text.c_str(), nullptr, 10));
          n->kids.push_back(node);
          n->kids.push_back(idx);
          ++i_;
          node = n;
          continue;
        } else {
          return SyntaxError(Cur().line, "expected an attribute name after '.'");
        }
        ++i_;
        n->kids.push_back(node);
        node = n;
      } else if (IsOp("[")) {
        const int line = Cur().line;
        ++i_;
        NodePtr parts[3];
        int colons = 0;
        while (true) {
          if (IsOp(":")) {
            if (++colons > 2) return SyntaxError(line, "too many ':' in a subscript");
            ++i_;
            continue;
          }
          if (IsOp("]")) break;
          if (parts[colons]) return SyntaxError(line, "expected ':' or ']' in a subscript");
          absl::StatusOr<NodePtr> e = Expression(true);
          if (!e.ok()) return e;
          parts[colons] = *e;
        }
        ++i_;
        if (colons == 0) {
          if (!parts[0]) return SyntaxError(line, "empty subscript");
          NodePtr n = Make(Node::Kind::kGetItem, line);
          n->kids = {node, parts[0]};
          node = n;
        } else {
          NodePtr n = Make(Node::Kind::kSlice, line);
          n->kids = {node, parts[0], parts[1], parts[2]};
          node = n;
        }
      } else if (IsOp("(")) {
        NodePtr n = Make(Node::Kind::kCall, Cur().line);
        ++i_;
        n->kids.push_back(node);
        if (absl::Status s = CallArgs(n); !s.ok()) return s;
        node = n;
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<NodePtr> FilterExpr(NodePtr node) {
    while (true) {
      if (IsOp("|")) {
        ++i_;
        if (Cur().type != Tok::kName) return SyntaxError(Cur().line, "expected a filter name");
        NodePtr n = Make(Node::Kind::kFilter, Cur().line);
        n->name = Cur().text;
        ++i_;
        n->kids.push_back(node);
        if (IsOp("(")) {
          ++i_;
          if (absl::Status s = CallArgs(n); !s.ok()) return s;
        }
        node = n;
      } else if (IsName("is")) {
        ++i_;
        NodePtr n = Make(Node::Kind::kTest, Cur().line);
        if (IsName("not")) {
          n->negated = true;
          ++i_;
        }
        if (Cur().type != Tok::kName) return SyntaxError(Cur().line, "expected a test name");
        n->name = Cur().text;
        ++i_;
        n->kids.push_back(node);
        if (IsOp("(")) {
          ++i_;
          if (absl::Status s = CallArgs(n); !s.ok()) return s;
        } else if ((Cur().type == Tok::kName || Cur().type == Tok::kString || Cur().type == Tok::kInt ||
                    Cur().type == Tok::kFloat || IsOp("(") || IsOp("[") || IsOp("{")) &&
                   !IsName("else") && !IsName("or") && !IsName("and")) {
          if (IsName("is")) return SyntaxError(Cur().line, "you cannot chain multiple tests with is");
          absl::StatusOr<NodePtr> arg = Primary();
          if (!arg.ok()) return arg;
          absl::StatusOr<NodePtr> post = Postfix(*arg);
          if (!post.ok()) return post;
          n->kids.push_back(*post);
          n->positional = 1;
        }
        node = n;
      } else if (IsOp("(")) {
        NodePtr n = Make(Node::Kind::kCall, Cur().line);
        ++i_;
        n->kids.push_back(node);
        if (absl::Status s = CallArgs(n); !s.ok()) return s;
        node = n;
      } else {
        return node;
      }
    }
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  int loop_depth_ = 0;
  int depth_ = 0;
};

}  // namespace

absl::StatusOr<Template> Template::Parse(std::string_view source, const Options& options) {
  absl::StatusOr<std::vector<Token>> tokens = Lexer(std::string(source), options).Run();
  if (!tokens.ok()) return tokens.status();
  absl::StatusOr<NodePtr> root = Parser(*std::move(tokens)).ParseTemplate();
  if (!root.ok()) return root.status();
  Template t;
  t.root_ = *std::move(root);
  return t;
}

absl::StatusOr<std::string> Template::Render(const Value& variables, size_t max_output_bytes) const {
  return RenderTree(*root_, variables, max_output_bytes);
}

}  // namespace adapterd::jinja
