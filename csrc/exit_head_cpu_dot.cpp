// Logit tiles of the CPU exit head from a row-major bf16 / fp16 LM head (see exit_head_cpu_dot.h).
//
// Why row-major and dot products rather than packed panels: the weight is read as the model stores
// it, so there is no packed copy to build or keep (0 bytes extra, against 100% of W for panels),
// and a vocabulary block of W is one contiguous stretch of memory. The micro-kernel computes a
// tile of MR rows x NR candidates: per step of one vector of k it loads NR weight vectors and MR
// row vectors and issues MR x NR multiply-adds into MR x NR vector accumulators (6 x 4 = 24 of the
// 32 zmm registers), then reduces each accumulator's lanes with a fixed shuffle tree, four at a
// time. The NR weight vectors of a tile stay in L1 while the row tiles pass over them, so W is
// streamed from memory once per call whatever R is.
//
// The instruction sets are selected per function (target attributes) and at run time
// (__builtin_cpu_supports): the library is built for the baseline x86-64 and runs everywhere.
#include "exit_head_cpu_dot.h"

#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADAINFER_DOT_X86 1
#include <immintrin.h>
#else
#define ADAINFER_DOT_X86 0
#endif

namespace adainfer {
namespace dot {
namespace {

constexpr int kMR = 6;  // rows per tile
constexpr int kNR = 4;  // candidates per tile
// From this many rows on, the bf16 kernel packs blocks of W on the fly (run_packed). Measured on
// 2 threads of this Zen 4 machine, quiet: (576, 49152): packed 9% faster at R = 256; (4096, 32000):
// even at 256, and the dot tiles 24% faster at 64 (there a packed block and the rows it meets
// overflow L2).
constexpr int64_t kPackRows = 128;

// A tile function: MR x NR logits, NR candidates from w (row stride d), MR rows from x (stride kx).
// pf: NR weight rows (row stride d) to prefetch into L1 while this tile runs, or nullptr.
template <typename XT>
using TileFn = void (*)(const XT* x, int64_t kx, const uint16_t* w, int64_t d, float* c, int64_t ldc,
                        const uint16_t* pf);

// Tiles of candidates ahead that the first row tile prefetches: the hardware prefetcher does not
// follow NR interleaved streams far enough ahead at R = 1 (measured: 10 GB/s without, on one core).
constexpr int64_t kPrefetchTiles = 8;

// Loops over the tiles of a (rows x cols) block: candidates outer (their NR weight rows stay in L1
// while the row tiles pass), rows inner. table[mr - 1][nr - 1] is the tile of that size.
template <typename XT>
void run_tiles(const TileFn<XT> (&table)[kMR][kNR], const XT* x, int64_t rows, int64_t kx, const uint16_t* w,
               int64_t cols, int64_t d, float* c, int64_t ldc) {
  for (int64_t j0 = 0; j0 < cols; j0 += kNR) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, cols - j0));
    // Prefetch only weights of this block (+ kNR rows: a full tile), never past its end.
    const int64_t ahead = j0 + kPrefetchTiles * kNR;
    const uint16_t* pf = ahead + kNR <= cols ? w + ahead * d : nullptr;
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, rows - r0));
      table[mr - 1][nr - 1](x + r0 * kx, kx, w + j0 * d, d, c + r0 * ldc + j0, ldc, r0 == 0 ? pf : nullptr);
    }
  }
}

#if ADAINFER_DOT_X86

#define ADAINFER_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define ADAINFER_T512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))

// The four lane sums of a0..a3 in one xmm, by a fixed tree (the same for every accumulator):
// 512 -> 256 -> 128 bits by adding halves, then pairs, then the two remaining lanes.
ADAINFER_T512 inline __m128 reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m512 t01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, 0x44), _mm512_shuffle_f32x4(a0, a1, 0xEE));
  const __m512 t23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, 0x44), _mm512_shuffle_f32x4(a2, a3, 0xEE));
  __m512 v = _mm512_add_ps(_mm512_shuffle_f32x4(t01, t23, 0x88), _mm512_shuffle_f32x4(t01, t23, 0xDD));
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));  // lanes (0+1, 1+0, 2+3, 3+2) of each 128
  v = _mm512_add_ps(v, _mm512_permute_ps(v, 0x4E));  // every lane of each 128 holds its total
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, v));
}

template <int NR>
ADAINFER_T512 inline void store_row(__m512 a0, __m512 a1, __m512 a2, __m512 a3, float* c) {
  const __m128 s = reduce4(a0, a1, a2, a3);
  if (NR == 4)
    _mm_storeu_ps(c, s);
  else
    _mm_mask_storeu_ps(c, static_cast<__mmask8>((1u << NR) - 1), s);
}

// The MR x NR accumulators are named variables (c<row><candidate>), not an array: GCC keeps a
// (6, 4) array of zmm in memory and stores every accumulator on every k step. ADAINFER_ROW(r)
// adds row r's products of one k step (if the tile has that row); STEP names the multiply-add.
#define ADAINFER_ACC(r) __m512 c##r##0 = z, c##r##1 = z, c##r##2 = z, c##r##3 = z
#define ADAINFER_ROW(r, LOADX, STEP)                \
  if (MR > r) {                                     \
    const auto xv = LOADX(x + r * kx + k);          \
    c##r##0 = STEP(c##r##0, xv, w0);                \
    if (NR > 1) c##r##1 = STEP(c##r##1, xv, w1);    \
    if (NR > 2) c##r##2 = STEP(c##r##2, xv, w2);    \
    if (NR > 3) c##r##3 = STEP(c##r##3, xv, w3);    \
  }
#define ADAINFER_STORE(r) \
  if (MR > r) store_row<NR>(c##r##0, c##r##1, c##r##2, c##r##3, c + r * ldc)
#define ADAINFER_ROWS(LOADX, STEP) \
  ADAINFER_ROW(0, LOADX, STEP)     \
  ADAINFER_ROW(1, LOADX, STEP)     \
  ADAINFER_ROW(2, LOADX, STEP)     \
  ADAINFER_ROW(3, LOADX, STEP)     \
  ADAINFER_ROW(4, LOADX, STEP)     \
  ADAINFER_ROW(5, LOADX, STEP)
static_assert(kMR == 6 && kNR == 4, "the tile macros name 6 x 4 accumulators");

// ---- bf16 x bf16 with vdpbf16ps: 32 k per step, pairs of products added into fp32 lanes ----

ADAINFER_T512BF16 inline __m512i load_x_bf16(const uint16_t* p) { return _mm512_loadu_si512(p); }
ADAINFER_T512BF16 inline __m512 dp_bf16(__m512 acc, __m512i xv, __m512i wv) {
  return _mm512_dpbf16_ps(acc, (__m512bh)xv, (__m512bh)wv);
}

template <int MR, int NR>
ADAINFER_T512BF16 void tile_bf16dp(const uint16_t* x, int64_t kx, const uint16_t* w, int64_t d, float* c,
                                   int64_t ldc, const uint16_t* pf) {
  const __m512 z = _mm512_setzero_ps();
  ADAINFER_ACC(0);
  ADAINFER_ACC(1);
  ADAINFER_ACC(2);
  ADAINFER_ACC(3);
  ADAINFER_ACC(4);
  ADAINFER_ACC(5);
  const __m512i zi = _mm512_setzero_si512();
  for (int64_t k = 0; k < d; k += 32) {
    // The last step of an unaligned d reads only the rows' remaining weights (zero beyond them);
    // x is zero-padded to kx, so its loads need no mask.
    const __mmask32 m = k + 32 <= d ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (d - k)) - 1);
    const __m512i w0 = _mm512_maskz_loadu_epi16(m, w + k);
    const __m512i w1 = NR > 1 ? _mm512_maskz_loadu_epi16(m, w + d + k) : zi;
    const __m512i w2 = NR > 2 ? _mm512_maskz_loadu_epi16(m, w + 2 * d + k) : zi;
    const __m512i w3 = NR > 3 ? _mm512_maskz_loadu_epi16(m, w + 3 * d + k) : zi;
    if (pf != nullptr)
      for (int j = 0; j < kNR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * d + k), _MM_HINT_T0);
    ADAINFER_ROWS(load_x_bf16, dp_bf16)
  }
  ADAINFER_STORE(0);
  ADAINFER_STORE(1);
  ADAINFER_STORE(2);
  ADAINFER_STORE(3);
  ADAINFER_STORE(4);
  ADAINFER_STORE(5);
}

// ---- bf16 at many rows: 64 candidates packed on the fly, row pairs broadcast, no lane sums ----
//
// From kPackRows rows on, the dot tiles' lane reductions cost more than packing: each block of 64
// candidates is transposed once into P[p][64] (a pair of consecutive k of each candidate per
// 32-bit word, as vdpbf16ps takes them), in a per-thread scratch of 64 x d x 2 bytes that stays in
// L2, and each tile of MR rows x 64 candidates then needs no reduction: acc[r][v] holds candidates
// 16v..16v+15 of row r, adding row r's pair (broadcast) times the 16 candidates' pairs, k in order.

constexpr int64_t kPackCols = 64;

// The 16 x 16 transpose of 32-bit words: r[i] = row i in, row i = column i out.
ADAINFER_T512BF16 inline void transpose16(__m512i (&r)[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + e], 128-bit lane L: rows 4i..4i+3 of column 4L + e
    b[4 * i + 0] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // the 4 x 4 transpose of 128-bit lanes
    const __m512i c0 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0x44), c1 = _mm512_shuffle_i32x4(b[e], b[4 + e], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + e], b[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// P[p * 64 + j] = (w[j][2p], w[j][2p + 1]) for j < cols (<= 64), p < npairs = ceil(d / 2); zero
// beyond d and for j >= cols.
ADAINFER_T512BF16 void pack_pairs(const uint16_t* w, int64_t d, int64_t cols, uint32_t* P) {
  const int64_t npairs = (d + 1) / 2;
  for (int64_t p0 = 0; p0 < npairs; p0 += 16) {
    const int64_t k0 = 2 * p0;
    const __mmask32 m = k0 + 32 <= d ? ~__mmask32(0) : static_cast<__mmask32>((1ull << (d - k0)) - 1);
    const int64_t nq = std::min<int64_t>(16, npairs - p0);
    for (int64_t jb = 0; jb < kPackCols; jb += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i)
        r[i] = jb + i < cols ? _mm512_maskz_loadu_epi16(m, w + (jb + i) * d + k0) : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t q = 0; q < nq; ++q) _mm512_storeu_si512(P + (p0 + q) * kPackCols + jb, r[q]);
    }
  }
}

// MR rows x 64 candidates from the packed P; writes all 64 columns of each row (c has room: the
// caller's ldc is a multiple of 64).
template <int MR>
ADAINFER_T512BF16 void tile_packed(const uint16_t* x, int64_t kx, const uint32_t* P, int64_t npairs, float* c,
                                   int64_t ldc) {
  const __m512 z = _mm512_setzero_ps();
  __m512 c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z, c20 = z, c21 = z, c22 = z, c23 = z;
  __m512 c30 = z, c31 = z, c32 = z, c33 = z, c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  const uint32_t* x32 = reinterpret_cast<const uint32_t*>(x);  // kx is even: row r's pairs at r * kx / 2
  const int64_t kx2 = kx / 2;
#define ADAINFER_PROW(r)                                                                                     \
  if (MR > r) {                                                                                              \
    const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x32[r * kx2 + p]));                     \
    c##r##0 = _mm512_dpbf16_ps(c##r##0, xv, w0);                                                             \
    c##r##1 = _mm512_dpbf16_ps(c##r##1, xv, w1);                                                             \
    c##r##2 = _mm512_dpbf16_ps(c##r##2, xv, w2);                                                             \
    c##r##3 = _mm512_dpbf16_ps(c##r##3, xv, w3);                                                             \
  }
#define ADAINFER_PSTORE(r)                     \
  if (MR > r) {                                \
    _mm512_storeu_ps(c + r * ldc, c##r##0);      \
    _mm512_storeu_ps(c + r * ldc + 16, c##r##1); \
    _mm512_storeu_ps(c + r * ldc + 32, c##r##2); \
    _mm512_storeu_ps(c + r * ldc + 48, c##r##3); \
  }
  for (int64_t p = 0; p < npairs; ++p) {
    const uint32_t* pp = P + p * kPackCols;
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(pp), w1 = (__m512bh)_mm512_loadu_si512(pp + 16);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(pp + 32), w3 = (__m512bh)_mm512_loadu_si512(pp + 48);
    ADAINFER_PROW(0)
    ADAINFER_PROW(1)
    ADAINFER_PROW(2)
    ADAINFER_PROW(3)
    ADAINFER_PROW(4)
    ADAINFER_PROW(5)
  }
  ADAINFER_PSTORE(0)
  ADAINFER_PSTORE(1)
  ADAINFER_PSTORE(2)
  ADAINFER_PSTORE(3)
  ADAINFER_PSTORE(4)
  ADAINFER_PSTORE(5)
#undef ADAINFER_PROW
#undef ADAINFER_PSTORE
}

ADAINFER_T512BF16 void run_packed(const uint16_t* x, int64_t rows, int64_t kx, const uint16_t* w, int64_t cols,
                                  int64_t d, float* c, int64_t ldc) {
  using PackedTile = void (*)(const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t);
  static constexpr PackedTile kTiles[kMR] = {&tile_packed<1>, &tile_packed<2>, &tile_packed<3>,
                                             &tile_packed<4>, &tile_packed<5>, &tile_packed<6>};
  const int64_t npairs = (d + 1) / 2;
  thread_local std::vector<uint32_t> scratch;  // kept per thread: no allocation per task
  scratch.resize(npairs * kPackCols);
  for (int64_t j0 = 0; j0 < cols; j0 += kPackCols) {
    pack_pairs(w + j0 * d, d, std::min(kPackCols, cols - j0), scratch.data());
    for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
      const int64_t mr = std::min<int64_t>(kMR, rows - r0);
      kTiles[mr - 1](x + r0 * kx, kx, scratch.data(), npairs, c + r0 * ldc + j0, ldc);
    }
  }
}

// ---- bf16 or fp16 weights converted in registers, fp32 rows, fp32 FMA: 16 k per step ----

template <bool F16>
ADAINFER_T512 inline __m512 load_w16(const uint16_t* p, __mmask16 mask) {
  const __m256i bits = _mm256_maskz_loadu_epi16(mask, p);
  if (F16) return _mm512_cvtph_ps(bits);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}
ADAINFER_T512 inline __m512 load_x_f32(const float* p) { return _mm512_loadu_ps(p); }
ADAINFER_T512 inline __m512 fma_f32(__m512 acc, __m512 xv, __m512 wv) { return _mm512_fmadd_ps(xv, wv, acc); }

template <bool F16, int MR, int NR>
ADAINFER_T512 void tile_cvt(const float* x, int64_t kx, const uint16_t* w, int64_t d, float* c, int64_t ldc,
                            const uint16_t* pf) {
  const __m512 z = _mm512_setzero_ps();
  ADAINFER_ACC(0);
  ADAINFER_ACC(1);
  ADAINFER_ACC(2);
  ADAINFER_ACC(3);
  ADAINFER_ACC(4);
  ADAINFER_ACC(5);
  for (int64_t k = 0; k < d; k += 16) {
    const __mmask16 m = k + 16 <= d ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (d - k)) - 1);
    const __m512 w0 = load_w16<F16>(w + k, m);
    const __m512 w1 = NR > 1 ? load_w16<F16>(w + d + k, m) : z;
    const __m512 w2 = NR > 2 ? load_w16<F16>(w + 2 * d + k, m) : z;
    const __m512 w3 = NR > 3 ? load_w16<F16>(w + 3 * d + k, m) : z;
    // 16 k = 32 bytes a step: one line of each row every other step.
    if (pf != nullptr && (k & 31) == 0)
      for (int j = 0; j < kNR; ++j) _mm_prefetch(reinterpret_cast<const char*>(pf + j * d + k), _MM_HINT_T0);
    ADAINFER_ROWS(load_x_f32, fma_f32)
  }
  ADAINFER_STORE(0);
  ADAINFER_STORE(1);
  ADAINFER_STORE(2);
  ADAINFER_STORE(3);
  ADAINFER_STORE(4);
  ADAINFER_STORE(5);
}

#undef ADAINFER_ACC
#undef ADAINFER_ROW
#undef ADAINFER_STORE
#undef ADAINFER_ROWS

template <typename XT, template <int, int> class Tile>
struct Table {
  TileFn<XT> fns[kMR][kNR];
  template <int M, int N>
  void fill() {
    fns[M - 1][N - 1] = &Tile<M, N>::run;
    if constexpr (N < kNR)
      fill<M, N + 1>();
    else if constexpr (M < kMR)
      fill<M + 1, 1>();
  }
  Table() { fill<1, 1>(); }
};

template <int M, int N>
struct Bf16dp {
  static void run(const uint16_t* x, int64_t kx, const uint16_t* w, int64_t d, float* c, int64_t ldc,
                  const uint16_t* pf) {
    tile_bf16dp<M, N>(x, kx, w, d, c, ldc, pf);
  }
};
template <int M, int N>
struct CvtBf16 {
  static void run(const float* x, int64_t kx, const uint16_t* w, int64_t d, float* c, int64_t ldc,
                  const uint16_t* pf) {
    tile_cvt<false, M, N>(x, kx, w, d, c, ldc, pf);
  }
};
template <int M, int N>
struct CvtF16 {
  static void run(const float* x, int64_t kx, const uint16_t* w, int64_t d, float* c, int64_t ldc,
                  const uint16_t* pf) {
    tile_cvt<true, M, N>(x, kx, w, d, c, ldc, pf);
  }
};

#endif  // ADAINFER_DOT_X86

// ---- portable: any CPU ----

inline float to_float(uint16_t bits, bool fp16) {
  if (fp16) return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

}  // namespace

bool cpu_has_avx512() {
#if ADAINFER_DOT_X86
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512bf16() {
#if ADAINFER_DOT_X86
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

void logits_avx512bf16(const uint16_t* x, int64_t rows, int64_t kx, const uint16_t* w, int64_t cols, int64_t d,
                       float* c, int64_t ldc) {
#if ADAINFER_DOT_X86
  if (rows >= kPackRows && ldc % kPackCols == 0) {
    run_packed(x, rows, kx, w, cols, d, c, ldc);
    return;
  }
  static const Table<uint16_t, Bf16dp> table;
  run_tiles(table.fns, x, rows, kx, w, cols, d, c, ldc);
#else
  (void)x, (void)rows, (void)kx, (void)w, (void)cols, (void)d, (void)c, (void)ldc;
#endif
}

void logits_avx512(const float* x, int64_t rows, int64_t kx, const uint16_t* w, bool fp16, int64_t cols, int64_t d,
                   float* c, int64_t ldc) {
#if ADAINFER_DOT_X86
  static const Table<float, CvtBf16> bf16_table;
  static const Table<float, CvtF16> f16_table;
  run_tiles(fp16 ? f16_table.fns : bf16_table.fns, x, rows, kx, w, cols, d, c, ldc);
#else
  (void)x, (void)rows, (void)kx, (void)w, (void)fp16, (void)cols, (void)d, (void)c, (void)ldc;
#endif
}

void logits_scalar(const float* x, int64_t rows, int64_t kx, const uint16_t* w, bool fp16, int64_t cols, int64_t d,
                   float* c, int64_t ldc) {
  constexpr int kLanes = 8;  // partial sums, k mod 8 (a fixed order, vectorisable without -ffast-math)
  for (int64_t j = 0; j < cols; ++j) {
    const uint16_t* wj = w + j * d;
    for (int64_t r = 0; r < rows; ++r) {
      const float* xr = x + r * kx;
      float s[kLanes] = {};
      for (int64_t k = 0; k < d; ++k) s[k % kLanes] += xr[k] * to_float(wj[k], fp16);
      float t = 0.f;
      for (int q = 0; q < kLanes; ++q) t += s[q];
      c[r * ldc + j] = t;
    }
  }
}

}  // namespace dot
}  // namespace adainfer
