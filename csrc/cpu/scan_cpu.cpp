// Work split: one task per (batch, block of kChanBlock channels of one group),
// run with at::parallel_for (OpenMP). With grouped B / C (b, G, N, L) a block
// never straddles two groups (each group's channels are split on their own),
// so a task reads one row of B and C per token as with G = 1. A task packs B
// and C of its batch and group into (L, N) buffers once, then scans its channels kLanes at a time: the lanes of one
// SIMD vector are kLanes channels, the state index is an outer loop over
// vectors, so softplus, exp, the gate and every load of u / delta / z are
// vector operations. No (b, D, L, N) temporaries: the forward keeps the state
// every kChunk steps (checkpoints) and the backward recomputes one chunk of
// states at a time from them, like mamba's kernel. Reductions over channels
// (dB, dC) and over batch (dA, dD, d delta_bias) go through per-task buffers
// summed in a fixed order: results are bitwise deterministic for any thread
// count.
//
// All operands are read through element strides, so token-major (b, L, D)
// views, channel-major (b, D, L) tensors, slices and batch-broadcast (stride 0)
// inputs work without copies. An input-independent B or C (dim, N) has no
// time axis: each lane holds its channel's row, like A, and its gradient is
// accumulated per channel like dA (the "lane" path of the segment loops; the
// default path, B and C both time-varying, broadcasts one B / C value per
// token and state to all lanes).
//
// The per-task functions are compiled for AVX-512, AVX2 and baseline x86-64
// (VLSSM_CLONES) and the loader picks the best the CPU has.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../fast_math.h"
#include "../scan_shapes.h"
#include "simd.h"

namespace vlssm {
namespace cpu {
namespace {

constexpr int64_t kChunk = kCheckpointChunk;  // steps between saved states
constexpr int64_t kChanBlock = 64;            // channels per task
constexpr int64_t kLanes = 16;                // channels per SIMD group

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

// Element offset of (b, group, state, token) in a grouped 4-D view of B, C,
// dB or dC (grouped_view: selective_scan (b, G, N, L), fork_scan (b, L, G, N)).
struct GroupStrides {
  int64_t sb = 0, sg = 0, sn = 0, sl = 0;
  GroupStrides() = default;
  GroupStrides(const at::Tensor& v, bool token_major)
      : sb(v.stride(0)), sg(v.stride(token_major ? 2 : 1)), sn(v.stride(token_major ? 3 : 2)),
        sl(v.stride(token_major ? 1 : 3)) {}
  inline int64_t operator()(int64_t b, int64_t g, int64_t n, int64_t l) const {
    return b * sb + g * sg + n * sn + l * sl;
  }
};

// B or C as a task reads it (from BCOperands): time-varying, element
// (b, group, state, token) of its grouped view; or input-independent, a
// contiguous (D, N) array in the accumulation dtype.
template <typename T, typename Acc>
struct BCOperand {
  const T* p = nullptr;
  GroupStrides st;
  const Acc* rows = nullptr;  // input-independent (D, N), or null
  BCOperand() = default;
  BCOperand(const at::Tensor& t, bool varying, bool token_major) {
    if (varying) {
      p = t.data_ptr<T>();
      st = GroupStrides(t, token_major);
    } else {
      rows = t.data_ptr<Acc>();
    }
  }
  bool varying() const { return rows == nullptr; }
  inline T operator()(int64_t b, int64_t g, int64_t n, int64_t l) const { return p[st(b, g, n, l)]; }
};

// Everything a scan task reads. Layout-free: (b, channel, token) for u,
// delta, z; B, C as above.
template <typename T, typename Acc>
struct ScanInputs {
  View<T> u, delta, z;
  BCOperand<T, Acc> B, C;
  const Acc* A = nullptr;      // (D, N) contiguous
  const Acc* Dskip = nullptr;  // (D) or null
  const Acc* bias = nullptr;   // (D) or null
  int64_t batch = 0, dim = 0, L = 0, N = 0;
  int64_t G = 1, H = 0;        // channel groups, channels per group
  bool softplus = false;
  bool lane_bc = false;        // an input-independent B or C: the per-lane path
};

// kLanes channels d0 .. d0+kLanes-1 of batch b; lanes at or past the end of
// the block's group are padding: they read the group's last channel and are
// never stored, and their gradient inputs are zero so they add nothing to the
// reductions.
template <typename Acc>
struct Group {
  int64_t b, d0, nvalid;
  int64_t ch[kLanes];  // clamped channel of each lane
  Acc* Ag;             // (N, kLanes) A transposed
  Acc* Bg;             // (N, kLanes) input-independent B transposed, or unused
  Acc* Cg;             // (N, kLanes) input-independent C transposed, or unused
  Acc Dg[kLanes], bg[kLanes];
};

// Per-lane scratch of a group: A, and B / C when input-independent.
template <typename Acc>
struct LaneRows {
  std::vector<Acc> A, B, C;
  explicit LaneRows(int64_t N) : A(N * kLanes), B(N * kLanes), C(N * kLanes) {}
};

template <typename T, typename Acc>
void make_group(const ScanInputs<T, Acc>& in, int64_t b, int64_t d0, int64_t d_end, LaneRows<Acc>& rows,
                Group<Acc>& g) {
  g.b = b;
  g.d0 = d0;
  g.nvalid = std::min<int64_t>(kLanes, d_end - d0);
  g.Ag = rows.A.data();
  g.Bg = rows.B.data();
  g.Cg = rows.C.data();
  for (int64_t k = 0; k < kLanes; ++k) {
    const int64_t d = std::min(d0 + k, d_end - 1);
    g.ch[k] = d;
    g.Dg[k] = in.Dskip ? in.Dskip[d] : Acc(0);
    g.bg[k] = in.bias ? in.bias[d] : Acc(0);
    for (int64_t n = 0; n < in.N; ++n) {
      g.Ag[n * kLanes + k] = in.A[d * in.N + n];
      if (!in.B.varying()) g.Bg[n * kLanes + k] = in.B.rows[d * in.N + n];
      if (!in.C.varying()) g.Cg[n * kLanes + k] = in.C.rows[d * in.N + n];
    }
  }
}

// The time-varying B / C of batch b, group gi as (L, N) rows (input-independent ones are skipped).
template <typename T, typename Acc>
void pack_bc(const ScanInputs<T, Acc>& in, int64_t b, int64_t gi, Acc* Bp, Acc* Cp) {
  const int64_t N = in.N;
  for (int64_t l = 0; l < in.L; ++l)
    for (int64_t n = 0; n < N; ++n) {
      if (in.B.varying()) Bp[l * N + n] = static_cast<Acc>(in.B(b, gi, n, l));
      if (in.C.varying()) Cp[l * N + n] = static_cast<Acc>(in.C(b, gi, n, l));
    }
}

// The lane path's B or C values of token l: the group's own rows (input-
// independent), or the token's row broadcast to every lane into `buf` (N, kLanes).
template <typename T, typename Acc>
inline const Acc* lane_rows(const BCOperand<T, Acc>& op, const Acc* group_rows, const Acc* packed, int64_t l,
                            int64_t N, Acc* buf) {
  if (!op.varying()) return group_rows;
  const Acc* row = packed + l * N;
  for (int64_t n = 0; n < N; ++n) {
    const Acc v = row[n];
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) buf[n * kLanes + k] = v;
  }
  return buf;
}

// u and dt = softplus(delta + bias) of token l for the group's lanes.
template <typename T, typename Acc>
inline void load_step(const ScanInputs<T, Acc>& in, const Group<Acc>& g, int64_t l, Acc* uu, Acc* raw, Acc* dt) {
  if (g.nvalid == kLanes && in.u.sx == 1 && in.delta.sx == 1) {
    // Channels contiguous (token-major inputs, as fork_scan gets them) and a full group:
    // lane k is channel d0 + k, one vector load each instead of kLanes strided ones.
    const T* up = in.u.p + g.b * in.u.sb + l * in.u.sl + g.d0;
    const T* dp = in.delta.p + g.b * in.delta.sb + l * in.delta.sl + g.d0;
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) {
      uu[k] = static_cast<Acc>(up[k]);
      raw[k] = static_cast<Acc>(dp[k]) + g.bg[k];
    }
  } else {
    for (int64_t k = 0; k < kLanes; ++k) {
      uu[k] = static_cast<Acc>(in.u(g.b, g.ch[k], l));
      raw[k] = static_cast<Acc>(in.delta(g.b, g.ch[k], l)) + g.bg[k];
    }
  }
  if (in.softplus) {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) dt[k] = vsoftplus(raw[k]);
  } else {
    for (int64_t k = 0; k < kLanes; ++k) dt[k] = raw[k];
  }
}

// Forward over one segment: tokens l0 .. l0+len-1, visited from the last one
// when `rev`. h (N, kLanes) is the state in and out; ck(c) receives the state
// before step c * kChunk; yout (len, kLanes) in token order inside the segment,
// may be null, receives C.h + D*u. kLane: B / C values per lane (an
// input-independent operand) instead of one value per token and state.
template <bool kLane, typename T, typename Acc, typename CkStore>
void segment_fwd_impl(const ScanInputs<T, Acc>& in, const Group<Acc>& g, int64_t l0, int64_t len, bool rev,
                      const Acc* Bp, const Acc* Cp, Acc* h, CkStore&& ck, Acc* yout) {
  const int64_t N = in.N;
  alignas(64) Acc uu[kLanes], raw[kLanes], dt[kLanes], dtu[kLanes], y[kLanes];
  std::vector<Acc> bbuf(kLane ? N * kLanes : 0), cbuf(kLane ? N * kLanes : 0);
  for (int64_t j = 0; j < len; ++j) {
    const int64_t i = rev ? len - 1 - j : j;
    const int64_t l = l0 + i;
    if (j % kChunk == 0) ck(j / kChunk, h);
    load_step(in, g, l, uu, raw, dt);
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) {
      dtu[k] = dt[k] * uu[k];
      y[k] = g.Dg[k] * uu[k];
    }
    if constexpr (kLane) {
      const Acc* Bv = lane_rows(in.B, g.Bg, Bp, l, N, bbuf.data());
      const Acc* Cv = lane_rows(in.C, g.Cg, Cp, l, N, cbuf.data());
      for (int64_t n = 0; n < N; ++n) {
        Acc* hn = h + n * kLanes;
        const Acc *an = g.Ag + n * kLanes, *bn = Bv + n * kLanes, *cn = Cv + n * kLanes;
#pragma omp simd
        for (int64_t k = 0; k < kLanes; ++k) {
          const Acc v = fast_exp(dt[k] * an[k]) * hn[k] + dtu[k] * bn[k];
          hn[k] = v;
          y[k] += v * cn[k];
        }
      }
    } else {
      const Acc* Bl = Bp + l * N;
      const Acc* Cl = Cp + l * N;
      for (int64_t n = 0; n < N; ++n) {
        const Acc bn = Bl[n], cn = Cl[n];
        Acc* hn = h + n * kLanes;
        const Acc* an = g.Ag + n * kLanes;
#pragma omp simd
        for (int64_t k = 0; k < kLanes; ++k) {
          const Acc v = fast_exp(dt[k] * an[k]) * hn[k] + dtu[k] * bn;
          hn[k] = v;
          y[k] += v * cn;
        }
      }
    }
    if (yout) std::copy(y, y + kLanes, yout + i * kLanes);
  }
}

template <typename T, typename Acc, typename CkStore>
void segment_fwd(const ScanInputs<T, Acc>& in, const Group<Acc>& g, int64_t l0, int64_t len, bool rev,
                 const Acc* Bp, const Acc* Cp, Acc* h, CkStore&& ck, Acc* yout) {
  if (in.lane_bc)
    segment_fwd_impl<true>(in, g, l0, len, rev, Bp, Cp, h, ck, yout);
  else
    segment_fwd_impl<false>(in, g, l0, len, rev, Bp, Cp, h, ck, yout);
}

// Per-group gradient sinks of a backward segment.
template <typename Acc>
struct GroupGrads {
  Acc* dBp;  // (L, N) packed partial of a time-varying B, accumulated
  Acc* dCp;  // (L, N) packed partial of a time-varying C, accumulated
  Acc* dBg;  // (N, kLanes) per-lane dB of an input-independent B, accumulated
  Acc* dCg;  // (N, kLanes) per-lane dC of an input-independent C, accumulated
  Acc* dA;   // (N, kLanes) accumulated
  Acc* dD;   // (kLanes) accumulated
  Acc* dbias;   // (kLanes) accumulated
  Acc* du;      // (L, kLanes) token-indexed, written
  Acc* ddelta;  // (L, kLanes) token-indexed, written
};

// One token's and state's dB (or dC) terms v of the group's lanes: a time-varying
// operand gets their sum (the token's row, shared by the lanes), an
// input-independent one keeps them per lane.
template <typename Acc>
inline void add_bc_grad(bool varying, const Acc* v, Acc* row, Acc* lanes) {
  if (varying) {
    Acc sum = 0;
    for (int64_t k = 0; k < kLanes; ++k) sum += v[k];
    *row += sum;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += v[k];
  }
}

// Backward over one segment (the adjoint of segment_fwd).
// gy (len, kLanes), token order, may be null (= 0): gradient w.r.t. C.h + D*u.
// lam (N, kLanes): in, the gradient w.r.t. the state after the segment; out,
// w.r.t. the state before it. ck(c) gives the state before step c * kChunk.
// ypre (len, kLanes), may be null, receives C.h + D*u, recomputed.
// work: 2 * kChunk * N * kLanes + 2 * kChunk * kLanes values.
template <bool kLane, typename T, typename Acc, typename CkLoad>
void segment_bwd_impl(const ScanInputs<T, Acc>& in, const Group<Acc>& g, int64_t l0, int64_t len, bool rev,
                      const Acc* Bp, const Acc* Cp, CkLoad&& ck, const Acc* gy, Acc* lam, const GroupGrads<Acc>& gr,
                      Acc* ypre, Acc* work) {
  const int64_t N = in.N;
  const int64_t NL = N * kLanes;
  Acc* hs = work;                    // (kChunk, N, kLanes) state after each step
  Acc* eA = hs + kChunk * NL;        // (kChunk, N, kLanes) exp(dt * A)
  Acc* dts = eA + kChunk * NL;       // (kChunk, kLanes) dt
  Acc* raws = dts + kChunk * kLanes;  // (kChunk, kLanes) delta + bias
  alignas(64) Acc uu[kLanes], dtu[kLanes], gj[kLanes], ddt[kLanes], dus[kLanes], y[kLanes];
  alignas(64) Acc vdb[kLanes], vdc[kLanes];
  std::vector<Acc> bbuf(kLane ? NL : 0), cbuf(kLane ? NL : 0);
  const int64_t nchunks = (len + kChunk - 1) / kChunk;
  for (int64_t c = nchunks - 1; c >= 0; --c) {
    const int64_t j0 = c * kChunk, j1 = std::min(len, j0 + kChunk);
    const Acc* h0 = ck(c);
    // Recompute the chunk's states from its checkpoint.
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t jj = j - j0;
      const int64_t l = l0 + (rev ? len - 1 - j : j);
      Acc* dt = dts + jj * kLanes;
      load_step(in, g, l, uu, raws + jj * kLanes, dt);
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) dtu[k] = dt[k] * uu[k];
      const Acc* hp = jj ? hs + (jj - 1) * NL : h0;
      if constexpr (kLane) {
        const Acc* Bv = lane_rows(in.B, g.Bg, Bp, l, N, bbuf.data());
        for (int64_t n = 0; n < N; ++n) {
          const Acc *an = g.Ag + n * kLanes, *bn = Bv + n * kLanes, *hpn = hp + n * kLanes;
          Acc* hc = hs + jj * NL + n * kLanes;
          Acc* ec = eA + jj * NL + n * kLanes;
#pragma omp simd
          for (int64_t k = 0; k < kLanes; ++k) {
            const Acc e = fast_exp(dt[k] * an[k]);
            ec[k] = e;
            hc[k] = e * hpn[k] + dtu[k] * bn[k];
          }
        }
      } else {
        const Acc* Bl = Bp + l * N;
        for (int64_t n = 0; n < N; ++n) {
          const Acc bn = Bl[n];
          const Acc* an = g.Ag + n * kLanes;
          Acc* hc = hs + jj * NL + n * kLanes;
          Acc* ec = eA + jj * NL + n * kLanes;
          const Acc* hpn = hp + n * kLanes;
#pragma omp simd
          for (int64_t k = 0; k < kLanes; ++k) {
            const Acc e = fast_exp(dt[k] * an[k]);
            ec[k] = e;
            hc[k] = e * hpn[k] + dtu[k] * bn;
          }
        }
      }
    }
    // Walk the chunk backwards.
    for (int64_t j = j1 - 1; j >= j0; --j) {
      const int64_t jj = j - j0;
      const int64_t i = rev ? len - 1 - j : j;
      const int64_t l = l0 + i;
      const Acc* dt = dts + jj * kLanes;
      for (int64_t k = 0; k < kLanes; ++k) {
        uu[k] = static_cast<Acc>(in.u(g.b, g.ch[k], l));
        gj[k] = gy ? gy[i * kLanes + k] : Acc(0);
        ddt[k] = 0;
        dus[k] = 0;
        y[k] = 0;
      }
      const Acc* hp = jj ? hs + (jj - 1) * NL : h0;
      if constexpr (kLane) {
        const Acc* Bv = lane_rows(in.B, g.Bg, Bp, l, N, bbuf.data());
        const Acc* Cv = lane_rows(in.C, g.Cg, Cp, l, N, cbuf.data());
        for (int64_t n = 0; n < N; ++n) {
          const Acc *bn = Bv + n * kLanes, *cn = Cv + n * kLanes, *an = g.Ag + n * kLanes;
          const Acc* hc = hs + jj * NL + n * kLanes;
          const Acc* ec = eA + jj * NL + n * kLanes;
          const Acc* hpn = hp + n * kLanes;
          Acc* ln_ = lam + n * kLanes;
          Acc* dAn = gr.dA + n * kLanes;
#pragma omp simd
          for (int64_t k = 0; k < kLanes; ++k) {
            y[k] += hc[k] * cn[k];
            vdc[k] = gj[k] * hc[k];
            const Acc ln = ln_[k] + gj[k] * cn[k];  // d loss / d h_j
            const Acc t = ln * hpn[k] * ec[k];      // d loss / d (dt * A)
            ddt[k] += t * an[k] + ln * bn[k] * uu[k];
            dAn[k] += t * dt[k];
            vdb[k] = ln * dt[k] * uu[k];
            dus[k] += ln * bn[k];
            ln_[k] = ln * ec[k];                    // d loss / d h_{j-1}
          }
          add_bc_grad(in.B.varying(), vdb, in.B.varying() ? gr.dBp + l * N + n : nullptr, gr.dBg + n * kLanes);
          add_bc_grad(in.C.varying(), vdc, in.C.varying() ? gr.dCp + l * N + n : nullptr, gr.dCg + n * kLanes);
        }
      } else {
        const Acc* Bl = Bp + l * N;
        const Acc* Cl = Cp + l * N;
        Acc* dBl = gr.dBp + l * N;
        Acc* dCl = gr.dCp + l * N;
        for (int64_t n = 0; n < N; ++n) {
          const Acc bn = Bl[n], cn = Cl[n];
          const Acc* an = g.Ag + n * kLanes;
          const Acc* hc = hs + jj * NL + n * kLanes;
          const Acc* ec = eA + jj * NL + n * kLanes;
          const Acc* hpn = hp + n * kLanes;
          Acc* ln_ = lam + n * kLanes;
          Acc* dAn = gr.dA + n * kLanes;
          Acc sdb = 0, sdc = 0;
#pragma omp simd reduction(+ : sdb, sdc)
          for (int64_t k = 0; k < kLanes; ++k) {
            y[k] += hc[k] * cn;
            sdc += gj[k] * hc[k];
            const Acc ln = ln_[k] + gj[k] * cn;  // d loss / d h_j
            const Acc t = ln * hpn[k] * ec[k];   // d loss / d (dt * A)
            ddt[k] += t * an[k] + ln * bn * uu[k];
            dAn[k] += t * dt[k];
            sdb += ln * dt[k] * uu[k];
            dus[k] += ln * bn;
            ln_[k] = ln * ec[k];                 // d loss / d h_{j-1}
          }
          dBl[n] += sdb;
          dCl[n] += sdc;
        }
      }
      const Acc* raw = raws + jj * kLanes;
#pragma omp simd
      for (int64_t k = 0; k < kLanes; ++k) {
        if (ypre) ypre[i * kLanes + k] = y[k] + g.Dg[k] * uu[k];
        gr.du[l * kLanes + k] = dus[k] * dt[k] + gj[k] * g.Dg[k];
        gr.dD[k] += gj[k] * uu[k];
        const Acc draw = in.softplus ? ddt[k] * vsoftplus_grad(raw[k]) : ddt[k];
        gr.ddelta[l * kLanes + k] = draw;
        gr.dbias[k] += draw;
      }
    }
  }
}

template <typename T, typename Acc, typename CkLoad>
void segment_bwd(const ScanInputs<T, Acc>& in, const Group<Acc>& g, int64_t l0, int64_t len, bool rev,
                 const Acc* Bp, const Acc* Cp, CkLoad&& ck, const Acc* gy, Acc* lam, const GroupGrads<Acc>& gr,
                 Acc* ypre, Acc* work) {
  if (in.lane_bc)
    segment_bwd_impl<true>(in, g, l0, len, rev, Bp, Cp, ck, gy, lam, gr, ypre, work);
  else
    segment_bwd_impl<false>(in, g, l0, len, rev, Bp, Cp, ck, gy, lam, gr, ypre, work);
}

// Tasks in order (batch b, group gi, block of kChanBlock channels of the group).
struct TaskRange {
  int64_t G, H, nblk, ntasks;  // groups, channels per group, blocks per group, tasks
  TaskRange(int64_t batch, int64_t G_, int64_t H_)
      : G(G_), H(H_), nblk((H_ + kChanBlock - 1) / kChanBlock), ntasks(batch * G_ * nblk) {}
  int64_t batch(int64_t task) const { return task / (G * nblk); }
  int64_t group(int64_t task) const { return task / nblk % G; }
  int64_t d_begin(int64_t task) const { return group(task) * H + (task % nblk) * kChanBlock; }
  int64_t d_end(int64_t task) const { return std::min(group(task) * H + H, d_begin(task) + kChanBlock); }
};

// A dB / dC output of a time-varying operand: element (b, group, state, token).
template <typename T>
struct BCGrad {
  T* p;
  GroupStrides st;
  BCGrad(at::Tensor& t, bool token_major) : p(t.data_ptr<T>()), st(grouped_view(t, token_major), token_major) {}
  inline T& operator()(int64_t b, int64_t g, int64_t n, int64_t l) const { return p[st(b, g, n, l)]; }
};

// ---------------------------------------------------------------------------
// Shared plumbing of the two ops' backward: per-task dB/dC partials of
// time-varying operands, per-(b, d) partials of dA/dD/dbias and of
// input-independent dB/dC, reduced in a fixed order.
template <typename Acc>
struct GradBuffers {
  int64_t batch, dim, L, N;
  TaskRange tr;
  bool varB, varC;
  std::vector<Acc> dBp, dCp, dA, dD, dbias, dBc, dCc;
  GradBuffers(int64_t batch_, int64_t dim_, int64_t L_, int64_t N_, const TaskRange& tr_, bool varB_, bool varC_)
      : batch(batch_), dim(dim_), L(L_), N(N_), tr(tr_), varB(varB_), varC(varC_),
        dBp(varB_ ? tr_.ntasks * L_ * N_ : 0, Acc(0)), dCp(varC_ ? tr_.ntasks * L_ * N_ : 0, Acc(0)),
        dA(batch_ * dim_ * N_, Acc(0)), dD(batch_ * dim_, Acc(0)), dbias(batch_ * dim_, Acc(0)),
        dBc(varB_ ? 0 : batch_ * dim_ * N_, Acc(0)), dCc(varC_ ? 0 : batch_ * dim_ * N_, Acc(0)) {}
  Acc* task_dB(int64_t task) { return varB ? dBp.data() + task * L * N : nullptr; }
  Acc* task_dC(int64_t task) { return varC ? dCp.data() + task * L * N : nullptr; }

  // Move a group's per-lane dA (N, kLanes), dD, dbias (and input-independent dB, dC) into the (b, d) buffers.
  void store_group(const Group<Acc>& g, const Acc* dAg, const Acc* dDg, const Acc* dbg, const Acc* dBg,
                   const Acc* dCg) {
    for (int64_t k = 0; k < g.nvalid; ++k) {
      const int64_t bd = g.b * dim + g.d0 + k;
      for (int64_t n = 0; n < N; ++n) {
        dA[bd * N + n] = dAg[n * kLanes + k];
        if (!varB) dBc[bd * N + n] = dBg[n * kLanes + k];
        if (!varC) dCc[bd * N + n] = dCg[n * kLanes + k];
      }
      dD[bd] = dDg[k];
      dbias[bd] = dbg[k];
    }
  }

  // A time-varying dB / dC: the partials of a group's blocks summed per (b, group, token, state).
  template <typename T>
  void reduce_varying(const std::vector<Acc>& part, const BCGrad<T>& out) const {
    const int64_t nblk = tr.nblk, G = tr.G;
    at::parallel_for(0, batch * G * L, 64, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t bg = q / L, l = q % L;  // bg = b * G + group
        for (int64_t n = 0; n < N; ++n) {
          Acc sum = 0;
          for (int64_t k = 0; k < nblk; ++k) sum += part[((bg * nblk + k) * L + l) * N + n];
          out(bg / G, bg % G, n, l) = static_cast<T>(sum);
        }
      }
    });
  }

  // Per-(b, d, n) partials summed over batch into a (D, N) tensor.
  void reduce_batch(const std::vector<Acc>& part, at::Tensor& out) const {
    Acc* po = out.data_ptr<Acc>();
    for (int64_t dn = 0; dn < dim * N; ++dn) {
      Acc sum = 0;
      for (int64_t b = 0; b < batch; ++b) sum += part[b * dim * N + dn];
      po[dn] = sum;
    }
  }

  // Sum the partials into dB, dC (B / C's layout) and dA (D, N), dD, dbias (D).
  template <typename T>
  void reduce(at::Tensor& dB, at::Tensor& dC, bool token_major, at::Tensor& dA_t, at::Tensor& dD_t,
              at::Tensor& dbias_t) const {
    if (varB) reduce_varying(dBp, BCGrad<T>(dB, token_major)); else reduce_batch(dBc, dB);
    if (varC) reduce_varying(dCp, BCGrad<T>(dC, token_major)); else reduce_batch(dCc, dC);
    reduce_batch(dA, dA_t);
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
    }
  }
};

// Checkpoint storage of one group: (b, D, nck, N) per channel, lane-transposed.
template <typename Acc>
struct GroupCheckpoints {
  Acc* base;  // checkpoints tensor data
  int64_t dim, nck, N, offset;  // offset: first checkpoint of the segment
  const Group<Acc>* g;
  Acc* tmp;   // (N, kLanes) scratch for loads
  Acc* at(int64_t k, int64_t c) const { return base + ((g->b * dim + g->d0 + k) * nck + offset + c) * N; }
  void operator()(int64_t c, const Acc* h) const {  // store
    for (int64_t k = 0; k < g->nvalid; ++k)
      for (int64_t n = 0; n < N; ++n) at(k, c)[n] = h[n * kLanes + k];
  }
  const Acc* operator()(int64_t c) const {  // load
    for (int64_t k = 0; k < kLanes; ++k)
      for (int64_t n = 0; n < N; ++n) tmp[n * kLanes + k] = k < g->nvalid ? at(k, c)[n] : Acc(0);
    return tmp;
  }
};

// ---------------------------------------------------------------------------
// Per-task bodies, one per op and direction; VLSSM_CLONES compiles each for
// AVX-512, AVX2 and baseline.

template <typename T, typename Acc>
struct SelectiveScanFwd {
  const ScanInputs<T, Acc>& in;
  bool reverse;
  const Acc* h0;  // (b, D, N) or null
  MutView<T> out;
  Acc* last;      // (b, D, N)
  Acc* ck;        // (b, D, nck, N)
  int64_t nck;

  void run(int64_t task, const TaskRange& tr) const {
    const int64_t L = in.L, N = in.N, b = tr.batch(task), d_end = tr.d_end(task);
    std::vector<Acc> Bp(L * N), Cp(L * N), y(L * kLanes), h(N * kLanes), tmp(N * kLanes);
    LaneRows<Acc> rows(N);
    pack_bc(in, b, tr.group(task), Bp.data(), Cp.data());
    for (int64_t d0 = tr.d_begin(task); d0 < d_end; d0 += kLanes) {
      Group<Acc> g;
      make_group(in, b, d0, d_end, rows, g);
      for (int64_t k = 0; k < kLanes; ++k)
        for (int64_t n = 0; n < N; ++n)
          h[n * kLanes + k] = (h0 && k < g.nvalid) ? h0[((b * in.dim) + d0 + k) * N + n] : Acc(0);
      GroupCheckpoints<Acc> cks{ck, in.dim, nck, N, 0, &g, tmp.data()};
      segment_fwd(in, g, 0, L, reverse, Bp.data(), Cp.data(), h.data(), cks, y.data());
      for (int64_t k = 0; k < g.nvalid; ++k) {
        for (int64_t n = 0; n < N; ++n) last[((b * in.dim) + d0 + k) * N + n] = h[n * kLanes + k];
        for (int64_t l = 0; l < L; ++l) {
          const Acc v = in.z ? y[l * kLanes + k] * vsilu(static_cast<Acc>(in.z(b, d0 + k, l))) : y[l * kLanes + k];
          out(b, d0 + k, l) = static_cast<T>(v);
        }
      }
    }
  }
};

template <typename T, typename Acc>
struct SelectiveScanBwd {
  const ScanInputs<T, Acc>& in;
  bool reverse;
  View<T> dout;
  const Acc* dlast;  // (b, D, N) or null
  const Acc* ck;
  int64_t nck;
  GradBuffers<Acc>& gb;
  MutView<T> du, ddelta, dz;
  Acc* dh0;          // (b, D, N) or null

  void run(int64_t task, const TaskRange& tr) const {
    const int64_t L = in.L, N = in.N, b = tr.batch(task), d_end = tr.d_end(task);
    std::vector<Acc> Bp(L * N), Cp(L * N), gy(L * kLanes), ypre(L * kLanes), dus(L * kLanes), dds(L * kLanes);
    std::vector<Acc> lam(N * kLanes), dA(N * kLanes), dBg(N * kLanes), dCg(N * kLanes), tmp(N * kLanes);
    std::vector<Acc> work(2 * kChunk * N * kLanes + 2 * kChunk * kLanes);
    alignas(64) Acc dD[kLanes], dbias[kLanes];
    LaneRows<Acc> rows(N);
    pack_bc(in, b, tr.group(task), Bp.data(), Cp.data());
    for (int64_t d0 = tr.d_begin(task); d0 < d_end; d0 += kLanes) {
      Group<Acc> g;
      make_group(in, b, d0, d_end, rows, g);
      std::fill(dBg.begin(), dBg.end(), Acc(0));
      std::fill(dCg.begin(), dCg.end(), Acc(0));
      for (int64_t k = 0; k < kLanes; ++k) {
        dD[k] = 0;
        dbias[k] = 0;
        for (int64_t l = 0; l < L; ++l) {
          Acc v = 0;
          if (k < g.nvalid) {
            v = static_cast<Acc>(dout(b, d0 + k, l));
            if (in.z) v *= vsilu(static_cast<Acc>(in.z(b, d0 + k, l)));
          }
          gy[l * kLanes + k] = v;
        }
        for (int64_t n = 0; n < N; ++n) {
          lam[n * kLanes + k] = (dlast && k < g.nvalid) ? dlast[((b * in.dim) + d0 + k) * N + n] : Acc(0);
          dA[n * kLanes + k] = 0;
        }
      }
      const GroupGrads<Acc> gr{gb.task_dB(task), gb.task_dC(task), dBg.data(), dCg.data(), dA.data(), dD, dbias,
                               dus.data(), dds.data()};
      GroupCheckpoints<Acc> cks{const_cast<Acc*>(ck), in.dim, nck, N, 0, &g, tmp.data()};
      segment_bwd(in, g, 0, L, reverse, Bp.data(), Cp.data(), cks, gy.data(), lam.data(), gr,
                  in.z ? ypre.data() : nullptr, work.data());
      gb.store_group(g, dA.data(), dD, dbias, dBg.data(), dCg.data());
      for (int64_t k = 0; k < g.nvalid; ++k) {
        const int64_t d = d0 + k;
        if (dh0)
          for (int64_t n = 0; n < N; ++n) dh0[((b * in.dim) + d) * N + n] = lam[n * kLanes + k];
        for (int64_t l = 0; l < L; ++l) {
          du(b, d, l) = static_cast<T>(dus[l * kLanes + k]);
          ddelta(b, d, l) = static_cast<T>(dds[l * kLanes + k]);
          if (in.z) {
            const Acc zz = static_cast<Acc>(in.z(b, d, l));
            dz(b, d, l) = static_cast<T>(static_cast<Acc>(dout(b, d, l)) * ypre[l * kLanes + k] * vsilu_grad(zz));
          }
        }
      }
    }
  }
};

template <typename T, typename Acc>
struct ForkScanFwd {
  const ScanInputs<T, Acc>& in;
  ForkLayout fl;
  MutView<T> out;
  MutView<Acc> ysum;
  Acc* ck;

  void run(int64_t task, const TaskRange& tr) const {
    const int64_t N = in.N, s = fl.s, p = fl.p, b = tr.batch(task), d_end = tr.d_end(task);
    std::vector<Acc> Bp(in.L * N), Cp(in.L * N), yf(s * kLanes), yr(s * kLanes), hP(N * kLanes), h(N * kLanes),
        tmp(N * kLanes);
    LaneRows<Acc> rows(N);
    pack_bc(in, b, tr.group(task), Bp.data(), Cp.data());
    for (int64_t d0 = tr.d_begin(task); d0 < d_end; d0 += kLanes) {
      Group<Acc> g;
      make_group(in, b, d0, d_end, rows, g);
      std::fill(hP.begin(), hP.end(), Acc(0));
      segment_fwd(in, g, 0, p, false, Bp.data(), Cp.data(), hP.data(),
                  GroupCheckpoints<Acc>{ck, in.dim, fl.nck, N, 0, &g, tmp.data()}, static_cast<Acc*>(nullptr));
      std::copy(hP.begin(), hP.end(), h.begin());
      segment_fwd(in, g, p, s, false, Bp.data(), Cp.data(), h.data(),
                  GroupCheckpoints<Acc>{ck, in.dim, fl.nck, N, fl.nck_p, &g, tmp.data()}, yf.data());
      std::copy(hP.begin(), hP.end(), h.begin());
      segment_fwd(in, g, p + s, s, true, Bp.data(), Cp.data(), h.data(),
                  GroupCheckpoints<Acc>{ck, in.dim, fl.nck, N, fl.nck_p + fl.nck_s, &g, tmp.data()}, yr.data());
      for (int64_t k = 0; k < g.nvalid; ++k) {
        for (int64_t i = 0; i < s; ++i) {
          const Acc y = yf[i * kLanes + k] + yr[i * kLanes + k];
          ysum(b, d0 + k, i) = y;
          out(b, d0 + k, i) = static_cast<T>(in.z ? y * vsilu(static_cast<Acc>(in.z(b, d0 + k, i))) : y);
        }
      }
    }
  }
};

template <typename T, typename Acc>
struct ForkScanBwd {
  const ScanInputs<T, Acc>& in;
  ForkLayout fl;
  View<T> dout;
  View<Acc> ysum;
  const Acc* ck;
  GradBuffers<Acc>& gb;
  MutView<T> du, ddelta, dz;

  void run(int64_t task, const TaskRange& tr) const {
    const int64_t L = in.L, N = in.N, s = fl.s, p = fl.p, b = tr.batch(task), d_end = tr.d_end(task);
    std::vector<Acc> Bp(L * N), Cp(L * N), gy(s * kLanes), dus(L * kLanes), dds(L * kLanes);
    std::vector<Acc> lam(N * kLanes), lam_r(N * kLanes), dA(N * kLanes), dBg(N * kLanes), dCg(N * kLanes),
        tmp(N * kLanes);
    std::vector<Acc> work(2 * kChunk * N * kLanes + 2 * kChunk * kLanes);
    alignas(64) Acc dD[kLanes], dbias[kLanes];
    Acc* ckm = const_cast<Acc*>(ck);
    LaneRows<Acc> rows(N);
    pack_bc(in, b, tr.group(task), Bp.data(), Cp.data());
    for (int64_t d0 = tr.d_begin(task); d0 < d_end; d0 += kLanes) {
      Group<Acc> g;
      make_group(in, b, d0, d_end, rows, g);
      std::fill(dBg.begin(), dBg.end(), Acc(0));
      std::fill(dCg.begin(), dCg.end(), Acc(0));
      for (int64_t k = 0; k < kLanes; ++k) {
        dD[k] = 0;
        dbias[k] = 0;
        for (int64_t i = 0; i < s; ++i) {
          Acc v = 0;
          if (k < g.nvalid) {
            const Acc dv = static_cast<Acc>(dout(b, d0 + k, i));
            if (in.z) {
              const Acc zz = static_cast<Acc>(in.z(b, d0 + k, i));
              v = dv * vsilu(zz);
              dz(b, d0 + k, i) = static_cast<T>(dv * ysum(b, d0 + k, i) * vsilu_grad(zz));
            } else {
              v = dv;
            }
          }
          gy[i * kLanes + k] = v;
        }
      }
      std::fill(dA.begin(), dA.end(), Acc(0));
      const GroupGrads<Acc> gr{gb.task_dB(task), gb.task_dC(task), dBg.data(), dCg.data(), dA.data(), dD, dbias,
                               dus.data(), dds.data()};
      // Reversed suffix, then forward suffix, each from a zero adjoint; their
      // start adjoints (both d loss / d h_P) add up at the end of the prefix.
      std::fill(lam_r.begin(), lam_r.end(), Acc(0));
      segment_bwd(in, g, p + s, s, true, Bp.data(), Cp.data(),
                  GroupCheckpoints<Acc>{ckm, in.dim, fl.nck, N, fl.nck_p + fl.nck_s, &g, tmp.data()}, gy.data(),
                  lam_r.data(), gr, static_cast<Acc*>(nullptr), work.data());
      std::fill(lam.begin(), lam.end(), Acc(0));
      segment_bwd(in, g, p, s, false, Bp.data(), Cp.data(),
                  GroupCheckpoints<Acc>{ckm, in.dim, fl.nck, N, fl.nck_p, &g, tmp.data()}, gy.data(), lam.data(), gr,
                  static_cast<Acc*>(nullptr), work.data());
      for (int64_t q = 0; q < N * kLanes; ++q) lam[q] += lam_r[q];
      segment_bwd(in, g, 0, p, false, Bp.data(), Cp.data(),
                  GroupCheckpoints<Acc>{ckm, in.dim, fl.nck, N, 0, &g, tmp.data()}, static_cast<const Acc*>(nullptr),
                  lam.data(), gr, static_cast<Acc*>(nullptr), work.data());
      gb.store_group(g, dA.data(), dD, dbias, dBg.data(), dCg.data());
      for (int64_t k = 0; k < g.nvalid; ++k)
        for (int64_t l = 0; l < L; ++l) {
          du(b, d0 + k, l) = static_cast<T>(dus[l * kLanes + k]);
          ddelta(b, d0 + k, l) = static_cast<T>(dds[l * kLanes + k]);
        }
    }
  }
};

// One multiversioned entry point per (body, dtype).
#define VLSSM_TASK_ENTRY(Body, T, Acc)                                                       \
  VLSSM_CLONES void run_task(const Body<T, Acc>& body, int64_t task, const TaskRange& tr) { \
    body.run(task, tr);                                                                      \
  }
#define VLSSM_TASK_ENTRIES(Body)              \
  VLSSM_TASK_ENTRY(Body, float, float)        \
  VLSSM_TASK_ENTRY(Body, double, double)      \
  VLSSM_TASK_ENTRY(Body, at::BFloat16, float) \
  VLSSM_TASK_ENTRY(Body, at::Half, float)
VLSSM_TASK_ENTRIES(SelectiveScanFwd)
VLSSM_TASK_ENTRIES(SelectiveScanBwd)
VLSSM_TASK_ENTRIES(ForkScanFwd)
VLSSM_TASK_ENTRIES(ForkScanBwd)
#undef VLSSM_TASK_ENTRIES
#undef VLSSM_TASK_ENTRY

template <typename Body>
void run_tasks(const Body& body, const TaskRange& tr) {
  at::parallel_for(0, tr.ntasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) run_task(body, task, tr);
  });
}

template <typename T, typename Acc>
ScanInputs<T, Acc> scan_inputs(const at::Tensor& u, const at::Tensor& delta, const ScanWeights& w,
                               const BCOperands& bc, const c10::optional<at::Tensor>& z,
                               const ScanShape& sh, bool softplus, bool token_major) {
  // (b, channel, token) dims of u, delta, z.
  const int x = token_major ? 2 : 1, l = token_major ? 1 : 2;
  ScanInputs<T, Acc> in;
  in.u = View<T>(u, 0, x, l);
  in.delta = View<T>(delta, 0, x, l);
  in.B = BCOperand<T, Acc>(bc.B, sh.varB, token_major);
  in.C = BCOperand<T, Acc>(bc.C, sh.varC, token_major);
  in.G = sh.G;
  in.H = sh.group_dim();
  in.lane_bc = !(sh.varB && sh.varC);
  if (z.has_value()) in.z = View<T>(*z, 0, x, l);
  in.A = w.A.data_ptr<Acc>();
  in.Dskip = w.D.defined() ? w.D.data_ptr<Acc>() : nullptr;
  in.bias = w.bias.defined() ? w.bias.data_ptr<Acc>() : nullptr;
  in.batch = sh.batch;
  in.dim = sh.dim;
  in.L = sh.L;
  in.N = sh.N;
  in.softplus = softplus;
  return in;
}

// ---------------------------------------------------------------------------
// selective_scan: (b, D, L) operands, mamba_ssm semantics plus reverse and
// initial_state. Returns (out, last_state, checkpoints).

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state);
  at::Tensor out, last, ck;
  std::tie(out, last, ck) = selective_scan_outputs(u, sh);
  const int64_t nck = ck.size(2);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, false);
  const at::Tensor h0c = opt_or_empty(initial_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = scan_inputs<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, false);
    const SelectiveScanFwd<T, Acc> body{in, reverse, h0c.defined() ? h0c.data_ptr<Acc>() : nullptr,
                                        MutView<T>(out, 0, 1, 2), last.data_ptr<Acc>(), ck.data_ptr<Acc>(), nck};
    run_tasks(body, TaskRange(sh.batch, sh.G, sh.group_dim()));
  });
  return {out, last, ck};
}

std::vector<at::Tensor> selective_scan_backward_cpu(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_state, const at::Tensor& u,
    const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    const at::Tensor& checkpoints, bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                                     initial_state, checkpoints);
  const int64_t nck = num_checkpoints(sh.L);
  const auto acc_type = acc_dtype(u.scalar_type());
  const auto acc_opts = u.options().dtype(acc_type);
  at::Tensor du = at::empty({sh.batch, sh.dim, sh.L}, u.options());
  at::Tensor ddelta = at::empty({sh.batch, sh.dim, sh.L}, u.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());  // B / C's own layout and dtype
  at::Tensor dC = at::empty(C.sizes(), C.options());
  at::Tensor dA = at::empty({sh.dim, sh.N}, acc_opts);
  at::Tensor dD_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dbias_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dz = z.has_value() ? at::empty({sh.batch, sh.dim, sh.L}, u.options()) : at::empty({0}, u.options());
  at::Tensor dh0 = initial_state.has_value() ? at::empty({sh.batch, sh.dim, sh.N}, acc_opts) : at::empty({0}, acc_opts);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, false);
  const at::Tensor ckc = checkpoints.contiguous(), dlc = opt_or_empty(dlast_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = scan_inputs<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, false);
    const TaskRange tr(sh.batch, sh.G, sh.group_dim());
    GradBuffers<Acc> gb(sh.batch, sh.dim, sh.L, sh.N, tr, sh.varB, sh.varC);
    const SelectiveScanBwd<T, Acc> body{in, reverse, View<T>(dout, 0, 1, 2),
                                        dlc.defined() ? dlc.data_ptr<Acc>() : nullptr, ckc.data_ptr<Acc>(), nck, gb,
                                        MutView<T>(du, 0, 1, 2), MutView<T>(ddelta, 0, 1, 2),
                                        z.has_value() ? MutView<T>(dz, 0, 1, 2) : MutView<T>(),
                                        initial_state.has_value() ? dh0.data_ptr<Acc>() : nullptr};
    run_tasks(body, tr);
    gb.template reduce<T>(dB, dC, false, dA, dD_full, dbias_full);
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
// (out (b, s, E), ysum (b, s, E) = pre-gate sum in the accumulation dtype, checkpoints).

std::tuple<at::Tensor, at::Tensor, at::Tensor> fork_scan_cpu(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh = check_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len);
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  at::Tensor out, ysum, ck;
  std::tie(out, ysum, ck) = fork_scan_outputs(u, sh, fl);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = scan_inputs<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, true);
    const ForkScanFwd<T, Acc> body{in, fl, MutView<T>(out, 0, 2, 1), MutView<Acc>(ysum, 0, 2, 1), ck.data_ptr<Acc>()};
    run_tasks(body, TaskRange(sh.batch, sh.G, sh.group_dim()));
  });
  return {out, ysum, ck};
}

std::vector<at::Tensor> fork_scan_backward_cpu(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const at::Tensor& ysum, const at::Tensor& checkpoints,
    int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh =
      check_fork_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, prefix_len);
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  const auto acc_type = acc_dtype(u.scalar_type());
  const auto acc_opts = u.options().dtype(acc_type);
  at::Tensor du = at::empty({sh.batch, sh.L, sh.dim}, u.options());
  at::Tensor ddelta = at::empty({sh.batch, sh.L, sh.dim}, u.options());
  at::Tensor dB = at::empty(B.sizes(), B.options());  // B / C's own layout and dtype
  at::Tensor dC = at::empty(C.sizes(), C.options());
  at::Tensor dA = at::empty({sh.dim, sh.N}, acc_opts);
  at::Tensor dD_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dbias_full = at::empty({sh.dim}, acc_opts);
  at::Tensor dz = z.has_value() ? at::empty({sh.batch, fl.s, sh.dim}, u.options()) : at::empty({0}, u.options());
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, true);
  const at::Tensor ckc = checkpoints.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_backward_cpu", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    const auto in = scan_inputs<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, true);
    const TaskRange tr(sh.batch, sh.G, sh.group_dim());
    GradBuffers<Acc> gb(sh.batch, sh.dim, sh.L, sh.N, tr, sh.varB, sh.varC);
    const ForkScanBwd<T, Acc> body{in, fl, View<T>(dout, 0, 2, 1), View<Acc>(ysum, 0, 2, 1), ckc.data_ptr<Acc>(),
                                   gb, MutView<T>(du, 0, 2, 1), MutView<T>(ddelta, 0, 2, 1),
                                   z.has_value() ? MutView<T>(dz, 0, 2, 1) : MutView<T>()};
    run_tasks(body, tr);
    gb.template reduce<T>(dB, dC, true, dA, dD_full, dbias_full);
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
