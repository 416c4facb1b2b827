// CUDA kernels of vlssm::selective_scan and vlssm::fork_scan (forward and
// backward). Same algorithm and outputs as csrc/cpu/scan_cpu.cpp.
//
// B / C layouts (csrc/scan_shapes.h): time-varying with G >= 1 groups of
// H = D / G channels, or input-independent (D, N).
//
// Work split (both ops, both directions): one block of kThreads = 128 threads
// per (batch b, kCPB consecutive channels of one group); grid
// (ceil(H / kCPB), b, G): block (bx, b, g) covers channels g H + bx kCPB ..,
// so a block never straddles two groups, and its channels at or past the
// group's end are padding (like channels past D with G = 1; the group's
// blocks are the G x ceil(H / kCPB) block columns of the CPU / Triton
// kernels, with the group index in blockIdx.z: no division). Inside a
// block, a group of kLPC consecutive lanes owns one channel and each lane owns
// kNPL states (n = lane_in_group * kNPL + k) in registers (compile-time arrays,
// constant indices). Configurations (kNPL, kLPC) by N: N <= 4: (4, 1); N <= 16:
// (4, 4); N <= 64: (4, 16); N <= 256: (8, 32). States n >= N are masked: A = 0,
// B = C = 0 and state 0, so they contribute nothing. y = C.h is reduced over the
// group with __shfl_xor_sync. Time is a sequential loop.
//
// Shared memory (dynamic, Acc = fp32, or fp64 for float64 inputs): each tile of
// tokens (forward: kTileF = 32 steps, backward: kSub = 8 steps) is staged once
// per block with coalesced loads: B and C rows (tile x Npad) of the block's
// group (time-varying operands only: row (b, g, n, l)), u, dt =
// softplus(delta + bias) (computed once per (token, channel) here, not per
// lane), and in the backward delta + bias and the output gradient
// gy = dout * silu(z). Outputs are collected per tile in shared memory and
// written back coalesced (channel-fastest for token-major tensors,
// token-fastest for channel-major ones: the mapping follows the strides).
// All operands are read through element strides: transposed views and batch
// broadcast (stride 0) work without copies. An input-independent B / C is
// per channel: each lane holds its B[d, n] / C[d, n] in registers, like A.
// Kernels are instantiated twice per config (Cfg::kAV): B and C both
// time-varying (any G; the inner loops read the tiles only), or not (a
// uniform branch per read between tile and registers).
//
// Forward: h in registers; checkpoint c (state before walk step 64 c) written
// to (b, D, nck, N). fork_scan is one launch: prefix once, its final state kept
// in registers, forward suffix (y_f + D u stored into ysum), then the reversed
// suffix walked from its last token (ysum += y_r + D u, out = ysum * silu(z)).
//
// Backward: per segment, chunks of 64 walk steps in reverse order. For a
// chunk, the state is reloaded from its checkpoint, a first pass recomputes the
// chunk and keeps a snapshot every kSub = 8 steps (shared memory, thread-
// private slots: registers would cost 32+ per thread); then each
// 8-step sub-chunk (last first) is recomputed into registers (the 9 states;
// exp(dt A) is recomputed in the adjoint) and walked backwards with the adjoint lam (= d loss / d h), as
// segment_bwd in scan_cpu.cpp. fork_scan: reversed suffix and forward suffix
// from lam = 0, adjoints summed at the end of the prefix, then the prefix.
// Reductions: time-varying dB / dC over the channels of a group: warp
// shuffles, then shared-memory atomics per block, then one global atomicAdd
// per (token, state) per block into a zeroed Acc buffer (b, G, N, L) /
// (b, G, L, N), row b G + g of the block's group (permuted to B's / C's
// layout and cast to its dtype afterwards). Input-independent dB / dC are
// summed like dA.
// dA / dD / d delta_bias over batch: per-thread register sums over tokens,
// then global atomicAdd into zeroed Acc outputs. Floating-point atomics make
// dA, dB, dC, dD and d delta_bias not bitwise deterministic run to run (order
// of b / channel-block summation); du, ddelta, dz, dinitial_state and all
// forward outputs are deterministic.
// Deterministic mode (torch.use_deterministic_algorithms(True), N <= 16):
// no atomics. Each warp stores its dB / dC sums into its own shared-memory
// slice, flush_bwd adds the kWarps slices in order and stores the block's sum
// into a per-block partial (slice blockIdx.x, the block within its group, of
// a (ceil(H / kCPB), b, <grouped dB>) buffer); each thread stores
// its dA / dD / d delta_bias (and input-independent dB / dC) sums into
// per-batch partials (b, D, N) / (b, D); at::sum adds the partials in a
// fixed order.
// Bitwise repeatable; costs ceil(D / 32) x b x L x N Acc of scratch per dB /
// dC (written once, read once: about +50% of the backward's bytes at N = 16,
// estimated). N > 16 (kCPB <= 8) would need 4-8x more scratch: there the
// backward keeps its atomics and alerts (raises under deterministic mode).
//
// Bytes per token (floor, fork_scan forward, bf16, N = 16, per (b, token)):
// read u, delta (2 E x 2 B) + B, C (2 N x 2 B) + z on the suffix, write out
// (2 B) + ysum (4 B) per suffix token per channel, checkpoints
// 4 N B per 64 tokens per channel. See bench/NOTES-cuda.md.
//
// No allocations besides the outputs and, for fp16 / bf16, Acc buffers of
// dB / dC (b, L, G, N) (the partials in deterministic mode), and .contiguous()
// copies of A, D, delta_bias, input-independent B / C, checkpoints when they
// are not contiguous. No host syncs.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../scan_shapes.h"
#include "plumbing.cuh"

namespace vlssm {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kDetMaxN = 16;                    // deterministic backward: N <= 16 (kCPB >= 32)
constexpr int kTileF = 32;                      // forward tile (walk steps)
constexpr int kSub = 8;                         // backward sub-chunk (walk steps)
constexpr int kChunkI = 64;                     // == kCheckpointChunk
constexpr int kNumSub = kChunkI / kSub;         // snapshots per chunk
static_assert(kChunkI == kCheckpointChunk, "checkpoint chunk");
static_assert(kChunkI % kTileF == 0 && kChunkI % kSub == 0, "tiles divide the chunk");

template <int NPL, int LPC, bool AV>
struct Cfg {
  static constexpr int kNPL = NPL;              // states per lane
  static constexpr int kLPC = LPC;              // lanes per channel
  static constexpr bool kAV = AV;               // B and C both time-varying (no input-independent branch)
  static constexpr int kCPB = kThreads / LPC;   // channels per block
  static constexpr int kNpad = NPL * LPC;       // states per channel incl. padding
  static_assert(32 % LPC == 0, "a channel's lanes lie in one warp");
};

template <typename T, typename Acc>
struct ScanParams {
  V3<const T> u, delta, z, dout;  // (b, channel, token); z / dout of fork_scan by suffix token
  V3<const T> B, C;               // time-varying: (b, state, token) of group 0 (see below)
  const Acc* A = nullptr;         // (D, N) contiguous
  const Acc* Dskip = nullptr;     // (D) or null
  const Acc* bias = nullptr;      // (D) or null
  int batch = 0, dim = 0, N = 0;
  int64_t L = 0, p = 0, s = 0;
  bool softplus = false, fork = false, reverse = false;
  Acc* ck = nullptr;              // (b, D, nck, N) contiguous
  int64_t nck = 0, nck_p = 0, nck_s = 0;
  // forward
  const Acc* h0 = nullptr;        // (b, D, N) or null
  Acc* last = nullptr;            // (b, D, N)
  V3<T> out;                      // (b, channel, token)
  V3<Acc> ysum;                   // (b, channel, suffix token)
  // backward
  const Acc* dlast = nullptr;     // (b, D, N) or null
  Acc* dh0 = nullptr;             // (b, D, N) or null
  V3<T> du, ddelta, dz;
  V3<Acc> dB, dC;                 // time-varying: zeroed accumulation buffers (b G + g, state, token)
  Acc* dA = nullptr;              // (D, N) zeroed
  Acc* dD = nullptr;              // (D) zeroed
  Acc* dbias = nullptr;           // (D) zeroed
  // Deterministic mode: no atomics. Time-varying dB / dC are then partials,
  // one (b, group, state, token) slice per block of a group (slice
  // blockIdx.x, part_stride elements apart), and dA / dD / dbias and the
  // input-independent dB / dC per-batch partials (b, D, N) / (b, D) / (b, D)
  // / (b, D, N); every element is stored exactly once.
  bool det = false;
  int64_t part_stride = 0;
  // B / C layouts: time-varying ones (varB / varC) in B / C, group g at
  // + g * gB / gC elements; input-independent ones as (D, N) contiguous Bc /
  // Cc, their gradients (zeroed (D, N), like dA) in dBc / dCc.
  int64_t gB = 0, gC = 0;
  const Acc* Bc = nullptr;
  const Acc* Cc = nullptr;
  Acc* dBc = nullptr;
  Acc* dCc = nullptr;
  bool varB = true, varC = true;
  int G = 1, H = 0;               // groups, channels per group (H = dim / G)
};

// One segment of the walk. mode: 0 prefix (no output), 1 selective_scan
// (out per token), 2 fork forward suffix, 3 fork reversed suffix.
struct Seg {
  int64_t l0, len;
  bool rev;
  int64_t ck_off;
  int mode;
  int64_t zoff;  // suffix token index = token - zoff (modes 2, 3)
  __device__ __forceinline__ int64_t tok(int64_t j) const { return rev ? l0 + len - 1 - j : l0 + j; }
};

template <int LPC, typename Acc>
__device__ __forceinline__ Acc group_sum(Acc v) {
#pragma unroll
  for (int o = LPC / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the channel groups of a warp (lanes with the same lane_in_group).
template <int LPC, typename Acc>
__device__ __forceinline__ Acc cross_group_sum(Acc v) {
#pragma unroll
  for (int o = LPC; o < 32; o *= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Index mapping of a (tile token t, x) loop: x-fastest unless the tensor is
// token-contiguous (then t-fastest), so global accesses coalesce.
__device__ __forceinline__ void tile_map(int idx, int nt, int nx, bool tfast, int& t, int& x) {
  if (tfast) {
    x = idx / nt;
    t = idx - x * nt;
  } else {
    t = idx / nx;
    x = idx - t * nx;
  }
}

template <typename V>
__device__ __forceinline__ bool token_fast(const V& v) {
  return v.sl == 1 && v.sx != 1;
}

// f(t, c, d, l) for every valid (tile step t, channel c = d - d0 < dend) of a
// tile of TT walk steps starting at j0; l is the token of step j0 + t.
template <int TT, int CPB, typename F>
__device__ __forceinline__ void for_tile_channels(int d0, int dend, const Seg& sg, int64_t j0, int64_t jend, bool tfast,
                                                  F&& f) {
  for (int idx = threadIdx.x; idx < TT * CPB; idx += kThreads) {
    int t, c;
    tile_map(idx, TT, CPB, tfast, t, c);
    const int64_t j = j0 + t;
    const int d = d0 + c;
    if (j < jend && d < dend) f(t, c, d, sg.tok(j));
  }
}

// The end of this block's group of channels, (blockIdx.z + 1) H.
template <typename T, typename Acc>
__device__ __forceinline__ int group_end(const ScanParams<T, Acc>& P) {
  return (static_cast<int>(blockIdx.z) + 1) * P.H;
}

// Per-thread constants of a channel. Block (blockIdx.x, b, blockIdx.z) covers
// channels d0 .. d0 + kCPB - 1 of group blockIdx.z (block blockIdx.x of the
// group); channels at or past the group's end (group_end) are padding (never
// past dim: G H = dim). The group is read from blockIdx where needed, not
// kept in registers.
template <typename Acc, int NPL>
struct Lane {
  int b, d0, ch, g, d;
  bool valid;
  Acc Ar[NPL];
  Acc Br[NPL], Cr[NPL];  // input-independent B / C of this channel (else unused)
  Acc Dd;
  __device__ __forceinline__ int n(int k) const { return g * NPL + k; }
};

template <typename T, typename Acc, typename CF>
__device__ __forceinline__ Lane<Acc, CF::kNPL> make_lane(const ScanParams<T, Acc>& P) {
  Lane<Acc, CF::kNPL> ln;
  ln.b = blockIdx.y;
  ln.d0 = static_cast<int>(blockIdx.z) * P.H + static_cast<int>(blockIdx.x) * CF::kCPB;
  ln.ch = threadIdx.x / CF::kLPC;
  ln.g = threadIdx.x % CF::kLPC;
  ln.d = ln.d0 + ln.ch;
  ln.valid = ln.d < group_end(P);
#pragma unroll
  for (int k = 0; k < CF::kNPL; ++k) {
    const int n = ln.n(k);
    const bool in = ln.valid && n < P.N;
    const int64_t dn = static_cast<int64_t>(ln.d) * P.N + n;
    ln.Ar[k] = in ? P.A[dn] : Acc(0);
    if (!CF::kAV) {
      ln.Br[k] = (in && !P.varB) ? P.Bc[dn] : Acc(0);
      ln.Cr[k] = (in && !P.varC) ? P.Cc[dn] : Acc(0);
    }
  }
  ln.Dd = (ln.valid && P.Dskip) ? P.Dskip[ln.d] : Acc(0);
  return ln;
}

// B / C of lane state k at tile step t: the staged row of a time-varying
// operand, or the lane's register of an input-independent one.
template <typename CF, typename Acc>
__device__ __forceinline__ Acc bc_at(bool var, const Acc* tile, int t, int n, const Acc (&reg)[CF::kNPL], int k) {
  return (CF::kAV || var) ? tile[t * CF::kNpad + n] : reg[k];
}

// Shared-memory tile of TT walk steps starting at j0 (steps >= jend and
// channels >= dend are zero-filled; B / C rows only of time-varying operands).
template <typename Acc>
struct Tile {
  Acc *B, *C, *u, *dt, *raw, *gy;
};

template <typename T, typename Acc, typename CF, int TT>
__device__ __forceinline__ void
stage_tile(const ScanParams<T, Acc>& P, const Lane<Acc, CF::kNPL>& ln, const Seg& sg, int64_t j0, int64_t jend,
    const Tile<Acc>& tl, bool write_dz) {
  constexpr int CPB = CF::kCPB, Npad = CF::kNpad;
  const int b = ln.b, d0 = ln.d0;
  const bool vB = CF::kAV || P.varB, vC = CF::kAV || P.varC;
  if (vB || vC) {
    V3<const T> Bg = P.B, Cg = P.C;  // this block's group
    Bg.p += blockIdx.z * P.gB;
    Cg.p += blockIdx.z * P.gC;
    const bool bfast = token_fast(vB ? P.B : P.C);
    for (int idx = threadIdx.x; idx < TT * Npad; idx += kThreads) {
      int t, n;
      tile_map(idx, TT, Npad, bfast, t, n);
      const int64_t j = j0 + t;
      Acc bv = Acc(0), cv = Acc(0);
      if (j < jend && n < P.N) {
        const int64_t l = sg.tok(j);
        if (vB) bv = static_cast<Acc>(Bg(b, n, l));
        if (vC) cv = static_cast<Acc>(Cg(b, n, l));
      }
      if (vB) tl.B[t * Npad + n] = bv;
      if (vC) tl.C[t * Npad + n] = cv;
    }
  }
  const bool ufast = token_fast(P.u);
  for (int idx = threadIdx.x; idx < TT * CPB; idx += kThreads) {
    int t, c;
    tile_map(idx, TT, CPB, ufast, t, c);
    const int64_t j = j0 + t;
    const int d = d0 + c;
    Acc uu = Acc(0), raw = Acc(0), dt = Acc(0), gy = Acc(0);
    if (j < jend && d < group_end(P)) {
      const int64_t l = sg.tok(j);
      uu = static_cast<Acc>(P.u(b, d, l));
      raw = static_cast<Acc>(P.delta(b, d, l)) + (P.bias ? P.bias[d] : Acc(0));
      dt = P.softplus ? vsoftplus(raw) : raw;
      if (tl.gy != nullptr && sg.mode != 0) {
        const int64_t i = l - sg.zoff;
        const Acc g = static_cast<Acc>(P.dout(b, d, i));
        if (P.z.p != nullptr) {
          const Acc zz = static_cast<Acc>(P.z(b, d, i));
          gy = g * vsilu(zz);
          if (write_dz && sg.mode == 3) P.dz(b, d, i) = static_cast<T>(g * P.ysum(b, d, i) * vsilu_grad(zz));
        } else {
          gy = g;
        }
      }
    }
    tl.u[t * CPB + c] = uu;
    tl.dt[t * CPB + c] = dt;
    if (tl.raw != nullptr) tl.raw[t * CPB + c] = raw;
    if (tl.gy != nullptr) tl.gy[t * CPB + c] = gy;
  }
}

template <typename T, typename Acc, int NPL>
__device__ __forceinline__ Acc* ck_row(const ScanParams<T, Acc>& P, const Lane<Acc, NPL>& ln, int64_t c) {
  return P.ck + ((static_cast<int64_t>(ln.b) * P.dim + ln.d) * P.nck + c) * P.N;
}

template <typename T, typename Acc, int NPL>
__device__ __forceinline__ Acc* state_row(Acc* base, const ScanParams<T, Acc>& P, const Lane<Acc, NPL>& ln) {
  return base + (static_cast<int64_t>(ln.b) * P.dim + ln.d) * P.N;
}

// ---------------------------------------------------------------------------
// Forward

template <typename T, typename Acc, typename CF>
__device__ __forceinline__ void
flush_fwd(const ScanParams<T, Acc>& P, const Lane<Acc, CF::kNPL>& ln, const Seg& sg, int64_t j0, int64_t jend,
    const Acc* sy) {
  constexpr int CPB = CF::kCPB;
  const bool tfast = sg.mode == 1 ? token_fast(P.out) : false;
  for_tile_channels<kTileF, CPB>(ln.d0, group_end(P), sg, j0, jend, tfast, [&](int t, int c, int d, int64_t l) {
    Acc y = sy[t * CPB + c];
    if (sg.mode == 1) {
      P.out(ln.b, d, l) = static_cast<T>(P.z.p ? y * vsilu(static_cast<Acc>(P.z(ln.b, d, l))) : y);
    } else if (sg.mode == 2) {
      P.ysum(ln.b, d, l - sg.zoff) = y;
    } else {
      const int64_t i = l - sg.zoff;
      y += P.ysum(ln.b, d, i);
      P.ysum(ln.b, d, i) = y;
      P.out(ln.b, d, i) = static_cast<T>(P.z.p ? y * vsilu(static_cast<Acc>(P.z(ln.b, d, i))) : y);
    }
  });
}

template <typename T, typename Acc, typename CF>
__device__ __forceinline__ void
seg_fwd(const ScanParams<T, Acc>& P, const Lane<Acc, CF::kNPL>& ln, const Seg& sg, Acc* smem, Acc (&h)[CF::kNPL]) {
  constexpr int NPL = CF::kNPL, LPC = CF::kLPC, CPB = CF::kCPB, Npad = CF::kNpad;
  Tile<Acc> tl;
  tl.B = smem;
  tl.C = tl.B + kTileF * Npad;
  tl.u = tl.C + kTileF * Npad;
  tl.dt = tl.u + kTileF * CPB;
  tl.raw = nullptr;
  tl.gy = nullptr;
  Acc* sy = tl.dt + kTileF * CPB;
  for (int64_t j0 = 0; j0 < sg.len; j0 += kTileF) {
    const int64_t jend = min(sg.len, j0 + kTileF);
    __syncthreads();  // previous tile's readers are done
    stage_tile<T, Acc, CF, kTileF>(P, ln, sg, j0, jend, tl, false);
    __syncthreads();
    const int nt = static_cast<int>(jend - j0);
    for (int t = 0; t < nt; ++t) {
      const int64_t j = j0 + t;
      if ((j % kChunkI) == 0 && ln.valid) {
        Acc* row = ck_row(P, ln, sg.ck_off + j / kChunkI);
#pragma unroll
        for (int k = 0; k < NPL; ++k)
          if (ln.n(k) < P.N) row[ln.n(k)] = h[k];
      }
      const Acc dt = tl.dt[t * CPB + ln.ch], uu = tl.u[t * CPB + ln.ch];
      const Acc dtu = dt * uu;
      Acc y = Acc(0);
#pragma unroll
      for (int k = 0; k < NPL; ++k) {
        const int n = ln.n(k);
        h[k] = fast_exp(dt * ln.Ar[k]) * h[k] + dtu * bc_at<CF>(P.varB, tl.B, t, n, ln.Br, k);
        y += h[k] * bc_at<CF>(P.varC, tl.C, t, n, ln.Cr, k);
      }
      y = group_sum<LPC>(y);
      if (ln.g == 0) sy[t * CPB + ln.ch] = y + ln.Dd * uu;
    }
    __syncthreads();
    if (sg.mode != 0) flush_fwd<T, Acc, CF>(P, ln, sg, j0, jend, sy);
  }
}

template <typename T, typename Acc, typename CF>
__global__ void __launch_bounds__(kThreads) scan_fwd_kernel(const ScanParams<T, Acc> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  constexpr int NPL = CF::kNPL;
  const auto ln = make_lane<T, Acc, CF>(P);
  Acc h[NPL];
#pragma unroll
  for (int k = 0; k < NPL; ++k) {
    const int n = ln.n(k);
    h[k] = (!P.fork && P.h0 && ln.valid && n < P.N) ? state_row(const_cast<Acc*>(P.h0), P, ln)[n] : Acc(0);
  }
  // One call site of seg_fwd (code size): selective_scan has one segment;
  // fork_scan the prefix, the forward suffix and the reversed suffix.
  Acc hP[NPL];
#pragma unroll
  for (int k = 0; k < NPL; ++k) hP[k] = Acc(0);
  const int nseg = P.fork ? 3 : 1;
  for (int si = 0; si < nseg; ++si) {
    Seg sg{0, P.L, P.reverse, 0, 1, 0};
    if (P.fork) {
      if (si == 0) sg = Seg{0, P.p, false, 0, 0, 0};
      if (si == 1) sg = Seg{P.p, P.s, false, P.nck_p, 2, P.p};
      if (si == 2) sg = Seg{P.p + P.s, P.s, true, P.nck_p + P.nck_s, 3, P.p + P.s};
    }
    if (si == 2) {  // the reversed suffix also starts from the prefix state
#pragma unroll
      for (int k = 0; k < NPL; ++k) h[k] = hP[k];
    }
    seg_fwd<T, Acc, CF>(P, ln, sg, smem, h);
    if (si == 0) {
#pragma unroll
      for (int k = 0; k < NPL; ++k) hP[k] = h[k];
    }
  }
  if (!P.fork && ln.valid) {
    Acc* row = state_row(P.last, P, ln);
#pragma unroll
    for (int k = 0; k < NPL; ++k)
      if (ln.n(k) < P.N) row[ln.n(k)] = h[k];
  }
}

// ---------------------------------------------------------------------------
// Backward

template <typename Acc>
struct BwdTile {
  Tile<Acc> in;
  Acc *dB, *dC, *du, *dd, *y;
  Acc* snap;  // (kNumSub, kNPL, kThreads): per-thread state snapshots, thread-private
};

// det: dB / dC hold one (kSub x Npad) slice per warp (see bwd_smem).
template <typename Acc, typename CF>
__device__ __forceinline__ BwdTile<Acc> bwd_tile(Acc* smem, bool det) {
  constexpr int CPB = CF::kCPB, Npad = CF::kNpad;
  const int red = (det ? kWarps : 1) * kSub * Npad;
  BwdTile<Acc> bt;
  bt.in.B = smem;
  bt.in.C = bt.in.B + kSub * Npad;
  bt.dB = bt.in.C + kSub * Npad;
  bt.dC = bt.dB + red;
  bt.in.u = bt.dC + red;
  bt.in.dt = bt.in.u + kSub * CPB;
  bt.in.raw = bt.in.dt + kSub * CPB;
  bt.in.gy = bt.in.raw + kSub * CPB;
  bt.du = bt.in.gy + kSub * CPB;
  bt.dd = bt.du + kSub * CPB;
  bt.y = bt.dd + kSub * CPB;
  bt.snap = bt.y + kSub * CPB;
  return bt;
}

template <typename T, typename Acc, typename CF>
__device__ __forceinline__ void
flush_bwd(const ScanParams<T, Acc>& P, const Lane<Acc, CF::kNPL>& ln, const Seg& sg, int64_t j0, int64_t jend,
    const BwdTile<Acc>& bt) {
  constexpr int CPB = CF::kCPB, Npad = CF::kNpad;
  const bool tfast = token_fast(P.du);
  const bool want_dz = sg.mode == 1 && P.z.p != nullptr;
  for_tile_channels<kSub, CPB>(ln.d0, group_end(P), sg, j0, jend, tfast, [&](int t, int c, int d, int64_t l) {
    P.du(ln.b, d, l) = static_cast<T>(bt.du[t * CPB + c]);
    P.ddelta(ln.b, d, l) = static_cast<T>(bt.dd[t * CPB + c]);
    if (want_dz) {
      const Acc zz = static_cast<Acc>(P.z(ln.b, d, l));
      P.dz(ln.b, d, l) = static_cast<T>(static_cast<Acc>(P.dout(ln.b, d, l)) * bt.y[t * CPB + c] * vsilu_grad(zz));
    }
  });
  const bool vB = CF::kAV || P.varB, vC = CF::kAV || P.varC;
  if (!vB && !vC) return;
  const int row = ln.b * P.G + static_cast<int>(blockIdx.z);  // (batch, group) row of dB / dC
  const bool bfast = token_fast(vB ? P.dB : P.dC);
  const int64_t part = int64_t(blockIdx.x) * P.part_stride;  // 0 unless det
  for (int idx = threadIdx.x; idx < kSub * Npad; idx += kThreads) {
    int t, n;
    tile_map(idx, kSub, Npad, bfast, t, n);
    const int64_t j = j0 + t;
    if (j >= jend || n >= P.N) continue;
    const int64_t l = sg.tok(j);
    if (P.det) {  // the warps' slices in order, then this block's partial
      Acc sb = bt.dB[t * Npad + n], sc = bt.dC[t * Npad + n];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        if (vB) sb += bt.dB[(w * kSub + t) * Npad + n];
        if (vC) sc += bt.dC[(w * kSub + t) * Npad + n];
      }
      if (vB) (&P.dB(row, n, l))[part] = sb;
      if (vC) (&P.dC(row, n, l))[part] = sc;
    } else {
      if (vB) atomicAdd(&P.dB(row, n, l), bt.dB[t * Npad + n]);
      if (vC) atomicAdd(&P.dC(row, n, l), bt.dC[t * Npad + n]);
    }
  }
}

// Per-thread gradient accumulators over the whole walk (dB / dC: of an
// input-independent B / C).
template <typename Acc, int NPL>
struct LaneGrads {
  Acc dA[NPL], dB[NPL], dC[NPL];
  Acc dD, dbias;
};

// Adjoint of seg_fwd. lam: in, d loss / d (state after the segment); out,
// d loss / d (state before it).
template <typename T, typename Acc, typename CF>
__device__ __forceinline__ void
seg_bwd(const ScanParams<T, Acc>& P, const Lane<Acc, CF::kNPL>& ln, const Seg& sg, Acc* smem, Acc (&lam)[CF::kNPL],
    LaneGrads<Acc, CF::kNPL>& gr) {
  constexpr int NPL = CF::kNPL, LPC = CF::kLPC, CPB = CF::kCPB, Npad = CF::kNpad;
  const BwdTile<Acc> bt = bwd_tile<Acc, CF>(smem, P.det);
  Tile<Acc> fwd_in = bt.in;  // the snapshot pass needs no gy / raw
  fwd_in.gy = nullptr;
  fwd_in.raw = nullptr;
  const int lane = threadIdx.x & 31;
  const bool vB = CF::kAV || P.varB, vC = CF::kAV || P.varC;
  const int64_t nch = (sg.len + kChunkI - 1) / kChunkI;
  for (int64_t c = nch - 1; c >= 0; --c) {
    const int64_t cj0 = c * kChunkI, cjend = min(sg.len, cj0 + kChunkI);
    const int nsub = static_cast<int>((cjend - cj0 + kSub - 1) / kSub);
    Acc h[NPL];
    {
      const Acc* row = ln.valid ? ck_row(P, ln, sg.ck_off + c) : nullptr;
#pragma unroll
      for (int k = 0; k < NPL; ++k) h[k] = (row && ln.n(k) < P.N) ? row[ln.n(k)] : Acc(0);
    }
    // Pass 1: snapshots of the state every kSub steps, in shared memory
    // (each thread reads back only its own: no barrier needed for them).
    for (int sc = 0; sc < nsub; ++sc) {
#pragma unroll
      for (int k = 0; k < NPL; ++k) bt.snap[(sc * NPL + k) * kThreads + threadIdx.x] = h[k];
      if (sc == nsub - 1) break;  // the last sub-chunk's end state is not needed
      const int64_t j0 = cj0 + sc * kSub;
      const int64_t jend = min(cjend, j0 + kSub);
      __syncthreads();
      stage_tile<T, Acc, CF, kSub>(P, ln, sg, j0, jend, fwd_in, false);
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kSub; ++t) {  // full sub-chunk: jend == j0 + kSub here
        const Acc dt = bt.in.dt[t * CPB + ln.ch];
        const Acc dtu = dt * bt.in.u[t * CPB + ln.ch];
#pragma unroll
        for (int k = 0; k < NPL; ++k)
          h[k] = fast_exp(dt * ln.Ar[k]) * h[k] + dtu * bc_at<CF>(P.varB, bt.in.B, t, ln.n(k), ln.Br, k);
      }
    }
    // Pass 2: sub-chunks last to first.
    for (int sc = nsub - 1; sc >= 0; --sc) {
      const int64_t j0 = cj0 + sc * kSub;
      const int64_t jend = min(cjend, j0 + kSub);
      const int nt = static_cast<int>(jend - j0);
      Acc hb[kSub + 1][NPL];  // hb[t] = state before step t of the sub-chunk
#pragma unroll
      for (int k = 0; k < NPL; ++k) hb[0][k] = bt.snap[(sc * NPL + k) * kThreads + threadIdx.x];
      __syncthreads();
      stage_tile<T, Acc, CF, kSub>(P, ln, sg, j0, jend, bt.in, true);
      for (int idx = threadIdx.x; idx < kSub * Npad && !P.det; idx += kThreads) {  // det: every slot read is stored
        bt.dB[idx] = Acc(0);
        bt.dC[idx] = Acc(0);
      }
      __syncthreads();
#pragma unroll
      for (int t = 0; t < kSub; ++t) {  // steps t >= nt see dt = u = 0: ea = 1, state unchanged, unused
        const Acc dt = bt.in.dt[t * CPB + ln.ch];
        const Acc dtu = dt * bt.in.u[t * CPB + ln.ch];
#pragma unroll
        for (int k = 0; k < NPL; ++k)
          hb[t + 1][k] = fast_exp(dt * ln.Ar[k]) * hb[t][k] + dtu * bc_at<CF>(P.varB, bt.in.B, t, ln.n(k), ln.Br, k);
      }
#pragma unroll
      for (int t = kSub - 1; t >= 0; --t) {
        if (t >= nt) continue;  // block-uniform
        const int o = t * CPB + ln.ch;
        const Acc dt = bt.in.dt[o], uu = bt.in.u[o], gj = bt.in.gy[o];
        Acc ddt = Acc(0), dus = Acc(0), y = Acc(0);
        Acc vdb[NPL], vdc[NPL];
#pragma unroll
        for (int k = 0; k < NPL; ++k) {
          const int n = ln.n(k);
          const Acc bn = bc_at<CF>(P.varB, bt.in.B, t, n, ln.Br, k), cn = bc_at<CF>(P.varC, bt.in.C, t, n, ln.Cr, k);
          const Acc hc = hb[t + 1][k];
          const Acc ea = fast_exp(dt * ln.Ar[k]);  // recomputed: fewer registers than storing it
          y += hc * cn;
          vdc[k] = gj * hc;
          const Acc lk = lam[k] + gj * cn;        // d loss / d h_t
          const Acc tt = lk * hb[t][k] * ea;  // d loss / d (dt * A)
          ddt += tt * ln.Ar[k] + lk * bn * uu;
          gr.dA[k] += tt * dt;
          vdb[k] = lk * dt * uu;
          dus += lk * bn;
          lam[k] = lk * ea;                 // d loss / d h_{t-1}
        }
        ddt = group_sum<LPC>(ddt);
        dus = group_sum<LPC>(dus);
        y = group_sum<LPC>(y);
#pragma unroll
        for (int k = 0; k < NPL; ++k) {  // time-varying: over the block's channels; else per lane, like dA
          const Acc sb = vB ? cross_group_sum<LPC>(vdb[k]) : Acc(0);
          const Acc sc2 = vC ? cross_group_sum<LPC>(vdc[k]) : Acc(0);
          if (!vB) gr.dB[k] += vdb[k];
          if (!vC) gr.dC[k] += vdc[k];
          if (lane < LPC && P.det) {  // this warp's slice: every (t < nt, n) stored once
            const int w = threadIdx.x / 32;
            if (vB) bt.dB[(w * kSub + t) * Npad + ln.n(k)] = sb;
            if (vC) bt.dC[(w * kSub + t) * Npad + ln.n(k)] = sc2;
          } else if (lane < LPC) {
            if (vB) atomicAdd(&bt.dB[t * Npad + ln.n(k)], sb);
            if (vC) atomicAdd(&bt.dC[t * Npad + ln.n(k)], sc2);
          }
        }
        if (ln.g == 0) {
          const Acc raw = bt.in.raw[o];
          const Acc draw = P.softplus ? ddt * vsoftplus_grad(raw) : ddt;
          bt.du[o] = dus * dt + gj * ln.Dd;
          bt.dd[o] = draw;
          bt.y[o] = y + ln.Dd * uu;
          gr.dD += gj * uu;
          gr.dbias += draw;
        }
      }
      __syncthreads();
      flush_bwd<T, Acc, CF>(P, ln, sg, j0, jend, bt);
    }
  }
}

template <typename T, typename Acc, typename CF>
__global__ void __launch_bounds__(kThreads) scan_bwd_kernel(const ScanParams<T, Acc> P) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Acc* smem = reinterpret_cast<Acc*>(smem_raw);
  constexpr int NPL = CF::kNPL;
  const auto ln = make_lane<T, Acc, CF>(P);
  LaneGrads<Acc, NPL> gr;
#pragma unroll
  for (int k = 0; k < NPL; ++k) gr.dA[k] = gr.dB[k] = gr.dC[k] = Acc(0);
  gr.dD = Acc(0);
  gr.dbias = Acc(0);
  // One call site of seg_bwd (code size). fork_scan: reversed suffix and
  // forward suffix from lam = 0, their start adjoints summed, then the prefix.
  Acc lam[NPL], lam_r[NPL];
#pragma unroll
  for (int k = 0; k < NPL; ++k) {
    const int n = ln.n(k);
    lam[k] = (!P.fork && P.dlast && ln.valid && n < P.N) ? state_row(const_cast<Acc*>(P.dlast), P, ln)[n] : Acc(0);
    lam_r[k] = Acc(0);
  }
  const int nseg = P.fork ? 3 : 1;
  for (int si = 0; si < nseg; ++si) {
    Seg sg{0, P.L, P.reverse, 0, 1, 0};
    if (P.fork) {
      if (si == 0) sg = Seg{P.p + P.s, P.s, true, P.nck_p + P.nck_s, 3, P.p + P.s};
      if (si == 1) sg = Seg{P.p, P.s, false, P.nck_p, 2, P.p};
      if (si == 2) sg = Seg{0, P.p, false, 0, 0, 0};
    }
    seg_bwd<T, Acc, CF>(P, ln, sg, smem, lam, gr);
    if (P.fork && si == 0) {
#pragma unroll
      for (int k = 0; k < NPL; ++k) {
        lam_r[k] = lam[k];
        lam[k] = Acc(0);
      }
    }
    if (P.fork && si == 1) {
#pragma unroll
      for (int k = 0; k < NPL; ++k) lam[k] += lam_r[k];
    }
  }
  if (!P.fork && P.dh0 && ln.valid) {
    Acc* row = state_row(P.dh0, P, ln);
#pragma unroll
    for (int k = 0; k < NPL; ++k)
      if (ln.n(k) < P.N) row[ln.n(k)] = lam[k];
  }
  if (!ln.valid) return;
  // Per-channel sums over the batch. Deterministic mode: per-batch partials,
  // this thread's elements stored once; else atomics into the (D, ...) sums.
  const int64_t bd = P.det ? static_cast<int64_t>(ln.b) * P.dim + ln.d : ln.d;
  const auto put = [&](Acc* dst, int64_t i, Acc v) {
    if (P.det) {
      dst[i] = v;
    } else {
      atomicAdd(&dst[i], v);
    }
  };
#pragma unroll
  for (int k = 0; k < NPL; ++k) {
    if (ln.n(k) >= P.N) continue;
    const int64_t i = bd * P.N + ln.n(k);
    put(P.dA, i, gr.dA[k]);
    if (!CF::kAV && !P.varB) put(P.dBc, i, gr.dB[k]);
    if (!CF::kAV && !P.varC) put(P.dCc, i, gr.dC[k]);
  }
  if (ln.g == 0) {
    put(P.dD, bd, gr.dD);
    put(P.dbias, bd, gr.dbias);
  }
}

// ---------------------------------------------------------------------------
// Host side

template <bool AV, typename F>
void with_cfg_av(int64_t N, F&& f) {
  if (N <= 4) {
    f(Cfg<4, 1, AV>{});
  } else if (N <= 16) {
    f(Cfg<4, 4, AV>{});
  } else if (N <= 64) {
    f(Cfg<4, 16, AV>{});
  } else if (N <= 256) {
    f(Cfg<8, 32, AV>{});
  } else {
    TORCH_CHECK_VALUE(false, "the CUDA scan supports dstate N <= 256, got ", N);
  }
}

// The config for N; all_vary: B and C both time-varying (the instantiation
// without the input-independent branches).
template <typename F>
void with_cfg(int64_t N, bool all_vary, F&& f) {
  if (all_vary) {
    with_cfg_av<true>(N, std::forward<F>(f));
  } else {
    with_cfg_av<false>(N, std::forward<F>(f));
  }
}

// Blocks per group: ceil(H / kCPB) of the config for N (gridDim.x).
int64_t blocks_per_group(const ScanShape& sh) {
  int64_t cpb = 0;
  with_cfg(sh.N, true, [&](auto cf) { cpb = decltype(cf)::kCPB; });
  return (sh.group_dim() + cpb - 1) / cpb;
}

template <typename Acc, typename CF>
size_t fwd_smem() {
  return sizeof(Acc) * (2 * kTileF * CF::kNpad + 3 * kTileF * CF::kCPB);
}
template <typename Acc, typename CF>
size_t bwd_smem(bool det) {
  return sizeof(Acc) * ((2 + 2 * (det ? kWarps : 1)) * kSub * CF::kNpad + 7 * kSub * CF::kCPB +
                        kNumSub * CF::kNPL * kThreads);
}

// Launch the forward (bwd = false) or backward kernel of the config for N.
template <typename T, typename Acc>
void launch(const ScanParams<T, Acc>& P, bool bwd) {
  with_cfg(P.N, P.varB && P.varC, [&](auto cf) {
    using CF = decltype(cf);
    const dim3 grid((P.H + CF::kCPB - 1) / CF::kCPB, P.batch, P.G);
    const size_t smem = bwd ? bwd_smem<Acc, CF>(P.det) : fwd_smem<Acc, CF>();
    auto kernel = bwd ? scan_bwd_kernel<T, Acc, CF> : scan_fwd_kernel<T, Acc, CF>;
    allow_smem(kernel, smem);
    kernel<<<grid, kThreads, smem, current_stream()>>>(P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_grid(const ScanShape& sh) {
  TORCH_CHECK_VALUE(sh.batch <= 65535, "the CUDA scan supports batch <= 65535, got ", sh.batch);
  TORCH_CHECK_VALUE(sh.dim < (int64_t(1) << 31), "dim too large: ", sh.dim);
  TORCH_CHECK_VALUE(sh.G <= 65535, "the CUDA scan supports up to 65535 groups of B / C, got ", sh.G);
}

// The (b, state, token) view of group 0 of a grouped 4-D tensor t (layout as
// in BCOperands); gstride: its group stride.
template <typename P>
V3<P> group_view(const at::Tensor& t, bool token_major, int64_t& gstride) {
  gstride = t.stride(token_major ? 2 : 1);
  return token_major ? view3<P>(t, 0, 3, 1) : view3<P>(t, 0, 2, 3);
}

// Common operand fields. token_major: (b, L, D) operands (fork_scan).
template <typename T, typename Acc>
ScanParams<T, Acc> make_params(const at::Tensor& u, const at::Tensor& delta, const ScanWeights& w,
                               const BCOperands& bc, const c10::optional<at::Tensor>& z, const ScanShape& sh,
                               bool softplus, bool token_major) {
  const int x = token_major ? 2 : 1, l = token_major ? 1 : 2;
  ScanParams<T, Acc> P;
  P.u = view3<const T>(u, 0, x, l);
  P.delta = view3<const T>(delta, 0, x, l);
  P.varB = sh.varB;
  P.varC = sh.varC;
  if (sh.varB) {
    P.B = group_view<const T>(bc.B, token_major, P.gB);
  } else {
    P.Bc = bc.B.data_ptr<Acc>();
  }
  if (sh.varC) {
    P.C = group_view<const T>(bc.C, token_major, P.gC);
  } else {
    P.Cc = bc.C.data_ptr<Acc>();
  }
  P.G = static_cast<int>(sh.G);
  P.H = static_cast<int>(sh.group_dim());
  if (z.has_value()) P.z = view3<const T>(*z, 0, x, l);
  P.A = w.A.data_ptr<Acc>();
  P.Dskip = ptr_or_null<Acc>(w.D);
  P.bias = ptr_or_null<Acc>(w.bias);
  P.batch = static_cast<int>(sh.batch);
  P.dim = static_cast<int>(sh.dim);
  P.N = static_cast<int>(sh.N);
  P.L = sh.L;
  P.softplus = softplus;
  return P;
}

// fork_scan's segments and checkpoint offsets.
template <typename T, typename Acc>
void set_fork(ScanParams<T, Acc>& P, const ForkLayout& fl) {
  P.fork = true;
  P.p = fl.p;
  P.s = fl.s;
  P.nck = fl.nck;
  P.nck_p = fl.nck_p;
  P.nck_s = fl.nck_s;
}

// Deterministic mode for this backward (see the top of the file); where it is
// requested but N > kDetMaxN, the atomic path alerts (raises, or warns with
// warn_only=True).
bool deterministic_backward(const char* op, const ScanShape& sh) {
  if (!at::globalContext().deterministicAlgorithms()) return false;
  if (sh.N <= kDetMaxN) return true;
  at::globalContext().alertNotDeterministic(
      std::string(op) + " on CUDA with dstate N > " + std::to_string(kDetMaxN) +
      " (atomicAdd of dA, dB, dC, dD, d delta_bias; N <= 16, backend='triton' or backend='cpu' are deterministic)");
  return false;
}

// Gradient outputs common to both backward ops; token_major: (b, L, D)
// activations (fork_scan), else (b, D, L). A time-varying dB / dC accumulates
// in a zeroed Acc buffer (b, G, N, L), or (b, G, L, N) for fork_scan (the
// kernels index its rows b G + g: no per-group pointer; finish() permutes it
// to (b, L, G, N) and casts it to B's / C's shape and dtype), an
// input-independent one in a zeroed (D, N), like dA. det (deterministic_backward): the reduced gradients are
// uninitialised partials instead (see ScanParams), summed by finish().
struct ScanGrads {
  bool token_major, det, varB, varC;
  std::vector<int64_t> Bshape, Cshape;
  at::Tensor du, ddelta, dB_acc, dC_acc, dA, dD_full, dbias_full, dz;

  ScanGrads(const at::Tensor& u, const ScanShape& sh, const at::Tensor& B, const at::Tensor& C, bool token_major_,
            int64_t zlen, bool has_z, bool det_)
      : token_major(token_major_), det(det_), varB(sh.varB), varC(sh.varC), Bshape(B.sizes().vec()),
        Cshape(C.sizes().vec()) {
    const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
    const auto act = [&](int64_t len) {
      return token_major ? std::vector<int64_t>{sh.batch, len, sh.dim} : std::vector<int64_t>{sh.batch, sh.dim, len};
    };
    // A reduced gradient: zeroed, or in det mode `parts` uninitialised partials.
    const auto reduced = [&](int64_t parts, std::vector<int64_t> shape) {
      if (!det) return at::zeros(shape, acc_opts);
      shape.insert(shape.begin(), parts);
      return at::empty(shape, acc_opts);
    };
    const std::vector<int64_t> grouped = token_major ? std::vector<int64_t>{sh.batch, sh.G, sh.L, sh.N}
                                                     : std::vector<int64_t>{sh.batch, sh.G, sh.N, sh.L};
    const int64_t bpg = det && (varB || varC) ? blocks_per_group(sh) : 0;
    du = at::empty(act(sh.L), u.options());
    ddelta = at::empty(act(sh.L), u.options());
    dB_acc = varB ? reduced(bpg, grouped) : reduced(sh.batch, {sh.dim, sh.N});
    dC_acc = varC ? reduced(bpg, grouped) : reduced(sh.batch, {sh.dim, sh.N});
    dA = reduced(sh.batch, {sh.dim, sh.N});
    dD_full = reduced(sh.batch, {sh.dim});
    dbias_full = reduced(sh.batch, {sh.dim});
    dz = has_z ? at::empty(act(zlen), u.options()) : at::empty({0}, u.options());
  }

  template <typename T, typename Acc>
  void set(ScanParams<T, Acc>& P) {
    const int x = token_major ? 2 : 1, l = token_major ? 1 : 2;
    P.du = view3<T>(du, 0, x, l);
    P.ddelta = view3<T>(ddelta, 0, x, l);
    if (dz.numel() > 0) P.dz = view3<T>(dz, 0, x, l);
    P.det = det;
    P.part_stride = det ? (varB ? dB_acc : dC_acc).stride(0) : 0;  // of the time-varying partials
    const auto bc_grad = [&](const at::Tensor& acc, bool var, V3<Acc>& view, Acc*& per_channel) {
      if (var) {  // (b G + g, state, token) rows of (b, G, N, L) / (b, G, L, N)
        view = view3<Acc>(det ? acc[0] : acc, 1, token_major ? 3 : 2, token_major ? 2 : 3);
      } else {
        per_channel = acc.data_ptr<Acc>();
      }
    };
    bc_grad(dB_acc, varB, P.dB, P.dBc);
    bc_grad(dC_acc, varC, P.dC, P.dCc);
    P.dA = dA.data_ptr<Acc>();
    P.dD = dD_full.data_ptr<Acc>();
    P.dbias = dbias_full.data_ptr<Acc>();
  }

  // (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias); absent optionals: empty.
  std::vector<at::Tensor> finish(const at::Tensor& u, bool has_D, bool has_bias) const {
    const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
    const auto total = [&](const at::Tensor& t) { return det ? t.sum(0) : t; };
    // B's / C's shape and dtype (an input-independent one is in Acc already)
    const auto bc_total = [&](const at::Tensor& t, bool var, const std::vector<int64_t>& shape) {
      if (!var) return total(t);
      const at::Tensor g = token_major ? total(t).permute({0, 2, 1, 3}) : total(t);  // fork: (b, L, G, N)
      return g.reshape(shape).to(u.scalar_type()).contiguous();
    };
    return {du, ddelta, total(dA), bc_total(dB_acc, varB, Bshape), bc_total(dC_acc, varC, Cshape),
            has_D ? total(dD_full) : at::empty({0}, acc_opts), dz,
            has_bias ? total(dbias_full) : at::empty({0}, acc_opts)};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state);
  check_cuda_device({{"u", &u}, {"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}, {"D", opt_ptr(D)},
                     {"z", opt_ptr(z)}, {"delta_bias", opt_ptr(delta_bias)},
                     {"initial_state", opt_ptr(initial_state)}});
  check_grid(sh);
  const c10::cuda::CUDAGuard guard(u.device());
  at::Tensor out, last, ck;
  std::tie(out, last, ck) = selective_scan_outputs(u, sh);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, false);
  const at::Tensor h0c = opt_or_empty(initial_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    auto P = make_params<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, false);
    P.reverse = reverse;
    P.ck = ck.data_ptr<Acc>();
    P.nck = ck.size(2);
    P.h0 = ptr_or_null<Acc>(h0c);
    P.last = last.data_ptr<Acc>();
    P.out = view3<T>(out, 0, 1, 2);
    launch(P, false);
  });
  return {out, last, ck};
}

std::vector<at::Tensor> selective_scan_backward_cuda(
    const at::Tensor& dout, const c10::optional<at::Tensor>& dlast_state, const at::Tensor& u,
    const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const c10::optional<at::Tensor>& initial_state,
    const at::Tensor& checkpoints, bool delta_softplus, bool reverse) {
  const ScanShape sh = check_selective_scan_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias,
                                                     initial_state, checkpoints);
  const int64_t nck = num_checkpoints(sh.L);
  check_cuda_device({{"u", &u}, {"dout", &dout}, {"dlast_state", opt_ptr(dlast_state)}, {"delta", &delta},
                     {"A", &A}, {"B", &B}, {"C", &C}, {"D", opt_ptr(D)}, {"z", opt_ptr(z)},
                     {"delta_bias", opt_ptr(delta_bias)}, {"initial_state", opt_ptr(initial_state)},
                     {"checkpoints", &checkpoints}});
  check_grid(sh);
  const c10::cuda::CUDAGuard guard(u.device());
  const auto acc_opts = u.options().dtype(acc_dtype(u.scalar_type()));
  ScanGrads gr(u, sh, B, C, false, sh.L, z.has_value(),
               deterministic_backward("vlssm::selective_scan_backward", sh));
  at::Tensor dh0 = initial_state.has_value() ? at::empty({sh.batch, sh.dim, sh.N}, acc_opts) : at::empty({0}, acc_opts);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, false);
  const at::Tensor ckc = checkpoints.contiguous(), dlc = opt_or_empty(dlast_state);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_selective_scan_backward_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    auto P = make_params<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, false);
    P.reverse = reverse;
    P.dout = view3<const T>(dout, 0, 1, 2);
    P.ck = const_cast<Acc*>(ckc.data_ptr<Acc>());
    P.nck = nck;
    P.dlast = ptr_or_null<Acc>(dlc);
    P.dh0 = initial_state.has_value() ? dh0.data_ptr<Acc>() : nullptr;
    gr.set(P);
    launch(P, true);
  });
  auto res = gr.finish(u, D.has_value(), delta_bias.has_value());
  res.push_back(dh0);
  return res;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fork_scan_cuda(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
    const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh = check_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len);
  check_cuda_device({{"u", &u}, {"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C}, {"D", opt_ptr(D)},
                     {"z", opt_ptr(z)}, {"delta_bias", opt_ptr(delta_bias)}});
  check_grid(sh);
  const c10::cuda::CUDAGuard guard(u.device());
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  at::Tensor out, ysum, ck;
  std::tie(out, ysum, ck) = fork_scan_outputs(u, sh, fl);
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, true);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    auto P = make_params<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, true);
    set_fork(P, fl);
    P.ck = ck.data_ptr<Acc>();
    P.out = view3<T>(out, 0, 2, 1);
    P.ysum = view3<Acc>(ysum, 0, 2, 1);
    launch(P, false);
  });
  return {out, ysum, ck};
}

std::vector<at::Tensor> fork_scan_backward_cuda(
    const at::Tensor& dout, const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const c10::optional<at::Tensor>& D, const c10::optional<at::Tensor>& z,
    const c10::optional<at::Tensor>& delta_bias, const at::Tensor& ysum, const at::Tensor& checkpoints,
    int64_t prefix_len, bool delta_softplus) {
  const ScanShape sh =
      check_fork_scan_backward(dout, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, prefix_len);
  const ForkLayout fl(prefix_len, (sh.L - prefix_len) / 2);
  check_cuda_device({{"u", &u}, {"dout", &dout}, {"delta", &delta}, {"A", &A}, {"B", &B}, {"C", &C},
                     {"D", opt_ptr(D)}, {"z", opt_ptr(z)}, {"delta_bias", opt_ptr(delta_bias)}, {"ysum", &ysum},
                     {"checkpoints", &checkpoints}});
  check_grid(sh);
  const c10::cuda::CUDAGuard guard(u.device());
  ScanGrads gr(u, sh, B, C, true, fl.s, z.has_value(), deterministic_backward("vlssm::fork_scan_backward", sh));
  const ScanWeights w(A, D, delta_bias);
  const BCOperands bc(B, C, true);
  const at::Tensor ckc = checkpoints.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "vlssm_fork_scan_backward_cuda", [&] {
    using T = scalar_t;
    using Acc = at::opmath_type<T>;
    auto P = make_params<T, Acc>(u, delta, w, bc, z, sh, delta_softplus, true);
    set_fork(P, fl);
    P.dout = view3<const T>(dout, 0, 2, 1);
    P.ysum = view3<Acc>(ysum, 0, 2, 1);
    P.ck = const_cast<Acc*>(ckc.data_ptr<Acc>());
    gr.set(P);
    launch(P, true);
  });
  return gr.finish(u, D.has_value(), delta_bias.has_value());
}

}  // namespace

TORCH_LIBRARY_IMPL(vlssm, CUDA, m) {
  m.impl("selective_scan", &selective_scan_cuda);
  m.impl("selective_scan_backward", &selective_scan_backward_cuda);
  m.impl("fork_scan", &fork_scan_cuda);
  m.impl("fork_scan_backward", &fork_scan_backward_cuda);
}

}  // namespace cuda
}  // namespace vlssm
