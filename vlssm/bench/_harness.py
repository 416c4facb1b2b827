"""The one harness every ``vlssm.bench`` workload and ``vlssm profile`` use.

Workload modules import this module and never one another (a test checks it).
It holds:

- timing: :func:`time_phase` (median of N reps after a warm-up, with a time
  budget; host clock around a device synchronisation), :func:`cuda_time_ms`
  (CUDA events), :func:`capture_graph` (a CUDA-graph replay);
- memory: :class:`PhaseMemory` (CUDA ``max_memory_allocated``, or on CPU the peak
  RSS, VmHWM reset per phase where /proc allows) and the RSS readers;
- isolation: :func:`run_isolated` runs ``<module>.bench_provider(cfg)`` in a fresh
  Python subprocess (for its own peak memory) and returns its result dict;
  :func:`run_row` does that or runs it in this process (``cfg["memory"]`` false);
- output: :func:`machine_columns` (date, device, versions, threads, dtype: the
  columns every CSV row carries), :func:`write_csv` / :func:`write_rows_csv`,
  :func:`format_table`, :func:`fmt`, :func:`header`;
- options: the argparse types and :func:`add_common_arguments` (dtype, device,
  timing, threads, seed, output, memory) that every workload's parser shares.
"""
from __future__ import annotations

import argparse
import csv
import importlib
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from .._argtypes import nonneg_int, positive_float, positive_int

__all__ = [
    "DTYPES", "TOLERANCE", "log", "torch_dtype", "sync", "time_phase", "time_stats", "cuda_times_ms",
    "cuda_time_ms", "capture_graph", "is_oom", "prime_layer", "time_fwd_fwdbwd",
    "current_rss_bytes", "peak_bytes", "PhaseMemory", "run_isolated", "run_row", "worker_entry",
    "machine_columns", "header", "stamp", "write_csv", "write_rows_csv", "fmt", "format_table", "int_list",
    "choice_list", "add_common_arguments", "check_device", "seeded_randn",
]

DTYPES = ("float32", "bfloat16", "float64")

#: max relative difference between providers' outputs above which a run fails.
TOLERANCE = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}


# ----------------------------------------------------------------------------- small helpers

def log(t0: float, msg: str) -> None:
    """A progress line on stderr, stamped with the seconds since ``t0``."""
    print(f"[{time.time() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
            "float16": torch.float16}[name]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def seeded_randn(seed: int, device: str, dtype: str) -> Callable[..., Any]:
    """``mk(*shape)``: standard normal tensors from one seeded CPU generator (the same numbers on any
    device), cast to ``dtype`` on ``device``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    dt, dev = torch_dtype(dtype), torch.device(device)
    return lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)


def check_device(device: str, prog: str = "vlssm bench") -> Optional[str]:
    """None when ``device`` is usable here, else the error message (``--device cuda`` without CUDA)."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return (f"{prog}: error: --device cuda: CUDA is not available (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda or 'none'})")
    return None


# ----------------------------------------------------------------------------- timing

def time_phase(fn: Callable[[], Any], reps: int, warmup: int, budget: float, device: str) -> Dict[str, Any]:
    """Time ``fn``: ``warmup`` untimed calls, then up to ``reps`` timed ones (stopping once they took
    ``budget`` seconds; at least one is always timed), each synchronised on CUDA.

    Returns ``{"median_s", "min_s", "max_s", "iqr_s", "reps", "times_s"}``.
    """
    for _ in range(warmup):
        fn()
    sync(device)
    times: List[float] = []
    spent = 0.0
    while len(times) < reps and (not times or spent < budget):
        s = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - s
        times.append(dt)
        spent += dt
    st = time_stats(times)
    return {"median_s": st["median"], "min_s": st["min"], "max_s": st["max"], "iqr_s": st["iqr"],
            "reps": st["reps"], "times_s": times}


def time_stats(times: Sequence[float]) -> Dict[str, Any]:
    """``{"median", "min", "max", "iqr", "reps"}`` of a list of timings (in their unit)."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "iqr": q[2] - q[0],
            "reps": len(times)}


def cuda_times_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> List[float]:
    """CUDA-event timings (ms) of ``reps`` calls of ``fn`` after ``warmup`` untimed ones."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def cuda_time_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` (after ``warmup`` calls), in ms."""
    return statistics.median(cuda_times_ms(fn, reps, warmup))


def capture_graph(fn: Callable[[], Any], warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` (static inputs and outputs) in a CUDA graph; returns its replay."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g.replay


# ----------------------------------------------------------------------------- memory

def current_rss_bytes() -> Optional[int]:
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


def peak_bytes() -> int:
    """Peak RSS: VmHWM where available, else ``ru_maxrss``.

    VmHWM is preferred because a child started by fork + exec (subprocess) inherits the
    parent's high-water mark in ``ru_maxrss`` (Linux folds the pre-exec address space's
    peak into it), which would hide the child's own peak under the parent's.
    """
    h = _hwm_bytes()
    return _maxrss_bytes() if h is None else h


class PhaseMemory:
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
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.peaks = [peak_bytes()]  # imports and construction
            self.base = current_rss_bytes()
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
            peak = peak_bytes()
            self.peaks.append(peak)
            if last:
                self.res["peak_mem_mb"] = max(self.peaks) / 2**20
            if self.base is not None:
                self.res[key] = max(0, peak - self.base) / 2**20
            if self.reset and not last:
                _reset_hwm()


def prime_layer(model: Callable[..., Any], x, t, params: Sequence[Any], device: str) -> None:
    """One tiny forward+backward of a layer ``model(x, t) -> outputs`` on a slice of its inputs (one
    image, up to 4 tokens each; ``t`` (B, C, d) or shared (C, d)), the parameters' gradients cleared
    after: it maps the code paths (library pages count in RSS) before the memory baseline, so the
    peak increase measures the working set of the timed shape."""
    import torch

    xs = x[:1, : min(4, x.shape[1])].detach().clone().requires_grad_(True)
    ts = (t[: min(4, t.shape[-2])] if t.dim() == 2 else t[:1, : min(4, t.shape[1])]).detach().clone()
    outs = model(xs, ts.requires_grad_(True))
    torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    for p in params:
        p.grad = None
    sync(device)


def time_fwd_fwdbwd(res: Dict[str, Any], fwd: Callable[[], Any], fwdbwd: Callable[[], Any], cfg: Dict[str, Any],
                    reps: Tuple[int, int], warmup: Tuple[int, int], label: str = "",
                    detailed_kind: bool = True) -> Dict[str, Any]:
    """The two timed phases of a provider, forward then forward+backward, with their peak memory
    (:class:`PhaseMemory`, when ``cfg["memory"]``), written into ``res``: ``fwd_ms``, ``fwd_min_ms``,
    ``fwd_reps``, ``fwdbwd_ms``, ``fwdbwd_min_ms``, ``fwdbwd_reps``, ``peak_mem_*``, ``mem_kind``.
    ``reps`` / ``warmup``: per phase; ``cfg`` gives ``device``, ``budget``, ``memory``, ``t0``; a
    non-empty ``label`` logs each phase's median."""
    device = cfg["device"]
    mem = PhaseMemory(device, res, detailed_kind=detailed_kind) if cfg.get("memory") else None
    if mem and not mem.cuda:
        res["rss_before_mb"] = None if mem.base is None else mem.base / 2**20
    for phase, fn, n, w in (("fwd", fwd, reps[0], warmup[0]), ("fwdbwd", fwdbwd, reps[1], warmup[1])):
        t = time_phase(fn, n, w, cfg["budget"], device)
        res.update({f"{phase}_ms": t["median_s"] * 1e3, f"{phase}_min_ms": t["min_s"] * 1e3,
                    f"{phase}_reps": t["reps"]})
        if mem:
            mem.end_phase(phase, last=phase == "fwdbwd")
        if label:
            name = "forward" if phase == "fwd" else "forward+backward"
            log(cfg["t0"], f"{label} {name:<16} median {t['median_s'] * 1e3:10.2f} ms over {t['reps']} rep(s) "
                           f"(+ {w} warm-up)")
    return res


# ----------------------------------------------------------------------------- isolation

def _entry_point(cfg: Dict[str, Any]) -> Callable[[Dict[str, Any]], Dict[str, Any]]:
    """The ``bench_provider(cfg)`` of module ``cfg["worker"]`` (a dotted module path)."""
    return getattr(importlib.import_module(cfg["worker"]), "bench_provider")


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is an out-of-memory error (host or device)."""
    import torch

    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "out of memory" in str(e).lower()


def _failure(cfg: Dict[str, Any], e: BaseException) -> Dict[str, Any]:
    kind = "out of memory" if is_oom(e) else type(e).__name__
    return {"provider": cfg.get("provider", ""), "error": f"{kind}: {e}"}


def worker_entry() -> None:
    """Subprocess entry: ``argv[1]`` = JSON config, ``argv[2]`` = result file."""
    cfg = json.loads(sys.argv[1])
    try:
        res = _entry_point(cfg)(cfg)
    except Exception as e:
        traceback.print_exc()
        res = _failure(cfg, e)
    with open(sys.argv[2], "w") as f:
        json.dump(res, f)


def run_isolated(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``<cfg["worker"]>.bench_provider(cfg)`` in a fresh Python subprocess; its result dict, or
    ``{"provider", "error"}`` when it failed or died (an OOM kill names the exit signal)."""
    import vlssm

    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(vlssm.__file__)))
    # Import the very vlssm this process runs (installed or source tree), whatever the cwd.
    code = (f"import sys; sys.path.insert(0, {pkg_root!r}); from vlssm.bench._harness import worker_entry; "
            "worker_entry()")
    fd, path = tempfile.mkstemp(prefix="vlssm-bench-", suffix=".json")
    os.close(fd)
    try:
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(cfg), path],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        if proc.stdout:
            sys.stderr.write(proc.stdout)
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            why = (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                   else f"exited with code {proc.returncode}")
            res = {"provider": cfg.get("provider", ""), "error": f"benchmark subprocess {why}"}
    finally:
        os.unlink(path)
    return res


def run_row(cfg: Dict[str, Any], provider: str) -> Dict[str, Any]:
    """One provider's (row's) results: in a fresh subprocess (for its peak memory) when
    ``cfg['memory']``, else in this process; a failure becomes ``{"provider", "error"}`` either way."""
    cfg = dict(cfg, provider=provider)
    if cfg.get("memory"):
        return run_isolated(cfg)
    try:
        return _entry_point(cfg)(cfg)
    except Exception as e:
        traceback.print_exc()
        return _failure(cfg, e)


# ----------------------------------------------------------------------------- output

def stamp() -> str:
    """The UTC time stamp of result file names."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def machine_columns(cfg: Dict[str, Any]) -> Dict[str, Any]:
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


def header(title: str, env: Dict[str, Any]) -> str:
    """Two header lines: ``title``, then device, threads, versions and date from :func:`machine_columns`."""
    return (f"{title}\ndevice {env['device']}: {env['device_name']}, {env['cpu_threads']} threads | torch "
            f"{env['torch']} (CUDA {env['cuda'] or 'none'}) | triton {env['triton'] or 'not installed'} | "
            f"{env['date_utc']}")


def write_csv(path: str, rows: Sequence[Dict[str, Any]], cols: Sequence[str]) -> str:
    """Write ``rows`` (only the columns ``cols``, missing ones empty; floats to 6 significant digits)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in cols})
    return path


def write_rows_csv(out_dir: str, stem: str, results: Dict[str, Dict[str, Any]], cols: List[str],
                   machine: Dict[str, Any], fixed: Optional[Dict[str, Any]] = None) -> str:
    """One CSV ``out_dir/stem-<UTC stamp>.csv`` of named rows (``results``: row name -> result):
    the columns ``cols`` (``row`` first), then ``machine`` (:func:`machine_columns`); ``fixed`` values
    go into every row. Returns its path."""
    path = os.path.join(out_dir, f"{stem}-{stamp()}.csv")
    rows = [{**machine, **r, **(fixed or {}), "row": row} for row, r in results.items()]
    return write_csv(path, rows, cols + list(machine))


def fmt(v, spec: str) -> str:
    """``format(v, spec)``, or "-" for a missing value."""
    if v is None or v == "":
        return "-"
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return str(v)


def format_table(rows: Sequence[Dict[str, Any]], cols: Sequence[Tuple[str, str, str]],
                 left: Union[int, Sequence[int]] = 1, error_key: str = "error") -> str:
    """A fixed-width text table: ``cols`` = (heading, key, format spec); the columns ``left`` (the
    first ``left`` ones when an int) are left-aligned, the rest right-aligned. A row with an error
    prints its cells up to the last left-aligned column and ``FAILED: <error>``."""
    left_cols = set(range(left)) if isinstance(left, int) else set(left)
    n_id = max(left_cols) + 1 if left_cols else 1
    cells: List[List[str]] = [[h for h, _, _ in cols]]
    failed: Dict[int, str] = {}
    for r in rows:
        cells.append([fmt(r.get(k), s) for _, k, s in cols])
        if r.get(error_key):
            failed[len(cells) - 1] = str(r[error_key])
    widths = [max(len(c[i]) for j, c in enumerate(cells) if j not in failed) for i in range(len(cols))]
    lines = []
    for i, c in enumerate(cells):
        if i in failed:
            lines.append("  ".join(c[:n_id]) + "  FAILED: " + failed[i])
            continue
        lines.append("  ".join(v.ljust(w) if j in left_cols else v.rjust(w)
                               for j, (v, w) in enumerate(zip(c, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- options

def int_list(s: str) -> List[int]:
    """argparse type: comma-separated positive integers."""
    try:
        vals = [positive_int(v) for v in s.split(",") if v.strip()]
    except argparse.ArgumentTypeError:
        vals = []
    if not vals:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {s!r}")
    return vals


def choice_list(choices: Sequence[str], what: str = "") -> Callable[[str], List[str]]:
    """argparse type: comma-separated names, each one of ``choices``; de-duplicated, order kept."""
    def parse(s: str) -> List[str]:
        names = [p.strip().lower() for p in s.split(",") if p.strip()]
        bad = [n for n in names if n not in choices]
        if not names or bad:
            head = f"unknown {what} {', '.join(map(repr, bad))}; " if bad and what else ""
            raise argparse.ArgumentTypeError(f"{head}expected a comma-separated list of {', '.join(choices)}, "
                                             f"got {s!r}")
        return list(dict.fromkeys(names))
    return parse


def add_common_arguments(p: argparse.ArgumentParser, *, reps: int = 10, devices: Sequence[str] = ("cpu", "cuda"),
                         dtypes: Sequence[str] = DTYPES, memory: bool = True) -> None:
    """The options every workload shares: dtype, device, timing, threads, seed, output (and memory)."""
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=dtypes, default="float32", help="parameter and input dtype (default float32)")
    g.add_argument("--device", choices=devices, default="cpu", help="device (default cpu)")
    g.add_argument("--reps", type=positive_int, default=reps, help=f"timed reps per phase (default {reps})")
    g.add_argument("--warmup", type=nonneg_int, default=1, help="untimed warm-up calls per phase (default 1)")
    g.add_argument("--budget", type=positive_float, default=15.0,
                   help="stop a phase's timed reps once they took this many seconds (at least one rep is "
                        "always timed; the CSV records the reps done; default 15)")
    g.add_argument("--threads", type=positive_int, default=None,
                   help="torch intra-op threads (default: torch's default)")
    g.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("bench", "results", "local"),
                   help="folder of the CSV (default bench/results/local, relative to the current directory)")
    if memory:
        o.add_argument("--no-memory", dest="memory", action="store_false",
                       help="skip the peak-memory measurement: run every provider in this process, not in a "
                            "fresh subprocess each")
    else:
        p.set_defaults(memory=False)
