"""Pure-PyTorch reference of ``attention_with_probs``: the ground truth.

It literally does the naive thing: matmul, scale, softmax, matmul, each a
separate op materialising its (..., Lq, Lk) result. Works in any floating
dtype, float64 included; half-precision inputs are computed in float32 and the
results rounded back (like the kernels).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._dtypes import acc_dtype

__all__ = ["attention_with_probs_ref"]


def attention_with_probs_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``probs = softmax(scale * q k^T, -1)``, ``out = probs v``; returns ``(out, probs)``.

    q (..., Lq, d), k (..., Lk, d), v (..., Lk, dv), leading dims broadcast
    (torch.matmul rules); scale defaults to ``1 / sqrt(d)``. Differentiable
    through both outputs by plain autograd.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    dtype = q.dtype
    cd = acc_dtype(dtype)
    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    scores = torch.matmul(qc, kc.transpose(-2, -1))
    scores = scores * scale
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, vc)
    return out.to(dtype), probs.to(dtype)
