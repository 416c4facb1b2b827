"""Backend selection.

Backends: ``"cpu"`` (the compiled C++ kernels of ``vlssm._C``), ``"cuda"`` (the
compiled CUDA kernels of ``vlssm._C``, when it was built with CUDA), ``"triton"``
(the Triton kernels of :mod:`vlssm.kernels`: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"reference"`` (pure PyTorch, :mod:`vlssm.reference`)
and ``"auto"`` (the default). The ``VLSSM_BACKEND`` environment variable sets
the default. Each op says which backends it implements; ``auto`` picks the
fastest of those for the tensors' device and falls back to the reference only
when nothing else exists; ``vlssm env`` says which.
Import never probes the GPU or compiles anything.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")

# What `auto` tries, best first, per device type (then "reference").
_AUTO_ORDER = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


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


def check_backend(backend, what: str = "backend") -> Optional[str]:
    """``backend`` as a backend name (lower case), or None for None; anything else raises a
    ValueError naming ``what``. The one check of a backend name: ops, modules, losses and
    ``VLSSM_BACKEND`` all go through it."""
    if backend is None:
        return None
    if not isinstance(backend, str) or backend.strip().lower() not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS} or None, got {backend!r}")
    return backend.strip().lower()


def default_backend() -> str:
    return check_backend(os.environ.get("VLSSM_BACKEND", "auto").strip() or "auto", what="VLSSM_BACKEND")


def cuda_kernels_built() -> bool:
    """Whether ``vlssm._C`` was built with its CUDA kernels (a dispatcher lookup:
    it never probes the GPU)."""
    if "cuda_kernels" not in _state:
        _state["cuda_kernels"] = extension_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
            "vlssm::selective_scan", "CUDA")
    return _state["cuda_kernels"]


def triton_available() -> bool:
    """Whether Triton imports (it is only imported when a Triton backend is used)."""
    if "triton" not in _state:
        try:
            import triton  # noqa: F401
        except ImportError:
            _state["triton"] = False
        else:
            _state["triton"] = True
    return _state["triton"]


def _kernels_from_source_tree():
    """``kernels/`` of a source checkout as ``vlssm.kernels`` (pip installs it there).

    Lets the source tree (built with ``python setup.py build_ext --inplace``) run
    the Triton backend without an install. Returns None when there is no such folder.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    init = os.path.join(root, "kernels", "__init__.py")
    if not (os.path.isfile(init) and os.path.isfile(os.path.join(root, "setup.py"))):
        return None
    spec = importlib.util.spec_from_file_location("vlssm.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["vlssm.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["vlssm.kernels"]
        raise
    return module


def load_kernels():
    """Import the Triton kernels ``vlssm.kernels`` once (defining their ``torch.ops``
    triton ops); returns the module, or None with the reason in :func:`kernels_error`.

    ``import vlssm.ops`` calls this when triton is installed, outside any
    torch.compile trace. Importing triton never probes the GPU.
    """
    if "kernels" not in _state:
        _state["kernels"], _state["kernels_error"] = None, None
        if not triton_available():
            _state["kernels_error"] = "the triton package is not installed"
        else:
            try:
                try:
                    module = importlib.import_module("vlssm.kernels")
                except ModuleNotFoundError as e:
                    if e.name != "vlssm.kernels":
                        raise
                    module = _kernels_from_source_tree()
                    if module is None:
                        raise
            except Exception as e:  # depends on the installed triton
                _state["kernels_error"] = f"{type(e).__name__}: {e}"
            else:
                _state["kernels"] = module
                # Whether the interpreter can run them, found out here (outside any torch.compile
                # trace): _usable only reads the answer.
                _state["interpreter_problem"] = module._op.interpreter_problem() if triton_interpreting() else None
    return _state["kernels"]


def kernels_error() -> Optional[str]:
    load_kernels()
    return _state["kernels_error"]


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _usable(name: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "reference":
        return None
    if name in ("cpu", "cuda"):  # the compiled kernels of vlssm._C for that device type
        what = "C++ CPU kernels" if name == "cpu" else "compiled CUDA kernels"
        if device.type != name:
            return f"backend={name!r} runs the {what}; the tensors are on {device}"
        if not extension_available():
            return (f"backend={name!r} needs the compiled extension vlssm._C, which failed to import: "
                    f"{extension_error()}. Rebuild with `pip install --no-build-isolation .`")
        if name == "cuda" and not cuda_kernels_built():
            return ("backend='cuda': vlssm._C was built without its CUDA kernels (torch without CUDA, "
                    "no nvcc, or VLSSM_SKIP_CUDA at build time); rebuild with CUDA_HOME set")
        return None
    if name == "triton":
        if not triton_available():
            return "backend='triton' needs the triton package"
        if load_kernels() is None:
            return f"backend='triton': the Triton kernels vlssm.kernels failed to import: {kernels_error()}"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreting():
            problem = _state.get("interpreter_problem")
            return None if problem is None else f"backend='triton' on CPU (TRITON_INTERPRET=1): {problem}"
        return f"backend='triton' runs on CUDA tensors (or on CPU with TRITON_INTERPRET=1); the tensors are on {device}"
    return f"backend={name!r} is not built"


def resolve_backend(backend: Optional[str], device: torch.device,
                    implemented: Sequence[str] = ("cpu", "reference"), op: str = "this op") -> str:
    """Map ``backend`` (None, 'auto', or a name) to a concrete backend for ``device``.

    ``implemented`` lists the backends the op has. An explicit backend the op
    lacks or that cannot run on ``device`` raises ValueError (RuntimeError when
    the compiled extension failed to import); ``auto`` takes the first usable
    of the device's preference order and falls back to ``"reference"``.
    """
    name = default_backend() if backend is None else check_backend(backend)
    device = torch.device(device)
    if name != "auto":
        if name not in implemented:
            raise ValueError(f"{op} has no {name!r} backend; it has {tuple(implemented)}")
        why = _usable(name, device)
        if why is not None:
            raise (RuntimeError if name == device.type and name in ("cpu", "cuda") else ValueError)(why)
        return name
    for cand in _AUTO_ORDER.get(device.type, ()):
        if cand in implemented and _usable(cand, device) is None:
            return cand
    return "reference"
