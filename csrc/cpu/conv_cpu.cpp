// CPU kernels of vlssm::fork_conv1d: depthwise causal conv (width K, bias) +
// SiLU over [P, S] and [P, rev S] at once, token-major (b, L, E) operands.
//
// Output y (b, p + 2s, E) = [prefix | forward suffix | reversed suffix], all in
// token order. Tap k (weight[:, k]; k = K-1 is the current token) of output o
// reads, in the combined token order [P (0..p-1), S (p..p+s-1)]:
//   o < p + s (prefix and forward suffix): position o - (K-1) + k
//   reversed suffix token i (o = p + s + i): the sequence [P, rev S] at
//     q = p + (s-1-i) - (K-1) + k, i.e. S[i + K-1-k] when q >= p, else P[q]
// and nothing (zero padding) for negative positions.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../conv_shapes.h"
#include "../fast_math.h"
#include "simd.h"

namespace vlssm {
namespace cpu {
namespace {

// Combined [P, S] position read by tap k of output o, or -1 for padding.
inline int64_t tap_source(int64_t o, int64_t k, const ConvShape& sh) {
  return fork_tap_source(o, k, sh.p, sh.s, sh.K);
}

// Row pointers of [P, S] as one token sequence without a copy; the channel
// stride is 1 (the op makes it so), batch and token strides are free.
template <typename T>
struct Tokens {
  const T* xp;
  const T* xs;
  int64_t p, bp, lp, bs, ls;
  Tokens(const at::Tensor& P, const at::Tensor& S, int64_t p_)
      : xp(P.data_ptr<T>()), xs(S.data_ptr<T>()), p(p_), bp(P.stride(0)), lp(P.stride(1)), bs(S.stride(0)),
        ls(S.stride(1)) {}
  inline const T* row(int64_t b, int64_t q) const { return q < p ? xp + b * bp + q * lp : xs + b * bs + (q - p) * ls; }
};

template <typename T, typename Acc>
struct ConvArgs {
  Tokens<T> x;
  const Acc* wT;    // (K, E) transposed weight
  const Acc* bias;  // (E) or null
  ConvShape sh;
};

// Pre-activation conv output of (b, o) for channels [e0, e1) into a[e - e0].
template <typename T, typename Acc>
inline void conv_token(const ConvArgs<T, Acc>& c, int64_t b, int64_t o, int64_t e0, int64_t e1, Acc* a) {
  const int64_t E = c.sh.E, ne = e1 - e0;
  for (int64_t e = 0; e < ne; ++e) a[e] = c.bias ? c.bias[e0 + e] : Acc(0);
  for (int64_t k = 0; k < c.sh.K; ++k) {
    const int64_t q = tap_source(o, k, c.sh);
    if (q < 0) continue;
    const T* xr = c.x.row(b, q) + e0;
    const Acc* wk = c.wT + k * E + e0;
#pragma omp simd
    for (int64_t e = 0; e < ne; ++e) a[e] += wk[e] * static_cast<Acc>(xr[e]);
  }
}

template <typename T, typename Acc>
struct ConvFwd {
  ConvArgs<T, Acc> c;
  T* y;  // (b, p + 2s, E) contiguous
  void run(int64_t bo, Acc* a) const {
    const int64_t E = c.sh.E, Lout = c.sh.p + 2 * c.sh.s, b = bo / Lout, o = bo % Lout;
    conv_token(c, b, o, 0, E, a);
    T* yr = y + bo * E;
#pragma omp simd
    for (int64_t e = 0; e < E; ++e) yr[e] = static_cast<T>(vsilu(a[e]));
  }
};

constexpr int64_t kConvBlock = 64;  // channels per backward task

template <typename T, typename Acc>
struct ConvBwd {
  ConvArgs<T, Acc> c;
  const T* dy;     // (b, p + 2s, E), channel stride 1
  int64_t dyb, dyl;
  T* dxp;          // (b, p, E) contiguous
  T* dxs;          // (b, s, E) contiguous
  Acc* dw_part;    // (b, K, E) per-batch partials
  Acc* db_part;    // (b, E)
  // Task = (b, block of kConvBlock channels); a (kConvBlock), dx (p + s, kConvBlock) scratch.
  void run(int64_t task, Acc* a, Acc* dx) const {
    const ConvShape& sh = c.sh;
    const int64_t nblk = (sh.E + kConvBlock - 1) / kConvBlock, Lout = sh.p + 2 * sh.s, Lin = sh.p + sh.s;
    const int64_t b = task / nblk, e0 = (task % nblk) * kConvBlock, e1 = std::min(sh.E, e0 + kConvBlock);
    const int64_t ne = e1 - e0;
    std::fill(dx, dx + Lin * kConvBlock, Acc(0));
    Acc* dwb = dw_part + b * sh.K * sh.E;
    Acc* dbb = db_part + b * sh.E + e0;
    for (int64_t o = 0; o < Lout; ++o) {
      conv_token(c, b, o, e0, e1, a);
      const T* dyr = dy + b * dyb + o * dyl + e0;
#pragma omp simd
      for (int64_t e = 0; e < ne; ++e) {
        a[e] = static_cast<Acc>(dyr[e]) * vsilu_grad(a[e]);
        dbb[e] += a[e];
      }
      for (int64_t k = 0; k < sh.K; ++k) {
        const int64_t q = tap_source(o, k, sh);
        if (q < 0) continue;
        const T* xr = c.x.row(b, q) + e0;
        const Acc* wk = c.wT + k * sh.E + e0;
        Acc* dwk = dwb + k * sh.E + e0;
        Acc* dxq = dx + q * kConvBlock;
#pragma omp simd
        for (int64_t e = 0; e < ne; ++e) {
          dwk[e] += a[e] * static_cast<Acc>(xr[e]);
          dxq[e] += a[e] * wk[e];
        }
      }
    }
    for (int64_t q = 0; q < Lin; ++q) {
      T* out = q < sh.p ? dxp + (b * sh.p + q) * sh.E + e0 : dxs + (b * sh.s + q - sh.p) * sh.E + e0;
      for (int64_t e = 0; e < ne; ++e) out[e] = static_cast<T>(dx[q * kConvBlock + e]);
    }
  }
};

#define VLSSM_CONV_ENTRIES(T, Acc)                                                                       \
  VLSSM_CLONES void run_conv(const ConvFwd<T, Acc>& f, int64_t bo, Acc* a) { f.run(bo, a); }            \
  VLSSM_CLONES void run_conv(const ConvBwd<T, Acc>& f, int64_t task, Acc* a, Acc* dx) { f.run(task, a, dx); }
VLSSM_CONV_ENTRIES(float, float)
VLSSM_CONV_ENTRIES(double, double)
VLSSM_CONV_ENTRIES(at::BFloat16, float)
VLSSM_CONV_ENTRIES(at::Half, float)
#undef VLSSM_CONV_ENTRIES

// Channel stride 1 lets the inner loops vectorize; other layouts are copied.
at::Tensor unit_channel_stride(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <typename T, typename Acc>
ConvArgs<T, Acc> conv_args(const at::Tensor& xp, const at::Tensor& xs, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias, const ConvShape& sh, std::vector<Acc>& wT,
                           std::vector<Acc>& bv) {
  const auto w = weight.accessor<T, 2>();
  wT.resize(sh.K * sh.E);
  for (int64_t e = 0; e < sh.E; ++e)
    for (int64_t k = 0; k < sh.K; ++k) wT[k * sh.E + e] = static_cast<Acc>(w[e][k]);
  if (bias.has_value()) {
    const auto bacc = bias->accessor<T, 1>();
    bv.resize(sh.E);
    for (int64_t e = 0; e < sh.E; ++e) bv[e] = static_cast<Acc>(bacc[e]);
  }
  return ConvArgs<T, Acc>{Tokens<T>(xp, xs, sh.p), wT.data(), bias.has_value() ? bv.data() : nullptr, sh};
}

at::Tensor fork_conv1d_cpu(const at::Tensor& x_prefix, const at::Tensor& x_suffix, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  const ConvShape sh = check_fork_conv1d(x_prefix, x_suffix, weight, bias);
  const at::Tensor xp = unit_channel_stride(x_prefix), xs = unit_channel_stride(x_suffix);
  const int64_t Lout = sh.p + 2 * sh.s;
  at::Tensor y = at::empty({sh.batch, Lout, sh.E}, x_prefix.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    std::vector<Acc> wT, bv;
    const ConvFwd<T, Acc> f{conv_args<T, Acc>(xp, xs, weight, bias, sh, wT, bv), y.data_ptr<T>()};
    at::parallel_for(0, sh.batch * Lout, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> a(sh.E);
      for (int64_t bo = begin; bo < end; ++bo) run_conv(f, bo, a.data());
    });
  });
  return y;
}

// Returns (dx_prefix, dx_suffix, dweight, dbias); dbias is empty without bias.
std::vector<at::Tensor> fork_conv1d_backward_cpu(const at::Tensor& dy, const at::Tensor& x_prefix,
                                                 const at::Tensor& x_suffix, const at::Tensor& weight,
                                                 const c10::optional<at::Tensor>& bias) {
  const ConvShape sh = check_fork_conv1d(x_prefix, x_suffix, weight, bias);
  const int64_t Lout = sh.p + 2 * sh.s, Lin = sh.p + sh.s;
  check_act("dy", dy, {sh.batch, Lout, sh.E}, x_prefix);
  const at::Tensor xp = unit_channel_stride(x_prefix), xs = unit_channel_stride(x_suffix);
  const at::Tensor dyc = unit_channel_stride(dy);
  at::Tensor dxp = at::empty({sh.batch, sh.p, sh.E}, x_prefix.options());
  at::Tensor dxs = at::empty({sh.batch, sh.s, sh.E}, x_prefix.options());
  at::Tensor dw = at::empty({sh.E, sh.K}, x_prefix.options());
  at::Tensor db = at::empty({bias.has_value() ? sh.E : 0}, x_prefix.options());
  const int64_t nblk = (sh.E + kConvBlock - 1) / kConvBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_bwd_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    std::vector<Acc> wT, bv;
    // Per-batch partial weight / bias grads, summed over batch in order below.
    std::vector<Acc> dw_part(sh.batch * sh.K * sh.E, Acc(0)), db_part(sh.batch * sh.E, Acc(0));
    const ConvBwd<T, Acc> f{conv_args<T, Acc>(xp, xs, weight, bias, sh, wT, bv),
                            dyc.data_ptr<T>(), dyc.stride(0), dyc.stride(1), dxp.data_ptr<T>(), dxs.data_ptr<T>(),
                            dw_part.data(), db_part.data()};
    at::parallel_for(0, sh.batch * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> a(kConvBlock), dx(Lin * kConvBlock);
      for (int64_t task = begin; task < end; ++task) run_conv(f, task, a.data(), dx.data());
    });
    auto dwv = dw.accessor<T, 2>();
    for (int64_t e = 0; e < sh.E; ++e) {
      for (int64_t k = 0; k < sh.K; ++k) {
        Acc sacc = 0;
        for (int64_t b = 0; b < sh.batch; ++b) sacc += dw_part[(b * sh.K + k) * sh.E + e];
        dwv[e][k] = static_cast<T>(sacc);
      }
      if (bias.has_value()) {
        Acc sacc = 0;
        for (int64_t b = 0; b < sh.batch; ++b) sacc += db_part[b * sh.E + e];
        db.data_ptr<T>()[e] = static_cast<T>(sacc);
      }
    }
  });
  return {dxp, dxs, dw, db};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CPU, m) {
  m.impl("fork_conv1d", &fork_conv1d_cpu);
  m.impl("fork_conv1d_backward", &fork_conv1d_backward_cpu);
}

}  // namespace cpu
}  // namespace vlssm
