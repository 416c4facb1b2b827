"""QMVL: the quadruplet Mamba vision-language layer (docs/design.md section 1).

For visual tokens ``x`` (B, M, d) and label tokens ``t`` (B, C, d) or (C, d)::

    y1 = label_block([x, t])[:, M:]                 # H1 = [X, T]
    y2 = flip(label_block([x, flip(t)])[:, M:])     # H2 = [X, inv(T)]
    y3 = visual_block([t, x])[:, C:]                # H3 = [T, X]
    y4 = flip(visual_block([t, flip(x)])[:, C:])    # H4 = [T, inv(X)]
    x_rf = x + y3 + y4        t_rf = t + y1 + y2    (residual=True)

``fused=True`` computes each pair (y1 + y2, y3 + y4) with one
:meth:`MambaBlock.fork <vlssm.modules.MambaBlock.fork>` (no cat, no flip, the
prefix computed once); ``fused=False`` runs the literal four-sequence
composition through :func:`vlssm.ops.selective_scan`. Both compute the same
function to rounding, forward and backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

from .._backend import check_backend
from .mamba import MambaBlock

__all__ = ["QMVL"]


class QMVL(nn.Module):
    """Quadruplet Mamba vision-language layer.

    Args:
        d_model: token width ``d`` of both visual and label tokens.
        d_state, d_conv, expand: Mamba mixer sizes (N, K, E / d).
        residual: add the inputs to the outputs (``x + y3 + y4``, ``t + y1 + y2``).
        fused: use the fused shared-prefix fork (default) instead of the
            literal four-sequence composition.
        backend: ``None`` (``VLSSM_BACKEND`` or ``"auto"``), ``"auto"``,
            ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; passed to every op call. With
            ``"reference"`` and ``fused=False`` this is the pure-PyTorch
            reference composition.
        device, dtype: factory arguments of the parameters.
        **mamba_kwargs: further :class:`vlssm.modules.Mamba` arguments
            (dt_rank, dt_min, dt_max, ...), given to both blocks.

    Submodules: ``label_block`` and ``visual_block``, each a
    :class:`vlssm.modules.MambaBlock` (LayerNorm + Mamba mixer, mamba_ssm
    parameter names).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        residual: bool = True,
        fused: bool = True,
        backend: Optional[str] = "auto",
        device=None,
        dtype=None,
        **mamba_kwargs,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.residual = bool(residual)
        self.fused = bool(fused)
        backend = check_backend(backend)
        kw = dict(d_state=d_state, d_conv=d_conv, expand=expand, backend=backend, device=device, dtype=dtype)
        self.label_block = MambaBlock(d_model, **kw, **mamba_kwargs)
        self.visual_block = MambaBlock(d_model, **kw, **mamba_kwargs)
        self._backend = backend

    @property
    def backend(self) -> Optional[str]:
        """The backend given to every op call; setting it updates both blocks."""
        return self._backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        value = check_backend(value)
        self.label_block.backend = value
        self.visual_block.backend = value
        self._backend = value

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, fused={self.fused}, residual={self.residual}, backend={self._backend!r}"

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor) -> None:
        d = self.d_model
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (batch, M, {d}), got {type(x).__name__}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"t must be a torch.Tensor of shape (batch, C, {d}) or (C, {d}), got {type(t).__name__}"
            )
        if x.dim() != 3 or x.shape[-1] != d:
            raise ValueError(f"x must have shape (batch, M, {d}), got {tuple(x.shape)}")
        if t.dim() not in (2, 3) or t.shape[-1] != d:
            raise ValueError(f"t must have shape (batch, C, {d}) or (C, {d}), got {tuple(t.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must be non-empty with shape (batch, M, {d}), got {tuple(x.shape)}")
        if t.shape[-2] == 0:
            raise ValueError(f"t must be non-empty with shape (batch, C, {d}) or (C, {d}), got {tuple(t.shape)}")
        if t.dim() == 3 and t.shape[0] != x.shape[0]:
            raise ValueError(
                f"t must have shape (batch, C, {d}) with the batch of x ({x.shape[0]}) or (C, {d}), "
                f"got {tuple(t.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if t.dtype != x.dtype:
            raise TypeError(f"t must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"t must be on the device of x ({x.device}), got {t.device}")
        w = self.label_block.mixer.in_proj.weight
        if x.device != w.device:
            raise ValueError(f"x must be on the module's device ({w.device}), got {x.device}")
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x must have the module's parameter dtype ({w.dtype}), got {x.dtype}")

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Refine visual and label tokens.

        Args:
            x: visual tokens (B, M, d).
            t: label tokens (B, C, d), or (C, d) shared by every image
                (broadcast without a copy).
        Returns:
            ``(x_rf, t_rf)`` of shapes (B, M, d) and (B, C, d).
        """
        self._check_inputs(x, t)
        if self.fused:
            t_out = self.label_block.fork(x, t)  # y1 + y2: prefix X, suffix T
            x_out = self.visual_block.fork(t, x)  # y3 + y4: prefix T, suffix X
        else:
            x_out, t_out = self._unfused(x, t)
        if self.residual:
            return x + x_out, t + t_out
        return x_out, t_out

    def _unfused(self, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The literal four-sequence composition: returns (y3 + y4, y1 + y2)."""
        B, M, _ = x.shape
        C = t.shape[-2]
        if t.dim() == 2:
            t = t.expand(B, C, self.d_model)
        lb, vb = self.label_block, self.visual_block
        y1 = lb(torch.cat([x, t], dim=1))[:, M:]
        y2 = lb(torch.cat([x, t.flip(1)], dim=1))[:, M:].flip(1)
        y3 = vb(torch.cat([t, x], dim=1))[:, C:]
        y4 = vb(torch.cat([t, x.flip(1)], dim=1))[:, C:].flip(1)
        return y3 + y4, y1 + y2
