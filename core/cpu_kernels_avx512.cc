// cpu_kernels_isa.h for AVX-512F (compiled with -mavx512f -mfma -mf16c; see core/CMakeLists.txt).
#include <immintrin.h>
#include <math.h>

#include <cmath>
#include <type_traits>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

#include "core/cpu_kernels_avx512_vec.inc"
#include "core/cpu_kernels_impl.inc"

}  // namespace

void LinearAvx512(const LinearArgs& args, int64_t n0, int64_t n1) { LinearTiles(args, n0, n1); }
void AttendAvx512(const AttendArgs& args) { AttendHead(args); }
void ExpandAvx512(const ExpandArgs& args, int64_t o0, int64_t o1) { Expand(args, o0, o1); }

}  // namespace adapterd::core::cpu
