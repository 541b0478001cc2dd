#include "core/cpu_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>

#include "core/cpu_kernels_isa.h"

namespace adapterd::core::cpu {
namespace {

Isa Detect() {
#if defined(ADAPTERD_X86_KERNELS)
  __builtin_cpu_init();
  // Every CPU with AVX2 and FMA has F16C (float16 conversions), which both kernels use; it is
  // checked all the same.
  if (!__builtin_cpu_supports("f16c")) return Isa::kNone;
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kNone;
}

// AVX-512 VNNI with the VL (256-bit forms) and BW extensions: the w8a8 kernel's vpdpbusd.
bool DetectVnni() {
#if defined(ADAPTERD_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool DetectBf16Dot() {
#if defined(ADAPTERD_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

bool DetectAvx512Bw() {
#if defined(ADAPTERD_X86_KERNELS)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bw");
#else
  return false;
#endif
}

bool HasVnni() {
  static const bool vnni = DetectVnni();
  return vnni;
}

// Whether LinearW8A8() runs W8A8Vnni (else W8A8Avx2): AVX-512 selected on a CPU with VNNI.
bool UseVnni() { return SelectedIsa() == Isa::kAvx512 && HasVnni(); }

std::atomic<Isa>& Selected() {
  static std::atomic<Isa> isa{Detect()};
  return isa;
}

// Outputs per task of a LoRA expand: a multiple of both ISAs' four-vector step (64 and 32).
constexpr int64_t kExpandBlock = 128;

// Work (multiply-adds) below which a parallel region costs more than it saves.
constexpr int64_t kParallelWork = 1 << 15;

// Runs body(begin, end) over [0, tasks) in chunks of `chunk` on the intra-op threads, or on
// this thread alone when `parallel` is false. Taking chunks (rather than running one fixed
// share per thread) lets the other threads absorb the work of one that the OS preempts, so a
// busy core delays a step by a fraction of the time it stole. The chunks are dealt into
// `parts` contiguous shares, each with its own counter on its own cache line: a thread takes
// its home share's chunks in order, then the other shares' remaining ones. One share is one
// counter that every thread takes from in the order of the tasks.
template <class F>
void RunChunks(int64_t tasks, int64_t chunk, bool parallel, bool one_share, const F& body) {
  const int64_t threads = at::get_num_threads();
  if (!parallel || threads < 2 || tasks <= chunk) {
    body(0, tasks);
    return;
  }
  struct alignas(64) Share {
    std::atomic<int64_t> next;
    int64_t end;
  };
  const int64_t chunks = (tasks + chunk - 1) / chunk;
  const int64_t parts = one_share ? 1 : std::min(threads, chunks);
  std::unique_ptr<Share[]> shares(new Share[static_cast<size_t>(parts)]);
  for (int64_t p = 0; p < parts; ++p) {
    shares[p].next.store(p * chunks / parts, std::memory_order_relaxed);
    shares[p].end = (p + 1) * chunks / parts;
  }
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t) {
    const int64_t home = begin % parts;
    for (int64_t i = 0; i < parts; ++i) {
      Share& s = shares[(home + i) % parts];
      for (int64_t c = s.next.fetch_add(1); c < s.end; c = s.next.fetch_add(1)) {
        body(c * chunk, std::min(tasks, (c + 1) * chunk));
      }
    }
  });
}

// RunChunks() with a share per thread: each thread's counter stays in its own core's cache
// until its share is nearly done. A chunk of a decode step's matrix is a few microseconds of
// work, and one shared counter's cache line crossed between the cores for nearly every chunk
// (~1 µs round trip on the 2-core VMs measured); owned shares took the 110M's BF16 decode on
// 2 threads from 157-165 to 158-198 tokens/s.
template <class F>
void ForChunks(int64_t tasks, int64_t chunk, bool parallel, const F& body) {
  RunChunks(tasks, chunk, parallel, /*one_share=*/false, body);
}

// RunChunks() with one share: for tasks sorted largest first, so the threads finish together
// (a share per thread would give one thread the largest half).
template <class F>
void ForChunksInOrder(int64_t tasks, int64_t chunk, bool parallel, const F& body) {
  RunChunks(tasks, chunk, parallel, /*one_share=*/true, body);
}

bool IsCpuFloat(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && t.scalar_type() == at::kFloat;
}

// Weights the kernels read: float32, or bfloat16 widened as they are loaded.
bool IsCpuWeight(const at::Tensor& t) {
  return t.defined() && t.device().is_cpu() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16);
}

// Weight matrices Linear() reads: those, or float16 (a checkpoint's own, served in place).
bool IsCpuMatrix(const at::Tensor& t) {
  return IsCpuWeight(t) || (t.defined() && t.device().is_cpu() && t.scalar_type() == at::kHalf);
}

WeightType WeightTypeOf(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return WeightType::kBf16;
    case at::kHalf: return WeightType::kF16;
    default: return WeightType::kF32;
  }
}

WeightType WeightTypeOf(const at::Tensor& w) { return WeightTypeOf(w.scalar_type()); }

}  // namespace

Isa SupportedIsa() { return Detect(); }
Isa SelectedIsa() { return Selected().load(std::memory_order_relaxed); }

bool SelectIsa(Isa isa) {
  if (static_cast<int>(isa) > static_cast<int>(Detect())) return false;
  Selected().store(isa, std::memory_order_relaxed);
  return true;
}

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512f";
    case Isa::kAvx2: return "avx2";
    case Isa::kNone: return "none";
  }
  return "?";
}

bool IsaFromName(const std::string& name, Isa* isa) {
  for (Isa i : {Isa::kNone, Isa::kAvx2, Isa::kAvx512}) {
    if (name == IsaName(i)) {
      *isa = i;
      return true;
    }
  }
  return false;
}

const char* W8A8KernelName() {
  if (SelectedIsa() == Isa::kNone) return "none";
  return UseVnni() ? "avx512vnni" : "avx2";
}

namespace {

// Whether Linear() or LinearInt8() takes x, w (a matrix of `w`'s dtype, any the kernels read)
// and b.
bool LinearApplies(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return SelectedIsa() != Isa::kNone && IsCpuFloat(x) && x.dim() == 2 && w.dim() == 2 &&
         w.device().is_cpu() && LinearTakes(x.size(0), x.size(1)) && x.size(1) == w.size(1) &&
         x.stride(1) == 1 && w.stride(1) == 1 &&
         (!b.defined() || (IsCpuFloat(b) && b.is_contiguous() && b.dim() == 1 && b.size(0) == w.size(0)));
}

// One matrix of RunLinear(): its weights, bias and the kernel arguments that say how to read them.
struct LinearJob {
  const at::Tensor* w;
  const at::Tensor* b;
  LinearArgs args;
};

// y = x·wᵀ + b for each job, every job's outputs in blocks of 48 (a multiple of both ISAs' tile
// widths) taken from one parallel pass: a layer's projections of one x (q, k and v, or gate
// and up) fork and join the threads once. Blocks are numbered job after job, so no task
// straddles two matrices, and each output is the same sum whichever pass computes it.
// `bf16_products`: the bfloat16 matrices take LinearBf16Dot over x rounded once to bfloat16.
std::vector<at::Tensor> RunLinear(const at::Tensor& x, std::vector<LinearJob> jobs,
                                  bool bf16_products = false) {
  const int64_t m = x.size(0), k = x.size(1);
  constexpr int64_t kBlock = 48;
  std::vector<uint16_t> xb;
  if (bf16_products) {
    bool any = false;
    auto bf16 = [](const LinearJob& job) {
      return job.args.w_type == WeightType::kBf16 || job.args.w_type == WeightType::kBf16Packed;
    };
    for (const LinearJob& job : jobs) any = any || bf16(job);
    if (any) {
      xb.resize(static_cast<size_t>(m * k));
      const float* xp = x.data_ptr<float>();
      const int64_t ldx = x.stride(0);
      ForChunks(m, 16, m * k >= 2 * kParallelWork, [&](int64_t begin, int64_t end) {
        RoundRowsBf16(xp + begin * ldx, ldx, end - begin, k, xb.data() + begin * k);
      });
      for (LinearJob& job : jobs) {
        if (!bf16(job)) continue;
        job.args.xb = xb.data();
        job.args.ldxb = k;
      }
    }
  }
  std::vector<at::Tensor> ys;
  std::vector<int64_t> first_block;  // Job j's blocks are [first_block[j], first_block[j + 1]).
  int64_t blocks = 0;
  for (LinearJob& job : jobs) {
    const at::Tensor& w = *job.w;
    const int64_t n = w.size(0);
    ys.push_back(at::empty({m, n}, x.options()));
    LinearArgs& args = job.args;
    args.x = x.data_ptr<float>();
    args.ldx = x.stride(0);
    args.w = w.data_ptr();
    args.ldw = w.stride(0);
    args.b = job.b->defined() ? job.b->data_ptr<float>() : nullptr;
    args.y = ys.back().data_ptr<float>();
    args.ldy = n;
    args.m = m;
    args.k = k;
    first_block.push_back(blocks);
    blocks += m == 0 ? 0 : (n + kBlock - 1) / kBlock;
  }
  first_block.push_back(blocks);
  auto* kernel = SelectedIsa() == Isa::kAvx512 ? &LinearAvx512 : &LinearAvx2;
  const bool parallel = blocks * kBlock * k * m >= 2 * kParallelWork;
  ForChunks(blocks, 1, parallel, [&](int64_t begin, int64_t end) {
    size_t j = 0;
    for (int64_t block = begin; block < end;) {
      while (first_block[j + 1] <= block) ++j;
      const int64_t stop = std::min(end, first_block[j + 1]), n = jobs[j].w->size(0);
      const int64_t o0 = (block - first_block[j]) * kBlock;
      const int64_t o1 = std::min(n, (stop - first_block[j]) * kBlock);
      // The next block of this matrix is most often this thread's next task (its share is
      // contiguous): the kernel's last tiles prefetch its first rows.
      LinearArgs args = jobs[j].args;
      if (o1 < n) {
        args.w_next = static_cast<const char*>(args.w) + o1 * args.ldw * jobs[j].w->element_size();
      }
      if (args.w_type == WeightType::kBf16Packed) {
        LinearPackedAvx512(args, o0, o1);
      } else if (args.xb != nullptr) {
        LinearBf16Dot(args, o0, o1);
      } else {
        kernel(args, o0, o1);
      }
      block = stop;
    }
  });
  return ys;
}

}  // namespace

at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return Linear(x, w, b, MatmulPrecision::kHighest);
}

bool MatmulPrecisionFromName(const std::string& name, MatmulPrecision* precision) {
  if (name == "highest" || name == "high") {
    *precision = MatmulPrecision::kHighest;
  } else if (name == "medium") {
    *precision = MatmulPrecision::kMedium;
  } else {
    return false;
  }
  return true;
}

bool Bf16ProductsAvailable() {
  static const bool has = DetectBf16Dot();
  return has && SelectedIsa() == Isa::kAvx512;
}

at::Tensor Linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b,
                  MatmulPrecision precision) {
  std::vector<at::Tensor> y = LinearShared(x, {LinearMatrix{&w, &b}}, precision);
  return y.empty() ? at::Tensor() : y[0];
}

std::vector<at::Tensor> LinearShared(const at::Tensor& x, const std::vector<LinearMatrix>& matrices,
                                     MatmulPrecision precision) {
  std::vector<LinearJob> jobs;
  for (const LinearMatrix& matrix : matrices) {
    if (!IsCpuMatrix(*matrix.w) || !LinearApplies(x, *matrix.w, *matrix.b)) return {};
    LinearArgs args{};
    args.w_type = WeightTypeOf(*matrix.w);
    jobs.push_back({matrix.w, matrix.b, args});
  }
  if (jobs.empty()) return {};
  return RunLinear(x, std::move(jobs),
                   precision == MatmulPrecision::kMedium && Bf16ProductsAvailable());
}

namespace {

// Where weight t of a packed block sits: byte PackedByte(t) of low-byte run t / 64 and of the
// codes (cpu_kernels_isa.h).
inline int64_t PackedByte(int64_t t) {
  const int64_t r = t % 32;
  return 16 * (r / 8) + 8 * (t / 32 % 2) + r % 8;
}

PackedBf16Rows RowsOf(const PackedBf16& p) {
  return PackedBf16Rows{p.tables.data_ptr<uint8_t>(), p.escape_offsets.data_ptr<int64_t>(),
                        p.escape_pos.data_ptr<int32_t>(),
                        reinterpret_cast<const uint16_t*>(p.escape_values.data_ptr<int16_t>())};
}

// Rows per parallel task of packing: a few hundred KB of weights.
constexpr int64_t kPackGrain = 64;

}  // namespace

int64_t PackedBf16::bytes() const {
  if (!defined()) return 0;
  return static_cast<int64_t>(blocks.nbytes() + tables.nbytes() + escape_offsets.nbytes() +
                              escape_pos.nbytes() + escape_values.nbytes());
}

bool PackBf16Takes(const at::Tensor& w) {
  return w.defined() && w.device().is_cpu() && w.scalar_type() == at::kBFloat16 && w.dim() == 2 &&
         w.size(1) > 0 && w.size(1) % kPackedBlock == 0 && w.stride(1) == 1 &&
         w.size(1) <= std::numeric_limits<int32_t>::max();
}

PackedBf16 PackBf16(const at::Tensor& w) {
  TORCH_CHECK(PackBf16Takes(w),
              "PackBf16 takes a CPU bfloat16 [n, k] matrix with k a multiple of 128");
  const int64_t n = w.size(0), k = w.size(1), ld = w.stride(0);
  const uint16_t* src = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  PackedBf16 p;
  p.k = k;
  const int64_t row_bytes = k / kPackedBlock * kPackedBlockBytes;
  p.blocks = at::empty({n, row_bytes}, at::kByte);
  p.tables = at::zeros({n, 16}, at::kByte);
  p.escape_offsets = at::empty({n + 1}, at::kLong);
  uint8_t* blocks = p.blocks.data_ptr<uint8_t>();
  uint8_t* tables = p.tables.data_ptr<uint8_t>();
  int64_t* offsets = p.escape_offsets.data_ptr<int64_t>();
  // Entries in use per row (the first `used`); the others hold 0, as the escape's entry 15 does.
  std::vector<uint8_t> used_entries(static_cast<size_t>(n));
  // Row r's code of every high byte (kPackedEscape: not in its table).
  auto codes_of = [&](int64_t r, uint8_t code[256]) {
    std::fill(code, code + 256, static_cast<uint8_t>(kPackedEscape));
    for (int i = 0; i < used_entries[r]; ++i) code[tables[r * 16 + i]] = static_cast<uint8_t>(i);
  };
  // Pass 1: tables, codes and low bytes, and each row's escape count (in offsets[r + 1]).
  at::parallel_for(0, n, kPackGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint16_t* row = src + r * ld;
      int64_t count[256] = {};
      for (int64_t j = 0; j < k; ++j) ++count[row[j] >> 8];
      uint8_t order[256];
      for (int i = 0; i < 256; ++i) order[i] = static_cast<uint8_t>(i);
      std::stable_sort(order, order + 256,
                       [&](uint8_t a, uint8_t b) { return count[a] > count[b]; });
      int used = 0;
      for (; used < kPackedEscape && count[order[used]] > 0; ++used)
        tables[r * 16 + used] = order[used];
      used_entries[r] = static_cast<uint8_t>(used);
      uint8_t code[256];
      codes_of(r, code);
      int64_t escapes = 0;
      uint8_t* out = blocks + r * row_bytes;
      for (int64_t b0 = 0; b0 < k; b0 += kPackedBlock, out += kPackedBlockBytes) {
        std::fill(out, out + 64, uint8_t{0});
        for (int64_t t = 0; t < kPackedBlock; ++t) {
          const uint16_t v = row[b0 + t];
          const uint8_t c = code[v >> 8];
          const int64_t pos = PackedByte(t);
          out[pos] = static_cast<uint8_t>(out[pos] | (t < 64 ? c : c << 4));
          out[64 + 64 * (t / 64) + pos] = c == kPackedEscape ? 0 : static_cast<uint8_t>(v & 0xFF);
          escapes += c == kPackedEscape;
        }
      }
      offsets[r + 1] = escapes;
    }
  });
  offsets[0] = 0;
  for (int64_t r = 0; r < n; ++r) offsets[r + 1] += offsets[r];
  p.escape_pos = at::empty({offsets[n]}, at::kInt);
  p.escape_values = at::empty({offsets[n]}, at::kShort);
  int32_t* pos = p.escape_pos.data_ptr<int32_t>();
  uint16_t* values = reinterpret_cast<uint16_t*>(p.escape_values.data_ptr<int16_t>());
  // Pass 2: the escapes, in order along each row.
  at::parallel_for(0, n, kPackGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (offsets[r + 1] == offsets[r]) continue;
      const uint16_t* row = src + r * ld;
      uint8_t code[256];
      codes_of(r, code);
      int64_t e = offsets[r];
      for (int64_t j = 0; j < k; ++j) {
        if (code[row[j] >> 8] != kPackedEscape) continue;
        pos[e] = static_cast<int32_t>(j);
        values[e] = row[j];
        ++e;
      }
    }
  });
  return p;
}

bool PackedKernelAvailable() {
  static const bool bw = DetectAvx512Bw();
  return bw && SelectedIsa() == Isa::kAvx512;
}

at::Tensor UnpackBf16(const PackedBf16& p, int64_t row0, int64_t rows) {
  TORCH_CHECK(p.defined() && row0 >= 0 && rows >= 0 && row0 + rows <= p.rows(),
              "UnpackBf16: rows out of range");
  at::Tensor out = at::empty({rows, p.k}, at::kBFloat16);
  uint16_t* o = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const uint8_t* blocks = p.blocks.data_ptr<uint8_t>();
  const int64_t ld = p.blocks.stride(0);
  const PackedBf16Rows r = RowsOf(p);
  const bool kernel = PackedKernelAvailable();
  at::parallel_for(row0, row0 + rows, kPackGrain, [&](int64_t begin, int64_t end) {
    if (kernel) {
      UnpackBf16Avx512(blocks, ld, r, p.k, begin, end, o + (begin - row0) * p.k, p.k);
      return;
    }
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* b = blocks + n * ld;
      uint16_t* row = o + (n - row0) * p.k;
      for (int64_t b0 = 0; b0 < p.k; b0 += kPackedBlock, b += kPackedBlockBytes) {
        for (int64_t t = 0; t < kPackedBlock; ++t) {
          const int64_t pos = PackedByte(t);
          const int code = t < 64 ? b[pos] & 0x0F : b[pos] >> 4;
          row[b0 + t] =
              static_cast<uint16_t>(r.tables[16 * n + code] << 8 | b[64 + 64 * (t / 64) + pos]);
        }
      }
      for (int64_t e = r.escape_offsets[n]; e < r.escape_offsets[n + 1]; ++e)
        row[r.escape_pos[e]] = r.escape_values[e];
    }
  });
  return out;
}

std::vector<at::Tensor> LinearPacked(const at::Tensor& x, const std::vector<PackedMatrix>& matrices,
                                     MatmulPrecision precision) {
  if (!PackedKernelAvailable() || !IsCpuFloat(x) || x.dim() != 2 || x.stride(1) != 1 ||
      !LinearTakes(x.size(0), x.size(1))) {
    return {};
  }
  std::vector<PackedBf16Rows> rows;
  rows.reserve(matrices.size());
  std::vector<LinearJob> jobs;
  for (const PackedMatrix& matrix : matrices) {
    const PackedBf16& w = *matrix.w;
    const at::Tensor& b = *matrix.b;
    if (!w.defined() || w.k != x.size(1) ||
        (b.defined() &&
         (!IsCpuFloat(b) || !b.is_contiguous() || b.dim() != 1 || b.size(0) != w.rows()))) {
      return {};
    }
    rows.push_back(RowsOf(w));
    LinearArgs args{};
    args.w_type = WeightType::kBf16Packed;
    args.packed = &rows.back();
    jobs.push_back({&w.blocks, matrix.b, args});
  }
  if (jobs.empty()) return {};
  return RunLinear(x, std::move(jobs),
                   precision == MatmulPrecision::kMedium && Bf16ProductsAvailable());
}

at::Tensor LinearInt8(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& b) {
  if (!q.defined() || q.scalar_type() != at::kChar || !LinearApplies(x, q, b) || q.size(1) % kInt8Block != 0 ||
      !IsCpuFloat(scales) || scales.dim() != 2 || scales.size(0) != q.size(0) ||
      scales.size(1) != q.size(1) / kInt8Block || scales.stride(1) != 1) {
    return at::Tensor();
  }
  LinearArgs args{};
  args.w_type = WeightType::kI8;
  args.w_scales = scales.data_ptr<float>();
  args.ld_scales = scales.stride(0);
  return RunLinear(x, {LinearJob{&q, &b, args}})[0];
}

at::Tensor LinearW8A8(const at::Tensor& x, const at::Tensor& panels, const at::Tensor& panel_scales, int64_t n,
                      const at::Tensor& b) {
  std::vector<at::Tensor> y = LinearW8A8Shared(x, {W8A8Matrix{&panels, &panel_scales, n, &b}});
  return y.empty() ? at::Tensor() : y[0];
}

std::vector<at::Tensor> LinearW8A8Shared(const at::Tensor& x, const std::vector<W8A8Matrix>& matrices) {
  if (SelectedIsa() == Isa::kNone || !IsCpuFloat(x) || x.dim() != 2 || x.stride(1) != 1 || matrices.empty()) {
    return {};
  }
  const int64_t m = x.size(0), k = x.size(1);
  if (k % kInt8Block != 0) return {};
  for (const W8A8Matrix& w : matrices) {
    const at::Tensor& panels = *w.panels;
    const at::Tensor& panel_scales = *w.panel_scales;
    const at::Tensor& b = *w.b;
    const int64_t n = w.n, count = (n + kW8A8Panel - 1) / kW8A8Panel;
    if (!panels.defined() || !panels.device().is_cpu() || panels.scalar_type() != at::kChar ||
        !panels.is_contiguous() || panels.dim() != 4 || !IsCpuFloat(panel_scales) ||
        !panel_scales.is_contiguous() || panel_scales.dim() != 3 || n < 1 || panels.size(0) != count ||
        panels.size(1) != k / 4 || panels.size(2) != kW8A8Panel || panels.size(3) != 4 ||
        panel_scales.size(0) != count || panel_scales.size(1) != k / kInt8Block ||
        panel_scales.size(2) != kW8A8Panel ||
        (b.defined() && (!IsCpuFloat(b) || !b.is_contiguous() || b.dim() != 1 || b.size(0) != n))) {
      return {};
    }
  }
  std::vector<at::Tensor> ys;
  for (const W8A8Matrix& w : matrices) ys.push_back(at::empty({m, w.n}, x.options()));
  if (m == 0) return ys;
  // The rows quantized once for every panel of every matrix: k bytes of values and k of
  // magnitudes per row, then the scales.
  std::vector<int8_t> q(static_cast<size_t>(m * k));
  std::vector<uint8_t> magnitude(q.size());
  std::vector<float> scales(static_cast<size_t>(m * (k / kInt8Block)));
  const QuantizedRows rows{q.data(), magnitude.data(), scales.data()};
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  ForChunks(m, 16, m * k >= 2 * kParallelWork, [&](int64_t begin, int64_t end) {
    QuantizedRows part{rows.q + begin * k, rows.magnitude + begin * k, rows.scales + begin * (k / kInt8Block)};
    QuantizeRowsAvx2(xp + begin * ldx, ldx, end - begin, k, part);
  });
  // Six panels (48 outputs) a task for a few rows; one when many rows make each panel a lot
  // of work. The VNNI kernel takes multiples of four (its 512-bit tiles).
  const bool vnni = UseVnni();
  const int64_t chunk = m >= 16 ? (vnni ? 4 : 1) : (vnni ? 8 : 6);
  auto* kernel = vnni ? &W8A8Vnni : &W8A8Avx2;
  // The matrices' panels numbered one after another, each matrix from a multiple of `chunk`
  // (the numbers between are no panel), so every task lies within one matrix and starts where
  // it would on that matrix alone.
  std::vector<W8A8Args> args(matrices.size());
  std::vector<int64_t> first(matrices.size() + 1, 0);
  for (size_t i = 0; i < matrices.size(); ++i) {
    const W8A8Matrix& w = matrices[i];
    W8A8Args& a = args[i];
    a.x = rows;
    a.m = m;
    a.k = k;
    a.panels = w.panels->data_ptr<int8_t>();
    a.panel_scales = w.panel_scales->data_ptr<float>();
    a.n = w.n;
    a.b = w.b->defined() ? w.b->data_ptr<float>() : nullptr;
    a.y = ys[i].data_ptr<float>();
    a.ldy = w.n;
    const int64_t count = (w.n + kW8A8Panel - 1) / kW8A8Panel;
    first[i + 1] = first[i] + (count + chunk - 1) / chunk * chunk;
  }
  const int64_t total = first.back();
  ForChunks(total, chunk, total * kW8A8Panel * k * m >= 2 * kParallelWork, [&](int64_t begin, int64_t end) {
    for (size_t i = 0; i < args.size(); ++i) {
      const int64_t count = (args[i].n + kW8A8Panel - 1) / kW8A8Panel;
      const int64_t p0 = std::max(begin, first[i]) - first[i];
      const int64_t p1 = std::min(end - first[i], count);
      if (p0 < p1) kernel(args[i], p0, p1);
    }
  });
  return ys;
}

bool LoraSegments(const at::Tensor& x, at::Tensor& y, const std::vector<LoraSegment>& segments) {
  const Isa isa = SelectedIsa();
  if (isa == Isa::kNone || !IsCpuFloat(x) || !IsCpuFloat(y) || x.dim() != 2 || y.dim() != 2 ||
      x.stride(1) != 1 || y.stride(1) != 1 || x.size(0) != y.size(0)) {
    return false;
  }
  const int64_t in = x.size(1), out = y.size(1);
  // Scratch offsets of each segment's x·aᵀ ([length, rank]).
  std::vector<int64_t> t_offset(segments.size() + 1, 0);
  int64_t shrink_work = 0, expand_work = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const LoraSegment& s = segments[i];
    const at::Tensor& a = *s.a;
    const at::Tensor& bt = *s.bt;
    if (!IsCpuWeight(a) || !IsCpuWeight(bt) || a.dim() != 2 || bt.dim() != 2 || a.size(1) != in ||
        bt.size(1) != out || bt.size(0) != a.size(0) || a.stride(1) != 1 || bt.stride(1) != 1 ||
        s.length < 1 || s.length > kLinearMaxRows || s.offset < 0 || s.offset + s.length > x.size(0)) {
      return false;
    }
    t_offset[i + 1] = t_offset[i] + s.length * a.size(0);
    shrink_work += s.length * a.size(0) * in;
    expand_work += s.length * a.size(0) * out;
  }
  auto* kernel = isa == Isa::kAvx512 ? &LinearAvx512 : &LinearAvx2;
  constexpr int64_t kBlock = 48;  // As in Linear(): a multiple of both ISAs' tile widths.
  // Tasks: (segment, block of kBlock outputs) of one pass.
  std::vector<std::pair<int64_t, int64_t>> tasks;
  // With segments enough to share among the threads, an expand task covers as many outputs as
  // its rows' accumulators fit in L1 (whole rows of bt for a decode row: one stream each),
  // else blocks of kExpandBlock so that a few segments still spread over every thread.
  const bool many = static_cast<int64_t>(segments.size()) >= 4 * at::get_num_threads();
  auto expand_block = [&](const LoraSegment& s) {
    if (!many) return kExpandBlock;
    return std::max(kExpandBlock, kExpandRankOuterFloats / s.length / kExpandBlock * kExpandBlock);
  };
  auto make_tasks = [&](bool shrink) {
    tasks.clear();
    for (size_t i = 0; i < segments.size(); ++i) {
      const int64_t n = shrink ? segments[i].a->size(0) : out;
      const int64_t block = shrink ? kBlock : expand_block(segments[i]);
      for (int64_t n0 = 0; n0 < n; n0 += block) tasks.emplace_back(static_cast<int64_t>(i), n0);
    }
  };
  std::vector<float> t(static_cast<size_t>(t_offset.back()));
  float* const xp = x.data_ptr<float>();
  float* const yp = y.data_ptr<float>();
  auto* expand = isa == Isa::kAvx512 ? &ExpandAvx512 : &ExpandAvx2;
  auto shrink_args = [&](size_t i) {
    const LoraSegment& s = segments[i];
    LinearArgs args{xp + s.offset * x.stride(0), x.stride(0), s.a->data_ptr(), s.a->stride(0),
                    nullptr, t.data() + t_offset[i], s.a->size(0), s.length, in};
    args.w_type = WeightTypeOf(*s.a);
    return args;
  };
  auto expand_args = [&](size_t i) {
    const LoraSegment& s = segments[i];
    const int64_t rank = s.a->size(0);
    ExpandArgs args{t.data() + t_offset[i], rank, s.bt->data_ptr(), s.bt->stride(0),
                    yp + s.offset * y.stride(0), y.stride(0), s.length, rank};
    args.w_type = WeightTypeOf(*s.bt);
    args.scale = s.scale;
    return args;
  };
  // Many segments whose rows' accumulators fit in L1 (decode rows over many adapters): one
  // pass, a task per segment doing its shrink then its expand (its x·aᵀ still in L1), the
  // largest first and taken one at a time, so the threads finish together and meet once.
  bool fused = many;
  for (const LoraSegment& s : segments) fused = fused && s.length * out <= kExpandRankOuterFloats;
  if (fused) {
    std::vector<size_t> order(segments.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t p, size_t q) {
      return segments[p].length * segments[p].a->size(0) > segments[q].length * segments[q].a->size(0);
    });
    ForChunksInOrder(static_cast<int64_t>(order.size()), 1, shrink_work + expand_work >= 2 * kParallelWork,
              [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const size_t i = order[static_cast<size_t>(k)];
        kernel(shrink_args(i), 0, segments[i].a->size(0));
        expand(expand_args(i), 0, out);
      }
    });
    return true;
  }
  // A thread takes a few consecutive tasks at a time, so that each prefetches the factors of
  // the next (they are small: rows of a few KB, too short for the hardware to run ahead).
  auto chunk = [&] { return std::max<int64_t>(1, static_cast<int64_t>(tasks.size()) / (4 * at::get_num_threads())); };
  make_tasks(/*shrink=*/true);
  const int64_t shrink_chunk = chunk();
  ForChunks(static_cast<int64_t>(tasks.size()), shrink_chunk, shrink_work >= 2 * kParallelWork,
            [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [i, n0] = tasks[static_cast<size_t>(k)];
      const LoraSegment& s = segments[static_cast<size_t>(i)];
      const int64_t rank = s.a->size(0);
      LinearArgs args = shrink_args(static_cast<size_t>(i));
      if (k + 1 < end) {
        const auto [ni, nn0] = tasks[static_cast<size_t>(k + 1)];
        const at::Tensor& na = *segments[static_cast<size_t>(ni)].a;
        if (na.stride(0) == s.a->stride(0) && na.scalar_type() == s.a->scalar_type()) {
          args.w_next = static_cast<const char*>(na.data_ptr()) + nn0 * na.stride(0) * na.element_size();
        }
      }
      kernel(args, n0, std::min(rank, n0 + kBlock));
    }
  });
  make_tasks(/*shrink=*/false);
  ForChunks(static_cast<int64_t>(tasks.size()), chunk(), expand_work >= 2 * kParallelWork, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const auto [i, n0] = tasks[static_cast<size_t>(k)];
      const size_t i_s = static_cast<size_t>(i);
      expand(expand_args(i_s), n0, std::min(out, n0 + expand_block(segments[i_s])));
    }
  });
  return true;
}

at::Tensor LoraExpand(const at::Tensor& t, const at::Tensor& bt, float scale) {
  const Isa isa = SelectedIsa();
  if (isa == Isa::kNone || !IsCpuFloat(t) || !IsCpuWeight(bt) || t.dim() != 2 || bt.dim() != 2 ||
      t.size(1) != bt.size(0) || t.stride(1) != 1 || bt.stride(1) != 1) {
    return at::Tensor();
  }
  const int64_t m = t.size(0), out = bt.size(1), rank = bt.size(0);
  at::Tensor y = at::zeros({m, out}, t.options());
  if (m == 0 || out == 0) return y;
  ExpandArgs args{t.data_ptr<float>(), t.stride(0), bt.data_ptr(), bt.stride(0), y.data_ptr<float>(), out, m, rank};
  args.w_type = WeightTypeOf(bt);
  args.scale = scale;
  auto* expand = isa == Isa::kAvx512 ? &ExpandAvx512 : &ExpandAvx2;
  const int64_t blocks = (out + kExpandBlock - 1) / kExpandBlock;
  ForChunks(blocks, 1, m * rank * out >= 2 * kParallelWork, [&](int64_t begin, int64_t end) {
    expand(args, begin * kExpandBlock, std::min(out, end * kExpandBlock));
  });
  return y;
}

namespace {

template <class T>
void RmsNormRows(const float* x, int64_t ldx, const T* w, float* y, int64_t begin, int64_t end, int64_t d,
                 float eps) {
  constexpr int64_t kLanes = 16;
  for (int64_t i = begin; i < end; ++i) {
    const float* row = x + i * ldx;
    float partial[kLanes] = {};
    int64_t j = 0;
    for (; j + kLanes <= d; j += kLanes) {
      for (int64_t l = 0; l < kLanes; ++l) partial[l] += row[j + l] * row[j + l];
    }
    for (; j < d; ++j) partial[j % kLanes] += row[j] * row[j];
    float sum = 0;
    for (float p : partial) sum += p;
    const float r = 1.0f / std::sqrt(sum / static_cast<float>(d) + eps);
    float* out = y + i * d;
    for (j = 0; j < d; ++j) {
      const float normed = row[j] * r;
      out[j] = static_cast<float>(w[j]) * normed;  // 16-bit weights widen exactly.
    }
  }
}

}  // namespace

at::Tensor RmsNorm(const at::Tensor& x, const at::Tensor& w, double eps) {
  if (SelectedIsa() == Isa::kNone || !IsCpuFloat(x) || x.dim() != 2 || x.stride(1) != 1 || !IsCpuMatrix(w) ||
      w.dim() != 1 || !w.is_contiguous() || w.size(0) != x.size(1)) {
    return at::Tensor();
  }
  const int64_t m = x.size(0), d = x.size(1);
  at::Tensor y = at::empty({m, d}, x.options());
  if (m == 0 || d == 0) return y;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  const float e = static_cast<float>(eps);
  ForChunks(m, 16, m * d >= 8 * kParallelWork, [&](int64_t begin, int64_t end) {
    switch (w.scalar_type()) {
      case at::kBFloat16: RmsNormRows(xp, ldx, w.data_ptr<at::BFloat16>(), yp, begin, end, d, e); break;
      case at::kHalf: RmsNormRows(xp, ldx, w.data_ptr<at::Half>(), yp, begin, end, d, e); break;
      default: RmsNormRows(xp, ldx, w.data_ptr<float>(), yp, begin, end, d, e); break;
    }
  });
  return y;
}

bool RotateInPlace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  if (SelectedIsa() == Isa::kNone || !IsCpuFloat(x) || !IsCpuFloat(cos) || !IsCpuFloat(sin) || x.dim() != 2 ||
      x.stride(1) != 1 || head_dim < 2 || head_dim % 2 != 0 || x.size(1) % head_dim != 0 || !cos.is_contiguous() ||
      !sin.is_contiguous() || cos.numel() != x.size(0) * head_dim || sin.numel() != cos.numel()) {
    return false;
  }
  const int64_t m = x.size(0), heads = x.size(1) / head_dim, half = head_dim / 2, ldx = x.stride(0);
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  ForChunks(m, 16, m * x.size(1) >= 8 * kParallelWork, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float* c = cp + i * head_dim;
      const float* s = sp + i * head_dim;
      for (int64_t h = 0; h < heads; ++h) {
        float* lo = xp + i * ldx + h * head_dim;
        float* hi = lo + half;
        for (int64_t j = 0; j < half; ++j) {
          const float a = lo[j], b = hi[j];
          // Each product rounded, then the sum: no fused multiply-add (this unit is built for
          // the baseline ISA, which has none), as ATen's x·cos + rotated·sin rounds.
          const float lo_cos = a * c[j], lo_sin = -b * s[j];
          const float hi_cos = b * c[j + half], hi_sin = a * s[j + half];
          lo[j] = lo_cos + lo_sin;
          hi[j] = hi_cos + hi_sin;
        }
      }
    }
  });
  return true;
}

bool CachedAttentionApplies(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& out) {
  return SelectedIsa() != Isa::kNone && IsCpuFloat(q) && IsCpuFloat(k) && IsCpuFloat(v) &&
         IsCpuFloat(out) && q.dim() == 2 && k.dim() == 2 && v.dim() == 2 && out.dim() == 2 &&
         q.stride(1) == 1 && k.stride(1) == 1 && v.stride(1) == 1 && k.stride(0) == v.stride(0) &&
         out.is_contiguous();
}

bool KvCacheApplies(const KvCache& cache) {
  const at::TensorOptions& o = cache.options();
  return o.device().is_cpu() && (o.dtype() == at::kFloat || o.dtype() == at::kBFloat16 || o.dtype() == at::kHalf);
}

void CachedAttention(int64_t layer, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<CachedRow>& rows, int64_t num_heads, int64_t kv_heads,
                     int64_t head_dim, double scale, int64_t window, at::Tensor& out) {
  const int64_t group = num_heads / kv_heads;
  int64_t work = 0;
  int64_t longest = 0;
  // Per row, where kv head 0 of each segment lies (shared segments, then the own blocks), and
  // how far on in bytes the next head starts (a block's heads lie kBlock positions apart even
  // where it holds fewer, see KvCache::AlignBlocks): the tasks add h times that.
  std::vector<std::vector<KvSpan>> row_spans(rows.size());
  std::vector<std::vector<int64_t>> head_bytes(rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    const CachedRow& r = rows[i];
    TORCH_CHECK(r.length >= 1, "a cached-attention row needs at least one position");
    const int64_t total = r.cache->length() + r.length;
    r.cache->Reserve(total);
    TORCH_CHECK(KvCacheApplies(*r.cache), "KV cache is not CPU float32, bfloat16 or float16");
    // Every segment has the cache's dtype and device, each head's rows contiguous (KvCache).
    const int64_t element = static_cast<int64_t>(r.cache->options().dtype().itemsize());
    for (const std::vector<KvCache::Segment>* part : {&r.cache->segments(), &r.cache->blocks()}) {
      for (const KvCache::Segment& seg : *part) {
        row_spans[i].push_back({seg.begin, seg.begin + seg.length, seg.keys[layer].data_ptr(),
                                seg.values[layer].data_ptr()});
        head_bytes[i].push_back(seg.keys[layer].stride(0) * element);
      }
    }
    longest = std::max(longest, total);
    // Scores and weighted sums over the positions each query sees.
    const int64_t seen = window > 0 ? r.length * std::min(total, window) : r.length * (2 * total - r.length + 1) / 2;
    work += seen * num_heads * head_dim * 2;
  }
  auto* kernel = SelectedIsa() == Isa::kAvx512 ? &AttendAvx512 : &AttendAvx2;
  const int64_t tasks = static_cast<int64_t>(rows.size()) * kv_heads;
  ForChunks(tasks, 1, work >= kParallelWork, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(std::max(kAttendRows, group) * longest);
    std::vector<AttendTileRow> tile_rows(std::max(kAttendRows, group));
    std::vector<KvSpan> spans;
    for (int64_t t = begin; t < end; ++t) {
      const size_t ri = static_cast<size_t>(t / kv_heads);
      const CachedRow& r = rows[ri];
      const int64_t h = t % kv_heads;
      spans = row_spans[ri];
      for (size_t s = 0; s < spans.size(); ++s) {
        const int64_t offset = h * head_bytes[ri][s];
        spans[s].keys = static_cast<const char*>(spans[s].keys) + offset;
        spans[s].values = static_cast<const char*>(spans[s].values) + offset;
      }
      AttendArgs a;
      a.q = q.data_ptr<float>() + r.index * q.stride(0) + h * group * head_dim;
      a.k = k.data_ptr<float>() + r.index * k.stride(0) + h * head_dim;
      a.v = v.data_ptr<float>() + r.index * v.stride(0) + h * head_dim;
      a.q_stride = q.stride(0);
      a.kv_stride = k.stride(0);
      a.spans = spans.data();
      a.num_spans = static_cast<int64_t>(spans.size());
      a.kv_type = WeightTypeOf(c10::typeMetaToScalarType(r.cache->options().dtype()));
      a.out = out.data_ptr<float>() + r.index * out.stride(0) + h * group * head_dim;
      a.out_stride = out.stride(0);
      a.scores = scores.data();
      a.tile_rows = tile_rows.data();
      a.count = r.length;
      a.group = group;
      a.head_dim = head_dim;
      a.window = window;
      a.position = r.cache->length();
      a.scale = static_cast<float>(scale);
      kernel(a);
    }
  });
}

}  // namespace adapterd::core::cpu
