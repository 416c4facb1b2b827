"""FLOP formulas of vlssm's custom ops, for :mod:`torch.utils.flop_counter`.

:func:`register` gives every ``torch.ops.vlssm.<op>`` (the compiled kernels, once
``vlssm._C`` is loaded) and ``torch.ops.vlssm.<op>_triton`` (once
:mod:`vlssm.kernels` has defined them) a formula, so that
``torch.utils.flop_counter.FlopCounterMode`` counts them instead of adding 0.
``import vlssm.ops`` (which every use of the ops implies: ``vlssm.QMVL`` and the
other modules import it) registers them; a ``FlopCounterMode`` snapshots the
registry when it is constructed, so construct it after that import
(:func:`vlssm.profile.count_flops` does).

Conventions (torch's): a multiply-add counts 2 FLOPs (a matmul ``2*m*n*k``);
biases, elementwise ops, activations, softmax and norms count 0. On top of
that, the analytic QMVL model (:mod:`vlssm.profile.flops`):

=============================  ==================================================
op                             forward FLOPs
=============================  ==================================================
selective_scan                 ``9*b*D*L*N`` + ``b*D*L`` (D given) + ``b*D*L`` (z given)
fork_scan                      ``9*b*(p+2s)*E*N`` + ``b*(p+2s)*E`` (D) + ``b*s*E`` (z)
fork_conv1d                    ``2*K*E*b*(p+2s)`` (bias and SiLU free)
attention_with_probs           ``2*n*Lq*Lk*d + 2*n*Lq*Lk*dv`` (torch's sdpa formula)
relation_aggregate             ``2*B*C*C*d`` (the map mixing is elementwise: free)
kcr_loss                       ``2*R*d``: the row dot products (the norms: free)
=============================  ==================================================

The scan's 9 FLOPs per (token, channel, state) are VMamba's
``flops_selective_scan_fn`` convention (delta*A, exp, delta*B*u, the state
update, the readout, the discretisation); the D skip and the SiLU(z) gate count
1 per (token, channel). fork_scan counts the skip over all p + 2s scanned tokens,
as :func:`vlssm.profile.flops.mamba_block_flops` does, although the prefix's skip
term is never needed (it overstates by ``b*p*E``, 1/(9N) of the prefix's scan).

Every ``*_backward`` op counts twice its forward, the convention torch uses for
mm (``grad_a = g b^T``, ``grad_b = a^T g``: two forward-sized products) and for
convolutions (grad_input + grad_weight):

- attention_with_probs_backward: ``dv = P^T dout``, ``dP = dout v^T``,
  ``dq = dS k``, ``dk = dS^T q``: four matmuls, what autograd counts for the
  matmul reference. (torch's sdpa backward counts five: flash attention does
  not keep P and recomputes ``q k^T``; this op gets P as an input.)
- selective_scan / fork_scan backward: the scan is linear in (u, B, C) and the
  adjoint recurrence walks the same (token, channel, state) grid once more, so
  2x the forward, as for mm. The recomputation of the states from the
  checkpoints (another pass of the forward recurrence) is an implementation
  detail of the memory-saving kernels and is not counted, like activation
  checkpointing's recomputation is not part of an op's formula; with it the
  backward is about 3x. ``fwd + bwd = 3 * fwd`` as for a matmul-only model.
- fork_conv1d_backward: grad input + grad weight, each one forward (torch's
  convolution_backward with both outputs); the bias grad is a sum: free.
- relation_aggregate_backward: ``d(mixed) = g t^T`` and ``dt = mixed^T g``;
  dalpha and the split into dm_ka / dm_ca are elementwise: free.
- kcr_loss_backward: twice the dot products, as for a (1 x d) @ (d x 1) bmm.

The formulas take the op's arguments with every tensor replaced by its shape
(``torch.Size``; tensors work too), optional tensors that are absent as None,
scalars as they are, and ``out_shape`` (the outputs' shapes) as a keyword.

torch's own registry also misses ops the usual counters (fvcore, thop) count,
which vlssm's models run on CPU: scaled_dot_product_attention's CPU kernel
(``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward: torch
counts its sdpa formula only for the CUDA kernels), ``nn.MultiheadAttention``'s
inference fast path (``aten._native_multi_head_attention``: projections and
attention), and the matrix-vector products behind ``torch.matmul`` with a 1-D
operand (``aten.mv``, ``aten.addmv``, ``aten.dot``, ``aten.vdot``) and
``torch.addbmm``. :func:`register` registers :data:`TORCH_GAP_FORMULAS` for
those that this torch has and has no formula for. It leaves torch's own formulas
alone, including one that miscounts: ``aten.convolution_backward`` counts a
grouped conv's weight gradient as if the conv were dense (``groups`` times too
much; E times for the depthwise ``nn.Conv1d`` of the unfused Mamba, torch 2.14).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

__all__ = [
    "SCAN_FLOPS_PER_STATE", "FORMULAS", "TORCH_GAP_FORMULAS", "register",
    "selective_scan_flop", "selective_scan_backward_flop", "fork_conv1d_flop", "fork_conv1d_backward_flop",
    "fork_scan_flop", "fork_scan_backward_flop", "attention_with_probs_flop", "attention_with_probs_backward_flop",
    "relation_aggregate_flop", "relation_aggregate_backward_flop", "kcr_loss_flop", "kcr_loss_backward_flop",
    "sdpa_cpu_flop", "sdpa_cpu_backward_flop", "native_multi_head_attention_flop", "mv_flop", "addmv_flop",
    "dot_flop", "addbmm_flop",
]

#: FLOPs per (token, channel, state element) of the selective scan (as in vlssm.profile.flops;
#: vlssm.ops does not import vlssm.profile).
SCAN_FLOPS_PER_STATE = 9

#: A shape as the flop counter passes it (torch.Size), or a tensor (its shape is used).
ShapeLike = Union[Sequence[int], torch.Tensor]


def _shape(x: ShapeLike) -> Sequence[int]:
    return x.shape if isinstance(x, torch.Tensor) else x


def _prod(dims) -> int:
    return math.prod(dims)


# --------------------------------------------------------------------------
# vlssm ops


def selective_scan_flop(u: ShapeLike, delta: ShapeLike, A: ShapeLike, B: ShapeLike, C: ShapeLike,
                        D: Optional[ShapeLike] = None, z: Optional[ShapeLike] = None, *args: Any,
                        out_shape: Any = None, **kwargs: Any) -> int:
    """``selective_scan(u, delta, A, B, C, D?, z?, delta_bias?, initial_state?, delta_softplus, reverse)``.

    u, delta, z: (b, D, L); A: (D, N); B, C: (b, N, L), grouped (b, G, N, L) or input-independent
    (D, N): the count does not depend on their layout; D: (D,) or None.
    FLOPs ``9*b*D*L*N`` (the scan) ``+ b*D*L`` if D (the skip ``D*u``) ``+ b*D*L`` if z
    (the gate ``* silu(z)``). delta_bias, softplus, initial_state: free.
    """
    b, dim, L = _shape(u)
    N = _shape(A)[1]
    tokens = b * dim * L
    flops = SCAN_FLOPS_PER_STATE * tokens * N
    if D is not None:
        flops += tokens
    if z is not None:
        flops += tokens
    return flops


def selective_scan_backward_flop(dout: ShapeLike, dlast_state: Optional[ShapeLike], u: ShapeLike,
                                 delta: ShapeLike, A: ShapeLike, B: ShapeLike, C: ShapeLike,
                                 D: Optional[ShapeLike] = None, z: Optional[ShapeLike] = None, *args: Any,
                                 out_shape: Any = None, **kwargs: Any) -> int:
    """``selective_scan_backward(dout, dlast_state?, u, delta, A, B, C, D?, z?, delta_bias?, initial_state?,
    checkpoints, delta_softplus, reverse)``: ``2 *`` :func:`selective_scan_flop` (u (b, D, L), A (D, N));
    the recomputation from the checkpoints is not counted (module docstring)."""
    return 2 * selective_scan_flop(u, delta, A, B, C, D, z)


def fork_conv1d_flop(x_prefix: ShapeLike, x_suffix: ShapeLike, weight: ShapeLike, bias: Optional[ShapeLike] = None,
                     *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``fork_conv1d(x_prefix, x_suffix, weight, bias?)``: x_prefix (b, p, E), x_suffix (b, s, E),
    weight (E, K) -> y (b, p + 2s, E).

    FLOPs ``2*K*E*b*(p + 2s)``: a depthwise conv's ``2*K`` per channel per output, over the
    prefix once and the suffix in both orders. Bias and SiLU: free (torch's conv convention).
    """
    b, p, E = _shape(x_prefix)
    s = _shape(x_suffix)[1]
    K = _shape(weight)[1]
    return 2 * K * E * b * (p + 2 * s)


def fork_conv1d_backward_flop(dy: ShapeLike, x_prefix: ShapeLike, x_suffix: ShapeLike, weight: ShapeLike,
                              bias: Optional[ShapeLike] = None, *args: Any, out_shape: Any = None,
                              **kwargs: Any) -> int:
    """``fork_conv1d_backward(dy, x_prefix, x_suffix, weight, bias?)``: grad input + grad weight,
    ``2 *`` :func:`fork_conv1d_flop` = ``4*K*E*b*(p + 2s)``; the bias grad (a sum): free."""
    return 2 * fork_conv1d_flop(x_prefix, x_suffix, weight)


def fork_scan_flop(u: ShapeLike, delta: ShapeLike, A: ShapeLike, B: ShapeLike, C: ShapeLike,
                   D: Optional[ShapeLike], z: Optional[ShapeLike], delta_bias: Optional[ShapeLike],
                   prefix_len: int, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``fork_scan(u, delta, A, B, C, D?, z?, delta_bias?, prefix_len, delta_softplus)``.

    u, delta: (b, p + 2s, E) token-major (the prefix once, the suffix forward and reversed);
    A: (E, N); z: (b, s, E) or None; p = prefix_len; B, C in any layout. Output (b, s, E).
    FLOPs ``9*b*(p+2s)*E*N`` (the scan) ``+ b*(p+2s)*E`` if D (the skip, counted over all
    scanned tokens like vlssm.profile.flops.mamba_block_flops) ``+ b*s*E`` if z (the gate).
    """
    b, L, E = _shape(u)
    N = _shape(A)[1]
    s = (L - prefix_len) // 2
    flops = SCAN_FLOPS_PER_STATE * b * L * E * N
    if D is not None:
        flops += b * L * E
    if z is not None:
        flops += b * s * E
    return flops


def fork_scan_backward_flop(dout: ShapeLike, u: ShapeLike, delta: ShapeLike, A: ShapeLike, B: ShapeLike,
                            C: ShapeLike, D: Optional[ShapeLike], z: Optional[ShapeLike],
                            delta_bias: Optional[ShapeLike], ysum: ShapeLike, checkpoints: ShapeLike,
                            prefix_len: int, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``fork_scan_backward(dout, u, delta, A, B, C, D?, z?, delta_bias?, ysum, checkpoints, prefix_len,
    delta_softplus)``: ``2 *`` :func:`fork_scan_flop` (u (b, p + 2s, E), A (E, N), z (b, s, E))."""
    return 2 * fork_scan_flop(u, delta, A, B, C, D, z, delta_bias, prefix_len)


def _attention_dims(q: ShapeLike, k: ShapeLike, v: ShapeLike):
    q, k, v = _shape(q), _shape(k), _shape(v)
    n = _prod(torch.broadcast_shapes(tuple(q[:-2]), tuple(k[:-2]), tuple(v[:-2])))
    return n, q[-2], k[-2], q[-1], v[-1]


def attention_with_probs_flop(q: ShapeLike, k: ShapeLike, v: ShapeLike, *args: Any, out_shape: Any = None,
                              **kwargs: Any) -> int:
    """``attention_with_probs(q, k, v, scale)``: q (n, Lq, d), k (n, Lk, d), v (n, Lk, dv).

    FLOPs ``2*n*Lq*Lk*d`` (q k^T) ``+ 2*n*Lq*Lk*dv`` (P v): torch's sdpa formula; the scale and
    the softmax are free. Writing P out costs no FLOPs.
    """
    n, Lq, Lk, d, dv = _attention_dims(q, k, v)
    return 2 * n * Lq * Lk * d + 2 * n * Lq * Lk * dv


def attention_with_probs_backward_flop(dout: ShapeLike, dprobs: Optional[ShapeLike], q: ShapeLike, k: ShapeLike,
                                       v: ShapeLike, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``attention_with_probs_backward(dout, dprobs?, q, k, v, probs, scale)``: the four matmuls
    ``dv = P^T dout`` (``2*n*Lk*Lq*dv``), ``dP = dout v^T`` (``2*n*Lq*dv*Lk``), ``dq = dS k``
    (``2*n*Lq*Lk*d``), ``dk = dS^T q`` (``2*n*Lk*Lq*d``): ``2 *`` :func:`attention_with_probs_flop`.
    The softmax backward is free; P is an input, so ``q k^T`` is not recomputed."""
    return 2 * attention_with_probs_flop(q, k, v)


def relation_aggregate_flop(m_ka: ShapeLike, m_ca: ShapeLike, t_ca: ShapeLike, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    """``relation_aggregate(m_ka, m_ca, t_ca, alpha)``: m_ka (C, C) or (B, C, C), m_ca (B, C, C),
    t_ca (B, C, d) -> (B, C, d).

    FLOPs ``2*B*C*C*d``: the product of the mixed (B, C, C) map with t_ca. The mixing
    ``alpha*m_ka + (1-alpha)*m_ca`` is elementwise: free.
    """
    B, C, C2 = _shape(m_ca)
    d = _shape(t_ca)[-1]
    return 2 * B * C * C2 * d


def relation_aggregate_backward_flop(grad: ShapeLike, m_ka: ShapeLike, m_ca: ShapeLike, t_ca: ShapeLike,
                                     *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``relation_aggregate_backward(grad, m_ka, m_ca, t_ca, alpha)``: ``d(mixed) = grad t^T`` and
    ``dt = mixed^T grad``, ``2 *`` :func:`relation_aggregate_flop` = ``4*B*C*C*d``. dalpha, the
    split into dm_ka / dm_ca and the batch sum of a (C, C) m_ka's grad: free."""
    return 2 * relation_aggregate_flop(m_ka, m_ca, t_ca)


def _kcr_rows_dim(t_ka: ShapeLike, t_ca: ShapeLike):
    a, b = _shape(t_ka), _shape(t_ca)
    return _prod(torch.broadcast_shapes(tuple(a[:-1]), tuple(b[:-1]))), a[-1]


def kcr_loss_flop(t_ka: ShapeLike, t_ca: ShapeLike, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``kcr_loss(t_ka, t_ca, eps)``: t_ka, t_ca (..., C, d), leading dims broadcast to R rows.

    FLOPs ``2*R*d``: the row dot products ``t_ka . t_ca`` (a (1, d) @ (d, 1) product per row).
    The two norms, the division and the mean: free (torch counts no norm).
    """
    R, d = _kcr_rows_dim(t_ka, t_ca)
    return 2 * R * d


def kcr_loss_backward_flop(grad: ShapeLike, t_ka: ShapeLike, t_ca: ShapeLike, *args: Any, out_shape: Any = None,
                           **kwargs: Any) -> int:
    """``kcr_loss_backward(grad, t_ka, t_ca, stats, eps)``: ``2 *`` :func:`kcr_loss_flop` = ``4*R*d``
    (a grad per operand of the dot products, as for bmm)."""
    return 2 * kcr_loss_flop(t_ka, t_ca)


#: vlssm op name -> formula; registered for ``torch.ops.vlssm.<name>`` and ``torch.ops.vlssm.<name>_triton``.
FORMULAS: Dict[str, Callable[..., int]] = {
    "selective_scan": selective_scan_flop,
    "selective_scan_backward": selective_scan_backward_flop,
    "fork_conv1d": fork_conv1d_flop,
    "fork_conv1d_backward": fork_conv1d_backward_flop,
    "fork_scan": fork_scan_flop,
    "fork_scan_backward": fork_scan_backward_flop,
    "attention_with_probs": attention_with_probs_flop,
    "attention_with_probs_backward": attention_with_probs_backward_flop,
    "relation_aggregate": relation_aggregate_flop,
    "relation_aggregate_backward": relation_aggregate_backward_flop,
    "kcr_loss": kcr_loss_flop,
    "kcr_loss_backward": kcr_loss_backward_flop,
}


# --------------------------------------------------------------------------
# aten ops torch's counter misses


def _sdpa_dims(query: ShapeLike, key: ShapeLike, value: ShapeLike):
    q, k, v = _shape(query), _shape(key), _shape(value)
    return _prod(q[:-2]), q[-2], k[-2], q[-1], v[-1]  # key / value heads are broadcast to the query's


def sdpa_cpu_flop(query: ShapeLike, key: ShapeLike, value: ShapeLike, *args: Any, out_shape: Any = None,
                  **kwargs: Any) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, ...)``: query
    (b, h, Lq, d), key (b, h_kv, Lk, d), value (b, h_kv, Lk, dv) (h_kv divides h): torch's sdpa
    formula ``2*b*h*Lq*Lk*d + 2*b*h*Lq*Lk*dv``. Masks and causality are not modelled (as torch's)."""
    n, Lq, Lk, d, dv = _sdpa_dims(query, key, value)
    return 2 * n * Lq * Lk * d + 2 * n * Lq * Lk * dv


def sdpa_cpu_backward_flop(grad_out: ShapeLike, query: ShapeLike, key: ShapeLike, value: ShapeLike, *args: Any,
                           out_shape: Any = None, **kwargs: Any) -> int:
    """``aten._scaled_dot_product_flash_attention_for_cpu_backward(grad_out, query, key, value, ...)``:
    torch's sdpa backward formula, five matmuls: the scores ``q k^T`` recomputed (``2*n*Lq*Lk*d``),
    ``dP = dout v^T`` and ``dv = P^T dout`` (``2*n*Lq*Lk*dv`` each), ``dq = dS k`` and ``dk = dS^T q``
    (``2*n*Lq*Lk*d`` each), n = b*h: ``2*n*Lq*Lk*(3d + 2dv)``."""
    n, Lq, Lk, d, dv = _sdpa_dims(query, key, value)
    return 2 * n * Lq * Lk * (3 * d + 2 * dv)


def native_multi_head_attention_flop(query: ShapeLike, key: ShapeLike, value: ShapeLike, embed_dim: int,
                                     num_head: int, qkv_weight: ShapeLike, *args: Any, out_shape: Any = None,
                                     **kwargs: Any) -> int:
    """``aten._native_multi_head_attention(query, key, value, embed_dim, num_head, qkv_weight, qkv_bias,
    proj_weight, proj_bias, ...)`` (``nn.MultiheadAttention``'s inference fast path).

    query (..., Lq, E), key / value (..., Lk, E), qkv_weight (3E, E): the in-projections
    ``2*E*E*(nq + nk + nv)`` (n* = tokens of each input), the attention ``2 * 2*n*Lq*Lk*E``
    (summed over the heads; n = the batch) and the out-projection ``2*nq*E*E``: what the
    training path's mm / bmm count. Biases, softmax, masks: free.
    """
    q, k, v = _shape(query), _shape(key), _shape(value)
    E = embed_dim
    E_in = _shape(qkv_weight)[-1]
    nq, nk, nv = _prod(q[:-1]), _prod(k[:-1]), _prod(v[:-1])
    n = _prod(q[:-2])
    return 2 * E * E_in * (nq + nk + nv) + 2 * 2 * n * q[-2] * k[-2] * E + 2 * nq * E * E


def mv_flop(mat: ShapeLike, vec: ShapeLike, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``aten.mv(mat (m, n), vec (n,))``: ``2*m*n`` (mm's formula with one column)."""
    m, n = _shape(mat)
    return 2 * m * n


def addmv_flop(self_: ShapeLike, mat: ShapeLike, vec: ShapeLike, *args: Any, out_shape: Any = None,
               **kwargs: Any) -> int:
    """``aten.addmv(self, mat (m, n), vec (n,))``: ``2*m*n`` (the add is free, like addmm's)."""
    return mv_flop(mat, vec)


def dot_flop(a: ShapeLike, b: ShapeLike, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """``aten.dot`` / ``aten.vdot`` of two (n,) vectors: ``2*n``."""
    return 2 * _shape(a)[0]


def addbmm_flop(self_: ShapeLike, batch1: ShapeLike, batch2: ShapeLike, *args: Any, out_shape: Any = None,
                **kwargs: Any) -> int:
    """``aten.addbmm(self, batch1 (b, m, k), batch2 (b, k, n))``: ``2*b*m*n*k`` (bmm's; the batch
    sum and the add are free, like baddbmm's)."""
    b, m, k = _shape(batch1)
    n = _shape(batch2)[-1]
    return 2 * b * m * n * k


#: aten op name -> formula, registered where this torch has the op and no formula for it.
TORCH_GAP_FORMULAS: Dict[str, Callable[..., int]] = {
    "_scaled_dot_product_flash_attention_for_cpu": sdpa_cpu_flop,
    "_scaled_dot_product_flash_attention_for_cpu_backward": sdpa_cpu_backward_flop,
    "_native_multi_head_attention": native_multi_head_attention_flop,
    "mv": mv_flop,
    "addmv": addmv_flop,
    "dot": dot_flop,
    "vdot": dot_flop,
    "addbmm": addbmm_flop,
}


# --------------------------------------------------------------------------
# Registration


def _packet(namespace: str, name: str) -> Optional[torch._ops.OpOverloadPacket]:
    """``torch.ops.<namespace>.<name>`` or None when no such op is defined (yet)."""
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


def register() -> List[str]:
    """Register the formulas with ``torch.utils.flop_counter`` for every op that exists now and has none.

    Covers ``torch.ops.vlssm.<name>`` (defined once ``vlssm._C`` is loaded),
    ``torch.ops.vlssm.<name>_triton`` (defined when :mod:`vlssm.kernels` imports) and
    the aten ops of :data:`TORCH_GAP_FORMULAS` that torch counts as 0. Idempotent:
    call it again after more ops are defined; an op that already has a formula (ours,
    torch's, or the user's) keeps it. Returns the qualified names registered by this call.
    """
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    done = []
    targets = [("vlssm", op + suffix, f) for op, f in FORMULAS.items() for suffix in ("", "_triton")]
    targets += [("aten", op, f) for op, f in TORCH_GAP_FORMULAS.items()]
    for namespace, name, formula in targets:
        packet = _packet(namespace, name)
        if packet is None or packet in flop_registry:
            continue
        register_flop_formula(packet)(formula)
        done.append(f"{namespace}.{name}")
    return done
