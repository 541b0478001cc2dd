#include "core/safetensors.h"

#include <cstring>
#include <string>

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

}  // namespace
}  // namespace adapterd::core
