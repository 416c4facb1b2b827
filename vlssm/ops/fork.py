"""The fork ops: one shared prefix, a suffix scanned in both orders.

A Mamba block that sees ``[P, S]`` and ``[P, rev S]`` and is only asked for
outputs on the suffix computes the prefix once (docs/design.md section 2). Both ops
are token-major, like the ``nn.Linear`` outputs around them, and store the
reversed suffix in token order: direction belongs to the scan, not to memory.

Schemas (csrc/vlssm.cpp)::

    fork_conv1d(x_prefix, x_suffix, weight, bias?) -> y
    fork_scan(u, delta, A, B, C, D?, z?, delta_bias?, prefix_len, delta_softplus)
        -> (out, ysum, checkpoints)

The Triton backend has the same pairs as ``vlssm::fork_conv1d{,_backward}_triton``
(kernels/fork_conv1d.py) and ``vlssm::fork_scan{,_backward}_triton`` (kernels/scan.py).
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import fork_conv1d_ref, fork_scan_ref
from . import _checks
from ._schema import num_checkpoints

#: Backends these ops have ("cuda" when vlssm._C was built with CUDA; "triton": kernels/).
IMPLEMENTED = ("cpu", "cuda", "triton", "reference")

__all__ = ["fork_conv1d", "fork_scan"]


def fork_conv1d(
    x_prefix: torch.Tensor,
    x_suffix: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise causal conv1d + SiLU of ``[P, S]`` and ``[P, rev S]`` in one pass.

    Args:
        x_prefix: (b, p, E) prefix tokens P (p may be 0).
        x_suffix: (b, s, E) suffix tokens S, s >= 1.
            Both may be views with any batch and token strides: a slice of a
            wider tensor (``in_proj`` output) or a batch-broadcast view
            (``t.expand(b, n, E)``, stride 0) is read without a copy; a
            channel stride other than 1 costs one copy.
        weight: (E, K) depthwise kernel (``conv1d.weight[:, 0, :]``); tap K-1
            multiplies the current token. Same dtype as the inputs.
        bias: (E,) or None.
        backend: None, "auto", "cpu", "cuda", "triton" or "reference".

    Returns:
        (b, p + 2s, E): ``[prefix | suffix in [P, S] | suffix in [P, rev S]]``,
        every segment in token order. Token i of the last segment is the conv
        output of S[i] inside the reversed sequence, whose window holds
        S[i], S[i+1], ... and then the end of the prefix.
    """
    _checks.tensor("x_suffix", x_suffix, 3, "(batch, suffix_len, dim)")
    _checks.tensor("x_prefix", x_prefix, 3, "(batch, prefix_len, dim)", allow_empty=True)
    b, p, E = x_prefix.shape
    s = x_suffix.shape[1]
    _checks.like("x_suffix", x_suffix, "x_prefix", x_prefix, (b, s, E), "(batch, suffix_len, dim)")
    _checks.tensor("weight", weight, 2, "(dim, d_conv)")
    _checks.like("weight", weight, "x_prefix", x_prefix, (E, weight.shape[1]), "(dim, d_conv)")
    if bias is not None:
        _checks.like("bias", bias, "x_prefix", x_prefix, (E,), "(dim,)")
    name = _backend.resolve_backend(backend, x_prefix.device, implemented=IMPLEMENTED, op="fork_conv1d")
    if name == "reference":
        return fork_conv1d_ref(x_prefix, x_suffix, weight, bias)
    op = torch.ops.vlssm.fork_conv1d_triton if name == "triton" else torch.ops.vlssm.fork_conv1d
    return op(x_prefix, x_suffix, weight, bias)


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
    token-major inputs (the layout :func:`fork_conv1d` returns)::

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
# register the same fakes and autograd in kernels/.

def conv_fake(x_prefix, x_suffix, weight, bias):
    _checks.same_device("x_prefix", x_prefix, x_suffix=x_suffix, weight=weight, bias=bias)
    b, p, E = x_prefix.shape
    return x_prefix.new_empty((b, p + 2 * x_suffix.shape[1], E))


def conv_fake_backward(dy, x_prefix, x_suffix, weight, bias):
    _checks.same_device("x_prefix", x_prefix, dy=dy, x_suffix=x_suffix, weight=weight, bias=bias)
    b, p, E = x_prefix.shape
    return [
        x_prefix.new_empty((b, p, E)),
        x_prefix.new_empty((b, x_suffix.shape[1], E)),
        x_prefix.new_empty(tuple(weight.shape)),
        x_prefix.new_empty((E if bias is not None else 0,)),
    ]


def conv_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def make_conv_backward(backward_op):
    """The autograd backward of a fork_conv1d op whose gradients ``backward_op`` computes."""
    def _conv_backward(ctx, dy):
        x_prefix, x_suffix, weight, bias = ctx.saved_tensors
        dxp, dxs, dw, db = backward_op(dy, x_prefix, x_suffix, weight, bias)
        return dxp, dxs, dw, (db if bias is not None else None)

    return _conv_backward


def scan_fake(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus):
    _checks.same_device("u", u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    b, L, E = u.shape
    N = A.shape[1]
    s = (L - prefix_len) // 2
    acc = _checks.acc_dtype(u.dtype)
    nck = num_checkpoints(prefix_len) + 2 * num_checkpoints(s)
    return u.new_empty((b, s, E)), u.new_empty((b, s, E), dtype=acc), u.new_empty((b, E, nck, N), dtype=acc)


def scan_fake_backward(dout, u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints, prefix_len, delta_softplus):
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


def scan_setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus = inputs
    _, ysum, checkpoints = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ysum, checkpoints)
    ctx.prefix_len = prefix_len
    ctx.delta_softplus = delta_softplus
    ctx.mark_non_differentiable(ysum, checkpoints)


def make_scan_backward(backward_op):
    """The autograd backward of a fork_scan op whose gradients ``backward_op`` computes."""
    def _scan_backward(ctx, dout, _dysum, _dcheckpoints):
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

    return _scan_backward


def register() -> None:
    torch.library.register_fake("vlssm::fork_conv1d")(conv_fake)
    torch.library.register_fake("vlssm::fork_conv1d_backward")(conv_fake_backward)
    torch.library.register_autograd("vlssm::fork_conv1d", make_conv_backward(torch.ops.vlssm.fork_conv1d_backward),
                                    setup_context=conv_setup_context)
    torch.library.register_fake("vlssm::fork_scan")(scan_fake)
    torch.library.register_fake("vlssm::fork_scan_backward")(scan_fake_backward)
    torch.library.register_autograd("vlssm::fork_scan", make_scan_backward(torch.ops.vlssm.fork_scan_backward),
                                    setup_context=scan_setup_context)
