#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace adapterd::core {
namespace {

using ::testing::HasSubstr;

// Builds a safetensors image: 8-byte little-endian length, header, data.
std::string Image(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

absl::StatusOr<SafetensorsHeader> Parse(const std::string& image) {
  return ParseSafetensorsHeader(reinterpret_cast<const uint8_t*>(image.data()), image.size(),
                                "mem.safetensors");
}

std::string Floats(std::initializer_list<float> values) {
  std::string out(values.size() * 4, '\0');
  size_t i = 0;
  for (float v : values) std::memcpy(&out[4 * i++], &v, 4);
  return out;
}

TEST(SafetensorsTest, ParsesTensorsInOffsetOrderWithMetadata) {
  auto h = Parse(Image(
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      Floats({1, 2, 3, 4})));
  ASSERT_TRUE(h.ok()) << h.status();
  ASSERT_EQ(h->tensors.size(), 2u);
  EXPECT_EQ(h->tensors[0].name, "a");
  EXPECT_EQ(h->tensors[1].name, "b");
  EXPECT_EQ(h->tensors[1].begin, 8u);
  EXPECT_EQ(h->metadata.at("format"), "pt");
}

TEST(SafetensorsTest, AcceptsWhitespacePaddedHeaderLikeTheReference) {
  auto h = Parse(Image(R"(  {"a":{"dtype":"BF16","shape":[1],"data_offsets":[0,2]}}    )",
                       std::string(2, '\0')));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->tensors[0].dtype, DType::kBF16);
}

TEST(SafetensorsTest, AcceptsScalarsAndZeroSizedTensors) {
  auto h = Parse(Image(R"({"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},)"
                       R"("z":{"dtype":"F32","shape":[2,0],"data_offsets":[4,4]}})",
                       Floats({7})));
  ASSERT_TRUE(h.ok()) << h.status();
  EXPECT_EQ(h->tensors.size(), 2u);
}

struct BadCase {
  const char* name;
  std::string image;
  const char* message;
};

class SafetensorsRejectTest : public ::testing::TestWithParam<BadCase> {};

TEST_P(SafetensorsRejectTest, RejectsWithPreciseMessage) {
  auto h = Parse(GetParam().image);
  ASSERT_FALSE(h.ok());
  EXPECT_EQ(h.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(h.status().message()), HasSubstr("mem.safetensors: "));
  EXPECT_THAT(std::string(h.status().message()), HasSubstr(GetParam().message));
}

std::string HugeLength() {
  std::string s(8, '\0');
  s[4] = 1;  // 2^32 > 100 MB limit.
  return s + "{}";
}

INSTANTIATE_TEST_SUITE_P(
    Corrupt, SafetensorsRejectTest,
    ::testing::Values(
        BadCase{"TooSmall", "abc", "smaller than the 8-byte header length"},
        BadCase{"HeaderTooLarge", HugeLength(), "exceeds the limit"},
        BadCase{"HeaderPastEnd", Image("{}", "").substr(0, 9), "runs past the end"},
        BadCase{"NotJson", Image("{not json", ""), "not valid UTF-8 JSON"},
        BadCase{"InvalidUtf8", Image("{\"\xff\xfe\":1}", ""), "not valid UTF-8 JSON"},
        BadCase{"NotObject", Image("[1,2]", ""), "not a JSON object"},
        BadCase{"UnknownDtype",
                Image(R"({"a":{"dtype":"F12","shape":[1],"data_offsets":[0,4]}})", Floats({1})),
                "tensor \"a\": unknown dtype \"F12\""},
        BadCase{"NegativeShape",
                Image(R"({"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", Floats({1})),
                "shape holds a value that is not a size"},
        BadCase{"MissingOffsets", Image(R"({"a":{"dtype":"F32","shape":[1]}})", Floats({1})),
                "data_offsets must be two non-negative integers"},
        BadCase{"Gap",
                Image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      Floats({1, 2})),
                "tensor \"a\": data_offsets [4,8) leave a gap or overlap"},
        BadCase{"Overlap",
                Image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                      R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      Floats({1, 2})),
                "leave a gap or overlap"},
        BadCase{"ShapeDisagreesWithBytes",
                Image(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})",
                      Floats({1, 2})),
                "tensor \"a\": F32 shape [3] needs 12 bytes but data_offsets span 8"},
        BadCase{"Truncated",
                Image(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", Floats({1})),
                "truncated file"},
        BadCase{"TrailingBytes",
                Image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})",
                      Floats({1, 2})),
                "trailing bytes"},
        BadCase{"DuplicateName",
                Image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                      R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                      Floats({1, 2})),
                "tensor \"a\" appears twice"},
        BadCase{"NonStringMetadata",
                Image(R"({"__metadata__":{"x":0}})", ""), "__metadata__ value for \"x\""},
        BadCase{"SubByteShape",
                Image(R"({"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})",
                      std::string(2, '\0')),
                "not a whole number of bytes"},
        BadCase{"OverflowingShape",
                Image(R"({"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],)"
                      R"("data_offsets":[0,4]}})",
                      Floats({1})),
                "overflows"}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(SafetensorsTest, OpenMapsARealFixtureAndReadsItsBytes) {
  auto file = SafetensorsFile::Open(testing::Fixture("llama_tied") + "/model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  const TensorInfo* norm = (*file)->Find("model.norm.weight");
  ASSERT_NE(norm, nullptr);
  EXPECT_EQ(norm->dtype, DType::kF32);
  EXPECT_EQ(norm->shape, std::vector<int64_t>{64});
  // The fixture writer pads the header to 8 bytes, so data is aligned for zero-copy.
  EXPECT_EQ((*file)->header().data_start % 8, 0u);
  EXPECT_EQ((*file)->Find("lm_head.weight"), nullptr);
}

TEST(SafetensorsTest, OpenReportsMissingFileAsNotFound) {
  auto file = SafetensorsFile::Open("/nonexistent/model.safetensors");
  EXPECT_EQ(file.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, OpenRejectsATruncatedCopyOfARealFile) {
  std::string text = testing::ReadBytes(testing::Fixture("llama_tied") + "/model.safetensors");
  std::string dir = testing::TempDir("trunc");
  testing::WriteFile(dir + "/model.safetensors", text.substr(0, text.size() - 100));
  auto file = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("truncated file"));
}

TEST(SafetensorsTest, HugePageBytesInSmapsCountsTheMappingsInsideTheRange) {
  // Three mappings: one inside [0x200000, 0x1000000), one outside, one that overlaps the range's
  // end by 2 MiB and so counts at most 2 MiB of its 4 MiB.
  const std::string smaps =
      "00200000-00800000 r--p 00000000 fe:00 12 /m/model.safetensors\n"
      "Size:               6144 kB\n"
      "AnonHugePages:         0 kB\n"
      "FilePmdMapped:      4096 kB\n"
      "VmFlags: rd mr mw me hg\n"
      "01000000-01400000 rw-p 00000000 00:00 0\n"
      "AnonHugePages:      4096 kB\n"
      "FilePmdMapped:         0 kB\n"
      "00e00000-01200000 r--p 00000000 00:00 0\n"
      "Rss:                4096 kB\n"
      "AnonHugePages:      4096 kB\n"
      "FilePmdMapped:   garbage kB\n";
  EXPECT_EQ(HugePageBytesInSmaps(smaps, 0x200000, 0x1000000), (4096u + 2048u) * 1024u);
  EXPECT_EQ(HugePageBytesInSmaps(smaps, 0x1000000, 0x1400000), (4096u + 2048u) * 1024u);
  EXPECT_EQ(HugePageBytesInSmaps(smaps, 0x2000000, 0x3000000), 0u);
  EXPECT_EQ(HugePageBytesInSmaps("", 0, ~uintptr_t{0}), 0u);
}

// The process's 2 MiB-mapped bytes (file-backed and anonymous), from /proc/self/smaps_rollup: a
// path independent of HugePageBytes's reading of each mapping.
uint64_t RollupHugePageBytes() {
  std::ifstream in("/proc/self/smaps_rollup");
  std::string key;
  uint64_t total = 0;
  while (in >> key) {
    if (key == "FilePmdMapped:" || key == "AnonHugePages:") {
      uint64_t kb = 0;
      in >> kb;
      total += kb * 1024;
    }
  }
  return total;
}

TEST(SafetensorsTest, HugePageBytesIsWhatTheProcessMapsWithTwoMegabytePages) {
  // 16 MiB of weights, written and then dropped from the page cache, so that the kernel reads
  // them again when the mapping is touched: in 2 MiB folios where it can (the advice Open
  // gives), in small ones where it cannot. Either way the file's figure must be the rise in
  // the process's total.
  const std::string dir = testing::TempDir("huge_pages");
  const std::string path = dir + "/model.safetensors";
  const uint64_t bytes = 16u << 20;
  const std::string header = absl::StrCat(R"({"w":{"dtype":"U8","shape":[)", bytes,
                                          R"(],"data_offsets":[0,)", bytes, "]}}");
  testing::WriteFile(path, Image(header, std::string(bytes, '\x5a')));
  for (auto mode : {SafetensorsFile::Mode::kMap, SafetensorsFile::Mode::kRead}) {
    SCOPED_TRACE(mode == SafetensorsFile::Mode::kMap ? "mapped" : "read");
    const int fd = ::open(path.c_str(), O_RDONLY);
    ASSERT_GE(fd, 0);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    const uint64_t before = RollupHugePageBytes();
    auto file = SafetensorsFile::Open(path, FileRules(), mode);
    ASSERT_TRUE(file.ok()) << file.status();
    uint64_t sum = 0;
    const TensorInfo* w = (*file)->Find("w");
    ASSERT_NE(w, nullptr);
    for (uint64_t i = 0; i < bytes; i += 4096) sum += (*file)->Data(*w)[i];
    EXPECT_EQ(sum, 0x5au * (bytes / 4096));
    const uint64_t after = RollupHugePageBytes();
    const uint64_t huge = (*file)->HugePageBytes();
    EXPECT_EQ(huge, after - before);
    EXPECT_LE(huge, (*file)->file_size());
    std::printf("%s: %llu of %llu bytes in 2 MiB pages\n",
                mode == SafetensorsFile::Mode::kMap ? "mapped" : "read",
                static_cast<unsigned long long>(huge),
                static_cast<unsigned long long>((*file)->file_size()));
  }
}

// Whether this kernel reads a file it does not cache yet into 2 MiB folios and maps them whole
// under MADV_HUGEPAGE: probed with plain system calls on a file of its own.
bool KernelMapsFilesWithHugePages(const std::string& dir) {
  const std::string path = dir + "/probe.bin";
  const size_t bytes = 8u << 20;
  testing::WriteFile(path, std::string(bytes, '\x11'));
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return false;
  ::fdatasync(fd);
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  void* p = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (p == MAP_FAILED) return false;
  const uint64_t before = RollupHugePageBytes();
  ::madvise(p, bytes, MADV_HUGEPAGE);
  volatile uint8_t sink = 0;
  for (size_t i = 0; i < bytes; i += 4096) sink = sink + static_cast<const uint8_t*>(p)[i];
  const uint64_t huge = RollupHugePageBytes() - before;
  ::munmap(p, bytes);
  return huge >= bytes / 2;
}

// A weight file just written in 4 KiB pieces sits in the page cache in small folios and maps
// with 4 KiB pages. Opened with refresh_small_pages, it is dropped from the cache and read again
// when under half of it maps with 2 MiB pages and the kernel can read it into 2 MiB ones, and
// then maps with 2 MiB pages, its bytes unchanged; opened again, it is not read again. Nor is
// it while another mapping holds its small pages.
TEST(SafetensorsTest, RefreshSmallPagesReadsAFileTheCacheHoldsInSmallFoliosAgain) {
  const std::string dir = testing::TempDir("refresh_pages");
  const bool kernel_can = KernelMapsFilesWithHugePages(dir);
  const std::string path = dir + "/model.safetensors";
  const uint64_t bytes = 16u << 20;
  const std::string header = absl::StrCat(R"({"w":{"dtype":"U8","shape":[)", bytes,
                                          R"(],"data_offsets":[0,)", bytes, "]}}");
  std::string image = Image(header, std::string(bytes, '\0'));
  for (uint64_t i = 0; i < bytes; ++i)
    image[image.size() - bytes + i] = static_cast<char>(i * 7 + (i >> 12));
  {
    const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ASSERT_GE(fd, 0);
    for (size_t at = 0; at < image.size(); at += 4096) {
      const size_t n = std::min<size_t>(4096, image.size() - at);
      ASSERT_EQ(::write(fd, image.data() + at, n), static_cast<ssize_t>(n));
    }
    ::close(fd);
  }
  auto checksum = [&](const SafetensorsFile& f) {
    const TensorInfo* w = f.Find("w");
    uint64_t sum = 0;
    for (uint64_t i = 0; i < bytes; ++i) sum = sum * 31 + f.Data(*w)[i];
    return sum;
  };
  uint64_t want = 0;
  for (uint64_t i = 0; i < bytes; ++i) want = want * 31 + static_cast<uint8_t>(i * 7 + (i >> 12));

  auto kept = SafetensorsFile::Open(path, FileRules(), SafetensorsFile::Mode::kMap, false);
  ASSERT_TRUE(kept.ok()) << kept.status();
  EXPECT_EQ(checksum(**kept), want);
  const uint64_t small = (*kept)->HugePageBytes();
  const auto at = reinterpret_cast<uintptr_t>((*kept)->base());
  const uint64_t size = (*kept)->file_size();
  const uint64_t extents = (((at + size) >> 21) - ((at + (uint64_t{2} << 20) - 1) >> 21)) << 21;
  EXPECT_EQ((*kept)->reread_bytes(), 0u);
  {
    // While this process still maps the small pages, they cannot be dropped: the probe of the
    // first 2 MiB says so, and nothing is read again.
    auto held = SafetensorsFile::Open(path, FileRules(), SafetensorsFile::Mode::kMap, true);
    ASSERT_TRUE(held.ok()) << held.status();
    EXPECT_EQ((*held)->reread_bytes(), 0u);
    EXPECT_EQ(checksum(**held), want);
  }
  kept->reset();

  auto refreshed = SafetensorsFile::Open(path, FileRules(), SafetensorsFile::Mode::kMap, true);
  ASSERT_TRUE(refreshed.ok()) << refreshed.status();
  EXPECT_EQ(checksum(**refreshed), want);
  const uint64_t huge = (*refreshed)->HugePageBytes();
  std::printf(
      "kernel maps files with 2 MiB pages: %d; written: %llu, refreshed: %llu of %llu bytes\n",
      kernel_can, static_cast<unsigned long long>(small), static_cast<unsigned long long>(huge),
      static_cast<unsigned long long>(size));
  std::ifstream thp("/sys/kernel/mm/transparent_hugepage/enabled");
  const std::string thp_mode((std::istreambuf_iterator<char>(thp)),
                             std::istreambuf_iterator<char>());
  if (small < extents / 2 && !thp_mode.empty() && thp_mode.find("[never]") == std::string::npos) {
    // Read again only where that gives 2 MiB pages.
    EXPECT_EQ((*refreshed)->reread_bytes(), kernel_can ? size : 0u);
  }
  if (kernel_can) {
    EXPECT_LT(small, extents / 2)
        << "4 KiB writes left 2 MiB folios: this test no longer tests the refresh";
    EXPECT_GE(huge, extents / 2);
    refreshed->reset();
    auto again = SafetensorsFile::Open(path, FileRules(), SafetensorsFile::Mode::kMap, true);
    ASSERT_TRUE(again.ok()) << again.status();
    EXPECT_EQ((*again)->reread_bytes(), 0u);
    EXPECT_EQ(checksum(**again), want);
  }
}

}  // namespace
}  // namespace adapterd::core
