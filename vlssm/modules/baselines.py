"""Baseline layers the GPU benchmark compares QMVL with (:mod:`vlssm.bench_gpu`).

Each maps visual tokens ``x`` (B, M, d) and label tokens ``t`` (B, C, d) to
``(x_rf, t_rf)`` like :class:`vlssm.QMVL` and has a ``residual`` flag:

- :class:`SDPASelf`: a pre-norm self-attention block of width d over [X, T].
- :class:`SDPACross`: two pre-norm cross-attention blocks, X <- T and T <- X.
- :class:`MambaSsmQMVL`: the literal QMVL composition on mamba_ssm's ``Mamba``
  (needs mamba_ssm with its CUDA extension), with a vlssm QMVL's weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SDPASelf", "SDPACross", "MambaSsmQMVL"]


class _AttnBlock(nn.Module):
    """Pre-norm attention block: ``q + out_proj(SDPA(Wq n(q), Wk n(kv), Wv n(kv)))``."""

    def __init__(self, d: int, heads: int, device, dtype) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.heads = heads
        self.norm_q = nn.LayerNorm(d, **kw)
        self.norm_kv = nn.LayerNorm(d, **kw)
        self.q = nn.Linear(d, d, **kw)
        self.kv = nn.Linear(d, 2 * d, **kw)
        self.out = nn.Linear(d, d, **kw)

    def forward(self, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        B, Lq, d = q_in.shape
        h = self.heads
        q = self.q(self.norm_q(q_in)).view(B, Lq, h, d // h).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv_in)).view(B, kv_in.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, Lq, d)
        return self.out(o)


class SDPASelf(nn.Module):
    """Self-attention block of width d over [X, T]; returns (x_rf, t_rf)."""

    def __init__(self, d: int, heads: int, device, dtype) -> None:
        super().__init__()
        self.block = _AttnBlock(d, heads, device, dtype)
        self.residual = True

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        h = torch.cat([x, t], 1)
        y = self.block(h, h)
        y = h + y if self.residual else y
        return y[:, : x.shape[1]], y[:, x.shape[1]:]


class SDPACross(nn.Module):
    """Two cross-attention blocks of width d: X <- T and T <- X; returns (x_rf, t_rf)."""

    def __init__(self, d: int, heads: int, device, dtype) -> None:
        super().__init__()
        self.x_from_t = _AttnBlock(d, heads, device, dtype)
        self.t_from_x = _AttnBlock(d, heads, device, dtype)
        self.residual = True

    def forward(self, x: torch.Tensor, t: torch.Tensor):
        yx, yt = self.x_from_t(x, t), self.t_from_x(t, x)
        return (x + yx, t + yt) if self.residual else (yx, yt)


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
