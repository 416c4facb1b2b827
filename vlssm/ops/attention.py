"""``attention_with_probs``: softmax attention that also returns the attention map.

Schemas (``torch.ops.vlssm.*``, defined in csrc/attention.cpp)::

    attention_with_probs(q, k, v, scale) -> (out, probs)
    attention_with_probs_backward(dout, dprobs?, q, k, v, probs, scale) -> [dq, dk, dv]

on 3-D (n, L, d) operands of any strides (stride-0 batch included). The map
``probs`` is an output and is differentiable: the backward takes ``dout`` and
``dprobs``. The Triton backend has the same pair as
``vlssm::attention_with_probs{,_backward}_triton`` (kernels/attention.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _backend
from ..reference import attention_with_probs_ref
from . import _checks

__all__ = ["attention_with_probs"]

IMPLEMENTED = ("cpu", "triton", "reference")


def _operand(name: str, t, layout: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in _checks.FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.dim() < 2:
        raise ValueError(f"{name} must have shape {layout} (at least 2 dims), got {_checks._shape_str(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {_checks._shape_str(t.shape)}")
    return t


def _broadcast(name: str, t: torch.Tensor, batch, layout: str):
    try:
        return torch.broadcast_shapes(batch, t.shape[:-2])
    except RuntimeError:
        raise ValueError(f"{name} must have shape {layout} with leading dims broadcastable to "
                         f"{_checks._shape_str(batch)}, got {_checks._shape_str(t.shape)}") from None


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return scale


def attention_with_probs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, *,
                         backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention returning the output and the attention map, in one pass.

    ``probs = softmax(scale * q k^T)`` over the last dim, ``out = probs v``.

    Args:
        q: (..., Lq, d); k: (..., Lk, d); v: (..., Lk, dv). One floating dtype
            (float16 / bfloat16 / float32 / float64) and device. The leading dims
            broadcast against each other (a stride-0 view, no copy, where the
            layout allows); the gradient of a broadcast input is summed back to
            its shape. No leading dims at all is fine.
        scale: a finite real number; None means ``1 / sqrt(d)``.
        backend: None (``VLSSM_BACKEND`` or "auto"), "auto", "cpu", "triton" or "reference".

    Half-precision inputs are computed in float32 (outputs in the input dtype).

    Returns:
        ``(out, probs)``: out (..., Lq, dv), probs (..., Lq, Lk), both
        differentiable, ``...`` the broadcast leading dims.
    """
    _operand("q", q, "(..., Lq, d)")
    Lq, d = q.shape[-2:]
    _operand("k", k, "(..., Lk, d)")
    Lk = k.shape[-2]
    if k.shape[-1] != d:
        raise ValueError(f"k must have shape (..., Lk, d) with d = {d} like q, got {_checks._shape_str(k.shape)}")
    _operand("v", v, "(..., Lk, dv)")
    dv = v.shape[-1]
    if v.shape[-2] != Lk:
        raise ValueError(f"v must have shape (..., Lk, dv) with Lk = {Lk} like k, got {_checks._shape_str(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device} like q, got {t.device}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have dtype {q.dtype} like q, got {t.dtype}")
    batch = _broadcast("k", k, q.shape[:-2], "(..., Lk, d)")
    batch = _broadcast("v", v, batch, "(..., Lk, dv)")
    scale = check_scale(scale, d)

    name = _backend.resolve_backend(backend, q.device, implemented=IMPLEMENTED, op="attention_with_probs")
    if name == "reference":
        return attention_with_probs_ref(q, k, v, scale)
    n = math.prod(batch)
    q3 = q.expand(*batch, Lq, d).reshape(n, Lq, d)
    k3 = k.expand(*batch, Lk, d).reshape(n, Lk, d)
    v3 = v.expand(*batch, Lk, dv).reshape(n, Lk, dv)
    op = torch.ops.vlssm.attention_with_probs if name == "cpu" else torch.ops.vlssm.attention_with_probs_triton
    out, probs = op(q3, k3, v3, scale)
    return out.view(*batch, Lq, dv), probs.view(*batch, Lq, Lk)


# --------------------------------------------------------------------------
# Registration (run once vlssm._C has defined the schemas). The Triton pair
# registers its own, identical ones in kernels/attention.py.

def fake(q, k, v, scale):
    _checks.same_device("q", q, k=k, v=v)
    n, Lq, _ = q.shape
    return q.new_empty((n, Lq, v.shape[2])), q.new_empty((n, Lq, k.shape[1]))


def fake_backward(dout, dprobs, q, k, v, probs, scale):
    _checks.same_device("q", q, dout=dout, dprobs=dprobs, k=k, v=v, probs=probs)
    return [q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(v.shape)]


def setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, output[1])
    ctx.scale = scale


def make_backward(backward_op):
    def _backward(ctx, dout, dprobs):
        q, k, v, probs = ctx.saved_tensors
        if dout is None:  # only probs was used
            dout = q.new_zeros((q.shape[0], q.shape[1], v.shape[2]))
        dq, dk, dv = backward_op(dout, dprobs, q, k, v, probs, ctx.scale)
        return dq, dk, dv, None

    return _backward


def register() -> None:
    torch.library.register_fake("vlssm::attention_with_probs")(fake)
    torch.library.register_fake("vlssm::attention_with_probs_backward")(fake_backward)
    torch.library.register_autograd("vlssm::attention_with_probs",
                                    make_backward(torch.ops.vlssm.attention_with_probs_backward),
                                    setup_context=setup_context)
