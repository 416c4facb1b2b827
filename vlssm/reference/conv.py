"""Pure-PyTorch reference of the conv family (``fork_conv1d``): the ground truth.

It literally does the naive thing: concatenate, flip, ``F.conv1d`` each
sequence, SiLU, flip back. Works in any floating dtype, float64 included.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["fork_conv1d_ref"]


def fork_conv1d_ref(
    x_prefix: torch.Tensor,
    x_suffix: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference fork conv: depthwise causal conv1d + SiLU of [P, S] and [P, rev S].

    Token-major shapes: x_prefix (b, p, E), x_suffix (b, s, E), weight (E, K),
    bias (E,). Returns (b, p + 2s, E): the prefix segment, the suffix as seen in
    [P, S], and the suffix as seen in [P, rev S] stored back in token order.
    """
    p, E = x_prefix.shape[1], x_prefix.shape[2]
    K = weight.shape[1]

    def conv(seq):  # (b, L, E) -> (b, L, E)
        L = seq.shape[1]
        y = F.conv1d(seq.transpose(1, 2), weight[:, None, :], bias, padding=K - 1, groups=E)
        return F.silu(y[..., :L]).transpose(1, 2)

    fwd = conv(torch.cat([x_prefix, x_suffix], dim=1))
    rev = conv(torch.cat([x_prefix, x_suffix.flip(1)], dim=1))
    return torch.cat([fwd[:, :p], fwd[:, p:], rev[:, p:].flip(1)], dim=1)
