// The raw-pointer interface of the instruction-set-specific kernels behind cpu_kernels.h.
// Each ISA's translation unit is compiled with its own -m flags, so this header (and those
// units) hold no inline functions or templates with external linkage: a copy compiled for
// AVX-512 must never be picked by the linker for code that runs on any CPU.
#pragma once

#include <cstdint>

namespace adapterd::core::cpu {

// y[i, n] = sum_k x[i, k]·w[n, k] (+ b[n]) for rows i < m and outputs n in [n0, n1); with
// `accumulate`, that sum is added to y[i, n] instead (one rounding, as y + (x·wᵀ) would do).
struct LinearArgs {
  const float* x;
  int64_t ldx;
  const float* w;
  int64_t ldw;
  const float* b;  // Null: no bias.
  float* y;
  int64_t ldy;
  int64_t m;
  int64_t k;
  bool accumulate = false;
  // Rows (ldw apart, k long) that come next after outputs [n0, n1), e.g. the next adapter's
  // factors: the last tile prefetches them as it prefetches its successor within the range.
  const float* w_next = nullptr;
};

// One decode row's attention for one kv head: its key and value are stored at `position` of
// the head's cache, then each of the `group` query heads attends over positions
// [first, position].
struct AttendArgs {
  const float* q;    // The row's query heads of this kv head: group × head_dim.
  const float* k;    // The row's new key for this kv head: head_dim.
  const float* v;    // The row's new value: head_dim.
  float* keys;       // This kv head's cache: [capacity, head_dim].
  float* values;
  float* out;        // group × head_dim.
  float* scores;     // Scratch: position + 1 floats.
  int64_t group;
  int64_t head_dim;
  int64_t first;
  int64_t position;
  float scale;
};

void LinearAvx512(const LinearArgs& args, int64_t n0, int64_t n1);
void LinearAvx2(const LinearArgs& args, int64_t n0, int64_t n1);
void AttendAvx512(const AttendArgs& args);
void AttendAvx2(const AttendArgs& args);

}  // namespace adapterd::core::cpu
