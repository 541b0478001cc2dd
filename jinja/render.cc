// Tree-walking evaluation with Python's semantics, as jinja2's compiled code behaves under
// ImmutableSandboxedEnvironment with the default Undefined.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "jinja/ast.h"
#include "jinja/text.h"
#include "utf8proc.h"

namespace adapterd::jinja {
namespace {

using K = Value::Kind;

constexpr int64_t kMaxSteps = 1'000'000;  // Evaluation budget of one render.
constexpr int kMaxCallDepth = 64;
constexpr int64_t kMaxRange = 1'000'000;

std::string TypeName(const Value& v) {
  switch (v.kind()) {
    case K::kUndefined: return "Undefined";
    case K::kNone: return "NoneType";
    case K::kBool: return "bool";
    case K::kInt: return "int";
    case K::kFloat: return "float";
    case K::kString: return "str";
    case K::kList: return "list";
    case K::kDict: return v.is_namespace() ? "Namespace" : "dict";
    case K::kFunction: return "function";
  }
  return "object";
}

absl::Status Error(int line, const std::string& message) {
  return absl::InvalidArgumentError(absl::StrCat("template error at line ", line, ": ", message));
}
absl::Status Unimplemented(int line, const std::string& what) {
  return absl::UnimplementedError(absl::StrCat(
      "template uses ", what, " (line ", line, "), which adapterd's Jinja engine does not implement"));
}
absl::Status UndefinedError(int line, const Value& v) {
  return Error(line, v.undefined_name().empty() ? "a value is undefined"
                                                : absl::StrCat("'", v.undefined_name(), "' is undefined"));
}

#define JINJA_ASSIGN(lhs, expr)        \
  auto lhs##_or = (expr);              \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = *std::move(lhs##_or)
#define JINJA_RETURN_IF_ERROR(expr)              \
  do {                                           \
    if (absl::Status _s = (expr); !_s.ok()) return _s; \
  } while (0)

// Python's sequence indexing over code points.
std::u32string Cps(const Value& v) { return DecodeUtf8(v.str()); }
Value Char(char32_t c) { return Value::String(EncodeUtf8(std::u32string(1, c))); }

// Slice index resolution (Python's slice.indices).
void SliceIndices(int64_t len, std::optional<int64_t> start, std::optional<int64_t> stop, int64_t step,
                  int64_t* out_start, int64_t* out_stop) {
  const int64_t lower = step > 0 ? 0 : -1;
  const int64_t upper = step > 0 ? len : len - 1;
  auto fix = [&](std::optional<int64_t> v, int64_t dflt) {
    if (!v) return dflt;
    int64_t x = *v;
    if (x < 0) {
      x += len;
      if (x < lower) x = lower;
    } else if (x > upper) {
      x = upper;
    }
    return x;
  };
  *out_start = fix(start, step < 0 ? upper : lower);
  *out_stop = fix(stop, step < 0 ? lower : upper);
}

struct Scope {
  std::unordered_map<std::string, Value> vars;
  const Scope* parent = nullptr;
};

enum class Flow { kNormal, kBreak, kContinue };

struct Args {
  const ValueList& pos;
  const ValueDict& kw;
  // The argument at `index` or named `name`, else `dflt`.
  Value Get(size_t index, std::string_view name, Value dflt = Value()) const {
    if (index < pos.size()) return pos[index];
    for (const auto& [k, v] : kw) {
      if (k == name) return v;
    }
    return dflt;
  }
};

class Renderer {
 public:
  Renderer(const Value& globals, size_t max_output) : globals_(globals), max_output_(max_output) {}

  absl::StatusOr<std::string> Run(const Node& root) {
    Scope scope;
    root_scope_ = &scope;
    std::string out;
    Flow flow = Flow::kNormal;
    JINJA_RETURN_IF_ERROR(Exec(root, scope, out, flow));
    return out;
  }

 private:
  absl::Status Step(int line) {
    if (++steps_ > kMaxSteps) return Error(line, "the template exceeded its evaluation budget");
    return absl::OkStatus();
  }

  absl::Status Append(std::string& out, std::string_view s, int line) {
    if (out.size() + s.size() > max_output_) {
      return absl::ResourceExhaustedError(absl::StrCat("template output exceeds ", max_output_,
                                                       " bytes (line ", line, ")"));
    }
    out.append(s);
    return absl::OkStatus();
  }

  Value Lookup(const std::string& name, const Scope& scope) {
    for (const Scope* s = &scope; s != nullptr; s = s->parent) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return it->second;
    }
    if (const Value* v = globals_.Find(name)) return *v;
    if (name == "range" || name == "dict" || name == "namespace") return Builtin(name);
    return Value::Undefined(name);
  }

  Value Builtin(const std::string& name) {
    if (name == "namespace") {
      return Value::Callable([](const ValueList& args, const ValueDict& kwargs) -> absl::StatusOr<Value> {
        Value ns = Value::Namespace();
        for (const Value& a : args) {
          if (!a.is_dict()) return absl::InvalidArgumentError("namespace() takes a dict or keyword arguments");
          for (const auto& [k, v] : a.dict()) ns.Set(k, v);
        }
        for (const auto& [k, v] : kwargs) ns.Set(k, v);
        return ns;
      });
    }
    if (name == "dict") {
      return Value::Callable([](const ValueList& args, const ValueDict& kwargs) -> absl::StatusOr<Value> {
        Value d = Value::Dict();
        for (const Value& a : args) {
          if (!a.is_dict()) return absl::InvalidArgumentError("dict() takes a dict or keyword arguments");
          for (const auto& [k, v] : a.dict()) d.Set(k, v);
        }
        for (const auto& [k, v] : kwargs) d.Set(k, v);
        return d;
      });
    }
    return Value::Callable([](const ValueList& args, const ValueDict& kwargs) -> absl::StatusOr<Value> {
      if (!kwargs.empty() || args.empty() || args.size() > 3) {
        return absl::InvalidArgumentError("range() takes 1 to 3 integer arguments");
      }
      for (const Value& a : args) {
        if (a.kind() != K::kInt && a.kind() != K::kBool) {
          return absl::InvalidArgumentError(absl::StrCat("range() needs integers, got ", TypeName(a)));
        }
      }
      int64_t start = 0, stop = 0, step = 1;
      if (args.size() == 1) {
        stop = args[0].integer();
      } else {
        start = args[0].integer();
        stop = args[1].integer();
        if (args.size() == 3) step = args[2].integer();
      }
      if (step == 0) return absl::InvalidArgumentError("range() arg 3 must not be zero");
      ValueList items;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (static_cast<int64_t>(items.size()) >= kMaxRange) {
          return absl::ResourceExhaustedError(absl::StrCat("range() longer than ", kMaxRange));
        }
        items.push_back(Value::Int(i));
      }
      return Value::List(std::move(items));
    });
  }

  // Iterating a value: lists, dict keys, string characters; Undefined is empty.
  absl::StatusOr<ValueList> Items(const Value& v, int line) {
    switch (v.kind()) {
      case K::kUndefined: return ValueList{};
      case K::kList: return v.list();
      case K::kDict: {
        ValueList keys;
        for (const auto& [k, unused] : v.dict()) keys.push_back(Value::String(k));
        return keys;
      }
      case K::kString: {
        ValueList chars;
        for (char32_t c : Cps(v)) chars.push_back(Char(c));
        return chars;
      }
      default: return Error(line, absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
  }

  absl::StatusOr<Value> GetAttr(const Value& obj, const std::string& name, int line) {
    if (obj.is_undefined()) return UndefinedError(line, obj);
    if (const Value* v = obj.Find(name)) return *v;
    return Value::Undefined(absl::StrCat(TypeName(obj), " object has no attribute '", name, "'"));
  }

  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key, int line) {
    if (obj.is_undefined()) return UndefinedError(line, obj);
    const bool int_key = key.kind() == K::kInt || key.kind() == K::kBool;
    if (obj.is_list() && int_key) {
      int64_t i = key.integer();
      const int64_t n = static_cast<int64_t>(obj.list().size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return obj.list()[static_cast<size_t>(i)];
    } else if (obj.is_string() && int_key) {
      const std::u32string cps = Cps(obj);
      int64_t i = key.integer();
      const int64_t n = static_cast<int64_t>(cps.size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return Char(cps[static_cast<size_t>(i)]);
    } else if (obj.is_dict() && key.is_string()) {
      if (const Value* v = obj.Find(key.str())) return *v;
    }
    return Value::Undefined(absl::StrCat(TypeName(obj), " object has no element ", key.Repr()));
  }

  absl::StatusOr<std::optional<int64_t>> SliceBound(const Node* n, Scope& scope) {
    if (n == nullptr) return std::optional<int64_t>();
    JINJA_ASSIGN(v, Eval(*n, scope));
    if (v.is_none()) return std::optional<int64_t>();
    if (v.kind() != K::kInt && v.kind() != K::kBool) {
      return Error(n->line, "slice indices must be integers or None");
    }
    return std::optional<int64_t>(v.integer());
  }

  absl::StatusOr<Value> Slice(const Node& n, Scope& scope) {
    JINJA_ASSIGN(obj, Eval(*n.kids[0], scope));
    JINJA_ASSIGN(start, SliceBound(n.kids[1].get(), scope));
    JINJA_ASSIGN(stop, SliceBound(n.kids[2].get(), scope));
    JINJA_ASSIGN(step_opt, SliceBound(n.kids[3].get(), scope));
    const int64_t step = step_opt.value_or(1);
    if (step == 0) return Error(n.line, "slice step cannot be zero");
    if (obj.is_undefined()) return UndefinedError(n.line, obj);
    if (obj.is_list()) {
      int64_t b, e;
      SliceIndices(static_cast<int64_t>(obj.list().size()), start, stop, step, &b, &e);
      ValueList out;
      for (int64_t i = b; step > 0 ? i < e : i > e; i += step) out.push_back(obj.list()[static_cast<size_t>(i)]);
      return Value::List(std::move(out));
    }
    if (obj.is_string()) {
      const std::u32string cps = Cps(obj);
      int64_t b, e;
      SliceIndices(static_cast<int64_t>(cps.size()), start, stop, step, &b, &e);
      std::u32string out;
      for (int64_t i = b; step > 0 ? i < e : i > e; i += step) out += cps[static_cast<size_t>(i)];
      return Value::String(EncodeUtf8(out));
    }
    return Value::Undefined(absl::StrCat(TypeName(obj), " object cannot be sliced"));
  }

  absl::Status EvalArgs(const Node& n, Scope& scope, ValueList& pos, ValueDict& kw) {
    const size_t first_kw = 1 + n.positional;
    for (size_t i = 1; i < n.kids.size(); ++i) {
      JINJA_ASSIGN(v, Eval(*n.kids[i], scope));
      if (i < first_kw) {
        pos.push_back(std::move(v));
      } else {
        kw.emplace_back(n.names[i - first_kw], std::move(v));
      }
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Call(const Value& fn, const ValueList& pos, const ValueDict& kw, int line) {
    if (fn.is_undefined()) return UndefinedError(line, fn);
    if (fn.kind() != K::kFunction) return Error(line, absl::StrCat("'", TypeName(fn), "' object is not callable"));
    if (++call_depth_ > kMaxCallDepth) return Error(line, "calls nested too deeply");
    absl::StatusOr<Value> r = fn.function()(pos, kw);
    --call_depth_;
    if (!r.ok() && r.status().message().find("line ") == absl::string_view::npos &&
        r.status().code() == absl::StatusCode::kInvalidArgument) {
      return Error(line, std::string(r.status().message()));
    }
    return r;
  }

  // str, dict and list methods; nullopt when `name` is no method of `obj`.
  std::optional<absl::StatusOr<Value>> Method(const Value& obj, const std::string& name, const ValueList& pos,
                                              const ValueDict& kw, int line) {
    static const char* kMutators[] = {"append", "extend", "insert", "pop", "remove", "clear",
                                      "update", "setdefault", "popitem", "sort", "reverse"};
    if (obj.is_list() || (obj.is_dict() && !obj.Find(name))) {
      for (const char* m : kMutators) {
        if (name == m) {
          return absl::StatusOr<Value>(Error(line, absl::StrCat(
              "unsafe method '", name, "' of ", TypeName(obj),
              ": templates may not modify values (transformers renders in an immutable sandbox)")));
        }
      }
    }
    Args a{pos, kw};
    if (obj.is_dict() && !obj.is_namespace()) {
      if (name == "items") {
        ValueList out;
        for (const auto& [k, v] : obj.dict()) out.push_back(Value::Tuple({Value::String(k), v}));
        return absl::StatusOr<Value>(Value::List(std::move(out)));
      }
      if (name == "keys" || name == "values") {
        ValueList out;
        for (const auto& [k, v] : obj.dict()) out.push_back(name == "keys" ? Value::String(k) : v);
        return absl::StatusOr<Value>(Value::List(std::move(out)));
      }
      if (name == "get") {
        const Value key = a.Get(0, "key");
        if (key.is_string()) {
          if (const Value* v = obj.Find(key.str())) return absl::StatusOr<Value>(*v);
        }
        return absl::StatusOr<Value>(a.Get(1, "default", Value::None()));
      }
      return std::nullopt;
    }
    if (!obj.is_string()) return std::nullopt;
    const std::string& s = obj.str();
    auto str_arg = [&](size_t i, std::string_view n) -> std::optional<std::string> {
      Value v = a.Get(i, n);
      if (v.is_string()) return v.str();
      return std::nullopt;
    };
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const Value chars = a.Get(0, "chars", Value::None());
      std::u32string cs;
      if (chars.is_string()) cs = Cps(chars);
      return absl::StatusOr<Value>(Value::String(PyStrip(s, chars.is_string() ? &cs : nullptr,
                                                         name != "rstrip", name != "lstrip")));
    }
    if (name == "upper") return absl::StatusOr<Value>(Value::String(PyUpper(s)));
    if (name == "lower") return absl::StatusOr<Value>(Value::String(PyLower(s)));
    if (name == "startswith" || name == "endswith") {
      const Value arg = a.Get(0, "prefix");
      std::vector<std::string> options;
      if (arg.is_string()) {
        options.push_back(arg.str());
      } else if (arg.is_list()) {
        for (const Value& o : arg.list()) {
          if (!o.is_string()) return absl::StatusOr<Value>(Error(line, absl::StrCat(name, " needs strings")));
          options.push_back(o.str());
        }
      } else {
        return absl::StatusOr<Value>(Error(line, absl::StrCat(name, " first arg must be str or a tuple of str, not ",
                                                              TypeName(arg))));
      }
      if (pos.size() > 1) return absl::StatusOr<Value>(Unimplemented(line, absl::StrCat("str.", name, " with bounds")));
      for (const std::string& o : options) {
        const bool hit = name == "startswith" ? s.compare(0, o.size(), o) == 0
                                              : s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0;
        if (hit) return absl::StatusOr<Value>(Value::Bool(true));
      }
      return absl::StatusOr<Value>(Value::Bool(false));
    }
    if (name == "split" || name == "rsplit") {
      const Value sep = a.Get(0, "sep", Value::None());
      const Value maxv = a.Get(1, "maxsplit", Value::Int(-1));
      int64_t maxsplit = maxv.is_number() ? maxv.integer() : -1;
      ValueList out;
      if (sep.is_none()) {
        // Runs of whitespace; no empty strings.
        const std::u32string cps = Cps(obj);
        std::vector<std::u32string> parts;
        if (name == "split") {
          size_t i = 0;
          while (i < cps.size()) {
            while (i < cps.size() && PyIsSpace(cps[i])) ++i;
            if (i >= cps.size()) break;
            if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
              std::u32string rest = cps.substr(i);
              while (!rest.empty() && PyIsSpace(rest.back())) rest.pop_back();
              parts.push_back(rest);
              break;
            }
            size_t j = i;
            while (j < cps.size() && !PyIsSpace(cps[j])) ++j;
            parts.push_back(cps.substr(i, j - i));
            i = j;
          }
        } else {
          if (maxsplit >= 0) return absl::StatusOr<Value>(Unimplemented(line, "str.rsplit with maxsplit"));
          size_t i = 0;
          while (i < cps.size()) {
            while (i < cps.size() && PyIsSpace(cps[i])) ++i;
            if (i >= cps.size()) break;
            size_t j = i;
            while (j < cps.size() && !PyIsSpace(cps[j])) ++j;
            parts.push_back(cps.substr(i, j - i));
            i = j;
          }
        }
        for (const auto& p : parts) out.push_back(Value::String(EncodeUtf8(p)));
        return absl::StatusOr<Value>(Value::List(std::move(out)));
      }
      if (!sep.is_string()) return absl::StatusOr<Value>(Error(line, "split separator must be a string"));
      const std::string& d = sep.str();
      if (d.empty()) return absl::StatusOr<Value>(Error(line, "empty separator"));
      std::vector<std::string> parts;
      if (name == "split") {
        size_t start = 0;
        while (true) {
          if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) break;
          const size_t at = s.find(d, start);
          if (at == std::string::npos) break;
          parts.push_back(s.substr(start, at - start));
          start = at + d.size();
        }
        parts.push_back(s.substr(start));
      } else {
        size_t end = s.size();
        std::vector<std::string> rev;
        while (true) {
          if (maxsplit >= 0 && static_cast<int64_t>(rev.size()) == maxsplit) break;
          if (end < d.size()) break;
          const size_t at = s.rfind(d, end - d.size());
          if (at == std::string::npos) break;
          rev.push_back(s.substr(at + d.size(), end - at - d.size()));
          end = at;
        }
        rev.push_back(s.substr(0, end));
        parts.assign(rev.rbegin(), rev.rend());
      }
      for (auto& p : parts) out.push_back(Value::String(std::move(p)));
      return absl::StatusOr<Value>(Value::List(std::move(out)));
    }
    if (name == "replace") {
      auto oldv = str_arg(0, "old");
      auto newv = str_arg(1, "new");
      if (!oldv || !newv) return absl::StatusOr<Value>(Error(line, "replace() needs two strings"));
      const Value count = a.Get(2, "count", Value::Int(-1));
      return absl::StatusOr<Value>(Value::String(Replace(s, *oldv, *newv, count.is_number() ? count.integer() : -1)));
    }
    if (name == "find" || name == "rfind" || name == "count" || name == "index") {
      auto sub = str_arg(0, "sub");
      if (!sub) return absl::StatusOr<Value>(Error(line, absl::StrCat(name, "() needs a string")));
      if (pos.size() > 1) return absl::StatusOr<Value>(Unimplemented(line, absl::StrCat("str.", name, " with bounds")));
      if (name == "count") {
        if (sub->empty()) return absl::StatusOr<Value>(Value::Int(static_cast<int64_t>(Cps(obj).size()) + 1));
        int64_t c = 0;
        for (size_t at = s.find(*sub); at != std::string::npos; at = s.find(*sub, at + sub->size())) ++c;
        return absl::StatusOr<Value>(Value::Int(c));
      }
      const size_t at = name == "rfind" ? s.rfind(*sub) : s.find(*sub);
      if (at == std::string::npos) {
        if (name == "index") return absl::StatusOr<Value>(Error(line, "substring not found"));
        return absl::StatusOr<Value>(Value::Int(-1));
      }
      return absl::StatusOr<Value>(Value::Int(static_cast<int64_t>(DecodeUtf8(s.substr(0, at)).size())));
    }
    if (name == "join") {
      absl::StatusOr<ValueList> items = Items(a.Get(0, "iterable"), line);
      if (!items.ok()) return absl::StatusOr<Value>(items.status());
      std::string out;
      for (size_t i = 0; i < items->size(); ++i) {
        if (!(*items)[i].is_string()) {
          return absl::StatusOr<Value>(Error(line, absl::StrCat("sequence item ", i, ": expected str instance, ",
                                                                TypeName((*items)[i]), " found")));
        }
        if (i) out += s;
        out += (*items)[i].str();
      }
      return absl::StatusOr<Value>(Value::String(std::move(out)));
    }
    if (name == "title") return absl::StatusOr<Value>(Value::String(Title(s)));
    if (name == "capitalize") return absl::StatusOr<Value>(Value::String(Capitalize(s)));
    if (name == "removeprefix" || name == "removesuffix") {
      auto fix = str_arg(0, "prefix");
      if (!fix) return absl::StatusOr<Value>(Error(line, absl::StrCat(name, "() needs a string")));
      if (name == "removeprefix" && s.compare(0, fix->size(), *fix) == 0) {
        return absl::StatusOr<Value>(Value::String(s.substr(fix->size())));
      }
      if (name == "removesuffix" && !fix->empty() && s.size() >= fix->size() &&
          s.compare(s.size() - fix->size(), fix->size(), *fix) == 0) {
        return absl::StatusOr<Value>(Value::String(s.substr(0, s.size() - fix->size())));
      }
      return absl::StatusOr<Value>(obj);
    }
    if (name == "isspace" || name == "isdigit" || name == "isalpha" || name == "isalnum" ||
        name == "islower" || name == "isupper") {
      const std::u32string cps = Cps(obj);
      if (name == "islower" || name == "isupper") {
        bool cased = false;
        for (char32_t c : cps) {
          const auto lo = static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
          const auto up = static_cast<char32_t>(utf8proc_toupper(static_cast<utf8proc_int32_t>(c)));
          if (lo == up) continue;
          cased = true;
          if ((name == "islower" && c != lo) || (name == "isupper" && c != up)) {
            return absl::StatusOr<Value>(Value::Bool(false));
          }
        }
        return absl::StatusOr<Value>(Value::Bool(cased));
      }
      if (cps.empty()) return absl::StatusOr<Value>(Value::Bool(false));
      for (char32_t c : cps) {
        const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        const bool alpha = cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO;
        const bool digit = cat == UTF8PROC_CATEGORY_ND;
        bool ok = name == "isspace" ? PyIsSpace(c) : name == "isdigit" ? digit : name == "isalpha" ? alpha : alpha || digit;
        if (!ok) return absl::StatusOr<Value>(Value::Bool(false));
      }
      return absl::StatusOr<Value>(Value::Bool(true));
    }
    if (name == "splitlines") {
      ValueList out;
      for (auto& l : SplitLines(s)) out.push_back(Value::String(std::move(l)));
      return absl::StatusOr<Value>(Value::List(std::move(out)));
    }
    if (name == "format" || name == "zfill" || name == "center" || name == "ljust" || name == "rjust" ||
        name == "partition" || name == "rpartition" || name == "encode" || name == "translate") {
      return absl::StatusOr<Value>(Unimplemented(line, absl::StrCat("str.", name, "()")));
    }
    return std::nullopt;
  }

  static std::string Replace(const std::string& s, const std::string& old, const std::string& repl, int64_t count) {
    if (old.empty()) {
      const std::u32string cps = DecodeUtf8(s);
      std::string out;
      int64_t done = 0;
      for (size_t i = 0; i <= cps.size(); ++i) {
        if (count < 0 || done < count) {
          out += repl;
          ++done;
        }
        if (i < cps.size()) out += EncodeUtf8(std::u32string(1, cps[i]));
      }
      return out;
    }
    std::string out;
    size_t start = 0;
    int64_t done = 0;
    while (count < 0 || done < count) {
      const size_t at = s.find(old, start);
      if (at == std::string::npos) break;
      out.append(s, start, at - start);
      out += repl;
      start = at + old.size();
      ++done;
    }
    out.append(s, start, std::string::npos);
    return out;
  }

  static bool IsCased(char32_t c) {
    const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
    return cat == UTF8PROC_CATEGORY_LU || cat == UTF8PROC_CATEGORY_LL || cat == UTF8PROC_CATEGORY_LT;
  }
  static std::string Title(const std::string& s) {
    std::u32string cps = DecodeUtf8(s);
    bool prev = false;
    for (char32_t& c : cps) {
      if (IsCased(c)) {
        c = static_cast<char32_t>(prev ? utf8proc_tolower(static_cast<utf8proc_int32_t>(c))
                                       : utf8proc_toupper(static_cast<utf8proc_int32_t>(c)));
        prev = true;
      } else {
        prev = false;
      }
    }
    return EncodeUtf8(cps);
  }
  static std::string Capitalize(const std::string& s) {
    std::u32string cps = DecodeUtf8(s);
    for (size_t i = 0; i < cps.size(); ++i) {
      const auto c = static_cast<utf8proc_int32_t>(cps[i]);
      cps[i] = static_cast<char32_t>(i == 0 ? utf8proc_toupper(c) : utf8proc_tolower(c));
    }
    return EncodeUtf8(cps);
  }
  static std::vector<std::string> SplitLines(const std::string& s) {
    const std::u32string cps = DecodeUtf8(s);
    std::vector<std::string> out;
    std::u32string cur;
    for (size_t i = 0; i < cps.size(); ++i) {
      const char32_t c = cps[i];
      const bool brk = c == U'\n' || c == U'\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                       c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
      if (!brk) {
        cur += c;
        continue;
      }
      if (c == U'\r' && i + 1 < cps.size() && cps[i + 1] == U'\n') ++i;
      out.push_back(EncodeUtf8(cur));
      cur.clear();
    }
    if (!cur.empty()) out.push_back(EncodeUtf8(cur));
    return out;
  }

  // Arithmetic and concatenation.
  absl::StatusOr<Value> Binary(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") return Value::String(a.ToString() + b.ToString());
    if (a.is_undefined()) return UndefinedError(line, a);
    if (b.is_undefined()) return UndefinedError(line, b);
    const bool nums = a.is_number() && b.is_number();
    const bool ints = nums && a.kind() != K::kFloat && b.kind() != K::kFloat;
    auto type_error = [&]() {
      return Error(line, absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(a), "' and '",
                                      TypeName(b), "'"));
    };
    if (op == "+") {
      if (ints) {
        int64_t r;
        if (__builtin_add_overflow(a.integer(), b.integer(), &r)) return Error(line, "integer overflow");
        return Value::Int(r);
      }
      if (nums) return Value::Float(a.number() + b.number());
      if (a.is_string() && b.is_string()) return Value::String(a.str() + b.str());
      if (a.is_list() && b.is_list()) {
        ValueList out = a.list();
        out.insert(out.end(), b.list().begin(), b.list().end());
        return Value::List(std::move(out));
      }
      if (a.is_string() || b.is_string()) {
        return Error(line, absl::StrCat("can only concatenate str (not \"", TypeName(a.is_string() ? b : a),
                                        "\") to str"));
      }
      return type_error();
    }
    if (op == "-") {
      if (ints) {
        int64_t r;
        if (__builtin_sub_overflow(a.integer(), b.integer(), &r)) return Error(line, "integer overflow");
        return Value::Int(r);
      }
      if (nums) return Value::Float(a.number() - b.number());
      return type_error();
    }
    if (op == "*") {
      if (ints) {
        int64_t r;
        if (__builtin_mul_overflow(a.integer(), b.integer(), &r)) return Error(line, "integer overflow");
        return Value::Int(r);
      }
      if (nums) return Value::Float(a.number() * b.number());
      const Value* seq = a.is_string() || a.is_list() ? &a : b.is_string() || b.is_list() ? &b : nullptr;
      const Value* times = seq == &a ? &b : &a;
      if (seq != nullptr && (times->kind() == K::kInt || times->kind() == K::kBool)) {
        const int64_t n = std::max<int64_t>(0, times->integer());
        const size_t unit = seq->is_string() ? seq->str().size() : seq->list().size();
        if (unit != 0 && static_cast<uint64_t>(n) > max_output_ / unit) return Error(line, "repetition too large");
        if (seq->is_string()) {
          std::string out;
          for (int64_t i = 0; i < n; ++i) out += seq->str();
          return Value::String(std::move(out));
        }
        ValueList out;
        for (int64_t i = 0; i < n; ++i) out.insert(out.end(), seq->list().begin(), seq->list().end());
        return Value::List(std::move(out));
      }
      return type_error();
    }
    if (op == "%" && a.is_string()) return Unimplemented(line, "printf-style string formatting ('%')");
    if (!nums) return type_error();
    if (op == "/") {
      if (b.number() == 0) return Error(line, "division by zero");
      return Value::Float(a.number() / b.number());
    }
    if (op == "//" || op == "%") {
      if (b.number() == 0) return Error(line, "integer division or modulo by zero");
      if (ints) {
        const int64_t x = a.integer(), y = b.integer();
        if (x == std::numeric_limits<int64_t>::min() && y == -1) return Error(line, "integer overflow");
        int64_t q = x / y, r = x % y;
        if (r != 0 && ((r < 0) != (y < 0))) {
          --q;
          r += y;
        }
        return Value::Int(op == "//" ? q : r);
      }
      const double x = a.number(), y = b.number();
      double r = std::fmod(x, y);
      if (r != 0 && ((r < 0) != (y < 0))) r += y;
      if (op == "%") return Value::Float(r);
      return Value::Float(std::floor(x / y));
    }
    if (op == "**") {
      if (ints && b.integer() >= 0) {
        int64_t r = 1;
        for (int64_t i = 0; i < b.integer(); ++i) {
          if (__builtin_mul_overflow(r, a.integer(), &r)) return Error(line, "integer overflow");
        }
        return Value::Int(r);
      }
      return Value::Float(std::pow(a.number(), b.number()));
    }
    return type_error();
  }

  absl::StatusOr<bool> Less(const Value& a, const Value& b, int line) {
    if (a.is_undefined()) return UndefinedError(line, a);
    if (b.is_undefined()) return UndefinedError(line, b);
    if (a.is_number() && b.is_number()) {
      if (a.kind() == K::kFloat || b.kind() == K::kFloat) return a.number() < b.number();
      return a.integer() < b.integer();
    }
    if (a.is_string() && b.is_string()) return CodePointLess(a.str(), b.str());
    if (a.is_list() && b.is_list()) {
      const size_t n = std::min(a.list().size(), b.list().size());
      for (size_t i = 0; i < n; ++i) {
        if (Equal(a.list()[i], b.list()[i])) continue;
        return Less(a.list()[i], b.list()[i], line);
      }
      return a.list().size() < b.list().size();
    }
    return Error(line, absl::StrCat("'<' not supported between instances of '", TypeName(a), "' and '",
                                    TypeName(b), "'"));
  }

  absl::StatusOr<bool> Contains(const Value& container, const Value& item, int line) {
    switch (container.kind()) {
      case K::kUndefined: return false;
      case K::kString:
        if (!item.is_string()) {
          return Error(line, absl::StrCat("'in <string>' requires string as left operand, not ", TypeName(item)));
        }
        return container.str().find(item.str()) != std::string::npos;
      case K::kList:
        for (const Value& v : container.list()) {
          if (Equal(v, item)) return true;
        }
        return false;
      case K::kDict: return item.is_string() && container.Find(item.str()) != nullptr;
      default:
        return Error(line, absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
    }
  }

  absl::StatusOr<bool> CompareOp(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return Equal(a, b);
    if (op == "!=") return !Equal(a, b);
    if (op == "in") return Contains(b, a, line);
    if (op == "notin") {
      JINJA_ASSIGN(c, Contains(b, a, line));
      return !c;
    }
    if (op == "<") return Less(a, b, line);
    if (op == ">") return Less(b, a, line);
    if (op == "<=") {
      JINJA_ASSIGN(lt, Less(b, a, line));
      return !lt;
    }
    JINJA_ASSIGN(lt, Less(a, b, line));  // >=
    return !lt;
  }

  absl::StatusOr<int64_t> Length(const Value& v, int line) {
    switch (v.kind()) {
      case K::kUndefined: return 0;
      case K::kString: return static_cast<int64_t>(Cps(v).size());
      case K::kList: return static_cast<int64_t>(v.list().size());
      case K::kDict: return static_cast<int64_t>(v.dict().size());
      default: return Error(line, absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
  }

  absl::StatusOr<bool> Test(const std::string& name, const Value& v, const ValueList& args, int line) {
    auto arg = [&](size_t i) { return i < args.size() ? args[i] : Value(); };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.is_none();
    if (name == "boolean") return v.kind() == K::kBool;
    if (name == "true") return v.kind() == K::kBool && v.boolean();
    if (name == "false") return v.kind() == K::kBool && !v.boolean();
    if (name == "integer") return v.kind() == K::kInt;
    if (name == "float") return v.kind() == K::kFloat;
    if (name == "number") return v.is_number();
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.is_dict();
    if (name == "iterable") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "sequence") return v.is_list() || v.is_dict() || v.is_string() || v.is_undefined();
    if (name == "callable") return v.kind() == K::kFunction;
    if (name == "odd" || name == "even") {
      if (!v.is_number() || v.kind() == K::kFloat) return Error(line, absl::StrCat("'", name, "' test needs an integer"));
      const bool odd = (v.integer() % 2) != 0;
      return name == "odd" ? odd : !odd;
    }
    if (name == "divisibleby") {
      const Value d = arg(0);
      if (!v.is_number() || !d.is_number() || d.number() == 0) return Error(line, "'divisibleby' needs non-zero numbers");
      if (v.kind() != K::kFloat && d.kind() != K::kFloat) return v.integer() % d.integer() == 0;
      return std::fmod(v.number(), d.number()) == 0;
    }
    if (name == "eq" || name == "equalto" || name == "==") return Equal(v, arg(0));
    if (name == "ne" || name == "!=") return !Equal(v, arg(0));
    if (name == "lt" || name == "lessthan" || name == "<") return Less(v, arg(0), line);
    if (name == "gt" || name == "greaterthan" || name == ">") return Less(arg(0), v, line);
    if (name == "le" || name == "<=") {
      JINJA_ASSIGN(lt, Less(arg(0), v, line));
      return !lt;
    }
    if (name == "ge" || name == ">=") {
      JINJA_ASSIGN(lt, Less(v, arg(0), line));
      return !lt;
    }
    if (name == "in") return Contains(arg(0), v, line);
    if (name == "sameas") {
      const Value o = arg(0);
      if (v.is_none() || o.is_none() || v.kind() == K::kBool || o.kind() == K::kBool) {
        return v.kind() == o.kind() && (v.kind() != K::kBool || v.boolean() == o.boolean());
      }
      if (v.is_list() && o.is_list()) return &v.list() == &o.list();
      if (v.is_dict() && o.is_dict()) return &v.dict() == &o.dict();
      return Unimplemented(line, "the 'sameas' test on this type");
    }
    if (name == "lower" || name == "upper") {
      if (!v.is_string()) return false;
      return name == "lower" ? PyLower(v.str()) == v.str() : PyUpper(v.str()) == v.str();
    }
    return Unimplemented(line, absl::StrCat("the '", name, "' test"));
  }

  // Attribute access for filters' `attribute=` arguments: dotted paths and integer parts.
  absl::StatusOr<Value> AttrPath(const Value& v, const std::string& path, int line) {
    Value cur = v;
    size_t start = 0;
    while (start <= path.size()) {
      const size_t dot = path.find('.', start);
      const std::string part = path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      char* end = nullptr;
      const long long idx = std::strtoll(part.c_str(), &end, 10);
      if (!part.empty() && *end == '\0') {
        JINJA_ASSIGN(next, GetItem(cur, Value::Int(idx), line));
        cur = next;
      } else {
        JINJA_ASSIGN(next, GetAttr(cur, part, line));
        cur = next;
      }
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    return cur;
  }

  // Sort key comparison for sort/dictsort/min/max: strings case-folded unless case_sensitive.
  absl::StatusOr<bool> KeyLess(const Value& a, const Value& b, bool case_sensitive, int line) {
    if (!case_sensitive && a.is_string() && b.is_string()) {
      return CodePointLess(PyLower(a.str()), PyLower(b.str()));
    }
    return Less(a, b, line);
  }

  absl::Status SortValues(ValueList& items, bool reverse, bool case_sensitive, const std::string& attribute,
                          int line) {
    std::vector<std::pair<Value, Value>> keyed;
    for (Value& v : items) {
      Value key = v;
      if (!attribute.empty()) {
        JINJA_ASSIGN(k, AttrPath(v, attribute, line));
        key = k;
      }
      keyed.emplace_back(key, v);
    }
    absl::Status error;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& x, const auto& y) {
      if (!error.ok()) return false;
      absl::StatusOr<bool> lt = reverse ? KeyLess(y.first, x.first, case_sensitive, line)
                                        : KeyLess(x.first, y.first, case_sensitive, line);
      if (!lt.ok()) {
        error = lt.status();
        return false;
      }
      return *lt;
    });
    if (!error.ok()) return error;
    for (size_t i = 0; i < items.size(); ++i) items[i] = keyed[i].second;
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Filter(const std::string& name, const Value& v, const ValueList& pos,
                               const ValueDict& kw, int line) {
    Args a{pos, kw};
    auto need_defined = [&]() -> absl::Status {
      return v.is_undefined() ? UndefinedError(line, v) : absl::OkStatus();
    };
    if (name == "default" || name == "d") {
      const bool boolean = a.Get(1, "boolean", Value::Bool(false)).Truthy();
      if (v.is_undefined() || (boolean && !v.Truthy())) return a.Get(0, "default_value", Value::String(""));
      return v;
    }
    if (name == "length" || name == "count") {
      JINJA_ASSIGN(n, Length(v, line));
      return Value::Int(n);
    }
    if (name == "string") return Value::String(v.ToString());
    if (name == "trim") {
      const Value chars = a.Get(0, "chars", Value::None());
      std::u32string cs;
      if (chars.is_string()) cs = Cps(chars);
      return Value::String(PyStrip(v.ToString(), chars.is_string() ? &cs : nullptr, true, true));
    }
    if (name == "upper") return Value::String(PyUpper(v.ToString()));
    if (name == "lower") return Value::String(PyLower(v.ToString()));
    if (name == "title") return Value::String(Title(v.ToString()));
    if (name == "capitalize") return Value::String(Capitalize(v.ToString()));
    if (name == "safe") return v;
    if (name == "e" || name == "escape" || name == "forceescape") {
      std::string out;
      for (char c : v.ToString()) {
        switch (c) {
          case '&': out += "&amp;"; break;
          case '<': out += "&lt;"; break;
          case '>': out += "&gt;"; break;
          case '"': out += "&#34;"; break;
          case '\'': out += "&#39;"; break;
          default: out += c;
        }
      }
      return Value::String(std::move(out));
    }
    if (name == "tojson") {
      const Value indent = a.Get(0, "indent", Value::None());
      if (!a.Get(99, "separators").is_undefined()) return Unimplemented(line, "tojson's separators argument");
      if (a.Get(99, "ensure_ascii").Truthy()) return Unimplemented(line, "tojson(ensure_ascii=true)");
      const bool sort_keys = a.Get(99, "sort_keys", Value::Bool(false)).Truthy();
      int ind = -1;
      if (indent.kind() == K::kInt) {
        ind = static_cast<int>(std::clamp<int64_t>(indent.integer(), 0, 64));
      } else if (!indent.is_none()) {
        return Unimplemented(line, "tojson with a non-integer indent");
      }
      absl::StatusOr<std::string> json = ToJson(v, ind, sort_keys);
      if (!json.ok()) return Error(line, std::string(json.status().message()));
      return Value::String(*std::move(json));
    }
    if (name == "list") {
      JINJA_ASSIGN(items, Items(v, line));
      return Value::List(std::move(items));
    }
    if (name == "first" || name == "last") {
      JINJA_RETURN_IF_ERROR(need_defined());
      JINJA_ASSIGN(items, Items(v, line));
      if (items.empty()) return Value::Undefined("no first item, sequence was empty");
      return name == "first" ? items.front() : items.back();
    }
    if (name == "join") {
      JINJA_ASSIGN(items, Items(v, line));
      const std::string sep = a.Get(0, "d", Value::String("")).ToString();
      const Value attribute = a.Get(1, "attribute", Value::None());
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i) out += sep;
        Value item = items[i];
        if (!attribute.is_none()) {
          JINJA_ASSIGN(x, AttrPath(item, attribute.ToString(), line));
          item = x;
        }
        out += item.ToString();
      }
      return Value::String(std::move(out));
    }
    if (name == "replace") {
      const Value oldv = a.Get(0, "old"), newv = a.Get(1, "new"), count = a.Get(2, "count", Value::None());
      return Value::String(Replace(v.ToString(), oldv.ToString(), newv.ToString(),
                                   count.is_number() ? count.integer() : -1));
    }
    if (name == "items") {
      if (v.is_undefined()) return Value::List();
      if (!v.is_dict()) return Error(line, absl::StrCat("can only get item pairs from a mapping, not ", TypeName(v)));
      ValueList out;
      for (const auto& [k, x] : v.dict()) out.push_back(Value::Tuple({Value::String(k), x}));
      return Value::List(std::move(out));
    }
    if (name == "dictsort") {
      if (!v.is_dict()) return Error(line, "dictsort needs a mapping");
      const bool cs = a.Get(0, "case_sensitive", Value::Bool(false)).Truthy();
      const std::string by = a.Get(1, "by", Value::String("key")).ToString();
      const bool rev = a.Get(2, "reverse", Value::Bool(false)).Truthy();
      ValueList pairs;
      for (const auto& [k, x] : v.dict()) pairs.push_back(Value::Tuple({Value::String(k), x}));
      JINJA_RETURN_IF_ERROR(SortValues(pairs, rev, cs, by == "value" ? "1" : "0", line));
      return Value::List(std::move(pairs));
    }
    if (name == "sort") {
      JINJA_ASSIGN(items, Items(v, line));
      const bool rev = a.Get(0, "reverse", Value::Bool(false)).Truthy();
      const bool cs = a.Get(1, "case_sensitive", Value::Bool(false)).Truthy();
      const Value attr = a.Get(2, "attribute", Value::None());
      JINJA_RETURN_IF_ERROR(SortValues(items, rev, cs, attr.is_none() ? "" : attr.ToString(), line));
      return Value::List(std::move(items));
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string cps = Cps(v);
        std::reverse(cps.begin(), cps.end());
        return Value::String(EncodeUtf8(cps));
      }
      JINJA_ASSIGN(items, Items(v, line));
      std::reverse(items.begin(), items.end());
      return Value::List(std::move(items));
    }
    if (name == "unique") {
      JINJA_ASSIGN(items, Items(v, line));
      const bool cs = a.Get(0, "case_sensitive", Value::Bool(false)).Truthy();
      ValueList out;
      for (const Value& x : items) {
        bool seen = false;
        for (const Value& y : out) {
          if (!cs && x.is_string() && y.is_string() ? PyLower(x.str()) == PyLower(y.str()) : Equal(x, y)) {
            seen = true;
            break;
          }
        }
        if (!seen) out.push_back(x);
      }
      return Value::List(std::move(out));
    }
    if (name == "min" || name == "max") {
      JINJA_ASSIGN(items, Items(v, line));
      if (items.empty()) return Value::Undefined("no min/max item, sequence was empty");
      const bool cs = a.Get(0, "case_sensitive", Value::Bool(false)).Truthy();
      const Value attr = a.Get(1, "attribute", Value::None());
      JINJA_RETURN_IF_ERROR(SortValues(items, false, cs, attr.is_none() ? "" : attr.ToString(), line));
      return name == "min" ? items.front() : items.back();
    }
    if (name == "sum") {
      JINJA_ASSIGN(items, Items(v, line));
      const Value attr = a.Get(0, "attribute", Value::None());
      Value total = a.Get(1, "start", Value::Int(0));
      for (const Value& x : items) {
        Value item = x;
        if (!attr.is_none()) {
          JINJA_ASSIGN(y, AttrPath(x, attr.ToString(), line));
          item = y;
        }
        JINJA_ASSIGN(t, Binary("+", total, item, line));
        total = t;
      }
      return total;
    }
    if (name == "abs") {
      if (v.kind() == K::kFloat) return Value::Float(std::fabs(v.number()));
      if (v.is_number()) return Value::Int(v.integer() < 0 ? -v.integer() : v.integer());
      return Error(line, absl::StrCat("bad operand type for abs(): '", TypeName(v), "'"));
    }
    if (name == "int") {
      const Value dflt = a.Get(0, "default", Value::Int(0));
      if (v.kind() == K::kFloat) {
        if (!std::isfinite(v.number())) return dflt;
        return Value::Int(static_cast<int64_t>(v.number()));
      }
      if (v.is_number()) return Value::Int(v.integer());
      if (v.is_string()) {
        std::string t = PyStrip(v.str(), nullptr, true, true);
        t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
        char* end = nullptr;
        errno = 0;
        const long long x = std::strtoll(t.c_str(), &end, 10);
        if (!t.empty() && *end == '\0' && errno == 0) return Value::Int(x);
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == '\0' && std::isfinite(d)) return Value::Int(static_cast<int64_t>(d));
      }
      return dflt;
    }
    if (name == "float") {
      const Value dflt = a.Get(0, "default", Value::Float(0.0));
      if (v.is_number()) return Value::Float(v.number());
      if (v.is_string()) {
        const std::string t = PyStrip(v.str(), nullptr, true, true);
        char* end = nullptr;
        const double d = std::strtod(t.c_str(), &end);
        if (!t.empty() && *end == '\0') return Value::Float(d);
      }
      return dflt;
    }
    if (name == "round") {
      const int64_t precision = a.Get(0, "precision", Value::Int(0)).integer();
      const std::string method = a.Get(1, "method", Value::String("common")).ToString();
      if (!v.is_number()) return Error(line, "round needs a number");
      const double scale = std::pow(10.0, static_cast<double>(precision));
      const double x = v.number() * scale;
      double r;
      if (method == "common") {
        r = std::nearbyint(x);  // Python's round(): half to even.
      } else if (method == "floor") {
        r = std::floor(x);
      } else if (method == "ceil") {
        r = std::ceil(x);
      } else {
        return Error(line, "method must be common, ceil or floor");
      }
      return Value::Float(r / scale);
    }
    if (name == "attr") {
      return GetAttr(v, a.Get(0, "name").ToString(), line);
    }
    if (name == "map") {
      JINJA_ASSIGN(items, Items(v, line));
      const Value attribute = a.Get(99, "attribute");
      ValueList out;
      if (!attribute.is_undefined()) {
        const Value dflt = a.Get(99, "default");
        for (const Value& x : items) {
          JINJA_ASSIGN(y, AttrPath(x, attribute.ToString(), line));
          out.push_back(y.is_undefined() && !dflt.is_undefined() ? dflt : y);
        }
        return Value::List(std::move(out));
      }
      if (pos.empty() || !pos[0].is_string()) return Error(line, "map needs a filter name or attribute=");
      const ValueList rest(pos.begin() + 1, pos.end());
      for (const Value& x : items) {
        JINJA_ASSIGN(y, Filter(pos[0].str(), x, rest, {}, line));
        out.push_back(y);
      }
      return Value::List(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      JINJA_ASSIGN(items, Items(v, line));
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_when = name == "select" || name == "selectattr";
      const size_t test_at = by_attr ? 1 : 0;
      std::string attribute;
      if (by_attr) {
        if (pos.empty()) return Error(line, absl::StrCat(name, " needs an attribute name"));
        attribute = pos[0].ToString();
      }
      std::string test;
      if (pos.size() > test_at) test = pos[test_at].ToString();
      const ValueList test_args(pos.size() > test_at + 1 ? pos.begin() + static_cast<long>(test_at) + 1 : pos.end(),
                                pos.end());
      ValueList out;
      for (const Value& x : items) {
        Value subject = x;
        if (by_attr) {
          JINJA_ASSIGN(y, AttrPath(x, attribute, line));
          subject = y;
        }
        bool ok;
        if (test.empty()) {
          ok = subject.Truthy();
        } else {
          JINJA_ASSIGN(t, Test(test, subject, test_args, line));
          ok = t;
        }
        if (ok == keep_when) out.push_back(x);
      }
      return Value::List(std::move(out));
    }
    if (name == "indent") {
      const Value width = a.Get(0, "width", Value::Int(4));
      const bool first = a.Get(1, "first", Value::Bool(false)).Truthy();
      const bool blank = a.Get(2, "blank", Value::Bool(false)).Truthy();
      const std::string pad = width.is_string() ? width.str()
                                                : std::string(static_cast<size_t>(std::clamp<int64_t>(width.integer(), 0, 256)), ' ');
      const std::vector<std::string> lines = SplitLines(v.ToString() + "\n");
      std::string rv;
      if (blank) {
        for (size_t i = 0; i < lines.size(); ++i) {
          if (i) rv += "\n" + pad;
          rv += lines[i];
        }
      } else if (!lines.empty()) {
        rv = lines[0];
        for (size_t i = 1; i < lines.size(); ++i) rv += "\n" + (lines[i].empty() ? "" : pad + lines[i]);
      }
      if (first) rv = pad + rv;
      return Value::String(std::move(rv));
    }
    if (name == "wordcount") {
      size_t n = 0;
      bool in_word = false;
      for (char32_t c : DecodeUtf8(v.ToString())) {
        const auto cat = utf8proc_category(static_cast<utf8proc_int32_t>(c));
        const bool word = (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
                          (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO) || c == U'_';
        if (word && !in_word) ++n;
        in_word = word;
      }
      return Value::Int(static_cast<int64_t>(n));
    }
    return Unimplemented(line, absl::StrCat("the '", name, "' filter"));
  }

  absl::StatusOr<Value> Eval(const Node& n, Scope& scope) {
    JINJA_RETURN_IF_ERROR(Step(n.line));
    switch (n.kind) {
      case Node::Kind::kLiteral: return n.value;
      case Node::Kind::kName: return Lookup(n.name, scope);
      case Node::Kind::kList:
      case Node::Kind::kTuple: {
        ValueList items;
        for (const NodePtr& k : n.kids) {
          JINJA_ASSIGN(v, Eval(*k, scope));
          items.push_back(std::move(v));
        }
        if (n.kind == Node::Kind::kTuple) return Value::Tuple(std::move(items));
        return Value::List(std::move(items));
      }
      case Node::Kind::kDict: {
        Value d = Value::Dict();
        for (size_t i = 0; i + 1 < n.kids.size(); i += 2) {
          JINJA_ASSIGN(k, Eval(*n.kids[i], scope));
          if (!k.is_string()) return Unimplemented(n.line, "a dict literal with non-string keys");
          JINJA_ASSIGN(v, Eval(*n.kids[i + 1], scope));
          d.Set(k.str(), std::move(v));
        }
        return d;
      }
      case Node::Kind::kGetAttr: {
        JINJA_ASSIGN(obj, Eval(*n.kids[0], scope));
        return GetAttr(obj, n.name, n.line);
      }
      case Node::Kind::kGetItem: {
        JINJA_ASSIGN(obj, Eval(*n.kids[0], scope));
        JINJA_ASSIGN(key, Eval(*n.kids[1], scope));
        return GetItem(obj, key, n.line);
      }
      case Node::Kind::kSlice: return Slice(n, scope);
      case Node::Kind::kCall: {
        ValueList pos;
        ValueDict kw;
        const Node& callee = *n.kids[0];
        if (callee.kind == Node::Kind::kGetAttr) {
          JINJA_ASSIGN(obj, Eval(*callee.kids[0], scope));
          if (obj.is_undefined()) return UndefinedError(n.line, obj);
          JINJA_RETURN_IF_ERROR(EvalArgs(n, scope, pos, kw));
          if (std::optional<absl::StatusOr<Value>> r = Method(obj, callee.name, pos, kw, n.line)) return *r;
          JINJA_ASSIGN(fn, GetAttr(obj, callee.name, n.line));
          if (fn.is_undefined()) {
            return Error(n.line, absl::StrCat("'", TypeName(obj), "' object has no attribute '", callee.name, "'"));
          }
          return Call(fn, pos, kw, n.line);
        }
        JINJA_ASSIGN(fn, Eval(callee, scope));
        JINJA_RETURN_IF_ERROR(EvalArgs(n, scope, pos, kw));
        return Call(fn, pos, kw, n.line);
      }
      case Node::Kind::kFilter: {
        JINJA_ASSIGN(subject, Eval(*n.kids[0], scope));
        ValueList pos;
        ValueDict kw;
        JINJA_RETURN_IF_ERROR(EvalArgs(n, scope, pos, kw));
        return Filter(n.name, subject, pos, kw, n.line);
      }
      case Node::Kind::kTest: {
        JINJA_ASSIGN(subject, Eval(*n.kids[0], scope));
        ValueList pos;
        ValueDict kw;
        JINJA_RETURN_IF_ERROR(EvalArgs(n, scope, pos, kw));
        JINJA_ASSIGN(r, Test(n.name, subject, pos, n.line));
        return Value::Bool(n.negated ? !r : r);
      }
      case Node::Kind::kUnary: {
        JINJA_ASSIGN(v, Eval(*n.kids[0], scope));
        if (n.name == "not") return Value::Bool(!v.Truthy());
        if (v.is_undefined()) return UndefinedError(n.line, v);
        if (!v.is_number()) return Error(n.line, absl::StrCat("bad operand type for unary ", n.name, ": '", TypeName(v), "'"));
        if (n.name == "+") return v.kind() == K::kFloat ? v : Value::Int(v.integer());
        if (v.kind() == K::kFloat) return Value::Float(-v.number());
        if (v.integer() == std::numeric_limits<int64_t>::min()) return Error(n.line, "integer overflow");
        return Value::Int(-v.integer());
      }
      case Node::Kind::kBinary: {
        JINJA_ASSIGN(a, Eval(*n.kids[0], scope));
        JINJA_ASSIGN(b, Eval(*n.kids[1], scope));
        return Binary(n.name, a, b, n.line);
      }
      case Node::Kind::kAnd:
      case Node::Kind::kOr: {
        JINJA_ASSIGN(a, Eval(*n.kids[0], scope));
        const bool t = a.Truthy();
        if (n.kind == Node::Kind::kAnd ? !t : t) return a;
        return Eval(*n.kids[1], scope);
      }
      case Node::Kind::kCompare: {
        JINJA_ASSIGN(left, Eval(*n.kids[0], scope));
        for (size_t i = 0; i < n.names.size(); ++i) {
          JINJA_ASSIGN(right, Eval(*n.kids[i + 1], scope));
          JINJA_ASSIGN(ok, CompareOp(n.names[i], left, right, n.line));
          if (!ok) return Value::Bool(false);
          left = right;
        }
        return Value::Bool(true);
      }
      case Node::Kind::kCond: {
        JINJA_ASSIGN(c, Eval(*n.kids[1], scope));
        if (c.Truthy()) return Eval(*n.kids[0], scope);
        if (n.kids[2]) return Eval(*n.kids[2], scope);
        return Value::Undefined("the conditional expression had no else branch");
      }
      default: return Error(n.line, "a statement used as an expression");
    }
  }

  absl::Status Assign(const Node& target, const Value& v, Scope& scope) {
    if (target.kind == Node::Kind::kName) {
      scope.vars[target.name] = v;
      return absl::OkStatus();
    }
    if (target.kind == Node::Kind::kTuple) {
      JINJA_ASSIGN(items, Items(v, target.line));
      if (items.size() != target.kids.size()) {
        return Error(target.line, absl::StrCat("cannot unpack ", items.size(), " values into ",
                                               target.kids.size(), " names"));
      }
      for (size_t i = 0; i < items.size(); ++i) JINJA_RETURN_IF_ERROR(Assign(*target.kids[i], items[i], scope));
      return absl::OkStatus();
    }
    // {% set ns.attr = value %}
    Value ns = Lookup(target.kids[0]->name, scope);
    if (!ns.is_namespace()) {
      return Error(target.line, "cannot assign attribute on non-namespace object");
    }
    ns.Set(target.name, v);
    return absl::OkStatus();
  }

  absl::StatusOr<Value> CallMacro(const Node& macro, const ValueList& pos, const ValueDict& kw) {
    if (pos.size() > macro.names.size()) {
      return absl::InvalidArgumentError(absl::StrCat("macro '", macro.name, "' takes not more than ",
                                                     macro.names.size(), " argument(s)"));
    }
    Scope scope;
    scope.parent = root_scope_;
    for (size_t i = 0; i < macro.names.size(); ++i) {
      if (i < pos.size()) {
        scope.vars[macro.names[i]] = pos[i];
        continue;
      }
      bool found = false;
      for (const auto& [k, v] : kw) {
        if (k == macro.names[i]) {
          scope.vars[k] = v;
          found = true;
        }
      }
      if (found) continue;
      const NodePtr& dflt = macro.kids[i + 1];
      if (dflt) {
        JINJA_ASSIGN(d, Eval(*dflt, scope));
        scope.vars[macro.names[i]] = d;
      } else {
        scope.vars[macro.names[i]] = Value::Undefined(macro.names[i]);
      }
    }
    for (const auto& [k, unused] : kw) {
      if (std::find(macro.names.begin(), macro.names.end(), k) == macro.names.end()) {
        return absl::InvalidArgumentError(absl::StrCat("macro '", macro.name, "' takes no keyword argument '", k, "'"));
      }
    }
    std::string out;
    Flow flow = Flow::kNormal;
    JINJA_RETURN_IF_ERROR(Exec(*macro.kids[0], scope, out, flow));
    return Value::String(std::move(out));
  }

  absl::Status Exec(const Node& n, Scope& scope, std::string& out, Flow& flow) {
    JINJA_RETURN_IF_ERROR(Step(n.line));
    switch (n.kind) {
      case Node::Kind::kBody:
        for (const NodePtr& k : n.kids) {
          JINJA_RETURN_IF_ERROR(Exec(*k, scope, out, flow));
          if (flow != Flow::kNormal) return absl::OkStatus();
        }
        return absl::OkStatus();
      case Node::Kind::kText: return Append(out, n.value.str(), n.line);
      case Node::Kind::kOutput: {
        JINJA_ASSIGN(v, Eval(*n.kids[0], scope));
        return Append(out, v.ToString(), n.line);
      }
      case Node::Kind::kIf:
        for (size_t i = 0; i + 1 < n.kids.size(); i += 2) {
          if (n.kids[i]) {
            JINJA_ASSIGN(c, Eval(*n.kids[i], scope));
            if (!c.Truthy()) continue;
          }
          return Exec(*n.kids[i + 1], scope, out, flow);
        }
        return absl::OkStatus();
      case Node::Kind::kFor: return ExecFor(n, scope, out, flow);
      case Node::Kind::kSet: {
        JINJA_ASSIGN(v, Eval(*n.kids[1], scope));
        return Assign(*n.kids[0], v, scope);
      }
      case Node::Kind::kSetBlock: {
        std::string captured;
        Flow inner = Flow::kNormal;
        JINJA_RETURN_IF_ERROR(Exec(*n.kids[1], scope, captured, inner));
        return Assign(*n.kids[0], Value::String(std::move(captured)), scope);
      }
      case Node::Kind::kMacro: {
        const Node* macro = &n;
        scope.vars[n.name] = Value::Callable([this, macro](const ValueList& pos, const ValueDict& kw) {
          return CallMacro(*macro, pos, kw);
        });
        return absl::OkStatus();
      }
      case Node::Kind::kBreak: flow = Flow::kBreak; return absl::OkStatus();
      case Node::Kind::kContinue: flow = Flow::kContinue; return absl::OkStatus();
      default: return Error(n.line, "an expression used as a statement");
    }
  }

  absl::Status ExecFor(const Node& n, Scope& scope, std::string& out, Flow& flow) {
    const Node& target = *n.kids[0];
    JINJA_ASSIGN(iterable, Eval(*n.kids[1], scope));
    if (iterable.is_none()) return Error(n.line, "'NoneType' object is not iterable");
    JINJA_ASSIGN(all, Items(iterable, n.line));
    ValueList items;
    if (n.kids[2]) {
      for (const Value& item : all) {
        Scope probe;
        probe.parent = &scope;
        JINJA_RETURN_IF_ERROR(Assign(target, item, probe));
        JINJA_ASSIGN(keep, Eval(*n.kids[2], probe));
        if (keep.Truthy()) items.push_back(item);
      }
    } else {
      items = std::move(all);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < length; ++i) {
      Scope body;
      body.parent = &scope;
      JINJA_RETURN_IF_ERROR(Assign(target, items[static_cast<size_t>(i)], body));
      Value loop = Value::Dict();
      loop.Set("index", Value::Int(i + 1));
      loop.Set("index0", Value::Int(i));
      loop.Set("revindex", Value::Int(length - i));
      loop.Set("revindex0", Value::Int(length - i - 1));
      loop.Set("first", Value::Bool(i == 0));
      loop.Set("last", Value::Bool(i == length - 1));
      loop.Set("length", Value::Int(length));
      loop.Set("depth", Value::Int(1));
      loop.Set("depth0", Value::Int(0));
      if (i > 0) loop.Set("previtem", items[static_cast<size_t>(i - 1)]);
      if (i + 1 < length) loop.Set("nextitem", items[static_cast<size_t>(i + 1)]);
      loop.Set("cycle", Value::Callable([i](const ValueList& args, const ValueDict&) -> absl::StatusOr<Value> {
        if (args.empty()) return absl::InvalidArgumentError("no items for cycling given");
        return args[static_cast<size_t>(i) % args.size()];
      }));
      body.vars["loop"] = loop;
      Flow inner = Flow::kNormal;
      JINJA_RETURN_IF_ERROR(Exec(*n.kids[3], body, out, inner));
      if (inner == Flow::kBreak) break;
    }
    if (length == 0 && n.kids[4]) {
      Scope other;
      other.parent = &scope;
      JINJA_RETURN_IF_ERROR(Exec(*n.kids[4], other, out, flow));
      flow = Flow::kNormal;
    }
    return absl::OkStatus();
  }

  const Value& globals_;
  const size_t max_output_;
  const Scope* root_scope_ = nullptr;
  int64_t steps_ = 0;
  int call_depth_ = 0;
};

}  // namespace

absl::StatusOr<std::string> RenderTree(const Node& root, const Value& variables, size_t max_output_bytes) {
  if (!variables.is_dict()) return absl::InvalidArgumentError("template variables must be a dict");
  return Renderer(variables, max_output_bytes).Run(root);
}

}  // namespace adapterd::jinja
