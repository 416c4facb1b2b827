"""``vlssm bench``: the QMVL benchmark (below) and, with ``--workload ifm`` or ``all``
(the default), the IFM sweep of :mod:`vlssm.bench_ifm`, each with its table and CSV.

QMVL benchmark: fused vs unfused vs the pure-PyTorch reference composition.

Run it as ``vlssm bench [options]`` (or ``python bench/qmvl.py``, or
``python -m vlssm.bench``). Providers, all with the same seeded weights and
inputs:

- ``fused``: ``QMVL(fused=True, backend="auto")``: the shared-prefix fork
  (DESIGN.md section 2) on the compiled kernels.
- ``unfused``: ``QMVL(fused=False, backend="auto")``: the literal
  four-sequence composition through vlssm's own selective_scan.
- ``reference``: ``QMVL(fused=False, backend="reference")``: the same
  composition in pure PyTorch (slow: it gets ``--ref-reps`` forward reps and
  ``--ref-bwd-reps`` forward+backward reps).

For each provider: median forward time (under ``torch.no_grad()``) and median
forward+backward time (gradients for the inputs and every parameter), after a
warm-up; analytic forward FLOPs (:mod:`vlssm.profile.flops`); speed-ups vs the
reference and vs unfused; and, unless ``--no-memory``, peak memory. For memory
each provider runs in a fresh Python subprocess: on CPU the peak RSS (VmHWM,
reset per phase through /proc/self/clear_refs; ``ru_maxrss`` where /proc has
none, which after fork + exec also holds the parent's peak) and its increase
over the RSS just before the timed work
(after imports, model construction, inputs and one tiny forward+backward that
maps the code paths), after the forward phase and
after the forward+backward phase; on CUDA ``torch.cuda.max_memory_allocated``
over the allocated memory before the timed work.

Output: a table on stdout, one CSV under ``--out`` (default
``bench/results/local/`` relative to the current directory) whose every row
carries the device, the versions, dtype, shape and date, and a progress line on
stderr per provider and phase. The footer reports the max relative difference
between the providers' outputs (a sanity check, on the non-residual outputs);
the exit code is 1 when a provider failed or outputs disagree.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional, Sequence

from ._argtypes import nonneg_int, positive_float, positive_int

__all__ = ["PROVIDERS", "CSV_COLUMNS", "add_arguments", "build_parser", "run", "main"]

#: provider name -> QMVL keyword arguments.
PROVIDERS: Dict[str, Dict[str, Any]] = {
    "fused": {"fused": True, "backend": "auto"},
    "unfused": {"fused": False, "backend": "auto"},
    "reference": {"fused": False, "backend": "reference"},
}

DTYPES = ("float32", "bfloat16", "float64")
MODEL_ROWS = ("infer-mvlr", "infer-baseline", "train-default", "train-reference", "text-truncated", "text-full")
TRAIN_ROWS = ("loader-demo", "step-demo-default", "step-demo-reference", "loader-real", "step-real-default",
              "step-real-reference")

#: max relative difference between providers' outputs above which the run fails.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "cpu_threads", "python", "torch", "cuda", "triton", "vlssm",
    "dtype", "batch", "m", "c", "d", "d_state", "shared_labels",
    "provider", "backend", "fused",
    "fwd_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_reps",
    "fwd_speedup_vs_reference", "fwdbwd_speedup_vs_reference",
    "fwd_speedup_vs_unfused", "fwdbwd_speedup_vs_unfused",
    "gflop_fwd", "gflop_fwd_per_image", "fwd_gflops_per_s",
    "peak_mem_mb", "peak_mem_fwd_increase_mb", "peak_mem_fwdbwd_increase_mb", "mem_kind",
    "max_rel_diff_vs_unfused", "error",
]


# ----------------------------------------------------------------------------- options

_positive_int, _nonneg_int, _positive_float = positive_int, nonneg_int, positive_float


def _int_list(s: str) -> List[int]:
    try:
        vals = [_positive_int(v) for v in s.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        vals = []
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return vals


def _provider_list(s: str) -> List[str]:
    names = [p.strip().lower() for p in s.split(",") if p.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(PROVIDERS)}, got {s!r}")
    bad = [p for p in names if p not in PROVIDERS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown provider(s) {', '.join(map(repr, bad))}; choose from {', '.join(PROVIDERS)}")
    return list(dict.fromkeys(names))  # de-duplicated, order kept


def _choice_list(s: str, choices: Sequence[str]) -> List[str]:
    """Comma-separated names, each one of ``choices``; de-duplicated, order kept."""
    names = [p.strip().lower() for p in s.split(",") if p.strip()]
    if not names or any(n not in choices for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices)}, got {s!r}")
    return list(dict.fromkeys(names))


def _gpu_provider_list(s: str) -> List[str]:
    from .bench_gpu import GPU_PROVIDERS

    return _choice_list(s, list(GPU_PROVIDERS))


def _dtype_list(s: str) -> List[str]:
    return _choice_list(s, DTYPES)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``p`` (shared by ``vlssm bench`` and the scripts)."""
    from .bench_gpu import GPU_PROVIDERS

    p.add_argument("--workload", choices=("all", "qmvl", "ifm", "models", "train"), default="all",
                   help="what to benchmark: the QMVL layer, the IFM sweep, both (all, the default), MVLR "
                        "whole-model costs (models: RN101 at 448, a few minutes; not part of all), or training "
                        "throughput and the data loader (train: see vlssm.bench_train; not part of all)")
    g = p.add_argument_group("shape")
    g.add_argument("--batch", type=_positive_int, default=None,
                   help="images per batch B (default 4 on cpu, 32 on cuda)")
    g.add_argument("--m", type=_positive_int, default=196, help="visual tokens M (default 196)")
    g.add_argument("--c", type=_positive_int, default=80, help="label tokens C (default 80)")
    g.add_argument("--d", type=_positive_int, default=512, help="token width d_model (default 512)")
    g.add_argument("--d-state", type=_positive_int, default=16, help="SSM state size N (default 16)")
    g.add_argument("--shared-labels", action="store_true",
                   help="label tokens t of shape (C, d), shared by every image (default (B, C, d))")
    g.add_argument("--heads", type=_positive_int, default=1, help="IFM attention heads (default 1)")
    g.add_argument("--ifm-c", type=_int_list, default=[20, 80, 1000],
                   help="IFM label counts C to sweep, comma-separated (default 20,80,1000)")
    g.add_argument("--ifm-m", type=_int_list, default=[196, 784],
                   help="IFM visual token counts M to sweep, comma-separated (default 196,784)")
    g.add_argument("--dtype", choices=DTYPES, default="float32", help="parameter and input dtype (default float32)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    gp = p.add_argument_group("GPU sweep (--device cuda; see vlssm.bench_gpu)")
    gp.add_argument("--gpu-providers", type=_gpu_provider_list, default=list(GPU_PROVIDERS),
                    help=f"comma list of {','.join(GPU_PROVIDERS)} (default all; mamba-ssm only where it imports)")
    gp.add_argument("--gpu-m", type=_int_list, default=[196, 784], help="visual token counts M (default 196,784)")
    gp.add_argument("--gpu-c", type=_int_list, default=[20, 80], help="label counts C (default 20,80)")
    gp.add_argument("--gpu-dtypes", type=_dtype_list, default=["float32", "bfloat16"],
                    help="comma list of dtypes (default float32,bfloat16)")
    gm = p.add_argument_group("whole model (--workload models; see vlssm.bench_models)")
    gm.add_argument("--model-backbone", default="RN101", help="open_clip backbone (default RN101)")
    gm.add_argument("--model-image-size", type=_positive_int, default=448, help="image side S (default 448)")
    gm.add_argument("--model-c", type=_positive_int, default=80, help="classes C (default 80: MS-COCO's names)")
    gm.add_argument("--model-infer-batch", type=_positive_int, default=1, help="inference batch (default 1)")
    gm.add_argument("--model-train-batch", type=_positive_int, default=1, help="training-step batch (default 1)")
    gm.add_argument("--model-train-reps", type=_positive_int, default=2,
                    help="timed training steps per row (default 2; the reference row takes ~20 s a step)")
    gm.add_argument("--model-rows", type=lambda s: _choice_list(s, MODEL_ROWS), default=list(MODEL_ROWS),
                    help=f"comma list of {','.join(MODEL_ROWS)} (default all)")
    gt = p.add_argument_group("training throughput (--workload train; see vlssm.bench_train)")
    gt.add_argument("--train-backbone", default="RN101", help="backbone of the real-shape rows (default RN101)")
    gt.add_argument("--train-image-size", type=_positive_int, default=448, help="their image side (default 448)")
    gt.add_argument("--train-batch", type=_positive_int, default=32, help="their batch (default 32, the paper's)")
    gt.add_argument("--train-reps", type=_positive_int, default=2, help="timed real-shape steps (default 2)")
    gt.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DataLoader worker processes of the loader rows (default min(4, CPUs))")
    gt.add_argument("--loader-batches", type=_positive_int, default=8, help="timed loader batches (default 8)")
    gt.add_argument("--train-rows", type=lambda s: _choice_list(s, TRAIN_ROWS), default=list(TRAIN_ROWS),
                    help=f"comma list of {','.join(TRAIN_ROWS)} (default all)")
    r = p.add_argument_group("timing")
    r.add_argument("--providers", type=_provider_list, default=list(PROVIDERS),
                   help="comma list of fused,unfused,reference (default all three)")
    r.add_argument("--reps", type=_positive_int, default=10,
                   help="timed reps of fused and unfused, per phase (default 10)")
    r.add_argument("--ref-reps", type=_positive_int, default=3, help="timed forward reps of reference (default 3)")
    r.add_argument("--ref-bwd-reps", type=_positive_int, default=1,
                   help="timed forward+backward reps of reference (default 1; ~60 s each at the default shape on CPU)")
    r.add_argument("--warmup", type=_nonneg_int, default=1,
                   help="untimed warm-up calls per phase (default 1; reference forward+backward gets none, "
                        "its forward warm-up is enough)")
    r.add_argument("--budget", type=_positive_float, default=15.0,
                   help="stop a phase's timed reps once they took this many seconds (at least one rep is "
                        "always timed; the CSV records the reps done; default 15)")
    r.add_argument("--threads", type=_positive_int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    r.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("bench", "results", "local"),
                   help="folder of the CSV (default bench/results/local, relative to the current directory)")
    o.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement: run every provider in this process, not in a "
                        "fresh subprocess each")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vlssm bench",
        description="Benchmark QMVL: fused vs unfused vs the pure-PyTorch reference composition.",
    )
    return add_arguments(p)


# ----------------------------------------------------------------------------- helpers

def _log(t0: float, msg: str) -> None:
    print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def _current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _hwm_bytes() -> Optional[int]:
    """Peak RSS of this process's address space (VmHWM), or None where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    """Peak RSS: VmHWM where available, else ``ru_maxrss``.

    VmHWM is preferred because a child started by fork + exec (subprocess) inherits the
    parent's high-water mark in ``ru_maxrss`` (Linux folds the pre-exec address space's
    peak into it), which would hide the child's own peak under the parent's.
    """
    h = _hwm_bytes()
    return _maxrss_bytes() if h is None else h


class _PhaseMemory:
    """Peak memory of the timed phases, written into the result dict ``res``.

    Made just before the timed work, it takes the baseline: on CUDA the allocated memory
    (peak stats reset); on CPU the RSS, with the peak so far (imports and construction) and
    VmHWM reset where /proc/self/clear_refs allows (``mem_kind`` says how; ``detailed_kind``
    names the source, VmHWM or ru_maxrss). :meth:`end_phase` after each phase stores
    ``peak_mem_<phase>_increase_mb`` (the phase's peak over the baseline) and resets the peak
    for the next phase; after the ``last`` one, ``peak_mem_mb`` (and on CUDA ``mem_kind``).
    """

    def __init__(self, device: str, res: Dict[str, Any], detailed_kind: bool = True):
        self.res = res
        self.cuda = device == "cuda"
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.peaks = [_peak_bytes()]  # imports and construction
            self.base = _current_rss_bytes()
            hwm = _hwm_bytes() is not None
            self.reset = hwm and _reset_hwm()
            if self.reset:
                res["mem_kind"] = "cpu peak RSS (VmHWM; reset per phase)"
            elif detailed_kind:
                res["mem_kind"] = "cpu peak RSS (VmHWM)" if hwm else "cpu peak RSS (ru_maxrss)"
            else:
                res["mem_kind"] = "cpu peak RSS"

    def end_phase(self, phase: str, last: bool = False) -> None:
        key = f"peak_mem_{phase}_increase_mb"
        if self.cuda:
            import torch

            self.res[key] = (torch.cuda.max_memory_allocated() - self.base) / 2**20
            if last:
                self.res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
                self.res["mem_kind"] = "cuda max_memory_allocated"
            else:
                torch.cuda.reset_peak_memory_stats()
        else:
            peak = _peak_bytes()
            self.peaks.append(peak)
            if last:
                self.res["peak_mem_mb"] = max(self.peaks) / 2**20
            if self.base is not None:
                self.res[key] = max(0, peak - self.base) / 2**20
            if self.reset and not last:
                _reset_hwm()


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def _make_model(cfg: Dict[str, Any], provider: str):
    import torch

    import vlssm

    torch.manual_seed(cfg["seed"])
    kw = PROVIDERS[provider]
    return vlssm.QMVL(cfg["d"], d_state=cfg["d_state"], fused=kw["fused"], backend=kw["backend"],
                      device=torch.device(cfg["device"]), dtype=_torch_dtype(cfg["dtype"]))


def _make_inputs(cfg: Dict[str, Any]):
    """Seeded random inputs x (B, M, d), t (B, C, d) or (C, d), and output gradients."""
    import torch

    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    B, M, C, d = cfg["batch"], cfg["m"], cfg["c"], cfg["d"]
    dt, dev = _torch_dtype(cfg["dtype"]), torch.device(cfg["device"])
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)  # noqa: E731
    x = mk(B, M, d)
    t = mk(C, d) if cfg["shared_labels"] else mk(B, C, d)
    gx, gt = mk(B, M, d), mk(B, C, d)
    return x, t, gx, gt


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_phase(fn, reps: int, warmup: int, budget: float, device: str) -> Dict[str, Any]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times: List[float] = []
    spent = 0.0
    while len(times) < reps and (not times or spent < budget):
        s = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - s
        times.append(dt)
        spent += dt
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def _bench_provider(cfg: Dict[str, Any], provider: str) -> Dict[str, Any]:
    """Time one provider in this process; measure memory when ``cfg['memory']``."""
    import torch

    from vlssm import _backend

    t0 = cfg["t0"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = cfg["device"]
    res: Dict[str, Any] = {"provider": provider, "error": ""}
    kw = PROVIDERS[provider]
    try:
        res["backend"] = _backend.resolve_backend(kw["backend"], torch.device(device))
    except Exception as e:
        res["backend"] = f"error: {e}"
        raise
    model = _make_model(cfg, provider)
    x, t, gx, gt = _make_inputs(cfg)
    xg = x.detach().clone().requires_grad_(True)
    tg = t.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            model(x, t)

    def fwdbwd():
        for p in params:
            p.grad = None
        xg.grad = None
        tg.grad = None
        x_rf, t_rf = model(xg, tg)
        torch.autograd.backward((x_rf, t_rf), (gx, gt))

    # Prime: one tiny forward+backward maps the code paths (library pages count in RSS) before the
    # memory baseline, so the peak increase measures the working set of the timed shape.
    xs = x[:1, : min(4, x.shape[1])].detach().clone().requires_grad_(True)
    ts = (t[: min(4, t.shape[-2])] if t.dim() == 2 else t[:1, : min(4, t.shape[1])]).detach().clone()
    outs = model(xs, ts.requires_grad_(True))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for prm in params:
        prm.grad = None
    del xs, ts, outs
    _sync(device)

    ref = provider == "reference"
    reps_f = cfg["ref_reps"] if ref else cfg["reps"]
    reps_b = cfg["ref_bwd_reps"] if ref else cfg["reps"]
    warm_b = 0 if ref else cfg["warmup"]
    mem = _PhaseMemory(device, res) if cfg["memory"] else None
    if mem and not mem.cuda:
        res["rss_before_mb"] = None if mem.base is None else mem.base / 2**20

    _log(t0, f"{provider:<9} forward          {reps_f} rep(s) + {cfg['warmup']} warm-up ({res['backend']} backend)")
    tf = _time_phase(fwd, reps_f, cfg["warmup"], cfg["budget"], device)
    res.update(fwd_ms=tf["median_s"] * 1e3, fwd_min_ms=tf["min_s"] * 1e3, fwd_reps=tf["reps"])
    if mem:
        mem.end_phase("fwd")
    _log(t0, f"{provider:<9} forward          median {tf['median_s'] * 1e3:10.2f} ms over {tf['reps']} rep(s)")

    _log(t0, f"{provider:<9} forward+backward {reps_b} rep(s) + {warm_b} warm-up")
    tb = _time_phase(fwdbwd, reps_b, warm_b, cfg["budget"], device)
    res.update(fwdbwd_ms=tb["median_s"] * 1e3, fwdbwd_min_ms=tb["min_s"] * 1e3, fwdbwd_reps=tb["reps"])
    if mem:
        mem.end_phase("fwdbwd", last=True)
    _log(t0, f"{provider:<9} forward+backward median {tb['median_s'] * 1e3:10.2f} ms over {tb['reps']} rep(s)")
    return res


def _bench_fn(workload: str):
    """The in-process benchmark of one provider / row of ``workload``: ``fn(cfg) -> result dict``."""
    if workload == "ifm":
        from .bench_ifm import bench_provider

        return bench_provider
    if workload == "models":
        from .bench_models import bench_provider

        return bench_provider
    if workload == "train":
        from .bench_train import bench_provider

        return bench_provider
    return lambda cfg: _bench_provider(cfg, cfg["provider"])


def _worker_entry() -> None:
    """Subprocess entry: ``argv[1]`` = JSON config, ``argv[2]`` = result file."""
    cfg = json.loads(sys.argv[1])
    out = sys.argv[2]
    provider = cfg["provider"]
    try:
        res = _bench_fn(cfg.get("workload", "qmvl"))(cfg)
    except Exception as e:
        traceback.print_exc()
        res = {"provider": provider, "error": f"{type(e).__name__}: {e}"}
    with open(out, "w") as f:
        json.dump(res, f)


def _bench_in_subprocess_or_here(cfg: Dict[str, Any], provider: str) -> Dict[str, Any]:
    """One provider's results: in a fresh subprocess (for its peak memory) when ``cfg['memory']``,
    else in this process; a failure becomes ``{"provider", "error"}`` either way."""
    cfg = dict(cfg, provider=provider)
    if cfg["memory"]:
        return _run_in_subprocess(cfg, provider)
    try:
        return _bench_fn(cfg.get("workload", "qmvl"))(cfg)
    except Exception as e:
        traceback.print_exc()
        return {"provider": provider, "error": f"{type(e).__name__}: {e}"}


def _run_in_subprocess(cfg: Dict[str, Any], provider: str) -> Dict[str, Any]:
    import vlssm

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(vlssm.__file__)))
    # Import the very vlssm this process runs (installed or source tree), whatever the cwd.
    code = f"import sys; sys.path.insert(0, {pkg_root!r}); from vlssm.bench import _worker_entry; _worker_entry()"
    fd, path = tempfile.mkstemp(prefix="vlssm-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(dict(cfg, provider=provider)), path],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        if proc.stdout:
            sys.stderr.write(proc.stdout)
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"provider": provider, "error": f"benchmark subprocess exited with code {proc.returncode}"}
    finally:
        os.unlink(path)
    return res


def _max_rel_diff(a, b) -> float:
    """max |a - b| / max |b| (in float64)."""
    a, b = a.double(), b.double()
    den = b.abs().max().item()
    num = (a - b).abs().max().item()
    return num / den if den > 0 else num


def _sanity_check(cfg: Dict[str, Any], providers: Sequence[str]) -> Dict[str, float]:
    """Outputs of every provider on the same weights and inputs, compared without the residual.

    Returns {"fused vs unfused": diff, ...}: max over x_rf and t_rf of max|a-b| / max|b|.
    """
    import torch

    x, t, _, _ = _make_inputs(cfg)
    outs = {}
    model = _make_model(cfg, providers[0])
    model.residual = False
    for p in providers:
        model.fused = PROVIDERS[p]["fused"]
        model.backend = PROVIDERS[p]["backend"]
        with torch.no_grad():
            outs[p] = model(x, t)
    diffs = {}
    for a, b in (("fused", "unfused"), ("fused", "reference"), ("unfused", "reference")):
        if a in outs and b in outs:
            diffs[f"{a} vs {b}"] = max(_max_rel_diff(oa, ob) for oa, ob in zip(outs[a], outs[b]))
    return diffs


def _machine_columns(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The CSV columns every benchmark row carries: date, device, threads, versions, dtype."""
    import torch

    import vlssm
    from vlssm.env import device_name, triton_version

    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": cfg["device"],
        "device_name": device_name(cfg["device"]),
        "cpu_threads": cfg.get("threads") or torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "triton": triton_version() or "",
        "vlssm": getattr(vlssm, "__version__", ""),
        "dtype": cfg["dtype"],
    }


def _env_columns(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """:func:`_machine_columns` and the layer shape of the QMVL / IFM rows."""
    return {**_machine_columns(cfg), "batch": cfg["batch"], "m": cfg["m"], "c": cfg["c"], "d": cfg["d"],
            "d_state": cfg["d_state"], "shared_labels": cfg["shared_labels"]}


def _write_rows_csv(out_dir: str, stem: str, results: Dict[str, Dict[str, Any]], cols: List[str],
                    machine: Dict[str, Any], fixed: Optional[Dict[str, Any]] = None) -> str:
    """One CSV ``out_dir/stem-<UTC stamp>.csv`` of whole-model rows (``results``: row name -> result):
    the columns ``cols`` (``row`` first), then ``machine`` (:func:`_machine_columns`); ``fixed`` values
    go into every row. Returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = os.path.join(out_dir, f"{stem}-{stamp}.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + list(machine), extrasaction="ignore")
        w.writeheader()
        for row, r in results.items():
            w.writerow({**machine, **r, **(fixed or {}), "row": row})
    return path


def _fmt(v, spec: str) -> str:
    if v is None or v == "":
        return "-"
    return format(v, spec)


def _table(rows: List[Dict[str, Any]]) -> str:
    cols = [
        ("provider", "provider", "s"), ("backend", "backend", "s"),
        ("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
        ("fwd x ref", "fwd_speedup_vs_reference", ".2f"), ("f+b x ref", "fwdbwd_speedup_vs_reference", ".2f"),
        ("fwd x unf", "fwd_speedup_vs_unfused", ".2f"), ("f+b x unf", "fwdbwd_speedup_vs_unfused", ".2f"),
        ("GFLOP fwd", "gflop_fwd", ".3g"), ("GFLOP/s", "fwd_gflops_per_s", ".1f"),
        ("peak MB", "peak_mem_mb", ".0f"), ("+fwd MB", "peak_mem_fwd_increase_mb", ".0f"),
        ("+f+b MB", "peak_mem_fwdbwd_increase_mb", ".0f"),
    ]
    cells = [[h for h, _, _ in cols]]
    for r in rows:
        if r.get("error"):
            cells.append([r["provider"], "FAILED: " + r["error"]])
            continue
        cells.append([_fmt(r.get(k), s) for _, k, s in cols])
    widths = [max(len(c[i]) for c in cells if i < len(c) and len(c) == len(cols)) for i in range(len(cols))]
    lines = []
    for i, c in enumerate(cells):
        if len(c) != len(cols):
            lines.append(f"{c[0]:<{widths[0]}}  {c[1]}")
            continue
        lines.append("  ".join(v.ljust(w) if j < 2 else v.rjust(w) for j, (v, w) in enumerate(zip(c, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- driver

def run(args: argparse.Namespace) -> int:
    """Run the benchmark(s) of ``args.workload`` for parsed ``args``; returns the exit code."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"vlssm bench: error: --device cuda: CUDA is not available (torch {torch.__version__}, "
              f"CUDA build {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    try:  # fail early, before any timing, on an unwritable --out
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        print(f"vlssm bench: error: --out {args.out!r}: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4
    rc = 0
    if args.workload in ("all", "qmvl"):
        if args.device == "cuda":
            from .bench_gpu import run as run_gpu

            rc = max(rc, run_gpu(args))
        else:
            rc = max(rc, _run_qmvl(args))
    if args.workload in ("all", "ifm"):
        if args.workload == "all":
            print()
        from .bench_ifm import run as run_ifm

        rc = max(rc, run_ifm(args))
    if args.workload == "models":
        from .bench_models import run as run_models

        rc = max(rc, run_models(args))
    if args.workload == "train":
        from .bench_train import run as run_train

        rc = max(rc, run_train(args))
    return rc


def _run_qmvl(args: argparse.Namespace) -> int:
    """The QMVL benchmark; returns the exit code."""
    from vlssm.profile.flops import qmvl_flops

    t0 = time.time()
    providers = args.providers
    cfg = {k: getattr(args, k) for k in ("batch", "m", "c", "d", "d_state", "dtype", "device", "reps", "ref_reps",
                                         "ref_bwd_reps", "warmup", "budget", "threads", "seed", "shared_labels",
                                         "memory")}
    cfg["t0"] = t0

    env = _env_columns(cfg)
    shape = (f"B={args.batch} M={args.m} C={args.c} d={args.d} d_state={args.d_state} {args.dtype} "
             f"t={'(C, d) shared' if args.shared_labels else '(B, C, d)'}")
    header = (f"QMVL benchmark  {shape}\n"
              f"device {args.device}: {env['device_name']}, {env['cpu_threads']} threads | torch {env['torch']} "
              f"(CUDA {env['cuda'] or 'none'}) | triton {env['triton'] or 'not installed'} | {env['date_utc']}")
    _log(t0, f"QMVL benchmark {shape} on {args.device} ({env['device_name']}); providers {', '.join(providers)}"
             + ("; memory: one subprocess per provider" if args.memory else "; --no-memory: in-process"))

    _log(t0, f"sanity check: outputs of {', '.join(providers)} on the same weights and inputs")
    try:
        diffs = _sanity_check(cfg, providers)
        check_error = ""
    except Exception as e:
        traceback.print_exc()
        diffs, check_error = {}, f"{type(e).__name__}: {e}"
    for k, v in diffs.items():
        _log(t0, f"sanity check: {k}: max rel diff {v:.3e}")

    results: List[Dict[str, Any]] = []
    for p in providers:
        res = _bench_in_subprocess_or_here(cfg, p)
        if res.get("error"):
            _log(t0, f"{p:<9} FAILED: {res['error']}")
        results.append(res)

    by = {r["provider"]: r for r in results if not r.get("error")}
    rows = []
    for r in results:
        p = r["provider"]
        fl = qmvl_flops(args.batch, args.m, args.c, args.d, d_state=args.d_state, fused=PROVIDERS[p]["fused"],
                        shared_labels=args.shared_labels).total
        row = dict(env)
        row.update(provider=p, backend=r.get("backend", ""), fused=PROVIDERS[p]["fused"],
                   gflop_fwd=fl / 1e9, gflop_fwd_per_image=fl / 1e9 / args.batch, error=r.get("error", ""))
        for k in ("fwd_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_reps", "peak_mem_mb", "peak_mem_fwd_increase_mb",
                  "peak_mem_fwdbwd_increase_mb", "mem_kind"):
            row[k] = r.get(k, "")
        if not row["error"]:
            row["fwd_gflops_per_s"] = fl / 1e9 / (r["fwd_ms"] / 1e3)
            for base in ("reference", "unfused"):
                if base in by:
                    row[f"fwd_speedup_vs_{base}"] = by[base]["fwd_ms"] / r["fwd_ms"]
                    row[f"fwdbwd_speedup_vs_{base}"] = by[base]["fwdbwd_ms"] / r["fwdbwd_ms"]
        row["max_rel_diff_vs_unfused"] = 0.0 if p == "unfused" else diffs.get(f"{p} vs unfused", "")
        rows.append({c: row.get(c, "") for c in CSV_COLUMNS})

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    name = (f"qmvl-{args.device}-{args.dtype}-B{args.batch}-M{args.m}-C{args.c}-d{args.d}"
            f"{'-shared' if args.shared_labels else ''}-{stamp}.csv")
    path = os.path.join(args.out, name)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

    tol = TOLERANCE[args.dtype]
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    print(header)
    print()
    print(_table(rows))
    print()
    fu = qmvl_flops(1, args.m, args.c, args.d, d_state=args.d_state, fused=False).total
    ff = qmvl_flops(1, args.m, args.c, args.d, d_state=args.d_state, fused=True).total
    print(f"analytic forward FLOPs per image: unfused/reference {fu / 1e9:.3g} GFLOP, fused {ff / 1e9:.3g} GFLOP "
          f"({fu / ff:.2f}x less work)")
    if diffs:
        parts = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        print(f"sanity check (max |a-b| / max |b| on y, no residual): {parts}  "
              f"[{'OK' if not bad else 'MISMATCH'}, tolerance {tol:g}]")
    elif check_error:
        print(f"sanity check FAILED: {check_error}")
    if args.memory:
        kind = "torch.cuda.max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM / ru_maxrss)"
        print(f"memory: {kind} of a fresh process per provider; +fwd / +f+b = peak increase over the memory "
              f"before the timed work, after the forward / forward+backward phase")
    print(f"median of timed reps (fused/unfused: up to {args.reps}, reference: {args.ref_reps} fwd / "
          f"{args.ref_bwd_reps} fwd+bwd; see the CSV for the reps done); x ref / x unf = speed-up")
    print(f"results: {path}")
    _log(t0, f"done; wrote {path}")
    failed = [r["provider"] for r in results if r.get("error")]
    if failed or bad or check_error:
        return 1
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
