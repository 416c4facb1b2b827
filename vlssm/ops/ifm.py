"""The Interaction and Fusion Module ops of MVLR.

- :func:`relation_aggregate` — ``(alpha * m_ka + (1 - alpha) * m_ca) @ t_ca``
  without the (B, C, C) mixed map (per-batch workspace + one gemm on CPU, the
  map tile mixed in registers on Triton).
- :func:`kcr_loss` — knowledge-consistency loss: mean over label rows of
  ``1 - cos(t_ka row, t_ca row)``, fused (one pass for dot and both norms).

Schemas (csrc/ifm.cpp)::

    relation_aggregate(m_ka, m_ca, t_ca, alpha) -> out
    relation_aggregate_backward(grad, m_ka, m_ca, t_ca, alpha) -> [dm_ka, dm_ca, dt_ca, dalpha]
    kcr_loss(t_ka, t_ca, eps) -> (loss, stats)
    kcr_loss_backward(grad, t_ka, t_ca, stats, eps) -> [dt_ka, dt_ca]

``stats`` (..., C, 3) holds (dot, |t_ka|, |t_ca|) per row of the broadcast, in
the accumulation dtype: the backward needs no second pass over the norms.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import _backend
from ..reference import kcr_loss_ref, relation_aggregate_ref
from . import _checks

__all__ = ["relation_aggregate", "kcr_loss"]

IMPLEMENTED = ("cpu", "triton", "reference")


def _alpha(alpha, like: torch.Tensor) -> torch.Tensor:
    """alpha: a 0-dim floating tensor on like's device, or a python number (made a constant tensor)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (torch.Tensor, float, int)):
        raise TypeError(f"alpha must be a 0-dim floating tensor or a float, got {type(alpha).__name__}")
    if not isinstance(alpha, torch.Tensor):
        return torch.tensor(float(alpha), dtype=_checks.acc_dtype(like.dtype), device=like.device)
    if alpha.dtype not in _checks.FLOATING:
        raise TypeError(f"alpha must be a floating tensor (float16, bfloat16, float32, float64), got {alpha.dtype}")
    if alpha.dim() != 0:
        raise ValueError(f"alpha must be a 0-dim tensor (a scalar), got shape {_checks._shape_str(alpha.shape)}")
    if alpha.device != like.device:
        raise ValueError(f"alpha must be on {like.device} like t_ca, got {alpha.device}")
    return alpha


def check_relation_aggregate(m_ka, m_ca, t_ca, alpha) -> torch.Tensor:
    """Argument checks of relation_aggregate (every backend); returns alpha as a 0-dim tensor."""
    _checks.tensor("t_ca", t_ca, 3, "(batch, labels, dim)")
    B, C, d = t_ca.shape
    if isinstance(m_ka, torch.Tensor) and m_ka.dim() == 2:
        _checks.like("m_ka", m_ka, "t_ca", t_ca, (C, C), "(labels, labels)")
    else:
        _checks.like("m_ka", m_ka, "t_ca", t_ca, (B, C, C), "(batch, labels, labels) or (labels, labels)")
    _checks.like("m_ca", m_ca, "t_ca", t_ca, (B, C, C), "(batch, labels, labels)")
    alpha = _alpha(alpha, t_ca)
    return alpha


def check_kcr_loss(t_ka, t_ca, eps) -> float:
    """Argument checks of kcr_loss (every backend); returns eps as a float."""
    for name, t in (("t_ka", t_ka), ("t_ca", t_ca)):
        _checks.tensor(name, t, t.dim() if isinstance(t, torch.Tensor) and t.dim() >= 2 else 2, "(..., labels, dim)")
    if t_ca.dtype != t_ka.dtype:
        raise TypeError(f"t_ca must have dtype {t_ka.dtype} like t_ka, got {t_ca.dtype}")
    if t_ca.device != t_ka.device:
        raise ValueError(f"t_ca must be on {t_ka.device} like t_ka, got {t_ca.device}")
    if t_ca.shape[-1] != t_ka.shape[-1]:
        raise ValueError(f"t_ca must have shape (..., labels, dim) with dim = {t_ka.shape[-1]} like t_ka, "
                         f"got {_checks._shape_str(t_ca.shape)}")
    try:
        kcr_rows(t_ka.shape, t_ca.shape)
    except RuntimeError:
        raise ValueError(f"t_ca of shape {_checks._shape_str(t_ca.shape)} must broadcast with t_ka of shape "
                         f"{_checks._shape_str(t_ka.shape)} in its leading dims (..., labels)") from None
    if isinstance(eps, bool) or not isinstance(eps, (float, int)):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    eps = float(eps)
    return eps


def relation_aggregate(
    m_ka: torch.Tensor,
    m_ca: torch.Tensor,
    t_ca: torch.Tensor,
    alpha: Union[torch.Tensor, float],
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``(alpha * m_ka + (1 - alpha) * m_ca) @ t_ca`` per batch, without the mixed map.

    Args:
        m_ka: (C, C) knowledge-aware relation map shared by the batch, or (B, C, C).
        m_ca: (B, C, C) content-aware relation map, t_ca's dtype.
        t_ca: (B, C, d) label embeddings; float16 / bfloat16 / float32 / float64.
        alpha: 0-dim floating tensor (differentiable; any floating dtype, used in
            the accumulation dtype) or a python float (a constant).
        backend: None (``VLSSM_BACKEND`` or "auto"), "auto", "cpu", "triton" or "reference".

    Half inputs are mixed and multiplied in float32; the output is rounded once.

    Returns:
        (B, C, d) in t_ca's dtype. Gradients: all of m_ka (summed over the batch
        when it is (C, C)), m_ca, t_ca and alpha (in alpha's dtype).
    """
    alpha = check_relation_aggregate(m_ka, m_ca, t_ca, alpha)
    be = _backend.resolve_backend(backend, t_ca.device, implemented=IMPLEMENTED, op="relation_aggregate")
    if be == "reference":
        return relation_aggregate_ref(m_ka, m_ca, t_ca, alpha)
    if be == "triton":
        return torch.ops.vlssm.relation_aggregate_triton(m_ka, m_ca, t_ca, alpha)
    return torch.ops.vlssm.relation_aggregate(m_ka, m_ca, t_ca, alpha)


def kcr_rows(t_ka_shape, t_ca_shape, broadcast_shapes=torch.broadcast_shapes):
    """The broadcast leading shape (..., C) of kcr_loss's inputs."""
    return tuple(broadcast_shapes(tuple(t_ka_shape[:-1]), tuple(t_ca_shape[:-1])))


def kcr_loss(t_ka: torch.Tensor, t_ca: torch.Tensor, eps: float = 1e-8, *,
             backend: Optional[str] = None) -> torch.Tensor:
    """Knowledge-consistency loss ``mean(1 - cos(t_ka row, t_ca row))``.

    ``cos(a, b) = a.b / (max(|a|, eps) * max(|b|, eps))`` (what
    ``torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=eps)`` computes);
    the mean runs over every row of the broadcast of the leading dims.

    Args:
        t_ka, t_ca: (..., C, d), same dtype (float16 / bfloat16 / float32 /
            float64) and device, leading dims broadcastable either way (e.g.
            (C, d) vs (B, C, d)); the gradient of a broadcast input is summed
            back to its shape inside the kernel.
        eps: >= 0. With eps = 0 an all-zero row gives NaN (0 / 0).
        backend: None, "auto", "cpu", "triton" or "reference".

    Returns:
        0-dim tensor: in the input dtype for float32 / float64, in float32 for
        float16 / bfloat16 inputs (accumulated in float32; not rounded to 8 bits).
    """
    eps = check_kcr_loss(t_ka, t_ca, eps)
    be = _backend.resolve_backend(backend, t_ka.device, implemented=IMPLEMENTED, op="kcr_loss")
    if be == "reference":
        return kcr_loss_ref(t_ka, t_ca, eps)
    if be == "triton":
        return torch.ops.vlssm.kcr_loss_triton(t_ka, t_ca, eps)[0]
    return torch.ops.vlssm.kcr_loss(t_ka, t_ca, eps)[0]


# --------------------------------------------------------------------------
# Registration (run once vlssm._C has defined the schemas). The Triton ops
# (kernels/ifm.py) reuse these fake and autograd functions.

def fake_relation_aggregate(m_ka, m_ca, t_ca, alpha):
    _checks.same_device("t_ca", t_ca, m_ka=m_ka, m_ca=m_ca, alpha=alpha)
    B, C, d = t_ca.shape
    return t_ca.new_empty((B, C, d))


def fake_relation_aggregate_backward(grad, m_ka, m_ca, t_ca, alpha):
    _checks.same_device("t_ca", t_ca, grad=grad, m_ka=m_ka, m_ca=m_ca, alpha=alpha)
    return [t_ca.new_empty(m_ka.shape), t_ca.new_empty(m_ca.shape), t_ca.new_empty(t_ca.shape),
            alpha.new_empty(())]


def fake_kcr_loss(t_ka, t_ca, eps):
    _checks.same_device("t_ka", t_ka, t_ca=t_ca)
    acc = _checks.acc_dtype(t_ka.dtype)
    rows = kcr_rows(t_ka.shape, t_ca.shape)
    return t_ka.new_empty((), dtype=acc), t_ka.new_empty((*rows, 3), dtype=acc)


def fake_kcr_loss_backward(grad, t_ka, t_ca, stats, eps):
    _checks.same_device("t_ka", t_ka, grad=grad, t_ca=t_ca, stats=stats)
    return [t_ka.new_empty(t_ka.shape), t_ca.new_empty(t_ca.shape)]


def relagg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def relagg_backward_with(op):
    def backward(ctx, grad):
        m_ka, m_ca, t_ca, alpha = ctx.saved_tensors
        dka, dca, dt, dalpha = op(grad, m_ka, m_ca, t_ca, alpha)
        return dka, dca, dt, dalpha
    return backward


def kcr_setup_context(ctx, inputs, output):
    t_ka, t_ca, eps = inputs
    ctx.save_for_backward(t_ka, t_ca, output[1])
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


def kcr_backward_with(op):
    def backward(ctx, dloss, _dstats):
        t_ka, t_ca, stats = ctx.saved_tensors
        if dloss is None:  # only stats was used
            return None, None, None
        dka, dca = op(dloss, t_ka, t_ca, stats, ctx.eps)
        return dka, dca, None
    return backward


def register() -> None:
    torch.library.register_fake("vlssm::relation_aggregate")(fake_relation_aggregate)
    torch.library.register_fake("vlssm::relation_aggregate_backward")(fake_relation_aggregate_backward)
    torch.library.register_fake("vlssm::kcr_loss")(fake_kcr_loss)
    torch.library.register_fake("vlssm::kcr_loss_backward")(fake_kcr_loss_backward)
    torch.library.register_autograd(
        "vlssm::relation_aggregate",
        relagg_backward_with(lambda *a: torch.ops.vlssm.relation_aggregate_backward(*a)),
        setup_context=relagg_setup_context)
    torch.library.register_autograd(
        "vlssm::kcr_loss", kcr_backward_with(lambda *a: torch.ops.vlssm.kcr_loss_backward(*a)),
        setup_context=kcr_setup_context)
