#include "core/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <queue>
#include <stdexcept>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "core/model_config.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace adapterd::core {
namespace {

using Json = nlohmann::json;

// Thrown for a number field out of its range (TokenId, Count); FromJson turns it into a
// status like any malformed field.
struct BadField : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Largest token id accepted: far above any real vocabulary (Gemma's 262,144), and small
// enough that tables indexed by id stay modest.
constexpr int64_t kMaxTokenId = (int64_t{1} << 24) - 1;

// Returns `v` as a token id; throws BadField for a float, a negative or a huge number
// (converting 1e45 to int32 would be undefined behaviour).
int32_t TokenId(const Json& v, const std::string& what) {
  if (!v.is_number_integer()) throw BadField(what + " is not an integer id");
  const int64_t id = v.get<int64_t>();
  if (id < 0 || id > kMaxTokenId) {
    throw BadField(absl::StrCat(what, " has id ", v.dump(), ", outside [0, ", kMaxTokenId, "]"));
  }
  return static_cast<int32_t>(id);
}

// Returns `j[key]` (default 0) as a count of characters: an integer in [0, 2^20].
int Count(const Json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return 0;
  if (!it->is_number_integer() || it->get<int64_t>() < 0 || it->get<int64_t>() > (1 << 20)) {
    throw BadField(absl::StrCat(where, ": \"", key, "\" must be an integer in [0, 1048576], found ",
                                it->dump()));
  }
  return static_cast<int>(it->get<int64_t>());
}

// ---------------------------------------------------------------------------------------
// UTF-8 helpers.

// Decodes the code point at s[i] (valid UTF-8 assumed) and advances i.
char32_t NextCodePoint(absl::string_view s, size_t& i) {
  const unsigned char c = s[i];
  if (c < 0x80) {
    ++i;
    return c;
  }
  int n = c >= 0xF0 ? 3 : c >= 0xE0 ? 2 : 1;
  char32_t cp = c & (0x3F >> n);
  for (int k = 1; k <= n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n + 1;
  return cp;
}

void AppendUtf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Length of the valid UTF-8 sequence at s[i], or 0 when invalid; `maximal` receives the
// length of the maximal invalid subpart (at least 1) when invalid.
size_t ValidSequenceAt(absl::string_view s, size_t i, size_t* maximal) {
  const unsigned char c = s[i];
  size_t need;
  unsigned char lo = 0x80, hi = 0xBF;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    need = 1;
  } else if (c >= 0xE0 && c <= 0xEF) {
    need = 2;
    if (c == 0xE0) lo = 0xA0;
    if (c == 0xED) hi = 0x9F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    need = 3;
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;
  } else {
    *maximal = 1;
    return 0;
  }
  size_t k = 1;
  for (; k <= need; ++k) {
    if (i + k >= s.size()) break;
    const unsigned char b = s[i + k];
    if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) break;
  }
  if (k == need + 1) return need + 1;
  *maximal = k;
  return 0;
}

// Rust's String::from_utf8_lossy: each maximal invalid subpart becomes one U+FFFD.
std::string Utf8Lossy(absl::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    size_t maximal = 0;
    const size_t n = ValidSequenceAt(s, i, &maximal);
    if (n > 0) {
      out.append(s.data() + i, n);
      i += n;
    } else {
      out += "\xEF\xBF\xBD";
      i += maximal;
    }
  }
  return out;
}

// Rust's char::is_whitespace (the White_Space property).
bool IsWhitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

bool IsAlphanumeric(char32_t c) {
  switch (utf8proc_category(static_cast<utf8proc_int32_t>(c))) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_ND:
    case UTF8PROC_CATEGORY_NL: case UTF8PROC_CATEGORY_NO:
      return true;
    default:
      return false;
  }
}

char32_t LastCodePoint(absl::string_view s) {
  size_t i = s.size();
  while (i > 0 && (static_cast<unsigned char>(s[i - 1]) & 0xC0) == 0x80) --i;
  if (i == 0) return 0;
  --i;
  return NextCodePoint(s, i);
}

// GPT-2's bytes_to_unicode: printable bytes map to themselves, the rest to U+0100 + n.
struct ByteMap {
  std::array<std::string, 256> byte_to_char;
  absl::flat_hash_map<char32_t, uint8_t> char_to_byte;
  ByteMap() {
    std::array<bool, 256> direct{};
    for (int b = '!'; b <= '~'; ++b) direct[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) direct[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) direct[b] = true;
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const char32_t cp = direct[b] ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + n++);
      AppendUtf8(byte_to_char[b], cp);
      char_to_byte[cp] = static_cast<uint8_t>(b);
    }
  }
};

const ByteMap& Bytes() {
  static const ByteMap* map = new ByteMap();
  return *map;
}

// ---------------------------------------------------------------------------------------
// A compiled PCRE2 regex (UTF, Unicode properties), shared read-only across threads; match
// data is per call.

class Regex {
 public:
  static absl::StatusOr<std::shared_ptr<const Regex>> Compile(const std::string& pattern,
                                                              absl::string_view where) {
    int err = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code =
        pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                      PCRE2_UTF | PCRE2_UCP | PCRE2_NO_UTF_CHECK, &err, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR msg[256];
      pcre2_get_error_message(err, msg, sizeof(msg));
      return absl::InvalidArgumentError(absl::StrCat(where, ": regex \"", pattern,
                                                     "\" does not compile at ", offset, ": ",
                                                     reinterpret_cast<const char*>(msg)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // Falls back to the interpreter if absent.
    return std::shared_ptr<const Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }

  // Returns the [begin, end) byte ranges of every non-overlapping match.
  std::vector<std::pair<size_t, size_t>> FindAll(absl::string_view s) const {
    std::vector<std::pair<size_t, size_t>> out;
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t start = 0;
    while (start <= s.size()) {
      int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(s.data()), s.size(), start,
                           PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      const size_t b = ov[0], e = ov[1];
      if (e == b) {  // Empty match: step over one character.
        if (b >= s.size()) break;
        size_t next = b;
        NextCodePoint(s, next);
        start = next;
        continue;
      }
      out.emplace_back(b, e);
      start = e;
    }
    pcre2_match_data_free(md);
    return out;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// A "pattern" of tokenizer.json: {"String": "..."} or {"Regex": "..."}.
struct Pattern {
  std::string literal;
  std::shared_ptr<const Regex> regex;

  std::vector<std::pair<size_t, size_t>> FindAll(absl::string_view s) const {
    if (regex) return regex->FindAll(s);
    std::vector<std::pair<size_t, size_t>> out;
    if (literal.empty()) return out;
    for (size_t pos = s.find(literal); pos != absl::string_view::npos;
         pos = s.find(literal, pos + literal.size())) {
      out.emplace_back(pos, pos + literal.size());
    }
    return out;
  }
};

absl::StatusOr<Pattern> ParsePattern(const Json& j, absl::string_view where) {
  Pattern p;
  if (j.is_object() && j.contains("String") && j["String"].is_string()) {
    p.literal = j["String"].get<std::string>();
    return p;
  }
  if (j.is_object() && j.contains("Regex") && j["Regex"].is_string()) {
    ASSIGN_OR_RETURN(p.regex, Regex::Compile(j["Regex"].get<std::string>(), where));
    return p;
  }
  return absl::InvalidArgumentError(absl::StrCat(where, ": pattern must be {\"String\": ...} "
                                                        "or {\"Regex\": ...}, found ",
                                                 j.dump()));
}

std::string ReplaceAll(absl::string_view s, const Pattern& p, absl::string_view content) {
  std::string out;
  size_t last = 0;
  for (auto [b, e] : p.FindAll(s)) {
    out.append(s.data() + last, b - last);
    out.append(content.data(), content.size());
    last = e;
  }
  out.append(s.data() + last, s.size() - last);
  return out;
}

// ---------------------------------------------------------------------------------------
// Normalizers.

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  virtual std::string Normalize(std::string s) const = 0;
};

class SequenceNormalizer : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> parts)
      : parts_(std::move(parts)) {}
  std::string Normalize(std::string s) const override {
    for (const auto& p : parts_) s = p->Normalize(std::move(s));
    return s;
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> parts_;
};

class PrependNormalizer : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  std::string Normalize(std::string s) const override {
    return s.empty() ? s : prefix_ + s;
  }

 private:
  std::string prefix_;
};

class ReplaceNormalizer : public Normalizer {
 public:
  ReplaceNormalizer(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::string Normalize(std::string s) const override { return ReplaceAll(s, pattern_, content_); }

 private:
  Pattern pattern_;
  std::string content_;
};

class UnicodeNormalizer : public Normalizer {
 public:
  explicit UnicodeNormalizer(int options) : options_(options) {}
  std::string Normalize(std::string s) const override {
    utf8proc_uint8_t* dst = nullptr;
    utf8proc_ssize_t n = utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(s.data()),
                                      static_cast<utf8proc_ssize_t>(s.size()), &dst,
                                      static_cast<utf8proc_option_t>(options_));
    if (n < 0) return s;  // Only reached for invalid UTF-8, which Encode rejects first.
    std::string out(reinterpret_cast<char*>(dst), static_cast<size_t>(n));
    std::free(dst);
    return out;
  }

 private:
  int options_;
};

class LowercaseNormalizer : public Normalizer {
 public:
  std::string Normalize(std::string s) const override {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
      AppendUtf8(out, static_cast<char32_t>(utf8proc_tolower(NextCodePoint(s, i))));
    }
    return out;
  }
};

class StripNormalizer : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  std::string Normalize(std::string s) const override {
    size_t b = 0, e = s.size();
    if (left_) {
      while (b < e) {
        size_t next = b;
        if (!IsWhitespace(NextCodePoint(s, next))) break;
        b = next;
      }
    }
    if (right_) {
      while (e > b) {
        size_t start = e - 1;
        while (start > b && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
        size_t probe = start;
        if (!IsWhitespace(NextCodePoint(s, probe))) break;
        e = start;
      }
    }
    return s.substr(b, e - b);
  }

 private:
  bool left_, right_;
};

absl::StatusOr<std::unique_ptr<Normalizer>> ParseNormalizer(const Json& j, absl::string_view label) {
  const std::string type = j.value("type", "");
  const std::string where = absl::StrCat(label, ": normalizer ", type);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Normalizer>> parts;
    for (const Json& p : j.value("normalizers", Json::array())) {
      ASSIGN_OR_RETURN(auto n, ParseNormalizer(p, label));
      parts.push_back(std::move(n));
    }
    return std::make_unique<SequenceNormalizer>(std::move(parts));
  }
  if (type == "Prepend") return std::make_unique<PrependNormalizer>(j.value("prepend", ""));
  if (type == "Replace") {
    ASSIGN_OR_RETURN(Pattern p, ParsePattern(j.value("pattern", Json()), where));
    return std::make_unique<ReplaceNormalizer>(std::move(p), j.value("content", ""));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE);
  if (type == "NFKC") {
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_COMPOSE | UTF8PROC_COMPAT);
  }
  if (type == "NFKD") {
    return std::make_unique<UnicodeNormalizer>(UTF8PROC_STABLE | UTF8PROC_DECOMPOSE |
                                               UTF8PROC_COMPAT);
  }
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Strip") {
    return std::make_unique<StripNormalizer>(j.value("strip_left", true), j.value("strip_right", true));
  }
  return absl::UnimplementedError(absl::StrCat(label, ": normalizer type \"", type,
                                               "\" is not supported"));
}

// ---------------------------------------------------------------------------------------
// Pre-tokenizers: split pieces into smaller pieces.

struct Piece {
  std::string text;
  bool at_start = false;  // Starts at offset 0 of the original input (Metaspace "first").
};

enum class Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };

// Splits `p` at the matches according to `behavior` (tokenizers' NormalizedString::split).
// `invert` swaps the roles of the matches and the text between them first, as the Split
// pre-tokenizer's "invert" does (tokenizers' Invert pattern flips each segment's flag):
// "Removed" with "invert" keeps only the matches (tiktoken-style splits).
void SplitPiece(const Piece& p, const std::vector<std::pair<size_t, size_t>>& matches,
                Behavior behavior, std::vector<Piece>& out, bool invert = false) {
  struct Seg {
    size_t b, e;
    bool match;
  };
  std::vector<Seg> segs;
  size_t last = 0;
  for (auto [b, e] : matches) {
    if (b > last) segs.push_back({last, b, invert});
    segs.push_back({b, e, !invert});
    last = e;
  }
  if (last < p.text.size()) segs.push_back({last, p.text.size(), invert});
  std::vector<std::pair<size_t, size_t>> ranges;
  switch (behavior) {
    case Behavior::kIsolated:
      for (const Seg& s : segs) ranges.emplace_back(s.b, s.e);
      break;
    case Behavior::kRemoved:
      for (const Seg& s : segs) {
        if (!s.match) ranges.emplace_back(s.b, s.e);
      }
      break;
    case Behavior::kContiguous:
      for (size_t i = 0; i < segs.size(); ++i) {
        if (segs[i].match && !ranges.empty() && i > 0 && segs[i - 1].match) {
          ranges.back().second = segs[i].e;
        } else {
          ranges.emplace_back(segs[i].b, segs[i].e);
        }
      }
      break;
    case Behavior::kMergedWithPrevious:
      for (const Seg& s : segs) {
        if (s.match && !ranges.empty()) {
          ranges.back().second = s.e;
        } else {
          ranges.emplace_back(s.b, s.e);
        }
      }
      break;
    case Behavior::kMergedWithNext: {
      bool pending = false;
      for (const Seg& s : segs) {
        if (pending) {
          ranges.back().second = s.e;
          pending = s.match;
        } else {
          ranges.emplace_back(s.b, s.e);
          pending = s.match;
        }
      }
      break;
    }
  }
  for (auto [b, e] : ranges) {
    if (e > b) out.push_back({p.text.substr(b, e - b), p.at_start && b == 0});
  }
}

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  virtual void Split(std::vector<Piece>& pieces) const = 0;
};

class SequencePreTokenizer : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> parts)
      : parts_(std::move(parts)) {}
  void Split(std::vector<Piece>& pieces) const override {
    for (const auto& p : parts_) p->Split(pieces);
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> parts_;
};

class SplitPreTokenizer : public PreTokenizer {
 public:
  SplitPreTokenizer(Pattern pattern, Behavior behavior, bool invert)
      : pattern_(std::move(pattern)), behavior_(behavior), invert_(invert) {}
  void Split(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (const Piece& p : pieces) {
      SplitPiece(p, pattern_.FindAll(p.text), behavior_, out, invert_);
    }
    pieces = std::move(out);
  }

 private:
  Pattern pattern_;
  Behavior behavior_;
  bool invert_;
};

constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

class ByteLevelPreTokenizer : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::shared_ptr<const Regex> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}
  void Split(std::vector<Piece>& pieces) const override {
    std::vector<Piece> split;
    for (Piece p : pieces) {
      if (add_prefix_space_ && (p.text.empty() || p.text[0] != ' ')) p.text = " " + p.text;
      if (regex_) {
        SplitPiece(p, regex_->FindAll(p.text), Behavior::kIsolated, split);
      } else {
        split.push_back(std::move(p));
      }
    }
    const ByteMap& map = Bytes();
    for (Piece& p : split) {
      std::string mapped;
      mapped.reserve(p.text.size() * 2);
      for (unsigned char c : p.text) mapped += map.byte_to_char[c];
      p.text = std::move(mapped);
    }
    pieces = std::move(split);
  }

 private:
  bool add_prefix_space_;
  std::shared_ptr<const Regex> regex_;
};

class MetaspacePreTokenizer : public PreTokenizer {
 public:
  enum class Scheme { kAlways, kFirst, kNever };
  MetaspacePreTokenizer(std::string replacement, Scheme scheme, bool split)
      : replacement_(std::move(replacement)), scheme_(scheme), split_(split) {
    pattern_.literal = replacement_;
  }
  void Split(std::vector<Piece>& pieces) const override {
    std::vector<Piece> out;
    for (Piece p : pieces) {
      p.text = absl::StrReplaceAll(p.text, {{" ", replacement_}});
      const bool starts = p.text.compare(0, replacement_.size(), replacement_) == 0;
      if (!starts && (scheme_ == Scheme::kAlways || (scheme_ == Scheme::kFirst && p.at_start))) {
        p.text = replacement_ + p.text;
      }
      if (split_) {
        SplitPiece(p, pattern_.FindAll(p.text), Behavior::kMergedWithNext, out);
      } else {
        out.push_back(std::move(p));
      }
    }
    pieces = std::move(out);
  }

 private:
  std::string replacement_;
  Scheme scheme_;
  bool split_;
  Pattern pattern_;
};

absl::StatusOr<Behavior> ParseBehavior(const std::string& b, absl::string_view where) {
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return absl::InvalidArgumentError(absl::StrCat(where, ": unknown behavior \"", b, "\""));
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> ParsePreTokenizer(const Json& j,
                                                                absl::string_view label) {
  const std::string type = j.value("type", "");
  const std::string where = absl::StrCat(label, ": pre_tokenizer ", type);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<PreTokenizer>> parts;
    for (const Json& p : j.value("pretokenizers", Json::array())) {
      ASSIGN_OR_RETURN(auto n, ParsePreTokenizer(p, label));
      parts.push_back(std::move(n));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(parts));
  }
  if (type == "Split") {
    ASSIGN_OR_RETURN(Pattern p, ParsePattern(j.value("pattern", Json()), where));
    ASSIGN_OR_RETURN(Behavior b, ParseBehavior(j.value("behavior", ""), where));
    return std::make_unique<SplitPreTokenizer>(std::move(p), b, j.value("invert", false));
  }
  if (type == "ByteLevel") {
    std::shared_ptr<const Regex> regex;
    if (j.value("use_regex", true)) {
      ASSIGN_OR_RETURN(regex, Regex::Compile(kGpt2Pattern, where));
    }
    return std::make_unique<ByteLevelPreTokenizer>(j.value("add_prefix_space", true),
                                                   std::move(regex));
  }
  if (type == "Metaspace") {
    MetaspacePreTokenizer::Scheme scheme = MetaspacePreTokenizer::Scheme::kAlways;
    if (j.contains("prepend_scheme")) {
      const std::string s = j.value("prepend_scheme", "always");
      if (s == "first") {
        scheme = MetaspacePreTokenizer::Scheme::kFirst;
      } else if (s == "never") {
        scheme = MetaspacePreTokenizer::Scheme::kNever;
      } else if (s != "always") {
        return absl::InvalidArgumentError(absl::StrCat(where, ": unknown prepend_scheme \"", s, "\""));
      }
    } else if (j.contains("add_prefix_space") && !j.value("add_prefix_space", true)) {
      scheme = MetaspacePreTokenizer::Scheme::kNever;
    }
    return std::make_unique<MetaspacePreTokenizer>(j.value("replacement", "\xE2\x96\x81"), scheme,
                                                   j.value("split", true));
  }
  return absl::UnimplementedError(absl::StrCat(label, ": pre_tokenizer type \"", type,
                                               "\" is not supported"));
}

// ---------------------------------------------------------------------------------------
// Decoders: a chain over the token strings.

class Decoder {
 public:
  virtual ~Decoder() = default;
  virtual std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const = 0;
};

class SequenceDecoder : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> parts) : parts_(std::move(parts)) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (const auto& p : parts_) tokens = p->DecodeChain(std::move(tokens));
    return tokens;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> parts_;
};

class ByteLevelDecoder : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    const ByteMap& map = Bytes();
    std::string bytes;
    for (const std::string& t : tokens) {
      std::string mapped;
      bool all = true;
      for (size_t i = 0; i < t.size();) {
        auto it = map.char_to_byte.find(NextCodePoint(t, i));
        if (it == map.char_to_byte.end()) {
          all = false;
          break;
        }
        mapped += static_cast<char>(it->second);
      }
      bytes += all ? mapped : t;
    }
    return {Utf8Lossy(bytes)};
  }
};

class MetaspaceDecoder : public Decoder {
 public:
  MetaspaceDecoder(std::string replacement, bool prepends)
      : replacement_(std::move(replacement)), prepends_(prepends) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (size_t i = 0; i < tokens.size(); ++i) {
      tokens[i] = absl::StrReplaceAll(tokens[i], {{replacement_, (i == 0 && prepends_) ? "" : " "}});
    }
    return tokens;
  }

 private:
  std::string replacement_;
  bool prepends_;
};

class ReplaceDecoder : public Decoder {
 public:
  ReplaceDecoder(Pattern pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (std::string& t : tokens) t = ReplaceAll(t, pattern_, content_);
    return tokens;
  }

 private:
  Pattern pattern_;
  std::string content_;
};

class ByteFallbackDecoder : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    std::vector<std::string> out;
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t i = 0; i < pending.size(); ++i) out.push_back("\xEF\xBF\xBD");
      }
      pending.clear();
    };
    for (std::string& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
          std::isxdigit(static_cast<unsigned char>(t[3])) &&
          std::isxdigit(static_cast<unsigned char>(t[4]))) {
        byte = std::stoi(t.substr(3, 2), nullptr, 16);
      }
      if (byte >= 0) {
        pending += static_cast<char>(byte);
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    return out;
  }
};

class FuseDecoder : public Decoder {
 public:
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    std::string all;
    for (const std::string& t : tokens) all += t;
    return {all};
  }
};

class StripDecoder : public Decoder {
 public:
  StripDecoder(std::string content, size_t start, size_t stop)
      : content_(std::move(content)), start_(start), stop_(stop) {}
  std::vector<std::string> DecodeChain(std::vector<std::string> tokens) const override {
    for (std::string& t : tokens) {
      size_t b = 0, cut = 0;
      while (cut < start_ && t.compare(b, content_.size(), content_) == 0 && b < t.size()) {
        b += content_.size();
        ++cut;
      }
      size_t e = t.size();
      cut = 0;
      while (cut < stop_ && e >= b + content_.size() &&
             t.compare(e - content_.size(), content_.size(), content_) == 0) {
        e -= content_.size();
        ++cut;
      }
      t = t.substr(b, e - b);
    }
    return tokens;
  }

 private:
  std::string content_;
  size_t start_, stop_;
};

absl::StatusOr<std::unique_ptr<Decoder>> ParseDecoder(const Json& j, absl::string_view label) {
  const std::string type = j.value("type", "");
  const std::string where = absl::StrCat(label, ": decoder ", type);
  if (type == "Sequence") {
    std::vector<std::unique_ptr<Decoder>> parts;
    for (const Json& p : j.value("decoders", Json::array())) {
      ASSIGN_OR_RETURN(auto d, ParseDecoder(p, label));
      parts.push_back(std::move(d));
    }
    return std::make_unique<SequenceDecoder>(std::move(parts));
  }
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Metaspace") {
    std::string scheme = j.value("prepend_scheme", "always");
    if (!j.contains("prepend_scheme") && j.contains("add_prefix_space") &&
        !j.value("add_prefix_space", true)) {
      scheme = "never";
    }
    return std::make_unique<MetaspaceDecoder>(j.value("replacement", "\xE2\x96\x81"),
                                              scheme != "never");
  }
  if (type == "Replace") {
    ASSIGN_OR_RETURN(Pattern p, ParsePattern(j.value("pattern", Json()), where));
    return std::make_unique<ReplaceDecoder>(std::move(p), j.value("content", ""));
  }
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "Strip") {
    return std::make_unique<StripDecoder>(j.value("content", " "), Count(j, "start", where),
                                          Count(j, "stop", where));
  }
  return absl::UnimplementedError(absl::StrCat(label, ": decoder type \"", type,
                                               "\" is not supported"));
}

// ---------------------------------------------------------------------------------------

struct AddedToken {
  std::string content;
  // What the matcher looks for: the content, or for a normalized token the content passed
  // through the normalizer (tokenizers' AddedVocabulary::refresh_added_tokens), so that under
  // a normalizer that prepends "▁" it matches only after a space or at the start.
  std::string pattern;
  int32_t id = 0;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

// Leftmost-longest matching of added tokens (the Aho-Corasick configuration tokenizers uses).
class AddedTokenMatcher {
 public:
  void Add(const AddedToken* t) {
    if (t->pattern.empty()) return;
    by_first_byte_[static_cast<unsigned char>(t->pattern[0])].push_back(t);
  }
  void Finish() {
    for (auto& list : by_first_byte_) {
      std::stable_sort(list.begin(), list.end(), [](const AddedToken* a, const AddedToken* b) {
        return a->pattern.size() > b->pattern.size();
      });
    }
  }
  bool empty() const {
    for (const auto& l : by_first_byte_) {
      if (!l.empty()) return false;
    }
    return true;
  }

  struct Split {
    size_t b, e;
    const AddedToken* token;  // Null for text between tokens.
  };
  // tokenizers' AddedVocabulary::find_matches.
  std::vector<Split> Find(absl::string_view s) const {
    std::vector<Split> out;
    size_t start_offset = 0;
    size_t i = 0;
    while (i < s.size()) {
      const AddedToken* hit = nullptr;
      for (const AddedToken* t : by_first_byte_[static_cast<unsigned char>(s[i])]) {
        if (s.compare(i, t->pattern.size(), t->pattern) == 0) {
          hit = t;
          break;
        }
      }
      if (hit == nullptr) {
        ++i;
        continue;
      }
      size_t start = i, stop = i + hit->pattern.size();
      i = stop;
      if (hit->single_word) {
        const bool start_ok = start == 0 || !IsAlphanumeric(LastCodePoint(s.substr(0, start)));
        size_t probe = stop;
        const bool stop_ok = stop == s.size() || !IsAlphanumeric(NextCodePoint(s, probe));
        if (!start_ok || !stop_ok) continue;
      }
      if (hit->lstrip) {
        size_t b = start;
        while (b > start_offset) {
          size_t cb = b - 1;
          while (cb > 0 && (static_cast<unsigned char>(s[cb]) & 0xC0) == 0x80) --cb;
          size_t probe = cb;
          if (!IsWhitespace(NextCodePoint(s, probe))) break;
          b = cb;
        }
        start = std::max(b, start_offset);
      }
      if (hit->rstrip) {
        while (stop < s.size()) {
          size_t probe = stop;
          if (!IsWhitespace(NextCodePoint(s, probe))) break;
          stop = probe;
        }
        i = stop;
      }
      if (start > start_offset) out.push_back({start_offset, start, nullptr});
      out.push_back({start, stop, hit});
      start_offset = stop;
    }
    if (start_offset < s.size()) out.push_back({start_offset, s.size(), nullptr});
    return out;
  }

 private:
  std::array<std::vector<const AddedToken*>, 256> by_first_byte_;
};

}  // namespace

bool IsValidUtf8(absl::string_view text) {
  for (size_t i = 0; i < text.size();) {
    size_t maximal = 0;
    const size_t n = ValidSequenceAt(text, i, &maximal);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

struct Tokenizer::Impl {
  // Model (BPE).
  absl::flat_hash_map<std::string, int32_t> vocab;
  std::vector<std::string> id_to_token;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a,b) → (rank, merged)
  std::optional<int32_t> unk_id;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  std::array<int32_t, 256> byte_tokens{};  // <0xHH> ids, -1 when absent.

  std::vector<AddedToken> added;
  absl::flat_hash_map<int32_t, const AddedToken*> added_by_id;
  absl::flat_hash_set<std::string> special_contents;
  AddedTokenMatcher raw_matcher, normalized_matcher;

  std::unique_ptr<Normalizer> normalizer;
  std::unique_ptr<PreTokenizer> pre_tokenizer;
  std::unique_ptr<Decoder> decoder;
  // TemplateProcessing "single": ids before and after the sequence.
  std::vector<int32_t> template_before, template_after;
  int32_t vocab_size = 0;
  SpecialTokenIds special;

  void Bpe(absl::string_view word, std::vector<int32_t>& out) const;
  absl::Status EncodeSegment(std::string text, bool at_start, std::vector<int32_t>& out) const;
};

namespace {
uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

void Tokenizer::Impl::Bpe(absl::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges) {
    auto it = vocab.find(word);
    if (it != vocab.end()) {
      out.push_back(it->second);
      return;
    }
  }
  struct Symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  std::vector<Symbol> sym;
  sym.reserve(word.size());
  bool last_was_unk = false;
  for (size_t i = 0; i < word.size();) {
    const size_t begin = i;
    NextCodePoint(word, i);
    absl::string_view ch = word.substr(begin, i - begin);
    auto it = vocab.find(ch);
    if (it != vocab.end()) {
      sym.push_back({it->second, 0, 0, true});
      last_was_unk = false;
      continue;
    }
    if (byte_fallback) {
      bool all = true;
      for (unsigned char c : ch) all = all && byte_tokens[c] >= 0;
      if (all) {
        for (unsigned char c : ch) sym.push_back({byte_tokens[c], 0, 0, true});
        last_was_unk = false;
        continue;
      }
    }
    if (unk_id) {
      if (!(fuse_unk && last_was_unk)) sym.push_back({*unk_id, 0, 0, true});
      last_was_unk = true;
    }
  }
  const int32_t n = static_cast<int32_t>(sym.size());
  for (int32_t k = 0; k < n; ++k) {
    sym[k].prev = k - 1;
    sym[k].next = k + 1 < n ? k + 1 : -1;
  }
  // Min-heap on (rank, position): lowest rank first, leftmost on ties.
  struct Cand {
    int32_t rank, pos, merged;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto consider = [&](int32_t pos) {
    if (pos < 0 || sym[pos].next < 0) return;
    auto m = merges.find(PairKey(sym[pos].id, sym[sym[pos].next].id));
    if (m != merges.end()) heap.push({m->second.first, pos, m->second.second});
  };
  for (int32_t k = 0; k + 1 < n; ++k) consider(k);
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    Symbol& s = sym[c.pos];
    if (!s.alive || s.next < 0) continue;
    auto m = merges.find(PairKey(s.id, sym[s.next].id));
    if (m == merges.end() || m->second.first != c.rank) continue;  // Stale entry.
    Symbol& right = sym[s.next];
    right.alive = false;
    s.id = c.merged;
    s.next = right.next;
    if (s.next >= 0) sym[s.next].prev = c.pos;
    consider(s.prev);
    consider(c.pos);
  }
  for (int32_t k = 0; k < n; ++k) {
    if (sym[k].alive) out.push_back(sym[k].id);
  }
}

absl::Status Tokenizer::Impl::EncodeSegment(std::string text, bool at_start,
                                            std::vector<int32_t>& out) const {
  if (normalizer) text = normalizer->Normalize(std::move(text));
  std::vector<std::pair<Piece, const AddedToken*>> parts;
  if (normalized_matcher.empty()) {
    parts.push_back({{std::move(text), at_start}, nullptr});
  } else {
    for (const auto& s : normalized_matcher.Find(text)) {
      parts.push_back({{text.substr(s.b, s.e - s.b), at_start && s.b == 0}, s.token});
    }
  }
  for (auto& [piece, token] : parts) {
    if (token != nullptr) {
      out.push_back(token->id);
      continue;
    }
    std::vector<Piece> pieces = {std::move(piece)};
    if (pre_tokenizer) pre_tokenizer->Split(pieces);
    for (const Piece& p : pieces) Bpe(p.text, out);
  }
  return absl::OkStatus();
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromModelDir(const std::string& dir) {
  const std::string path = dir + "/tokenizer.json";
  ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  auto config = ReadFileToString(dir + "/tokenizer_config.json");
  if (!config.ok() && !absl::IsNotFound(config.status())) return config.status();
  return FromJson(text, path, config.ok() ? absl::string_view(*config) : absl::string_view());
}

const SpecialTokenIds& Tokenizer::special_tokens() const { return impl_->special; }

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view text,
                                                               absl::string_view label,
                                                               absl::string_view tokenizer_config) {
  Json j = Json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": not a valid JSON object"));
  }
  auto impl = std::make_unique<Impl>();
  try {
    for (const char* key : {"truncation", "padding"}) {
      if (j.contains(key) && !j[key].is_null()) {
        return absl::UnimplementedError(absl::StrCat(
            label, ": \"", key, "\" is set; adapterd does not truncate or pad in the tokenizer"));
      }
    }
    const Json& model = j.at("model");
    const std::string type = model.value("type", "BPE");
    if (type != "BPE") {
      return absl::UnimplementedError(absl::StrCat(label, ": model type \"", type,
                                                   "\" is not supported (only BPE)"));
    }
    if (model.contains("dropout") && !model["dropout"].is_null() &&
        model["dropout"].get<double>() > 0) {
      return absl::UnimplementedError(absl::StrCat(label, ": BPE dropout is not supported"));
    }
    for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
      if (model.contains(key) && model[key].is_string() && !model[key].get<std::string>().empty()) {
        return absl::UnimplementedError(absl::StrCat(label, ": BPE ", key, " is not supported"));
      }
    }
    impl->fuse_unk = model.value("fuse_unk", false);
    impl->byte_fallback = model.value("byte_fallback", false);
    impl->ignore_merges = model.value("ignore_merges", false);
    int32_t max_id = -1;
    for (auto& [tok, id] : model.at("vocab").items()) {
      const int32_t i = TokenId(id, "vocabulary entry \"" + tok + "\"");
      impl->vocab[tok] = i;
      max_id = std::max(max_id, i);
    }
    impl->id_to_token.assign(max_id + 1, "");
    for (const auto& [tok, id] : impl->vocab) impl->id_to_token[id] = tok;
    impl->byte_tokens.fill(-1);
    for (int b = 0; b < 256; ++b) {
      auto it = impl->vocab.find(absl::StrFormat("<0x%02X>", b));
      if (it != impl->vocab.end()) impl->byte_tokens[b] = it->second;
    }
    if (model.contains("unk_token") && model["unk_token"].is_string()) {
      auto it = impl->vocab.find(model["unk_token"].get<std::string>());
      if (it == impl->vocab.end()) {
        return absl::InvalidArgumentError(absl::StrCat(label, ": unk_token \"",
                                                       model["unk_token"].get<std::string>(),
                                                       "\" is not in the vocabulary"));
      }
      impl->unk_id = it->second;
    }
    int32_t rank = 0;
    for (const Json& m : model.at("merges")) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t sp = s.find(' ');
        if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
          return absl::InvalidArgumentError(
              absl::StrCat(label, ": merge \"", s, "\" is not two tokens separated by a space"));
        }
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(label, ": merge ", m.dump(),
                                                       " is neither \"a b\" nor [a, b]"));
      }
      auto ia = impl->vocab.find(a), ib = impl->vocab.find(b), im = impl->vocab.find(a + b);
      if (ia == impl->vocab.end() || ib == impl->vocab.end() || im == impl->vocab.end()) {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": merge #", rank, " (\"", a, "\", \"", b, "\") uses a token missing from the vocabulary"));
      }
      impl->merges.emplace(PairKey(ia->second, ib->second), std::make_pair(rank, im->second));
      ++rank;
    }

    impl->added.reserve(j.value("added_tokens", Json::array()).size());
    for (const Json& t : j.value("added_tokens", Json::array())) {
      AddedToken a;
      a.content = t.at("content").get<std::string>();
      a.id = TokenId(t.at("id"), "added token \"" + a.content + "\"");
      a.special = t.value("special", false);
      a.lstrip = t.value("lstrip", false);
      a.rstrip = t.value("rstrip", false);
      a.single_word = t.value("single_word", false);
      a.normalized = t.value("normalized", !a.special);
      max_id = std::max(max_id, a.id);
      impl->added.push_back(std::move(a));
    }
    impl->vocab_size = max_id + 1;

    if (j.contains("normalizer") && !j["normalizer"].is_null()) {
      ASSIGN_OR_RETURN(impl->normalizer, ParseNormalizer(j["normalizer"], label));
    }
    for (AddedToken& a : impl->added) {
      a.pattern = a.normalized && impl->normalizer ? impl->normalizer->Normalize(a.content) : a.content;
      impl->added_by_id[a.id] = &a;
      if (a.special) impl->special_contents.insert(a.content);
      (a.normalized ? impl->normalized_matcher : impl->raw_matcher).Add(&a);
    }
    impl->raw_matcher.Finish();
    impl->normalized_matcher.Finish();
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
      ASSIGN_OR_RETURN(impl->pre_tokenizer, ParsePreTokenizer(j["pre_tokenizer"], label));
    }
    if (j.contains("decoder") && !j["decoder"].is_null()) {
      ASSIGN_OR_RETURN(impl->decoder, ParseDecoder(j["decoder"], label));
    }
    if (j.contains("post_processor") && !j["post_processor"].is_null()) {
      std::vector<const Json*> processors = {&j["post_processor"]};
      if (j["post_processor"].value("type", "") == "Sequence") {
        processors.clear();
        for (const Json& p : j["post_processor"].at("processors")) processors.push_back(&p);
      }
      for (const Json* p : processors) {
        const std::string ptype = p->value("type", "");
        if (ptype == "ByteLevel") continue;  // Offsets only; ids unchanged.
        if (ptype != "TemplateProcessing") {
          return absl::UnimplementedError(absl::StrCat(label, ": post_processor type \"", ptype,
                                                       "\" is not supported"));
        }
        bool seen_sequence = false;
        for (const Json& item : p->at("single")) {
          if (item.contains("Sequence")) {
            seen_sequence = true;
            continue;
          }
          const std::string name = item.at("SpecialToken").at("id").get<std::string>();
          const Json& special = p->at("special_tokens").at(name);
          for (const Json& id : special.at("ids")) {
            (seen_sequence ? impl->template_after : impl->template_before)
                .push_back(TokenId(id, "post_processor special token \"" + name + "\""));
          }
        }
      }
      // Every id Encode() returns must lie in the vocabulary, these included.
      for (const auto* ids : {&impl->template_before, &impl->template_after}) {
        for (int32_t id : *ids) {
          if (id < 0 || id >= impl->vocab_size) {
            return absl::InvalidArgumentError(absl::StrCat(
                label, ": post_processor template adds id ", id,
                ", outside the vocabulary and added tokens [0, ", impl->vocab_size, ")"));
          }
        }
      }
    }
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": malformed tokenizer: ", e.what()));
  } catch (const BadField& e) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", e.what()));
  }
  auto tokenizer = std::unique_ptr<Tokenizer>(new Tokenizer(std::move(impl)));
  if (!tokenizer_config.empty()) {
    Json c = Json::parse(tokenizer_config.begin(), tokenizer_config.end(), nullptr, false);
    if (c.is_discarded() || !c.is_object()) {
      return absl::InvalidArgumentError(
          absl::StrCat(label, ": tokenizer_config.json is not a valid JSON object"));
    }
    SpecialTokenIds& special = tokenizer->impl_->special;
    for (auto [key, slot] : {std::pair{"bos_token", &special.bos}, std::pair{"eos_token", &special.eos},
                             std::pair{"pad_token", &special.pad}, std::pair{"unk_token", &special.unk}}) {
      auto it = c.find(key);
      if (it == c.end() || it->is_null()) continue;
      std::string content;
      if (it->is_string()) {
        content = it->get<std::string>();
      } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
        content = (*it)["content"].get<std::string>();
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            label, ": tokenizer_config.json \"", key, "\" is neither a string nor an AddedToken"));
      }
      auto id = tokenizer->TokenToId(content);
      if (!id) {
        return absl::InvalidArgumentError(absl::StrCat(label, ": tokenizer_config.json ", key,
                                                       " \"", content, "\" is not in the vocabulary"));
      }
      *slot = *id;
    }
  }
  return tokenizer;
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(absl::string_view text,
                                                       bool add_special_tokens) const {
  if (!IsValidUtf8(text)) return absl::InvalidArgumentError("text is not valid UTF-8");
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl_->template_before;
  if (impl_->raw_matcher.empty()) {
    RETURN_IF_ERROR(impl_->EncodeSegment(std::string(text), true, ids));
  } else {
    for (const auto& s : impl_->raw_matcher.Find(text)) {
      if (s.token != nullptr) {
        ids.push_back(s.token->id);
      } else {
        RETURN_IF_ERROR(impl_->EncodeSegment(std::string(text.substr(s.b, s.e - s.b)), s.b == 0, ids));
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), impl_->template_after.begin(), impl_->template_after.end());
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(const std::vector<int32_t>& ids,
                                              bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    const std::string* token = nullptr;
    auto added = impl_->added_by_id.find(id);
    if (added != impl_->added_by_id.end()) {
      token = &added->second->content;
    } else if (id >= 0 && id < static_cast<int32_t>(impl_->id_to_token.size()) &&
               !impl_->id_to_token[id].empty()) {
      token = &impl_->id_to_token[id];
    } else {
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is not in the vocabulary"));
    }
    if (skip_special_tokens && impl_->special_contents.contains(*token)) continue;
    tokens.push_back(*token);
  }
  if (!impl_->decoder) {
    std::string out;
    for (size_t i = 0; i < tokens.size(); ++i) absl::StrAppend(&out, i ? " " : "", tokens[i]);
    return out;
  }
  std::string out;
  for (const std::string& t : impl_->decoder->DecodeChain(std::move(tokens))) out += t;
  return out;
}

int32_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::TokenToId(absl::string_view token) const {
  for (const AddedToken& a : impl_->added) {
    if (a.content == token) return a.id;
  }
  auto it = impl_->vocab.find(token);
  if (it == impl_->vocab.end()) return std::nullopt;
  return it->second;
}

bool Tokenizer::IsSpecial(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && it->second->special;
}

Tokenizer::DecodeStream::DecodeStream(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}

absl::StatusOr<std::string> Tokenizer::DecodeStream::Step(int32_t id) {
  all_ids_.push_back(id);
  window_.push_back(id);
  ASSIGN_OR_RETURN(std::string text, tokenizer_.Decode(window_, skip_special_));
  if (text.size() <= prefix_.size() ||
      (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0)) {
    return std::string();
  }
  if (text.compare(0, prefix_.size(), prefix_) != 0) {
    return absl::InternalError("streamed text does not extend the previous window");
  }
  std::string piece = text.substr(prefix_.size());
  const size_t new_prefix_index = window_.size() - prefix_index_;
  window_.erase(window_.begin(), window_.begin() + static_cast<std::ptrdiff_t>(prefix_index_));
  ASSIGN_OR_RETURN(prefix_, tokenizer_.Decode(window_, skip_special_));
  prefix_index_ = new_prefix_index;
  emitted_bytes_ += piece.size();
  return piece;
}

absl::StatusOr<std::string> Tokenizer::DecodeStream::Finish() {
  // The rest of the full decode, so that the stream adds up to Decode(all ids). When a window
  // began inside a byte-fallback sequence (decoded as U+FFFD) the emitted bytes need not line
  // up with the full decode: start at the next character boundary, so the tail is valid UTF-8
  // whatever happened (a client's protobuf refuses a string that is not).
  ASSIGN_OR_RETURN(std::string all, tokenizer_.Decode(all_ids_, skip_special_));
  size_t from = std::min(emitted_bytes_, all.size());
  while (from < all.size() && (static_cast<uint8_t>(all[from]) & 0xC0) == 0x80) ++from;
  return all.substr(from);
}

}  // namespace adapterd::core
