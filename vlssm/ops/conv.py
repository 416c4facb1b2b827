"""The conv family: ``fork_conv1d``, the depthwise causal conv + SiLU of ``[P, S]`` and ``[P, rev S]``.

A Mamba block that sees ``[P, S]`` and ``[P, rev S]`` and is only asked for
outputs on the suffix computes the prefix once (docs/design.md section 2); this
op is its conv, :func:`~vlssm.ops.fork_scan` its scan. Token-major, like the
``nn.Linear`` outputs around it; the reversed suffix is stored in token order:
direction belongs to the op, not to memory.

Schema (csrc/conv.cpp)::

    fork_conv1d(x_prefix, x_suffix, weight, bias?) -> y

The Triton backend has the same pair as ``vlssm::fork_conv1d{,_backward}_triton``
(kernels/conv.py). Files of this family: README "Where things live".
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backend
from ..reference import fork_conv1d_ref
from . import _checks

#: Backends this op has ("cuda" when vlssm._C was built with CUDA; "triton": kernels/conv.py).
IMPLEMENTED = ("cpu", "cuda", "triton", "reference")

__all__ = ["fork_conv1d"]


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


# --------------------------------------------------------------------------
# Registration (run once vlssm._C has defined the schemas). The Triton pair
# registers the same fakes and autograd in kernels/conv.py.

def fake(x_prefix, x_suffix, weight, bias):
    _checks.same_device("x_prefix", x_prefix, x_suffix=x_suffix, weight=weight, bias=bias)
    b, p, E = x_prefix.shape
    return x_prefix.new_empty((b, p + 2 * x_suffix.shape[1], E))


def fake_backward(dy, x_prefix, x_suffix, weight, bias):
    _checks.same_device("x_prefix", x_prefix, dy=dy, x_suffix=x_suffix, weight=weight, bias=bias)
    b, p, E = x_prefix.shape
    return [
        x_prefix.new_empty((b, p, E)),
        x_prefix.new_empty((b, x_suffix.shape[1], E)),
        x_prefix.new_empty(tuple(weight.shape)),
        x_prefix.new_empty((E if bias is not None else 0,)),
    ]


def setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def make_backward(backward_op):
    """The autograd backward of a fork_conv1d op whose gradients ``backward_op`` computes."""
    def _backward(ctx, dy):
        x_prefix, x_suffix, weight, bias = ctx.saved_tensors
        dxp, dxs, dw, db = backward_op(dy, x_prefix, x_suffix, weight, bias)
        return dxp, dxs, dw, (db if bias is not None else None)

    return _backward


def register() -> None:
    torch.library.register_fake("vlssm::fork_conv1d")(fake)
    torch.library.register_fake("vlssm::fork_conv1d_backward")(fake_backward)
    torch.library.register_autograd("vlssm::fork_conv1d", make_backward(torch.ops.vlssm.fork_conv1d_backward),
                                    setup_context=setup_context)
