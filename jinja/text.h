// Python's string rules that Jinja output depends on: code points, whitespace, repr().
//
// Thread-safety: pure functions.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace adapterd::jinja {

// UTF-8 to code points; a byte that starts no valid sequence becomes U+DC80+byte (Python's
// surrogateescape), so that encoding the result gives the input back.
std::u32string DecodeUtf8(std::string_view s);
std::string EncodeUtf8(std::u32string_view s);

// Length in bytes of the Python whitespace character (str.isspace()) at `pos`, or 0.
size_t PyWhitespaceAt(std::string_view s, size_t pos);
bool PyIsSpace(char32_t c);

// str.strip/lstrip/rstrip: `chars` null strips whitespace.
std::string PyStrip(std::string_view s, const std::u32string* chars, bool left, bool right);
inline std::string PyRstrip(std::string_view s) { return PyStrip(s, nullptr, false, true); }

// repr() of a float and of a str.
std::string PyFloatRepr(double d);
std::string PyStringRepr(std::string_view s);

// Orders strings by code point (Python's str comparison). UTF-8 byte order is the same.
inline bool CodePointLess(std::string_view a, std::string_view b) { return a < b; }

// str.upper() / str.lower() per code point (utf8proc's simple case mapping).
std::string PyUpper(std::string_view s);
std::string PyLower(std::string_view s);

}  // namespace adapterd::jinja
