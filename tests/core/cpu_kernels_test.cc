// The CPU kernels against references computed another way (double precision, written from
// the formulas), on every instruction set this machine supports.
#include "core/cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "gtest/gtest.h"

namespace adapterd::core::cpu {
namespace {

// Selects an instruction set for one test and restores the best one afterwards.
class IsaTest : public ::testing::TestWithParam<Isa> {
 protected:
  void SetUp() override {
    if (static_cast<int>(GetParam()) > static_cast<int>(SupportedIsa())) {
      GTEST_SKIP() << IsaName(GetParam()) << " is not supported here";
    }
    ASSERT_TRUE(SelectIsa(GetParam()));
  }
  void TearDown() override { SelectIsa(SupportedIsa()); }
};

std::string IsaParamName(const ::testing::TestParamInfo<Isa>& info) {
  return IsaName(info.param);
}

class LinearTest : public IsaTest {};

TEST_P(LinearTest, MatchesADoublePrecisionProductForAwkwardShapes) {
  at::manual_seed(7);
  for (int64_t m : {1, 2, 3, 4, 5, 7, 16, 17, 48}) {
    for (int64_t k : {1, 7, 16, 24, 40, 773}) {
      for (int64_t n : {1, 5, 6, 7, 48, 49, 101}) {
        // x is a row-strided view (every other row of a wider tensor), as a narrowed batch is.
        at::Tensor wide = at::randn({m, k + 3});
        at::Tensor x = wide.narrow(1, 1, k);
        at::Tensor w = at::randn({n, k});
        at::Tensor b = at::randn({n});
        for (bool with_bias : {false, true}) {
          at::Tensor bias = with_bias ? b : at::Tensor();
          at::Tensor y = Linear(x, w, bias);
          ASSERT_TRUE(y.defined()) << m << "x" << k << "x" << n;
          at::Tensor want = at::linear(x.to(at::kDouble), w.to(at::kDouble),
                                       with_bias ? b.to(at::kDouble) : at::Tensor());
          const double err = (y.to(at::kDouble) - want).abs().max().item<double>();
          const double scale = std::sqrt(static_cast<double>(k)) + 1;
          EXPECT_LT(err, 2e-6 * scale * 8) << m << "x" << k << "x" << n << " bias " << with_bias;
        }
      }
    }
  }
}

// A row alone (a decode step: LinearOneRow(), each weight row read start to end) equals that
// row in a batch (the tiles, their chains run as passes) bit for bit, for every weight dtype,
// whatever the chains' last vectors (k = 83, 112: one and three past whole steps of 64 on
// AVX-512; two on AVX2) and the scalar tail.
TEST_P(LinearTest, ARowsResultDoesNotDependOnItsBatch) {
  at::manual_seed(8);
  for (const int64_t k : {200, 83, 112}) {
    at::Tensor x = at::randn({300, k});  // Past 48 rows too (prefill).
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
      at::Tensor w = at::randn({130, k}).to(dtype);
      at::Tensor all = Linear(x, w, at::Tensor());
      ASSERT_TRUE(all.defined());
      for (int64_t i = 0; i < x.size(0); ++i) {
        at::Tensor alone = Linear(x.narrow(0, i, 1), w, at::Tensor());
        EXPECT_TRUE(at::equal(all.narrow(0, i, 1), alone))
            << c10::toString(dtype) << " k " << k << " row " << i;
      }
    }
  }
}

// bfloat16 and float16 weights (a checkpoint's own, served in place) are widened exactly: every
// output equals the float32 copy's bit for bit, few rows and many, odd k and n included.
TEST_P(LinearTest, HalfPrecisionWeightsEqualTheirFloat32CopiesBitForBit) {
  at::manual_seed(10);
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    for (int64_t m : {1, 3, 4, 17, 300}) {
      for (int64_t k : {7, 64, 773, 1100}) {
        const at::Tensor x = at::randn({m, k});
        const at::Tensor w = at::randn({101, k}).to(dtype);
        const at::Tensor b = at::randn({101});
        const at::Tensor half = Linear(x, w, b);
        const at::Tensor full = Linear(x, w.to(at::kFloat), b);
        ASSERT_TRUE(half.defined() && full.defined()) << c10::toString(dtype);
        EXPECT_TRUE(at::equal(half, full)) << c10::toString(dtype) << " " << m << "x" << k;
      }
    }
  }
}

// MatmulPrecision::kMedium over bfloat16 weights (AVX-512 BF16): each output is the product of
// x rounded to bfloat16 (ATen's own rounding here, nearest even) and the weights, summed in
// float32. Against that product in double precision the error is the float32 summation's
// alone: each output passes through at most k / 128 + 40 roundings (its chain's steps, the
// combining and the vector's sum, the up to 31 inputs past whole vectors, the bias), each
// at most 2^-24 of the sum of the products' magnitudes (k = 7, 33 and 100 take that tail).
// Against the unrounded x the
// error is larger than highest's and within x's rounding, 2^-8 of the same sum (of the
// unrounded magnitudes: 1.01 times the rounded ones at most). Few rows and
// many, a row-strided x, a bias; a row's result equals it alone, bit for bit.
TEST_P(LinearTest, MediumPrecisionSumsBfloat16ProductsOfTheRoundedRows) {
  const MatmulPrecision medium = MatmulPrecision::kMedium;
  if (!Bf16ProductsAvailable()) {
    const at::Tensor x = at::randn({3, 64}), w = at::randn({9, 64}).to(at::kBFloat16), none;
    // No AVX-512 BF16 selected here: medium computes as highest, which is what is asserted.
    EXPECT_TRUE(at::equal(Linear(x, w, none, medium), Linear(x, w, none)));
    return;
  }
  at::manual_seed(12);
  for (int64_t m : {1, 3, 4, 17, 60}) {
    for (int64_t k : {7, 33, 100, 128, 2048, 2100}) {
      at::Tensor wide = at::randn({m, k + 3});
      const at::Tensor x = wide.narrow(1, 1, k);
      const at::Tensor w = at::randn({53, k}).to(at::kBFloat16);
      const at::Tensor b = at::randn({53});
      const at::Tensor y = Linear(x, w, b, medium);
      ASSERT_TRUE(y.defined()) << m << "x" << k;
      const at::Tensor xr = x.to(at::kBFloat16).to(at::kDouble), wd = w.to(at::kDouble);
      const at::Tensor want = at::linear(xr, wd, b.to(at::kDouble));
      const at::Tensor magnitude = at::linear(xr.abs(), wd.abs()) + b.to(at::kDouble).abs();
      const at::Tensor err = (y.to(at::kDouble) - want).abs();
      const double sum_bound = (static_cast<double>(k) / 128 + 40) * std::ldexp(1.0, -24);
      EXPECT_TRUE((err <= sum_bound * magnitude).all().item<bool>())
          << m << "x" << k << ": worst " << (err / magnitude).max().item<double>()
          << " of the magnitude";
      const at::Tensor exact = at::linear(x.to(at::kDouble), wd, b.to(at::kDouble));
      const at::Tensor highest_err = (Linear(x, w, b).to(at::kDouble) - exact).abs();
      const at::Tensor medium_err = (y.to(at::kDouble) - exact).abs();
      EXPECT_TRUE((medium_err <= (std::ldexp(1.01, -8) + sum_bound) * magnitude).all().item<bool>())
          << m << "x" << k;
      if (k >= 100) {  // x's rounding shows (few short sums might round alike).
        EXPECT_GT(medium_err.max().item<double>(), highest_err.max().item<double>())
            << m << "x" << k;
      }
      for (int64_t i = 0; i < m; i += 5) {
        EXPECT_TRUE(at::equal(y.narrow(0, i, 1), Linear(x.narrow(0, i, 1), w, b, medium)))
            << m << "x" << k << " row " << i;
      }
    }
  }
}

// medium changes bfloat16 weights only: float32 and float16 ones give highest's bits, and a
// group sharing x gives each matrix's own result (x rounded once for all of them).
TEST_P(LinearTest, MediumPrecisionLeavesOtherDtypesAloneAndSharesItsRounding) {
  at::manual_seed(13);
  const at::Tensor x = at::randn({5, 192}), none;
  const at::Tensor w32 = at::randn({40, 192}), w16 = at::randn({30, 192}).to(at::kHalf);
  const at::Tensor wb = at::randn({50, 192}).to(at::kBFloat16), b = at::randn({50});
  const MatmulPrecision medium = MatmulPrecision::kMedium;
  EXPECT_TRUE(at::equal(Linear(x, w32, none, medium), Linear(x, w32, none)));
  EXPECT_TRUE(at::equal(Linear(x, w16, none, medium), Linear(x, w16, none)));
  const std::vector<at::Tensor> group =
      LinearShared(x, {{&w32, &none}, {&wb, &b}, {&w16, &none}}, medium);
  ASSERT_EQ(group.size(), 3u);
  EXPECT_TRUE(at::equal(group[0], Linear(x, w32, none)));
  EXPECT_TRUE(at::equal(group[1], Linear(x, wb, b, medium)));
  EXPECT_TRUE(at::equal(group[2], Linear(x, w16, none)));
  MatmulPrecision p = MatmulPrecision::kMedium;
  EXPECT_TRUE(MatmulPrecisionFromName("high", &p));
  EXPECT_EQ(p, MatmulPrecision::kHighest);
  EXPECT_TRUE(MatmulPrecisionFromName("medium", &p));
  EXPECT_EQ(p, MatmulPrecision::kMedium);
  EXPECT_TRUE(MatmulPrecisionFromName("highest", &p));
  EXPECT_EQ(p, MatmulPrecision::kHighest);
  EXPECT_FALSE(MatmulPrecisionFromName("low", &p));
  EXPECT_FALSE(MatmulPrecisionFromName("", &p));
  // Only AVX-512 (with BF16) runs it: AVX2 selected computes as highest.
  if (GetParam() == Isa::kAvx2) {
    EXPECT_FALSE(Bf16ProductsAvailable());
    EXPECT_TRUE(at::equal(group[1], Linear(x, wb, b)));
  }
}

// int8 weights with a scale per block of 32 inputs: each weight is widened to float(q)·scale,
// so every output equals Linear() over that dequantized float32 matrix (built here by ATen's
// own int8 → float conversion and product), few rows and many, with a row-strided x.
TEST_P(LinearTest, Int8WeightsEqualTheirDequantizedFloat32CopyBitForBit) {
  at::manual_seed(11);
  for (int64_t m : {1, 3, 4, 5, 17, 300}) {
    for (int64_t k : {32, 96, 768}) {
      for (int64_t n : {1, 7, 101}) {
        const at::Tensor x = at::randn({m, k + 5}).narrow(1, 2, k);
        const at::Tensor q = at::randint(-127, 128, {n, k}, at::kChar);
        const at::Tensor scales = at::rand({n, k / 32}) * 0.05;
        const at::Tensor dequantized = q.to(at::kFloat) * scales.repeat_interleave(32, 1);
        const at::Tensor b = at::randn({n});
        for (bool with_bias : {false, true}) {
          const at::Tensor bias = with_bias ? b : at::Tensor();
          const at::Tensor y = LinearInt8(x, q, scales, bias);
          const at::Tensor want = Linear(x, dequantized, bias);
          ASSERT_TRUE(y.defined() && want.defined()) << m << "x" << k << "x" << n;
          EXPECT_TRUE(at::equal(y, want)) << m << "x" << k << "x" << n << " bias " << with_bias;
          // And near the product in double, so the two paths are not wrong together.
          const at::Tensor exact = at::linear(x.to(at::kDouble), dequantized.to(at::kDouble),
                                              with_bias ? b.to(at::kDouble) : at::Tensor());
          const at::Tensor bound = at::linear(x.abs().to(at::kDouble), dequantized.abs().to(at::kDouble),
                                              with_bias ? b.abs().to(at::kDouble) : at::Tensor());
          EXPECT_TRUE(((y.to(at::kDouble) - exact).abs() <= 1e-5 * bound).all().item<bool>())
              << m << "x" << k << "x" << n;
        }
      }
    }
  }
}

TEST_P(LinearTest, Int8DeclinesWhatItCannotTake) {
  const at::Tensor q = at::randint(-127, 128, {8, 64}, at::kChar);
  const at::Tensor scales = at::rand({8, 2});
  EXPECT_TRUE(LinearInt8(at::randn({2, 64}), q, scales, at::Tensor()).defined());
  EXPECT_FALSE(LinearInt8(at::randn({2, 64}), q, at::rand({8, 3}), at::Tensor()).defined());
  EXPECT_FALSE(LinearInt8(at::randn({2, 64}), q, at::rand({7, 2}), at::Tensor()).defined());
  EXPECT_FALSE(LinearInt8(at::randn({2, 64}), q, scales.to(at::kDouble), at::Tensor()).defined());
  EXPECT_FALSE(LinearInt8(at::randn({2, 64}), q.to(at::kFloat), scales, at::Tensor()).defined());
  EXPECT_FALSE(LinearInt8(at::randn({2, 48}), at::randint(-127, 128, {8, 48}, at::kChar), at::rand({8, 1}),
                          at::Tensor()).defined());  // Not whole blocks.
  EXPECT_FALSE(LinearInt8(at::randn({2, 64}), q, scales, at::randn({7})).defined());
}

// bfloat16 [n, k] with the high bytes of real weights (normal, std 0.02) plus what a packed
// row's table cannot hold: a few outliers of other exponents and signs, zeros, subnormals,
// infinities and NaNs, so rows have escapes.
at::Tensor WeightsWithEscapes(int64_t n, int64_t k, int64_t ld) {
  at::Tensor w = (at::randn({n, ld}) * 0.02).to(at::kBFloat16);
  const at::Tensor odd =
      at::randint(0, 65536, {n, ld}, at::kInt).to(at::kShort).view(at::kBFloat16);
  w = at::where(at::rand({n, ld}) < 0.01, odd, w);
  w.narrow(1, 0, std::min<int64_t>(ld, 3)).zero_();
  return w.narrow(1, 0, k);
}

// The packed layout read back as cpu_kernels_isa.h documents it, one weight at a time.
std::vector<uint16_t> DecodeAsDocumented(const PackedBf16& p, int64_t row) {
  const uint8_t* b = p.blocks[row].contiguous().data_ptr<uint8_t>();
  const uint8_t* table = p.tables.data_ptr<uint8_t>() + 16 * row;
  std::vector<uint16_t> out(static_cast<size_t>(p.k));
  for (int64_t j = 0; j < p.k; ++j) {
    const int64_t block = j / 128, t = j % 128, h = t / 64, u = t / 32 % 2, r = t % 32;
    const int64_t pos = 16 * (r / 8) + 8 * u + r % 8;
    const uint8_t* blk = b + 192 * block;
    const int code = h == 0 ? blk[pos] & 0x0F : blk[pos] >> 4;
    out[j] = static_cast<uint16_t>(table[code] << 8 | blk[64 + 64 * h + pos]);
    if (code == 15) out[j] = 0xFFFF;  // Must be an escape: marked until the list fills it.
  }
  const int64_t* offsets = p.escape_offsets.data_ptr<int64_t>();
  for (int64_t e = offsets[row]; e < offsets[row + 1]; ++e) {
    const int64_t j = p.escape_pos.data_ptr<int32_t>()[e];
    EXPECT_EQ(out[j], 0xFFFF) << "escape at " << j << " of row " << row << " has a code";
    out[j] = static_cast<uint16_t>(p.escape_values.data_ptr<int16_t>()[e]);
  }
  return out;
}

std::vector<uint16_t> Bits(const at::Tensor& row) {
  const at::Tensor c = row.contiguous();
  const uint16_t* p = reinterpret_cast<const uint16_t*>(c.data_ptr<at::BFloat16>());
  return std::vector<uint16_t>(p, p + c.numel());
}

// --quantize bf16_packed: every bit pattern comes back, through the kernel's decoder (AVX-512)
// or the portable one, and the layout is the documented one.
TEST_P(LinearTest, PackedBfloat16KeepsEveryBit) {
  at::manual_seed(21);
  std::vector<at::Tensor> cases = {
      WeightsWithEscapes(37, 256, 256), WeightsWithEscapes(9, 384, 400),
      at::randint(0, 65536, {5, 128}, at::kInt)
          .to(at::kShort)
          .view(at::kBFloat16),  // Any bits: many escapes.
      at::zeros({3, 128}, at::kBFloat16), at::full({2, 256}, -1.5, at::kBFloat16)};
  // Rows of exactly 15 and 16 distinct high bytes (the table holds 15).
  for (int distinct : {15, 16}) {
    at::Tensor hi = at::arange(0, 128, at::kInt).remainder(distinct).mul(0x0100).add(0x3C05);
    cases.push_back(hi.to(at::kShort).view(at::kBFloat16).unsqueeze(0));
  }
  for (const at::Tensor& w : cases) {
    ASSERT_TRUE(PackBf16Takes(w));
    const PackedBf16 p = PackBf16(w);
    const int64_t n = w.size(0), k = w.size(1);
    ASSERT_EQ(p.rows(), n);
    EXPECT_EQ(p.bytes(), n * k * 3 / 2 + 16 * n + 8 * (n + 1) + 6 * p.escapes());
    EXPECT_TRUE(at::equal(UnpackBf16(p, 0, n).view(at::kShort), w.contiguous().view(at::kShort)));
    if (n > 2) {
      EXPECT_TRUE(at::equal(UnpackBf16(p, 1, n - 2).view(at::kShort),
                            w.narrow(0, 1, n - 2).contiguous().view(at::kShort)));
    }
    for (int64_t r = 0; r < n; ++r) ASSERT_EQ(DecodeAsDocumented(p, r), Bits(w[r])) << "row " << r;
  }
  // The table holds a row's 15 most frequent high bytes: normal weights escape rarely, a row of
  // 16 equally frequent bytes escapes exactly one byte's weights, arbitrary bits very often.
  EXPECT_LT(PackBf16(cases[0]).escapes(), 37 * 256 / 50);
  EXPECT_EQ(PackBf16(cases[5]).escapes(), 0);
  EXPECT_EQ(PackBf16(cases[6]).escapes(), 8);
  EXPECT_GT(PackBf16(cases[2]).escapes(), 5 * 128 / 2);
  EXPECT_FALSE(PackBf16Takes(at::randn({4, 128})));
  EXPECT_FALSE(PackBf16Takes(at::randn({4, 96}).to(at::kBFloat16)));
  EXPECT_FALSE(PackBf16Takes(at::randn({128}).to(at::kBFloat16)));
  EXPECT_FALSE(PackBf16Takes(at::randn({128, 4}).to(at::kBFloat16).t()));
}

// The packed kernel computes exactly what Linear() computes over the unpacked matrix, for one
// row (decoded in registers) and several (decoded into a buffer), with and without a bias, at
// both precisions, alone and shared.
TEST_P(LinearTest, PackedBfloat16EqualsTheUnpackedMatrixBitForBit) {
  at::manual_seed(22);
  const bool kernel = PackedKernelAvailable();
  EXPECT_EQ(kernel, GetParam() == Isa::kAvx512 && SupportedIsa() == Isa::kAvx512 &&
                        __builtin_cpu_supports("avx512bw"));
  for (int64_t k : {128, 384, 2048}) {
    for (int64_t n : {1, 7, 101}) {
      const at::Tensor w = WeightsWithEscapes(n, k, k + 64);
      // NaN and infinity weights would make every product NaN; keep the escapes finite here.
      const at::Tensor finite = at::where(w.isfinite(), w, at::zeros_like(w));
      const PackedBf16 p = PackBf16(finite);
      const at::Tensor b = at::randn({n});
      for (int64_t m : {1, 2, 5, 17, 100}) {
        const at::Tensor x = at::randn({m, k + 3}).narrow(1, 1, k);
        for (MatmulPrecision precision : {MatmulPrecision::kHighest, MatmulPrecision::kMedium}) {
          for (bool with_bias : {false, true}) {
            const at::Tensor bias = with_bias ? b : at::Tensor();
            std::vector<at::Tensor> y = LinearPacked(x, {PackedMatrix{&p, &bias}}, precision);
            if (!kernel) {
              EXPECT_TRUE(y.empty());
              continue;
            }
            ASSERT_EQ(y.size(), 1u);
            const at::Tensor want = Linear(x, finite, bias, precision);
            ASSERT_TRUE(want.defined());
            EXPECT_TRUE(at::equal(y[0], want))
                << m << "x" << k << "x" << n << " bias " << with_bias << " medium "
                << (precision == MatmulPrecision::kMedium);
          }
        }
      }
    }
  }
  if (!kernel) return;
  const int64_t k = 256;
  std::vector<at::Tensor> ws;
  std::vector<PackedBf16> ps;
  for (int64_t n : {64, 8, 200}) {
    const at::Tensor w = WeightsWithEscapes(n, k, k);
    ws.push_back(at::where(w.isfinite(), w, at::zeros_like(w)));
  }
  for (const at::Tensor& w : ws) ps.push_back(PackBf16(w));
  const at::Tensor none, x = at::randn({1, k});
  const std::vector<at::Tensor> y = LinearPacked(
      x, {{&ps[0], &none}, {&ps[1], &none}, {&ps[2], &none}}, MatmulPrecision::kMedium);
  ASSERT_EQ(y.size(), 3u);
  for (size_t i = 0; i < ws.size(); ++i) {
    EXPECT_TRUE(at::equal(y[i], Linear(x, ws[i], none, MatmulPrecision::kMedium))) << i;
  }
  // What it declines: x of another width or dtype, a bias of the wrong length.
  EXPECT_TRUE(
      LinearPacked(at::randn({1, k + 128}), {{&ps[0], &none}}, MatmulPrecision::kHighest).empty());
  EXPECT_TRUE(
      LinearPacked(x.to(at::kDouble), {{&ps[0], &none}}, MatmulPrecision::kHighest).empty());
  const at::Tensor short_bias = at::randn({63});
  EXPECT_TRUE(LinearPacked(x, {{&ps[0], &short_bias}}, MatmulPrecision::kHighest).empty());
}

// w8a8 written from its definition, one scalar at a time: x's rows quantized per block of 32
// (s = max|x| / 127, q = round-half-even(x / s) as x·(1/s)), integer block sums, then per block
// acc = fma(float(sum), xs·ws, acc) in order, plus the bias.
at::Tensor W8A8Reference(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& b) {
  const int64_t m = x.size(0), k = x.size(1), n = q.size(0), blocks = k / 32;
  at::Tensor y = at::empty({m, n});
  auto xa = x.accessor<float, 2>();
  auto qa = q.accessor<int8_t, 2>();
  auto sa = scales.accessor<float, 2>();
  for (int64_t i = 0; i < m; ++i) {
    std::vector<int> xq(k);
    std::vector<float> xs(blocks);
    for (int64_t bl = 0; bl < blocks; ++bl) {
      float amax = 0;
      for (int64_t t = 0; t < 32; ++t) amax = std::max(amax, std::fabs(xa[i][bl * 32 + t]));
      xs[bl] = amax / 127.0f;
      const float inverse = xs[bl] > 0 ? 1.0f / xs[bl] : 0.0f;
      for (int64_t t = 0; t < 32; ++t) {
        const float v = std::nearbyint(xa[i][bl * 32 + t] * inverse);
        xq[bl * 32 + t] = static_cast<int>(std::min(127.0f, std::max(-127.0f, v)));
      }
    }
    for (int64_t o = 0; o < n; ++o) {
      float acc = 0;
      for (int64_t bl = 0; bl < blocks; ++bl) {
        int32_t sum = 0;
        for (int64_t t = bl * 32; t < (bl + 1) * 32; ++t) sum += xq[t] * qa[o][t];
        acc = std::fma(static_cast<float>(sum), xs[bl] * sa[o][bl], acc);
      }
      y[i][o] = b.defined() ? acc + b[o].item<float>() : acc;
    }
  }
  return y;
}

// The panels of q [n, k] and scales [n, k / 32] (cpu_kernels_isa.h), element by element.
std::pair<at::Tensor, at::Tensor> Panels(const at::Tensor& q, const at::Tensor& scales) {
  const int64_t n = q.size(0), k = q.size(1), count = (n + 7) / 8;
  at::Tensor panels = at::zeros({count, k / 4, 8, 4}, at::kChar);
  at::Tensor panel_scales = at::zeros({count, k / 32, 8});
  auto pa = panels.accessor<int8_t, 4>();
  auto ps = panel_scales.accessor<float, 3>();
  auto qa = q.accessor<int8_t, 2>();
  auto sa = scales.accessor<float, 2>();
  for (int64_t o = 0; o < n; ++o) {
    for (int64_t t = 0; t < k; ++t) pa[o / 8][t / 4][o % 8][t % 4] = qa[o][t];
    for (int64_t bl = 0; bl < k / 32; ++bl) ps[o / 8][bl][o % 8] = sa[o][bl];
  }
  return {panels, panel_scales};
}

// The w8a8 kernel (each of them: AVX2's, and VNNI's where the CPU has it) equals its scalar
// definition bit for bit (the block sums are exact integers and the float steps are the same
// operations), for row counts below and past the kernels' row tiles (2 and 4), runs of
// panels the VNNI kernel takes four at a time in 512-bit vectors (with a short last panel
// inside a run, n = 30, and outside, n = 101) or one by one, outputs that leave a short last panel, a row-strided x, with and without a bias;
// and it stays near the float32 product of x and the dequantized weights.
TEST_P(LinearTest, W8A8EqualsItsDefinitionBitForBit) {
  at::manual_seed(12);
  for (int64_t m : {1, 2, 3, 6, 17, 40}) {
    for (int64_t k : {32, 96, 768}) {
      for (int64_t n : {1, 7, 8, 9, 30, 101}) {
        at::Tensor x = at::randn({m, k + 5}).narrow(1, 2, k);
        x[0].narrow(0, 0, 32).zero_();  // An all-zero block: scale 0.
        const at::Tensor q = at::randint(-127, 128, {n, k}, at::kChar);
        const at::Tensor scales = at::rand({n, k / 32}) * 0.05;
        const auto [panels, panel_scales] = Panels(q, scales);
        const at::Tensor b = at::randn({n});
        for (bool with_bias : {false, true}) {
          const at::Tensor bias = with_bias ? b : at::Tensor();
          const at::Tensor y = LinearW8A8(x, panels, panel_scales, n, bias);
          ASSERT_TRUE(y.defined()) << m << "x" << k << "x" << n;
          EXPECT_TRUE(at::equal(y, W8A8Reference(x.contiguous(), q, scales, bias)))
              << m << "x" << k << "x" << n << " bias " << with_bias;
          // Quantizing x costs at most half a step (s / 2) per input: bounded by the sum of
          // |w|·s/2 over k (in double, against the dequantized weights).
          const at::Tensor dequantized = (q.to(at::kFloat) * scales.repeat_interleave(32, 1)).to(at::kDouble);
          const at::Tensor exact = at::linear(x.to(at::kDouble), dequantized, with_bias ? b.to(at::kDouble) : at::Tensor());
          const at::Tensor step = x.abs().view({m, k / 32, 32}).amax(-1).div(127.0).repeat_interleave(32, 1);
          const at::Tensor bound = at::linear(step.to(at::kDouble) * 0.5, dequantized.abs()) + 1e-4;
          EXPECT_TRUE(((y.to(at::kDouble) - exact).abs() <= bound).all().item<bool>()) << m << "x" << k << "x" << n;
        }
      }
    }
  }
}

TEST_P(LinearTest, W8A8DeclinesWhatItCannotTake) {
  const auto [panels, scales] = Panels(at::randint(-127, 128, {12, 64}, at::kChar), at::rand({12, 2}));
  EXPECT_TRUE(LinearW8A8(at::randn({2, 64}), panels, scales, 12, at::Tensor()).defined());
  EXPECT_TRUE(LinearW8A8(at::randn({2, 64}), panels, scales, 9, at::Tensor()).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}), panels, scales, 17, at::Tensor()).defined());  // 3 panels.
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}), panels, scales, 8, at::Tensor()).defined());   // 1 panel.
  EXPECT_FALSE(LinearW8A8(at::randn({2, 96}), panels, scales, 12, at::Tensor()).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}).to(at::kDouble), panels, scales, 12, at::Tensor()).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}), panels.to(at::kFloat), scales, 12, at::Tensor()).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}), panels, scales.to(at::kDouble), 12, at::Tensor()).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({2, 64}), panels, scales, 12, at::randn({11})).defined());
  EXPECT_FALSE(LinearW8A8(at::randn({64, 2}).t(), panels, scales, 12, at::Tensor()).defined());  // Strided k.
}

// Several matrices by one x (a layer's q, k and v) in one pass: each result equals that
// matrix's own LinearW8A8() bit for bit (which the test above ties to the definition), for
// decode and prefill row counts, groups whose panel counts are not multiples of a task (so
// tasks would straddle matrices if they were not kept apart: 1, 3, 7, 13 panels), biases on
// some and not others, and a group on which the work is too small to go parallel.
TEST_P(LinearTest, W8A8SharedEqualsEachMatrixAlone) {
  at::manual_seed(13);
  for (int64_t m : {1, 2, 5, 16, 40}) {
    for (int64_t k : {32, 768}) {
      const at::Tensor x = at::randn({m, k + 3}).narrow(1, 1, k);
      std::vector<int64_t> outs = {100, 8, 57, 21};
      std::vector<at::Tensor> panels, scales, biases;
      for (size_t i = 0; i < outs.size(); ++i) {
        auto [p, s] = Panels(at::randint(-127, 128, {outs[i], k}, at::kChar), at::rand({outs[i], k / 32}) * 0.05);
        panels.push_back(p);
        scales.push_back(s);
        biases.push_back(i % 2 == 0 ? at::randn({outs[i]}) : at::Tensor());
      }
      std::vector<W8A8Matrix> group;
      for (size_t i = 0; i < outs.size(); ++i) group.push_back({&panels[i], &scales[i], outs[i], &biases[i]});
      const std::vector<at::Tensor> y = LinearW8A8Shared(x, group);
      ASSERT_EQ(y.size(), outs.size()) << m << "x" << k;
      for (size_t i = 0; i < outs.size(); ++i) {
        const at::Tensor alone = LinearW8A8(x, panels[i], scales[i], outs[i], biases[i]);
        ASSERT_TRUE(alone.defined());
        EXPECT_TRUE(at::equal(y[i], alone)) << m << "x" << k << " matrix " << i;
      }
    }
  }
  // Any matrix the kernel cannot take declines the group.
  const auto [p, s] = Panels(at::randint(-127, 128, {12, 64}, at::kChar), at::rand({12, 2}));
  const at::Tensor none, wrong_bias = at::randn({11}), other_panels = p.to(at::kFloat);
  EXPECT_EQ(LinearW8A8Shared(at::randn({2, 64}), {{&p, &s, 12, &none}, {&p, &s, 12, &none}}).size(), 2u);
  EXPECT_TRUE(LinearW8A8Shared(at::randn({2, 64}), {{&p, &s, 12, &none}, {&p, &s, 12, &wrong_bias}}).empty());
  EXPECT_TRUE(LinearW8A8Shared(at::randn({2, 64}), {{&p, &s, 12, &none}, {&other_panels, &s, 12, &none}}).empty());
  EXPECT_TRUE(LinearW8A8Shared(at::randn({2, 64}), {{&p, &s, 12, &none}, {&p, &s, 17, &none}}).empty());
  EXPECT_TRUE(LinearW8A8Shared(at::randn({2, 96}), {{&p, &s, 12, &none}}).empty());
  EXPECT_TRUE(LinearW8A8Shared(at::randn({2, 64}), {}).empty());
}

// The parallel passes split a matrix's outputs into shares, one per thread, and a thread whose
// share is done takes the others' remaining blocks: with any number of threads (more than the
// blocks, odd counts, more than the cores) every output is computed once and equals the
// one-thread result bit for bit, for float, bfloat16 and w8a8 matrices and a shared pass.
TEST_P(LinearTest, AnyThreadCountGivesTheOneThreadBits) {
  at::manual_seed(21);
  const int previous = at::get_num_threads();
  const int64_t k = 768;
  const at::Tensor w = at::randn({1000, k}), w2 = at::randn({150, k}), b = at::randn({1000});
  const at::Tensor w_bf16 = w.to(at::kBFloat16);
  const auto [panels, scales] = Panels(at::randint(-127, 128, {1000, k}, at::kChar), at::rand({1000, k / 32}) * 0.05);
  const at::Tensor none;
  for (int64_t m : {1, 5}) {
    const at::Tensor x = at::randn({m, k});
    auto run = [&] {
      std::vector<at::Tensor> y = {Linear(x, w, b), Linear(x, w_bf16, none),
                                   LinearW8A8(x, panels, scales, 1000, b)};
      for (const at::Tensor& t : LinearShared(x, {{&w, &b}, {&w2, &none}})) y.push_back(t);
      return y;
    };
    at::set_num_threads(1);
    const std::vector<at::Tensor> one = run();
    ASSERT_EQ(one.size(), 5u);
    for (const at::Tensor& t : one) ASSERT_TRUE(t.defined());
    const at::Tensor want = at::linear(x.to(at::kDouble), w.to(at::kDouble), b.to(at::kDouble));
    EXPECT_LT((one[0].to(at::kDouble) - want).abs().max().item<double>(), 1e-3);
    for (int threads : {2, 3, 5, 8, 40}) {
      at::set_num_threads(threads);
      const std::vector<at::Tensor> many = run();
      ASSERT_EQ(many.size(), one.size());
      for (size_t i = 0; i < one.size(); ++i) {
        EXPECT_TRUE(at::equal(many[i], one[i])) << "m " << m << ", " << threads << " threads, result " << i;
      }
    }
  }
  at::set_num_threads(previous);
}

// A layer's projections of one x in one parallel pass: matrices of every weight dtype and of
// sizes that are and are not multiples of a task's 48 outputs, with and without biases, rows
// few and many, k short and long enough for the parallel pass. Each result equals that
// matrix's own Linear() (a pass of its own, split differently) bit for bit, and is the
// product ATen computes up to float32 rounding.
TEST_P(LinearTest, SharedEqualsEachMatrixAlone) {
  at::manual_seed(14);
  for (int64_t m : {1, 3, 17, 100}) {
    for (int64_t k : {40, 773}) {
      const at::Tensor x = at::randn({m, k + 3}).narrow(1, 1, k);
      const std::vector<int64_t> outs = {100, 7, 48, 257};
      const std::vector<at::ScalarType> types = {at::kBFloat16, at::kFloat, at::kHalf, at::kFloat};
      std::vector<at::Tensor> ws, biases;
      for (size_t i = 0; i < outs.size(); ++i) {
        ws.push_back(at::randn({outs[i], k}).to(types[i]));
        biases.push_back(i % 2 == 0 ? at::randn({outs[i]}) : at::Tensor());
      }
      std::vector<LinearMatrix> group;
      for (size_t i = 0; i < outs.size(); ++i) group.push_back({&ws[i], &biases[i]});
      const std::vector<at::Tensor> y = LinearShared(x, group);
      ASSERT_EQ(y.size(), outs.size()) << m << "x" << k;
      for (size_t i = 0; i < outs.size(); ++i) {
        const at::Tensor alone = Linear(x, ws[i], biases[i]);
        ASSERT_TRUE(alone.defined());
        EXPECT_TRUE(at::equal(y[i], alone)) << m << "x" << k << " matrix " << i;
        const at::Tensor want = at::linear(x, ws[i].to(at::kFloat), biases[i]);
        EXPECT_TRUE(at::allclose(y[i], want, 1e-4, 1e-4)) << m << "x" << k << " matrix " << i;
      }
    }
  }
  // Any matrix the kernel cannot take declines the group.
  const at::Tensor w = at::randn({12, 64}), none, wrong_bias = at::randn({11});
  const at::Tensor other_k = at::randn({12, 32}), doubles = w.to(at::kDouble);
  EXPECT_EQ(LinearShared(at::randn({2, 64}), {{&w, &none}, {&w, &none}}).size(), 2u);
  EXPECT_TRUE(LinearShared(at::randn({2, 64}), {{&w, &none}, {&w, &wrong_bias}}).empty());
  EXPECT_TRUE(LinearShared(at::randn({2, 64}), {{&w, &none}, {&other_k, &none}}).empty());
  EXPECT_TRUE(LinearShared(at::randn({2, 64}), {{&w, &none}, {&doubles, &none}}).empty());
  EXPECT_TRUE(LinearShared(at::randn({2, 64}), {}).empty());
}

TEST_P(LinearTest, DeclinesWhatItCannotTake) {
  at::Tensor w = at::randn({8, 16});
  EXPECT_FALSE(Linear(at::randn({kLinearMaxRows + 1, 16}), w, at::Tensor()).defined());
  // Past 48 rows, an x larger than kLinearMaxInputBytes goes to BLAS; 48 rows always fit.
  const int64_t wide = kLinearMaxInputBytes / (49 * 4) + 1;
  const at::Tensor w_wide = at::randn({8, wide});
  EXPECT_FALSE(Linear(at::randn({49, wide}), w_wide, at::Tensor()).defined());
  EXPECT_TRUE(Linear(at::randn({48, wide}), w_wide, at::Tensor()).defined());
  EXPECT_TRUE(Linear(at::randn({1000, 16}), w, at::Tensor()).defined());
  EXPECT_FALSE(Linear(at::randn({2, 16}, at::kDouble), w.to(at::kDouble), at::Tensor()).defined());
  EXPECT_FALSE(Linear(at::randn({16, 2}).t(), w, at::Tensor()).defined());  // Strided along k.
  EXPECT_FALSE(Linear(at::randn({2, 15}), w, at::Tensor()).defined());
  EXPECT_FALSE(Linear(at::randn({2, 16}), w, at::randn({7})).defined());
  EXPECT_TRUE(Linear(at::randn({2, 16}), w, at::randn({8})).defined());
}

INSTANTIATE_TEST_SUITE_P(Isas, LinearTest, ::testing::Values(Isa::kAvx2, Isa::kAvx512),
                         IsaParamName);

class CachedAttentionTest : public IsaTest {};

// Attention of one query vector over keys/values [n, d] in double: softmax(scale·q·kᵀ)·v.
std::vector<double> Attention(const float* q, const at::Tensor& keys, const at::Tensor& values,
                              double scale) {
  const int64_t n = keys.size(0), d = keys.size(1);
  auto k = keys.accessor<float, 2>();
  auto v = values.accessor<float, 2>();
  std::vector<double> s(n);
  double max = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) dot += static_cast<double>(q[i]) * k[j][i];
    s[j] = dot * scale;
    max = std::max(max, s[j]);
  }
  double z = 0;
  for (double& e : s) z += (e = std::exp(e - max));
  std::vector<double> o(d, 0.0);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = 0; i < d; ++i) o[i] += s[j] / z * v[j][i];
  }
  return o;
}

// A cache of `past` random positions in each of `layers` layers.
std::unique_ptr<KvCache> RandomCache(int64_t layers, int64_t kv_heads, int64_t head_dim, int64_t past,
                                     at::ScalarType dtype) {
  auto cache = std::make_unique<KvCache>(layers, kv_heads, head_dim, 4, at::TensorOptions().dtype(dtype));
  if (past > 0) {
    for (int64_t layer = 0; layer < layers; ++layer) {
      cache->Append(layer, at::randn({kv_heads, past, head_dim}), at::randn({kv_heads, past, head_dim}));
    }
    cache->Commit(past);
  }
  return cache;
}

// Runs rows of 1 (decode) to 40 (prefill chunks, past a key tile) new positions with different
// pasts, grouped heads, windows and odd head sizes over caches of `kv_dtype`, and checks every
// output against the formula in double over what the cache holds up to that position, and
// every stored key and value against ATen's conversion of the row's own.
void CheckCachedAttention(at::ScalarType kv_dtype) {
  at::manual_seed(9);
  struct Case {
    int64_t heads, kv_heads, head_dim, window;
  };
  const Case cases[] = {{4, 4, 64, 0}, {8, 2, 24, 0}, {6, 3, 20, 5}, {2, 1, 7, 3}, {32, 2, 16, 0}};
  for (const Case& c : cases) {
    // Rows with different pasts (0 = the first position), each continuing its own cache.
    const std::vector<int64_t> pasts = {0, 3, 9, 17, 70, 0};
    const std::vector<int64_t> lengths = {1, 1, 5, 1, 40, 19};
    std::vector<std::unique_ptr<KvCache>> caches;
    for (int64_t past : pasts) caches.push_back(RandomCache(2, c.kv_heads, c.head_dim, past, kv_dtype));
    const int64_t rows = static_cast<int64_t>(pasts.size());
    // Rows sit among other tokens of a packed batch: one unrelated token before each.
    std::vector<int64_t> index;
    int64_t n = 0;
    for (int64_t r = 0; r < rows; ++r) {
      index.push_back(n + 1);
      n += 1 + lengths[r];
    }
    at::Tensor q = at::randn({n, c.heads * c.head_dim});
    at::Tensor kv = at::randn({n, 3 * c.kv_heads * c.head_dim});  // k and v inside.
    at::Tensor k = kv.narrow(1, 0, c.kv_heads * c.head_dim);
    at::Tensor v = kv.narrow(1, 2 * c.kv_heads * c.head_dim, c.kv_heads * c.head_dim);
    at::Tensor out = at::zeros({n, c.heads * c.head_dim});
    std::vector<CachedRow> cached;
    for (int64_t r = 0; r < rows; ++r) cached.push_back({index[r], caches[r].get(), lengths[r]});
    ASSERT_TRUE(CachedAttentionApplies(q, k, v, out));
    ASSERT_TRUE(KvCacheApplies(*caches[0]));
    const double scale = 1.0 / std::sqrt(static_cast<double>(c.head_dim));
    const int64_t layer = 1;
    CachedAttention(layer, q, k, v, cached, c.heads, c.kv_heads, c.head_dim, scale, c.window, out);
    const int64_t group = c.heads / c.kv_heads;
    for (int64_t r = 0; r < rows; ++r) {
      KvCache& cache = *caches[r];
      EXPECT_EQ(cache.length(), pasts[r]) << "the kernel must not commit";
      for (int64_t p = 0; p < lengths[r]; ++p) {
        const int64_t row = index[r] + p;
        const int64_t total = pasts[r] + p + 1;
        const int64_t first = c.window > 0 ? std::max<int64_t>(0, total - c.window) : 0;
        for (int64_t h = 0; h < c.heads; ++h) {
          const int64_t kvh = h / group;
          // The new key and value were stored at position past + p of this row's cache,
          // converted as ATen converts (bfloat16: rounded to nearest even).
          at::Tensor stored_k = cache.Read(layer, pasts[r] + p, 1).first[kvh][0];
          at::Tensor stored_v = cache.Read(layer, pasts[r] + p, 1).second[kvh][0];
          EXPECT_TRUE(at::equal(stored_k, k[row].narrow(0, kvh * c.head_dim, c.head_dim).to(kv_dtype)));
          EXPECT_TRUE(at::equal(stored_v, v[row].narrow(0, kvh * c.head_dim, c.head_dim).to(kv_dtype)));
          auto [cached_keys, cached_values] = cache.Read(layer, first, total - first);
          at::Tensor keys = cached_keys[kvh].to(at::kFloat).contiguous();
          at::Tensor values = cached_values[kvh].to(at::kFloat).contiguous();
          const float* qh = q[row].data_ptr<float>() + h * c.head_dim;
          std::vector<double> want = Attention(qh, keys, values, scale);
          const float* got = out[row].data_ptr<float>() + h * c.head_dim;
          for (int64_t i = 0; i < c.head_dim; ++i) {
            ASSERT_NEAR(got[i], want[i], 1e-5) << "row " << r << " position " << p << " head " << h << " dim " << i;
          }
        }
      }
      // Tokens that are not this call's are left alone.
      EXPECT_EQ(out[index[r] - 1].abs().sum().item<float>(), 0.0f);
    }
  }
}

TEST_P(CachedAttentionTest, MatchesTheFormulaWithGroupedHeadsWindowsAndOddHeadSizes) {
  CheckCachedAttention(at::kFloat);
}

// --kv_cache_dtype bfloat16: the kernel writes the new keys and values rounded and reads the
// cache widened, accumulating in float32.
TEST_P(CachedAttentionTest, ReadsAndWritesBfloat16Caches) { CheckCachedAttention(at::kBFloat16); }
TEST_P(CachedAttentionTest, ReadsAndWritesFloat16Caches) { CheckCachedAttention(at::kHalf); }

// A prompt's outputs do not depend on how it is split: 45 positions at once, in chunks of
// 16 + 16 + 13, and one at a time (as decode rows) give the same bits, with and without a
// window, over float32, bfloat16 and float16 caches.
TEST_P(CachedAttentionTest, ChunksAndSinglePositionsGiveTheSameBits) {
  at::manual_seed(21);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t window : {int64_t{0}, int64_t{7}}) {
      const int64_t heads = 8, kv_heads = 2, d = 40, t = 45, past = 30;
      at::Tensor q = at::randn({t, heads * d});
      at::Tensor k = at::randn({t, kv_heads * d});
      at::Tensor v = at::randn({t, kv_heads * d});
      const double scale = 0.3;
      at::Tensor seed_k = at::randn({kv_heads, past, d}), seed_v = at::randn({kv_heads, past, d});
      std::vector<at::Tensor> outs;
      for (const std::vector<int64_t>& split :
           {std::vector<int64_t>{45}, std::vector<int64_t>{16, 16, 13}, std::vector<int64_t>(45, 1)}) {
        KvCache cache(1, kv_heads, d, 4, at::TensorOptions().dtype(dtype));
        cache.Append(0, seed_k, seed_v);
        cache.Commit(past);
        at::Tensor out = at::zeros({t, heads * d});
        int64_t at_row = 0;
        for (int64_t len : split) {
          std::vector<CachedRow> rows = {{0, &cache, len}};
          at::Tensor o = out.narrow(0, at_row, len);
          CachedAttention(0, q.narrow(0, at_row, len), k.narrow(0, at_row, len), v.narrow(0, at_row, len), rows,
                          heads, kv_heads, d, scale, window, o);
          cache.Commit(len);
          at_row += len;
        }
        outs.push_back(out);
      }
      EXPECT_TRUE(at::equal(outs[0], outs[1])) << "window " << window;
      EXPECT_TRUE(at::equal(outs[0], outs[2])) << "window " << window;
    }
  }
}

// A cache whose past lies partly in shared segments (a prefix adapter's 5 positions, four
// prefix-cache blocks of 16, held by reference) and partly in its own blocks gives the bits of
// the same past held as one segment: a 40-position chunk across key tiles, then decode rows,
// with and without a window, over float32, bfloat16 and float16. The new positions cross own
// block boundaries that differ between the two caches (own blocks start at 69 in one, at 72 in
// the other). Sharing copies nothing, and growing by blocks moves nothing already cached.
TEST_P(CachedAttentionTest, SharedSegmentsAndBlocksGiveTheBitsOfOneBuffer) {
  at::manual_seed(33);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (const int64_t window : {int64_t{0}, int64_t{20}}) {
      const int64_t layers = 2, heads = 8, kv_heads = 2, d = 40, past = 5 + 4 * 16 + 3;
      const at::TensorOptions options = at::TensorOptions().dtype(dtype);
      at::Tensor past_k = at::randn({layers, kv_heads, past, d}).to(dtype);
      at::Tensor past_v = at::randn({layers, kv_heads, past, d}).to(dtype);
      KvCache whole(layers, kv_heads, d, 4, options);
      {
        std::vector<at::Tensor> keys, values;
        for (int64_t layer = 0; layer < layers; ++layer) {
          keys.push_back(past_k[layer].contiguous());
          values.push_back(past_v[layer].contiguous());
        }
        whole.Share(keys, values);
      }
      ASSERT_EQ(whole.length(), past);
      ASSERT_EQ(whole.blocks().size(), 1u);
      KvCache split(layers, kv_heads, d, 200, options);
      EXPECT_EQ(split.capacity(), 208);  // 13 blocks.
      int64_t at_position = 0;
      for (const int64_t n : {5, 16, 16, 16, 16}) {
        std::vector<at::Tensor> keys, values;
        for (int64_t layer = 0; layer < layers; ++layer) {
          keys.push_back(past_k[layer].narrow(1, at_position, n).contiguous());
          values.push_back(past_v[layer].narrow(1, at_position, n).contiguous());
        }
        split.Share(keys, values);
        EXPECT_EQ(split.Read(1, at_position, n).first.data_ptr(), keys[1].data_ptr());
        EXPECT_EQ(split.Read(1, at_position, n).second.data_ptr(), values[1].data_ptr());
        at_position += n;
      }
      EXPECT_EQ(split.length(), 69);
      EXPECT_EQ(split.shared_length(), 69);
      // The room asked for in all is kept: 208 - 69 positions in 9 own blocks from 69 on.
      EXPECT_EQ(split.own_capacity(), 144);
      EXPECT_EQ(split.blocks().front().begin, 69);
      EXPECT_EQ(split.bytes(), 2 * layers * kv_heads * 144 * d * static_cast<int64_t>(c10::elementSize(dtype)));
      for (int64_t layer = 0; layer < layers; ++layer) {
        split.Append(layer, past_k[layer].narrow(1, 69, 3), past_v[layer].narrow(1, 69, 3));
      }
      split.Commit(3);
      EXPECT_THROW(split.Share({past_k[0].narrow(1, 0, 1)}, {past_v[0].narrow(1, 0, 1)}), c10::Error);
      EXPECT_TRUE(at::equal(split.Read(1, 0, past).first, past_k[1]));
      EXPECT_TRUE(at::equal(split.Read(1, 3, 40).second, past_v[1].narrow(1, 3, 40)));
      const void* first_block = whole.blocks().front().keys[1].data_ptr();
      const double scale = 0.2;
      for (const int64_t len : {40, 1, 1, 1}) {
        at::Tensor q = at::randn({len, heads * d});
        at::Tensor k = at::randn({len, kv_heads * d});
        at::Tensor v = at::randn({len, kv_heads * d});
        at::Tensor want = at::zeros({len, heads * d});
        at::Tensor got = at::zeros({len, heads * d});
        for (const int64_t layer : {int64_t{0}, int64_t{1}}) {
          std::vector<CachedRow> a = {{0, &whole, len}}, b = {{0, &split, len}};
          CachedAttention(layer, q, k, v, a, heads, kv_heads, d, scale, window, want);
          CachedAttention(layer, q, k, v, b, heads, kv_heads, d, scale, window, got);
          EXPECT_TRUE(at::equal(got, want)) << c10::toString(dtype) << " window " << window << " len " << len;
        }
        whole.Commit(len);
        split.Commit(len);
      }
      for (int64_t layer = 0; layer < layers; ++layer) {
        EXPECT_TRUE(at::equal(split.Read(layer, 0, past + 43).first, whole.Read(layer, 0, past + 43).first));
        EXPECT_TRUE(at::equal(split.Read(layer, 0, past + 43).second, whole.Read(layer, 0, past + 43).second));
      }
      // `whole` grew from one own block to three as the positions came; the first stayed put.
      EXPECT_EQ(whole.blocks().size(), 3u);
      EXPECT_EQ(whole.blocks().front().keys[1].data_ptr(), first_block);
    }
  }
}

// The kernel's bfloat16 and float16 rounding equals ATen's bit for bit, at ties (to even), NaN,
// infinities, signed zero, subnormals and values that round past the largest finite value.
TEST_P(CachedAttentionTest, RoundsToHalfPrecisionAsAtenDoes) {
  const std::vector<uint32_t> bits = {0x3F808000u, 0x3F818000u, 0x3F808001u, 0xBF817FFFu, 0x7FC00001u,
                                      0xFFFFFFFFu, 0x7F800000u, 0xFF800000u, 0x80000000u, 0x00000001u,
                                      0x007FFFFFu, 0x7F7FFFFFu, 0x7F7F8000u, 0x3EAAAAABu, 0x00000000u,
                                      0x40490FDBu,
                                      // float16: a tie to even, its subnormals, past its largest.
                                      0x3F801000u, 0x3F803000u, 0x33800000u, 0x33C00000u, 0x387FC000u,
                                      0x477FEFFFu, 0x477FF000u, 0x47800000u, 0xC77FF000u, 0xFFC00000u};
  const int64_t d = static_cast<int64_t>(bits.size());
  for (const at::ScalarType dtype : {at::kBFloat16, at::kHalf}) {
    at::Tensor k = at::empty({1, d});
    std::memcpy(k.data_ptr<float>(), bits.data(), bits.size() * sizeof(uint32_t));
    at::Tensor v = k.clone();
    at::Tensor q = at::zeros({1, d});
    at::Tensor out = at::zeros({1, d});
    KvCache cache(1, 1, d, 1, at::TensorOptions().dtype(dtype));
    std::vector<CachedRow> decode = {{0, &cache}};
    CachedAttention(0, q, k, v, decode, 1, 1, d, 1.0, 0, out);
    at::Tensor want = k[0].to(dtype);
    at::Tensor got = cache.Read(0, 0, 1).first[0][0];
    const uint16_t exponent = dtype == at::kHalf ? 0x7C00 : 0x7F80;
    for (int64_t i = 0; i < d; ++i) {
      uint16_t w = 0, g = 0;
      std::memcpy(&w, static_cast<const char*>(want.data_ptr()) + 2 * i, 2);
      std::memcpy(&g, static_cast<const char*>(got.data_ptr()) + 2 * i, 2);
      const bool both_nan = (w & 0x7FFF) > exponent && (g & 0x7FFF) > exponent;
      EXPECT_TRUE(w == g || both_nan) << c10::toString(dtype) << " " << std::hex << bits[static_cast<size_t>(i)]
                                      << ": ATen " << w << ", kernel " << g;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isas, CachedAttentionTest, ::testing::Values(Isa::kAvx2, Isa::kAvx512),
                         IsaParamName);

class LoraSegmentsTest : public IsaTest {};

// Segments of mixed ranks and lengths over a batch, some rows with no adapter: every row
// equals (bit for bit) the per-adapter path, LoraExpand(Linear(x_s, a_s), bt_s) added to y_s,
// and both agree with a double-precision product.
TEST_P(LoraSegmentsTest, EqualsThePerAdapterProductBitForBit) {
  at::manual_seed(11);
  const int64_t in = 96, out = 130;
  at::Tensor wide = at::randn({40, in + 5});
  at::Tensor x = wide.narrow(1, 2, in);  // Row-strided, as a narrowed batch is.
  at::Tensor base = at::randn({40, out});
  std::vector<at::Tensor> as, bs;
  std::vector<LoraSegment> segments;
  const int64_t ranks[] = {8, 16, 64, 1, 256, 32, 50};
  const int64_t lengths[] = {1, 3, 1, 5, 2, 1, 4};
  int64_t offset = 1;  // Row 0 and the gaps have no adapter.
  for (int i = 0; i < 7; ++i) {
    as.push_back(at::randn({ranks[i], in}));
    bs.push_back(at::randn({ranks[i], out}) * 0.1);  // Bᵀ.
  }
  for (int i = 0; i < 7; ++i) {
    segments.push_back(LoraSegment{offset, lengths[i], &as[static_cast<size_t>(i)], &bs[static_cast<size_t>(i)]});
    offset += lengths[i] + (i % 2);
  }
  at::Tensor y = base.clone();
  ASSERT_TRUE(LoraSegments(x, y, segments));
  at::Tensor want = base.clone();
  at::Tensor want_double = base.to(at::kDouble);
  for (const LoraSegment& s : segments) {
    at::Tensor xs = x.narrow(0, s.offset, s.length);
    at::Tensor t = Linear(xs, *s.a, at::Tensor());
    ASSERT_TRUE(t.defined());
    at::Tensor delta = LoraExpand(t, *s.bt, 1.0f);
    ASSERT_TRUE(delta.defined());
    want.narrow(0, s.offset, s.length).add_(delta);
    want_double.narrow(0, s.offset, s.length)
        .add_(at::matmul(at::matmul(xs.to(at::kDouble), s.a->to(at::kDouble).t()), s.bt->to(at::kDouble)));
  }
  EXPECT_TRUE(at::equal(y, want)) << (y - want).abs().max().item<float>();
  EXPECT_LT((y.to(at::kDouble) - want_double).abs().max().item<double>(), 1e-3);
  // Rows outside every segment are untouched.
  EXPECT_TRUE(at::equal(y[0], base[0]));
}

// bfloat16 factors (as adapters trained in bf16 are saved) with their scaling apart: the
// result is bit-identical to the float32 copies' (widening is exact), and Linear() reads
// bfloat16 weights the same way.
TEST_P(LoraSegmentsTest, Bfloat16FactorsEqualTheirFloat32CopiesBitForBit) {
  at::manual_seed(12);
  const int64_t in = 200, out = 72;
  at::Tensor x = at::randn({9, in});
  at::Tensor base = at::randn({9, out});
  std::vector<at::Tensor> a16, b16, a32, b32;
  std::vector<LoraSegment> segments;
  const float scales[] = {2.0f, 0.125f, 1.0f, 0.7071f};
  for (int i = 0; i < 4; ++i) {
    const int64_t rank = int64_t{4} << i;
    a16.push_back(at::randn({rank, in}).to(at::kBFloat16));
    b16.push_back(at::randn({rank, out}).to(at::kBFloat16));  // Bᵀ.
    a32.push_back(a16.back().to(at::kFloat));
    b32.push_back(b16.back().to(at::kFloat));
  }
  for (int i = 0; i < 4; ++i) {
    segments.push_back(LoraSegment{2 * i, 2, &a16[static_cast<size_t>(i)], &b16[static_cast<size_t>(i)], scales[i]});
  }
  at::Tensor y = base.clone();
  ASSERT_TRUE(LoraSegments(x, y, segments));
  at::Tensor want = base.clone();
  for (int i = 0; i < 4; ++i) {
    at::Tensor xs = x.narrow(0, 2 * i, 2);
    at::Tensor t32 = Linear(xs, a32[static_cast<size_t>(i)], at::Tensor());
    at::Tensor t16 = Linear(xs, a16[static_cast<size_t>(i)], at::Tensor());
    ASSERT_TRUE(t16.defined());
    ASSERT_TRUE(at::equal(t16, t32));
    at::Tensor d32 = LoraExpand(t32, b32[static_cast<size_t>(i)], scales[i]);
    at::Tensor d16 = LoraExpand(t32, b16[static_cast<size_t>(i)], scales[i]);
    ASSERT_TRUE(at::equal(d16, d32));
    // The scaling is applied to the finished sum, as ATen's (t·bt)·scale.
    EXPECT_LT((d32 - at::matmul(t32.to(at::kDouble), b32[static_cast<size_t>(i)].to(at::kDouble)).mul(scales[i]))
                  .abs().max().item<double>(), 1e-3);
    want.narrow(0, 2 * i, 2).add_(d32);
  }
  EXPECT_TRUE(at::equal(y, want)) << (y - want).abs().max().item<float>();
  EXPECT_FALSE(at::equal(y.narrow(0, 0, 8), base.narrow(0, 0, 8)));
  EXPECT_TRUE(at::equal(y[8], base[8]));
}

// Enough segments to share among the threads: each expand task takes whole rows of bt (its
// rank-by-rank form), still bit-identical to the per-adapter path and near the double product.
TEST_P(LoraSegmentsTest, ManySegmentsTakeWholeRowsBitForBit) {
  at::manual_seed(13);
  const int64_t in = 64, out = 700;
  at::Tensor x = at::randn({30, in});
  at::Tensor base = at::randn({30, out});
  std::vector<at::Tensor> as, bs;
  std::vector<LoraSegment> segments;
  int64_t offset = 0;
  for (int i = 0; i < 12; ++i) {
    const int64_t rank = int64_t{4} << (i % 4), length = 1 + i % 3;
    as.push_back(at::randn({rank, in}));
    bs.push_back((at::randn({rank, out}) * 0.1).to(i % 2 ? at::kBFloat16 : at::kFloat));  // Bᵀ.
    segments.push_back(LoraSegment{offset, length, &as.back(), &bs.back(), i % 3 ? 1.0f : 0.5f});
    offset += length;
  }
  for (size_t i = 0; i < segments.size(); ++i) {  // The vectors grew: point at their final homes.
    segments[i].a = &as[i];
    segments[i].bt = &bs[i];
  }
  at::Tensor y = base.clone();
  ASSERT_TRUE(LoraSegments(x, y, segments));
  at::Tensor want = base.clone();
  at::Tensor want_double = base.to(at::kDouble);
  for (const LoraSegment& s : segments) {
    at::Tensor xs = x.narrow(0, s.offset, s.length);
    at::Tensor t = Linear(xs, *s.a, at::Tensor());
    at::Tensor delta = LoraExpand(t, *s.bt, s.scale);
    ASSERT_TRUE(t.defined() && delta.defined());
    want.narrow(0, s.offset, s.length).add_(delta);
    want_double.narrow(0, s.offset, s.length)
        .add_(at::matmul(at::matmul(xs.to(at::kDouble), s.a->to(at::kDouble).t()), s.bt->to(at::kDouble)) * s.scale);
  }
  EXPECT_TRUE(at::equal(y, want)) << (y - want).abs().max().item<float>();
  EXPECT_LT((y.to(at::kDouble) - want_double).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(at::equal(y.narrow(0, offset, 30 - offset), base.narrow(0, offset, 30 - offset)));
}

// The expand's two forms (accumulators in registers per block of outputs for many rows, in an
// L1 buffer rank by rank for few) sum alike: 40 rows at once equal each row alone.
TEST_P(LoraSegmentsTest, ExpandFormsSumAlikeBitForBit) {
  at::manual_seed(14);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    at::Tensor t = at::randn({40, 37});
    at::Tensor bt = at::randn({37, 203}).to(dtype);
    at::Tensor all = LoraExpand(t, bt, 0.25f);
    ASSERT_TRUE(all.defined());
    for (int64_t i = 0; i < 40; ++i) {
      at::Tensor one = LoraExpand(t.narrow(0, i, 1), bt, 0.25f);
      ASSERT_TRUE(one.defined());
      EXPECT_TRUE(at::equal(one[0], all[i])) << c10::toString(dtype) << " row " << i;
    }
    EXPECT_LT((all.to(at::kDouble) - at::matmul(t.to(at::kDouble), bt.to(at::kDouble)) * 0.25)
                  .abs().max().item<double>(), 1e-3);
  }
}

TEST_P(LoraSegmentsTest, DeclinesWhatItCannotTakeAndTouchesNothing) {
  at::Tensor x = at::randn({8, 16}), y = at::randn({8, 24});
  at::Tensor a = at::randn({4, 16}), b = at::randn({4, 24});
  const at::Tensor before = y.clone();
  at::Tensor a_double = a.to(at::kDouble), wrong_in = at::randn({4, 15}), wrong_rank = at::randn({5, 24});
  at::Tensor x_long = at::randn({kLinearMaxRows + 1, 16}), y_long = at::randn({kLinearMaxRows + 1, 24});
  const at::Tensor* ok_b = &b;
  for (auto bad : std::vector<LoraSegment>{{0, 2, &a_double, ok_b}, {0, 2, &wrong_in, ok_b},
                                          {0, 2, &a, &wrong_rank}, {7, 2, &a, ok_b}, {-1, 1, &a, ok_b}}) {
    EXPECT_FALSE(LoraSegments(x, y, {LoraSegment{0, 1, &a, &b}, bad}));
    EXPECT_TRUE(at::equal(y, before));
  }
  EXPECT_FALSE(LoraSegments(x_long, y_long, {LoraSegment{0, kLinearMaxRows + 1, &a, &b}}));
  EXPECT_FALSE(LoraSegments(x.to(at::kDouble), y, {LoraSegment{0, 1, &a, &b}}));
}

INSTANTIATE_TEST_SUITE_P(Isas, LoraSegmentsTest, ::testing::Values(Isa::kAvx2, Isa::kAvx512), IsaParamName);

// RMSNorm against the formula in double precision, and against itself: a row alone, and a
// 16-bit weight against its float32 copy.
TEST(NormAndRotaryTest, RmsNormMatchesTheFormulaAndEachRowStandsAlone) {
  ASSERT_NE(SelectedIsa(), Isa::kNone);
  at::manual_seed(3);
  const double eps = 1e-5;
  for (int64_t d : {1, 7, 16, 64, 773}) {
    for (int64_t m : {1, 3, 40}) {
      at::Tensor wide = at::randn({m, d + 5}) * 3;
      at::Tensor x = wide.narrow(1, 2, d);  // Rows a stride apart, as a narrowed batch's are.
      at::Tensor w32 = at::randn({d});
      for (at::ScalarType type : {at::kFloat, at::kBFloat16, at::kHalf}) {
        at::Tensor w = w32.to(type);
        at::Tensor y = RmsNorm(x, w, eps);
        ASSERT_TRUE(y.defined()) << d << " " << m << " " << type;
        ASSERT_EQ(y.sizes(), x.sizes());
        at::Tensor xd = x.to(at::kDouble);
        at::Tensor want = w.to(at::kDouble) * xd * at::rsqrt(xd.pow(2).mean(-1, true) + eps);
        // Three float roundings (the sum's, the normalising product's, the weight's) over
        // values of order 1: a few parts in 10^7 of each element's size.
        const double err = ((y.to(at::kDouble) - want).abs() / (want.abs() + 1e-3)).max().item<double>();
        EXPECT_LT(err, 2e-6) << d << " " << m << " " << type;
        // The ATen float formula transformers runs: equal up to the sum's order.
        at::Tensor aten = w * (x * at::rsqrt(x.pow(2).mean(-1, true) + eps));
        EXPECT_TRUE(at::allclose(y, aten, 1e-6, 1e-7)) << d << " " << m << " " << type;
        EXPECT_TRUE(at::equal(y, RmsNorm(x, w.to(at::kFloat), eps))) << "16-bit weights widen exactly";
        for (int64_t i : {int64_t{0}, m - 1}) {
          EXPECT_TRUE(at::equal(y.narrow(0, i, 1), RmsNorm(x.narrow(0, i, 1), w, eps))) << "row " << i;
        }
      }
    }
  }
}

// The rotary embedding in place equals transformers' x·cos + rotate_half(x)·sin computed in
// ATen, bit for bit, for query- and key-shaped rows, positions far apart and a strided batch.
TEST(NormAndRotaryTest, RotateInPlaceEqualsTheFormulaBitForBit) {
  ASSERT_NE(SelectedIsa(), Isa::kNone);
  at::manual_seed(5);
  for (int64_t d : {2, 8, 64, 128}) {
    for (int64_t heads : {1, 3, 12}) {
      for (int64_t m : {1, 5, 33}) {
        at::Tensor positions = at::randint(0, 100000, {m}, at::kLong).to(at::kFloat);
        at::Tensor inv = 1.0 / at::pow(10000.0, at::arange(0, d, 2, at::kLong).to(at::kFloat) / static_cast<double>(d));
        at::Tensor freqs = positions.unsqueeze(1) * inv.unsqueeze(0);
        at::Tensor emb = at::cat({freqs, freqs}, -1);
        at::Tensor cos = emb.cos(), sin = emb.sin();
        at::Tensor wide = at::randn({m, heads * d + 4});
        at::Tensor x = wide.narrow(1, 4, heads * d);
        at::Tensor h = x.reshape({m, heads, d});
        at::Tensor rotated = at::cat({-h.narrow(-1, d / 2, d / 2), h.narrow(-1, 0, d / 2)}, -1);
        at::Tensor want = (h * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).reshape({m, -1});
        at::Tensor before = wide.clone();
        ASSERT_TRUE(RotateInPlace(x, cos, sin, d));
        EXPECT_TRUE(at::equal(x, want)) << d << " " << heads << " " << m;
        EXPECT_TRUE(at::equal(wide.narrow(1, 0, 4), before.narrow(1, 0, 4))) << "wrote outside the rows";
      }
    }
  }
}

TEST(NormAndRotaryTest, DeclineWhatTheyCannotTakeAndTouchNothing) {
  at::Tensor x = at::randn({2, 16}), w = at::randn({16}), cos = at::randn({2, 8}), sin = at::randn({2, 8});
  const at::Tensor original = x.clone();
  EXPECT_FALSE(RmsNorm(x.to(at::kDouble), w, 1e-5).defined());
  EXPECT_FALSE(RmsNorm(x, at::randn({15}), 1e-5).defined());
  EXPECT_FALSE(RmsNorm(x.t(), w.narrow(0, 0, 2), 1e-5).defined());
  EXPECT_FALSE(RmsNorm(x, w.to(at::kDouble), 1e-5).defined());
  EXPECT_FALSE(RotateInPlace(x, cos, sin, 7)) << "odd head size";
  EXPECT_FALSE(RotateInPlace(x, cos, sin, 6)) << "16 features are not whole heads of 6";
  EXPECT_FALSE(RotateInPlace(x, cos.narrow(0, 0, 1), sin, 8)) << "a row without its angles";
  at::Tensor xd = x.to(at::kDouble);
  EXPECT_FALSE(RotateInPlace(xd, cos, sin, 8));
  ASSERT_TRUE(SelectIsa(Isa::kNone));
  EXPECT_FALSE(RmsNorm(x, w, 1e-5).defined());
  EXPECT_FALSE(RotateInPlace(x, cos, sin, 8));
  ASSERT_TRUE(SelectIsa(SupportedIsa()));
  EXPECT_TRUE(at::equal(x, original));
}

TEST(CpuKernelsTest, NoneTurnsTheKernelsOff) {
  ASSERT_TRUE(SelectIsa(Isa::kNone));
  at::Tensor x = at::randn({2, 16}), w = at::randn({4, 16});
  EXPECT_FALSE(Linear(x, w, at::Tensor()).defined());
  EXPECT_FALSE(CachedAttentionApplies(x, x, x, at::empty({2, 16})));
  EXPECT_TRUE(SelectIsa(SupportedIsa()));
  EXPECT_EQ(SelectedIsa(), SupportedIsa());
}

TEST(CpuKernelsTest, DetectsWhatTheKernelReportsInProcCpuinfo) {
  Isa want = Isa::kNone;
  bool vnni = false, bf16 = false;
#if defined(__x86_64__)
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line) && line.rfind("flags", 0) != 0) {
  }
  std::set<std::string> flags;
  std::istringstream words(line);
  for (std::string w; words >> w;) flags.insert(w);
  ASSERT_FALSE(flags.empty()) << "no flags line in /proc/cpuinfo";
  if (!flags.count("f16c")) {
    want = Isa::kNone;
  } else if (flags.count("avx512f")) {
    want = Isa::kAvx512;
  } else if (flags.count("avx2") && flags.count("fma")) {
    want = Isa::kAvx2;
  }
  vnni = flags.count("avx512_vnni") && flags.count("avx512vl") && flags.count("avx512bw");
  bf16 = flags.count("avx512_bf16") > 0;
#endif
  EXPECT_EQ(IsaName(SupportedIsa()), std::string(IsaName(want)));
  // The w8a8 kernel: vpdpbusd where AVX-512 comes with VNNI, else AVX2's, and the AVX2 one
  // whenever AVX2 is selected.
  ASSERT_TRUE(SelectIsa(SupportedIsa()));
  const char* w8a8 = want == Isa::kNone ? "none" : want == Isa::kAvx512 && vnni ? "avx512vnni" : "avx2";
  EXPECT_STREQ(W8A8KernelName(), w8a8);
  EXPECT_EQ(Bf16ProductsAvailable(), want == Isa::kAvx512 && bf16);
  if (want != Isa::kNone) {
    ASSERT_TRUE(SelectIsa(Isa::kAvx2));
    EXPECT_STREQ(W8A8KernelName(), "avx2");
    ASSERT_TRUE(SelectIsa(SupportedIsa()));
  }
}

TEST(CpuKernelsTest, SelectsAnInstructionSetOnlyWhenTheCpuHasIt) {
  for (Isa isa : {Isa::kNone, Isa::kAvx2, Isa::kAvx512}) {
    const bool supported = isa <= SupportedIsa();
    ASSERT_TRUE(SelectIsa(Isa::kNone));
    EXPECT_EQ(SelectIsa(isa), supported) << IsaName(isa);
    EXPECT_EQ(SelectedIsa(), supported ? isa : Isa::kNone) << IsaName(isa);
  }
  EXPECT_TRUE(SelectIsa(SupportedIsa()));
}

}  // namespace
}  // namespace adapterd::core::cpu
