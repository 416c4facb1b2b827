// Elementwise math of every op family (softplus, fast exp / log, sigmoid, silu
// and their derivatives), shared by the CPU and CUDA kernels: every function
// here compiles for host and device. The scan step it serves:
//
// One scan step for channel d, state index n, token l (A = -exp(A_log) < 0):
//   dt     = softplus(delta[l] + delta_bias[d])          (if delta_softplus)
//   h[n]   = exp(dt * A[d, n]) * h[n] + dt * u[l] * B[l, n]
//   y[l]   = sum_n C[l, n] * h[n] + D[d] * u[l]
//   out[l] = y[l] * silu(z[l])                            (if z is given)
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define VLSSM_HD __host__ __device__ __forceinline__
#else
#define VLSSM_HD inline
#endif

namespace vlssm {

// mamba_ssm's softplus: identity above 20 (where log1p(exp(x)) == x in fp32).
template <typename T>
VLSSM_HD T softplus(T x) {
  return x <= T(20) ? std::log1p(std::exp(x)) : x;
}

template <typename T>
VLSSM_HD T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// exp for float, branch-free so the compiler vectorizes loops that call it.
// Cody-Waite range reduction x = k ln2 + r, |r| <= ln2/2, then Cephes' degree-6
// minimax polynomial: max relative error about 2 ulp over the clamped range.
// Underflows to exactly 0 below -87.34 (no denormals); overflows to +inf.
VLSSM_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);  // device fast path: ex2.approx (MUFU), ~2 ulp, 0 below -87.3
#else
  const float kHi = 88.3762626647949f;
  const float kLo = -87.3365447504f;
  const bool over = x > kHi;
  const bool under = x < kLo;
  x = x > kHi ? kHi : (x < kLo ? kLo : x);
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float k = (x * 1.44269504088896341f + kRound) - kRound;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float res = p * scale;
  res = under ? 0.0f : res;
  return over ? INFINITY : res;
#endif
}

// float64 is the ground-truth precision: use the libm exp.
VLSSM_HD double fast_exp(double x) { return std::exp(x); }

// log for finite w > 0 (normal), branch-free: w = 2^k m, m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m-1)/(m+1), |s| < 0.172, series to s^9 (error < 1e-9).
VLSSM_HD float fast_log(float w) {
  int32_t bits;
  std::memcpy(&bits, &w, sizeof(bits));
  int32_t k = ((bits >> 23) & 0xff) - 127;
  const int32_t mbits = (bits & 0x7fffff) | 0x3f800000;
  float m;
  std::memcpy(&m, &mbits, sizeof(m));
  const bool big = m > 1.41421356237f;
  m = big ? m * 0.5f : m;
  k = big ? k + 1 : k;
  const float s = (m - 1.0f) / (m + 1.0f);
  const float s2 = s * s;
  float p = 2.0f / 9.0f;
  p = p * s2 + 2.0f / 7.0f;
  p = p * s2 + 2.0f / 5.0f;
  p = p * s2 + 2.0f / 3.0f;
  p = p * s2 + 2.0f;
  return static_cast<float>(k) * 0.693147180559945f + s * p;
}

// Vectorizable softplus / sigmoid / silu: the float versions use fast_exp and
// fast_log (log1p(e) = log(1+e) * e / ((1+e) - 1) keeps tiny e exact); the
// double versions are the libm ground truth above.
VLSSM_HD float vsoftplus(float x) {
#if defined(__CUDA_ARCH__)
  return x > 20.0f ? x : log1pf(__expf(x));  // device fast path
#else
  const float e = fast_exp(x < 20.0f ? x : 20.0f);
  const float w = 1.0f + e;
  const float den = w - 1.0f;  // 0 only when e < 2^-24, where log1p(e) == e
  const float lp = fast_log(w) * (e / (den == 0.0f ? 1.0f : den));
  return x > 20.0f ? x : (den == 0.0f ? e : lp);
#endif
}
VLSSM_HD double vsoftplus(double x) { return softplus(x); }

VLSSM_HD float vsigmoid(float x) { return 1.0f / (1.0f + fast_exp(-x)); }
VLSSM_HD double vsigmoid(double x) { return sigmoid(x); }

// d softplus / dx, matching the identity branch above 20.
template <typename T>
VLSSM_HD T vsoftplus_grad(T x) {
  return x <= T(20) ? vsigmoid(x) : T(1);
}

template <typename T>
VLSSM_HD T vsilu(T x) {
  return x * vsigmoid(x);
}

template <typename T>
VLSSM_HD T vsilu_grad(T x) {
  const T s = vsigmoid(x);
  return s * (T(1) + x * (T(1) - s));
}

}  // namespace vlssm
