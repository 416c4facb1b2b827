"""Triton kernels of the Interaction and Fusion Module ops (``backend="triton"``).

relation_aggregate: one program per (batch, row block, d block) mixes the
(BM, BK) tile of ``alpha m_ka + (1 - alpha) m_ca`` in registers and feeds it to
``tl.dot`` with the (BK, BN) tile of t_ca: the mixed map never reaches memory.
The same kernel computes ``dt_ca = mixed^T dY`` (the maps read through
transposed strides). The map gradients: one program per (row block, column
block) of the C x C map loops over the batch in order, computes the tile of
``G_b = dY_b t_ca_b^T`` and writes ``dm_ca = (1 - a) G``, ``dm_ka = a G`` (or
``a sum_b G_b``, summed in registers, when m_ka is shared) and its partial of
``dalpha = sum G (m_ka - m_ca)``; the partials are summed by torch in a fixed
order. Deterministic: no atomics.

kcr_loss: one program per block of rows of the broadcast (..., C) (up to 4
leading dims, read through strides, stride 0 for broadcast ones) computes dot
and both squared norms in one pass over d, stores (dot, |a|, |b|) and its
partial of the sum of ``1 - cos``. The backward computes each input's gradient
in the input's own shape: a program owns rows of that input and loops over the
broadcast rows reading them, so a broadcast gradient is summed in registers.

All products run in float32 (float64 for float64 inputs; half inputs are
upcast before ``tl.dot``, which the interpreter needs anyway and which keeps
the half-precision rule of the tests), with ``input_precision="ieee"`` (no TF32).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ..ops import ifm as _ifm
from ..ops._checks import acc_dtype
from ._op import INTERPRET, kernel_op, launch

_MAX_LEAD = 4  # leading dims (..., C) of kcr_loss the kernels address


def _acc(dtype: torch.dtype):
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


# --------------------------------------------------------------------------
# relation_aggregate

@triton.jit
def _mix_matmul_kernel(ka, ca, t, alpha, out, M, K, N,
                       s_kab, s_kam, s_kak, s_cab, s_cam, s_cak, s_tb, s_tk, s_tn, s_ob, s_om, s_on,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr):
    """out[b] = (a ka[b] + (1 - a) ca[b]) @ t[b]; ka/ca (M, K) through strides, t (K, N)."""
    b = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    a = tl.load(alpha).to(ACC)
    acc = tl.zeros((BM, BN), dtype=ACC)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        mmask = (rm[:, None] < M) & (rk[None, :] < K)
        mk = tl.load(ka + b * s_kab + rm[:, None] * s_kam + rk[None, :] * s_kak, mask=mmask, other=0.0).to(ACC)
        mc = tl.load(ca + b * s_cab + rm[:, None] * s_cam + rk[None, :] * s_cak, mask=mmask, other=0.0).to(ACC)
        mix = a * mk + (1 - a) * mc
        tt = tl.load(t + b * s_tb + rk[:, None] * s_tk + rn[None, :] * s_tn,
                     mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0).to(ACC)
        acc += tl.dot(mix, tt, input_precision="ieee", out_dtype=ACC)
    tl.store(out + b * s_ob + rm[:, None] * s_om + rn[None, :] * s_on, acc.to(out.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _relagg_map_grad_kernel(dy, t, ka, ca, alpha, dka, dca, part, B, C, D,
                            s_yb, s_yi, s_yd, s_tb, s_ti, s_td, s_kab, s_kai, s_kaj, s_cab, s_cai, s_caj,
                            SHARED: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                            ACC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    ri = pm * BM + tl.arange(0, BM)
    rj = pn * BN + tl.arange(0, BN)
    mask = (ri[:, None] < C) & (rj[None, :] < C)
    a = tl.load(alpha).to(ACC)
    gsum = tl.zeros((BM, BN), dtype=ACC)
    dal = tl.zeros((BM, BN), dtype=ACC)
    for b in range(0, B):
        g = tl.zeros((BM, BN), dtype=ACC)
        for k0 in range(0, D, BK):
            rk = k0 + tl.arange(0, BK)
            yv = tl.load(dy + b * s_yb + ri[:, None] * s_yi + rk[None, :] * s_yd,
                         mask=(ri[:, None] < C) & (rk[None, :] < D), other=0.0).to(ACC)
            tv = tl.load(t + b * s_tb + rj[None, :] * s_ti + rk[:, None] * s_td,
                         mask=(rj[None, :] < C) & (rk[:, None] < D), other=0.0).to(ACC)
            g += tl.dot(yv, tv, input_precision="ieee", out_dtype=ACC)
        mk = tl.load(ka + b * s_kab + ri[:, None] * s_kai + rj[None, :] * s_kaj, mask=mask, other=0.0).to(ACC)
        mc = tl.load(ca + b * s_cab + ri[:, None] * s_cai + rj[None, :] * s_caj, mask=mask, other=0.0).to(ACC)
        dal += g * (mk - mc)
        out_off = (b * C + ri[:, None]) * C + rj[None, :]
        tl.store(dca + out_off, ((1 - a) * g).to(dca.dtype.element_ty), mask=mask)
        if SHARED:
            gsum += g
        else:
            tl.store(dka + out_off, (a * g).to(dka.dtype.element_ty), mask=mask)
    if SHARED:
        tl.store(dka + ri[:, None] * C + rj[None, :], (a * gsum).to(dka.dtype.element_ty), mask=mask)
    tl.store(part + pm * tl.num_programs(1) + pn, tl.sum(tl.sum(dal, axis=1), axis=0))


def _empty_out(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An output buffer the kernels store into. The interpreter rounds float32 to
    bfloat16 by truncation (GPU Triton rounds to nearest even): there, bfloat16
    outputs are stored in float32 and rounded by torch (:func:`_finish`)."""
    if INTERPRET and dtype == torch.bfloat16:
        return torch.empty(shape, dtype=torch.float32, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _finish(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _blocks(C: int, d: int):
    if INTERPRET:  # fewer, larger blocks: the interpreter pays per loop iteration
        return 32, 32, 32
    return 64, 64, 32


def _map_strides(m: torch.Tensor):
    """(batch, row, col) strides of a (C, C) (shared: batch stride 0) or (B, C, C) map."""
    return (0, m.stride(0), m.stride(1)) if m.dim() == 2 else (m.stride(0), m.stride(1), m.stride(2))


def _mix_matmul(ka, ca, t, alpha, transpose_maps: bool) -> torch.Tensor:
    B, K, N = t.shape
    M = K
    out = _empty_out((B, M, N), t.dtype, t.device)
    BM, BN, BK = _blocks(M, N)
    kab, kam, kak = _map_strides(ka)
    cab, cam, cak = _map_strides(ca)
    if transpose_maps:
        kam, kak, cam, cak = kak, kam, cak, cam
    grid = (B, triton.cdiv(M, BM), triton.cdiv(N, BN))
    launch(_mix_matmul_kernel)[grid](ka, ca, t, alpha, out, M, K, N, kab, kam, kak, cab, cam, cak,
                                     *t.stride(), *out.stride(), BM=BM, BN=BN, BK=BK, ACC=_acc(t.dtype))
    return _finish(out, t.dtype)


@kernel_op("vlssm::relation_aggregate_triton")
def relation_aggregate_triton(m_ka: torch.Tensor, m_ca: torch.Tensor, t_ca: torch.Tensor,
                              alpha: torch.Tensor) -> torch.Tensor:
    _ifm.check_relation_aggregate(m_ka, m_ca, t_ca, alpha)
    return _mix_matmul(m_ka, m_ca, t_ca, alpha, transpose_maps=False)


@kernel_op("vlssm::relation_aggregate_backward_triton")
def relation_aggregate_backward_triton(grad: torch.Tensor, m_ka: torch.Tensor, m_ca: torch.Tensor,
                                       t_ca: torch.Tensor, alpha: torch.Tensor) -> List[torch.Tensor]:
    _ifm.check_relation_aggregate(m_ka, m_ca, t_ca, alpha)
    B, C, D = t_ca.shape
    if tuple(grad.shape) != (B, C, D) or grad.dtype != t_ca.dtype or grad.device != t_ca.device:
        raise ValueError(f"grad must have shape {(B, C, D)}, dtype {t_ca.dtype} and device {t_ca.device}, "
                         f"got {tuple(grad.shape)} {grad.dtype} {grad.device}")
    dt = _mix_matmul(m_ka, m_ca, grad, alpha, transpose_maps=True)
    shared = m_ka.dim() == 2
    dka = _empty_out(m_ka.shape, t_ca.dtype, t_ca.device)
    dca = _empty_out((B, C, C), t_ca.dtype, t_ca.device)
    BM, BN, BK = _blocks(C, D)
    grid = (triton.cdiv(C, BM), triton.cdiv(C, BN))
    part = torch.empty(grid[0] * grid[1], dtype=acc_dtype(t_ca.dtype), device=t_ca.device)
    launch(_relagg_map_grad_kernel)[grid](grad, t_ca, m_ka, m_ca, alpha, dka, dca, part, B, C, D,
                                          *grad.stride(), *t_ca.stride(), *_map_strides(m_ka), *m_ca.stride(),
                                          SHARED=shared, BM=BM, BN=BN, BK=BK, ACC=_acc(t_ca.dtype))
    dalpha = part.sum().to(alpha.dtype)
    return [_finish(dka, t_ca.dtype), _finish(dca, t_ca.dtype), dt, dalpha]


# --------------------------------------------------------------------------
# kcr_loss

@triton.jit
def _kcr_fwd_kernel(x, y, stats, part, eps_ptr, R, D, S1, S2, S3,
                    xs0, xs1, xs2, xs3, xsd, ys0, ys1, ys2, ys3, ysd,
                    BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BR + tl.arange(0, BR)
    rmask = r < R
    c3 = r % S3
    q = r // S3
    c2 = q % S2
    q = q // S2
    c1 = q % S1
    c0 = q // S1
    xo = c0 * xs0 + c1 * xs1 + c2 * xs2 + c3 * xs3
    yo = c0 * ys0 + c1 * ys1 + c2 * ys2 + c3 * ys3
    dot = tl.zeros((BR,), dtype=ACC)
    xx = tl.zeros((BR,), dtype=ACC)
    yy = tl.zeros((BR,), dtype=ACC)
    for k0 in range(0, D, BD):
        k = k0 + tl.arange(0, BD)
        m = rmask[:, None] & (k[None, :] < D)
        xv = tl.load(x + xo[:, None] + k[None, :] * xsd, mask=m, other=0.0).to(ACC)
        yv = tl.load(y + yo[:, None] + k[None, :] * ysd, mask=m, other=0.0).to(ACC)
        dot += tl.sum(xv * yv, axis=1)
        xx += tl.sum(xv * xv, axis=1)
        yy += tl.sum(yv * yv, axis=1)
    nx = tl.sqrt(xx)
    ny = tl.sqrt(yy)
    tl.store(stats + r * 3, dot, mask=rmask)
    tl.store(stats + r * 3 + 1, nx, mask=rmask)
    tl.store(stats + r * 3 + 2, ny, mask=rmask)
    e = tl.load(eps_ptr)
    cos = dot / (tl.maximum(nx, e) * tl.maximum(ny, e))
    tl.store(part + pid, tl.sum(tl.where(rmask, 1 - cos, 0.0), axis=0))


@triton.jit
def _kcr_bwd_kernel(x, y, stats, out, g_ptr, eps_ptr, Rt, Nr, D, O1, O2, O3, Q1, Q2, Q3,
                    xs0, xs1, xs2, xs3, xsd, ys0, ys1, ys2, ys3, ysd, ss0, ss1, ss2, ss3,
                    CX: tl.constexpr, CY: tl.constexpr, BR: tl.constexpr, BD: tl.constexpr, ACC: tl.constexpr):
    """dX rows [pid BR, ...) of X's own (padded) shape (O0, O1, O2, O3); the broadcast
    rows reading a row of X differ in the reduced coordinates (Q0, Q1, Q2, Q3)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = r < Rt
    o3 = r % O3
    q = r // O3
    o2 = q % O2
    q = q // O2
    o1 = q % O1
    o0 = q // O1
    g = tl.load(g_ptr).to(ACC)
    e = tl.load(eps_ptr)
    for k0 in range(0, D, BD):
        k = k0 + tl.arange(0, BD)
        m = rmask[:, None] & (k[None, :] < D)
        acc = tl.zeros((BR, BD), dtype=ACC)
        for qi in range(0, Nr):
            q3 = qi % Q3
            qq = qi // Q3
            q2 = qq % Q2
            qq = qq // Q2
            q1 = qq % Q1
            q0 = qq // Q1
            c0 = o0 + q0
            c1 = o1 + q1
            c2 = o2 + q2
            c3 = o3 + q3
            so = (c0 * ss0 + c1 * ss1 + c2 * ss2 + c3 * ss3) * 3
            dot = tl.load(stats + so, mask=rmask, other=0.0)
            nx = tl.load(stats + so + CX, mask=rmask, other=1.0)
            ny = tl.load(stats + so + CY, mask=rmask, other=1.0)
            mx = tl.maximum(nx, e)
            my = tl.maximum(ny, e)
            inv = 1.0 / (mx * my)
            cos = dot * inv
            ky = -g * inv
            active = (nx >= e) & (nx > 0)  # |x| is clamped to eps below: no gradient through it
            kx = tl.where(active, g * cos / (mx * tl.where(active, nx, 1.0)), 0.0)
            xo = c0 * xs0 + c1 * xs1 + c2 * xs2 + c3 * xs3
            yo = c0 * ys0 + c1 * ys1 + c2 * ys2 + c3 * ys3
            xv = tl.load(x + xo[:, None] + k[None, :] * xsd, mask=m, other=0.0).to(ACC)
            yv = tl.load(y + yo[:, None] + k[None, :] * ysd, mask=m, other=0.0).to(ACC)
            acc += ky[:, None] * yv + kx[:, None] * xv
        tl.store(out + r[:, None] * D + k[None, :], acc.to(out.dtype.element_ty), mask=m)


def _kcr_layout(t_ka, t_ca):
    rows = _ifm.kcr_rows(t_ka.shape, t_ca.shape)
    if len(rows) > _MAX_LEAD:
        raise ValueError(f"backend='triton' kcr_loss supports at most {_MAX_LEAD} leading dims (..., labels); "
                         f"t_ka {tuple(t_ka.shape)}, t_ca {tuple(t_ca.shape)}")
    pad = (1,) * (_MAX_LEAD - len(rows))
    full = (*rows, t_ka.shape[-1])
    a = t_ka.expand(full)
    b = t_ca.expand(full)

    def strides(t):
        return (0,) * len(pad) + tuple(t.stride()[:-1]), t.stride(-1)

    return pad + tuple(rows), rows, a, b, strides(a), strides(b)


def _blocks_rows(d: int):
    return (16, 32) if INTERPRET else (16, 128)


@kernel_op("vlssm::kcr_loss_triton")
def kcr_loss_triton(t_ka: torch.Tensor, t_ca: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    _ifm.check_kcr_loss(t_ka, t_ca, eps)
    S, rows, a, b, (sa, sad), (sb, sbd) = _kcr_layout(t_ka, t_ca)
    acc = acc_dtype(t_ka.dtype)
    R = 1
    for n in rows:
        R *= n
    D = t_ka.shape[-1]
    stats = torch.empty((*rows, 3), dtype=acc, device=t_ka.device)
    BR, BD = _blocks_rows(D)
    nprog = triton.cdiv(R, BR)
    part = torch.empty(nprog, dtype=acc, device=t_ka.device)
    eps_t = torch.full((1,), eps, dtype=acc, device=t_ka.device)
    launch(_kcr_fwd_kernel)[(nprog,)](a, b, stats, part, eps_t, R, D, S[1], S[2], S[3], *sa, sad, *sb, sbd,
                                      BR=BR, BD=BD, ACC=_acc(t_ka.dtype))
    return part.sum() / R, stats


def _kcr_grad_of(X, Xe, Ye, sx, sy, stats, S, g, eps_t, first: bool) -> torch.Tensor:
    lead = tuple(X.shape[:-1])
    own = (1,) * (len(S) - len(lead)) + lead
    red = tuple(s if o == 1 else 1 for s, o in zip(S, own))
    Rt, Nr = 1, 1
    for o, q in zip(own, red):
        Rt *= o
        Nr *= q
    ss = [0] * len(S)
    acc_s = 1
    for i in range(len(S) - 1, -1, -1):
        ss[i] = acc_s
        acc_s *= S[i]
    D = X.shape[-1]
    out = _empty_out(X.shape, X.dtype, X.device)
    BR, BD = _blocks_rows(D)
    launch(_kcr_bwd_kernel)[(triton.cdiv(Rt, BR),)](
        Xe, Ye, stats, out, g, eps_t, Rt, Nr, D, own[1], own[2], own[3], red[1], red[2], red[3],
        *sx[0], sx[1], *sy[0], sy[1], *ss, CX=1 if first else 2, CY=2 if first else 1, BR=BR, BD=BD,
        ACC=_acc(X.dtype))
    return _finish(out, X.dtype)


@kernel_op("vlssm::kcr_loss_backward_triton")
def kcr_loss_backward_triton(grad: torch.Tensor, t_ka: torch.Tensor, t_ca: torch.Tensor, stats: torch.Tensor,
                             eps: float) -> List[torch.Tensor]:
    _ifm.check_kcr_loss(t_ka, t_ca, eps)
    S, rows, a, b, sa, sb = _kcr_layout(t_ka, t_ca)
    acc = acc_dtype(t_ka.dtype)
    if tuple(stats.shape) != (*rows, 3) or stats.dtype != acc or stats.device != t_ka.device:
        raise ValueError(f"stats must have shape {(*rows, 3)}, dtype {acc} and device {t_ka.device}, "
                         f"got {tuple(stats.shape)} {stats.dtype} {stats.device}")
    if grad.dim() != 0:
        raise ValueError(f"grad must be a 0-dim tensor, got shape {tuple(grad.shape)}")
    R = 1
    for n in rows:
        R *= n
    stats = stats.contiguous()
    g = (grad.to(acc) / R).reshape(1)
    eps_t = torch.full((1,), eps, dtype=acc, device=t_ka.device)
    dka = _kcr_grad_of(t_ka, a, b, sa, sb, stats, S, g, eps_t, True)
    dca = _kcr_grad_of(t_ca, b, a, sb, sa, stats, S, g, eps_t, False)
    return [dka, dca]


# --------------------------------------------------------------------------
# Fake and autograd registrations (shared with the compiled ops).

torch.library.register_fake("vlssm::relation_aggregate_triton")(_ifm.fake_relation_aggregate)
torch.library.register_fake("vlssm::relation_aggregate_backward_triton")(_ifm.fake_relation_aggregate_backward)
torch.library.register_fake("vlssm::kcr_loss_triton")(_ifm.fake_kcr_loss)
torch.library.register_fake("vlssm::kcr_loss_backward_triton")(_ifm.fake_kcr_loss_backward)
torch.library.register_autograd(
    "vlssm::relation_aggregate_triton",
    _ifm.relagg_backward_with(lambda *a: torch.ops.vlssm.relation_aggregate_backward_triton(*a)),
    setup_context=_ifm.relagg_setup_context)
torch.library.register_autograd(
    "vlssm::kcr_loss_triton", _ifm.kcr_backward_with(lambda *a: torch.ops.vlssm.kcr_loss_backward_triton(*a)),
    setup_context=_ifm.kcr_setup_context)
