"""Pure-PyTorch references of the Interaction and Fusion Module ops: the ground truth.

Each function literally does the naive thing (materialise the mixed relation
map, write the cosine out from its definition) and works in any floating
dtype, float64 included. Half-precision inputs are computed in float32 and the
result is rounded back (relation_aggregate) or returned in float32 (kcr_loss,
like the kernels: the loss is a scalar, rounding it to 8 bits buys nothing).
"""
from __future__ import annotations

from typing import Union

import torch

__all__ = ["relation_aggregate_ref", "kcr_loss_ref"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def relation_aggregate_ref(m_ka: torch.Tensor, m_ca: torch.Tensor, t_ca: torch.Tensor,
                           alpha: Union[torch.Tensor, float]) -> torch.Tensor:
    """``(alpha * m_ka + (1 - alpha) * m_ca) @ t_ca``; m_ka (C, C) or (B, C, C), m_ca (B, C, C),
    t_ca (B, C, d). Returns (B, C, d) in t_ca's dtype."""
    cd = _compute_dtype(t_ca.dtype)
    a = alpha.to(cd) if isinstance(alpha, torch.Tensor) else alpha
    mixed = a * m_ka.to(cd) + (1 - a) * m_ca.to(cd)  # (B, C, C), materialised
    return torch.matmul(mixed, t_ca.to(cd)).to(t_ca.dtype)


def kcr_loss_ref(t_ka: torch.Tensor, t_ca: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean(1 - cos(t_ka row, t_ca row))`` over the rows of the broadcast (..., C),
    cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps)). 0-dim, float32 for half inputs."""
    cd = _compute_dtype(t_ka.dtype)
    a, b = torch.broadcast_tensors(t_ka.to(cd), t_ca.to(cd))
    dot = (a * b).sum(-1)
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(eps)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(eps)
    return (1 - dot / (na * nb)).mean()
