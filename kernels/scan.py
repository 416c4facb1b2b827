"""Triton kernels of ``selective_scan`` and ``fork_scan`` (``backend="triton"``).

Ops (same schemas, outputs and checkpoint layout as the compiled ones in
csrc/cpu/scan_cpu.cpp)::

    vlssm::selective_scan_triton(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                                 delta_softplus, reverse) -> (out, last_state, checkpoints)
    vlssm::selective_scan_backward_triton(...) -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state]
    vlssm::fork_scan_triton(u, delta, A, B, C, D?, z?, delta_bias?, prefix_len, delta_softplus)
        -> (out, ysum, checkpoints)
    vlssm::fork_scan_backward_triton(...) -> [du, ddelta, dA, dB, dC, dD, dz, ddelta_bias]

One kernel per direction serves both ops: operands are addressed as
(batch, channel, token) for u, delta, z and (batch, group, state, token) for
time-varying B, C through element strides, so channel-major (b, D, L)
selective_scan operands, token-major (b, L, E) fork_scan operands, slices and
stride-0 batch broadcasts are all read in place.

B and C each come in one of mamba_ssm's layouts (csrc/scan_shapes.h): time-varying
(b, N, L) / (b, L, N), one group (group stride 0); time-varying grouped
(b, G, N, L) / (b, L, G, N), channel d reading group d // (D / G); or
input-independent (D, N) in the accumulation dtype (VAR_B / VAR_C = False).

Grid: one program per (batch, block of BLOCK_D channels inside one group):
(b, G * ceil(H / BLOCK_D)) with H = D / G channels per group, a block masked at
its group's end, so a program reads one (N,) row of each time-varying B / C per
token, at its batch and group; an input-independent B / C is loaded once as
the (BLOCK_D, BLOCK_N) tile of the program's channels. Registers hold the
state tile h (BLOCK_D, BLOCK_N) in float32 (float64 for float64 inputs), the
A tile and the channel parameters; the program walks the tokens sequentially.
A step: ``dt = softplus(delta + bias)`` (identity above 20), ``h = exp(dt A) h +
(dt u) B``, ``y = sum_n h C + D u``. selective_scan gates ``y * silu(z)`` as it
stores; fork_scan scans the prefix once, then the forward suffix and the
reversed suffix (walked from its end, never copied) from the prefix state,
accumulating both into ``ysum`` (float32, pre-gate), then gates in an
epilogue. The state before every 64th step of a segment goes to
``checkpoints`` (b, D, nck, N), fork layout [prefix | forward | reversed].

Backward: the same grid walks each segment's chunks of 64 steps in reverse
order; a chunk's states are recomputed from its checkpoint into a per-program
global scratch of 65 state tiles ((b * G * ceil(H / BLOCK_D), 65, BLOCK_D,
BLOCK_N) in the accumulation dtype: 65 * BLOCK_D * BLOCK_N * 4 bytes per
program, 130 KiB for BLOCK_D = 32, N = 16 in float32), then the chunk is walked
backwards with the adjoint ``lam`` exactly like segment_bwd in scan_cpu.cpp.
fork_scan: reversed suffix, then forward suffix, each from a zero adjoint;
their start adjoints are summed at the end of the prefix, which goes last.

Reductions are deterministic, without atomics: each program writes its
partial dB, dC of a time-varying B / C (over its channels) for every token
into (b, G, nblk_g, L, N), summed over each group's blocks into dB[b, g]
afterwards; an input-independent B / C's gradient is accumulated per
(channel, state) over the tokens like dA. Its channels' dA, dD, d delta_bias
and input-independent dB / dC go into (b, D, ...) partials, summed over batch.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops import scan as _scan
from ..ops._checks import FLOATING, acc_dtype, operand
from ..ops.scan import CHECKPOINT_CHUNK, num_checkpoints
from ._op import INTERPRET, kernel_op, launch
from .attention import _store_cast

__all__ = ["selective_scan_triton", "selective_scan_backward_triton", "fork_scan_triton",
           "fork_scan_backward_triton"]


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _softplus(x):
    """mamba's softplus: identity above 20; log1p(e) as log(w) e / (w - 1) keeps tiny e exact."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    den = w - 1.0
    lp = tl.log(w) * (e / tl.where(den == 0.0, 1.0, den))
    return tl.where(x > 20.0, x, tl.where(den == 0.0, e, lp))


@triton.jit
def _dt(dl_ptrs, mask_d, bias, SOFTPLUS: tl.constexpr, acc_ty: tl.constexpr):
    """(raw = delta + bias, dt) of one token for the program's channels."""
    raw = tl.load(dl_ptrs, mask=mask_d, other=0.0).to(acc_ty) + bias
    if SOFTPLUS:
        return raw, _softplus(raw)
    return raw, raw


@triton.jit
def _bc_tile(ptr, dn, mask2, placeholder, VAR: tl.constexpr):
    """B or C as a program keeps it: an input-independent (dim, N) one as its (BLOCK_D, BLOCK_N)
    tile of the program's channels, loaded once; a time-varying one is read per token
    (``placeholder`` stands in, never read)."""
    if VAR:
        t = placeholder
    else:
        t = tl.load(ptr + dn, mask=mask2, other=0.0)
    return t


@triton.jit
def _bc_at(ptr, tile, offs_n, mask_n, l, sn, sl, VAR: tl.constexpr, acc_ty: tl.constexpr):
    """B or C at token l, broadcastable against the (BLOCK_D, BLOCK_N) state: the (1, BLOCK_N) row
    of a time-varying one (``ptr`` at the program's batch and group), or the tile of an
    input-independent one."""
    if VAR:
        r = tl.load(ptr + offs_n * sn + l * sl, mask=mask_n, other=0.0).to(acc_ty)[None, :]
    else:
        r = tile
    return r


@triton.jit
def _seg_fwd(h, u_ptr, dl_ptr, B_ptr, C_ptr, Bt, Ct, z_ptr, y_ptr, ck_ptrs, offs_d, mask_d, offs_n, mask_n, A, Dv,
             bias, l0, length, yoff, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, syd, syl,
             REV: tl.constexpr, Y_MODE: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
             VAR_B: tl.constexpr, VAR_C: tl.constexpr, ROUND_BF16: tl.constexpr, CHUNK: tl.constexpr):
    """Scan tokens l0 .. l0+length-1 (from the last when REV) from state h; returns the final state.

    The state before step j (walk order) goes to ck_ptrs + (j / CHUNK) * N when j % CHUNK == 0.
    Y_MODE 0: no output; 1: store y * silu(z) (u's dtype) at token l - yoff; 2: store y
    (accumulation dtype) there; 3: add y to it. B / C: see _bc_at.
    """
    acc_ty = h.dtype
    mask2 = mask_d[:, None] & mask_n[None, :]
    for j in range(0, length):
        if j % CHUNK == 0:
            tl.store(ck_ptrs + (j // CHUNK) * N, h, mask=mask2)
        if REV:
            l = l0 + length - 1 - j
        else:
            l = l0 + j
        uu = tl.load(u_ptr + offs_d * sud + l * sul, mask=mask_d, other=0.0).to(acc_ty)
        _, dt = _dt(dl_ptr + offs_d * sdd + l * sdl, mask_d, bias, SOFTPLUS, acc_ty)
        Bl = _bc_at(B_ptr, Bt, offs_n, mask_n, l, sBn, sBl, VAR_B, acc_ty)
        h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bl
        if Y_MODE != 0:
            Cl = _bc_at(C_ptr, Ct, offs_n, mask_n, l, sCn, sCl, VAR_C, acc_ty)
            y = tl.sum(h * Cl, 1) + Dv * uu
            t = l - yoff
            y_ptrs = y_ptr + offs_d * syd + t * syl
            if Y_MODE == 1:
                if HAS_Z:
                    zz = tl.load(z_ptr + offs_d * szd + t * szl, mask=mask_d, other=0.0).to(acc_ty)
                    y = y * zz * _sigmoid(zz)
                _store_cast(y_ptrs, y, mask_d, ROUND_BF16)
            elif Y_MODE == 2:
                tl.store(y_ptrs, y, mask=mask_d)
            else:
                tl.store(y_ptrs, tl.load(y_ptrs, mask=mask_d, other=0.0) + y, mask=mask_d)
    return h


@triton.jit
def _channel_block(A_ptr, D_ptr, bias_ptr, pid, H, nblk_g, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC_F64: tl.constexpr):
    """Channel block ``pid`` (of G * nblk_g, nblk_g blocks of BLOCK_D per group of H channels) of a
    program: its group g, channel / state offsets and masks (at the group's end), the 2-D mask,
    the (BLOCK_D, BLOCK_N) offsets into A, the A tile, and D, delta_bias (zeros where absent)."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    g = pid // nblk_g
    offs_h = (pid % nblk_g) * BLOCK_D + tl.arange(0, BLOCK_D)  # channels inside the group
    offs_d = g * H + offs_h
    mask_d = offs_h < H
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask2 = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * N + offs_n[None, :]
    A = tl.load(A_ptr + dn, mask=mask2, other=0.0)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0) if HAS_D else tl.zeros([BLOCK_D], dtype=acc_ty)
    bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0) if HAS_BIAS else tl.zeros([BLOCK_D], dtype=acc_ty)
    return g.to(tl.int64), offs_d, mask_d, offs_n, mask_n, mask2, dn, A, Dv, bias


@triton.jit
def _scan_fwd_kernel(u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr, out_ptr, ysum_ptr,
                     last_ptr, ck_ptr, dim, H, nblk_g, N, p, s, nck, nck_s,
                     sub, sud, sul, sdb, sdd, sdl, sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl, szb, szd, szl,
                     sob, sod, sol, syb, syd, syl,
                     FORK: tl.constexpr, REV: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_H0: tl.constexpr, SOFTPLUS: tl.constexpr,
                     VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC_F64: tl.constexpr,
                     ROUND_BF16: tl.constexpr, CHUNK: tl.constexpr):
    """selective_scan (FORK=0: one segment of p tokens) or fork_scan (prefix p, suffixes s)."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    g, offs_d, mask_d, offs_n, mask_n, mask2, dn, A, Dv, bias = _channel_block(
        A_ptr, D_ptr, bias_ptr, tl.program_id(1), H, nblk_g, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, ACC_F64)
    u_b, dl_b = u_ptr + b * sub, dl_ptr + b * sdb
    B_b, C_b, z_b = B_ptr + b * sBb + g * sBg, C_ptr + b * sCb + g * sCg, z_ptr + b * szb
    Bt, Ct = _bc_tile(B_ptr, dn, mask2, A, VAR_B), _bc_tile(C_ptr, dn, mask2, A, VAR_C)
    ck_ptrs = ck_ptr + (b * dim + offs_d[:, None]) * nck * N + offs_n[None, :]
    state = b * dim * N + dn
    if HAS_H0:
        h = tl.load(h0_ptr + state, mask=mask2, other=0.0)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)
    if FORK:
        ys_b = ysum_ptr + b * syb
        hp = _seg_fwd(h, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, ys_b, ck_ptrs, offs_d, mask_d, offs_n, mask_n, A, Dv,
                      bias, 0, p, 0, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, syd, syl,
                      False, 0, HAS_Z, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        nck_p = nck - 2 * nck_s
        _seg_fwd(hp, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, ys_b, ck_ptrs + nck_p * N, offs_d, mask_d, offs_n, mask_n,
                 A, Dv, bias, p, s, p, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, syd, syl,
                 False, 2, HAS_Z, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        _seg_fwd(hp, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, ys_b, ck_ptrs + (nck_p + nck_s) * N, offs_d, mask_d, offs_n,
                 mask_n, A, Dv, bias, p + s, s, p + s, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, syd,
                 syl, True, 3, HAS_Z, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        for t in range(0, s):  # gate epilogue
            y = tl.load(ys_b + offs_d * syd + t * syl, mask=mask_d, other=0.0)
            if HAS_Z:
                zz = tl.load(z_b + offs_d * szd + t * szl, mask=mask_d, other=0.0).to(acc_ty)
                y = y * zz * _sigmoid(zz)
            _store_cast(out_ptr + b * sob + offs_d * sod + t * sol, y, mask_d, ROUND_BF16)
    else:
        h = _seg_fwd(h, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, out_ptr + b * sob, ck_ptrs, offs_d, mask_d, offs_n,
                     mask_n, A, Dv, bias, 0, p, 0, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sod, sol,
                     REV, 1, HAS_Z, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        tl.store(last_ptr + state, h, mask=mask2)


@triton.jit
def _seg_bwd(lam, dA, dD, dbias, dBt, dCt, u_ptr, dl_ptr, B_ptr, C_ptr, Bt, Ct, z_ptr, g_ptr, du_ptr, ddl_ptr,
             dz_ptr, dB_ptr, dC_ptr, ck_ptrs, scr_ptrs, slot, offs_d, mask_d, offs_n, mask_n, A, Dv, bias,
             l0, length, goff, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sgd, sgl,
             sxd, sxl, REV: tl.constexpr, HAS_G: tl.constexpr, HAS_Z: tl.constexpr, DZ: tl.constexpr,
             SOFTPLUS: tl.constexpr, VAR_B: tl.constexpr, VAR_C: tl.constexpr, ROUND_BF16: tl.constexpr,
             CHUNK: tl.constexpr):
    """The adjoint of _seg_fwd over one segment.

    lam: in, d loss / d state after the segment; returned: before it. Output
    gradient g = dout (* silu(z)) at token l - goff when HAS_G (else 0). du, ddelta
    (and dz when DZ, from the recomputed C h + D u) are stored at token l through
    the strides sxd, sxl. dB / dC of a time-varying B / C: this program's partial
    (summed over its channels) at row l of dB_ptr / dC_ptr ((L, N) contiguous); of an
    input-independent one: accumulated per (channel, state) in dBt / dCt, like dA.
    dA, dD, dbias, dBt, dCt are accumulated and returned.
    """
    acc_ty = lam.dtype
    mask2 = mask_d[:, None] & mask_n[None, :]
    nchunks = tl.cdiv(length, CHUNK)
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        j0 = c * CHUNK
        n_in = tl.minimum(length - j0, CHUNK)
        # Recompute the chunk's states: slot 0 = checkpoint, slot jj + 1 = after step jj.
        h = tl.load(ck_ptrs + c * N, mask=mask2, other=0.0)
        tl.store(scr_ptrs, h, mask=mask2)
        for jj in range(0, n_in):
            if REV:
                l = l0 + length - 1 - (j0 + jj)
            else:
                l = l0 + j0 + jj
            uu = tl.load(u_ptr + offs_d * sud + l * sul, mask=mask_d, other=0.0).to(acc_ty)
            _, dt = _dt(dl_ptr + offs_d * sdd + l * sdl, mask_d, bias, SOFTPLUS, acc_ty)
            Bl = _bc_at(B_ptr, Bt, offs_n, mask_n, l, sBn, sBl, VAR_B, acc_ty)
            h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bl
            tl.store(scr_ptrs + (jj + 1) * slot, h, mask=mask2)
        tl.debug_barrier()
        # Walk the chunk backwards.
        for kk in range(0, n_in):
            jj = n_in - 1 - kk
            if REV:
                l = l0 + length - 1 - (j0 + jj)
            else:
                l = l0 + j0 + jj
            uu = tl.load(u_ptr + offs_d * sud + l * sul, mask=mask_d, other=0.0).to(acc_ty)
            raw, dt = _dt(dl_ptr + offs_d * sdd + l * sdl, mask_d, bias, SOFTPLUS, acc_ty)
            Bl = _bc_at(B_ptr, Bt, offs_n, mask_n, l, sBn, sBl, VAR_B, acc_ty)
            Cl = _bc_at(C_ptr, Ct, offs_n, mask_n, l, sCn, sCl, VAR_C, acc_ty)
            hc = tl.load(scr_ptrs + (jj + 1) * slot, mask=mask2, other=0.0)
            hp = tl.load(scr_ptrs + jj * slot, mask=mask2, other=0.0)
            e = tl.exp(dt[:, None] * A)
            if HAS_G:
                t = l - goff
                dv = tl.load(g_ptr + offs_d * sgd + t * sgl, mask=mask_d, other=0.0).to(acc_ty)
                if HAS_Z:
                    zz = tl.load(z_ptr + offs_d * szd + t * szl, mask=mask_d, other=0.0).to(acc_ty)
                    sz = _sigmoid(zz)
                    gj = dv * zz * sz
                    if DZ:
                        ypre = tl.sum(hc * Cl, 1) + Dv * uu
                        _store_cast(dz_ptr + offs_d * sxd + l * sxl, dv * ypre * sz * (1.0 + zz * (1.0 - sz)),
                                    mask_d, ROUND_BF16)
                else:
                    gj = dv
            else:
                gj = uu * 0.0
            if VAR_C:
                tl.store(dC_ptr + l * N + offs_n, tl.sum(gj[:, None] * hc, 0), mask=mask_n)
            else:
                dCt += gj[:, None] * hc
            ln = lam + gj[:, None] * Cl                     # d loss / d h_j
            tt = ln * hp * e                                # d loss / d (dt A)
            dtu = dt * uu
            ddt = tl.sum(tt * A + ln * Bl * uu[:, None], 1)
            dA += tt * dt[:, None]
            if VAR_B:
                tl.store(dB_ptr + l * N + offs_n, tl.sum(ln * dtu[:, None], 0), mask=mask_n)
            else:
                dBt += ln * dtu[:, None]
            dus = tl.sum(ln * Bl, 1)
            lam = ln * e                                    # d loss / d h_{j-1}
            _store_cast(du_ptr + offs_d * sxd + l * sxl, dus * dt + gj * Dv, mask_d, ROUND_BF16)
            dD += gj * uu
            if SOFTPLUS:
                draw = ddt * tl.where(raw <= 20.0, _sigmoid(raw), 1.0)
            else:
                draw = ddt
            _store_cast(ddl_ptr + offs_d * sxd + l * sxl, draw, mask_d, ROUND_BF16)
            dbias += draw
        tl.debug_barrier()
    return lam, dA, dD, dbias, dBt, dCt


@triton.jit
def _scan_bwd_kernel(dout_ptr, dlast_ptr, u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, ysum_ptr,
                     ck_ptr, scr_ptr, du_ptr, ddl_ptr, dz_ptr, dBp_ptr, dCp_ptr, dAp_ptr, dDp_ptr, dbp_ptr, dh0_ptr,
                     dim, H, nblk_g, N, L, p, s, nck, nck_s,
                     sub, sud, sul, sdb, sdd, sdl, sBb, sBg, sBn, sBl, sCb, sCg, sCn, sCl, szb, szd, szl,
                     sgb, sgd, sgl, syb, syd, syl, sxb, sxd, sxl, szgb, szgd, szgl,
                     FORK: tl.constexpr, REV: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_DLAST: tl.constexpr, SOFTPLUS: tl.constexpr,
                     VAR_B: tl.constexpr, VAR_C: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ACC_F64: tl.constexpr,
                     ROUND_BF16: tl.constexpr, CHUNK: tl.constexpr):
    """Backward of _scan_fwd_kernel. du, ddelta: strides sx*; dz: strides szg*; partials contiguous.

    dBp / dCp: of a time-varying B / C, this program's (L, N) partial at row ``prog`` of
    (b * G * nblk_g, L, N); of an input-independent one, its channels' rows of (b, dim, N), like dA.
    """
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    prog = b * tl.num_programs(1) + blk
    g, offs_d, mask_d, offs_n, mask_n, mask2, dn, A, Dv, bias = _channel_block(
        A_ptr, D_ptr, bias_ptr, blk, H, nblk_g, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N, ACC_F64)
    u_b, dl_b = u_ptr + b * sub, dl_ptr + b * sdb
    B_b, C_b = B_ptr + b * sBb + g * sBg, C_ptr + b * sCb + g * sCg
    Bt, Ct = _bc_tile(B_ptr, dn, mask2, A, VAR_B), _bc_tile(C_ptr, dn, mask2, A, VAR_C)
    z_b, g_b = z_ptr + b * szb, dout_ptr + b * sgb
    du_b, ddl_b, dz_b = du_ptr + b * sxb, ddl_ptr + b * sxb, dz_ptr + b * szgb
    dB_b, dC_b = dBp_ptr + prog * L * N, dCp_ptr + prog * L * N
    ck_ptrs = ck_ptr + (b * dim + offs_d[:, None]) * nck * N + offs_n[None, :]
    slot = BLOCK_D * BLOCK_N
    scr_ptrs = scr_ptr + prog * (CHUNK + 1) * slot + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + offs_n[None, :]
    state = b * dim * N + dn
    dA = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)
    dBt = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)  # input-independent B / C only
    dCt = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)
    dD = tl.zeros([BLOCK_D], dtype=acc_ty)
    dbias = tl.zeros([BLOCK_D], dtype=acc_ty)
    if FORK:
        if HAS_Z:
            for t in range(0, s):  # dz = dout * ysum * silu'(z)
                dv = tl.load(g_b + offs_d * sgd + t * sgl, mask=mask_d, other=0.0).to(acc_ty)
                y = tl.load(ysum_ptr + b * syb + offs_d * syd + t * syl, mask=mask_d, other=0.0)
                zz = tl.load(z_b + offs_d * szd + t * szl, mask=mask_d, other=0.0).to(acc_ty)
                sz = _sigmoid(zz)
                _store_cast(dz_b + offs_d * szgd + t * szgl, dv * y * sz * (1.0 + zz * (1.0 - sz)), mask_d,
                            ROUND_BF16)
        nck_p = nck - 2 * nck_s
        zero = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)
        lam_r, dA, dD, dbias, dBt, dCt = _seg_bwd(
            zero, dA, dD, dbias, dBt, dCt, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, g_b, du_b, ddl_b, dz_b, dB_b, dC_b,
            ck_ptrs + (nck_p + nck_s) * N, scr_ptrs, slot, offs_d, mask_d, offs_n, mask_n, A, Dv, bias,
            p + s, s, p + s, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sgd, sgl, sxd, sxl,
            True, True, HAS_Z, False, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        lam, dA, dD, dbias, dBt, dCt = _seg_bwd(
            zero, dA, dD, dbias, dBt, dCt, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, g_b, du_b, ddl_b, dz_b, dB_b, dC_b,
            ck_ptrs + nck_p * N, scr_ptrs, slot, offs_d, mask_d, offs_n, mask_n, A, Dv, bias,
            p, s, p, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sgd, sgl, sxd, sxl,
            False, True, HAS_Z, False, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        lam, dA, dD, dbias, dBt, dCt = _seg_bwd(
            lam + lam_r, dA, dD, dbias, dBt, dCt, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, g_b, du_b, ddl_b, dz_b, dB_b,
            dC_b, ck_ptrs, scr_ptrs, slot, offs_d, mask_d, offs_n, mask_n, A, Dv, bias,
            0, p, 0, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sgd, sgl, sxd, sxl,
            False, False, HAS_Z, False, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
    else:
        if HAS_DLAST:
            lam = tl.load(dlast_ptr + state, mask=mask2, other=0.0)
        else:
            lam = tl.zeros([BLOCK_D, BLOCK_N], dtype=acc_ty)
        lam, dA, dD, dbias, dBt, dCt = _seg_bwd(
            lam, dA, dD, dbias, dBt, dCt, u_b, dl_b, B_b, C_b, Bt, Ct, z_b, g_b, du_b, ddl_b, dz_b, dB_b, dC_b,
            ck_ptrs, scr_ptrs, slot, offs_d, mask_d, offs_n, mask_n, A, Dv, bias,
            0, L, 0, N, sud, sul, sdd, sdl, sBn, sBl, sCn, sCl, szd, szl, sgd, sgl, sxd, sxl,
            REV, True, HAS_Z, HAS_Z, SOFTPLUS, VAR_B, VAR_C, ROUND_BF16, CHUNK)
        tl.store(dh0_ptr + state, lam, mask=mask2)
    tl.store(dAp_ptr + state, dA, mask=mask2)
    if not VAR_B:
        tl.store(dBp_ptr + state, dBt, mask=mask2)
    if not VAR_C:
        tl.store(dCp_ptr + state, dCt, mask=mask2)
    tl.store(dDp_ptr + b * dim + offs_d, dD, mask=mask_d)
    tl.store(dbp_ptr + b * dim + offs_d, dbias, mask=mask_d)


# --------------------------------------------------------------------------
# Launch plumbing.

def _blocks(H: int, N: int, dtype: torch.dtype) -> Tuple[int, int]:
    """(BLOCK_D, BLOCK_N) for groups of H channels: few, large blocks under the interpreter (its cost is
    per block op)."""
    bn = triton.next_power_of_2(N)
    cap = 64 if INTERPRET else (16 if dtype == torch.float64 else 32)
    return min(cap, triton.next_power_of_2(H)), bn


def _check_bc(name: str, t: torch.Tensor, u: torch.Tensor, b: int, dim: int, L: int, N: int, fork: bool) -> int:
    """B or C in one of its three layouts (csrc/scan_shapes.h's check_bc); returns its group count,
    0 for an input-independent (dim, N) one."""
    _check_not_complex(name, t)
    if t.dim() == 2:
        operand(name, t, (dim, N), acc_dtype(u.dtype), "u", u)
        return 0
    if t.dim() == 3:
        operand(name, t, (b, L, N) if fork else (b, N, L), u.dtype, "u", u)
        return 1
    if t.dim() != 4:
        layouts = ("(batch, seqlen, dstate), (batch, seqlen, groups, dstate)" if fork
                   else "(batch, dstate, seqlen), (batch, groups, dstate, seqlen)")
        raise ValueError(f"{name} must have shape {layouts} or (dim, dstate), got {tuple(t.shape)}")
    G = t.shape[2 if fork else 1]
    if G == 0 or dim % G:
        raise ValueError(f"{name} has {G} groups, which must divide dim = {dim}")
    operand(name, t, (b, L, G, N) if fork else (b, G, N, L), u.dtype, "u", u)
    return G


def _check_not_complex(name: str, t: torch.Tensor) -> None:
    if t.is_complex():
        raise TypeError(f"{name} is complex ({t.dtype}): complex A / B / C are not supported, only real "
                        "float16 / bfloat16 / float32 / float64")


def _check_scan(u, delta, A, B, C, D, z, delta_bias, fork: bool, prefix_len: int = 0):
    """(batch, dim, L, N, G) of valid operands, channel-major (selective_scan) or token-major (fork_scan);
    G: the group count of the time-varying B / C (1 when neither is grouped)."""
    layout = "(batch, prefix_len + 2 * suffix_len, dim)" if fork else "(batch, dim, seqlen)"
    if u.dim() != 3:
        raise ValueError(f"u must have shape {layout}, got {tuple(u.shape)}")
    if u.dtype not in FLOATING:
        raise TypeError(f"u must be float16, bfloat16, float32 or float64, got {u.dtype}")
    _check_not_complex("A", A)
    if A.dim() != 2:
        raise ValueError(f"A must have shape (dim, dstate), got {tuple(A.shape)}")
    b, L, dim = (u.shape[0], u.shape[1], u.shape[2]) if fork else (u.shape[0], u.shape[2], u.shape[1])
    N = A.shape[1]
    if fork and not (0 <= prefix_len < L and (L - prefix_len) % 2 == 0):
        raise ValueError(f"prefix_len must be in [0, L) with L - prefix_len = 2 * suffix_len; got prefix_len "
                         f"{prefix_len} for L = {L}")
    s = (L - prefix_len) // 2
    if min(b, dim, L, N) == 0:
        raise ValueError(f"empty input: u {tuple(u.shape)}, A {tuple(A.shape)}")
    acc = acc_dtype(u.dtype)
    operand("delta", delta, u.shape, u.dtype, "u", u)
    operand("A", A, (dim, N), acc, "u", u)
    gB, gC = (_check_bc(n, t, u, b, dim, L, N, fork) for n, t in (("B", B), ("C", C)))
    if gB and gC and gB != gC:
        raise ValueError(f"B and C must have the same number of groups, got {gB} (B) and {gC} (C); "
                         "a 3-D B / C is one group")
    operand("D", D, (dim,), acc, "u", u)
    operand("z", z, (b, s, dim) if fork else u.shape, u.dtype, "u", u)
    operand("delta_bias", delta_bias, (dim,), acc, "u", u)
    return b, dim, L, N, max(gB, gC, 1)


def _strides(t: Optional[torch.Tensor], fork: bool) -> Tuple[int, int, int]:
    """(batch, channel, token) strides of a (b, D, L) or token-major (b, L, E) operand; zeros for None."""
    if t is None:
        return 0, 0, 0
    return (t.stride(0), t.stride(2), t.stride(1)) if fork else (t.stride(0), t.stride(1), t.stride(2))


def _bc_operand(t: torch.Tensor, fork: bool) -> Tuple[torch.Tensor, Tuple[int, int, int, int]]:
    """B or C as the kernels read it: (tensor, (batch, group, state, token) strides). Time-varying ones
    in place (a 3-D one is group 0 of stride 0); an input-independent (dim, N) one contiguous, no strides."""
    if t.dim() == 2:
        return t.contiguous(), (0, 0, 0, 0)
    if t.dim() == 3:
        sb, sn, sl = _strides(t, fork)
        return t, (sb, 0, sn, sl)
    st = t.stride()
    return t, ((st[0], st[2], st[3], st[1]) if fork else st)


def _grad_bc(part: torch.Tensor, X: torch.Tensor, bsz: int, G: int, fork: bool) -> torch.Tensor:
    """dB or dC in X's layout and dtype from the backward kernel's partials (fixed-order sums): an
    input-independent X's (b, dim, N) summed over batch; a time-varying X's (b * G * nblk_g, L, N)
    summed over each group's channel blocks."""
    if X.dim() == 2:
        return part.sum(0)
    L, N = part.shape[1:]
    q = part.view(bsz, G, -1, L, N).sum(2)                              # (b, G, L, N)
    if X.dim() == 3:
        q = q[:, 0] if fork else q[:, 0].transpose(1, 2)
    else:
        q = q.permute(0, 2, 1, 3) if fork else q.transpose(2, 3)
    return q.to(X.dtype).contiguous()


def _params(A, D, delta_bias):
    """Contiguous A, D, delta_bias (A stands in for an absent one: never read)."""
    A = A.contiguous()
    return A, (A if D is None else D.contiguous()), (A if delta_bias is None else delta_bias.contiguous())


def _grid(bsz: int, dim: int, G: int, N: int, dtype: torch.dtype) -> Tuple[int, int, int, int]:
    """(H, nblk_g, BLOCK_D, BLOCK_N): channels per group and blocks per group; the grid is
    (bsz, G * nblk_g), a program's channels never straddle two groups."""
    H = dim // G
    bd, bn = _blocks(H, N, dtype)
    return H, triton.cdiv(H, bd), bd, bn


def _launch_fwd(u, delta, A, B, C, D, z, delta_bias, h0, out, ysum, last, ck, fork, reverse, softplus, p, s, G):
    """Runs the forward kernel into out, ysum (fork) or last (selective_scan), ck.

    selective_scan: p = L, s = 0, ysum None; fork_scan: prefix p, suffix s, last unused.
    """
    b, dim, N = out.shape[0], A.shape[0], A.shape[1]
    H, nblk_g, bd, bn = _grid(b, dim, G, N, u.dtype)
    Ac, Dp, bp = _params(A, D, delta_bias)
    (Bk, sB), (Ck, sC) = _bc_operand(B, fork), _bc_operand(C, fork)
    zp = z if z is not None else u
    launch(_scan_fwd_kernel)[(b, G * nblk_g)](
        u, delta, Ac, Bk, Ck, Dp, zp, bp, Ac if h0 is None else h0.contiguous(), out,
        out if ysum is None else ysum, last, ck,
        dim, H, nblk_g, N, p, s, ck.shape[2], num_checkpoints(s) if fork else 0,
        *_strides(u, fork), *_strides(delta, fork), *sB, *sC,
        *_strides(z, fork), *_strides(out, fork), *_strides(ysum, fork),
        FORK=fork, REV=reverse, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_H0=h0 is not None, SOFTPLUS=softplus, VAR_B=B.dim() != 2, VAR_C=C.dim() != 2,
        BLOCK_D=bd, BLOCK_N=bn, ACC_F64=u.dtype == torch.float64,
        ROUND_BF16=INTERPRET and u.dtype == torch.bfloat16, CHUNK=CHECKPOINT_CHUNK,
    )


def _launch_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, ysum, ck, fork, reverse, softplus, p, s, G):
    """Runs the backward kernel; returns (du, ddelta, dA, dB, dC, dD, dz, dbias, dh0) (dz / dh0 may be unused)."""
    bsz, L = u.shape[0], (u.shape[1] if fork else u.shape[2])
    dim, N = A.shape
    acc = acc_dtype(u.dtype)
    H, nblk_g, bd, bn = _grid(bsz, dim, G, N, u.dtype)
    nprog = G * nblk_g
    du = torch.empty_like(u, memory_format=torch.contiguous_format)
    ddelta = torch.empty_like(du)
    dz = (torch.empty((bsz, s, dim) if fork else u.shape, dtype=u.dtype, device=u.device)
          if z is not None else u.new_empty((0,)))
    # dB, dC partials: per program and token (time-varying) or per batch and channel (input-independent).
    dBp, dCp = (u.new_empty((bsz * nprog, L, N) if X.dim() != 2 else (bsz, dim, N), dtype=acc) for X in (B, C))
    dAp = u.new_empty((bsz, dim, N), dtype=acc)
    dDp = u.new_empty((2, bsz, dim), dtype=acc)                # dD, dbias partials per batch
    dh0 = A if fork else u.new_empty((bsz, dim, N), dtype=acc)
    scratch = u.new_empty((bsz * nprog, CHECKPOINT_CHUNK + 1, bd, bn), dtype=acc)
    Ac, Dp, bp = _params(A, D, delta_bias)
    (Bk, sB), (Ck, sC) = _bc_operand(B, fork), _bc_operand(C, fork)
    zp = z if z is not None else u
    launch(_scan_bwd_kernel)[(bsz, nprog)](
        dout, Ac if dlast is None else dlast.contiguous(), u, delta, Ac, Bk, Ck, Dp, zp, bp,
        ysum if ysum is not None else Ac, ck.contiguous(), scratch, du, ddelta, dz if z is not None else du,
        dBp, dCp, dAp, dDp[0], dDp[1], dh0, dim, H, nblk_g, N, L, p, s, ck.shape[2],
        num_checkpoints(s) if fork else 0,
        *_strides(u, fork), *_strides(delta, fork), *sB, *sC, *_strides(z, fork),
        *_strides(dout, fork), *_strides(ysum, fork), *_strides(du, fork),
        *_strides(dz if z is not None else None, fork),
        FORK=fork, REV=reverse, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        HAS_DLAST=dlast is not None, SOFTPLUS=softplus, VAR_B=B.dim() != 2, VAR_C=C.dim() != 2,
        BLOCK_D=bd, BLOCK_N=bn, ACC_F64=u.dtype == torch.float64,
        ROUND_BF16=INTERPRET and u.dtype == torch.bfloat16, CHUNK=CHECKPOINT_CHUNK,
    )
    # Fixed-order reductions: over channel blocks (dB, dC), over batch (dA, dD, dbias).
    dB, dC = _grad_bc(dBp, B, bsz, G, fork), _grad_bc(dCp, C, bsz, G, fork)
    dD = dDp[0].sum(0) if D is not None else u.new_empty((0,), dtype=acc)
    dbias = dDp[1].sum(0) if delta_bias is not None else u.new_empty((0,), dtype=acc)
    return du, ddelta, dAp.sum(0), dB, dC, dD, dz, dbias, dh0


# --------------------------------------------------------------------------
# Ops.

@kernel_op("vlssm::selective_scan_triton")
def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                          initial_state: Optional[torch.Tensor], delta_softplus: bool,
                          reverse: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, dim, L, N, G = _check_scan(u, delta, A, B, C, D, z, delta_bias, fork=False)
    acc = acc_dtype(u.dtype)
    operand("initial_state", initial_state, (b, dim, N), acc, "u", u)
    out = u.new_empty((b, dim, L))
    last = u.new_empty((b, dim, N), dtype=acc)
    ck = u.new_empty((b, dim, num_checkpoints(L), N), dtype=acc)
    _launch_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, out, None, last, ck, False, reverse,
                delta_softplus, L, 0, G)
    return out, last, ck


@kernel_op("vlssm::selective_scan_backward_triton")
def selective_scan_backward_triton(dout: torch.Tensor, dlast_state: Optional[torch.Tensor], u: torch.Tensor,
                                   delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                                   D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                                   delta_bias: Optional[torch.Tensor], initial_state: Optional[torch.Tensor],
                                   checkpoints: torch.Tensor, delta_softplus: bool,
                                   reverse: bool) -> List[torch.Tensor]:
    b, dim, L, N, G = _check_scan(u, delta, A, B, C, D, z, delta_bias, fork=False)
    acc = acc_dtype(u.dtype)
    operand("initial_state", initial_state, (b, dim, N), acc, "u", u)
    operand("dout", dout, u.shape, u.dtype, "u", u)
    operand("checkpoints", checkpoints, (b, dim, num_checkpoints(L), N), acc, "u", u)
    operand("dlast_state", dlast_state, (b, dim, N), acc, "u", u)
    grads = _launch_bwd(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, None, checkpoints, False, reverse,
                        delta_softplus, 0, 0, G)
    dh0 = grads[8] if initial_state is not None else u.new_empty((0,), dtype=acc)
    return list(grads[:8]) + [dh0]


@kernel_op("vlssm::fork_scan_triton")
def fork_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                     D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                     prefix_len: int, delta_softplus: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, dim, L, N, G = _check_scan(u, delta, A, B, C, D, z, delta_bias, fork=True, prefix_len=prefix_len)
    p, s = prefix_len, (L - prefix_len) // 2
    acc = acc_dtype(u.dtype)
    out = u.new_empty((b, s, dim))
    ysum = u.new_empty((b, s, dim), dtype=acc)
    ck = u.new_empty((b, dim, num_checkpoints(p) + 2 * num_checkpoints(s), N), dtype=acc)
    _launch_fwd(u, delta, A, B, C, D, z, delta_bias, None, out, ysum, ysum, ck, True, False, delta_softplus, p, s,
                G)
    return out, ysum, ck


@kernel_op("vlssm::fork_scan_backward_triton")
def fork_scan_backward_triton(dout: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor,
                              B: torch.Tensor, C: torch.Tensor, D: Optional[torch.Tensor], z: Optional[torch.Tensor],
                              delta_bias: Optional[torch.Tensor], ysum: torch.Tensor, checkpoints: torch.Tensor,
                              prefix_len: int, delta_softplus: bool) -> List[torch.Tensor]:
    b, dim, L, N, G = _check_scan(u, delta, A, B, C, D, z, delta_bias, fork=True, prefix_len=prefix_len)
    p, s = prefix_len, (L - prefix_len) // 2
    acc = acc_dtype(u.dtype)
    operand("dout", dout, (b, s, dim), u.dtype, "u", u)
    operand("ysum", ysum, (b, s, dim), acc, "u", u)
    operand("checkpoints", checkpoints, (b, dim, num_checkpoints(p) + 2 * num_checkpoints(s), N), acc, "u", u)
    grads = _launch_bwd(dout, None, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, True, False,
                        delta_softplus, p, s, G)
    return list(grads[:8])


torch.library.register_fake("vlssm::selective_scan_triton")(_scan.selective_scan_fake)
torch.library.register_fake("vlssm::selective_scan_backward_triton")(_scan.selective_scan_fake_backward)
torch.library.register_autograd("vlssm::selective_scan_triton",
                                _scan.make_selective_scan_backward(torch.ops.vlssm.selective_scan_backward_triton),
                                setup_context=_scan.selective_scan_setup_context)
torch.library.register_fake("vlssm::fork_scan_triton")(_scan.fork_scan_fake)
torch.library.register_fake("vlssm::fork_scan_backward_triton")(_scan.fork_scan_fake_backward)
torch.library.register_autograd("vlssm::fork_scan_triton",
                                _scan.make_fork_scan_backward(torch.ops.vlssm.fork_scan_backward_triton),
                                setup_context=_scan.fork_scan_setup_context)
