"""Baseline layers the benchmarks compare QMVL with (:mod:`vlssm.bench.gpu`, :mod:`vlssm.bench.attention`).

Each maps visual tokens ``x`` (B, M, d) and label tokens ``t`` (B, C, d) to
``(x_rf, t_rf)`` (shapes (B, M, d) and (B, C, d)) like :class:`vlssm.QMVL` and
has a ``residual`` flag (False: return only what the layer adds to its inputs):

- :class:`SDPASelf`: a pre-norm self-attention layer of width d over [X, T]
  (attention only: LayerNorms, projections, SDPA, out projection; no MLP).
- :class:`SDPACross`: two pre-norm cross-attention layers, X <- T and T <- X.
- :class:`SDPASelfBlock`: the standard pre-norm transformer block (Vaswani et
  al.) over [X, T]: self-attention + residual, then an MLP of ratio 4 (GELU)
  + residual; MVLR Table 6's "Self-Attn." structure.
- :class:`SDPACrossBlock`: two such blocks with cross-attention, X <- T and
  T <- X, each followed by its own MLP; Table 6's "Cross-Attn.".
- :class:`MambaSsmQMVL`: the literal QMVL composition on mamba_ssm's ``Mamba``
  (needs mamba_ssm with its CUDA extension), with a vlssm QMVL's weights.

All attention goes through ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SDPASelf", "SDPACross", "SDPASelfBlock", "SDPACrossBlock", "MambaSsmQMVL", "default_heads"]


def default_heads(d: int) -> int:
    """Attention heads of width ``d`` when none are given: ``d // 64`` (head width 64), at least 1."""
    return max(1, d // 64)


def _check_heads(d: int, heads: int) -> None:
    if heads < 1 or d % heads:
        raise ValueError(f"heads must be a positive divisor of d = {d}, got {heads}")


class _AttnBlock(nn.Module):
    """Pre-norm multi-head attention: ``out_proj(SDPA(Wq n_q(q), Wk n_kv(kv), Wv n_kv(kv)))`` (no residual).

    ``q_in`` (B, Lq, d) attends to ``kv_in`` (B, Lk, d); returns (B, Lq, d). With ``shared_norm``
    (self-attention, ``kv_in`` omitted) one LayerNorm ``norm_q`` normalises the input once for q, k
    and v; otherwise ``norm_q`` and ``norm_kv`` normalise ``q_in`` and ``kv_in``.
    """

    def __init__(self, d: int, heads: int, device=None, dtype=None, shared_norm: bool = False) -> None:
        super().__init__()
        _check_heads(d, heads)
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.norm_q = nn.LayerNorm(d, **kw)
        self.norm_kv = None if shared_norm else nn.LayerNorm(d, **kw)
        self.q = nn.Linear(d, d, **kw)
        self.kv = nn.Linear(d, 2 * d, **kw)
        self.out = nn.Linear(d, d, **kw)

    def forward(self, q_in: torch.Tensor, kv_in: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, Lq, d = q_in.shape
        h = self.heads
        nq = self.norm_q(q_in)
        if kv_in is None:
            kv_in = q_in
            nkv = nq if self.norm_kv is None else self.norm_kv(q_in)
        else:
            nkv = (self.norm_q if self.norm_kv is None else self.norm_kv)(kv_in)
        q = self.q(nq).view(B, Lq, h, d // h).transpose(1, 2)
        k, v = self.kv(nkv).view(B, kv_in.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Lq, d)
        return self.out(o)


class _MLP(nn.Module):
    """Pre-norm MLP: ``fc2(GELU(fc1(LayerNorm(x))))``, hidden width ``mlp_ratio * d``; (B, L, d) -> (B, L, d)."""

    def __init__(self, d: int, mlp_ratio: int = 4, device=None, dtype=None) -> None:
        super().__init__()
        if mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be >= 1, got {mlp_ratio}")
        kw = dict(device=device, dtype=dtype)
        self.norm = nn.LayerNorm(d, **kw)
        self.fc1 = nn.Linear(d, mlp_ratio * d, **kw)
        self.fc2 = nn.Linear(mlp_ratio * d, d, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class SDPASelf(nn.Module):
    """Self-attention layer of width d over [X, T] (attention only, no MLP); returns (x_rf, t_rf)."""

    def __init__(self, d: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.block = _AttnBlock(d, heads, device, dtype)
        self.residual = True

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        h = torch.cat([x, t], 1)
        y = self.block(h, h)
        y = h + y if self.residual else y
        return y[:, : x.shape[1]], y[:, x.shape[1]:]


class SDPACross(nn.Module):
    """Two cross-attention layers of width d: X <- T and T <- X (attention only); returns (x_rf, t_rf)."""

    def __init__(self, d: int, heads: int, device=None, dtype=None) -> None:
        super().__init__()
        self.x_from_t = _AttnBlock(d, heads, device, dtype)
        self.t_from_x = _AttnBlock(d, heads, device, dtype)
        self.residual = True

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        yx, yt = self.x_from_t(x, t), self.t_from_x(t, x)
        return (x + yx, t + yt) if self.residual else (yx, yt)


class SDPASelfBlock(nn.Module):
    """The standard pre-norm transformer block (Vaswani et al.) of width d over ``z = [X, T]``.

    ``h = z + Attn(LN1(z))`` (multi-head self-attention, ``heads`` of width d / heads, one
    LayerNorm for q, k and v), ``y = h + MLP(LN2(h))`` (hidden ``mlp_ratio * d``, GELU); returns
    ``(y[:, :M], y[:, M:])`` of shapes (B, M, d) and (B, C, d). With ``residual=False`` it returns
    what the block adds to its input, ``y - z`` (the inner residual into the MLP stays).

    Args:
        d: token width. heads: attention heads (default :func:`default_heads`: d // 64).
        device, dtype: factory arguments of the parameters.
        mlp_ratio: MLP hidden width / d (default 4). residual: see above (default True).
    """

    def __init__(self, d: int, heads: Optional[int] = None, device=None, dtype=None, *, mlp_ratio: int = 4,
                 residual: bool = True) -> None:
        super().__init__()
        heads = default_heads(d) if heads is None else heads
        self.attn = _AttnBlock(d, heads, device, dtype, shared_norm=True)
        self.mlp = _MLP(d, mlp_ratio, device, dtype)
        self.residual = bool(residual)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([x, t], 1)
        a = self.attn(z)
        h = z + a
        y = h + self.mlp(h) if self.residual else a + self.mlp(h)
        return y[:, : x.shape[1]], y[:, x.shape[1]:]


class SDPACrossBlock(nn.Module):
    """Two pre-norm cross-attention transformer blocks of width d: X <- T and T <- X.

    ``hx = x + CrossAttn(LN(x), LN(t))``, ``x_rf = hx + MLP_x(LN(hx))`` and, from the same inputs,
    ``ht = t + CrossAttn(LN(t), LN(x))``, ``t_rf = ht + MLP_t(LN(ht))``; returns (x_rf, t_rf) of
    shapes (B, M, d) and (B, C, d). With ``residual=False`` it returns ``(x_rf - x, t_rf - t)``.
    Arguments as :class:`SDPASelfBlock`.
    """

    def __init__(self, d: int, heads: Optional[int] = None, device=None, dtype=None, *, mlp_ratio: int = 4,
                 residual: bool = True) -> None:
        super().__init__()
        heads = default_heads(d) if heads is None else heads
        self.x_from_t = _AttnBlock(d, heads, device, dtype)
        self.t_from_x = _AttnBlock(d, heads, device, dtype)
        self.mlp_x = _MLP(d, mlp_ratio, device, dtype)
        self.mlp_t = _MLP(d, mlp_ratio, device, dtype)
        self.residual = bool(residual)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ax, at = self.x_from_t(x, t), self.t_from_x(t, x)
        hx, ht = x + ax, t + at
        if self.residual:
            return hx + self.mlp_x(hx), ht + self.mlp_t(ht)
        return ax + self.mlp_x(hx), at + self.mlp_t(ht)


class MambaSsmQMVL(nn.Module):
    """The literal QMVL composition on mamba_ssm's ``Mamba`` (four sequences, flips and cats).

    Built from a vlssm :class:`~vlssm.QMVL` so both hold the same weights.
    """

    def __init__(self, qmvl) -> None:
        super().__init__()
        from mamba_ssm.modules.mamba_simple import Mamba as SsmMamba

        self.residual = True
        self.blocks = nn.ModuleDict()
        for name in ("label_block", "visual_block"):
            src = getattr(qmvl, name)
            mixer = src.mixer
            p = next(src.parameters())
            m = SsmMamba(mixer.d_model, d_state=mixer.d_state, d_conv=mixer.d_conv, expand=mixer.expand,
                         dt_rank=mixer.dt_rank, device=p.device, dtype=p.dtype)
            m.load_state_dict(mixer.state_dict())
            norm = nn.LayerNorm(src.norm.normalized_shape, eps=src.norm.eps, device=p.device, dtype=p.dtype)
            norm.load_state_dict(src.norm.state_dict())
            self.blocks[name] = nn.Sequential(norm, m)

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        M, C = x.shape[1], t.shape[1]
        lab, vis = self.blocks["label_block"], self.blocks["visual_block"]
        y1 = lab(torch.cat([x, t], 1))[:, M:]
        y2 = lab(torch.cat([x, t.flip(1)], 1))[:, M:].flip(1)
        y3 = vis(torch.cat([t, x], 1))[:, C:]
        y4 = vis(torch.cat([t, x.flip(1)], 1))[:, C:].flip(1)
        x_rf, t_rf = y3 + y4, y1 + y2
        return (x + x_rf, t + t_rf) if self.residual else (x_rf, t_rf)
