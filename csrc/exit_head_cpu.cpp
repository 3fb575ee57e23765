// The exit head's CPU path: per-row softmax statistics of x @ W^T without the (rows, V) logits.
//
//   exit_head_cpu_pack(weight [n, d]) -> packed          once per head (cached by the Python side)
//   exit_head_cpu(hidden [R, d], packed, n, norm, norm_weight?, norm_bias?, eps, bias?, softcap?)
//       -> (top_prob [R] f32, gap [R] f32, pos [R] i64)  every exit check
//
// x = norm(hidden) as Hugging Face rounds it, y = x @ W^T over the n candidates, z = y, or with a
// soft-cap (Gemma2's final_logit_softcapping) z = cap * tanh(y / cap), then z += bias; then per
// row M = max z, S = sum exp(z - M), T = second largest z (a tie counts twice), pos = lowest
// position of M: top_prob = 1 / S, gap = (1 - exp(T - M)) / S. Rows holding inf/NaN: NaN and
// pos -1. The norm and the finishing run here, not as torch ops: a handful of tiny ATen ops per
// exit check each open an OpenMP region, and on a loaded machine each region waits for a core
// (measured: 50-80 ms per check at R=64 on this 2-core machine, more than the GEMM).
//
// Layout: W^T cut into blocks of 64 candidates, each a contiguous (K, 64) panel: fp32 panels as
// they are, bf16 panels in the VNNI layout of oneDNN's batch-reduce GEMM (cpublas::pack, K padded
// to even). The candidates are split into tasks of a few blocks; each task multiplies its panels
// with brgemm (AMX for bf16, AVX-512 for fp32; fp32 accumulation, fp32 logits) into a small
// buffer that stays in L2 (<= 1 MiB, <= 2048 columns) and reduces it at once: soft-cap (vectorised
// tanh, exit_head_cpu_rowstats.h), bias, then max, position, second and sum-exp per row. Tasks run
// in parallel (at::parallel_for) and their partials are merged in task order, so the result does
// not depend on the number of threads. W is streamed once.
//
// brgemm needs oneDNN's ukernel support on this CPU (AVX-512 or AMX): exit_head_cpu_supported
// probes it once per dtype, and the Python side falls back to chunked torch GEMMs without it.
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
#include <tuple>
#include <type_traits>
#include <vector>

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
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool dtype_supported(at::ScalarType dt) { return dt == at::kFloat || dt == at::kBFloat16; }

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

bool exit_head_cpu_supported(at::ScalarType dtype) {
  if (!dtype_supported(dtype)) return false;
  static std::once_flag once[2];
  static bool ok[2] = {false, false};
  const int slot = dtype == at::kFloat ? 0 : 1;
  std::call_once(once[slot], [&] { ok[slot] = probe(dtype); });
  return ok[slot];
}

struct Stats {
  float max = kNegInf;
  float sum = 0.f;
  int64_t pos = 0;
  float second = kNegInf;
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
void merge_into(Stats& a, const Stats& b) {
  if (b.max > a.max) {
    a.sum = (a.max == kNegInf ? 0.f : a.sum * std::exp(a.max - b.max)) + b.sum;
    a.second = std::max(a.max, b.second);
    a.max = b.max;
    a.pos = b.pos;
  } else {
    if (b.max != kNegInf) a.sum += b.sum * std::exp(b.max - a.max);
    a.second = std::max(a.second, b.max);
  }
}

at::Tensor exit_head_cpu_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.device().is_cpu(), "exit_head_cpu_pack: weight must be a CPU tensor, got ", weight.device());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0,
              "exit_head_cpu_pack: weight must be a non-empty 2-D (n, d) tensor, got shape ", weight.sizes());
  const auto dt = weight.scalar_type();
  TORCH_CHECK(dtype_supported(dt), "exit_head_cpu_pack: weight must be fp32 or bf16, got ", dt);
  TORCH_CHECK(exit_head_cpu_supported(dt), "exit_head_cpu_pack: this CPU/torch build has no brgemm for ", dt);
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

// Per-row statistics of x (R, kp) against the packed panels, merged over the tasks; softcap > 0
// caps the logits (before the bias), 0 leaves them as they are.
template <typename T>
void stats_impl(const T* xa, int64_t rows, const at::Tensor& packed, int64_t n_cand, const float* bias, float softcap,
                Stats* out) {
#if ADAINFER_HAS_BRGEMM
  const int64_t kp = packed.size(1) / kBlockN, n_blocks = packed.size(0);
  const T* wp = packed.const_data_ptr<T>();
  const int64_t per_task =
      std::clamp<int64_t>(kBufferBytes / (static_cast<int64_t>(sizeof(float)) * kBlockN * rows), 1, kMaxBlocksPerTask);
  const int64_t n_tasks = (n_blocks + per_task - 1) / per_task;
  const int64_t ldc = per_task * kBlockN;
  std::vector<Stats> partial(n_tasks * rows);
  const RowStatsFn row_stats = row_stats_fn();
  const SoftcapFn cap_logits = softcap_fn();
  at::parallel_for(0, n_tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(rows * ldc);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t blk0 = task * per_task, blk1 = std::min(n_blocks, blk0 + per_task);
      const int64_t c0 = blk0 * kBlockN, cols = std::min(n_cand, blk1 * kBlockN) - c0;
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        float* c = buf.data() + (blk - blk0) * kBlockN;
        for (int64_t r0 = 0; r0 < rows; r0 += kRowTile)
          gemm_panel(std::min(kRowTile, rows - r0), kp, ldc, xa + r0 * kp, wp + blk * kp * kBlockN, c + r0 * ldc);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* c = buf.data() + r * ldc;
        if (softcap > 0.f) cap_logits(c, cols, softcap);
        if (bias != nullptr)
          for (int64_t j = 0; j < cols; ++j) c[j] += bias[c0 + j];
        Stats st = row_stats(c, cols);
        st.pos += c0;
        partial[task * rows + r] = st;
      }
    }
    release(packed.scalar_type());
  });
  for (int64_t r = 0; r < rows; ++r) {
    Stats acc = partial[r];
    for (int64_t task = 1; task < n_tasks; ++task) merge_into(acc, partial[task * rows + r]);
    out[r] = acc;
  }
#else
  (void)xa, (void)rows, (void)packed, (void)n_cand, (void)bias, (void)softcap, (void)out;
  TORCH_CHECK(false, "exit_head_cpu: built without cpublas::brgemm");
#endif
}

at::ScalarType compute_dtype(at::ScalarType model) { return model == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// hidden (R, d) -> top_prob (R,) f32, gap (R,) f32, pos (R,) i64: the candidate position of the top-1
// (-1 for rows holding inf/NaN, whose top_prob and gap are NaN; NaN too when every logit is -inf).
std::tuple<at::Tensor, at::Tensor, at::Tensor> exit_head_cpu(const at::Tensor& hidden, const at::Tensor& packed,
                                                             int64_t n_cand, int64_t norm,
                                                             const std::optional<at::Tensor>& norm_weight,
                                                             const std::optional<at::Tensor>& norm_bias, double eps,
                                                             const std::optional<at::Tensor>& bias,
                                                             std::optional<double> softcap) {
  TORCH_CHECK(hidden.device().is_cpu() && packed.device().is_cpu(), "exit_head_cpu: hidden and packed must be CPU tensors");
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(1) > 0, "exit_head_cpu: hidden must be 2-D (R, d), got shape ",
              hidden.sizes());
  const auto mt = hidden.scalar_type();
  TORCH_CHECK(mt == at::kFloat || mt == at::kBFloat16 || mt == at::kHalf, "exit_head_cpu: hidden must be fp32, bf16 or fp16, got ", mt);
  const auto ct = compute_dtype(mt);
  TORCH_CHECK(packed.scalar_type() == ct, "exit_head_cpu: packed must be ", ct, " for ", mt, " hidden states, got ",
              packed.scalar_type());
  TORCH_CHECK(exit_head_cpu_supported(ct), "exit_head_cpu: this CPU/torch build has no brgemm for ", ct);
  TORCH_CHECK(packed.dim() == 2 && packed.is_contiguous() && packed.size(1) % kBlockN == 0,
              "exit_head_cpu: packed must come from exit_head_cpu_pack, got shape ", packed.sizes());
  const int64_t d = hidden.size(1), kp = packed.size(1) / kBlockN, n_blocks = packed.size(0);
  TORCH_CHECK(kp == padded_k(d, ct), "exit_head_cpu: hidden has d=", d, " but packed was made for d=", kp,
              ct == at::kBFloat16 ? " (padded to even)" : "");
  TORCH_CHECK(n_cand > (n_blocks - 1) * kBlockN && n_cand <= n_blocks * kBlockN, "exit_head_cpu: n_cand=", n_cand,
              " does not match packed with ", n_blocks, " panels");
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
  at::Tensor x = at::empty({rows, kp}, hidden.options().dtype(ct));
  std::vector<uint8_t> bad(rows, 0);
  std::vector<Stats> st(rows);
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mt, "exit_head_cpu", [&] {
      const scalar_t* gp = g.defined() ? g.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* bp = nb.defined() ? nb.const_data_ptr<scalar_t>() : nullptr;
      if (ct == at::kBFloat16)
        prepare_rows<scalar_t, at::BFloat16>(h, norm, gp, bp, eps, kp, x.mutable_data_ptr<at::BFloat16>(), bad.data());
      else
        prepare_rows<scalar_t, float>(h, norm, gp, bp, eps, kp, x.mutable_data_ptr<float>(), bad.data());
    });
    if (ct == at::kFloat)
      stats_impl<float>(x.const_data_ptr<float>(), rows, packed, n_cand, bias_ptr, cap, st.data());
    else
      stats_impl<at::BFloat16>(x.const_data_ptr<at::BFloat16>(), rows, packed, n_cand, bias_ptr, cap, st.data());
  }
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(adainfer, m) {
  m.def("exit_head_cpu_supported(ScalarType dtype) -> bool", &exit_head_cpu_supported);
  m.def("exit_head_cpu_pack(Tensor weight) -> Tensor");
  m.def(
      "exit_head_cpu(Tensor hidden, Tensor packed, int n_cand, int norm, Tensor? norm_weight, Tensor? norm_bias, "
      "float eps, Tensor? bias, float? softcap=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adainfer, CPU, m) {
  m.impl("exit_head_cpu_pack", &exit_head_cpu_pack);
  m.impl("exit_head_cpu", &exit_head_cpu);
}

}  // namespace adainfer
