// CPU kernels of the Interaction and Fusion Module ops (schemas: csrc/ifm.cpp).
//
// relation_aggregate: Y_b = (a M_ka + (1 - a) M_ca,b) T_b. Two ways without a
// (B, C, C) mixed map: (1) mix the C x C map of one batch into a workspace
// (3 C^2 flops) and run ONE gemm (2 C^2 d flops); (2) (1 - a) M_ca T then
// baddbmm with a M_ka T: two gemms, 4 C^2 d flops. d (512) >> 1, so (1) costs
// about half: it is what we do. Batches run in parallel (one C x C workspace
// per thread, single-threaded MKL gemm inside) when there are at least as many
// batches as threads; otherwise batch by batch with a parallel mix and a
// multi-threaded gemm. Half inputs mix in float32 and multiply in float32
// (T_b upcast per batch), the output is rounded once.
// Backward: G = dY T^T for the whole batch (one bmm, written straight into
// dm_ca's storage for float32 / float64), then one fused pass over the rows of
// the C x C maps writes dm_ca = (1 - a) G, dm_ka = a G (summed over the batch
// in a fixed order when m_ka is shared) and the per-row partials of
// dalpha = sum G (M_ka - M_ca), summed in row order: deterministic, no atomics.
// dT_b = mixed_b^T dY_b re-mixes the map into the workspace.
//
// kcr_loss: one pass over the rows of the broadcast (..., C) computing dot,
// |a|^2, |b|^2 (vectorised over d), saved as stats (dot, |a|, |b|); the mean
// is a serial sum in row order. The backward computes the gradient of each
// input directly in that input's shape: one task per row of the input, looping
// over the broadcast rows that read it in a fixed order, so a broadcast input's
// gradient is summed in registers, never materialised at the broadcast shape.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../ifm_shapes.h"
#include "simd.h"

namespace vlssm {
namespace cpu {
namespace {

// Unit stride along the last dim (the vectorised one); other strides kept (stride 0 too).
at::Tensor last_contig(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) == 1 ? t : t.contiguous(); }

double scalar_of(const at::Tensor& t) { return t.to(at::kDouble).item<double>(); }

// ws (C, C) = a * ka + (1 - a) * ca for rows [i0, i1) of one batch.
template <typename T, typename Acc>
void mix_rows(const T* ka, int64_t ka_si, const T* ca, int64_t ca_si, Acc a, Acc* ws, int64_t C, int64_t i0,
              int64_t i1) {
  const Acc b = Acc(1) - a;
  for (int64_t i = i0; i < i1; ++i) {
    const T* kr = ka + i * ka_si;
    const T* cr = ca + i * ca_si;
    Acc* w = ws + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) w[j] = a * static_cast<Acc>(kr[j]) + b * static_cast<Acc>(cr[j]);
  }
}

// ac += ky * y + kx * x over one row of d (the kcr_loss backward).
template <typename T, typename Acc>
inline void axpby_row(Acc* ac, Acc ky, const T* y, Acc kx, const T* x, int64_t d) {
#pragma omp simd
  for (int64_t k = 0; k < d; ++k) ac[k] += ky * static_cast<Acc>(y[k]) + kx * static_cast<Acc>(x[k]);
}

// dot, |x|^2, |y|^2 of one row (a function: no pragma inside the dispatch macro).
template <typename T, typename Acc>
inline void kcr_row_sums(const T* x, const T* y, int64_t d, Acc& dot_out, Acc& xx_out, Acc& yy_out) {
  Acc dot = 0, xx = 0, yy = 0;
#pragma omp simd reduction(+ : dot, xx, yy)
  for (int64_t k = 0; k < d; ++k) {
    const Acc xv = static_cast<Acc>(x[k]), yv = static_cast<Acc>(y[k]);
    dot += xv * yv;
    xx += xv * xv;
    yy += yv * yv;
  }
  dot_out = dot;
  xx_out = xx;
  yy_out = yy;
}

// Multiversioned (AVX-512 / AVX2 / baseline, csrc/cpu/simd.h) entry points of
// the vectorised row loops, one overload per (dtype, accumulation dtype).
#define VLSSM_IFM_ENTRIES(T, Acc)                                                                              \
  VLSSM_CLONES void mix_rows_v(const T* ka, int64_t ka_si, const T* ca, int64_t ca_si, Acc a, Acc* ws,        \
                               int64_t C, int64_t i0, int64_t i1) {                                           \
    mix_rows<T, Acc>(ka, ka_si, ca, ca_si, a, ws, C, i0, i1);                                                  \
  }                                                                                                            \
  VLSSM_CLONES void kcr_row_sums_v(const T* x, const T* y, int64_t d, Acc& dot, Acc& xx, Acc& yy) {           \
    kcr_row_sums<T, Acc>(x, y, d, dot, xx, yy);                                                                \
  }                                                                                                            \
  VLSSM_CLONES void axpby_row_v(Acc* ac, Acc ky, const T* y, Acc kx, const T* x, int64_t d) {                 \
    axpby_row<T, Acc>(ac, ky, y, kx, x, d);                                                                    \
  }
VLSSM_IFM_ENTRIES(float, float)
VLSSM_IFM_ENTRIES(double, double)
VLSSM_IFM_ENTRIES(at::BFloat16, float)
VLSSM_IFM_ENTRIES(at::Half, float)
#undef VLSSM_IFM_ENTRIES

// f(b, ws) for every batch b, ws a (C, C) workspace of dtype `opts`. Parallel
// over batches when there are enough of them, else serial (the gemms thread).
template <typename F>
void for_each_batch(int64_t B, int64_t C, const at::TensorOptions& opts, const F& f) {
  if (B > 1 && B >= at::get_num_threads()) {
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      at::AutoDispatchBelowADInplaceOrView guard;  // worker threads: no autograd recording
      at::Tensor ws = at::empty({C, C}, opts);
      for (int64_t b = b0; b < b1; ++b) f(b, ws);
    });
  } else {
    at::Tensor ws = at::empty({C, C}, opts);
    for (int64_t b = 0; b < B; ++b) f(b, ws);
  }
}

// The mixed map of batch b into ws (parallel over rows unless inside a parallel region).
template <typename T, typename Acc>
void mix_batch(const at::Tensor& ka, const at::Tensor& ca, bool shared, Acc a, int64_t b, at::Tensor& ws) {
  const int64_t C = ca.size(1);
  const T* kp = ka.data_ptr<T>() + (shared ? 0 : b * ka.stride(0));
  const T* cp = ca.data_ptr<T>() + b * ca.stride(0);
  const int64_t ka_si = ka.stride(shared ? 0 : 1), ca_si = ca.stride(1);
  Acc* w = ws.data_ptr<Acc>();
  at::parallel_for(0, C, std::max<int64_t>(1, 4096 / C), [&](int64_t i0, int64_t i1) {
    mix_rows_v(kp, ka_si, cp, ca_si, a, w, C, i0, i1);
  });
}

template <typename Acc>
at::TensorOptions acc_options(const at::Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<Acc>::value);
}

at::Tensor relation_aggregate_cpu(const at::Tensor& m_ka, const at::Tensor& m_ca, const at::Tensor& t_ca,
                                  const at::Tensor& alpha) {
  const RelAggShape sh = check_relation_aggregate(m_ka, m_ca, t_ca, alpha);
  const double av = scalar_of(alpha);
  at::Tensor out = at::empty({sh.batch, sh.labels, sh.dim}, t_ca.options());
  const at::Tensor ka = last_contig(m_ka), ca = last_contig(m_ca);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t_ca.scalar_type(), "vlssm_relation_aggregate_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto opts = acc_options<Acc>(t_ca);
    for_each_batch(sh.batch, sh.labels, opts, [&](int64_t b, at::Tensor& ws) {
      mix_batch<T, Acc>(ka, ca, sh.shared_ka, static_cast<Acc>(av), b, ws);
      at::Tensor ob = out.select(0, b);
      if constexpr (std::is_same_v<T, Acc>) {
        at::mm_out(ob, ws, t_ca.select(0, b));
      } else {
        ob.copy_(at::mm(ws, t_ca.select(0, b).to(opts.dtype())));
      }
    });
  });
  return out;
}

// Fused pass over rows [i0, i1) of the C x C maps: G (B, C, C) acc dtype, contiguous.
template <typename T, typename Acc>
void relagg_grad_rows(const Acc* G, const T* ka, int64_t ka_sb, int64_t ka_si, const T* ca, int64_t ca_sb,
                      int64_t ca_si, int64_t B, int64_t C, bool shared, Acc a, T* dka, T* dca, double* dalpha_rows,
                      int64_t i0, int64_t i1) {
  const Acc oma = Acc(1) - a;
  std::vector<Acc> rowsum(shared ? C : 0);
  for (int64_t i = i0; i < i1; ++i) {
    double part = 0;
    std::fill(rowsum.begin(), rowsum.end(), Acc(0));
    for (int64_t b = 0; b < B; ++b) {
      const Acc* g = G + (b * C + i) * C;
      const T* kr = ka + b * ka_sb + i * ka_si;
      const T* cr = ca + b * ca_sb + i * ca_si;
      T* dcr = dca + (b * C + i) * C;
      Acc s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < C; ++j) {
        const Acc gj = g[j];
        s += gj * (static_cast<Acc>(kr[j]) - static_cast<Acc>(cr[j]));
      }
      if (shared) {
        Acc* rs = rowsum.data();
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) rs[j] += g[j];
      } else {
        T* dkr = dka + (b * C + i) * C;
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) dkr[j] = static_cast<T>(a * g[j]);
      }
      // last: dca may alias G (float32 / float64)
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) dcr[j] = static_cast<T>(oma * g[j]);
      part += static_cast<double>(s);
    }
    if (shared) {
      T* dkr = dka + i * C;
      for (int64_t j = 0; j < C; ++j) dkr[j] = static_cast<T>(a * rowsum[j]);
    }
    dalpha_rows[i] = part;
  }
}

std::vector<at::Tensor> relation_aggregate_backward_cpu(const at::Tensor& grad, const at::Tensor& m_ka,
                                                        const at::Tensor& m_ca, const at::Tensor& t_ca,
                                                        const at::Tensor& alpha) {
  const RelAggShape sh = check_relation_aggregate(m_ka, m_ca, t_ca, alpha);
  check_same("grad", grad, t_ca);
  const int64_t B = sh.batch, C = sh.labels;
  const double av = scalar_of(alpha);
  at::Tensor dka = at::empty(m_ka.sizes(), t_ca.options());
  at::Tensor dca = at::empty({B, C, C}, t_ca.options());
  at::Tensor dt = at::empty({B, C, sh.dim}, t_ca.options());
  at::Tensor dalpha = at::empty({}, alpha.options());
  const at::Tensor ka = last_contig(m_ka), ca = last_contig(m_ca);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t_ca.scalar_type(),
                                  "vlssm_relation_aggregate_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto opts = acc_options<Acc>(t_ca);
    const Acc a = static_cast<Acc>(av);
    at::Tensor G;
    if constexpr (std::is_same_v<T, Acc>) {
      at::bmm_out(dca, grad, t_ca.transpose(1, 2));  // G in dm_ca's storage
      G = dca;
    } else {
      G = at::bmm(grad.to(opts.dtype()), t_ca.to(opts.dtype()).transpose(1, 2));
    }
    std::vector<double> dalpha_rows(C);
    const T* kp = ka.data_ptr<T>();
    const T* cp = ca.data_ptr<T>();
    const int64_t ka_sb = sh.shared_ka ? 0 : ka.stride(0), ka_si = ka.stride(sh.shared_ka ? 0 : 1);
    const Acc* Gp = G.data_ptr<Acc>();
    T* dkp = dka.data_ptr<T>();
    T* dcp = dca.data_ptr<T>();
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / (B * C)), [&](int64_t i0, int64_t i1) {
      relagg_grad_rows<T, Acc>(Gp, kp, ka_sb, ka_si, cp, ca.stride(0), ca.stride(1), B, C, sh.shared_ka, a, dkp,
                               dcp, dalpha_rows.data(), i0, i1);
    });
    double s = 0;
    for (int64_t i = 0; i < C; ++i) s += dalpha_rows[i];
    dalpha.fill_(s);
    for_each_batch(B, C, opts, [&](int64_t b, at::Tensor& ws) {
      mix_batch<T, Acc>(ka, ca, sh.shared_ka, a, b, ws);
      at::Tensor db = dt.select(0, b);
      if constexpr (std::is_same_v<T, Acc>) {
        at::mm_out(db, ws.t(), grad.select(0, b));
      } else {
        db.copy_(at::mm(ws.t(), grad.select(0, b).to(opts.dtype())));
      }
    });
  });
  return {dka, dca, dt, dalpha};
}

// ---------------------------------------------------------------------------
// kcr_loss

// Element offsets of row r (linear over `sizes`) in a tensor with leading strides `strides`.
inline int64_t row_offset(int64_t r, const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  int64_t off = 0;
  for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
    const int64_t c = r % sizes[i];
    r /= sizes[i];
    off += c * strides[i];
  }
  return off;
}

std::vector<int64_t> lead_strides(const at::Tensor& t) {
  return std::vector<int64_t>(t.strides().begin(), t.strides().end() - 1);
}

std::tuple<at::Tensor, at::Tensor> kcr_loss_cpu(const at::Tensor& t_ka, const at::Tensor& t_ca, double eps) {
  const KcrShape sh = check_kcr_loss(t_ka, t_ca, eps);
  const auto acc_type = acc_dtype(t_ka.scalar_type());
  std::vector<int64_t> full(sh.rows);
  full.push_back(sh.dim);
  const at::Tensor a = last_contig(t_ka).expand(full), b = last_contig(t_ca).expand(full);
  std::vector<int64_t> stats_shape(sh.rows);
  stats_shape.push_back(3);
  at::Tensor stats = at::empty(stats_shape, t_ka.options().dtype(acc_type));
  at::Tensor loss = at::empty({}, t_ka.options().dtype(acc_type));
  const auto sa = lead_strides(a), sb = lead_strides(b);
  const int64_t R = sh.nrows, d = sh.dim;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t_ka.scalar_type(), "vlssm_kcr_loss_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const T* ap = a.data_ptr<T>();
    const T* bp = b.data_ptr<T>();
    Acc* st = stats.data_ptr<Acc>();
    std::vector<Acc> vals(R);
    const Acc e = static_cast<Acc>(eps);
    at::parallel_for(0, R, std::max<int64_t>(1, 16384 / d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* x = ap + row_offset(r, sh.rows, sa);
        const T* y = bp + row_offset(r, sh.rows, sb);
        Acc dot, xx, yy;
        kcr_row_sums_v(x, y, d, dot, xx, yy);
        const Acc nx = std::sqrt(xx), ny = std::sqrt(yy);
        st[3 * r] = dot;
        st[3 * r + 1] = nx;
        st[3 * r + 2] = ny;
        vals[r] = Acc(1) - dot / (std::max(nx, e) * std::max(ny, e));
      }
    });
    double s = 0;  // fixed order: independent of the thread count
    for (int64_t r = 0; r < R; ++r) s += static_cast<double>(vals[r]);
    loss.fill_(s / static_cast<double>(R));
  });
  return {loss, stats};
}

// dX (X's own shape, contiguous) of loss = mean(1 - cos(X row, Y row)); `first`:
// X is the first argument (stats column 1 is |X|).
template <typename T, typename Acc>
void kcr_grad_of(const at::Tensor& X, const at::Tensor& Xe, const at::Tensor& Ye, const Acc* st,
                 const std::vector<int64_t>& rows, double g, double eps, bool first, at::Tensor& dX) {
  const int64_t n = static_cast<int64_t>(rows.size()), d = Xe.size(-1);
  std::vector<int64_t> own(n, 1), red(n, 1);  // X's padded leading shape; the dims it is broadcast along
  for (int64_t i = 0; i < X.dim() - 1; ++i) own[n - (X.dim() - 1) + i] = X.size(i);
  int64_t Rt = 1, Nr = 1;
  for (int64_t i = 0; i < n; ++i) {
    red[i] = own[i] == 1 ? rows[i] : 1;
    Rt *= own[i];
    Nr *= red[i];
  }
  std::vector<int64_t> row_str(n);  // strides of the contiguous (rows) stats
  for (int64_t i = n - 1, s = 1; i >= 0; --i) {
    row_str[i] = s;
    s *= rows[i];
  }
  const auto sx = lead_strides(Xe), sy = lead_strides(Ye);
  // the same coordinate decomposition in X's own shape and over the reduced dims
  std::vector<int64_t> own_sx(n), own_sy(n), own_st(n), red_sx(n), red_sy(n), red_st(n);
  for (int64_t i = 0; i < n; ++i) {
    own_sx[i] = own[i] == 1 ? 0 : sx[i];
    own_sy[i] = own[i] == 1 ? 0 : sy[i];
    own_st[i] = own[i] == 1 ? 0 : row_str[i];
    red_sx[i] = red[i] == 1 ? 0 : sx[i];
    red_sy[i] = red[i] == 1 ? 0 : sy[i];
    red_st[i] = red[i] == 1 ? 0 : row_str[i];
  }
  const T* xp = Xe.data_ptr<T>();
  const T* yp = Ye.data_ptr<T>();
  T* out = dX.data_ptr<T>();
  const Acc gg = static_cast<Acc>(g), e = static_cast<Acc>(eps);
  const int cx = first ? 1 : 2, cy = first ? 2 : 1;
  at::parallel_for(0, Rt, std::max<int64_t>(1, 16384 / (d * Nr)), [&](int64_t r0, int64_t r1) {
    std::vector<Acc> acc(d);
    for (int64_t r = r0; r < r1; ++r) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      const int64_t ox = row_offset(r, own, own_sx), oy = row_offset(r, own, own_sy), os = row_offset(r, own, own_st);
      for (int64_t q = 0; q < Nr; ++q) {
        const T* x = xp + ox + row_offset(q, red, red_sx);
        const T* y = yp + oy + row_offset(q, red, red_sy);
        const Acc* s = st + 3 * (os + row_offset(q, red, red_st));
        const Acc nx = s[cx], ny = s[cy];
        const Acc mx = std::max(nx, e), my = std::max(ny, e);
        const Acc inv = Acc(1) / (mx * my);
        const Acc cosv = s[0] * inv;
        // d(1 - cos)/dx = -(y / (mx my) - cos x / (mx nx) [|x| >= eps])
        const Acc ky = -gg * inv;
        const Acc kx = (nx >= e && nx > 0) ? gg * cosv / (mx * nx) : Acc(0);
        axpby_row_v(acc.data(), ky, y, kx, x, d);
      }
      T* o = out + r * d;
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<T>(acc[k]);
    }
  });
}

std::vector<at::Tensor> kcr_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& t_ka,
                                              const at::Tensor& t_ca, const at::Tensor& stats, double eps) {
  const KcrShape sh = check_kcr_loss(t_ka, t_ca, eps);
  const auto acc_type = acc_dtype(t_ka.scalar_type());
  TORCH_CHECK_VALUE(grad.defined() && grad.dim() == 0, "grad must be a 0-dim tensor, got ",
                    grad.defined() ? shape_str(grad.sizes()) : std::string("undefined"));
  check_floating("grad", grad);
  std::vector<int64_t> stats_shape(sh.rows);
  stats_shape.push_back(3);
  check_tensor("stats", stats, stats_shape, acc_type);
  TORCH_CHECK_VALUE(stats.device() == t_ka.device(), "stats must be on ", t_ka.device(), ", got ", stats.device());
  std::vector<int64_t> full(sh.rows);
  full.push_back(sh.dim);
  const at::Tensor a = last_contig(t_ka).expand(full), b = last_contig(t_ca).expand(full);
  const at::Tensor stc = stats.contiguous();
  const double g = scalar_of(grad) / static_cast<double>(sh.nrows);
  at::Tensor dka = at::empty(t_ka.sizes(), t_ka.options());
  at::Tensor dca = at::empty(t_ca.sizes(), t_ca.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t_ka.scalar_type(), "vlssm_kcr_loss_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const Acc* st = stc.data_ptr<Acc>();
    kcr_grad_of<T, Acc>(t_ka, a, b, st, sh.rows, g, eps, true, dka);
    kcr_grad_of<T, Acc>(t_ca, b, a, st, sh.rows, g, eps, false, dca);
  });
  return {dka, dca};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CPU, m) {
  m.impl("relation_aggregate", &relation_aggregate_cpu);
  m.impl("relation_aggregate_backward", &relation_aggregate_backward_cpu);
  m.impl("kcr_loss", &kcr_loss_cpu);
  m.impl("kcr_loss_backward", &kcr_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace vlssm
