"""Helpers of the module tests (tests/modules): the mamba_ssm state_dict layout, parameter
perturbation, forward + gradients in one call, and a literal Mamba block and QMVL.

``literal_*`` is an implementation of the Mamba block and of QMVL written independently of vlssm's
ops and modules (plain tensor algebra, F.conv1d and a Python loop over time), reading only the
parameters of a vlssm module. It is the yardstick that lets the module tests fail when an op is
wrong. The generic helpers (:func:`~vlssm.testing.gen`, :func:`~vlssm.testing.randn`,
:func:`~vlssm.testing.rel_err`, :data:`~vlssm.testing.RTOL`, ...) live in :mod:`vlssm.testing`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import randn

#: mamba_ssm.Mamba's state_dict: key -> shape as a function of (d, E, N, R, K).
MAMBA_SSM_KEYS = (
    ("A_log", lambda d, E, N, R, K: (E, N)),
    ("D", lambda d, E, N, R, K: (E,)),
    ("in_proj.weight", lambda d, E, N, R, K: (2 * E, d)),
    ("conv1d.weight", lambda d, E, N, R, K: (E, 1, K)),
    ("conv1d.bias", lambda d, E, N, R, K: (E,)),
    ("x_proj.weight", lambda d, E, N, R, K: (R + 2 * N, E)),
    ("dt_proj.weight", lambda d, E, N, R, K: (E, R)),
    ("dt_proj.bias", lambda d, E, N, R, K: (E,)),
    ("out_proj.weight", lambda d, E, N, R, K: (d, E)),
)


def mamba_ssm_state_shapes(d: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> Dict[str, tuple]:
    """The hand-listed mamba_ssm.Mamba state_dict keys and shapes for these sizes."""
    E = expand * d
    R = -(-d // 16)
    return {k: f(d, E, d_state, R, d_conv) for k, f in MAMBA_SSM_KEYS}


def randomize_(module: torch.nn.Module, g: torch.Generator, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter so no gradient path hides behind an init constant (D = 1, ...)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * randn(g, *p.shape, dtype=p.dtype))
    return module


def forward_and_grads(fn, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                      cotangents: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Outputs of ``fn(*inputs)`` then d<outputs, cotangents>/d(inputs, params)."""
    inputs = [i.detach().requires_grad_(True) for i in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [*inputs, *params])
    return [o.detach() for o in outs] + list(grads)


# --------------------------------------------------------------------------
# Independent literal implementation.

def literal_layer_norm(norm: torch.nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def literal_mamba(m, h: torch.Tensor) -> torch.Tensor:
    """mamba_ssm Mamba (slow path) on (B, L, d) from ``m``'s parameters, with a time loop."""
    Bsz, L, _ = h.shape
    E, N, R, K = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    xz = h @ m.in_proj.weight.T
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias
    x, z = xz[..., :E], xz[..., E:]  # (B, L, E)
    xc = F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=K - 1, groups=E)[..., :L]
    xc = xc * torch.sigmoid(xc)  # (B, E, L)
    u = xc.transpose(1, 2)  # (B, L, E)
    x_dbl = u @ m.x_proj.weight.T
    dt_low, Bm, Cm = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    v = dt_low @ m.dt_proj.weight.T + m.dt_proj.bias
    dt = torch.where(v > 20, v, torch.log1p(torch.exp(v.clamp(max=20))))  # softplus, threshold 20
    A = -torch.exp(m.A_log)
    state = h.new_zeros(Bsz, E, N)
    ys = []
    for l in range(L):
        dA = torch.exp(dt[:, l, :, None] * A)
        state = dA * state + dt[:, l, :, None] * Bm[:, l, None, :] * u[:, l, :, None]
        ys.append((state * Cm[:, l, None, :]).sum(-1) + m.D * u[:, l])
    y = torch.stack(ys, 1) * (z * torch.sigmoid(z))
    out = y @ m.out_proj.weight.T
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias
    return out


def literal_block(block, h: torch.Tensor) -> torch.Tensor:
    return literal_mamba(block.mixer, literal_layer_norm(block.norm, h))


def literal_qmvl(q, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """docs/design.md section 1, literally: four sequences, cat and flip."""
    B, M, d = x.shape
    C = t.shape[-2]
    t3 = t if t.dim() == 3 else t.unsqueeze(0).repeat(B, 1, 1)
    lb, vb = q.label_block, q.visual_block
    y1 = literal_block(lb, torch.cat([x, t3], 1))[:, M:]
    y2 = literal_block(lb, torch.cat([x, t3.flip(1)], 1))[:, M:].flip(1)
    y3 = literal_block(vb, torch.cat([t3, x], 1))[:, C:]
    y4 = literal_block(vb, torch.cat([t3, x.flip(1)], 1))[:, C:].flip(1)
    if q.residual:
        return x + y3 + y4, t + y1 + y2
    return y3 + y4, y1 + y2
