// CPU kernels of vlssm::selective_scan and vlssm::fork_scan (forward and backward).
//
// Work split: one task per (batch, block of kChanBlock channels), run with
// at::parallel_for (OpenMP). A task packs B and C of its batch into (L, N)
// float buffers once, then scans its channels one by one with the state
// dimension as the SIMD-friendly inner loop. No (b, D, L, N) temporaries: the
// forward keeps the state every kChunk steps (checkpoints) and the backward
// recomputes one chunk of states at a time from them, like mamba's kernel.
// Reductions over channels (dB, dC) and over batch (dA, dD, d delta_bias) go
// through per-task buffers summed in a fixed order: results are bitwise
// deterministic for any thread count.
//
// All operands are read through element strides, so token-major (b, L, D)
// views, channel-major (b, D, L) tensors, slices and batch-broadcast (stride 0)
// inputs work without copies.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../scan_math.h"
#include "../scan_shapes.h"

namespace vlssm {
namespace cpu {
namespace {

constexpr int64_t kChunk = kCheckpointChunk;  // steps between saved states
constexpr int64_t kChanBlock = 32;            // channels per task

// Read-only (b, x, l) view through element strides.
template <typename T>
struct View {
  const T* p = nullptr;
  int64_t sb = 0, sx = 0, sl = 0;
  View() = default;
  View(const at::Tensor& t, int dim_b, int dim_x, int dim_l)
      : p(t.data_ptr<T>()), sb(t.stride(dim_b)), sx(t.stride(dim_x)), sl(t.stride(dim_l)) {}
  inline T operator()(int64_t b, int64_t x, int64_t l) const { return p[b * sb + x * sx + l * sl]; }
  explicit operator bool() const { return p != nullptr; }
};

template <typename T>
struct MutView {
  T* p = nullptr;
  int64_t sb = 0, sx = 0, sl = 0;
  MutView() = default;
  MutView(at::Tensor& t, int dim_b, int dim_x, int dim_l)
      : p(t.data_ptr<T>()), sb(t.stride(dim_b)), sx(t.stride(dim_x)), sl(t.stride(dim_l)) {}
  inline T& operator()(int64_t b, int64_t x, int64_t l) const { return p[b * sb + x * sx + l * sl]; }
};

// Everything a scan task reads. Layout-free: (b, channel, token) for u,
// delta, z and (b, state, token) for B, C.
template <typename T, typename Acc>
struct ScanInputs {
  View<T> u, delta, B, C, z;
  const Acc* A = nullptr;      // (D, N) contiguous
  const Acc* Dskip = nullptr;  // (D) or null
  const Acc* bias = nullptr;   // (D) or null
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  bool softplus = false;
};

template <typename T, typename Acc>
void pack_bc(const ScanInputs<T, Acc>& in, int64_t b, Acc* Bp, Acc* Cp) {
  const int64_t N = in.N;
  for (int64_t l = 0; l < in.L; ++l)
    for (int64_t n = 0; n < N; ++n) {
      Bp[l * N + n] = static_cast<Acc>(in.B(b, n, l));
      Cp[l * N + n] = static_cast<Acc>(in.C(b, n, l));
    }
}

template <typename Acc>
inline Acc step_dt(Acc raw, bool sp) {
  return sp ? softplus(raw) : raw;
}

// Forward over one segment: tokens l0 .. l0+len-1, visited from the last one
// when `rev`. h (N) is the state in and out; ck receives the state before
// every kChunk-th step; yout[i] (token order inside the segment, may be null)
// receives C.h + D*u.
template <typename T, typename Acc>
void segment_fwd(const ScanInputs<T, Acc>& in, int64_t b, int64_t d, int64_t l0, int64_t len, bool rev,
                 const Acc* Bp, const Acc* Cp, Acc* h, Acc* ck, Acc* yout) {
  const int64_t N = in.N;
  const Acc* Ad = in.A + d * N;
  const Acc bias = in.bias ? in.bias[d] : Acc(0);
  const Acc Dd = in.Dskip ? in.Dskip[d] : Acc(0);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = rev ? len - 1 - j : j;
    const int64_t l = l0 + i;
    if (j % kChunk == 0) std::copy(h, h + N, ck + (j / kChunk) * N);
    const Acc dt = step_dt<Acc>(static_cast<Acc>(in.delta(b, d, l)) + bias, in.softplus);
    const Acc uu = static_cast<Acc>(in.u(b, d, l));
    const Acc dtu = dt * uu;
    const Acc* Bl = Bp + l * N;
    const Acc* Cl = Cp + l * N;
    Acc y = 0;
#pragma omp simd reduction(+ : y)
    for (int64_t n = 0; n < N; ++n) {
      const Acc hn = fast_exp(dt * Ad[n]) * h[n] + dtu * Bl[n];
      h[n] = hn;
      y += hn * Cl[n];
    }
    if (yout) yout[i] = y + Dd * uu;
  }
}

// Per-channel gradient sinks of a backward segment.
template <typename Acc>
struct ChannelGrads {
  Acc* dBp;      // (L, N) packed partial, accumulated
  Acc* dCp;      // (L, N) packed partial, accumulated
  Acc* dA;       // (N) accumulated
  Acc dD = 0, dbias = 0;
  Acc* du;       // (L) token-indexed, written
  Acc* ddelta;   // (L) token-indexed, written
};

// Backward over one segment (the adjoint of segment_fwd).
// g[i] (token order, may be null = 0): gradient w.r.t. C.h + D*u of token i.
// lam (N): in, the gradient w.r.t. the state after the segment; out, w.r.t.
// the state before it. ypre[i] (may be null) receives C.h + D*u, recomputed.
// work: 2*kChunk*N + 2*kChunk values.
template <typename T, typename Acc>
void segment_bwd(const ScanInputs<T, Acc>& in, int64_t b, int64_t d, int64_t l0, int64_t len, bool rev,
                 const Acc* Bp, const Acc* Cp, const Acc* ck, const Acc* g, Acc* lam, ChannelGrads<Acc>& gr,
                 Acc* ypre, Acc* work) {
  const int64_t N = in.N;
  const Acc* Ad = in.A + d * N;
  const Acc bias = in.bias ? in.bias[d] : Acc(0);
  const Acc Dd = in.Dskip ? in.Dskip[d] : Acc(0);
  Acc* hs = work;              // (kChunk, N) states after each step
  Acc* eA = hs + kChunk * N;   // (kChunk, N) exp(dt * A)
  Acc* dts = eA + kChunk * N;  // (kChunk) dt
  Acc* raws = dts + kChunk;    // (kChunk) delta + bias
  const int64_t nchunks = (len + kChunk - 1) / kChunk;
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t j0 = c * kChunk, j1 = std::min(len, j0 + kChunk);
    const Acc* h0 = ck + c * N;
    // Recompute the chunk's states from its checkpoint.
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t jj = j - j0;
      const int64_t l = l0 + (rev ? len - 1 - j : j);
      const Acc raw = static_cast<Acc>(in.delta(b, d, l)) + bias;
      const Acc dt = step_dt<Acc>(raw, in.softplus);
      raws[jj] = raw;
      dts[jj] = dt;
      const Acc dtu = dt * static_cast<Acc>(in.u(b, d, l));
      const Acc* hp = jj ? hs + (jj - 1) * N : h0;
      const Acc* Bl = Bp + l * N;
      Acc* hc = hs + jj * N;
      Acc* ec = eA + jj * N;
#pragma omp simd
      for (int64_t n = 0; n < N; ++n) {
        const Acc e = fast_exp(dt * Ad[n]);
        ec[n] = e;
        hc[n] = e * hp[n] + dtu * Bl[n];
      }
    }
    // Walk the chunk backwards.
    for (int64_t j = j1 - 1; j >= j0; --j) {
      const int64_t jj = j - j0;
      const int64_t i = rev ? len - 1 - j : j;
      const int64_t l = l0 + i;
      const Acc uu = static_cast<Acc>(in.u(b, d, l));
      const Acc dt = dts[jj];
      const Acc gj = g ? g[i] : Acc(0);
      const Acc* hc = hs + jj * N;
      const Acc* hp = jj ? hs + (jj - 1) * N : h0;
      const Acc* ec = eA + jj * N;
      const Acc* Bl = Bp + l * N;
      const Acc* Cl = Cp + l * N;
      Acc* dBl = gr.dBp + l * N;
      Acc* dCl = gr.dCp + l * N;
      Acc ddt = 0, dus = 0, y = 0;
#pragma omp simd reduction(+ : ddt, dus, y)
      for (int64_t n = 0; n < N; ++n) {
        y += hc[n] * Cl[n];
        dCl[n] += gj * hc[n];
        const Acc ln = lam[n] + gj * Cl[n];  // d loss / d h_j
        const Acc t = ln * hp[n] * ec[n];    // d loss / d (dt * A)
        ddt += t * Ad[n] + ln * Bl[n] * uu;
        gr.dA[n] += t * dt;
        dBl[n] += ln * dt * uu;
        dus += ln * Bl[n];
        lam[n] = ln * ec[n];                 // d loss / d h_{j-1}
      }
      if (ypre) ypre[i] = y + Dd * uu;
      gr.du[l] = dus * dt + gj * Dd;
      gr.dD += gj * uu;
      const Acc draw = in.softplus ? ddt * softplus_grad(raws[jj]) : ddt;
      gr.ddelta[l] = draw;
      gr.dbias += draw;
    }
  }
}

struct TaskRange {
  int64_t nblk, ntasks;
  TaskRange(int64_t batch, int64_t dim) : nblk((dim + kChanBlock - 1) / kChanBlock), ntasks(batch * nblk) {}
};

at::Tensor opt_or_empty(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------
// Shared plumbing of the two ops' backward: per-task dB/dC partials and
// per-(b, d) dA/dD/dbias partials, reduced in a fixed order.
template <typename Acc>
struct GradBuffers {
  int64_t batch, dim, L, N, nblk;
  std::vector<Acc> dBp, dCp, dA, dD, dbias;
  GradBuffers(int64_t batch_, int64_t dim_, int64_t L_, int64_t N_, int64_t nblk_)
      : batch(batch_), dim(dim_), L(L_), N(N_), nblk(nblk_),
        dBp(batch_ * nblk_ * L_ * N_, Acc(0)), dCp(batch_ * nblk_ * L_ * N_, Acc(0)),
        dA(batch_ * dim_ * N_, Acc(0)), dD(batch_ * dim_, Acc(0)), dbias(batch_ * dim_, Acc(0)) {}
  Acc* task_dB(int64_t b, int64_t blk) { return dBp.data() + (b * nblk + blk) * L * N; }
  Acc* task_dC(int64_t b, int64_t blk) { return dCp.data() + (b * nblk + blk) * L * N; }

  // Sum the partials into dB, dC (views (b, n, l)) and dA (D, N), dD, dbias (D).
  template <typename T>
  void reduce(MutView<T> dB, MutView<T> dC, at::Tensor& dA_t, at::Tensor& dD_t, at::Tensor& dbias_t) {
    at::parallel_for(0, batch * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bl = begin; bl < end; ++bl) {
        const int64_t b = bl / L, l = bl % L;
        for (int64_t n = 0; n < N; ++n) {
          Acc sb = 0, sc = 0;
          for (int64_t k = 0; k < nblk; ++k) {
            sb += dBp[((b * nblk + k) * L + l) * N + n];
            sc += dCp[((b * nblk + k) * L + l) * N + n];
          }
          dB(b, n, l) = static_cast<T>(sb);
          dC(b, n, l) = static_cast<T>(sc);
        }
      }
    });
    Acc* pA = dA_t.data_ptr<Acc>();
    Acc* pD = dD_t.data_ptr<Acc>();
    Acc* pb = dbias_t.data_ptr<Acc>();
    for (int64_t d = 0; d < dim; ++d) {
      Acc sD = 0, sbias = 0;
      for (int64_t b = 0; b < batch; ++b) {
        sD += dD[b * dim + d];
        sbias += dbias[b * dim + d];
      }
      pD[d] = sD;
      pb[d] = sbias;
      for (int64_t n = 0; n < N; ++n) {
        Acc s = 0;
        for (int64_t b = 0; b < batch; ++b) s += dA[(b * dim + d) * N + n];
        pA[d * N + n] = s;
      }
    }
  }
};

// ---------------------------------------------------------------------------
// selective_scan: (b, D, L) operands, mamba_ssm semantics plus reverse and
// initial_state. Returns (out, last_state, checkpoints).

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state);
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  at::Tensor out = at::empty({sh.batch, sh.dim, sh.L}, u.options());
  at::Tensor last = at::empty({sh.batch, sh.dim, sh.N}, acc_opts);
  const int64_t nck = num_checkpoints(sh.L);
  at::Tensor ck = at::empty({sh.batch, sh.dim, nck, sh.N}, acc_opts);
  const at::Tensor Ac = A.contiguous();
  const at::Tensor Dc = opt_or_empty(D), bc = opt_or_empty(delta_bias);
  const at::Tensor h0c = opt_or_empty(initial_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    ScanInputs<T, Acc> in;
    in.u = View<T>(u, 0, 1, 2);
    in.delta = View<T>(delta, 0, 1, 2);
    in.B = View<T>(B, 0, 1, 2);
    in.C = View<T>(C, 0, 1, 2);
    if (z.has_value()) in.z = View<T>(*z, 0, 1, 2);
    in.A = Ac.data_ptr<Acc>();
    in.Dskip = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
    in.bias = bc.defined() ? bc.data_ptr<Acc>() : nullptr;
    in.batch = sh.batch; in.dim = sh.dim; in.L = sh.L; in.N = sh.N;
    in.softplus = delta_softplus;
    const Acc* h0p = h0c.defined() ? h0c.data_ptr<Acc>() : nullptr;
    MutView<T> outv(out, 0, 1, 2);
    Acc* lastp = last.data_ptr<Acc>();
    Acc* ckp = ck.data_ptr<Acc>();
    const TaskRange tr(sh.batch, sh.dim);
    at::parallel_for(0, tr.ntasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<Acc> Bp(sh.L * sh.N), Cp(sh.L * sh.N), y(sh.L);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tr.nblk, blk = task % tr.nblk;
        pack_bc(in, b, Bp.data(), Cp.data());
        for (int64_t d = blk * kChanBlock; d < std::min(sh.dim, (blk + 1) * kChanBlock); ++d) {
          Acc* h = lastp + (b * sh.dim + d) * sh.N;
          if (h0p) std::copy(h0p + (b * sh.dim + d) * sh.N, h0p + (b * sh.dim + d + 1) * sh.N, h);
          else std::fill(h, h + sh.N, Acc(0));
          segment_fwd(in, b, d, 0, sh.L, reverse, Bp.data(), Cp.data(), h, ckp + (b * sh.dim + d) * nck * sh.N,
                      y.data());
          for (int64_t l = 0; l < sh.L; ++l) {
            const Acc v = in.z ? y[l] * silu(static_cast<Acc>(in.z(b, d, l))) : y[l];
            outv(b, d, l) = static_cast<T>(v);
          }
        }
      }
    });
  });
  return {out, last, ck};
}

std::vector<at::Tensor> selective_scan_backward_cpu(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_state, const at::Tensor& u,
    const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    const at::Tensor& checkpoints, bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state);
  check_same("dout", dout, u);
  const int64_t nck = num_checkpoints(sh.L);
  check_checkpoints(checkpoints, {sh.batch, sh.dim, nck, sh.N}, acc_dtype(u.scalar_type()));
  if (dlast_state.has_value())
    check_tensor("dlast_state", *dlast_state, {sh.batch, sh.dim, sh.N}, acc_dtype(u.scalar_type()));
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  at::Tensor du = at::empty({sh.batch, sh.dim, sh.L}, u.options());
  at::Tensor ddelta = at::empty({sh.batch, sh.dim, sh.L}, u.options());
  at::Tensor dB = at::empty({sh.batch, sh.N, sh.L}, u.options());
  at::Tensor dC = at::empty({sh.batch, sh.N, sh.L}, u.options());
  at::Tensor dA = at::empty({sh.dim, sh.N}, acc_opts);
  at::Tensor dD_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dbias_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dz = z.has_value() ? at::empty({sh.batch, sh.dim, sh.L}, u.options()) : at::empty({0}, u.options());
  at::Tensor dh0 = initial_state.has_value() ? at::empty({sh.batch, sh.dim, sh.N}, acc_opts) : at::empty({0}, acc_opts);
  const at::Tensor Ac = A.contiguous();
  const at::Tensor Dc = opt_or_empty(D), bc = opt_or_empty(delta_bias);
  const at::Tensor ckc = checkpoints.contiguous();
  const at::Tensor dlc = opt_or_empty(dlast_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    ScanInputs<T, Acc> in;
    in.u = View<T>(u, 0, 1, 2);
    in.delta = View<T>(delta, 0, 1, 2);
    in.B = View<T>(B, 0, 1, 2);
    in.C = View<T>(C, 0, 1, 2);
    if (z.has_value()) in.z = View<T>(*z, 0, 1, 2);
    in.A = Ac.data_ptr<Acc>();
    in.Dskip = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
    in.bias = bc.defined() ? bc.data_ptr<Acc>() : nullptr;
    in.batch = sh.batch; in.dim = sh.dim; in.L = sh.L; in.N = sh.N;
    in.softplus = delta_softplus;
    const View<T> doutv(dout, 0, 1, 2);
    MutView<T> duv(du, 0, 1, 2), ddv(ddelta, 0, 1, 2), dzv;
    if (z.has_value()) dzv = MutView<T>(dz, 0, 1, 2);
    const Acc* ckp = ckc.data_ptr<Acc>();
    const Acc* dlp = dlc.defined() ? dlc.data_ptr<Acc>() : nullptr;
    Acc* dh0p = initial_state.has_value() ? dh0.data_ptr<Acc>() : nullptr;
    const TaskRange tr(sh.batch, sh.dim);
    GradBuffers<Acc> gb(sh.batch, sh.dim, sh.L, sh.N, tr.nblk);
    at::parallel_for(0, tr.ntasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t L = sh.L, N = sh.N;
      std::vector<Acc> Bp(L * N), Cp(L * N), g(L), ypre(L), dus(L), dds(L), lam(N);
      std::vector<Acc> work(2 * kChunk * N + 2 * kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tr.nblk, blk = task % tr.nblk;
        pack_bc(in, b, Bp.data(), Cp.data());
        for (int64_t d = blk * kChanBlock; d < std::min(sh.dim, (blk + 1) * kChanBlock); ++d) {
          for (int64_t l = 0; l < L; ++l) {
            const Acc dv = static_cast<Acc>(doutv(b, d, l));
            g[l] = in.z ? dv * silu(static_cast<Acc>(in.z(b, d, l))) : dv;
          }
          if (dlp) std::copy(dlp + (b * sh.dim + d) * N, dlp + (b * sh.dim + d + 1) * N, lam.begin());
          else std::fill(lam.begin(), lam.end(), Acc(0));
          ChannelGrads<Acc> gr{gb.task_dB(b, blk), gb.task_dC(b, blk), gb.dA.data() + (b * sh.dim + d) * N,
                               0, 0, dus.data(), dds.data()};
          segment_bwd(in, b, d, 0, L, reverse, Bp.data(), Cp.data(), ckp + (b * sh.dim + d) * nck * N, g.data(),
                      lam.data(), gr, in.z ? ypre.data() : nullptr, work.data());
          gb.dD[b * sh.dim + d] = gr.dD;
          gb.dbias[b * sh.dim + d] = gr.dbias;
          if (dh0p) std::copy(lam.begin(), lam.end(), dh0p + (b * sh.dim + d) * N);
          for (int64_t l = 0; l < L; ++l) {
            duv(b, d, l) = static_cast<T>(dus[l]);
            ddv(b, d, l) = static_cast<T>(dds[l]);
            if (in.z) {
              const Acc zz = static_cast<Acc>(in.z(b, d, l));
              dzv(b, d, l) = static_cast<T>(static_cast<Acc>(doutv(b, d, l)) * ypre[l] * silu_grad(zz));
            }
          }
        }
      }
    });
    gb.reduce(MutView<T>(dB, 0, 1, 2), MutView<T>(dC, 0, 1, 2), dA, dD_full, dbias_full);
  });
  at::Tensor dD = D.has_value() ? dD_full : at::empty({0}, acc_opts);
  at::Tensor dbias = delta_bias.has_value() ? dbias_full : at::empty({0}, acc_opts);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias, dh0};
}

// ---------------------------------------------------------------------------
// fork_scan: token-major (b, p + 2s, E) operands holding the segments
// [prefix | forward suffix | reversed suffix]; B, C (b, p + 2s, N); z (b, s, E).
// The prefix is scanned once; its final state starts both suffix scans; the
// reversed segment is walked from its last token. Returns
// (out (b, s, E), y (b, s, E) = pre-gate sum in the accumulation dtype, checkpoints).

template <typename T, typename Acc>
ScanInputs<T, Acc> fork_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
                               const at::Tensor& C, const at::Tensor& Dc, const c10::optional<at::Tensor>& z,
                               const at::Tensor& bc, const ScanShape& sh, bool softplus) {
  ScanInputs<T, Acc> in;
  in.u = View<T>(u, 0, 2, 1);
  in.delta = View<T>(delta, 0, 2, 1);
  in.B = View<T>(B, 0, 2, 1);
  in.C = View<T>(C, 0, 2, 1);
  if (z.has_value()) in.z = View<T>(*z, 0, 2, 1);
  in.A = A.data_ptr<Acc>();
  in.Dskip = Dc.defined() ? Dc.data_ptr<Acc>() : nullptr;
  in.bias = bc.defined() ? bc.data_ptr<Acc>() : nullptr;
  in.batch = sh.batch; in.dim = sh.dim; in.L = sh.L; in.N = sh.N;
  in.softplus = softplus;
  return in;
}

// Offsets of a channel's three checkpoint groups: prefix, forward, reversed.
struct ForkLayout {
  int64_t p, s, nck_p, nck_s, nck;
  ForkLayout(int64_t p_, int64_t s_) : p(p_), s(s_), nck_p(num_checkpoints(p_)), nck_s(num_checkpoints(s_)),
                                        nck(nck_p + 2 * nck_s) {}
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> fork_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh = check_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len);
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  at::Tensor out = at::empty({sh.batch, fl.s, sh.dim}, u.options());
  at::Tensor ysum = at::empty({sh.batch, fl.s, sh.dim}, acc_opts);
  at::Tensor ck = at::empty({sh.batch, sh.dim, fl.nck, sh.N}, acc_opts);
  const at::Tensor Ac = A.contiguous();
  const at::Tensor Dc = opt_or_empty(D), bc = opt_or_empty(delta_bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = fork_inputs<T, Acc>(u, delta, Ac, B, C, Dc, z, bc, sh, delta_softplus);
    MutView<T> outv(out, 0, 2, 1);
    MutView<Acc> ysv(ysum, 0, 2, 1);
    Acc* ckp = ck.data_ptr<Acc>();
    const TaskRange tr(sh.batch, sh.dim);
    at::parallel_for(0, tr.ntasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t N = sh.N, s = fl.s, p = fl.p;
      std::vector<Acc> Bp(sh.L * N), Cp(sh.L * N), yf(s), yr(s), hP(N), h(N);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tr.nblk, blk = task % tr.nblk;
        pack_bc(in, b, Bp.data(), Cp.data());
        for (int64_t d = blk * kChanBlock; d < std::min(sh.dim, (blk + 1) * kChanBlock); ++d) {
          Acc* ckd = ckp + (b * sh.dim + d) * fl.nck * N;
          std::fill(hP.begin(), hP.end(), Acc(0));
          segment_fwd(in, b, d, 0, p, false, Bp.data(), Cp.data(), hP.data(), ckd, static_cast<Acc*>(nullptr));
          std::copy(hP.begin(), hP.end(), h.begin());
          segment_fwd(in, b, d, p, s, false, Bp.data(), Cp.data(), h.data(), ckd + fl.nck_p * N, yf.data());
          std::copy(hP.begin(), hP.end(), h.begin());
          segment_fwd(in, b, d, p + s, s, true, Bp.data(), Cp.data(), h.data(), ckd + (fl.nck_p + fl.nck_s) * N,
                      yr.data());
          for (int64_t i = 0; i < s; ++i) {
            const Acc y = yf[i] + yr[i];
            ysv(b, d, i) = y;
            outv(b, d, i) = static_cast<T>(in.z ? y * silu(static_cast<Acc>(in.z(b, d, i))) : y);
          }
        }
      }
    });
  });
  return {out, ysum, ck};
}

std::vector<at::Tensor> fork_scan_backward_cpu(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const at::Tensor& ysum, const at::Tensor& checkpoints,
    int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh = check_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len);
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  const auto acc_type = acc_dtype(u.scalar_type());
  check_tensor("dout", dout, {sh.batch, fl.s, sh.dim}, u.scalar_type());
  check_tensor("ysum", ysum, {sh.batch, fl.s, sh.dim}, acc_type);
  check_checkpoints(checkpoints, {sh.batch, sh.dim, fl.nck, sh.N}, acc_type);
  const auto acc_opts = u.options().dtype(acc_type);
  at::Tensor du = at::empty({sh.batch, sh.L, sh.dim}, u.options());
  at::Tensor ddelta = at::empty({sh.batch, sh.L, sh.dim}, u.options());
  at::Tensor dB = at::empty({sh.batch, sh.L, sh.N}, u.options());
  at::Tensor dC = at::empty({sh.batch, sh.L, sh.N}, u.options());
  at::Tensor dA = at::empty({sh.dim, sh.N}, acc_opts);
  at::Tensor dD_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dbias_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dz = z.has_value() ? at::empty({sh.batch, fl.s, sh.dim}, u.options()) : at::empty({0}, u.options());
  const at::Tensor Ac = A.contiguous();
  const at::Tensor Dc = opt_or_empty(D), bc = opt_or_empty(delta_bias);
  const at::Tensor ckc = checkpoints.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = fork_inputs<T, Acc>(u, delta, Ac, B, C, Dc, z, bc, sh, delta_softplus);
    const View<T> doutv(dout, 0, 2, 1);
    const View<Acc> ysv(ysum, 0, 2, 1);
    MutView<T> duv(du, 0, 2, 1), ddv(ddelta, 0, 2, 1), dzv;
    if (z.has_value()) dzv = MutView<T>(dz, 0, 2, 1);
    const Acc* ckp = ckc.data_ptr<Acc>();
    const TaskRange tr(sh.batch, sh.dim);
    GradBuffers<Acc> gb(sh.batch, sh.dim, sh.L, sh.N, tr.nblk);
    at::parallel_for(0, tr.ntasks, 1, [&](int64_t begin, int64_t end) {
      const int64_t L = sh.L, N = sh.N, s = fl.s, p = fl.p;
      std::vector<Acc> Bp(L * N), Cp(L * N), g(s), dus(L), dds(L), lam(N), lam_r(N);
      std::vector<Acc> work(2 * kChunk * N + 2 * kChunk);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tr.nblk, blk = task % tr.nblk;
        pack_bc(in, b, Bp.data(), Cp.data());
        for (int64_t d = blk * kChanBlock; d < std::min(sh.dim, (blk + 1) * kChanBlock); ++d) {
          const Acc* ckd = ckp + (b * sh.dim + d) * fl.nck * N;
          for (int64_t i = 0; i < s; ++i) {
            const Acc dv = static_cast<Acc>(doutv(b, d, i));
            if (in.z) {
              const Acc zz = static_cast<Acc>(in.z(b, d, i));
              g[i] = dv * silu(zz);
              dzv(b, d, i) = static_cast<T>(dv * ysv(b, d, i) * silu_grad(zz));
            } else {
              g[i] = dv;
            }
          }
          ChannelGrads<Acc> gr{gb.task_dB(b, blk), gb.task_dC(b, blk), gb.dA.data() + (b * sh.dim + d) * N,
                               0, 0, dus.data(), dds.data()};
          // Reversed suffix, then forward suffix, each from a zero adjoint; their
          // start adjoints (both d loss / d h_P) add up at the end of the prefix.
          std::fill(lam_r.begin(), lam_r.end(), Acc(0));
          segment_bwd(in, b, d, p + s, s, true, Bp.data(), Cp.data(), ckd + (fl.nck_p + fl.nck_s) * N, g.data(),
                      lam_r.data(), gr, static_cast<Acc*>(nullptr), work.data());
          std::fill(lam.begin(), lam.end(), Acc(0));
          segment_bwd(in, b, d, p, s, false, Bp.data(), Cp.data(), ckd + fl.nck_p * N, g.data(), lam.data(), gr,
                      static_cast<Acc*>(nullptr), work.data());
          for (int64_t n = 0; n < N; ++n) lam[n] += lam_r[n];
          segment_bwd(in, b, d, 0, p, false, Bp.data(), Cp.data(), ckd, static_cast<const Acc*>(nullptr),
                      lam.data(), gr, static_cast<Acc*>(nullptr), work.data());
          gb.dD[b * sh.dim + d] = gr.dD;
          gb.dbias[b * sh.dim + d] = gr.dbias;
          for (int64_t l = 0; l < L; ++l) {
            duv(b, d, l) = static_cast<T>(dus[l]);
            ddv(b, d, l) = static_cast<T>(dds[l]);
          }
        }
      }
    });
    gb.reduce(MutView<T>(dB, 0, 2, 1), MutView<T>(dC, 0, 2, 1), dA, dD_full, dbias_full);
  });
  at::Tensor dD = D.has_value() ? dD_full : at::empty({0}, acc_opts);
  at::Tensor dbias = delta_bias.has_value() ? dbias_full : at::empty({0}, acc_opts);
  return {du, ddelta, dA, dB, dC, dD, dz, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CPU, m) {
  m.impl("selective_scan", &selective_scan_cpu);
  m.impl("selective_scan_backward", &selective_scan_backward_cpu);
  m.impl("fork_scan", &fork_scan_cpu);
  m.impl("fork_scan_backward", &fork_scan_backward_cpu);
}

}  // namespace cpu
}  // namespace vlssm
