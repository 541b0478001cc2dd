// A Jinja2 interpreter for the subset that Hugging Face chat templates use, rendering
// byte-for-byte what Python's jinja2 renders under transformers' settings (trim_blocks,
// lstrip_blocks, loop controls, no autoescape, default Undefined). Debian packages no Jinja
// engine for C++, hence this module.
//
// Supported: text with whitespace control ({%- -%} {{- -}} {#- -#}, {%+), comments, raw
// blocks; if/elif/else, for (tuple targets, `if` filters, else, loop.* variables, break,
// continue), set (names, tuples, namespace attributes, set blocks), macros with defaults and
// keyword arguments, transformers' generation block; expressions with Python's semantics for
// None, booleans, ints, floats, strings (indexed by code point), lists, dicts (insertion
// ordered), slicing, arithmetic, comparisons, `in`, `~`, conditional expressions; the common
// filters, tests, string/dict methods and globals (range, dict, namespace). Anything else
// (extends, include, import, call blocks, filter blocks, unknown filters or tests) is refused
// by name when the template is parsed or rendered: never rendered silently wrong.
//
// Thread-safety: a parsed Template is immutable; Render may run on many threads at once.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace adapterd::jinja {

class Value;
using ValueList = std::vector<Value>;
using ValueDict = std::vector<std::pair<std::string, Value>>;  // Insertion ordered.
// A callable: positional and keyword arguments.
using Function = std::function<absl::StatusOr<Value>(const ValueList& args, const ValueDict& kwargs)>;

class Value {
 public:
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kFunction };

  Value() = default;  // Undefined.
  static Value Undefined(std::string name = "");
  static Value None();
  static Value Bool(bool b);
  static Value Int(int64_t i);
  static Value Float(double d);
  static Value String(std::string s);
  static Value List(ValueList items = {});
  static Value Tuple(ValueList items);  // A list that prints and compares as a tuple.
  static Value Dict(ValueDict items = {});
  static Value Namespace(ValueDict items = {});  // A dict whose attributes `set` may assign.
  static Value Callable(Function fn);
  // JSON objects keep their key order; numbers that are integers stay ints.
  static Value FromJson(const nlohmann::ordered_json& json);

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_list() const { return kind_ == Kind::kList; }
  bool is_dict() const { return kind_ == Kind::kDict; }
  bool is_number() const { return kind_ == Kind::kInt || kind_ == Kind::kFloat || kind_ == Kind::kBool; }
  bool is_namespace() const { return namespace_; }
  bool is_tuple() const { return tuple_; }

  bool boolean() const { return b_; }
  int64_t integer() const { return kind_ == Kind::kBool ? (b_ ? 1 : 0) : i_; }
  double number() const;
  const std::string& str() const { return *s_; }
  const ValueList& list() const { return *list_; }
  ValueList& mutable_list() { return *list_; }
  const ValueDict& dict() const { return *dict_; }
  ValueDict& mutable_dict() { return *dict_; }
  const Function& function() const { return *fn_; }
  const std::string& undefined_name() const { return *s_; }

  // Dict lookup; null when absent (or when this is not a dict).
  const Value* Find(std::string_view key) const;
  // Sets a dict entry, keeping the first position of an existing key.
  void Set(const std::string& key, Value value);

  // Python's truth value (Undefined is false).
  bool Truthy() const;
  // str(value) as Jinja prints it: Undefined prints nothing, None "None", True "True",
  // floats as Python's repr, lists and dicts as Python's repr.
  std::string ToString() const;
  // Python's repr().
  std::string Repr() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  bool namespace_ = false;
  bool tuple_ = false;
  int64_t i_ = 0;
  double d_ = 0;
  std::shared_ptr<const std::string> s_ = std::make_shared<const std::string>();
  std::shared_ptr<ValueList> list_;
  std::shared_ptr<ValueDict> dict_;
  std::shared_ptr<const Function> fn_;
};

// Python's `==` between two values (1 == 1.0 == True; lists and dicts compared deeply).
bool Equal(const Value& a, const Value& b);

// json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys) with Python's
// separators; InvalidArgument for Undefined and callables. indent < 0: no indentation.
absl::StatusOr<std::string> ToJson(const Value& value, int indent = -1, bool sort_keys = false);

struct Options {
  bool trim_blocks = false;
  bool lstrip_blocks = false;
  bool keep_trailing_newline = false;
};

struct Node;

class Template {
 public:
  // Parses `source`. InvalidArgument for syntax errors, Unimplemented for Jinja features
  // this engine does not implement (named in the message); both give the line.
  static absl::StatusOr<Template> Parse(std::string_view source, const Options& options);

  // Renders with `variables` (a dict) as the template's globals. Errors raised by the
  // template (raise_exception, a failing global) keep their code; evaluation errors (an
  // undefined value used, a type error) are InvalidArgument; unimplemented features
  // reached at run time are Unimplemented. `max_output_bytes` bounds the result.
  absl::StatusOr<std::string> Render(const Value& variables,
                                     size_t max_output_bytes = size_t{64} << 20) const;

 private:
  std::shared_ptr<const Node> root_;
};

}  // namespace adapterd::jinja
