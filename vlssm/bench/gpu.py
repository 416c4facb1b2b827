"""``vlssm bench gpu``: the GPU benchmark of QMVL and its baselines.

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

The scan kernels alone (fork_scan bandwidth against a device copy) are
``vlssm bench scan --device cuda``.

Default sweep (MVLR at 448 px): B=32, M in (196, 784), C in (20, 80), d=512,
N=16, float32 and bfloat16. Output: one CSV per run under ``--out`` and a
short table.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from .._argtypes import positive_int
from . import _harness as H
from ._harness import capture_graph, cuda_time_ms

if TYPE_CHECKING:  # annotations only
    import torch

__all__ = ["GPU_PROVIDERS", "GPU_CSV_COLUMNS", "add_arguments", "run", "cuda_time_ms", "capture_graph"]

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

def add_arguments(p: argparse.ArgumentParser, common: bool = True) -> argparse.ArgumentParser:
    """The GPU sweep's options (``--gpu-*`` and the QMVL layer's batch, width and state size)."""
    gp = p.add_argument_group("GPU sweep")
    gp.add_argument("--gpu-providers", type=H.choice_list(list(GPU_PROVIDERS), "provider"),
                    default=list(GPU_PROVIDERS),
                    help=f"comma list of {','.join(GPU_PROVIDERS)} (default all; mamba-ssm only where it imports)")
    gp.add_argument("--gpu-m", type=H.int_list, default=[196, 784], help="visual token counts M (default 196,784)")
    gp.add_argument("--gpu-c", type=H.int_list, default=[20, 80], help="label counts C (default 20,80)")
    gp.add_argument("--gpu-dtypes", type=H.choice_list(H.DTYPES, "dtype"), default=["float32", "bfloat16"],
                    help="comma list of dtypes (default float32,bfloat16)")
    gp.add_argument("--batch", type=positive_int, default=32, help="images per batch B (default 32)")
    gp.add_argument("--d", type=positive_int, default=512, help="token width d_model (default 512)")
    gp.add_argument("--d-state", type=positive_int, default=16, help="SSM state size N (default 16)")
    if common:
        H.add_common_arguments(p, reps=20, devices=("cuda",), memory=False)
        p.set_defaults(device="cuda")
    return p


# ----------------------------------------------------------------------------- timing

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

def _bench_one(name: str, cfg: Dict[str, Any], x, t, gx, gt) -> Dict[str, Any]:
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


def _fmt(v, spec="8.3f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) and v != "" else f"{'-':>8}"


def run(args: argparse.Namespace) -> int:
    """The GPU sweep for parsed ``vlssm bench gpu`` arguments; returns the exit code."""
    import torch

    err = H.check_device("cuda", "vlssm bench gpu")
    if err:
        print(err, file=sys.stderr)
        return 2
    import vlssm.ops  # noqa: F401  (registers the kernels)
    from vlssm.testing import max_rel_diff

    t0 = time.time()
    providers = [p for p in args.gpu_providers]
    ssm_version, ssm_reason = mamba_ssm_status()
    if "mamba-ssm" in providers and ssm_version is None:
        print(f"[bench] mamba-ssm provider skipped: {ssm_reason}", file=sys.stderr)
        providers.remove("mamba-ssm")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    env = _env(ssm_version)
    all_rows: List[Dict[str, Any]] = []
    rc = 0
    for dtype_name in args.gpu_dtypes:
        dtype = H.torch_dtype(dtype_name)
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
                        results[p] = _bench_one(p, cfg, x, t, gx, gt)
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
                        row["max_rel_diff"] = max(max_rel_diff(a, b) for a, b in zip(r["y"], results[ref_name]["y"]))
                    fb = r.get("fwdbwd_ms")
                    if fb:
                        for other, col in (("mamba-ssm", "fwdbwd_speedup_vs_mamba_ssm"),
                                           ("unfused-cuda", "fwdbwd_speedup_vs_unfused_cuda")):
                            if base(other, "fwdbwd_ms"):
                                row[col] = base(other, "fwdbwd_ms") / fb
                        if base("sdpa-self", "fwdbwd_ms"):
                            row["fwdbwd_ratio_vs_sdpa_self"] = fb / base("sdpa-self", "fwdbwd_ms")
                    all_rows.append(row)
                results.clear()  # frees the outputs before the next shape
    os.makedirs(args.out, exist_ok=True)
    tag = f"cuda-B{args.batch}-d{args.d}-{stamp}"
    qpath = os.path.join(args.out, f"qmvl-gpu-{tag}.csv")
    H.write_csv(qpath, all_rows, GPU_CSV_COLUMNS)

    print(f"QMVL GPU benchmark: {env['device_name']} (driver {env['driver']}), torch {env['torch']}, CUDA "
          f"{env['cuda']}, triton {env['triton']}, mamba_ssm {env['mamba_ssm'] or 'unavailable: ' + ssm_reason}, "
          f"{env['date_utc']}")
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
    print(f"results: {qpath}")
    if any(r.get("error") and "capture" not in r["error"] for r in all_rows):
        rc = 1
    return rc
