"""The ops' input generators (seeded, realistic magnitudes, never zeros) and literal implementations.

``literal_*`` implement the ops independently of vlssm (plain Python loops over time / taps, explicit
cat and reverse order, float64); they check the references, which in turn are the ground truth of
the compiled kernels (docs/design.md section 4).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype
from . import gen, randn


def make_A(g: torch.Generator, dim: int, N: int, style: str, dtype=torch.float32) -> torch.Tensor:
    """Negative A: "exp" = -exp(randn * 0.5), "arange" = -(1..N) per row (mamba init) + jitter."""
    if style == "exp":
        return (-torch.exp(randn(g, dim, N, dtype=torch.float64, scale=0.5))).to(dtype)
    base = -torch.arange(1, N + 1, dtype=torch.float64).expand(dim, N)
    return (base * torch.exp(randn(g, dim, N, dtype=torch.float64, scale=0.1))).to(dtype)


def make_delta(g: torch.Generator, *shape: int, softplus: bool, dtype=torch.float32) -> torch.Tensor:
    """delta ~ randn * 0.5 - 1 before softplus; positive dt of the same size without it."""
    raw = randn(g, *shape, dtype=torch.float64, scale=0.5, shift=-1.0)
    return (raw if softplus else F.softplus(raw)).to(dtype)


def make_bias(g: torch.Generator, dim: int, *, softplus: bool, dtype=torch.float32) -> torch.Tensor:
    """delta_bias: randn * 0.5 before softplus; small and positive without it (dt must stay > 0)."""
    raw = randn(g, dim, dtype=torch.float64, scale=0.5)
    return (raw if softplus else 0.05 + 0.1 * raw.abs()).to(dtype)


def scan_inputs(seed: int, b: int, dim: int, L: int, N: int, dtype=torch.float32, *, has_D=True, has_z=True,
                has_bias=True, has_h0=False, softplus=True, A_style="exp") -> Dict[str, Optional[torch.Tensor]]:
    """selective_scan inputs, channel-major: u, delta, z (b, D, L); B, C (b, N, L).

    Parameters (A, D, delta_bias, initial_state) are in the accumulation dtype.
    """
    g = gen(seed)
    pd = acc_dtype(dtype)
    return dict(
        u=randn(g, b, dim, L, dtype=dtype),
        delta=make_delta(g, b, dim, L, softplus=softplus, dtype=dtype),
        A=make_A(g, dim, N, A_style, pd),
        B=randn(g, b, N, L, dtype=dtype),
        C=randn(g, b, N, L, dtype=dtype),
        D=randn(g, dim, dtype=pd) if has_D else None,
        z=randn(g, b, dim, L, dtype=dtype) if has_z else None,
        delta_bias=make_bias(g, dim, softplus=softplus, dtype=pd) if has_bias else None,
        initial_state=randn(g, b, dim, N, dtype=pd) if has_h0 else None,
    )


SCAN_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def conv_inputs(seed: int, b: int, p: int, s: int, E: int, K: int, dtype=torch.float32, *, has_bias=True):
    """fork_conv1d inputs, token-major: x_prefix (b, p, E), x_suffix (b, s, E), weight (E, K), bias (E,)."""
    g = gen(seed)
    return dict(
        x_prefix=randn(g, b, p, E, dtype=dtype),
        x_suffix=randn(g, b, s, E, dtype=dtype),
        weight=randn(g, E, K, dtype=dtype, scale=K ** -0.5),
        bias=randn(g, E, dtype=dtype, scale=0.5) if has_bias else None,
    )


CONV_KEYS = ("x_prefix", "x_suffix", "weight", "bias")


def fork_inputs(seed: int, b: int, p: int, s: int, E: int, N: int, dtype=torch.float32, *, has_D=True, has_z=True,
                has_bias=True, softplus=True, A_style="exp") -> Dict[str, Optional[torch.Tensor]]:
    """fork_scan inputs, token-major: u, delta (b, p+2s, E); B, C (b, p+2s, N); z (b, s, E)."""
    g = gen(seed)
    pd = acc_dtype(dtype)
    L = p + 2 * s
    return dict(
        u=randn(g, b, L, E, dtype=dtype),
        delta=make_delta(g, b, L, E, softplus=softplus, dtype=dtype),
        A=make_A(g, E, N, A_style, pd),
        B=randn(g, b, L, N, dtype=dtype),
        C=randn(g, b, L, N, dtype=dtype),
        D=randn(g, E, dtype=pd) if has_D else None,
        z=randn(g, b, s, E, dtype=dtype) if has_z else None,
        delta_bias=make_bias(g, E, softplus=softplus, dtype=pd) if has_bias else None,
    )


FORK_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


# --------------------------------------------------------------------------
# Literal implementations, independent of vlssm (float64, loops).

def _softplus_literal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20, x, torch.log(1 + torch.exp(torch.clamp(x, max=20))))


def literal_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           reverse=False, initial_state=None):
    """mamba_ssm semantics with a step loop in scan order (reverse walks l = L-1 .. 0); float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, dim, L = u.shape
    N = A.shape[1]
    h = torch.zeros(b, dim, N, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    out = torch.full((b, dim, L), float("nan"), dtype=torch.float64)
    for l in (range(L - 1, -1, -1) if reverse else range(L)):
        dt = delta[:, :, l] + (0 if delta_bias is None else delta_bias.double())
        if delta_softplus:
            dt = _softplus_literal(dt)
        h = torch.exp(dt[:, :, None] * A[None]) * h + (dt * u[:, :, l])[:, :, None] * B[:, None, :, l]
        y = (h * C[:, None, :, l]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, l]
        if z is not None:
            zl = z[:, :, l].double()
            y = y * zl / (1 + torch.exp(-zl))
        out[:, :, l] = y
    return out, h


def literal_causal_conv_silu(seq: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """(b, L, E) token-major; out[t] = silu(bias + sum_k w[:, k] * seq[t - (K-1) + k])."""
    b, L, E = seq.shape
    K = weight.shape[1]
    seq, weight = seq.double(), weight.double()
    out = torch.zeros(b, L, E, dtype=torch.float64) + (0 if bias is None else bias.double())
    for t in range(L):
        for k in range(K):
            q = t - (K - 1) + k
            if q >= 0:
                out[:, t] += weight[:, k] * seq[:, q]
    return out * torch.sigmoid(out)


def literal_fork_conv1d(x_prefix, x_suffix, weight, bias=None):
    """[prefix | suffix in [P, S] | suffix in [P, rev S] in token order], float64."""
    p, s = x_prefix.shape[1], x_suffix.shape[1]
    rev_idx = torch.arange(s - 1, -1, -1)
    seq_f = torch.cat([x_prefix, x_suffix], 1)
    seq_r = torch.cat([x_prefix, x_suffix[:, rev_idx]], 1)
    yf = literal_causal_conv_silu(seq_f, weight, bias)
    yr = literal_causal_conv_silu(seq_r, weight, bias)
    # token i of S sits at position p + s - 1 - i of [P, rev S]
    return torch.cat([yf, yr[:, p + s - 1 - torch.arange(s)]], 1)


def literal_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus=True):
    """Two literal scans of [P, S] and [P, rev S], suffix outputs summed in token order, gated; float64."""
    p = prefix_len
    s = (u.shape[1] - p) // 2
    rev = p + s + torch.arange(s - 1, -1, -1)  # reversed segment, walked from its end

    def seqs(t):
        fwd = torch.cat([t[:, :p], t[:, p:p + s]], 1)
        rv = torch.cat([t[:, :p], t[:, rev]], 1)
        return fwd.transpose(1, 2), rv.transpose(1, 2)

    (u1, u2), (d1, d2), (B1, B2), (C1, C2) = seqs(u), seqs(delta), seqs(B), seqs(C)
    y1, _ = literal_selective_scan(u1, d1, A, B1, C1, D, None, delta_bias, delta_softplus)
    y2, _ = literal_selective_scan(u2, d2, A, B2, C2, D, None, delta_bias, delta_softplus)
    y1 = y1[:, :, p:]                      # suffix token i at position p + i
    y2 = y2[:, :, p + s - 1 - torch.arange(s)]  # suffix token i at position p + s - 1 - i
    y = (y1 + y2).transpose(1, 2)
    if z is not None:
        zz = z.double()
        y = y * zz * torch.sigmoid(zz)
    return y
