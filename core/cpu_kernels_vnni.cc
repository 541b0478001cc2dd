// The w8a8 kernel of cpu_kernels_isa.h for CPUs with AVX-512 VNNI (compiled with -mavx512f
// -mavx512bw -mavx512vl -mavx512vnni; see core/CMakeLists.txt). vpdpbusd adds four byte
// products to each int32 lane in one instruction, where AVX2 takes three; its 256-bit form
// (AVX-512VL) keeps the panel layout of the AVX2 kernel, and the 32 vector registers hold
// four rows' sums and accumulators for two panels.
#include <immintrin.h>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

struct Int8Dot {
  static __m256i Add(__m256i sums, __m256i u, __m256i s) { return _mm256_dpbusd_epi32(sums, u, s); }
};

#include "core/cpu_kernels_w8a8.inc"

}  // namespace

void W8A8Vnni(const W8A8Args& args, int64_t p0, int64_t p1) { W8A8Panels<4>(args, p0, p1); }

}  // namespace adapterd::core::cpu
