"""Triton kernels of ``attention_with_probs`` (``backend="triton"``).

Forward, one launch: a program per (batch, block of BLOCK_M queries, block of
BLOCK_DV value columns). Pass 1 walks the key blocks and keeps the running row
max and sum of exp (online softmax); pass 2 walks them again, recomputes the
scores, writes the normalised P into ``probs`` (the dv-block-0 programs only)
and accumulates P @ V. The scores q k^T loop over the head dim in BLOCK_D
chunks (head dims up to 1024 and more); a large dv is split over the third
grid axis. Nothing but ``out`` and ``probs`` is written.

Backward: G = dout v^T (a GEMM) into the dS buffer, then one fused row kernel
``dS = scale * P * (G + dprobs - rowsum(P * (G + dprobs)))`` in place, then the
GEMMs dq = dS k, dk = dS^T q, dv = P^T dout (torch.matmul, float32 for half
inputs); the ds kernel gets scale 1 and the scale multiplies dq and dk.

Operands are read through their strides (stride-0 batch and gradients
included). Scores accumulate in float32 (float64 for float64 inputs). Under
the interpreter (TRITON_INTERPRET=1) bf16 / fp16 tl.dot is wrong, so the
operands are upcast first (UPCAST).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..ops._checks import acc_dtype, operand
from ._op import INTERPRET, kernel_op, launch

__all__ = ["attention_with_probs_triton", "attention_with_probs_backward_triton"]


@triton.jit
def _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, D, sqm, sqd, skn, skd,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            ACC_F64: tl.constexpr, UPCAST: tl.constexpr):
    """q[offs_m] k[offs_n]^T in the accumulation dtype, looping over the head dim."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    s = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_ty)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        qb = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                     mask=mask_m[:, None] & md[None, :], other=0.0)
        kb = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=mask_n[None, :] & md[:, None], other=0.0)
        if UPCAST:
            qb = qb.to(acc_ty)
            kb = kb.to(acc_ty)
        s = tl.dot(qb, kb, s, input_precision="ieee", out_dtype=acc_ty)
    return s


@triton.jit
def _round_bf16(x):
    """float32 -> the float32 nearest bfloat16 (ties to even): the interpreter's
    float32 -> bfloat16 conversion truncates, which doubles the rounding error."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_cast(ptrs, x, mask, ROUND_BF16: tl.constexpr):
    if ROUND_BF16:
        x = _round_bf16(x)
    tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, p_ptr, Lq, Lk, D, DV, scale,
                     sqb, sqm, sqd, skb, skn, skd, svb, svn, svd, sob, som, sod, spb, spm, spn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_DV: tl.constexpr, ACC_F64: tl.constexpr, UPCAST: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    pm = tl.program_id(1)
    pv = tl.program_id(2)
    offs_m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Lq
    offs_v = pv * BLOCK_DV + tl.arange(0, BLOCK_DV)
    mask_v = offs_v < DV
    q_base = q_ptr + b * sqb
    k_base = k_ptr + b * skb
    v_base = v_ptr + b * svb
    p_base = p_ptr + b * spb

    # pass 1: row max and sum of exp (online)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=acc_ty)
    l_i = tl.zeros([BLOCK_M], dtype=acc_ty)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        s = _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, D, sqm, sqd, skn, skd,
                    BLOCK_M, BLOCK_N, BLOCK_D, ACC_F64, UPCAST)
        s = tl.where(mask_n[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    inv_l = 1.0 / l_i

    # pass 2: normalised P -> probs (written by the dv-block-0 programs), P @ V
    mask_p = mask_m & ((offs_m * 0 + pv) == 0)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=acc_ty)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        s = _scores(q_base, k_base, offs_m, offs_n, mask_m, mask_n, D, sqm, sqd, skn, skd,
                    BLOCK_M, BLOCK_N, BLOCK_D, ACC_F64, UPCAST)
        s = tl.where(mask_n[None, :], s * scale, float("-inf"))
        p = tl.exp(s - m_i[:, None]) * inv_l[:, None]
        _store_cast(p_base + offs_m[:, None] * spm + offs_n[None, :] * spn, p,
                    mask_p[:, None] & mask_n[None, :], ROUND_BF16)
        vb = tl.load(v_base + offs_n[:, None] * svn + offs_v[None, :] * svd,
                     mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(p, vb.to(acc_ty), acc, input_precision="ieee", out_dtype=acc_ty)
        else:
            acc = tl.dot(p.to(vb.dtype), vb, acc, input_precision="ieee", out_dtype=acc_ty)
    _store_cast(out_ptr + b * sob + offs_m[:, None] * som + offs_v[None, :] * sod, acc,
                mask_m[:, None] & mask_v[None, :], ROUND_BF16)


@triton.jit
def _attn_ds_kernel(g_ptr, p_ptr, dp_ptr, Lq, Lk, scale, sgb, sgm, sgn, spb, spm, spn, sdb, sdm, sdn,
                    HAS_DP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC_F64: tl.constexpr):
    """In place in G (= dout v^T): dS = scale * P * (G + dP - rowsum(P * (G + dP)))."""
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    b = tl.program_id(0).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < Lq
    g_base = g_ptr + b * sgb
    p_base = p_ptr + b * spb
    c = tl.zeros([BLOCK_M], dtype=acc_ty)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n < Lk)[None, :]
        g_ptrs = g_base + offs_m[:, None] * sgm + offs_n[None, :] * sgn
        t = tl.load(g_ptrs, mask=mask, other=0.0).to(acc_ty)
        if HAS_DP:
            t += tl.load(dp_ptr + b * sdb + offs_m[:, None] * sdm + offs_n[None, :] * sdn,
                         mask=mask, other=0.0).to(acc_ty)
            tl.store(g_ptrs, t, mask=mask)
        p = tl.load(p_base + offs_m[:, None] * spm + offs_n[None, :] * spn, mask=mask, other=0.0).to(acc_ty)
        c += tl.sum(p * t, 1)
    for n0 in range(0, Lk, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_m[:, None] & (offs_n < Lk)[None, :]
        g_ptrs = g_base + offs_m[:, None] * sgm + offs_n[None, :] * sgn
        t = tl.load(g_ptrs, mask=mask, other=0.0).to(acc_ty)
        p = tl.load(p_base + offs_m[:, None] * spm + offs_n[None, :] * spn, mask=mask, other=0.0).to(acc_ty)
        tl.store(g_ptrs, scale * p * (t - c[:, None]), mask=mask)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(int(n))))


def _check(q, k, v, scale):
    """The raw ops' argument checks (like csrc/attention_shapes.h): errors name the argument."""
    for name, t, layout in (("q", q, "(batch, Lq, d)"), ("k", k, "(batch, Lk, d)"), ("v", v, "(batch, Lk, dv)")):
        if t.dim() != 3 or t.numel() == 0:
            raise ValueError(f"{name} must have non-empty shape {layout}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must have a floating dtype like q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device}")
    n, Lq, d = q.shape
    Lk, dv = k.shape[1], v.shape[2]
    if tuple(k.shape) != (n, Lk, d):
        raise ValueError(f"k must have shape (batch, Lk, d) = ({n}, Lk, {d}), got {tuple(k.shape)}")
    if tuple(v.shape) != (n, Lk, dv):
        raise ValueError(f"v must have shape (batch, Lk, dv) = ({n}, {Lk}, dv), got {tuple(v.shape)}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return n, Lq, d, Lk, dv


@kernel_op("vlssm::attention_with_probs_triton")
def attention_with_probs_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    n, Lq, d, Lk, dv = _check(q, k, v, scale)
    out = torch.empty((n, Lq, dv), dtype=q.dtype, device=q.device)
    probs = torch.empty((n, Lq, Lk), dtype=q.dtype, device=q.device)
    if INTERPRET:  # few, large blocks: the interpreter's cost is per block operation
        bm, bn, bd, bdv = _pow2(Lq, 16, 32), _pow2(Lk, 16, 32), _pow2(d, 16, 64), _pow2(dv, 16, 64)
    else:
        big = q.dtype == torch.float64
        bm, bn = (32, 32) if big else (64, 64)
        bd = _pow2(d, 16, 32 if big else 64)
        bdv = _pow2(dv, 16, 64 if big else 128)
    if q.dtype == torch.float64:  # a float scalar argument reaches the kernel as float32: pre-scale q
        q, scale = q * scale, 1.0
    grid = (n, triton.cdiv(Lq, bm), triton.cdiv(dv, bdv))
    launch(_attn_fwd_kernel)[grid](
        q, k, v, out, probs, Lq, Lk, d, dv, scale,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        probs.stride(0), probs.stride(1), probs.stride(2),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, BLOCK_DV=bdv,
        ACC_F64=q.dtype == torch.float64, UPCAST=INTERPRET or q.dtype in (torch.float32, torch.float64),
        ROUND_BF16=INTERPRET and q.dtype == torch.bfloat16,
    )
    return out, probs


@kernel_op("vlssm::attention_with_probs_backward_triton")
def attention_with_probs_backward_triton(dout: torch.Tensor, dprobs: Optional[torch.Tensor], q: torch.Tensor,
                                         k: torch.Tensor, v: torch.Tensor, probs: torch.Tensor,
                                         scale: float) -> List[torch.Tensor]:
    n, Lq, d, Lk, dv = _check(q, k, v, scale)
    for name, t, shape in (("dout", dout, (n, Lq, dv)), ("dprobs", dprobs, (n, Lq, Lk)),
                           ("probs", probs, (n, Lq, Lk))):
        operand(name, t, shape, q.dtype, "q", q)
    acc = acc_dtype(q.dtype)
    dout_c, v_c = dout.to(acc), v.to(acc)
    ds = torch.matmul(dout_c, v_c.transpose(1, 2))  # (n, Lq, Lk), contiguous: G, then dS in place
    bm = _pow2(Lq, 16, 32) if INTERPRET else 16
    bn = _pow2(Lk, 16, 128) if INTERPRET else 128
    dp = dprobs if dprobs is not None else ds
    launch(_attn_ds_kernel)[(n, triton.cdiv(Lq, bm))](
        ds, probs, dp, Lq, Lk, 1.0, ds.stride(0), ds.stride(1), ds.stride(2),
        probs.stride(0), probs.stride(1), probs.stride(2), dp.stride(0), dp.stride(1), dp.stride(2),
        HAS_DP=dprobs is not None, BLOCK_M=bm, BLOCK_N=bn, ACC_F64=q.dtype == torch.float64,
    )
    # scale applied here, in the accumulation dtype (a float scalar argument would be float32)
    dq = (torch.matmul(ds, k.to(acc)) * scale).to(q.dtype)
    dk = (torch.matmul(ds.transpose(1, 2), q.to(acc)) * scale).to(q.dtype)
    dvv = torch.matmul(probs.to(acc).transpose(1, 2), dout_c).to(q.dtype)
    return [dq, dk, dvv]


def _fake(q, k, v, scale):
    n, Lq, _ = q.shape
    return q.new_empty((n, Lq, v.shape[2])), q.new_empty((n, Lq, k.shape[1]))


def _fake_backward(dout, dprobs, q, k, v, probs, scale):
    return [q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)]


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale


def _backward(ctx, dout, dprobs):
    q, k, v, probs = ctx.saved_tensors
    if dout is None:  # only probs was used
        dout = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
    dq, dk, dv = torch.ops.vlssm.attention_with_probs_backward_triton(dout, dprobs, q, k, v, probs, ctx.scale)
    return dq, dk, dv, None


torch.library.register_fake("vlssm::attention_with_probs_triton")(_fake)
torch.library.register_fake("vlssm::attention_with_probs_backward_triton")(_fake_backward)
torch.library.register_autograd("vlssm::attention_with_probs_triton", _backward, setup_context=_setup_context)
