// Row statistics of a buffer of fp32 logits for the CPU exit head. Included once per instruction set
// by exit_head_cpu.cpp, with
//   ADAINFER_RS_NS      namespace of this copy
//   ADAINFER_RS_BYTES   vector width in bytes (16: SSE2, 32: AVX2, 64: AVX-512)
//   ADAINFER_RS_TARGET  function attribute selecting the instruction set (empty for the baseline)
// GCC/clang vector extensions make the vectorisation explicit: no -ffast-math (whose no-NaN/no-inf
// assumptions would break -inf biases), no reliance on the auto-vectoriser.
namespace ADAINFER_RS_NS {

typedef float vf __attribute__((vector_size(ADAINFER_RS_BYTES)));
typedef int32_t vi __attribute__((vector_size(ADAINFER_RS_BYTES)));
constexpr int kW = ADAINFER_RS_BYTES / 4;  // lanes
constexpr int kU = 64 / ADAINFER_RS_BYTES;  // independent accumulators: 64 bytes per step

ADAINFER_RS_TARGET inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ADAINFER_RS_TARGET inline vf splat(float x) { return vf{} + x; }

// exp(x) for x <= 0 (x may be -inf): Cody-Waite reduction by ln 2, Cephes' degree-6 polynomial
// (max relative error 3e-7), 2^n by building the exponent bits. Below -87 (exp < 2^-125) the
// result is flushed to 0: a relative change < 1e-37 of a sum whose largest term is 1.
ADAINFER_RS_TARGET inline vf exp_nonpos(vf x) {
  const vf lo = splat(-87.f);
  const vf xc = x < lo ? lo : x;
  const vf n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest integer
  vf r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // n in [-126, 0]
  const vf res = p * (vf)e;
  return x < lo ? splat(0.f) : res;
}

// c[j] = cap * tanh(c[j] / cap) in place (final-logit soft-capping). tanh as Cephes' tanhf: an odd
// polynomial below |y| = 0.625, else (1 - e) / (1 + e) with e = exp(-2|y|) in (0, 0.29] (no
// overflow; |y| = inf gives 1); max relative error 2e-7 against fp64 (tests/kernels). Same
// formula as the Triton kernel's _tanh. NaN stays NaN.
ADAINFER_RS_TARGET inline vf tanh_vec(vf y) {
  const vi sign_mask = vi{} + INT32_MIN;
  const vi bits = (vi)y;
  const vf a = (vf)(bits & ~sign_mask);
  const vf lim = splat(0.625f);
  const vf s = a < lim ? a : lim;  // the polynomial's argument, kept finite where it is not used
  const vf z = s * s;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf small = p * z * s + s;
  const vf e = exp_nonpos(a * -2.f);
  const vf big = (1.f - e) / (1.f + e);
  const vf t = a < lim ? small : big;
  return (vf)((vi)t | (bits & sign_mask));
}

ADAINFER_RS_TARGET void softcap_inplace(float* c, int64_t n, float cap) {
  int64_t j = 0;
  for (; j + kW <= n; j += kW) {
    const vf v = tanh_vec(load(c + j) / cap) * cap;
    std::memcpy(c + j, &v, sizeof(v));
  }
  if (j < n) {
    float tail[kW] = {};
    std::memcpy(tail, c + j, (n - j) * sizeof(float));
    const vf v = tanh_vec(load(tail) / cap) * cap;
    std::memcpy(c + j, &v, (n - j) * sizeof(float));
  }
}

// sum_j exp(c[j] - mx) for mx >= every c[j].
ADAINFER_RS_TARGET inline float exp_sum(const float* c, int64_t n, float mx) {
  vf s[kU];
  for (int u = 0; u < kU; ++u) s[u] = splat(0.f);
  int64_t j = 0;
  for (; j + kW * kU <= n; j += kW * kU)
    for (int u = 0; u < kU; ++u) s[u] += exp_nonpos(load(c + j + u * kW) - mx);
  for (; j < n; j += kW) {
    float tail[kW];
    std::fill(tail, tail + kW, -std::numeric_limits<float>::infinity());
    std::memcpy(tail, c + j, std::min<int64_t>(kW, n - j) * sizeof(float));
    s[0] += exp_nonpos(load(tail) - mx);
  }
  float t = 0.f;
  for (int u = 0; u < kU; ++u)
    for (int q = 0; q < kW; ++q) t += s[u][q];
  return t;
}

// One element per lane: largest value, its first index, second largest. A tie counts twice:
// second = max(second, min(v, largest)) keeps an equal value as the second.
ADAINFER_RS_TARGET inline void top2_step(vf v, vi jv, vf& m1, vf& m2, vi& ix) {
  const vf lo = v < m1 ? v : m1;
  m2 = lo > m2 ? lo : m2;
  const vi gt = (vi)(v > m1);
  m1 = v > m1 ? v : m1;
  ix = gt ? jv : ix;
}

// Statistics of one row of n logits (positions 0..n-1): one top-2 pass, one exp-sum pass.
ADAINFER_RS_TARGET Stats row_stats(const float* c, int64_t n) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  vf m1[kU], m2[kU];
  vi ix[kU], lane;
  for (int q = 0; q < kW; ++q) lane[q] = q;
  for (int u = 0; u < kU; ++u) {
    m1[u] = splat(neg_inf);
    m2[u] = m1[u];
    ix[u] = vi{} + INT32_MAX;
  }
  int64_t j = 0;
  for (; j + kW * kU <= n; j += kW * kU)
    for (int u = 0; u < kU; ++u)
      top2_step(load(c + j + u * kW), lane + static_cast<int32_t>(j + u * kW), m1[u], m2[u], ix[u]);
  for (; j < n; j += kW) {  // tail padded with -inf, which never becomes the largest
    float tail[kW];
    std::fill(tail, tail + kW, neg_inf);
    std::memcpy(tail, c + j, std::min<int64_t>(kW, n - j) * sizeof(float));
    top2_step(load(tail), lane + static_cast<int32_t>(j), m1[0], m2[0], ix[0]);
  }
  // Merge the lanes: the largest value; the lowest index holding it; the second largest is the
  // winning lane's second or any other lane's largest (another lane with the same value: a tie).
  Stats st;
  int32_t pos = INT32_MAX;
  for (int u = 0; u < kU; ++u)
    for (int q = 0; q < kW; ++q) st.max = m1[u][q] > st.max ? m1[u][q] : st.max;
  for (int u = 0; u < kU; ++u)
    for (int q = 0; q < kW; ++q)
      if (m1[u][q] == st.max && ix[u][q] < pos) pos = ix[u][q];
  for (int u = 0; u < kU; ++u)
    for (int q = 0; q < kW; ++q) {
      const float other = (m1[u][q] == st.max && ix[u][q] == pos) ? m2[u][q] : m1[u][q];
      st.second = other > st.second ? other : st.second;
    }
  st.pos = pos == INT32_MAX ? 0 : pos;  // every logit -inf (or NaN): position 0, as torch.argmax
  st.sum = st.max == neg_inf ? 0.f : exp_sum(c, n, st.max);
  return st;
}

}  // namespace ADAINFER_RS_NS
