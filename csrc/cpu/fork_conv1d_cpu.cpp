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

#include <vector>

#include "../scan_math.h"
#include "../scan_shapes.h"

namespace vlssm {
namespace cpu {
namespace {

struct ConvShape {
  int64_t batch, p, s, E, K;
};

ConvShape check_fork_conv1d(const at::Tensor& xp, const at::Tensor& xs, const at::Tensor& w,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(xp.dim() == 3, "x_prefix must have shape (batch, prefix_len, dim), got ", shape_str(xp.sizes()));
  TORCH_CHECK_VALUE(xs.dim() == 3, "x_suffix must have shape (batch, suffix_len, dim), got ", shape_str(xs.sizes()));
  check_floating("x_prefix", xp);
  TORCH_CHECK_VALUE(w.dim() == 2, "weight must have shape (dim, d_conv), got ", shape_str(w.sizes()));
  const ConvShape sh{xp.size(0), xp.size(1), xs.size(1), xp.size(2), w.size(1)};
  TORCH_CHECK_VALUE(sh.batch > 0 && sh.s > 0 && sh.E > 0 && sh.K > 0, "empty input: x_prefix ",
                    shape_str(xp.sizes()), ", x_suffix ", shape_str(xs.sizes()), ", weight ", shape_str(w.sizes()));
  check_act("x_suffix", xs, {sh.batch, sh.s, sh.E}, xp);
  check_act("weight", w, {sh.E, sh.K}, xp);
  if (bias.has_value()) check_act("bias", *bias, {sh.E}, xp);
  return sh;
}

// Combined [P, S] position read by tap k of output o, or -1 for padding.
inline int64_t tap_source(int64_t o, int64_t k, const ConvShape& sh) {
  const int64_t p = sh.p, s = sh.s, K = sh.K;
  if (o < p + s) {
    const int64_t q = o - (K - 1) + k;
    return q >= 0 ? q : -1;
  }
  const int64_t i = o - p - s;
  const int64_t q = p + (s - 1 - i) - (K - 1) + k;
  if (q >= p) return p + i + (K - 1 - k);
  return q >= 0 ? q : -1;
}

template <typename T>
struct Tokens {  // [P, S] as one token sequence without a copy
  const T* xp;
  const T* xs;
  int64_t p, bp, lp, ep, bs, ls, es;
  Tokens(const at::Tensor& P, const at::Tensor& S, int64_t p_)
      : xp(P.data_ptr<T>()), xs(S.data_ptr<T>()), p(p_), bp(P.stride(0)), lp(P.stride(1)), ep(P.stride(2)),
        bs(S.stride(0)), ls(S.stride(1)), es(S.stride(2)) {}
  inline T operator()(int64_t b, int64_t q, int64_t e) const {
    return q < p ? xp[b * bp + q * lp + e * ep] : xs[b * bs + (q - p) * ls + e * es];
  }
};

// Pre-activation conv output of (b, o) for channels [e0, e1) into a[e - e0].
template <typename T, typename Acc>
void conv_token(const Tokens<T>& x, const at::TensorAccessor<T, 2>& w, const T* bias, const ConvShape& sh, int64_t b,
                int64_t o, int64_t e0, int64_t e1, Acc* a) {
  for (int64_t e = e0; e < e1; ++e) a[e - e0] = bias ? static_cast<Acc>(bias[e]) : Acc(0);
  for (int64_t k = 0; k < sh.K; ++k) {
    const int64_t q = tap_source(o, k, sh);
    if (q < 0) continue;
    for (int64_t e = e0; e < e1; ++e) a[e - e0] += static_cast<Acc>(w[e][k]) * static_cast<Acc>(x(b, q, e));
  }
}

at::Tensor fork_conv1d_cpu(const at::Tensor& x_prefix, const at::Tensor& x_suffix, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& bias) {
  const ConvShape sh = check_fork_conv1d(x_prefix, x_suffix, weight, bias);
  const int64_t Lout = sh.p + 2 * sh.s;
  at::Tensor y = at::empty({sh.batch, Lout, sh.E}, x_prefix.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const Tokens<T> x(x_prefix, x_suffix, sh.p);
    const auto w = weight.accessor<T, 2>();
    const T* bp = bc.defined() ? bc.data_ptr<T>() : nullptr;
    auto yv = y.accessor<T, 3>();
    at::parallel_for(0, sh.batch * Lout, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> a(sh.E);
      for (int64_t bo = begin; bo < end; ++bo) {
        const int64_t b = bo / Lout, o = bo % Lout;
        conv_token<T, Acc>(x, w, bp, sh, b, o, 0, sh.E, a.data());
        for (int64_t e = 0; e < sh.E; ++e) yv[b][o][e] = static_cast<T>(silu(a[e]));
      }
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
  at::Tensor dxp = at::empty({sh.batch, sh.p, sh.E}, x_prefix.options());
  at::Tensor dxs = at::empty({sh.batch, sh.s, sh.E}, x_prefix.options());
  at::Tensor dw = at::empty({sh.E, sh.K}, x_prefix.options());
  at::Tensor db = at::empty({bias.has_value() ? sh.E : 0}, x_prefix.options());
  const at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  constexpr int64_t kBlock = 64;  // channels per task
  const int64_t nblk = (sh.E + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x_prefix.scalar_type(), "vlssm_fork_conv1d_bwd_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const Tokens<T> x(x_prefix, x_suffix, sh.p);
    const auto w = weight.accessor<T, 2>();
    const T* bp = bc.defined() ? bc.data_ptr<T>() : nullptr;
    const auto dyv = dy.accessor<T, 3>();
    auto dxpv = dxp.accessor<T, 3>();
    auto dxsv = dxs.accessor<T, 3>();
    // Per-batch partial weight / bias grads, summed over batch in order below.
    std::vector<Acc> dw_part(sh.batch * sh.E * sh.K, Acc(0)), db_part(sh.batch * sh.E, Acc(0));
    at::parallel_for(0, sh.batch * nblk, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> a(kBlock), dx(Lin * kBlock);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / nblk, e0 = (task % nblk) * kBlock, e1 = std::min(sh.E, e0 + kBlock);
        const int64_t ne = e1 - e0;
        std::fill(dx.begin(), dx.end(), Acc(0));
        Acc* dwb = dw_part.data() + b * sh.E * sh.K;
        Acc* dbb = db_part.data() + b * sh.E;
        for (int64_t o = 0; o < Lout; ++o) {
          conv_token<T, Acc>(x, w, bp, sh, b, o, e0, e1, a.data());
          for (int64_t e = 0; e < ne; ++e) a[e] = static_cast<Acc>(dyv[b][o][e0 + e]) * silu_grad(a[e]);
          for (int64_t e = 0; e < ne; ++e) dbb[e0 + e] += a[e];
          for (int64_t k = 0; k < sh.K; ++k) {
            const int64_t q = tap_source(o, k, sh);
            if (q < 0) continue;
            for (int64_t e = 0; e < ne; ++e) {
              dwb[(e0 + e) * sh.K + k] += a[e] * static_cast<Acc>(x(b, q, e0 + e));
              dx[q * kBlock + e] += a[e] * static_cast<Acc>(w[e0 + e][k]);
            }
          }
        }
        for (int64_t q = 0; q < Lin; ++q)
          for (int64_t e = 0; e < ne; ++e) {
            const T v = static_cast<T>(dx[q * kBlock + e]);
            if (q < sh.p) dxpv[b][q][e0 + e] = v;
            else dxsv[b][q - sh.p][e0 + e] = v;
          }
      }
    });
    auto dwv = dw.accessor<T, 2>();
    for (int64_t e = 0; e < sh.E; ++e) {
      for (int64_t k = 0; k < sh.K; ++k) {
        Acc sacc = 0;
        for (int64_t b = 0; b < sh.batch; ++b) sacc += dw_part[(b * sh.E + e) * sh.K + k];
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
