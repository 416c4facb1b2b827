"""Pure-PyTorch references of the ifm family: its ops, and the whole IFM written the plain way.

The ops (the ground truth of their kernels) literally do the naive thing
(materialise the mixed relation map, write the cosine out from its definition)
and work in any floating dtype, float64 included. Half-precision inputs are
computed in float32 and the result is rounded back (relation_aggregate) or
returned in float32 (kcr_loss, like the kernels: the loss is a scalar, rounding
it to 8 bits buys nothing).

:func:`ifm_ref` is the paper's formulas with plain PyTorch ops: the baseline of
the IFM benchmark (``vlssm bench ifm``) and a second implementation for the
tests. It reads a :class:`vlssm.IFM`'s parameters and computes, with no vlssm op,

- attention as three projections, ``softmax(Q K^T / sqrt(d_head))``, ``P V``
  (scores materialised, then the softmax map), maps averaged over heads;
- T^ka, M^ka = SelfAttn(T^hard) once (T^hard has no batch dimension);
- the cross-attention projects every visual token to K and V;
- MLP on the concatenation [T^ka, T^ca] (T^ka expanded over the batch);
- KCR loss with ``F.cosine_similarity``; the mixed map a M^ka + (1 - a) M^ca
  materialised, then multiplied by T^ca.
"""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype

__all__ = ["relation_aggregate_ref", "kcr_loss_ref", "attention_ref", "ifm_ref"]


def relation_aggregate_ref(m_ka: torch.Tensor, m_ca: torch.Tensor, t_ca: torch.Tensor,
                           alpha: Union[torch.Tensor, float]) -> torch.Tensor:
    """``(alpha * m_ka + (1 - alpha) * m_ca) @ t_ca``; m_ka (C, C) or (B, C, C), m_ca (B, C, C),
    t_ca (B, C, d). Returns (B, C, d) in t_ca's dtype."""
    cd = acc_dtype(t_ca.dtype)
    a = alpha.to(cd) if isinstance(alpha, torch.Tensor) else alpha
    mixed = a * m_ka.to(cd) + (1 - a) * m_ca.to(cd)  # (B, C, C), materialised
    return torch.matmul(mixed, t_ca.to(cd)).to(t_ca.dtype)


def kcr_loss_ref(t_ka: torch.Tensor, t_ca: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean(1 - cos(t_ka row, t_ca row))`` over the rows of the broadcast (..., C),
    cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps)). 0-dim, float32 for half inputs."""
    cd = acc_dtype(t_ka.dtype)
    a, b = torch.broadcast_tensors(t_ka.to(cd), t_ca.to(cd))
    dot = (a * b).sum(-1)
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(eps)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(eps)
    return (1 - dot / (na * nb)).mean()


def attention_ref(layer, query: torch.Tensor, context=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Multi-head single-projection attention of a :class:`vlssm.modules.ifm.LabelAttention`'s
    weights: ``(out (..., Lq, d), map (..., Lq, Lk) averaged over heads)``."""
    ctx = query if context is None else context
    h, d = layer.heads, layer.d
    dh = d // h

    def split(t):  # (..., L, d) -> (..., h, L, dh)
        return t.reshape(*t.shape[:-1], h, dh).transpose(-3, -2)

    q = split(F.linear(query, layer.q_proj.weight))
    k = split(F.linear(ctx, layer.k_proj.weight))
    v = split(F.linear(ctx, layer.v_proj.weight))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    probs = torch.softmax(scores, dim=-1)
    out = (probs @ v).transpose(-3, -2)
    return out.reshape(*out.shape[:-2], d), probs.mean(dim=-3)


def ifm_ref(module, x: torch.Tensor, t_hard: torch.Tensor, t_soft: torch.Tensor):
    """``(labels (B, C, d), kcr_loss (), m_ka (C, C), m_ca (B, C, C))`` of ``module`` (a
    :class:`vlssm.IFM`) on x (B, M, d), t_hard (C, d), t_soft (C, d), the plain way."""
    t_ka, m_ka = attention_ref(module.label_attn, t_hard)
    t_soft_ctx, _ = attention_ref(module.cross_attn, t_soft, x)
    t_ca, m_ca = attention_ref(module.context_attn, t_soft_ctx)
    t_ka_b = t_ka.expand_as(t_ca)
    t_ca = t_ca + module.mlp(torch.cat([t_ka_b, t_ca], dim=-1))
    kcr = (1 - F.cosine_similarity(t_ka_b, t_ca, dim=-1)).mean()
    a = torch.sigmoid(module.alpha_logit).to(t_ca.dtype)
    labels = (a * m_ka + (1 - a) * m_ca) @ t_ca
    return labels, kcr, m_ka, m_ca
