#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/mapped_file_guard.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace adapterd::core {
namespace {

struct DTypeEntry {
  DType dtype;
  absl::string_view name;
  int bits;
};

constexpr std::array<DTypeEntry, 22> kDTypes = {{
    {DType::kBool, "BOOL", 8},         {DType::kU8, "U8", 8},
    {DType::kI8, "I8", 8},             {DType::kF8E5M2, "F8_E5M2", 8},
    {DType::kF8E4M3, "F8_E4M3", 8},    {DType::kF8E5M2Fnuz, "F8_E5M2FNUZ", 8},
    {DType::kF8E4M3Fnuz, "F8_E4M3FNUZ", 8}, {DType::kF8E8M0, "F8_E8M0", 8},
    {DType::kI16, "I16", 16},          {DType::kU16, "U16", 16},
    {DType::kF16, "F16", 16},          {DType::kBF16, "BF16", 16},
    {DType::kI32, "I32", 32},          {DType::kU32, "U32", 32},
    {DType::kF32, "F32", 32},          {DType::kF64, "F64", 64},
    {DType::kI64, "I64", 64},          {DType::kU64, "U64", 64},
    {DType::kC64, "C64", 64},          {DType::kF4, "F4", 4},
    {DType::kF6E2M3, "F6_E2M3", 6},    {DType::kF6E3M2, "F6_E3M2", 6},
}};

const DTypeEntry& Entry(DType dtype) { return kDTypes[static_cast<size_t>(dtype)]; }

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ","), "]");
}

// Reads a non-negative JSON integer that fits in uint64.
bool ReadUnsigned(const nlohmann::json& value, uint64_t* out) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer() && value.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(value.get<int64_t>());
    return true;
  }
  return false;
}

}  // namespace

absl::string_view DTypeName(DType dtype) { return Entry(dtype).name; }
int DTypeBits(DType dtype) { return Entry(dtype).bits; }

absl::StatusOr<DType> ParseDType(absl::string_view name) {
  for (const DTypeEntry& e : kDTypes) {
    if (e.name == name) return e.dtype;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype \"", name, "\""));
}

int64_t TensorInfo::NumElements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size,
                                                         absl::string_view label) {
  auto error = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(label, ": ", parts...));
  };
  if (size < 8) return error("file is ", size, " bytes, smaller than the 8-byte header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
  if (n > kMaxSafetensorsHeaderBytes) {
    return error("header length ", n, " exceeds the limit of ", kMaxSafetensorsHeaderBytes);
  }
  if (n > size - 8) {
    return error("header length ", n, " runs past the end of the ", size, "-byte file");
  }
  const char* text = reinterpret_cast<const char*>(data + 8);

  // Duplicate top-level names are rejected explicitly: nlohmann, like Python's json, would
  // silently keep the last one.
  std::set<std::string> seen;
  std::string duplicate;
  auto on_event = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (event == nlohmann::json::parse_event_t::key && depth == 1) {
      auto key = parsed.get<std::string>();
      if (!seen.insert(key).second && duplicate.empty()) duplicate = key;
    }
    return true;
  };
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(text, text + n, on_event);
  } catch (const nlohmann::json::exception& e) {
    return error("header is not valid UTF-8 JSON: ", e.what());
  }
  if (!duplicate.empty()) return error("tensor \"", duplicate, "\" appears twice in the header");
  if (!json.is_object()) return error("header is not a JSON object");

  SafetensorsHeader header;
  header.data_start = 8 + n;
  for (auto& [name, value] : json.items()) {
    if (name == "__metadata__") {
      if (!value.is_object()) return error("__metadata__ is not an object");
      for (auto& [k, v] : value.items()) {
        if (!v.is_string()) return error("__metadata__ value for \"", k, "\" is not a string");
        header.metadata[k] = v.get<std::string>();
      }
      continue;
    }
    if (!value.is_object()) return error("tensor \"", name, "\": entry is not an object");
    TensorInfo info;
    info.name = name;
    auto dtype_it = value.find("dtype");
    if (dtype_it == value.end() || !dtype_it->is_string()) {
      return error("tensor \"", name, "\": missing string field dtype");
    }
    auto dtype = ParseDType(dtype_it->get<std::string>());
    if (!dtype.ok()) return error("tensor \"", name, "\": ", dtype.status().message());
    info.dtype = *dtype;
    auto shape_it = value.find("shape");
    if (shape_it == value.end() || !shape_it->is_array()) {
      return error("tensor \"", name, "\": missing array field shape");
    }
    for (const auto& d : *shape_it) {
      uint64_t dim = 0;
      if (!ReadUnsigned(d, &dim) || dim > static_cast<uint64_t>(INT64_MAX)) {
        return error("tensor \"", name, "\": shape holds a value that is not a size: ", d.dump());
      }
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    auto off_it = value.find("data_offsets");
    if (off_it == value.end() || !off_it->is_array() || off_it->size() != 2 ||
        !ReadUnsigned((*off_it)[0], &info.begin) || !ReadUnsigned((*off_it)[1], &info.end)) {
      return error("tensor \"", name, "\": data_offsets must be two non-negative integers");
    }
    header.tensors.push_back(std::move(info));
  }

  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorInfo& a, const TensorInfo& b) {
              return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
            });
  uint64_t expected_begin = 0;
  for (const TensorInfo& t : header.tensors) {
    if (t.begin != expected_begin || t.end < t.begin) {
      return error("tensor \"", t.name, "\": data_offsets [", t.begin, ",", t.end,
                   ") leave a gap or overlap (expected to begin at ", expected_begin, ")");
    }
    unsigned __int128 bits = static_cast<unsigned __int128>(DTypeBits(t.dtype));
    for (int64_t d : t.shape) {
      bits *= static_cast<uint64_t>(d);
      if (bits > (static_cast<unsigned __int128>(1) << 100)) {
        return error("tensor \"", t.name, "\": shape ", ShapeString(t.shape), " overflows");
      }
    }
    if (bits % 8 != 0) {
      return error("tensor \"", t.name, "\": ", DTypeName(t.dtype), " shape ",
                   ShapeString(t.shape), " is not a whole number of bytes");
    }
    if (static_cast<unsigned __int128>(t.end - t.begin) != bits / 8) {
      return error("tensor \"", t.name, "\": ", DTypeName(t.dtype), " shape ",
                   ShapeString(t.shape), " needs ", static_cast<uint64_t>(bits / 8),
                   " bytes but data_offsets span ", t.end - t.begin);
    }
    expected_begin = t.end;
  }
  const uint64_t buffer = size - header.data_start;
  if (expected_begin != buffer) {
    return error("tensor data ends at byte ", expected_begin, " of the buffer but the buffer holds ",
                 buffer, " bytes (", expected_begin > buffer ? "truncated file" : "trailing bytes",
                 ")");
  }
  return header;
}

namespace {

// The bytes of [p, p + size) this process maps with 2 MiB pages now (0 without /proc).
uint64_t MappedHugePageBytes(const void* p, uint64_t size) {
  std::ifstream in("/proc/self/smaps");
  if (!in) return 0;
  std::ostringstream text;
  text << in.rdbuf();
  const auto begin = reinterpret_cast<uintptr_t>(p);
  return HugePageBytesInSmaps(text.str(), begin, begin + size);
}

// Whether transparent huge pages are on at all ("always" or "madvise", not "[never]").
bool TransparentHugePagesOn() {
  std::ifstream in("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return !text.empty() && text.find("[never]") == std::string::npos;
}

// Faults every page of the mapping [p, p + size) in, in the kernel (so a file shrunk meanwhile
// gives an error here rather than SIGBUS), and returns the bytes it maps with 2 MiB pages, or
// nullopt when the kernel cannot populate (before Linux 5.14) or the file shrank.
std::optional<uint64_t> PopulateAndCountHugePages(void* p, uint64_t size) {
  if (::madvise(p, size, MADV_POPULATE_READ) != 0) return std::nullopt;
  return MappedHugePageBytes(p, size);
}

// Drops the first 2 MiB of the file `fd` (of at least that size, unmapped here) from the page
// cache, maps them alone at a 2 MiB boundary under MADV_HUGEPAGE and faults them in: whether
// the kernel read them into one 2 MiB page. Pages another process maps are not dropped, and
// then this says no.
bool RereadsInHugePages(int fd) {
  constexpr uint64_t kHuge = uint64_t{2} << 20;
  void* reserve =
      ::mmap(nullptr, 2 * kHuge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (reserve == MAP_FAILED) return false;
  const auto aligned = (reinterpret_cast<uintptr_t>(reserve) + kHuge - 1) & ~(kHuge - 1);
  (void)::posix_fadvise(fd, 0, static_cast<off_t>(kHuge), POSIX_FADV_DONTNEED);
  void* probe =
      ::mmap(reinterpret_cast<void*>(aligned), kHuge, PROT_READ, MAP_PRIVATE | MAP_FIXED, fd, 0);
  bool huge = false;
  if (probe != MAP_FAILED) {
    (void)::madvise(probe, kHuge, MADV_HUGEPAGE);
    huge = PopulateAndCountHugePages(probe, kHuge).value_or(0) == kHuge;
  }
  ::munmap(reserve, 2 * kHuge);  // The probe too: it replaced part of the reservation.
  return huge;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const SafetensorsFile>> SafetensorsFile::Open(
    const std::string& path, const FileRules& rules, Mode mode, bool refresh_small_pages) {
  ASSIGN_OR_RETURN(const int fd, OpenRegularFile(path, rules));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot stat"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  const uint8_t* base = nullptr;
  uint64_t reread = 0;
  auto mmap_failed = [&] {
    const int err = errno;
    ::close(fd);
    return absl::ResourceExhaustedError(absl::StrCat(path, ": mmap failed: ", std::strerror(err)));
  };
  if (size > 0) {
    void* p = mode != Mode::kRead
                  ? ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0)
                  : ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return mmap_failed();
    base = static_cast<const uint8_t*>(p);
    // Transparent huge pages where the kernel grants them (THP "madvise" or "always"): a decode
    // step streams every weight, and with 4 KiB pages a large model's page tables no longer fit
    // the caches, so each page's first touch costs a table walk from memory. On a mapping the
    // advice makes the kernel read what is not cached yet in 2 MiB folios and map cached 2 MiB
    // folios whole (kernels whose filesystem has large folios, e.g. ext4 from 6.16 on; others
    // ignore it for files).
    (void)::madvise(p, size, MADV_HUGEPAGE);
    if (mode != Mode::kRead && refresh_small_pages && TransparentHugePagesOn()) {
      // Folios already in the page cache keep their size: a file just written or copied sits
      // there in small ones and gets mapped with 4 KiB pages. When under half of the mapping's
      // whole 2 MiB extents come out huge, and the kernel reads this file's first 2 MiB anew
      // into one 2 MiB page (on kernels whose filesystem has no large folios it cannot, and a
      // whole re-read would be wasted), drop the file's clean unmapped pages from the cache
      // (written back first) and map it again, so the kernel reads it anew in 2 MiB folios.
      constexpr uint64_t kHuge = uint64_t{2} << 20;
      const auto at = reinterpret_cast<uintptr_t>(p);
      const uint64_t first = (at + kHuge - 1) & ~(kHuge - 1), last = (at + size) & ~(kHuge - 1);
      const uint64_t extents = last > first ? last - first : 0;
      const std::optional<uint64_t> huge = PopulateAndCountHugePages(p, size);
      if (extents > 0 && huge.has_value() && *huge < extents / 2) {
        ::munmap(p, size);
        (void)::fdatasync(fd);
        const bool whole = RereadsInHugePages(fd);
        if (whole) (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
        p = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) return mmap_failed();
        base = static_cast<const uint8_t*>(p);
        (void)::madvise(p, size, MADV_HUGEPAGE);
        (void)::madvise(p, size, MADV_POPULATE_READ);
        if (whole) reread = size;
      }
    }
    if (mode == Mode::kRead) {
      uint64_t done = 0;
      while (done < size) {
        const ssize_t n = ::pread(fd, static_cast<uint8_t*>(p) + done, size - done,
                                  static_cast<off_t>(done));
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) break;
        done += static_cast<uint64_t>(n);
      }
      if (done < size) {
        ::munmap(p, size);
        ::close(fd);
        return absl::InvalidArgumentError(absl::StrCat(
            path, ": read ", done, " of ", size, " bytes (the file shrank while being read)"));
      }
      ::mprotect(p, size, PROT_READ);
    }
  }
  static const uint8_t kEmpty[1] = {0};
  auto header = ParseSafetensorsHeader(base ? base : kEmpty, size, path);
  if (!header.ok()) {
    ::close(fd);
    if (base) ::munmap(const_cast<uint8_t*>(base), size);
    return header.status();
  }
  if (mode == Mode::kMapGuarded && base != nullptr) {
    GuardMapping(fd, base, size, path);  // Owns fd now.
  } else {
    ::close(fd);  // The mapping stays valid without the descriptor.
  }
  auto file = std::shared_ptr<SafetensorsFile>(new SafetensorsFile(path, base, size, std::move(*header)));
  file->mapped_ = mode != Mode::kRead;
  file->reread_bytes_ = reread;
  return std::shared_ptr<const SafetensorsFile>(std::move(file));
}

uint64_t HugePageBytesInSmaps(absl::string_view smaps, uintptr_t begin, uintptr_t end) {
  uint64_t total = 0;
  uint64_t overlap = 0;  // Of the current mapping with [begin, end); 0 outside it.
  for (absl::string_view line : absl::StrSplit(smaps, '\n')) {
    const size_t dash = line.find('-');
    const size_t space = line.find(' ');
    uint64_t first = 0, last = 0;
    if (dash != absl::string_view::npos && space != absl::string_view::npos && dash < space &&
        absl::SimpleHexAtoi(line.substr(0, dash), &first) &&
        absl::SimpleHexAtoi(line.substr(dash + 1, space - dash - 1), &last)) {
      // A mapping's first line: "start-end perms offset dev inode path".
      const uint64_t lo = std::max<uint64_t>(first, begin), hi = std::min<uint64_t>(last, end);
      overlap = hi > lo ? hi - lo : 0;
      continue;
    }
    if (overlap == 0) continue;
    if (!absl::ConsumePrefix(&line, "FilePmdMapped:") &&
        !absl::ConsumePrefix(&line, "AnonHugePages:")) {
      continue;
    }
    line = absl::StripAsciiWhitespace(line);
    if (!absl::ConsumeSuffix(&line, "kB")) continue;
    uint64_t kb = 0;
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &kb))
      total += std::min(kb * 1024, overlap);
  }
  return total;
}

uint64_t SafetensorsFile::HugePageBytes() const {
  return base_ == nullptr ? 0 : MappedHugePageBytes(base_, size_);
}

SafetensorsFile::SafetensorsFile(std::string path, const uint8_t* base, uint64_t size,
                                 SafetensorsHeader header)
    : path_(std::move(path)), base_(base), size_(size), header_(std::move(header)) {
  for (size_t i = 0; i < header_.tensors.size(); ++i) index_[header_.tensors[i].name] = i;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) {
    UnguardMapping(base_);
    ::munmap(const_cast<uint8_t*>(base_), size_);
  }
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &header_.tensors[it->second];
}

}  // namespace adapterd::core
