// Logit tiles of the CPU exit head from a bf16 / fp16 LM head read as it is stored: row-major
// (n, d), two bytes per weight, no packed or upcast copy (csrc/exit_head_cpu_dot.cpp).
//
//   c[r * ldc + j] = sum_k x[r * kx + k] * w[j * d + k]      r < rows, j < cols, fp32 accumulation
//
// Every product of two bf16 (or an fp32-exact fp16 and the fp32 row) is exact in fp32; the sums are
// fp32. Each logit is summed in one fixed order (lanes of the k vector, then a fixed lane tree), the
// same whatever the tile it falls in, so results depend neither on R nor on the thread count.
//
// Kernels (the x row layout each one takes, kx = its row stride):
//   kAvx512Bf16  x bf16, kx % 32 == 0, zero beyond d; vdpbf16ps (AVX512-BF16; DAZ/FTZ, RNE)
//   kAvx512      x fp32, kx % 16 == 0, zero beyond d; W converted in registers (bf16: shift,
//                fp16: vcvtph2ps), fp32 FMA (AVX-512 F/BW/VL)
//   kScalar      x fp32, kx >= d; portable C++ (any CPU; slow: the auto choice avoids it)
#pragma once

#include <cstdint>

namespace adainfer {
namespace dot {

enum class Kernel { kAvx512Bf16, kAvx512, kScalar };

// What this CPU runs (checked once, at run time: the build needs no -mavx512* flag).
bool cpu_has_avx512bf16();
bool cpu_has_avx512();

// w: bf16 (fp16 == false) or fp16 (fp16 == true) bits, row j at w + j * d. x as the kernel takes it.
void logits_avx512bf16(const uint16_t* x, int64_t rows, int64_t kx, const uint16_t* w, int64_t cols, int64_t d,
                       float* c, int64_t ldc);
void logits_avx512(const float* x, int64_t rows, int64_t kx, const uint16_t* w, bool fp16, int64_t cols, int64_t d,
                   float* c, int64_t ldc);
void logits_scalar(const float* x, int64_t rows, int64_t kx, const uint16_t* w, bool fp16, int64_t cols, int64_t d,
                   float* c, int64_t ldc);

}  // namespace dot
}  // namespace adainfer
