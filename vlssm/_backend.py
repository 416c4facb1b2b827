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

import os
from typing import Optional

import torch

BACKENDS = ("auto", "cpu", "reference")


_state: dict = {"tried": False, "module": None, "error": None}


def load_extension():
    """Import ``vlssm._C`` once (it registers the ``torch.ops.vlssm`` kernels) and the
    fake / autograd registrations that go with it.

    Returns the module, or None with the import error kept in :func:`extension_error`.
    Loading a shared library never probes the GPU or compiles anything.
    """
    if not _state["tried"]:
        _state["tried"] = True
        try:
            from . import _C
        except ImportError as e:  # depends on the build
            _state["error"] = f"{type(e).__name__}: {e}"
        else:
            from .ops import _register

            _register()
            _state["module"] = _C
    return _state["module"]


def extension_error() -> Optional[str]:
    load_extension()
    return _state["error"]


def extension_available() -> bool:
    """Whether the compiled kernels are loaded.

    ``import vlssm.ops`` loads them, so under torch.compile this is a read of
    ``_state`` (guarded like any global), never an import or a registration.
    """
    return load_extension() is not None


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
        if not extension_available():
            raise RuntimeError(
                "backend='cpu' needs the compiled extension vlssm._C, which failed to import: "
                f"{extension_error()}. Rebuild with `pip install --no-build-isolation .`"
            )
        return "cpu"
    # auto
    if device.type == "cpu" and extension_available():
        return "cpu"
    return "reference"
