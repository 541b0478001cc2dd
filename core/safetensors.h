// Reader for the safetensors format: an 8-byte little-endian header length, a JSON header,
// then one contiguous byte buffer. The file is memory-mapped read-only; tensors are handed out
// as byte ranges inside the mapping (core/tensor_convert.h turns them into ATen tensors).
//
// The header is validated as strictly as the reference implementation (huggingface/
// safetensors `SafeTensors::read_metadata`): size limit, JSON, known dtypes, shape × dtype
// size == byte range, ranges contiguous from 0 with no gaps or overlaps, the buffer ending
// exactly at end of file, and no duplicate names (which the reference only catches
// indirectly). Every violation is an InvalidArgument naming the file and the tensor.
//
// Thread-safety: immutable after Open(); any thread may read it. Ownership: shared, because
// zero-copy tensors keep the mapping alive after the loader is gone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include "absl/strings/string_view.h"
#include <vector>

#include "absl/status/statusor.h"
#include "core/file_rules.h"

namespace adapterd::core {

// Element types of the format, in the reference enum's order.
enum class DType {
  kBool, kU8, kI8, kF8E5M2, kF8E4M3, kF8E5M2Fnuz, kF8E4M3Fnuz, kF8E8M0, kI16, kU16, kF16,
  kBF16, kI32, kU32, kF32, kF64, kI64, kU64, kC64, kF4, kF6E2M3, kF6E3M2,
};

// Returns the format's name for `dtype` ("F32", "BF16", ...).
absl::string_view DTypeName(DType dtype);
// Returns the number of bits of one element.
int DTypeBits(DType dtype);
// Parses a dtype name; NotFound-free: returns InvalidArgument for unknown names.
absl::StatusOr<DType> ParseDType(absl::string_view name);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // Offsets relative to the start of the byte buffer; end is exclusive.
  uint64_t end = 0;

  int64_t NumElements() const;
  uint64_t NumBytes() const { return end - begin; }
};

struct SafetensorsHeader {
  std::map<std::string, std::string> metadata;  // The optional "__metadata__" map.
  std::vector<TensorInfo> tensors;              // In data-offset order.
  uint64_t data_start = 0;                      // File offset of the byte buffer (8 + N).
};

// The largest header accepted, as in the reference implementation.
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100'000'000;

// Parses and validates the header of a complete safetensors image of `size` bytes. `label`
// (usually the path) prefixes every error message.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(const uint8_t* data, size_t size,
                                                         absl::string_view label);

// Of `smaps` (the text of /proc/<pid>/smaps), the PMD-mapped bytes (FilePmdMapped and
// AnonHugePages) of the mappings inside [begin, end); a mapping that only overlaps the range
// counts at most its overlap.
uint64_t HugePageBytesInSmaps(absl::string_view smaps, uintptr_t begin, uintptr_t end);

class SafetensorsFile {
 public:
  // How the bytes are held: mapped from the file (zero copy; the file must not change
  // underneath), or read into private memory (immune to later changes of the file).
  // kMapGuarded maps and guards the mapping against in-place changes of the file
  // (core/mapped_file_guard.h): for files that stay mapped while serving.
  enum class Mode { kMap, kMapGuarded, kRead };
  // Opens `path` (a regular file, within `rules`) and validates its header.
  // `refresh_small_pages` (mapped modes): fault the whole file in at once, and when the page
  // cache holds it in small folios, so that under half of it would be mapped with 2 MiB pages,
  // drop its cached pages and read it again (see reread_bytes()).
  static absl::StatusOr<std::shared_ptr<const SafetensorsFile>> Open(
      const std::string& path, const FileRules& rules = FileRules(), Mode mode = Mode::kMap,
      bool refresh_small_pages = false);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorInfo>& tensors() const { return header_.tensors; }
  uint64_t file_size() const { return size_; }
  // The first byte of the file's image, and whether it is a mapping of the file (Mode kMap or
  // kMapGuarded) rather than private memory (kRead).
  const uint8_t* base() const { return base_; }
  bool mapped() const { return mapped_; }
  // Bytes of the file's image this process maps with PMD-sized (2 MiB) pages now: the
  // FilePmdMapped of a mapping, the AnonHugePages of private memory, from /proc/self/smaps. 0
  // where the kernel maps none (or has no /proc).
  uint64_t HugePageBytes() const;
  // The bytes Open dropped from the page cache and read again for 2 MiB pages (the file's
  // size, or 0).
  uint64_t reread_bytes() const { return reread_bytes_; }

  // Returns the tensor named `name`, or null.
  const TensorInfo* Find(absl::string_view name) const;
  // Returns the first byte of `info`'s data inside the mapping.
  const uint8_t* Data(const TensorInfo& info) const {
    return base_ + header_.data_start + info.begin;
  }

 private:
  SafetensorsFile(std::string path, const uint8_t* base, uint64_t size, SafetensorsHeader header);

  std::string path_;
  const uint8_t* base_;
  uint64_t size_;
  bool mapped_ = false;
  uint64_t reread_bytes_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t, std::less<>> index_;
};

}  // namespace adapterd::core
