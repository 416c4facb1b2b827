"""The scan family: ``selective_scan`` (mamba_ssm's selective scan, plus ``reverse`` and
``initial_state``) and ``fork_scan`` (one shared prefix, a suffix scanned in both orders).

Schemas (``torch.ops.vlssm.*``, defined in csrc/scan.cpp)::

    selective_scan(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
                   delta_softplus, reverse) -> (out, last_state, checkpoints)
    fork_scan(u, delta, A, B, C, D?, z?, delta_bias?, prefix_len, delta_softplus)
        -> (out, ysum, checkpoints)

``checkpoints`` holds the state every 64 steps; the backward recomputes the
states in between from it. selective_scan is channel-major (b, D, L); fork_scan
is token-major (b, L, E), like the ``nn.Linear`` outputs around it, and stores the
reversed suffix in token order (docs/design.md section 2). The Triton backend has
the same pairs as ``vlssm::{selective_scan,fork_scan}{,_backward}_triton``
(kernels/scan.py). Files of this family: README "Where things live".
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import fork_scan_ref, selective_scan_ref
from . import _checks

#: Backends these ops have ("cuda" when vlssm._C was built with CUDA; "triton": kernels/scan.py).
IMPLEMENTED = ("cpu", "cuda", "triton", "reference")

__all__ = ["selective_scan", "fork_scan"]

#: Steps between saved scan states (the ``checkpoints`` outputs); mirrors kCheckpointChunk in
#: csrc/scan_shapes.h.
CHECKPOINT_CHUNK = 64


def num_checkpoints(length):
    """Saved states for a scan segment of ``length`` steps (works on SymInts)."""
    return (length + CHECKPOINT_CHUNK - 1) // CHECKPOINT_CHUNK


def selective_scan(
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
    backend: Optional[str] = None,
):
    """Selective scan with mamba_ssm ``selective_scan_fn`` semantics (channel-major).

    For every batch b, channel d, state n, scanning tokens l = 0 .. L-1
    (``reverse=True``: l = L-1 .. 0, outputs still in token order)::

        dt      = softplus(delta[b,d,l] + delta_bias[d])   (softplus if delta_softplus)
        h[n]    = exp(dt * A[d,n]) * h[n] + dt * B[b,n,l] * u[b,d,l]
        out     = (sum_n C[b,n,l] h[n] + D[d] u[b,d,l]) * silu(z[b,d,l])

    B and C each take any of mamba_ssm's layouts (independently of each other):

    - (b, N, L): one row per token, shared by every channel (the formula above);
    - grouped (b, G, N, L): channel d reads ``B[b, d // (D // G), :, l]``, G dividing D
      (VMamba's cross-scan passes its K directions as G groups of one call);
    - input-independent (D, N): channel d reads ``B[d, :]`` at every token (S4-style).
      Any floating dtype; used in float32 (float64 for float64 u), as A is.

    The kernels read every layout in place (no expansion); dB / dC come back in
    B / C's own layout: summed over a group's channels, or over batch and time.
    When both B and C are grouped they must have the same G. Complex A / B / C
    (mamba_ssm's complex mode) are not supported: TypeError.

    Args:
        u, delta: (b, D, L), float16 / bfloat16 / float32 / float64. Any strides:
            a transposed view of a token-major (b, L, D) tensor is read in place.
        A: (D, N). B, C: (b, N, L), (b, G, N, L) in u's dtype, or (D, N); see above.
        D, delta_bias: (D,) or None. z: (b, D, L) or None (no gate).
        delta_softplus: apply softplus (identity above 20, like mamba_ssm).
        return_last_state: also return the final state (b, D, N).
        reverse: scan from the last token to the first, without a copy.
        initial_state: (b, D, N) state before the first scanned token, or None (zeros).
        backend: None (``VLSSM_BACKEND`` or "auto"), "auto", "cpu", "cuda", "triton" or
            "reference".

    Parameters (A, D, delta_bias, initial_state) may have any floating dtype; they
    are used in float32 (float64 when u is float64), as is the state.

    Returns:
        out (b, D, L) in u's dtype; with ``return_last_state``, ``(out, last_state)``
        with last_state (b, D, N) in float32 (float64 for float64 inputs).
    """
    _checks.tensor("u", u, 3, "(batch, dim, seqlen)")
    b, dim, L = u.shape
    _checks.not_complex("A", A)
    _checks.tensor("A", A, 2, "(dim, dstate)")
    N = A.shape[1]
    _checks.like("delta", delta, "u", u, (b, dim, L), "(batch, dim, seqlen)")
    A = _checks.param("A", A, "u", u, (dim, N), "(dim, dstate)")
    B, C = _checks.scan_bc_pair(B, C, u, b, dim, L, N, token_major=False)
    if D is not None:
        D = _checks.param("D", D, "u", u, (dim,), "(dim,)")
    if z is not None:
        _checks.like("z", z, "u", u, (b, dim, L), "(batch, dim, seqlen)")
    if delta_bias is not None:
        delta_bias = _checks.param("delta_bias", delta_bias, "u", u, (dim,), "(dim,)")
    if initial_state is not None:
        initial_state = _checks.param("initial_state", initial_state, "u", u, (b, dim, N), "(batch, dim, dstate)")
    _checks.flag("delta_softplus", delta_softplus)
    _checks.flag("reverse", reverse)

    name = _backend.resolve_backend(backend, u.device, implemented=IMPLEMENTED, op="selective_scan")
    if name == "reference":
        return selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
            reverse=reverse, initial_state=initial_state,
        )
    op = torch.ops.vlssm.selective_scan_triton if name == "triton" else torch.ops.vlssm.selective_scan
    out, last_state, _ = op(
        u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse
    )
    return (out, last_state) if return_last_state else out


def fork_scan(
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
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Scan the prefix once, fork its state into the forward and the reversed suffix.

    With segments P = tokens [0, p), F = [p, p+s), R = [p+s, p+2s) of the
    token-major inputs (the layout :func:`~vlssm.ops.fork_conv1d` returns)::

        h_P   = scan(P)                                  (from zero state)
        y_f   = scan(F, from h_P)           + D * u_F    (tokens 0 .. s-1)
        y_r   = scan(R walked from its end, from h_P) + D * u_R
        out   = (y_f + y_r) * silu(z)

    i.e. the suffix outputs of ``[P, S]`` plus the flipped-back suffix outputs
    of ``[P, rev S]``, gated. Scan steps: p + 2s instead of 2(p + s).

    Args:
        u, delta: (b, p + 2s, E); any strides (slices of a wider tensor work).
        A: (E, N). B, C: (b, p + 2s, N), u's dtype (C of the prefix is unused);
            any strides, e.g. column slices of the ``x_proj`` output. Like
            :func:`~vlssm.ops.selective_scan`, each may also be grouped,
            (b, p + 2s, G, N) with channel e reading group e // (E // G), or
            input-independent (E, N) (any floating dtype, used in float32);
            dB / dC come back in the same layout.
        D, delta_bias: (E,) or None. z: (b, s, E) or None (no gate); a
            batch-broadcast view is read without a copy.
        prefix_len: p >= 0; ``u.shape[1] - p`` must be even and positive.
        delta_softplus: softplus on delta + delta_bias.
        backend: None, "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (b, s, E) in u's dtype.
    """
    _checks.tensor("u", u, 3, "(batch, prefix_len + 2 * suffix_len, dim)")
    b, L, E = u.shape
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len must be an int, got {type(prefix_len).__name__}")
    if not (0 <= prefix_len < L and (L - prefix_len) % 2 == 0):
        raise ValueError(
            f"prefix_len must be in [0, {L}) with u.shape[1] - prefix_len = 2 * suffix_len even; "
            f"got prefix_len={prefix_len} for u of shape {tuple(u.shape)}"
        )
    s = (L - prefix_len) // 2
    _checks.not_complex("A", A)
    _checks.tensor("A", A, 2, "(dim, dstate)")
    N = A.shape[1]
    layout = "(batch, prefix_len + 2 * suffix_len, dim)"
    _checks.like("delta", delta, "u", u, (b, L, E), layout)
    A = _checks.param("A", A, "u", u, (E, N), "(dim, dstate)")
    B, C = _checks.scan_bc_pair(B, C, u, b, E, L, N, token_major=True)
    if D is not None:
        D = _checks.param("D", D, "u", u, (E,), "(dim,)")
    if z is not None:
        _checks.like("z", z, "u", u, (b, s, E), "(batch, suffix_len, dim)")
    if delta_bias is not None:
        delta_bias = _checks.param("delta_bias", delta_bias, "u", u, (E,), "(dim,)")
    _checks.flag("delta_softplus", delta_softplus)
    name = _backend.resolve_backend(backend, u.device, implemented=IMPLEMENTED, op="fork_scan")
    if name == "reference":
        return fork_scan_ref(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus)
    op = torch.ops.vlssm.fork_scan_triton if name == "triton" else torch.ops.vlssm.fork_scan
    return op(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus)[0]


# --------------------------------------------------------------------------
# Registration (run once vlssm._C has defined the schemas). The Triton pairs
# register the same fakes and autograd in kernels/scan.py.

def selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse):
    _checks.same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                        initial_state=initial_state)
    b, dim, L = u.shape
    N = A.shape[1]
    acc = _checks.acc_dtype(u.dtype)
    return (
        u.new_empty((b, dim, L)),
        u.new_empty((b, dim, N), dtype=acc),
        u.new_empty((b, dim, num_checkpoints(L), N), dtype=acc),
    )


def selective_scan_fake_backward(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
                   delta_softplus, reverse):
    _checks.same_device("u", u, dout=dout, dlast_state=dlast_state, delta=delta, A=A, B=B, C=C, D=D, z=z,
                        delta_bias=delta_bias, initial_state=initial_state, checkpoints=checkpoints)
    b, dim, L = u.shape
    N = A.shape[1]
    acc = _checks.acc_dtype(u.dtype)

    def empty():  # the gradient of an absent optional input: a distinct empty tensor each
        return u.new_empty((0,), dtype=acc)

    return [
        u.new_empty((b, dim, L)),
        u.new_empty((b, dim, L)),
        u.new_empty((dim, N), dtype=acc),
        B.new_empty(B.shape),  # dB / dC in B / C's own layout and dtype
        C.new_empty(C.shape),
        u.new_empty((dim,), dtype=acc) if D is not None else empty(),
        u.new_empty((b, dim, L)) if z is not None else u.new_empty((0,)),
        u.new_empty((dim,), dtype=acc) if delta_bias is not None else empty(),
        u.new_empty((b, dim, N), dtype=acc) if initial_state is not None else empty(),
    ]


def selective_scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2])
    ctx.delta_softplus = delta_softplus
    ctx.reverse = reverse
    ctx.mark_non_differentiable(output[2])


def make_selective_scan_backward(backward_op):
    """The autograd backward of a selective_scan op whose gradients ``backward_op`` computes."""
    def _backward(ctx, dout, dlast_state, _dcheckpoints):
        u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints = ctx.saved_tensors
        if dout is None:  # only last_state was used
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias, dh0 = backward_op(
            dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints,
            ctx.delta_softplus, ctx.reverse,
        )
        return (
            du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            dbias if delta_bias is not None else None,
            dh0 if initial_state is not None else None,
            None, None,
        )

    return _backward


def fork_scan_fake(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus):
    _checks.same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    b, L, E = u.shape
    N = A.shape[1]
    s = (L - prefix_len) // 2
    acc = _checks.acc_dtype(u.dtype)
    nck = num_checkpoints(prefix_len) + 2 * num_checkpoints(s)
    return u.new_empty((b, s, E)), u.new_empty((b, s, E), dtype=acc), u.new_empty((b, E, nck, N), dtype=acc)


def fork_scan_fake_backward(dout, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, prefix_len, delta_softplus):
    _checks.same_device("u", u, dout=dout, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                        ysum=ysum, checkpoints=checkpoints)
    b, L, E = u.shape
    N = A.shape[1]
    s = (L - prefix_len) // 2
    acc = _checks.acc_dtype(u.dtype)

    def empty():  # the gradient of an absent optional input: a distinct empty tensor each
        return u.new_empty((0,), dtype=acc)

    return [
        u.new_empty((b, L, E)),
        u.new_empty((b, L, E)),
        u.new_empty((E, N), dtype=acc),
        B.new_empty(B.shape),  # dB / dC in B / C's own layout and dtype
        C.new_empty(C.shape),
        u.new_empty((E,), dtype=acc) if D is not None else empty(),
        u.new_empty((b, s, E)) if z is not None else u.new_empty((0,)),
        u.new_empty((E,), dtype=acc) if delta_bias is not None else empty(),
    ]


def fork_scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus = inputs
    _, ysum, checkpoints = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints)
    ctx.prefix_len = prefix_len
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(ysum, checkpoints)


def make_fork_scan_backward(backward_op):
    """The autograd backward of a fork_scan op whose gradients ``backward_op`` computes."""
    def _backward(ctx, dout, _dysum, _dcheckpoints):
        u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints = ctx.saved_tensors
        du, ddelta, dA, dB, dC, dD, dz, dbias = backward_op(
            dout, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, ctx.prefix_len, ctx.delta_softplus
        )
        return (
            du, ddelta, dA, dB, dC,
            dD if D is not None else None,
            dz if z is not None else None,
            dbias if delta_bias is not None else None,
            None, None,
        )

    return _backward


def register() -> None:
    torch.library.register_fake("vlssm::selective_scan")(selective_scan_fake)
    torch.library.register_fake("vlssm::selective_scan_backward")(selective_scan_fake_backward)
    torch.library.register_autograd("vlssm::selective_scan",
                                    make_selective_scan_backward(torch.ops.vlssm.selective_scan_backward),
                                    setup_context=selective_scan_setup_context)
    torch.library.register_fake("vlssm::fork_scan")(fork_scan_fake)
    torch.library.register_fake("vlssm::fork_scan_backward")(fork_scan_fake_backward)
    torch.library.register_autograd("vlssm::fork_scan", make_fork_scan_backward(torch.ops.vlssm.fork_scan_backward),
                                    setup_context=fork_scan_setup_context)
