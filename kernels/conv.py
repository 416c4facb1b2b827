"""Triton kernels of ``fork_conv1d`` (``backend="triton"``).

Ops (same schemas and outputs as the compiled ones in csrc/cpu/conv_cpu.cpp)::

    vlssm::fork_conv1d_triton(x_prefix (b, p, E), x_suffix (b, s, E), weight (E, K), bias? (E,))
        -> y (b, p + 2s, E) = [prefix | suffix in [P, S] | suffix in [P, rev S]], token order
    vlssm::fork_conv1d_backward_triton(dy, x_prefix, x_suffix, weight, bias?)
        -> [dx_prefix (b, p, E), dx_suffix (b, s, E), dweight (E, K), dbias (E,) or (0,)]

Tap k (k = K-1: the current token) of output o reads the combined sequence
[P, S] at ``_tap_source(o, k)`` (see csrc/conv_shapes.h): o - (K-1) + k for the
prefix and forward suffix; for reversed-suffix token i the sequence
[P, rev S], i.e. S[i + K-1-k] or, past the suffix's start, P. The reversed
segment is never materialised.

Forward: a program per (batch, block of BLOCK_L output tokens, block of
BLOCK_E channels); the (BLOCK_L, BLOCK_E) accumulator lives in registers
(float32, float64 for float64 inputs) and the K taps are gathered from the
prefix or the suffix through their strides (stride-0 batch broadcast included).

Backward, two launches, no atomics:
1. the forward's grid recomputes the pre-activation, stores
   ``g = dy * silu'(pre)`` (b, p + 2s, E) in the accumulation dtype, and writes
   the program's partial dweight (K, BLOCK_E) and dbias (BLOCK_E) over its
   tokens; torch sums the partials over (batch, token block) in a fixed order.
2. a program per (batch, block of input tokens, block of channels) gathers
   dx[q] = sum_k w[k] (g[o_f] + g[o_r]): each input position is read by tap k of
   at most one output of [P, S] (o_f = q + K-1-k) and one of the reversed
   suffix (solved from the tap rule), so dx is written once, in x's dtype.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..ops import conv as _conv
from ..ops._checks import FLOATING, acc_dtype, operand
from ._op import INTERPRET, kernel_op, launch
from .attention import _store_cast

__all__ = ["fork_conv1d_triton", "fork_conv1d_backward_triton"]


@triton.jit
def _tap_source(o, k, p, s, K):
    """Combined [P, S] position read by tap k of outputs o, -1 for zero padding."""
    q_f = o - (K - 1) + k
    i = o - p - s
    q_r = p + (s - 1 - i) - (K - 1) + k
    src = tl.where(o < p + s, q_f, tl.where(q_r >= p, p + i + (K - 1 - k), q_r))
    return tl.where(src >= 0, src, -1)


@triton.jit
def _gather(xp_b, xs_b, src, mask_l, offs_e, mask_e, p, spl, spe, ssl, sse):
    """x[src] of the combined [P, S] sequence, (BLOCK_L, BLOCK_E); 0 where src < 0."""
    ok = mask_l & (src >= 0)
    in_p = ok & (src < p)
    in_s = ok & (src >= p)
    me = mask_e[None, :]
    xv = tl.load(xp_b + src[:, None] * spl + offs_e[None, :] * spe, mask=in_p[:, None] & me, other=0.0)
    return xv + tl.load(xs_b + (src - p)[:, None] * ssl + offs_e[None, :] * sse, mask=in_s[:, None] & me, other=0.0)


@triton.jit
def _preact(xp_b, xs_b, w_ptr, bias_ptr, offs_o, mask_o, offs_e, mask_e, p, s, K, spl, spe, ssl, sse, swe, swk,
            HAS_BIAS: tl.constexpr, acc_ty: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr):
    acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=acc_ty)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_e, mask=mask_e, other=0.0).to(acc_ty)[None, :]
    for k in range(0, K):
        src = _tap_source(offs_o, k, p, s, K)
        xv = _gather(xp_b, xs_b, src, mask_o, offs_e, mask_e, p, spl, spe, ssl, sse).to(acc_ty)
        wk = tl.load(w_ptr + offs_e * swe + k * swk, mask=mask_e, other=0.0).to(acc_ty)
        acc += wk[None, :] * xv
    return acc


@triton.jit
def _conv_fwd_kernel(xp_ptr, xs_ptr, w_ptr, bias_ptr, y_ptr, g_ptr, dw_ptr, db_ptr, p, s, E, K,
                     spb, spl, spe, ssb, ssl, sse, swe, swk, syb, syl, sye,
                     HAS_BIAS: tl.constexpr, BACKWARD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr,
                     ACC_F64: tl.constexpr, ROUND_BF16: tl.constexpr):
    """Forward: y = silu(pre) (strides sy*). BACKWARD: y is dy; stores g = dy silu'(pre) into g_ptr
    ((b, p+2s, E) contiguous) and this program's dweight (K, E) / dbias (E) partials at dw_ptr / db_ptr."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    Lout = p + 2 * s
    mask_o = offs_o < Lout
    mask_e = offs_e < E
    mask2 = mask_o[:, None] & mask_e[None, :]
    xp_b, xs_b = xp_ptr + b * spb, xs_ptr + b * ssb
    pre = _preact(xp_b, xs_b, w_ptr, bias_ptr, offs_o, mask_o, offs_e, mask_e, p, s, K, spl, spe, ssl, sse, swe,
                  swk, HAS_BIAS, acc_ty, BLOCK_L, BLOCK_E)
    sg = 1.0 / (1.0 + tl.exp(-pre))
    y_ptrs = y_ptr + b * syb + offs_o[:, None] * syl + offs_e[None, :] * sye
    if BACKWARD:
        dy = tl.load(y_ptrs, mask=mask2, other=0.0).to(acc_ty)
        g = dy * sg * (1.0 + pre * (1.0 - sg))
        tl.store(g_ptr + (b * Lout + offs_o[:, None]) * E + offs_e[None, :], g, mask=mask2)
        prog = (b * tl.num_programs(1) + tl.program_id(1)) * K * E
        for k in range(0, K):
            src = _tap_source(offs_o, k, p, s, K)
            xv = _gather(xp_b, xs_b, src, mask_o, offs_e, mask_e, p, spl, spe, ssl, sse).to(acc_ty)
            tl.store(dw_ptr + prog + k * E + offs_e, tl.sum(g * xv, 0), mask=mask_e)
        tl.store(db_ptr + prog // K + offs_e, tl.sum(g, 0), mask=mask_e)
    else:
        _store_cast(y_ptrs, pre * sg, mask2, ROUND_BF16)


@triton.jit
def _conv_dx_kernel(g_ptr, w_ptr, dxp_ptr, dxs_ptr, p, s, E, K, swe, swk,
                    BLOCK_L: tl.constexpr, BLOCK_E: tl.constexpr, ACC_F64: tl.constexpr, ROUND_BF16: tl.constexpr):
    """dx of the combined positions q (contiguous dx_prefix (b, p, E), dx_suffix (b, s, E))."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    Lout = p + 2 * s
    mask_q = q < p + s
    mask_e = offs_e < E
    g_b = g_ptr + b * Lout * E
    acc = tl.zeros([BLOCK_L, BLOCK_E], dtype=acc_ty)
    for k in range(0, K):
        o_f = q + (K - 1 - k)  # the output of [P, S] whose tap k reads q
        # the reversed-suffix token i whose tap k reads q: S[i + K-1-k] or P[q]
        i = tl.where(q >= p, q - p - (K - 1 - k), p + s - 1 - (K - 1) + k - q)
        ok_r = mask_q & (i >= 0) & (i < s)
        ok_f = mask_q & (o_f < p + s)
        me = mask_e[None, :]
        gs = tl.load(g_b + o_f[:, None] * E + offs_e[None, :], mask=ok_f[:, None] & me, other=0.0)
        gs += tl.load(g_b + (p + s + i)[:, None] * E + offs_e[None, :], mask=ok_r[:, None] & me, other=0.0)
        wk = tl.load(w_ptr + offs_e * swe + k * swk, mask=mask_e, other=0.0).to(acc_ty)
        acc += gs * wk[None, :]
    m2 = mask_e[None, :]
    _store_cast(dxp_ptr + (b * p + q[:, None]) * E + offs_e[None, :], acc, (q < p)[:, None] & m2, ROUND_BF16)
    _store_cast(dxs_ptr + (b * s + q[:, None] - p) * E + offs_e[None, :], acc,
                ((q >= p) & mask_q)[:, None] & m2, ROUND_BF16)


def _check(x_prefix, x_suffix, weight, bias, dy=None):
    """The raw ops' argument checks (like csrc/conv_shapes.h): errors name the argument."""
    if x_prefix.dim() != 3:
        raise ValueError(f"x_prefix must have shape (batch, prefix_len, dim), got {tuple(x_prefix.shape)}")
    if x_suffix.dim() != 3:
        raise ValueError(f"x_suffix must have shape (batch, suffix_len, dim), got {tuple(x_suffix.shape)}")
    if x_prefix.dtype not in FLOATING:
        raise TypeError(f"x_prefix must be float16, bfloat16, float32 or float64, got {x_prefix.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (dim, d_conv), got {tuple(weight.shape)}")
    b, p, E = x_prefix.shape
    s, K = x_suffix.shape[1], weight.shape[1]
    if min(b, s, E, K) == 0:
        raise ValueError(f"empty input: x_prefix {tuple(x_prefix.shape)}, x_suffix {tuple(x_suffix.shape)}, "
                         f"weight {tuple(weight.shape)}")
    for name, t, shape in (("x_suffix", x_suffix, (b, s, E)), ("weight", weight, (E, K)), ("bias", bias, (E,)),
                           ("dy", dy, (b, p + 2 * s, E))):
        operand(name, t, shape, x_prefix.dtype, "x_prefix", x_prefix)
    return b, p, s, E, K


def _blocks(L: int, E: int):
    return min(64 if INTERPRET else 32, triton.next_power_of_2(L)), min(64, triton.next_power_of_2(E))


def _launch(x_prefix, x_suffix, weight, bias, y, g, dw, db, backward: bool, bl: int, be: int):
    b, p, E = x_prefix.shape
    s, K = x_suffix.shape[1], weight.shape[1]
    xp = x_prefix if p > 0 else x_suffix  # an empty prefix is never read
    grid = (b, triton.cdiv(p + 2 * s, bl), triton.cdiv(E, be))
    launch(_conv_fwd_kernel)[grid](
        xp, x_suffix, weight, weight if bias is None else bias.contiguous(), y, g, dw, db, p, s, E, K,
        xp.stride(0), xp.stride(1), xp.stride(2), x_suffix.stride(0), x_suffix.stride(1), x_suffix.stride(2),
        weight.stride(0), weight.stride(1), y.stride(0), y.stride(1), y.stride(2),
        HAS_BIAS=bias is not None, BACKWARD=backward, BLOCK_L=bl, BLOCK_E=be,
        ACC_F64=x_prefix.dtype == torch.float64, ROUND_BF16=INTERPRET and x_prefix.dtype == torch.bfloat16,
    )


@kernel_op("vlssm::fork_conv1d_triton")
def fork_conv1d_triton(x_prefix: torch.Tensor, x_suffix: torch.Tensor, weight: torch.Tensor,
                       bias: Optional[torch.Tensor]) -> torch.Tensor:
    b, p, s, E, K = _check(x_prefix, x_suffix, weight, bias)
    y = x_prefix.new_empty((b, p + 2 * s, E))
    bl, be = _blocks(p + 2 * s, E)
    _launch(x_prefix, x_suffix, weight, bias, y, y, y, y, False, bl, be)
    return y


@kernel_op("vlssm::fork_conv1d_backward_triton")
def fork_conv1d_backward_triton(dy: torch.Tensor, x_prefix: torch.Tensor, x_suffix: torch.Tensor,
                                weight: torch.Tensor, bias: Optional[torch.Tensor]) -> List[torch.Tensor]:
    b, p, s, E, K = _check(x_prefix, x_suffix, weight, bias, dy)
    acc = acc_dtype(x_prefix.dtype)
    Lout = p + 2 * s
    bl, be = _blocks(Lout, E)
    nl = triton.cdiv(Lout, bl)
    g = x_prefix.new_empty((b, Lout, E), dtype=acc)
    dw_part = x_prefix.new_empty((b * nl, K, E), dtype=acc)
    db_part = x_prefix.new_empty((b * nl, E), dtype=acc)
    _launch(x_prefix, x_suffix, weight, bias, dy, g, dw_part, db_part, True, bl, be)
    dxp = x_prefix.new_empty((b, p, E))
    dxs = x_prefix.new_empty((b, s, E))
    bq = _blocks(p + s, E)[0]
    launch(_conv_dx_kernel)[(b, triton.cdiv(p + s, bq), triton.cdiv(E, be))](
        g, weight, dxp if p > 0 else dxs, dxs, p, s, E, K, weight.stride(0), weight.stride(1),
        BLOCK_L=bq, BLOCK_E=be, ACC_F64=acc == torch.float64,
        ROUND_BF16=INTERPRET and x_prefix.dtype == torch.bfloat16,
    )
    dw = dw_part.sum(0).t().to(x_prefix.dtype).contiguous()
    db = db_part.sum(0).to(x_prefix.dtype) if bias is not None else x_prefix.new_empty((0,))
    return [dxp, dxs, dw, db]


torch.library.register_fake("vlssm::fork_conv1d_triton")(_conv.fake)
torch.library.register_fake("vlssm::fork_conv1d_backward_triton")(_conv.fake_backward)
torch.library.register_autograd("vlssm::fork_conv1d_triton",
                                _conv.make_backward(torch.ops.vlssm.fork_conv1d_backward_triton),
                                setup_context=_conv.setup_context)
