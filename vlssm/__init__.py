"""vlssm: fused selective-scan (QMVL quadruplet Mamba) kernels for vision-language
multi-label recognition.

``import vlssm`` is cheap: it never probes the GPU or loads/compiles the
extension. The modules (:class:`MambaBlock`, :class:`QMVL`, :class:`Mamba`, :class:`PDLR`)
and the subpackages ``vlssm.models``, ``vlssm.losses`` and ``vlssm.metrics`` are
imported on first attribute access; :class:`PDLR` and the models need the
optional open_clip (``pip install open_clip_torch``).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Mamba": "vlssm.modules",
    "MambaBlock": "vlssm.modules",
    "PDLR": "vlssm.modules",
    "QMVL": "vlssm.modules",
    "IFM": "vlssm.modules",
}

#: subpackages loaded on first access (``vlssm.models`` fills the model registry)
_SUBMODULES = ("models", "losses", "metrics", "data")

__all__ = ["__version__", *_LAZY, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        value = importlib.import_module(f"vlssm.{name}")
        globals()[name] = value
        return value
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlssm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
