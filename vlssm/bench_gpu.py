"""``vlssm bench --device cuda``: the GPU benchmark of QMVL and its baselines.

Providers (all with the same seeded weights and inputs; each QMVL-like
provider computes ``(x_rf, t_rf)`` from ``x`` (B, M, d) and ``t`` (B, C, d)):

- ``fused-cuda``    ``QMVL(fused=True, backend="cuda")``: the fork on the CUDA kernels.
- ``fused-triton``  ``QMVL(fused=True, backend="triton")``: the fork on the Triton kernels.
- ``unfused-cuda``  ``QMVL(fused=False, backend="cuda")``: four sequences through
  vlssm's own CUDA selective_scan (cat/flip copies, every prefix scanned twice).
- ``mamba-ssm``     the same composition with mamba_ssm's ``Mamba`` block
  (selective_scan_cuda + causal_conv1d, its fused ``mamba_inner_fn``), four
  sequences with flips and cats, loaded with the vlssm weights; only where
  ``mamba_ssm`` imports with its CUDA extension.
- ``sdpa-self``     a pre-norm self-attention block of width d over [X, T]
  (qkv projection, ``scaled_dot_product_attention`` with d/64 heads, output
  projection, residual): what a Transformer layer would do instead of QMVL.
- ``sdpa-cross``    two pre-norm cross-attention blocks of width d, X <- T and T <- X.

Per provider and shape: median forward time (``torch.no_grad``) and median
forward+backward time (input and parameter gradients), timed with CUDA events,
both eagerly and as CUDA-graph replays (captured after warm-up; the ``graph``
columns; "-" when capture failed, with the reason in ``error``); peak memory
(``torch.cuda.max_memory_allocated`` over the memory before the timed work).
The sanity check compares every provider's ``y`` (no residual) with
``fused-cuda`` (or the first provider).

The scan kernels alone: ``fork_scan`` forward at both blocks' shapes
(label block: prefix X, suffix T; visual block: prefix T, suffix X), their
achieved bandwidth = bytes every operand read once + every output written once
over the median time, and that as a fraction of the measured device-to-device
copy bandwidth (a large ``copy_``, bytes read + written).

Default sweep (MVLR at 448 px): B=32, M in (196, 784), C in (20, 80), d=512,
N=16, float32 and bfloat16. Output: one CSV per run under ``--out`` and a
short table.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

__all__ = ["GPU_PROVIDERS", "GPU_CSV_COLUMNS", "run"]

#: provider name -> (kind, QMVL kwargs)
GPU_PROVIDERS: Dict[str, Dict[str, Any]] = {
    "fused-cuda": {"kind": "qmvl", "fused": True, "backend": "cuda"},
    "fused-triton": {"kind": "qmvl", "fused": True, "backend": "triton"},
    "unfused-cuda": {"kind": "qmvl", "fused": False, "backend": "cuda"},
    "mamba-ssm": {"kind": "mamba_ssm"},
    "sdpa-self": {"kind": "sdpa_self"},
    "sdpa-cross": {"kind": "sdpa_cross"},
}

GPU_CSV_COLUMNS = [
    "date_utc", "device_name", "driver", "torch", "cuda", "triton", "mamba_ssm", "vlssm",
    "dtype", "batch", "m", "c", "d", "d_state", "provider",
    "fwd_ms", "fwdbwd_ms", "fwd_graph_ms", "fwdbwd_graph_ms",
    "fwdbwd_speedup_vs_mamba_ssm", "fwdbwd_speedup_vs_unfused_cuda", "fwdbwd_ratio_vs_sdpa_self",
    "peak_mem_mb", "peak_mem_fwdbwd_increase_mb", "max_rel_diff", "error",
]

SCAN_CSV_COLUMNS = [
    "date_utc", "device_name", "driver", "torch", "cuda", "triton", "dtype", "batch", "m", "c", "block", "prefix_len",
    "suffix_len", "dim", "d_state", "backend", "fwd_us", "bytes_mb", "gbps", "copy_gbps", "frac_of_copy", "bwd_us",
    "bwd_det_us", "error",
]


# ----------------------------------------------------------------------------- timing

def cuda_time_ms(fn: Callable[[], Any], reps: int, warmup: int = 3) -> float:
    """Median of ``reps`` CUDA-event timings of ``fn`` (after ``warmup`` calls), in ms."""
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
    return statistics.median(times)


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


def copy_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written), GB/s."""
    import torch

    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------- providers

def mamba_ssm_status() -> Tuple[Optional[str], str]:
    """(version, "") when mamba_ssm imports with its CUDA kernels, else (None, reason)."""
    try:
        import mamba_ssm
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.modules.mamba_simple import Mamba  # noqa: F401
    except Exception as e:  # not installed, or built without CUDA
        return None, f"mamba_ssm unavailable: {type(e).__name__}: {e}"
    return getattr(mamba_ssm, "__version__", "?"), ""


def build_provider(name: str, d: int, d_state: int, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    import torch

    import vlssm
    from vlssm.modules.baselines import MambaSsmQMVL, SDPACross, SDPASelf

    kind = GPU_PROVIDERS[name]
    torch.manual_seed(seed)
    dev = torch.device("cuda")
    if kind["kind"] == "qmvl":
        return vlssm.QMVL(d, d_state=d_state, fused=kind["fused"], backend=kind["backend"], device=dev, dtype=dtype)
    if kind["kind"] == "mamba_ssm":
        return MambaSsmQMVL(vlssm.QMVL(d, d_state=d_state, backend="cuda", device=dev, dtype=dtype))
    heads = max(1, d // 64)
    if kind["kind"] == "sdpa_self":
        return SDPASelf(d, heads, dev, dtype)
    return SDPACross(d, heads, dev, dtype)


# ----------------------------------------------------------------------------- one provider

def bench_provider(name: str, cfg: Dict[str, Any], x, t, gx, gt) -> Dict[str, Any]:
    import torch

    res: Dict[str, Any] = {"provider": name, "error": ""}
    model = build_provider(name, cfg["d"], cfg["d_state"], x.dtype, cfg["seed"])
    params = [p for p in model.parameters() if p.requires_grad]
    xg = x.detach().clone().requires_grad_(True)
    tg = t.detach().clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return model(x, t)

    def fwdbwd():
        for p in params + [xg, tg]:
            p.grad = None
        outs = model(xg, tg)
        torch.autograd.backward(outs, (gx, gt))

    fwd()
    fwdbwd()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    res["fwd_ms"] = cuda_time_ms(fwd, cfg["reps"])
    res["fwdbwd_ms"] = cuda_time_ms(fwdbwd, cfg["reps"])
    res["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    res["peak_mem_fwdbwd_increase_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    errors = []
    for key, fn in (("fwd_graph_ms", fwd), ("fwdbwd_graph_ms", fwdbwd)):
        try:
            res[key] = cuda_time_ms(capture_graph(fn), cfg["reps"])
        except Exception as e:  # a provider whose ops cannot be captured
            errors.append(f"{key}: capture failed: {type(e).__name__}: {e}".splitlines()[0])
    res["error"] = "; ".join(errors)
    model.residual = False
    with torch.no_grad():
        res["y"] = model(x, t)
    return res


# ----------------------------------------------------------------------------- scan kernels alone

def fork_scan_inputs(b: int, p: int, s: int, E: int, N: int, dtype: torch.dtype, seed: int):
    """Random fork_scan operands at a QMVL block's shape (token-major, like the layer makes them)."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    L = p + 2 * s
    rn = lambda *sh, scale=1.0: (torch.randn(*sh, generator=g, device="cuda") * scale).to(dtype)  # noqa: E731
    A = -torch.rand(E, N, generator=g, device="cuda").add(0.5)
    return dict(u=rn(b, L, E), delta=rn(b, L, E, scale=0.5), A=A, B=rn(b, L, N), C=rn(b, L, N),
                D=torch.randn(E, generator=g, device="cuda"), z=rn(b, s, E),
                delta_bias=torch.randn(E, generator=g, device="cuda") * 0.5 - 2.0)


def fork_scan_bytes(b: int, p: int, s: int, E: int, N: int, dtype: torch.dtype) -> int:
    """Bytes fork_scan's forward must move: operands read once, outputs written once."""
    import torch

    from .ops._schema import num_checkpoints

    e = torch.finfo(dtype).bits // 8
    L = p + 2 * s
    acc = 8 if dtype == torch.float64 else 4
    read = (2 * b * L * E + 2 * b * L * N + b * s * E) * e + (E * N + 2 * E) * acc  # u, delta, B, C, z, A, D, bias
    nck = num_checkpoints(p) + 2 * num_checkpoints(s)
    written = b * s * E * e + b * s * E * acc + b * E * nck * N * acc  # out, ysum, checkpoints
    return read + written


def bench_scan(cfg: Dict[str, Any], dtype: torch.dtype, copy_gbps: float) -> List[Dict[str, Any]]:
    import torch

    rows = []
    b, M, C, E, N = cfg["batch"], cfg["m"], cfg["c"], 2 * cfg["d"], cfg["d_state"]
    for block, (p, s) in (("label", (M, C)), ("visual", (C, M))):
        for backend, op in (("cuda", "fork_scan"), ("triton", "fork_scan_triton")):
            row: Dict[str, Any] = dict(m=M, c=C, block=block, prefix_len=p, suffix_len=s, dim=E, d_state=N,
                                       backend=backend, copy_gbps=copy_gbps, error="")
            try:
                fn = getattr(torch.ops.vlssm, op)
                a = fork_scan_inputs(b, p, s, E, N, dtype, cfg["seed"])
                args = (a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], p, True)
                us = cuda_time_ms(lambda: fn(*args), cfg["reps"]) * 1e3
                nbytes = fork_scan_bytes(b, p, s, E, N, dtype)
                row.update(fwd_us=us, bytes_mb=nbytes / 1e6, gbps=nbytes / (us * 1e-6) / 1e9)
                row["frac_of_copy"] = row["gbps"] / copy_gbps
                # The backward alone, by default and under torch.use_deterministic_algorithms(True) (CUDA:
                # partial sums instead of atomics; torch then also NaN-fills new allocations, as a user sees it)
                out, ysum, ck = fn(*args)
                bwd = getattr(torch.ops.vlssm, op.replace("fork_scan", "fork_scan_backward"))
                bargs = (torch.randn_like(out), *args[:8], ysum, ck, p, True)
                row["bwd_us"] = cuda_time_ms(lambda: bwd(*bargs), cfg["reps"]) * 1e3
                prev = (torch.are_deterministic_algorithms_enabled(),
                        torch.is_deterministic_algorithms_warn_only_enabled())
                torch.use_deterministic_algorithms(True)
                try:
                    row["bwd_det_us"] = cuda_time_ms(lambda: bwd(*bargs), cfg["reps"]) * 1e3
                finally:
                    torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {e}".splitlines()[0]
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- driver

def _env(mamba_ssm_version: Optional[str]) -> Dict[str, Any]:
    """The environment columns of every row of a run (its start date, device, versions)."""
    import torch

    import vlssm
    from vlssm.env import triton_version

    driver = ""
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi
        pass
    return {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name(), "driver": driver, "torch": torch.__version__,
        "cuda": torch.version.cuda or "", "triton": triton_version() or "",
        "mamba_ssm": mamba_ssm_version or "", "vlssm": getattr(vlssm, "__version__", ""),
    }


def _write_csv(path: str, cols: List[str], rows: List[Dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in cols})


def _fmt(v, spec="8.3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v != "" else f"{'-':>8}"


def run(args: argparse.Namespace) -> int:
    """The GPU sweep for parsed ``vlssm bench`` arguments; returns the exit code."""
    import torch

    if not torch.cuda.is_available():
        print("vlssm bench: error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    import vlssm.ops  # noqa: F401  (registers the kernels)
    from .bench import _max_rel_diff, _torch_dtype

    t0 = time.time()
    providers = [p for p in args.gpu_providers]
    ssm_version, ssm_reason = mamba_ssm_status()
    if "mamba-ssm" in providers and ssm_version is None:
        print(f"[bench] mamba-ssm provider skipped: {ssm_reason}", file=sys.stderr)
        providers.remove("mamba-ssm")
    copy_gbps = copy_bandwidth_gbps()
    print(f"[bench] device copy bandwidth {copy_gbps:.0f} GB/s (read + write)", file=sys.stderr)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env = _env(ssm_version)
    all_rows: List[Dict[str, Any]] = []
    scan_rows: List[Dict[str, Any]] = []
    rc = 0
    for dtype_name in args.gpu_dtypes:
        dtype = _torch_dtype(dtype_name)
        for M in args.gpu_m:
            for C in args.gpu_c:
                cfg = dict(batch=args.batch, m=M, c=C, d=args.d, d_state=args.d_state, reps=args.reps,
                           seed=args.seed)
                g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
                mk = lambda *sh: torch.randn(*sh, generator=g, device="cuda").to(dtype)  # noqa: E731
                B, d = cfg["batch"], cfg["d"]
                x, t, gx, gt = mk(B, M, d), mk(B, C, d), mk(B, M, d), mk(B, C, d)
                results = {}
                for p in providers:
                    print(f"[{time.time() - t0:7.1f}s] {dtype_name} M={M} C={C} {p}", file=sys.stderr, flush=True)
                    try:
                        results[p] = bench_provider(p, cfg, x, t, gx, gt)
                    except Exception as e:
                        traceback.print_exc()
                        results[p] = {"provider": p, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
                        rc = 1
                    torch.cuda.empty_cache()
                ref_name = next((p for p in providers if "y" in results[p]), None)
                base = lambda p, k: results.get(p, {}).get(k)  # noqa: E731
                for p in providers:
                    r = results[p]
                    row = dict(env, dtype=dtype_name, batch=B, m=M, c=C, d=d, d_state=args.d_state, provider=p)
                    row.update({k: r.get(k, "") for k in GPU_CSV_COLUMNS if k in r and k != "y"})
                    if "y" in r and ref_name and GPU_PROVIDERS[p]["kind"] in ("qmvl", "mamba_ssm"):
                        row["max_rel_diff"] = max(_max_rel_diff(a, b) for a, b in zip(r["y"], results[ref_name]["y"]))
                    fb = r.get("fwdbwd_ms")
                    if fb:
                        for other, col in (("mamba-ssm", "fwdbwd_speedup_vs_mamba_ssm"),
                                           ("unfused-cuda", "fwdbwd_speedup_vs_unfused_cuda")):
                            if base(other, "fwdbwd_ms"):
                                row[col] = base(other, "fwdbwd_ms") / fb
                        if base("sdpa-self", "fwdbwd_ms"):
                            row["fwdbwd_ratio_vs_sdpa_self"] = fb / base("sdpa-self", "fwdbwd_ms")
                    all_rows.append(row)
                del results
                for r in bench_scan(cfg, dtype, copy_gbps):
                    scan_rows.append(dict(env, dtype=dtype_name, batch=B, **r))
    os.makedirs(args.out, exist_ok=True)
    tag = f"cuda-B{args.batch}-d{args.d}-{stamp}"
    qpath = os.path.join(args.out, f"qmvl-gpu-{tag}.csv")
    spath = os.path.join(args.out, f"scan-gpu-{tag}.csv")
    _write_csv(qpath, GPU_CSV_COLUMNS, all_rows)
    _write_csv(spath, SCAN_CSV_COLUMNS, scan_rows)

    print(f"QMVL GPU benchmark: {env['device_name']} (driver {env['driver']}), torch {env['torch']}, CUDA "
          f"{env['cuda']}, triton {env['triton']}, mamba_ssm {env['mamba_ssm'] or 'unavailable: ' + ssm_reason}, "
          f"{env['date_utc']}; copy bandwidth {copy_gbps:.0f} GB/s")
    print("times: median ms of CUDA events; 'graph' = CUDA-graph replay; x = speed-up, ratio = time / sdpa-self")
    head = (f"{'dtype':<9}{'M':>5}{'C':>4}  {'provider':<13}{'fwd':>8}{'f+b':>8}{'fwd gr':>8}{'f+b gr':>8}"
            f"{'x mamba':>8}{'x unf':>8}{'/sdpa':>8}{'MB':>8}{'diff':>10}  error")
    print(head)
    for r in all_rows:
        print(f"{r['dtype']:<9}{r['m']:>5}{r['c']:>4}  {r['provider']:<13}{_fmt(r.get('fwd_ms'))}"
              f"{_fmt(r.get('fwdbwd_ms'))}{_fmt(r.get('fwd_graph_ms'))}{_fmt(r.get('fwdbwd_graph_ms'))}"
              f"{_fmt(r.get('fwdbwd_speedup_vs_mamba_ssm'), '8.2f')}"
              f"{_fmt(r.get('fwdbwd_speedup_vs_unfused_cuda'), '8.2f')}"
              f"{_fmt(r.get('fwdbwd_ratio_vs_sdpa_self'), '8.2f')}{_fmt(r.get('peak_mem_mb'), '8.0f')}"
              f"{_fmt(r.get('max_rel_diff'), '10.2e')}  {r.get('error', '')}")
    print()
    print(f"fork_scan alone: forward (bytes read + written once; copy {copy_gbps:.0f} GB/s), backward by default "
          "and under torch.use_deterministic_algorithms(True):")
    print(f"{'dtype':<9}{'M':>5}{'C':>4}  {'block':<7}{'backend':<8}{'us':>9}{'MB':>8}{'GB/s':>8}{'of copy':>8}"
          f"{'bwd us':>9}{'det us':>9}  error")
    for r in scan_rows:
        print(f"{r['dtype']:<9}{r['m']:>5}{r['c']:>4}  {r['block']:<7}"
              f"{r['backend']:<8}{_fmt(r.get('fwd_us'), '9.1f')}{_fmt(r.get('bytes_mb'), '8.1f')}"
              f"{_fmt(r.get('gbps'), '8.0f')}{_fmt(r.get('frac_of_copy'), '8.2f')}"
              f"{_fmt(r.get('bwd_us'), '9.1f')}{_fmt(r.get('bwd_det_us'), '9.1f')}  {r.get('error', '')}")
    print(f"results: {qpath} {spath}")
    if any(r.get("error") and "capture" not in r["error"] for r in all_rows + scan_rows):
        rc = 1
    return rc
