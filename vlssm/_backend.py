"""Backend selection.

Backends: ``"cpu"`` (the compiled C++ kernels of ``vlssm._C``), ``"reference"``
(pure PyTorch, :mod:`vlssm.reference`) and ``"auto"`` (the default). The
``VLSSM_BACKEND`` environment variable sets the default. ``auto`` picks the
compiled kernels for the tensors' device when they exist and falls back to the
reference only when nothing else exists; ``vlssm env`` says which.
Import never probes the GPU or compiles anything: ``vlssm._C`` is loaded on
first use.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

BACKENDS = ("auto", "cpu", "reference")


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import ``vlssm._C`` (registers the ``torch.ops.vlssm`` kernels).

    Returns the module, or None with the import error kept in
    :func:`extension_error`.
    """
    try:
        from . import _C  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the build
        _errors.append(f"{type(e).__name__}: {e}")
        return None
    from .ops import _register

    _register()
    return _C


_errors: list = []


def extension_error() -> Optional[str]:
    load_extension()
    return _errors[0] if _errors else None


def default_backend() -> str:
    name = os.environ.get("VLSSM_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"VLSSM_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """Map ``backend`` (None, 'auto', 'cpu', 'reference') to a concrete backend for ``device``."""
    name = default_backend() if backend is None else backend
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    name = name.lower()
    device = torch.device(device)
    if name == "reference":
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs the C++ CPU kernels; the tensors are on {device}")
        if load_extension() is None:
            raise RuntimeError(
                "backend='cpu' needs the compiled extension vlssm._C, which failed to import: "
                f"{extension_error()}. Rebuild with `pip install --no-build-isolation .`"
            )
        return "cpu"
    # auto
    if device.type == "cpu" and load_extension() is not None:
        return "cpu"
    return "reference"
