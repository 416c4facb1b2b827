"""The Mamba mixer and the pre-norm Mamba block, with the fused shared-prefix fork.

:class:`Mamba` has exactly mamba_ssm's ``Mamba`` parameter names, shapes and
initialisation, so ``mixer.load_state_dict(mamba_ssm_mamba.state_dict())``
works both ways. Its :meth:`Mamba.forward` is mamba_ssm's (slow-path)
computation through :func:`vlssm.ops.selective_scan`.

:meth:`Mamba.fork` / :meth:`MambaBlock.fork` compute, for a prefix ``P`` and a
suffix ``S``, the sum of the suffix outputs of the two sequences ``[P, S]`` and
``[P, rev S]`` (the latter flipped back to token order) without concatenating or
flipping anything (docs/design.md section 2): the per-token work (norm, in_proj, the
gate and out_proj) runs once per token, the prefix is convolved and scanned
once, and the suffix twice (forward and reversed) by
:func:`vlssm.ops.fork_conv1d` and :func:`vlssm.ops.fork_scan`.

Notation: ``d`` = d_model, ``E`` = d_inner = expand * d, ``N`` = d_state,
``R`` = dt_rank, ``K`` = d_conv.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .._backend import check_backend
from .._dtypes import acc_dtype

__all__ = ["Mamba", "MambaBlock"]


def _acc(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in the scan's accumulation dtype for activations like ``like``.

    float64 for float64 activations, float32 otherwise (mamba_ssm's ``.float()``).
    """
    return t.to(acc_dtype(like.dtype))


def _check_tokens(name: str, t: torch.Tensor, d: int, allow_2d: bool) -> None:
    ranks = (2, 3) if allow_2d else (3,)
    shape = f"(batch, seqlen, {d})" + (f" or (seqlen, {d})" if allow_2d else "")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() not in ranks or t.shape[-1] != d:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_fork_inputs(prefix: Optional[torch.Tensor], suffix: torch.Tensor, d: int) -> int:
    """Validate fork inputs; return the batch size (1 when both are 2-D)."""
    _check_tokens("suffix", suffix, d, allow_2d=True)
    if suffix.shape[-2] == 0:
        raise ValueError(f"suffix must be non-empty with shape (batch, s, {d}) or (s, {d}), got {tuple(suffix.shape)}")
    if prefix is None:
        return suffix.shape[0] if suffix.dim() == 3 else 1
    _check_tokens("prefix", prefix, d, allow_2d=True)
    if prefix.dtype != suffix.dtype:
        raise TypeError(f"prefix and suffix must have the same dtype, got {prefix.dtype} and {suffix.dtype}")
    if prefix.device != suffix.device:
        raise ValueError(f"prefix and suffix must be on the same device, got {prefix.device} and {suffix.device}")
    if prefix.dim() == 3 and suffix.dim() == 3 and prefix.shape[0] != suffix.shape[0]:
        raise ValueError(
            f"prefix (batch, p, {d}) and suffix (batch, s, {d}) must have the same batch, "
            f"got {tuple(prefix.shape)} and {tuple(suffix.shape)}"
        )
    batch = [t.shape[0] for t in (prefix, suffix) if t.dim() == 3]
    if batch and batch[0] == 0:
        raise ValueError(f"batch must be non-empty, got prefix {tuple(prefix.shape)}, suffix {tuple(suffix.shape)}")
    return batch[0] if batch else 1


class Mamba(nn.Module):
    """mamba_ssm's ``Mamba`` mixer (selective SSM), computed with vlssm's ops.

    Args:
        d_model: width ``d`` of the tokens.
        d_state: SSM state size ``N``.
        d_conv: width ``K`` of the depthwise causal convolution.
        expand: ``E = expand * d``.
        dt_rank: rank ``R`` of the dt projection; ``"auto"`` = ceil(d / 16).
        dt_min, dt_max, dt_init, dt_scale, dt_init_floor: dt initialisation,
            as in mamba_ssm (softplus(dt_proj.bias) is log-uniform in
            [dt_min, dt_max], floored at dt_init_floor).
        conv_bias: bias of the convolution. bias: bias of in_proj and out_proj.
        backend: ``None`` (``VLSSM_BACKEND`` or ``"auto"``), ``"auto"``,
            ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``; passed to every op call.

    Parameters (mamba_ssm names): ``in_proj.weight`` (2E, d), ``conv1d.weight``
    (E, 1, K), ``conv1d.bias`` (E,), ``x_proj.weight`` (R + 2N, E),
    ``dt_proj.weight`` (E, R), ``dt_proj.bias`` (E,), ``A_log`` (E, N) float32,
    ``D`` (E,) float32, ``out_proj.weight`` (d, E).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.backend = check_backend(backend)

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            **factory_kwargs,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # Special dt projection init to preserve variance at initialisation.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")

        # dt bias so that softplus(dt_bias) is log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D real initialisation, kept in float32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        A = A.unsqueeze(0).repeat(self.d_inner, 1).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]

        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # float32
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"expand={self.expand}, dt_rank={self.dt_rank}, backend={self.backend!r}"
        )

    def _ssm_params(self, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = -exp(A_log) (E, N), D (E,), delta_bias (E,) in the accumulation dtype."""
        A = -torch.exp(_acc(self.A_log, like))
        return A, _acc(self.D, like), _acc(self.dt_proj.bias, like)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Mamba mixer over a whole sequence.

        Args:
            hidden_states: (B, L, d).
        Returns:
            (B, L, d).
        """
        _check_tokens("hidden_states", hidden_states, self.d_model, allow_2d=False)
        L = hidden_states.shape[1]
        N, R = self.d_state, self.dt_rank
        xz = self.in_proj(hidden_states)  # (B, L, 2E) token-major
        x, z = xz.chunk(2, dim=-1)  # views (B, L, E)
        # Causal depthwise conv + SiLU, channel-major (B, E, L).
        x = self.act(self.conv1d(x.transpose(1, 2))[..., :L])
        x_dbl = F.linear(x.transpose(1, 2), self.x_proj.weight)  # (B, L, R + 2N)
        dt = F.linear(x_dbl[..., :R], self.dt_proj.weight)  # (B, L, E), bias goes as delta_bias
        Bm = x_dbl[..., R : R + N].transpose(1, 2)  # (B, N, L) view
        Cm = x_dbl[..., R + N :].transpose(1, 2)  # (B, N, L) view
        A, D, delta_bias = self._ssm_params(x)
        y = ops.selective_scan(
            x,
            dt.transpose(1, 2),
            A,
            Bm,
            Cm,
            D,
            z=z.transpose(1, 2),
            delta_bias=delta_bias,
            delta_softplus=True,
            backend=self.backend,
        )  # (B, E, L)
        return self.out_proj(y.transpose(1, 2))

    def fork(self, prefix: Optional[torch.Tensor], suffix: torch.Tensor) -> torch.Tensor:
        """Suffix outputs of ``[P, S]`` plus those of ``[P, rev S]`` in token order.

        Equals ``self(cat([P, S]))[:, p:] + flip(self(cat([P, flip(S)]))[:, p:])``
        to rounding, computed without any cat or flip (docs/design.md section 2).

        Args:
            prefix: (B, p, d), or (p, d) shared by the whole batch, or None
                (empty prefix, p = 0).
            suffix: (B, s, d), or (s, d) shared by the whole batch; s > 0.
                A 2-D input runs in_proj once and is broadcast as a
                stride-0 view.
        Returns:
            (B, s, d), where B is the batch of the 3-D inputs (1 when both are 2-D).
        """
        batch = _check_fork_inputs(prefix, suffix, self.d_model)
        E, N, R = self.d_inner, self.d_state, self.dt_rank

        def project(h: torch.Tensor, rows: int) -> torch.Tensor:  # (B|-, n, d) -> (B, n, rows), view if shared
            w, b = self.in_proj.weight, self.in_proj.bias
            xz = F.linear(h, w[:rows], None if b is None else b[:rows])
            return xz if xz.dim() == 3 else xz.unsqueeze(0).expand(batch, -1, -1)

        xz_s = project(suffix, 2 * E)
        # The prefix's gate half z is never used (only suffix tokens are output): project x alone.
        x_p = xz_s.new_empty((batch, 0, E)) if prefix is None else project(prefix, E)  # (B, p, E)
        x_s, z_s = xz_s[..., :E], xz_s[..., E:]  # (B, s, E) views
        p = x_p.shape[1]

        # (E, K) view; in the activations' dtype, as nn.Conv1d runs under autocast (bf16 in_proj outputs
        # with float32 weights); a no-op otherwise
        w = self.conv1d.weight[:, 0, :].to(x_s.dtype)
        b = None if self.conv1d.bias is None else self.conv1d.bias.to(x_s.dtype)
        u = ops.fork_conv1d(x_p, x_s, w, b, backend=self.backend)  # (B, p + 2s, E)
        x_dbl = F.linear(u, self.x_proj.weight)  # (B, p + 2s, R + 2N)
        dt = F.linear(x_dbl[..., :R], self.dt_proj.weight)  # (B, p + 2s, E)
        Bm = x_dbl[..., R : R + N]  # (B, p + 2s, N) view
        Cm = x_dbl[..., R + N :]  # (B, p + 2s, N) view
        A, D, delta_bias = self._ssm_params(u)
        y = ops.fork_scan(
            u, dt, A, Bm, Cm, D, z_s, delta_bias, p, delta_softplus=True, backend=self.backend
        )  # (B, s, E) = (y_fwd + y_rev) * silu(z)
        # out_proj is linear per token: one call on the sum; its bias counts once per sequence.
        b = self.out_proj.bias
        return F.linear(y, self.out_proj.weight, None if b is None else 2 * b)


class MambaBlock(nn.Module):
    """Pre-norm Mamba block without residual: ``mixer(norm(h))``.

    Submodules: ``norm`` = ``nn.LayerNorm(d_model)``, ``mixer`` = :class:`Mamba`
    (keyword arguments are passed on to it). The residual is added by the
    caller (:class:`vlssm.modules.QMVL`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        backend: Optional[str] = None,
        norm_eps: float = 1e-5,
        device=None,
        dtype=None,
        **mamba_kwargs,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.norm = nn.LayerNorm(d_model, eps=norm_eps, device=device, dtype=dtype)
        self.mixer = Mamba(
            d_model, d_state=d_state, d_conv=d_conv, expand=expand, backend=backend,
            device=device, dtype=dtype, **mamba_kwargs,
        )

    @property
    def backend(self) -> Optional[str]:
        return self.mixer.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.mixer.backend = check_backend(value)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``mixer(norm(hidden_states))``: (B, L, d) -> (B, L, d)."""
        _check_tokens("hidden_states", hidden_states, self.d_model, allow_2d=False)
        return self.mixer(self.norm(hidden_states))

    def fork(self, prefix: Optional[torch.Tensor], suffix: torch.Tensor) -> torch.Tensor:
        """Fused ``block([P, S])[:, p:] + flip(block([P, flip(S)])[:, p:])``.

        Args:
            prefix: (B, p, d), (p, d) shared by the batch, or None (p = 0).
            suffix: (B, s, d) or (s, d) shared by the batch.
        Returns:
            (B, s, d). A 2-D input is normalised and projected once and
            broadcast as a stride-0 view.
        """
        _check_fork_inputs(prefix, suffix, self.d_model)
        return self.mixer.fork(None if prefix is None else self.norm(prefix), self.norm(suffix))
