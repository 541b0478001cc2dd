// The parsed form of a template, shared by the parser (jinja.cc) and the renderer (render.cc).
// Internal to the jinja module.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "jinja/jinja.h"

namespace adapterd::jinja {

using NodePtr = std::shared_ptr<Node>;

struct Node {
  enum class Kind {
    // Expressions.
    kLiteral, kName, kList, kTuple, kDict, kGetAttr, kGetItem, kSlice, kCall, kFilter, kTest,
    kUnary, kBinary, kAnd, kOr, kCompare, kCond,
    // Statements.
    kBody, kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue,
  };
  Kind kind;
  int line = 0;
  std::string name;  // Identifier, attribute, operator, filter, test or macro name.
  Value value;       // Literals and text.
  std::vector<NodePtr> kids;
  std::vector<std::string> names;  // Keyword-argument names, compare operators, macro params.
  size_t positional = 0;           // Calls, filters, tests: kids[1 .. 1+positional) are positional.
  bool negated = false;            // Tests: `is not`.
};


// Renders `root` (jinja.cc calls it from Template::Render).
absl::StatusOr<std::string> RenderTree(const Node& root, const Value& variables, size_t max_output_bytes);

}  // namespace adapterd::jinja
