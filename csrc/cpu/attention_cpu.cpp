// CPU kernels of attention_with_probs: the three matrix products are ATen
// GEMMs (at::bmm_out into preallocated outputs: MKL / oneDNN), the row-wise
// work is fused into one in-place pass per row run with at::parallel_for:
//
// forward:  S = q k^T written into probs (the scores buffer IS probs), then per
//           row: max of scale * s, e = exp(scale * s - max), sum, e / sum, in
//           place; out = probs v. No other (n, Lq, Lk) buffer.
// backward: G = dout v^T into the dS buffer, then per row:
//           dP = G + dprobs, c = sum_j P dP, dS = scale * P * (dP - c) in place;
//           dq = dS k, dk = dS^T q, dv = P^T dout.
//
// float16 / bfloat16 inputs are computed in float32 (upcast operands, one
// float32 scores buffer, rounded once into probs / out / the gradients).
// Operands are read through strides (transposed, sliced, stride-0 batch).
// The row functions are multiversioned (VLSSM_CLONES) and vectorized with
// `omp simd` and the branch-free fast_exp of fast_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../attention_shapes.h"
#include "../fast_math.h"
#include "simd.h"

namespace vlssm {
namespace cpu {
namespace {

// Rows per parallel task: about 32k elements of work each.
inline int64_t row_grain(int64_t len) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(len, 1)); }

// In-place softmax(scale * x) of rows [r0, r1) of a contiguous (rows, len) buffer.
#define VLSSM_SOFTMAX_ROWS(Acc)                                                              \
  VLSSM_CLONES void softmax_rows(Acc* S, int64_t len, Acc scale, int64_t r0, int64_t r1) {   \
    for (int64_t r = r0; r < r1; ++r) {                                                       \
      Acc* x = S + r * len;                                                                   \
      Acc m = -INFINITY;                                                                      \
      _Pragma("omp simd reduction(max : m)") for (int64_t j = 0; j < len; ++j) {              \
        const Acc t = x[j] * scale;                                                           \
        m = t > m ? t : m;                                                                    \
      }                                                                                       \
      Acc s = 0;                                                                              \
      _Pragma("omp simd reduction(+ : s)") for (int64_t j = 0; j < len; ++j) {                \
        const Acc e = fast_exp(x[j] * scale - m);                                             \
        x[j] = e;                                                                             \
        s += e;                                                                               \
      }                                                                                       \
      const Acc inv = Acc(1) / s;                                                             \
      _Pragma("omp simd") for (int64_t j = 0; j < len; ++j) x[j] *= inv;                      \
    }                                                                                         \
  }
VLSSM_SOFTMAX_ROWS(float)
VLSSM_SOFTMAX_ROWS(double)
#undef VLSSM_SOFTMAX_ROWS

// Strided (batch, row, col) read-only view of an (n, Lq, Lk) map.
template <typename Acc>
struct MapView {
  const Acc* p = nullptr;
  int64_t sb = 0, sr = 0, sc = 0;
};

// dS = scale * P * (G + dP - rowsum(P * (G + dP))) in place in G (contiguous
// (n * Lq, Lk)); P and dP (optional) are strided views of (n, Lq, Lk) maps.
#define VLSSM_DS_ROWS(Acc)                                                                          \
  VLSSM_CLONES void ds_rows(Acc* G, MapView<Acc> P, MapView<Acc> dP, int64_t Lq, int64_t len,       \
                            Acc scale, int64_t r0, int64_t r1) {                                    \
    for (int64_t r = r0; r < r1; ++r) {                                                             \
      Acc* g = G + r * len;                                                                         \
      const int64_t b = r / Lq, i = r % Lq;                                                         \
      const Acc* p = P.p + b * P.sb + i * P.sr;                                                     \
      const int64_t ps = P.sc;                                                                      \
      Acc c = 0;                                                                                    \
      if (dP.p != nullptr) {                                                                        \
        const Acc* dp = dP.p + b * dP.sb + i * dP.sr;                                               \
        const int64_t ds = dP.sc;                                                                   \
        if (ps == 1 && ds == 1) {                                                                   \
          _Pragma("omp simd reduction(+ : c)") for (int64_t j = 0; j < len; ++j) {                  \
            const Acc t = g[j] + dp[j];                                                             \
            g[j] = t;                                                                               \
            c += p[j] * t;                                                                          \
          }                                                                                         \
        } else {                                                                                    \
          for (int64_t j = 0; j < len; ++j) {                                                       \
            const Acc t = g[j] + dp[j * ds];                                                        \
            g[j] = t;                                                                               \
            c += p[j * ps] * t;                                                                     \
          }                                                                                         \
        }                                                                                           \
      } else if (ps == 1) {                                                                         \
        _Pragma("omp simd reduction(+ : c)") for (int64_t j = 0; j < len; ++j) c += p[j] * g[j];    \
      } else {                                                                                      \
        for (int64_t j = 0; j < len; ++j) c += p[j * ps] * g[j];                                    \
      }                                                                                             \
      if (ps == 1) {                                                                                \
        _Pragma("omp simd") for (int64_t j = 0; j < len; ++j) g[j] = scale * p[j] * (g[j] - c);     \
      } else {                                                                                      \
        for (int64_t j = 0; j < len; ++j) g[j] = scale * p[j * ps] * (g[j] - c);                    \
      }                                                                                             \
    }                                                                                               \
  }
VLSSM_DS_ROWS(float)
VLSSM_DS_ROWS(double)
#undef VLSSM_DS_ROWS

template <typename Acc>
MapView<Acc> map_view(const at::Tensor& t) {
  return {t.data_ptr<Acc>(), t.stride(0), t.stride(1), t.stride(2)};
}

// The operand in the compute dtype (float32 for half inputs; no copy otherwise).
inline at::Tensor compute(const at::Tensor& t, at::ScalarType acc) {
  return t.scalar_type() == acc ? t : t.to(acc);
}

std::tuple<at::Tensor, at::Tensor> attention_with_probs_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, double scale) {
  const AttnShape sh = check_attention(q, k, v, scale);
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype(dtype);
  const bool half = dtype != acc;
  const at::Tensor qc = compute(q, acc), kc = compute(k, acc), vc = compute(v, acc);
  // The scores buffer: probs itself, or its float32 version for half inputs.
  at::Tensor S = at::empty({sh.batch, sh.Lq, sh.Lk}, q.options().dtype(acc));
  at::bmm_out(S, qc, kc.transpose(1, 2));
  AT_DISPATCH_FLOATING_TYPES(acc, "vlssm_attention_softmax_cpu", [&] {
    scalar_t* p = S.data_ptr<scalar_t>();
    const scalar_t sc = static_cast<scalar_t>(scale);
    const int64_t Lk = sh.Lk;
    at::parallel_for(0, sh.batch * sh.Lq, row_grain(Lk), [&](int64_t r0, int64_t r1) {
      softmax_rows(p, Lk, sc, r0, r1);
    });
  });
  at::Tensor out = at::empty({sh.batch, sh.Lq, sh.dv}, q.options().dtype(acc));
  at::bmm_out(out, S, vc);
  if (!half) return {out, S};
  return {out.to(dtype), S.to(dtype)};
}

std::vector<at::Tensor> attention_with_probs_backward_cpu(const at::Tensor& dout,
                                                          const c10::optional<at::Tensor>& dprobs,
                                                          const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& probs,
                                                          double scale) {
  const AttnShape sh = check_attention_backward(dout, dprobs, q, k, v, probs, scale);
  const auto dtype = q.scalar_type();
  const auto acc = acc_dtype(dtype);
  const bool half = dtype != acc;
  const at::Tensor qc = compute(q, acc), kc = compute(k, acc), vc = compute(v, acc);
  const at::Tensor doc = compute(dout, acc), Pc = compute(probs, acc);
  const at::Tensor dPc = dprobs.has_value() ? compute(*dprobs, acc) : at::Tensor();
  // dS buffer, first holding dout v^T.
  at::Tensor dS = at::empty({sh.batch, sh.Lq, sh.Lk}, q.options().dtype(acc));
  at::bmm_out(dS, doc, vc.transpose(1, 2));
  AT_DISPATCH_FLOATING_TYPES(acc, "vlssm_attention_ds_cpu", [&] {
    using Acc = scalar_t;
    Acc* g = dS.data_ptr<Acc>();
    const MapView<Acc> P = map_view<Acc>(Pc);
    const MapView<Acc> dP = dPc.defined() ? map_view<Acc>(dPc) : MapView<Acc>();
    const Acc sc = static_cast<Acc>(scale);
    const int64_t Lq = sh.Lq, Lk = sh.Lk;
    at::parallel_for(0, sh.batch * Lq, row_grain(Lk), [&](int64_t r0, int64_t r1) {
      ds_rows(g, P, dP, Lq, Lk, sc, r0, r1);
    });
  });
  const auto opts = q.options().dtype(acc);
  at::Tensor dq = at::empty({sh.batch, sh.Lq, sh.d}, opts);
  at::Tensor dk = at::empty({sh.batch, sh.Lk, sh.d}, opts);
  at::Tensor dv = at::empty({sh.batch, sh.Lk, sh.dv}, opts);
  at::bmm_out(dq, dS, kc);
  at::bmm_out(dk, dS.transpose(1, 2), qc);
  at::bmm_out(dv, Pc.transpose(1, 2), doc);
  if (!half) return {dq, dk, dv};
  return {dq.to(dtype), dk.to(dtype), dv.to(dtype)};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CPU, m) {
  m.impl("attention_with_probs", &attention_with_probs_cpu);
  m.impl("attention_with_probs_backward", &attention_with_probs_backward_cpu);
}

}  // namespace cpu
}  // namespace vlssm
