"""Argument validation shared by every backend of the public ops.

Errors name the argument and the expected shape / dtype: TypeError for a wrong
type or dtype, ValueError for a wrong shape, size or device. The compiled
kernels check again (csrc/checks.h and csrc/<family>_shapes.h) so a direct torch.ops call is safe too.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .._dtypes import FLOATING, acc_dtype  # noqa: F401 - the kernels and ops import them from here


def _shape_str(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def tensor(name: str, t, ndim: int, layout: str, allow_empty: bool = False) -> torch.Tensor:
    """Check that ``t`` is a floating tensor of rank ``ndim``; ``layout`` names the dims.

    ``allow_empty`` lets the second dim (a token count) be 0; no other dim may be.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dtype not in FLOATING:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {_shape_str(t.shape)}")
    empty = [i for i, n in enumerate(t.shape) if n == 0 and not (allow_empty and i == 1)]
    if empty:
        raise ValueError(f"{name} must not be empty, got shape {_shape_str(t.shape)}")
    return t


def like(name: str, t, ref_name: str, ref: torch.Tensor, shape: Sequence[int], layout: str,
         same_dtype: bool = True) -> torch.Tensor:
    """Check ``t``: shape ``shape`` (named ``layout``), ``ref``'s device and (``same_dtype``) dtype."""
    tensor(name, t, len(shape), layout)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {layout} = {_shape_str(shape)}, got {_shape_str(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")
    if same_dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} must have dtype {ref.dtype} like {ref_name}, got {t.dtype}")
    return t


def param(name: str, t, ref_name: str, ref: torch.Tensor, shape: Sequence[int], layout: str) -> torch.Tensor:
    """A parameter (A, D, delta_bias, initial_state): any floating dtype, cast to the accumulation dtype."""
    like(name, t, ref_name, ref, shape, layout, same_dtype=False)
    return t.to(acc_dtype(ref.dtype))


def not_complex(name: str, t) -> None:
    """Complex A / B / C (mamba_ssm's complex mode) are not supported: a TypeError that says so."""
    if isinstance(t, torch.Tensor) and t.is_complex():
        raise TypeError(f"{name} is complex ({t.dtype}): complex A / B / C are not supported; "
                        "vlssm's scans are real (float16, bfloat16, float32, float64)")


def scan_bc(name: str, t, u: torch.Tensor, batch: int, dim: int, L: int, N: int, token_major: bool):
    """B or C of a scan, in one of mamba_ssm's three layouts. Returns ``(t, groups)``.

    - time-varying: (batch, N, L) (token-major: (batch, L, N)), u's dtype: groups = 1;
    - grouped: (batch, G, N, L) (token-major: (batch, L, G, N)), u's dtype, G dividing dim;
    - input-independent: (dim, N), any floating dtype, cast to the accumulation dtype
      (float32 while u is half precision, as mamba_ssm keeps it): groups = 0.
    """
    not_complex(name, t)
    if token_major:
        layout3, layout4 = "(batch, seqlen, dstate)", "(batch, seqlen, groups, dstate)"
    else:
        layout3, layout4 = "(batch, dstate, seqlen)", "(batch, groups, dstate, seqlen)"
    ndim = t.dim() if isinstance(t, torch.Tensor) else 3
    if ndim == 2:
        return param(name, t, "u", u, (dim, N), "(dim, dstate)"), 0
    if ndim == 3:
        return like(name, t, "u", u, (batch, L, N) if token_major else (batch, N, L), layout3), 1
    if ndim != 4:
        tensor(name, t, ndim, "")  # type / dtype / emptiness first
        raise ValueError(f"{name} must have shape {layout3}, {layout4} or (dim, dstate), got {_shape_str(t.shape)}")
    tensor(name, t, 4, layout4)
    G = t.shape[2 if token_major else 1]
    if dim % G:
        raise ValueError(f"{name} has {G} groups (shape {_shape_str(t.shape)}), which must divide dim = {dim}")
    return like(name, t, "u", u, (batch, L, G, N) if token_major else (batch, G, N, L), layout4), G


def scan_bc_pair(B, C, u: torch.Tensor, batch: int, dim: int, L: int, N: int, token_major: bool):
    """Checks B and C (:func:`scan_bc`) and that time-varying ones have the same group count."""
    B, gB = scan_bc("B", B, u, batch, dim, L, N, token_major)
    C, gC = scan_bc("C", C, u, batch, dim, L, N, token_major)
    if gB and gC and gB != gC:
        raise ValueError(f"B and C must have the same number of groups, got {gB} (B, shape {_shape_str(B.shape)}) "
                         f"and {gC} (C, shape {_shape_str(C.shape)}); a 3-D B / C is one group")
    return B, C


def flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def operand(name: str, t, shape: Sequence[int], dtype: torch.dtype, ref_name: str, ref: torch.Tensor) -> None:
    """A raw (torch.ops) op's operand: None, or exactly `shape` and `dtype` on ``ref``'s device.

    The kernels' own argument checks (kernels/, like csrc/*_shapes.h): errors name
    the argument; a dtype that should match ``ref``'s says so.
    """
    if t is None:
        return
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        like = f" like {ref_name}" if dtype == ref.dtype else ""
        raise TypeError(f"{name} must have dtype {dtype}{like}, got {t.dtype}")
    same_device(ref_name, ref, **{name: t})


def same_device(ref_name: str, ref: torch.Tensor, **tensors) -> None:
    """Fake-kernel guard: every given tensor (None skipped) is on ``ref``'s device.

    A raw op called with one argument on the meta device dispatches to the fake
    kernel, which must then fail like the real one instead of returning
    uninitialised memory.
    """
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{name} must be on {ref.device} like {ref_name}, got {t.device}")
