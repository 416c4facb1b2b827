"""The IFM written the plain way: the paper's formulas with plain PyTorch ops.

This is the baseline of the IFM benchmark (``vlssm bench ifm``) and a
second implementation for the tests: it reads a :class:`vlssm.IFM`'s parameters
and computes, with no vlssm op,

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
from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["attention_ref", "ifm_ref"]


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
