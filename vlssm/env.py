"""Environment report: what vlssm will run on here (``vlssm env``).

:func:`collect` gathers versions, the compiled extension's status, threads and
what ``backend="auto"`` resolves to; :func:`format_report` renders it as text.
This is the one place allowed to call ``torch.cuda.is_available()``: importing
vlssm never probes the GPU, and nothing here runs at import time.
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Any, Dict, List, Optional

__all__ = ["collect", "format_report", "cpu_model", "device_name", "triton_version", "ENV_VARS"]

# Environment variables that change what vlssm builds or runs.
ENV_VARS = (
    "VLSSM_BACKEND",
    "VLSSM_FORCE_CUDA",
    "VLSSM_SKIP_CUDA",
    "TORCH_CUDA_ARCH_LIST",
    "MAX_JOBS",
    "CUDA_HOME",
    "OMP_NUM_THREADS",
    "TRITON_INTERPRET",
)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (falls back to platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "cpu model", "Hardware") and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str = "cpu") -> str:
    """Human-readable name of ``device``: the CPU model, or the GPU's name."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def triton_version() -> Optional[str]:
    """Triton's version string, or None when it is not installed (never imports it)."""
    from importlib import metadata

    for dist in ("triton", "pytorch-triton", "triton-nightly"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _vlssm_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("vlssm")
    except metadata.PackageNotFoundError:
        return "not installed (source tree)"


def _registered_kernels(dispatch_key: str) -> List[str]:
    """Names of the ``vlssm::`` ops that have a kernel for ``dispatch_key``."""
    import torch

    try:
        regs = torch._C._dispatch_get_registrations_for_dispatch_key(dispatch_key)
    except Exception:  # private API: best effort only
        return []
    return sorted(r for r in regs if r.startswith("vlssm::"))


def collect(probe_cuda: bool = True) -> Dict[str, Any]:
    """Gather the environment report as a JSON-serialisable dict.

    ``probe_cuda=False`` skips ``torch.cuda.is_available()`` (and reports CUDA
    availability as None).
    """
    import torch

    import vlssm
    from vlssm import _backend

    info: Dict[str, Any] = {}
    info["vlssm"] = {"version": _vlssm_version(), "path": os.path.dirname(os.path.abspath(vlssm.__file__))}
    info["python"] = {"version": platform.python_version(), "executable": sys.executable}
    info["platform"] = platform.platform()
    info["torch"] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,  # None for CPU-only builds
        "hip_build": getattr(torch.version, "hip", None),
        "path": os.path.dirname(os.path.abspath(torch.__file__)),
    }
    info["triton"] = triton_version()

    cuda: Dict[str, Any] = {"available": None, "devices": []}
    if probe_cuda:
        cuda["available"] = bool(torch.cuda.is_available())
        if cuda["available"]:
            for i in range(torch.cuda.device_count()):
                cap = torch.cuda.get_device_capability(i)
                cuda["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                        "capability": f"{cap[0]}.{cap[1]}"})
    info["cuda"] = cuda

    ext = _backend.load_extension()
    ext_info: Dict[str, Any] = {"loaded": ext is not None}
    if ext is not None:
        ext_info["path"] = os.path.abspath(getattr(ext, "__file__", "") or "") or None
        ext_info["cpu_kernels"] = _registered_kernels("CPU")
        ext_info["cuda_kernels"] = _registered_kernels("CUDA")
    else:
        ext_info["error"] = _backend.extension_error()
    info["extension"] = ext_info

    kernels = _backend.load_kernels() if _backend.triton_available() else None
    tk: Dict[str, Any] = {"loaded": kernels is not None, "interpreter": _backend.triton_interpreting()}
    if kernels is not None:
        tk["path"] = os.path.dirname(os.path.abspath(kernels.__file__))
        tk["ops"] = sorted(n for n in torch._C._dispatch_get_all_op_names()
                           if n.startswith("vlssm::") and "_triton" in n)
    else:
        tk["error"] = _backend.kernels_error()
    info["triton_kernels"] = tk

    info["cpu"] = {
        "model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
    }

    try:
        default = _backend.default_backend()
        default_err = None
    except ValueError as e:
        default, default_err = None, str(e)
    backends: Dict[str, Any] = {"available": list(_backend.BACKENDS), "default": default}
    if default_err:
        backends["default_error"] = default_err
    resolved: Dict[str, Any] = {}
    devices = ["cpu"] + (["cuda"] if cuda["available"] else [])
    for dev in devices:
        try:
            resolved[dev] = _backend.resolve_backend("auto", torch.device(dev))
        except Exception as e:  # report, never crash the report
            resolved[dev] = f"error: {type(e).__name__}: {e}"
    backends["auto_resolves_to"] = resolved
    info["backends"] = backends
    info["env"] = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    return info


def format_report(info: Dict[str, Any]) -> str:
    """Render :func:`collect`'s dict as aligned ``key: value`` lines."""
    rows = []
    add = lambda k, v: rows.append((k, v))  # noqa: E731

    add("vlssm", f"{info['vlssm']['version']}  ({info['vlssm']['path']})")
    add("python", f"{info['python']['version']}  ({info['python']['executable']})")
    add("platform", info["platform"])
    t = info["torch"]
    if t["cuda_build"]:
        build = f"CUDA {t['cuda_build']}"
    else:
        build = "ROCm " + t["hip_build"] if t["hip_build"] else "CPU-only"
    add("torch", f"{t['version']}  (build: {build})")
    add("triton", info["triton"] or "not installed")
    cuda = info["cuda"]
    if cuda["available"] is None:
        add("CUDA available", "not probed")
    elif cuda["available"]:
        devs = ", ".join(f"cuda:{d['index']} {d['name']} (sm_{d['capability'].replace('.', '')})"
                         for d in cuda["devices"])
        add("CUDA available", f"yes: {devs}")
    else:
        add("CUDA available", "no")
    ext = info["extension"]
    if ext["loaded"]:
        add("extension vlssm._C", f"loaded from {ext['path']}")
        add("  CPU kernels", ", ".join(ext["cpu_kernels"]) or "none registered")
        add("  CUDA kernels", ", ".join(ext["cuda_kernels"]) or "none (built without CUDA)")
    else:
        add("extension vlssm._C", f"NOT loaded: {ext['error']}")
        add("", "-> the pure-PyTorch reference backend is used (slow); rebuild with "
                "`pip install --no-build-isolation .`")
    tk = info["triton_kernels"]
    if tk["loaded"]:
        mode = "TRITON_INTERPRET=1: CPU tensors, interpreted" if tk["interpreter"] else "CUDA tensors"
        add("Triton kernels", f"loaded from {tk['path']} ({mode})")
        add("  Triton ops", ", ".join(tk["ops"]) or "none")
    else:
        add("Triton kernels", f"not loaded: {tk['error']}")
    c = info["cpu"]
    add("CPU", f"{c['model']}  ({c['cpu_count']} logical CPUs)")
    add("CPU threads", f"torch {c['torch_threads']} intra-op, {c['torch_interop_threads']} inter-op")
    b = info["backends"]
    add("backends", ", ".join(b["available"]))
    if b.get("default_error"):
        add("default backend", f"invalid: {b['default_error']}")
    else:
        add("default backend", f"{b['default']}  (VLSSM_BACKEND={os.environ.get('VLSSM_BACKEND', '<unset>')})")
    for dev, name in b["auto_resolves_to"].items():
        add(f"auto on {dev}", name)
    for k in ENV_VARS:
        if k in info["env"]:
            add(f"${k}", info["env"][k])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else f"{'':<{width}}  {v}" for k, v in rows)
