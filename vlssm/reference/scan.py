"""Pure-PyTorch references of the scan family (selective_scan, fork_scan): the ground truth.

Each function literally does the naive thing (concatenate, flip, loop over
time, materialise ``exp(delta * A)``) and works in any floating dtype,
float64 included. Half-precision inputs are computed in float32 and the
result is rounded back, like mamba_ssm's ``selective_scan_ref``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._dtypes import acc_dtype

__all__ = ["selective_scan_ref", "fork_scan_ref"]


def _per_channel(X: torch.Tensor, batch: int, dim: int, L: int) -> torch.Tensor:
    """B or C in any of mamba_ssm's layouts, literally expanded to (batch, dim, N, L).

    (batch, N, L): one row per token for every channel; (batch, G, N, L): channel
    d reads group d // (dim // G); (dim, N): input-independent, row d at every token.
    """
    if X.dim() == 2:
        return X[None, :, :, None].expand(batch, dim, X.shape[1], L)
    if X.dim() == 3:  # one group: a view, no copy
        return X[:, None].expand(batch, dim, *X.shape[1:])
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    z: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    reverse: bool = False,
    initial_state: Optional[torch.Tensor] = None,
):
    """Reference selective scan with mamba_ssm ``selective_scan_fn`` semantics.

    Shapes: u, delta, z: (b, D, L); A: (D, N); D, delta_bias: (D,);
    initial_state: (b, D, N). B and C each: (b, N, L); grouped (b, G, N, L),
    channel d using group d // (D // G); or input-independent (D, N). Returns
    out (b, D, L) in u's dtype and, with ``return_last_state``, the final state
    (b, D, N) in the compute dtype.

    ``reverse=True`` scans from token L-1 down to token 0: literally
    ``flip(scan(flip(inputs)))``.
    """
    if reverse:
        fl = lambda t: None if t is None else t.flip(-1)  # noqa: E731
        flbc = lambda t: t if t.dim() == 2 else t.flip(-1)  # noqa: E731  (input-independent: no time axis)
        res = selective_scan_ref(
            fl(u), fl(delta), A, flbc(B), flbc(C), D, fl(z), delta_bias, delta_softplus,
            return_last_state, initial_state=initial_state,
        )
        if return_last_state:
            return res[0].flip(-1), res[1]
        return res.flip(-1)

    dtype_in = u.dtype
    cd = acc_dtype(dtype_in)
    u = u.to(cd)
    delta = delta.to(cd)
    A = A.to(cd)
    batch, dim, L = u.shape
    B = _per_channel(B.to(cd), batch, dim, L)
    C = _per_channel(C.to(cd), batch, dim, L)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cd)[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    N = A.shape[1]
    x = u.new_zeros((batch, dim, N)) if initial_state is None else initial_state.to(cd)
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bdn->bd", x, C[:, :, :, i]))
    y = torch.stack(ys, dim=2) if ys else u.new_zeros((batch, dim, 0))
    out = y if D is None else y + u * D.to(cd)[:, None]
    if z is not None:
        out = out * F.silu(z.to(cd))
    out = out.to(dtype_in)
    return (out, x) if return_last_state else out


def fork_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    z: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    prefix_len: int,
    delta_softplus: bool = True,
) -> torch.Tensor:
    """Reference fork scan: two full selective scans of [P, S] and [P, rev S].

    Token-major shapes: u, delta (b, p + 2s, E) holding the segments
    [prefix | forward suffix | reversed suffix] in token order; B, C each
    (b, p + 2s, N), grouped (b, p + 2s, G, N) or input-independent (E, N);
    z (b, s, E); A (E, N); D, delta_bias (E,). Returns
    (b, s, E) = (y_fwd + y_rev) * silu(z), y_* including the D skip term, with
    y_rev flipped back to token order.
    """
    p = prefix_len
    s = (u.shape[1] - p) // 2

    def seqs(t):  # token-major (b, p+2s, ...) -> channel-major [P,S] and [P, rev S]
        if t.dim() == 2:  # input-independent (E, N): the same for both sequences
            return t, t
        P, Sf, Sr = t[:, :p], t[:, p:p + s], t[:, p + s:]
        perm = (0, 2, 3, 1) if t.dim() == 4 else (0, 2, 1)  # (b, L, G, N) -> (b, G, N, L)
        return (torch.cat([P, Sf], 1).permute(perm), torch.cat([P, Sr.flip(1)], 1).permute(perm))

    (u1, u2), (d1, d2), (B1, B2), (C1, C2) = seqs(u), seqs(delta), seqs(B), seqs(C)
    y1 = selective_scan_ref(u1, d1, A, B1, C1, D, None, delta_bias, delta_softplus)[..., p:]
    y2 = selective_scan_ref(u2, d2, A, B2, C2, D, None, delta_bias, delta_softplus)[..., p:].flip(-1)
    y = (y1 + y2).transpose(1, 2)
    if z is not None:
        cd = acc_dtype(u.dtype)
        y = (y.to(cd) * F.silu(z.to(cd))).to(u.dtype)
    return y
