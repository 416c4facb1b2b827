"""MVLR's Interaction and Fusion Module (IFM) on vlssm's fused label-attention ops.

With hard and soft label embeddings T^hard, T^soft (C, d) and visual tokens X
(B, M, d)::

    T^ka, M^ka = SelfAttn(T^hard)                        label attention (C x C map)
    T'^soft    = CrossAttn(T^soft, X)                     context-aware attention
    T^ca, M^ca = SelfAttn(T'^soft)
    T^ca       = T^ca + MLP([T^ka, T^ca])                 channel interaction
    L_kcr      = mean_j 1 - cos(t^ka_j, t^ca_j)           KCR loss
    T          = (a M^ka + (1 - a) M^ca) T^ca             relation aggregation, a in [0, 1]

Attention is single-projection (W_Q, W_K, W_V; no output projection),
softmax(Q K^T / sqrt(d_head)) V, with ``heads`` heads; the returned maps are
averaged over heads. M^ka and T^ka do not depend on the image: they are
computed once per forward (not per image) and, in eval mode with T^hard and the
label-attention weights frozen, cached across forwards until any of them changes.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn

from .. import ops
from .._backend import check_backend

__all__ = ["IFM", "IFMOutput", "LabelAttention"]


class IFMOutput(NamedTuple):
    labels: torch.Tensor    # T (B, C, d): aggregated label features
    kcr_loss: torch.Tensor  # 0-dim
    m_ka: torch.Tensor      # (C, C) label-attention map (averaged over heads)
    m_ca: torch.Tensor      # (B, C, C) context-aware map (averaged over heads)


class LabelAttention(nn.Module):
    """Single-projection multi-head attention returning its map.

    ``forward(query (..., Lq, d), context (..., Lk, d) or None) -> (out (..., Lq, d),
    probs (..., Lq, Lk))``: Q = query W_Q^T, K = context W_K^T, V = context W_V^T
    (no biases, no output projection), probs averaged over heads. ``context=None``
    is self-attention. A (Lq, d) query with a (B, Lk, d) context is broadcast
    over the batch without a copy of the projected query.
    """

    def __init__(self, d: int, heads: int = 1, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if d % heads:
            raise ValueError(f"d ({d}) must be divisible by heads ({heads})")
        self.d, self.heads, self.backend = d, heads, backend
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(d, d, bias=False, **kw)
        self.k_proj = nn.Linear(d, d, bias=False, **kw)
        self.v_proj = nn.Linear(d, d, bias=False, **kw)

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}, backend={self.backend!r}"

    def _split(self, t: torch.Tensor, batch: Tuple[int, ...]) -> torch.Tensor:
        # (..., L, d) -> (*batch, heads, L, d_head)
        L = t.shape[-2]
        t = t.reshape(*t.shape[:-1], self.heads, self.d // self.heads).transpose(-3, -2)
        return t.expand(*batch, self.heads, L, self.d // self.heads)

    def folds(self, n_query: int, n_context: int) -> bool:
        """Whether :meth:`forward` with a label (Lq, d) query over a (B, Lk, d) context
        folds W_K into the query and W_V after the attention (see :meth:`forward`).

        Per image, folding costs 2 H Lq Lk d + Lq d^2 multiply-adds (scores and P X over
        the full width per head, then W_V on Lq rows) instead of 2 Lk d^2 + 2 Lq Lk d
        (K and V of every context token, then per-head scores and P V).
        """
        h, d = self.heads, self.d
        return 2 * h * n_query * n_context * d + n_query * d * d < 2 * n_context * d * d + 2 * n_query * n_context * d

    def forward(self, query: torch.Tensor, context: Optional[torch.Tensor] = None):
        """Attention of ``query`` over ``context`` (itself when None): ``(out, probs)``.

        A label query (Lq, d) over a batched context (B, Lk, d) with Lq small next to
        Lk (:meth:`folds`) never projects the context: per head h,
        ``Q_h K_h^T = (Q_h W_K,h) X^T`` and ``P_h V_h = (P_h X) W_V,h^T``, so the
        attention runs on X itself with the folded query ``Q_h W_K,h`` (Lq, d) and
        W_V is applied to the Lq output rows instead of the Lk context rows. Same
        values (no biases), a fraction of the multiply-adds when Lq << Lk.
        """
        ctx = query if context is None else context
        batch = torch.broadcast_shapes(query.shape[:-2], ctx.shape[:-2])
        h, dh = self.heads, self.d // self.heads
        if context is not None and query.dim() == 2 and ctx.dim() >= 3 and self.folds(query.shape[0], ctx.shape[-2]):
            q = self.q_proj(query).view(-1, h, dh).transpose(0, 1)                   # (h, Lq, dh)
            q_folded = q @ self.k_proj.weight.view(h, dh, self.d)                   # (h, Lq, d)
            x = ctx.unsqueeze(-3)                                                   # (*b, 1, Lk, d)
            px, probs = ops.attention_with_probs(q_folded, x, x, scale=dh ** -0.5, backend=self.backend)
            if h == 1:  # one (B Lq, d) x (d, d) GEMM (and one for dW_V), not a batched one per image
                out = torch.nn.functional.linear(px, self.v_proj.weight)            # (*b, 1, Lq, d)
            else:
                out = torch.einsum("...hcd,hed->...hce", px, self.v_proj.weight.view(h, dh, self.d))
        else:
            q = self._split(self.q_proj(query), batch)
            k = self._split(self.k_proj(ctx), batch)
            v = self._split(self.v_proj(ctx), batch)
            out, probs = ops.attention_with_probs(q, k, v, backend=self.backend)  # (*b, h, Lq, dh), (*b, h, Lq, Lk)
        out = out.transpose(-3, -2).reshape(*batch, query.shape[-2], self.d)
        return out, (probs.squeeze(-3) if h == 1 else probs.mean(dim=-3))


class IFM(nn.Module):
    """Interaction and Fusion Module.

    Args:
        d: embedding width.
        heads: attention heads (maps are averaged over heads).
        mlp_ratio: hidden width of the channel-interaction MLP, times d.
        alpha_init: initial relation-aggregation weight a (kept in [0, 1] as
            sigmoid of a learnable logit; the paper's best a = 0.5).
        backend: passed to every op call (None, "auto", "cpu", "triton", "reference").

    ``forward(x (B, M, d), t_hard (C, d), t_soft (C, d)) -> IFMOutput``.
    """

    def __init__(self, d: int, heads: int = 1, mlp_ratio: float = 1.0, alpha_init: float = 0.5,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        backend = check_backend(backend)
        if not 0.0 < alpha_init < 1.0:
            raise ValueError(f"alpha_init must be in (0, 1), got {alpha_init}")
        kw = {"device": device, "dtype": dtype}
        self.d, self.heads, self._backend = d, heads, backend
        self.label_attn = LabelAttention(d, heads, backend, **kw)
        self.cross_attn = LabelAttention(d, heads, backend, **kw)
        self.context_attn = LabelAttention(d, heads, backend, **kw)
        hidden = max(1, int(round(mlp_ratio * d)))
        self.mlp = nn.Sequential(nn.Linear(2 * d, hidden, **kw), nn.GELU(), nn.Linear(hidden, d, **kw))
        logit = torch.logit(torch.tensor(float(alpha_init)))
        self.alpha_logit = nn.Parameter(logit.to(device=device, dtype=dtype or torch.get_default_dtype()))
        self._cache: Optional[Tuple[tuple, Tuple[torch.Tensor, torch.Tensor]]] = None

    @property
    def backend(self) -> Optional[str]:
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        value = check_backend(value)
        self._backend = value
        for m in (self.label_attn, self.cross_attn, self.context_attn):
            m.backend = value
        self._cache = None

    @property
    def alpha(self) -> torch.Tensor:
        """The relation-aggregation weight a = sigmoid(alpha_logit), in [0, 1]."""
        return torch.sigmoid(self.alpha_logit)

    def extra_repr(self) -> str:
        return f"d={self.d}, heads={self.heads}, backend={self._backend!r}"

    def _check(self, x: torch.Tensor, t_hard: torch.Tensor, t_soft: torch.Tensor) -> None:
        for name, t, shape in (("x", x, "(batch, M, d)"), ("t_hard", t_hard, "(C, d)"), ("t_soft", t_soft, "(C, d)")):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            want = 3 if name == "x" else 2
            if t.dim() != want or t.shape[-1] != self.d or 0 in t.shape:
                raise ValueError(f"{name} must have shape {shape} with d = {self.d}, got {tuple(t.shape)}")
            if t.dtype != x.dtype:
                raise TypeError(f"{name} must have dtype {x.dtype} like x, got {t.dtype}")
            if t.device != x.device:
                raise ValueError(f"{name} must be on {x.device} like x, got {t.device}")
        if t_soft.shape[0] != t_hard.shape[0]:
            raise ValueError(f"t_soft must have shape (C, d) = {tuple(t_hard.shape)} like t_hard, "
                             f"got {tuple(t_soft.shape)}")

    def label_attention(self, t_hard: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(T^ka (C, d), M^ka (C, C)); cached in eval mode while nothing it reads changes."""
        params = (t_hard, *self.label_attn.parameters())
        # Frozen: no gradient can flow to anything label attention reads.
        frozen = not torch.is_grad_enabled() or not any(p.requires_grad for p in params)
        cacheable = not self.training and frozen
        key = tuple((id(p), p._version, p.data_ptr()) for p in params) + (self._backend,)
        if cacheable and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        value = self.label_attn(t_hard)
        self._cache = (key, tuple(v.detach() for v in value)) if cacheable else None
        return value

    def _interaction(self, t_ka: torch.Tensor, t_ca: torch.Tensor) -> torch.Tensor:
        """MLP([T^ka, T^ca]) with T^ka (C, d) shared by the batch: the first layer
        ``W [T^ka, T^ca] + b = W_:d T^ka + (W_d: T^ca + b)`` applies W_:d to the C label
        rows once, not to B copies of them, and never builds the (B, C, 2d) concatenation."""
        first, act, second = self.mlp
        d = self.d
        hidden = torch.nn.functional.linear(t_ca, first.weight[:, d:], first.bias)   # (B, C, hidden)
        hidden = hidden + torch.nn.functional.linear(t_ka, first.weight[:, :d])       # + (C, hidden)
        return second(act(hidden))

    def forward(self, x: torch.Tensor, t_hard: torch.Tensor, t_soft: torch.Tensor) -> IFMOutput:
        self._check(x, t_hard, t_soft)
        t_ka, m_ka = self.label_attention(t_hard)             # (C, d), (C, C): once per forward
        t_ctx, _ = self.cross_attn(t_soft, x)                  # (B, C, d)
        t_ca, m_ca = self.context_attn(t_ctx)                  # (B, C, d), (B, C, C)
        t_ca = t_ca + self._interaction(t_ka, t_ca)
        loss = ops.kcr_loss(t_ka, t_ca, backend=self._backend)
        labels = ops.relation_aggregate(m_ka, m_ca, t_ca, self.alpha.to(t_ca.dtype), backend=self._backend)
        return IFMOutput(labels, loss, m_ka, m_ca)
