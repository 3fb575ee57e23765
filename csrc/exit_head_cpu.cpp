// The exit head's CPU path: per-row softmax statistics of x @ W^T without the (rows, V) logits.
//
//   exit_head_cpu_kernel(dtype) -> str      the kernel the op runs for weights of that dtype here
//   exit_head_cpu_pack(weight [n, d]) -> packed          once per head, brgemm kernels only (cached
//                                                        by the Python side)
//   exit_head_cpu(hidden [R, d], w, n, norm, norm_weight?, norm_bias?, eps, bias?, softcap?, kernel?)
//       -> (top_prob [R] f32, gap [R] f32, pos [R] i64)  every exit check
//   exit_head_cpu_stats(same arguments)
//       -> (max [R] f32, sum [R] f32, pos [R] i64, second [R] f32, second_pos [R] i64)
//                                                        the raw statistics below (a shard's partials
//                                                        under tensor parallel: exit_partials.py)
//
// x = norm(hidden) as Hugging Face rounds it, y = x @ W^T over the n candidates, z = y, or with a
// soft-cap (Gemma2's final_logit_softcapping) z = cap * tanh(y / cap), then z += bias; then per
// row M = max z, S = sum exp(z - M), T = second largest z (a tie counts twice), pos = lowest
// position of M: top_prob = 1 / S, gap = (1 - exp(T - M)) / S. Rows holding inf/NaN: NaN and
// pos -1. exit_head_cpu_stats returns (M, S, pos, T, second_pos = lowest position of T other than pos,
// -1 when T = -inf) instead, NaN / -1 for rows holding inf/NaN; exit_head_cpu is the final loop over
// the same statistics. The norm and the finishing run here, not as torch ops: a handful of tiny ATen ops per
// exit check each open an OpenMP region, and on a loaded machine each region waits for a core
// (measured: 50-80 ms per check at R=64 on this 2-core machine, more than the GEMM).
//
// Kernels (one per weight dtype and CPU, chosen by exit_head_cpu_kernel, or forced by `kernel`):
//   brgemm      fp32 W (and bf16 W where oneDNN has a bf16 brgemm, i.e. AMX): W^T packed once into
//               blocks of 64 candidates, each a contiguous (K, 64) panel (bf16 in oneDNN's VNNI
//               layout, K padded to even), multiplied with oneDNN's batch-reduce GEMM.
//   avx512bf16  bf16 W without AMX: W read as stored, row-major bf16, no copy; vdpbf16ps with fp32
//               accumulation (exit_head_cpu_dot.cpp).
//   avx512      bf16 W without AVX512-BF16, and fp16 W: W read as stored; each vector converted to
//               fp32 in registers (exact), fp32 FMA.
//   scalar      bf16 / fp16 W on CPUs without AVX-512 (portable, slow: the Python side prefers its
//               torch fallback there, and says so).
// Every kernel fills, per task of consecutive candidates, a small fp32 logits buffer that stays in
// L2 (<= 1 MiB for brgemm, <= 256 KiB for the row-major kernels) and reduces it at once: soft-cap
// (vectorised tanh, exit_head_cpu_rowstats.h), bias, then max, position, second and sum-exp per
// row. Tasks run in parallel (at::parallel_for) and their partials are merged in task order; the
// tasks depend on R only, so the result does not depend on the number of threads. W is streamed
// once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "exit_head_cpu_dot.h"

#if defined(CPUBLAS_BRGEMM_F32F32F32) && defined(CPUBLAS_BRGEMM_BF16BF16F32)
#define ADAINFER_HAS_BRGEMM 1
#else
#define ADAINFER_HAS_BRGEMM 0
#endif

namespace adainfer {
namespace {

constexpr int64_t kBlockN = 64;        // candidates per packed panel (oneDNN packs at most 64 columns)
constexpr int64_t kBufferBytes = 1 << 20;  // logits buffer per task: rows x columns x 4 B <= 1 MiB (L2)
constexpr int64_t kMaxBlocksPerTask = 32;  // <= 2048 columns per task
constexpr int64_t kRowTile = 64;       // brgemm rows per call
constexpr int64_t kDotBufferBytes = 256 << 10;  // logits buffer per task of the row-major kernels
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// bf16 panels pair up consecutive k (VNNI), so K is padded to even.
int64_t padded_k(int64_t d, at::ScalarType dt) { return dt == at::kBFloat16 ? (d + 1) / 2 * 2 : d; }

#if ADAINFER_HAS_BRGEMM
void gemm_panel(int64_t m, int64_t k, int64_t ldc, const float* a, const float* b, float* c) {
  at::native::cpublas::brgemm(m, kBlockN, k, k, kBlockN, ldc, false, a, b, c, false);
}
void gemm_panel(int64_t m, int64_t k, int64_t ldc, const at::BFloat16* a, const at::BFloat16* b, float* c) {
  at::native::cpublas::brgemm(m, kBlockN, k, k, kBlockN, ldc, false, a, b, c, true);
}
void release(at::ScalarType dt) { at::native::cpublas::brgemm_release(dt == at::kBFloat16); }
#endif

bool probe(at::ScalarType dt) {
#if ADAINFER_HAS_BRGEMM
  try {
    const int64_t m = 2, k = 4;
    std::vector<float> c(m * kBlockN, 0.f);
    if (dt == at::kFloat) {
      std::vector<float> a(m * k, 1.f), b(k * kBlockN, 1.f);
      gemm_panel(m, k, kBlockN, a.data(), b.data(), c.data());
    } else {
      std::vector<at::BFloat16> a(m * k, at::BFloat16(1.f)), b(k * kBlockN, at::BFloat16(1.f)), p(k * kBlockN);
      at::native::cpublas::pack(k, kBlockN, kBlockN, kBlockN, dt, dt, b.data(), p.data());
      gemm_panel(m, k, kBlockN, a.data(), p.data(), c.data());
    }
    release(dt);
    return std::all_of(c.begin(), c.end(), [&](float v) { return v == static_cast<float>(k); });
  } catch (const std::exception&) {
    return false;
  }
#else
  (void)dt;
  return false;
#endif
}

// oneDNN's brgemm for panels of this dtype (fp32: AVX-512; bf16: AMX), probed once per dtype.
bool brgemm_supported(at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kBFloat16) return false;
  static std::once_flag once[2];
  static bool ok[2] = {false, false};
  const int slot = dtype == at::kFloat ? 0 : 1;
  std::call_once(once[slot], [&] { ok[slot] = probe(dtype); });
  return ok[slot];
}

const char* const kKernels[] = {"brgemm", "avx512bf16", "avx512", "scalar"};

// Whether `kernel` runs weights of dtype `w` on this CPU (and this torch build).
bool kernel_runs(const std::string& kernel, at::ScalarType w) {
  const bool half = w == at::kBFloat16 || w == at::kHalf;
  if (kernel == "brgemm") return brgemm_supported(w == at::kHalf ? at::kFloat : w);
  if (kernel == "avx512bf16") return w == at::kBFloat16 && dot::cpu_has_avx512bf16();
  if (kernel == "avx512") return half && dot::cpu_has_avx512();
  if (kernel == "scalar") return half;
  return false;
}

// The kernel the op runs for weights of this dtype ("" when none): the fastest that runs here.
// bf16: brgemm where oneDNN has a bf16 brgemm (AMX), else the row-major kernels; fp16 always
// row-major (2 bytes streamed per weight instead of an fp32 copy's 4).
std::string exit_head_cpu_kernel(at::ScalarType dtype) {
  if (dtype == at::kFloat) return brgemm_supported(dtype) ? "brgemm" : "";
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return "";
  for (const char* k : {"brgemm", "avx512bf16", "avx512"})
    if ((dtype == at::kBFloat16 || std::string(k) != "brgemm") && kernel_runs(k, dtype)) return k;
  return "scalar";
}

bool exit_head_cpu_supported(at::ScalarType dtype) { return !exit_head_cpu_kernel(dtype).empty(); }

struct Stats {
  float max = kNegInf;
  float sum = 0.f;
  int64_t pos = 0;
  float second = kNegInf;
  int64_t second_pos = -1;  // found only for exit_head_cpu_stats; meaningless while second = -inf
};

// ---- row statistics of a buffer of fp32 logits, one copy per instruction set ----
#define ADAINFER_RS_NS rs_base
#define ADAINFER_RS_BYTES 16
#define ADAINFER_RS_TARGET
#include "exit_head_cpu_rowstats.h"
#undef ADAINFER_RS_NS
#undef ADAINFER_RS_BYTES
#undef ADAINFER_RS_TARGET
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAINFER_RS_NS rs_avx2
#define ADAINFER_RS_BYTES 32
#define ADAINFER_RS_TARGET __attribute__((target("avx2,fma")))
#include "exit_head_cpu_rowstats.h"
#undef ADAINFER_RS_NS
#undef ADAINFER_RS_BYTES
#undef ADAINFER_RS_TARGET
#define ADAINFER_RS_NS rs_avx512
#define ADAINFER_RS_BYTES 64
#define ADAINFER_RS_TARGET __attribute__((target("avx512f")))
#include "exit_head_cpu_rowstats.h"
#undef ADAINFER_RS_NS
#undef ADAINFER_RS_BYTES
#undef ADAINFER_RS_TARGET
#endif

using RowStatsFn = Stats (*)(const float*, int64_t);
using SoftcapFn = void (*)(float*, int64_t, float);

// The widest copy this CPU runs (picked once).
int isa_level() {
  static const int level = [] {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (__builtin_cpu_supports("avx512f")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
  }();
  return level;
}

RowStatsFn row_stats_fn() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa_level() == 2) return &rs_avx512::row_stats;
  if (isa_level() == 1) return &rs_avx2::row_stats;
#endif
  return &rs_base::row_stats;
}

SoftcapFn softcap_fn() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa_level() == 2) return &rs_avx512::softcap_inplace;
  if (isa_level() == 1) return &rs_avx2::softcap_inplace;
#endif
  return &rs_base::softcap_inplace;
}

// Merge b (later candidates) into a: on equal maxima a's lower position stays, second = max (gap 0).
// The second's position follows the same rule: on equal values a's (lower) position stays.
void merge_into(Stats& a, const Stats& b) {
  if (b.max > a.max) {
    a.sum = (a.max == kNegInf ? 0.f : a.sum * std::exp(a.max - b.max)) + b.sum;
    a.second_pos = a.max >= b.second ? a.pos : b.second_pos;
    a.second = std::max(a.max, b.second);
    a.max = b.max;
    a.pos = b.pos;
  } else {
    if (b.max != kNegInf) a.sum += b.sum * std::exp(b.max - a.max);
    if (b.max > a.second) a.second_pos = b.pos;
    a.second = std::max(a.second, b.max);
  }
}

// Lowest position j != st.pos holding st.second in a row of n logits (the vectorised row_stats keeps
// the second's value only): one scan of the L2-resident buffer, run for exit_head_cpu_stats only.
int64_t second_position(const float* c, int64_t n, const Stats& st) {
  if (!(st.second > kNegInf)) return -1;
  for (int64_t j = 0; j < n; ++j)
    if (c[j] == st.second && j != st.pos) return j;
  return -1;  // only with NaN logits
}

at::Tensor exit_head_cpu_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "exit_head_cpu_pack: weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0,
              "exit_head_cpu_pack: weight must be a non-empty 2-D (n, d) tensor, got shape ", weight.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16, "exit_head_cpu_pack: weight must be fp32 or bf16, got ", dt);
  TORCH_CHECK(brgemm_supported(dt), "exit_head_cpu_pack: this CPU/torch build has no brgemm for ", dt,
              dt == at::kBFloat16 ? " (oneDNN's bf16 brgemm needs AMX): the row-major kernels "
                                    "(exit_head_cpu_kernel) take the (n, d) weight as it is, unpacked"
                                  : "");
  const at::Tensor w = weight.contiguous();
  const int64_t n = w.size(0), d = w.size(1), kp = padded_k(d, dt);
  const int64_t n_blocks = (n + kBlockN - 1) / kBlockN;
  at::Tensor out = at::empty({n_blocks, kp * kBlockN}, w.options());
  auto fill_panel = [&](auto* src, auto* panel, int64_t blk) {
    // panel[k][j] = W[blk * 64 + j][k], zero beyond n and d.
    using T = std::remove_pointer_t<decltype(panel)>;
    std::fill(panel, panel + kp * kBlockN, T(0.f));
    const int64_t rows = std::min(kBlockN, n - blk * kBlockN);
    for (int64_t j = 0; j < rows; ++j) {
      const auto* wr = src + (blk * kBlockN + j) * d;
      for (int64_t k = 0; k < d; ++k) panel[k * kBlockN + j] = wr[k];
    }
  };
  if (dt == at::kFloat) {
    const float* src = w.const_data_ptr<float>();
    float* dst = out.mutable_data_ptr<float>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) fill_panel(src, dst + b * kp * kBlockN, b);
    });
  } else {
#if ADAINFER_HAS_BRGEMM
    const at::BFloat16* src = w.const_data_ptr<at::BFloat16>();
    at::BFloat16* dst = out.mutable_data_ptr<at::BFloat16>();
    at::parallel_for(0, n_blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<at::BFloat16> tmp(kp * kBlockN);
      for (int64_t b = b0; b < b1; ++b) {
        fill_panel(src, tmp.data(), b);
        at::native::cpublas::pack(kp, kBlockN, kBlockN, kBlockN, dt, dt, tmp.data(), dst + b * kp * kBlockN);
      }
    });
#endif
  }
  return out;
}

// The LM head's input rows, as Hugging Face computes them, in the compute dtype CT and padded to kp:
// RMSNorm (norm 1): fp32 statistics, cast to the model dtype MT, times the weight, cast to MT;
// LayerNorm (norm 2): fp32 (x - mean) * rstd * weight + bias, cast to MT; none (0): x. Statistics
// are accumulated in double (HF: fp32 reductions; both are within an fp32 rounding of the exact
// value). bad[r] = the row holds inf or NaN.
template <typename MT, typename CT>
void prepare_rows(const at::Tensor& h, int64_t norm, const MT* g, const MT* b, double eps, int64_t kp, CT* out,
                  uint8_t* bad) {
  const int64_t rows = h.size(0), d = h.size(1);
  const MT* hp = h.const_data_ptr<MT>();
  const float epsf = static_cast<float>(eps);
  // Sequential: (R, d) is small next to the (d, V) weight, and a parallel region costs more than it
  // saves when the machine is loaded.
  {
    for (int64_t r = 0; r < rows; ++r) {
      const MT* x = hp + r * d;
      CT* y = out + r * kp;
      bool finite = true;
      double s1 = 0.0, s2 = 0.0;
      for (int64_t k = 0; k < d; ++k) {
        const float v = static_cast<float>(x[k]);
        finite = finite && std::isfinite(v);
        s1 += v;
        s2 += static_cast<double>(v) * v;
      }
      bad[r] = finite ? 0 : 1;
      if (norm == 1) {
        const float rstd = 1.f / std::sqrt(static_cast<float>(s2 / d) + epsf);
        for (int64_t k = 0; k < d; ++k) {
          const MT normed = static_cast<MT>(static_cast<float>(x[k]) * rstd);
          y[k] = static_cast<CT>(static_cast<float>(static_cast<MT>(static_cast<float>(g[k]) * static_cast<float>(normed))));
        }
      } else if (norm == 2) {
        const double mean = s1 / d;
        double sv = 0.0;
        for (int64_t k = 0; k < d; ++k) {
          const double c = static_cast<double>(static_cast<float>(x[k])) - mean;
          sv += c * c;
        }
        const float rstd = 1.f / std::sqrt(static_cast<float>(sv / d) + epsf);
        const float meanf = static_cast<float>(mean);
        for (int64_t k = 0; k < d; ++k) {
          float v = (static_cast<float>(x[k]) - meanf) * rstd * static_cast<float>(g[k]);
          if (b != nullptr) v += static_cast<float>(b[k]);
          y[k] = static_cast<CT>(static_cast<float>(static_cast<MT>(v)));
        }
      } else {
        for (int64_t k = 0; k < d; ++k) y[k] = static_cast<CT>(static_cast<float>(x[k]));
      }
      for (int64_t k = d; k < kp; ++k) y[k] = static_cast<CT>(0.f);
    }
  }
}

// Per-row statistics over n_cand candidates in tasks of `per_task` consecutive candidates:
// fill(task, c0, cols, buf, ldc) writes the task's fp32 logits buf[r * ldc + j] (candidate c0 + j);
// softcap > 0 caps them (before the bias), 0 leaves them as they are. done() runs once per thread
// chunk after its tasks (brgemm's release). Partials are merged in task order. second_pos: also find the
// second's position (exit_head_cpu_stats); without it the work is exit_head_cpu's, unchanged.
template <typename Fill, typename Done>
void run_tasks(int64_t rows, int64_t n_cand, int64_t per_task, int64_t ldc, const float* bias, float softcap,
               bool second_pos, Stats* out, const Fill& fill, const Done& done) {
  const int64_t n_tasks = (n_cand + per_task - 1) / per_task;
  std::vector<Stats> partial(n_tasks * rows);
  const RowStatsFn row_stats = row_stats_fn();
  const SoftcapFn cap_logits = softcap_fn();
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(rows * ldc);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t c0 = task * per_task, cols = std::min(n_cand, c0 + per_task) - c0;
      fill(c0, cols, buf.data());
      for (int64_t r = 0; r < rows; ++r) {
        float* c = buf.data() + r * ldc;
        if (softcap > 0.f) cap_logits(c, cols, softcap);
        if (bias != nullptr)
          for (int64_t j = 0; j < cols; ++j) c[j] += bias[c0 + j];
        Stats st = row_stats(c, cols);
        if (second_pos) {
          st.second_pos = second_position(c, cols, st);
          if (st.second_pos >= 0) st.second_pos += c0;
        }
        st.pos += c0;
        partial[task * rows + r] = st;
      }
    }
    done();
  });
  for (int64_t r = 0; r < rows; ++r) {
    Stats acc = partial[r];
    for (int64_t task = 1; task < n_tasks; ++task) merge_into(acc, partial[task * rows + r]);
    out[r] = acc;
  }
}

// brgemm: x (R, kp) against the packed panels, a task = up to kMaxBlocksPerTask panels.
template <typename T>
void stats_brgemm(const T* xa, int64_t rows, const at::Tensor& packed, int64_t n_cand, const float* bias,
                  float softcap, bool second_pos, Stats* out) {
#if ADAINFER_HAS_BRGEMM
  const int64_t kp = packed.size(1) / kBlockN, n_blocks = packed.size(0);
  const T* wp = packed.const_data_ptr<T>();
  const int64_t per_task =
      std::clamp<int64_t>(kBufferBytes / (static_cast<int64_t>(sizeof(float)) * kBlockN * rows), 1, kMaxBlocksPerTask);
  const int64_t ldc = per_task * kBlockN;
  auto fill = [&](int64_t c0, int64_t /*cols*/, float* buf) {
    const int64_t blk0 = c0 / kBlockN, blk1 = std::min(n_blocks, blk0 + per_task);
    for (int64_t blk = blk0; blk < blk1; ++blk) {
      float* c = buf + (blk - blk0) * kBlockN;
      for (int64_t r0 = 0; r0 < rows; r0 += kRowTile)
        gemm_panel(std::min(kRowTile, rows - r0), kp, ldc, xa + r0 * kp, wp + blk * kp * kBlockN, c + r0 * ldc);
    }
  };
  run_tasks(rows, n_cand, ldc, ldc, bias, softcap, second_pos, out, fill, [&] { release(packed.scalar_type()); });
#else
  (void)xa, (void)rows, (void)packed, (void)n_cand, (void)bias, (void)softcap, (void)second_pos, (void)out;
  TORCH_CHECK(false, "exit_head_cpu: built without cpublas::brgemm");
#endif
}

// Row-major kernels: x (R, kx) against W (n_cand, d) as stored, a task = a 256 KiB logits buffer
// (64 to 4096 candidates, a multiple of 64).
void stats_rowmajor(const std::string& kernel, const void* xa, int64_t rows, int64_t kx, const at::Tensor& w,
                    const float* bias, float softcap, bool second_pos, Stats* out) {
  const int64_t n_cand = w.size(0), d = w.size(1);
  const uint16_t* wp = static_cast<const uint16_t*>(w.const_data_ptr());
  const bool fp16 = w.scalar_type() == at::kHalf;
  const int64_t per_task = std::clamp<int64_t>(kDotBufferBytes / (4 * rows) / 64 * 64, 64, 4096);
  auto fill = [&](int64_t c0, int64_t cols, float* buf) {
    const uint16_t* wt = wp + c0 * d;
    if (kernel == "avx512bf16")
      dot::logits_avx512bf16(static_cast<const uint16_t*>(xa), rows, kx, wt, cols, d, buf, per_task);
    else if (kernel == "avx512")
      dot::logits_avx512(static_cast<const float*>(xa), rows, kx, wt, fp16, cols, d, buf, per_task);
    else
      dot::logits_scalar(static_cast<const float*>(xa), rows, kx, wt, fp16, cols, d, buf, per_task);
  };
  run_tasks(rows, n_cand, per_task, per_task, bias, softcap, second_pos, out, fill, [] {});
}

// Per-row statistics of both ops, and which rows hold inf/NaN (bad[r] != 0).
struct RowStats {
  std::vector<Stats> st;
  std::vector<uint8_t> bad;
};

// The arguments' checks and the vocabulary pass of both ops (see exit_head_cpu); second_pos: also find
// the second's position (exit_head_cpu_stats).
RowStats row_statistics(const at::Tensor& hidden, const at::Tensor& w, int64_t n_cand, int64_t norm,
                        const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias,
                        double eps, const std::optional<at::Tensor>& bias, std::optional<double> softcap,
                        const std::optional<std::string>& kernel_arg, bool second_pos) {
  TORCH_CHECK(hidden.device().is_cpu() && w.device().is_cpu(), "exit_head_cpu: hidden and packed must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) > 0, "exit_head_cpu: hidden must be 2-D (R, d), got shape ",
              hidden.sizes());
  const auto mt = hidden.scalar_type();
  TORCH_CHECK(mt == at::kFloat || mt == at::kBFloat16 || mt == at::kHalf, "exit_head_cpu: hidden must be fp32, bf16 or fp16, got ", mt);
  const std::string kernel = kernel_arg.has_value() ? *kernel_arg : exit_head_cpu_kernel(mt);
  TORCH_CHECK(std::find(std::begin(kKernels), std::end(kKernels), kernel) != std::end(kKernels) || kernel.empty(),
              "exit_head_cpu: kernel must be one of brgemm, avx512bf16, avx512, scalar (or None), got '", kernel, "'");
  TORCH_CHECK(kernel_runs(kernel, mt), "exit_head_cpu: ",
              kernel.empty() ? std::string("no kernel") : "kernel '" + kernel + "'", " cannot run ", mt,
              " weights on this CPU/torch build",
              kernel == "brgemm" || kernel.empty() ? " (no brgemm for it: oneDNN's bf16 brgemm needs AMX)"
              : kernel == "avx512bf16"             ? " (needs AVX512-BF16 and bf16)"
              : kernel == "avx512"                 ? " (needs AVX-512 F/BW/VL/DQ and bf16 or fp16)"
                                                   : " (bf16 or fp16 only)");
  const bool rowmajor = kernel != "brgemm";
  // The rows' dtype in the kernel: bf16 for the bf16 GEMMs, else fp32 (bf16 / fp16 -> fp32 is exact).
  const auto ct = (kernel == "avx512bf16" || (kernel == "brgemm" && mt == at::kBFloat16)) ? at::kBFloat16 : at::kFloat;
  const int64_t d = hidden.size(1);
  int64_t kx = d;  // row stride of x
  if (rowmajor) {
    TORCH_CHECK(w.scalar_type() == mt && w.dim() == 2 && w.size(0) == n_cand && w.size(1) == d && w.is_contiguous(),
                "exit_head_cpu: the '", kernel, "' kernel takes the weight as it is stored: a contiguous ", mt,
                " tensor of shape (", n_cand, ", ", d, "), got ", w.scalar_type(), " ", w.sizes());
    kx = kernel == "avx512bf16" ? (d + 31) / 32 * 32 : kernel == "avx512" ? (d + 15) / 16 * 16 : d;
  } else {
    TORCH_CHECK(w.scalar_type() == ct, "exit_head_cpu: packed must be ", ct, " for ", mt, " hidden states, got ",
                w.scalar_type());
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(1) % kBlockN == 0,
                "exit_head_cpu: packed must come from exit_head_cpu_pack, got shape ", w.sizes());
    const int64_t kp = w.size(1) / kBlockN, n_blocks = w.size(0);
    TORCH_CHECK(kp == padded_k(d, ct), "exit_head_cpu: hidden has d=", d, " but packed was made for d=", kp,
                ct == at::kBFloat16 ? " (padded to even)" : "");
    TORCH_CHECK(n_cand > (n_blocks - 1) * kBlockN && n_cand <= n_blocks * kBlockN, "exit_head_cpu: n_cand=", n_cand,
                " does not match packed with ", n_blocks, " panels");
    kx = kp;
  }
  TORCH_CHECK(norm >= 0 && norm <= 2, "exit_head_cpu: norm must be 0 (none), 1 (rms) or 2 (layer), got ", norm);
  auto check_vec = [&](const std::optional<at::Tensor>& t, const char* name) -> at::Tensor {
    if (!t.has_value()) return {};
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == mt && t->dim() == 1 && t->size(0) == d, "exit_head_cpu: ",
                name, " must be a CPU ", mt, " tensor of shape (", d, ",), got ", t->scalar_type(), " ", t->sizes());
    return t->contiguous();
  };
  const at::Tensor g = check_vec(norm_weight, "norm_weight"), nb = check_vec(norm_bias, "norm_bias");
  TORCH_CHECK(norm == 0 || g.defined(), "exit_head_cpu: norm ", norm, " needs norm_weight");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, "exit_head_cpu: eps must be finite and >= 0, got ", eps);
  const float* bias_ptr = nullptr;
  at::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.device().is_cpu() && bc.scalar_type() == at::kFloat && bc.dim() == 1 && bc.size(0) == n_cand,
                "exit_head_cpu: bias must be a CPU fp32 tensor of shape (", n_cand, ",), got ", bc.scalar_type(), " ",
                bc.sizes());
    bias_ptr = bc.const_data_ptr<float>();
  }

  float cap = 0.f;  // 0: no soft-cap
  if (softcap.has_value()) {
    cap = static_cast<float>(*softcap);
    TORCH_CHECK(std::isfinite(*softcap) && std::isnormal(cap) && cap > 0.f,
                "exit_head_cpu: softcap must be a finite float > 0 (or None for no soft-capping), got ", *softcap);
  }

  const int64_t rows = hidden.size(0);
  const at::Tensor h = hidden.contiguous();
  at::Tensor x = at::empty({rows, kx}, hidden.options().dtype(ct));
  RowStats out{std::vector<Stats>(rows), std::vector<uint8_t>(rows, 0)};
  std::vector<Stats>& st = out.st;
  std::vector<uint8_t>& bad = out.bad;
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mt, "exit_head_cpu", [&] {
      const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* bp = nb.defined() ? nb.const_data_ptr<scalar_t>() : nullptr;
      if (ct == at::kBFloat16)
        prepare_rows<scalar_t, at::BFloat16>(h, norm, gp, bp, eps, kx, x.mutable_data_ptr<at::BFloat16>(), bad.data());
      else
        prepare_rows<scalar_t, float>(h, norm, gp, bp, eps, kx, x.mutable_data_ptr<float>(), bad.data());
    });
    if (rowmajor)
      stats_rowmajor(kernel, x.const_data_ptr(), rows, kx, w, bias_ptr, cap, second_pos, st.data());
    else if (ct == at::kFloat)
      stats_brgemm<float>(x.const_data_ptr<float>(), rows, w, n_cand, bias_ptr, cap, second_pos, st.data());
    else
      stats_brgemm<at::BFloat16>(x.const_data_ptr<at::BFloat16>(), rows, w, n_cand, bias_ptr, cap, second_pos,
                                 st.data());
  }
  return out;
}

// hidden (R, d) -> top_prob (R,) f32, gap (R,) f32, pos (R,) i64: the candidate position of the top-1
// (-1 for rows holding inf/NaN, whose top_prob and gap are NaN; NaN too when every logit is -inf).
// `w` is the brgemm kernel's packed panels (exit_head_cpu_pack) or, for the row-major kernels, the
// (n_cand, d) weight itself in the hidden states' dtype. kernel: None = exit_head_cpu_kernel's choice.
std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(const at::Tensor& hidden, const at::Tensor& w,
                                                             int64_t n_cand, int64_t norm,
                                                             const std::optional<at::Tensor>& norm_weight,
                                                             const std::optional<at::Tensor>& norm_bias, double eps,
                                                             const std::optional<at::Tensor>& bias,
                                                             std::optional<double> softcap,
                                                             const std::optional<std::string>& kernel_arg) {
  const RowStats rs =
      row_statistics(hidden, w, n_cand, norm, norm_weight, norm_bias, eps, bias, softcap, kernel_arg, false);
  const std::vector<Stats>& st = rs.st;
  const std::vector<uint8_t>& bad = rs.bad;
  const int64_t rows = hidden.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor top = at::empty({rows}, f32), gap = at::empty({rows}, f32);
  at::Tensor pos = at::empty({rows}, hidden.options().dtype(at::kLong));
  float* tp = top.mutable_data_ptr<float>();
  float* gp = gap.mutable_data_ptr<float>();
  int64_t* pp = pos.mutable_data_ptr<int64_t>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < rows; ++r) {
    // top_prob = exp(M - M) / S; the second probability exp(T - M) / S (0 when T = -inf).
    const Stats& s = st[r];
    const bool undefined = bad[r] != 0 || s.max == kNegInf;
    tp[r] = undefined ? nan : 1.f / s.sum;
    gp[r] = undefined ? nan : 1.f / s.sum - std::exp(s.second - s.max) / s.sum;
    pp[r] = bad[r] != 0 ? -1 : s.pos;
  }
  return {top, gap, pos};
}

// The same arguments -> the raw statistics (max M, sum S of exp(z - M), pos, second T, second_pos), each
// (R,): what exit_head_cpu's final loop reads, plus the second's position (lowest position of T other
// than pos; -1 when T = -inf, e.g. a single candidate). Rows holding inf/NaN: M, S, T NaN and both
// positions -1. A shard's exit partials under tensor parallel (adainfer_kernels/exit_partials.py).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> exit_head_cpu_stats(
    const at::Tensor& hidden, const at::Tensor& w, int64_t n_cand, int64_t norm,
    const std::optional<at::Tensor>& norm_weight, const std::optional<at::Tensor>& norm_bias, double eps,
    const std::optional<at::Tensor>& bias, std::optional<double> softcap,
    const std::optional<std::string>& kernel_arg) {
  const RowStats rs =
      row_statistics(hidden, w, n_cand, norm, norm_weight, norm_bias, eps, bias, softcap, kernel_arg, true);
  const int64_t rows = hidden.size(0);
  auto f32 = hidden.options().dtype(at::kFloat), i64 = hidden.options().dtype(at::kLong);
  at::Tensor mx = at::empty({rows}, f32), sum = at::empty({rows}, f32), second = at::empty({rows}, f32);
  at::Tensor pos = at::empty({rows}, i64), second_pos = at::empty({rows}, i64);
  float* mp = mx.mutable_data_ptr<float>();
  float* sp = sum.mutable_data_ptr<float>();
  float* tp = second.mutable_data_ptr<float>();
  int64_t* pp = pos.mutable_data_ptr<int64_t>();
  int64_t* qp = second_pos.mutable_data_ptr<int64_t>();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int64_t r = 0; r < rows; ++r) {
    const Stats& s = rs.st[r];
    const bool bad = rs.bad[r] != 0;
    mp[r] = bad ? nan : s.max;
    sp[r] = bad ? nan : s.sum;
    tp[r] = bad ? nan : s.second;
    pp[r] = bad ? -1 : s.pos;
    qp[r] = bad || !(s.second > kNegInf) ? -1 : s.second_pos;
  }
  return {mx, sum, pos, second, second_pos};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adainfer, m) {
  m.def("exit_head_cpu_supported(ScalarType dtype) -> bool", &exit_head_cpu_supported);
  m.def("exit_head_cpu_kernel(ScalarType dtype) -> str", &exit_head_cpu_kernel);
  m.def("exit_head_cpu_pack(Tensor weight) -> Tensor");
  m.def(
      "exit_head_cpu(Tensor hidden, Tensor packed, int n_cand, int norm, Tensor? norm_weight, Tensor? norm_bias, "
      "float eps, Tensor? bias, float? softcap=None, str? kernel=None) -> (Tensor, Tensor, Tensor)");
  m.def(
      "exit_head_cpu_stats(Tensor hidden, Tensor packed, int n_cand, int norm, Tensor? norm_weight, "
      "Tensor? norm_bias, float eps, Tensor? bias, float? softcap=None, str? kernel=None) -> "
      "(Tensor max, Tensor sum, Tensor pos, Tensor second, Tensor second_pos)");
}

TORCH_LIBRARY_IMPL(adainfer, CPU, m) {
  m.impl("exit_head_cpu_pack", &exit_head_cpu_pack);
  m.impl("exit_head_cpu", &exit_head_cpu);
  m.impl("exit_head_cpu_stats", &exit_head_cpu_stats);
}

}  // namespace adainfer
