"""``vlssm bench qmvl``: one QMVL layer, fused vs unfused vs the pure-PyTorch reference.

Providers, all with the same seeded weights and inputs:

- ``fused``: ``QMVL(fused=True, backend="auto")``: the shared-prefix fork
  (docs/design.md section 2) on the compiled kernels.
- ``unfused``: ``QMVL(fused=False, backend="auto")``: the literal
  four-sequence composition through vlssm's own selective_scan.
- ``reference``: ``QMVL(fused=False, backend="reference")``: the same
  composition in pure PyTorch (slow: it gets ``--ref-reps`` forward reps and
  ``--ref-bwd-reps`` forward+backward reps).

For each provider: median forward time (under ``torch.no_grad()``) and median
forward+backward time (gradients for the inputs and every parameter), after a
warm-up; analytic forward cost (:mod:`vlssm.profile.flops`) in GFLOPs (2 per
multiply-add) and GMACs; speed-ups vs the reference and vs unfused; and, unless
``--no-memory``, peak memory of a fresh subprocess per provider
(:class:`vlssm.bench._harness.PhaseMemory`: on CPU the peak RSS and its increase
over the RSS just before the timed work, after the forward phase and after the
forward+backward phase; on CUDA ``torch.cuda.max_memory_allocated``).

Output: a table on stdout, one CSV under ``--out`` whose every row carries the
device, the versions, dtype, shape and date, and a progress line on stderr per
provider and phase. The footer reports the max relative difference between the
providers' outputs (a sanity check, on the non-residual outputs); the exit code
is 1 when a provider failed or outputs disagree.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from typing import Any, Dict, List, Sequence

from .._argtypes import positive_int
from . import _harness as H

__all__ = ["PROVIDERS", "CSV_COLUMNS", "add_arguments", "bench_provider", "run"]

#: provider name -> QMVL keyword arguments.
PROVIDERS: Dict[str, Dict[str, Any]] = {
    "fused": {"fused": True, "backend": "auto"},
    "unfused": {"fused": False, "backend": "auto"},
    "reference": {"fused": False, "backend": "reference"},
}

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "cpu_threads", "python", "torch", "cuda", "triton", "vlssm",
    "dtype", "batch", "m", "c", "d", "d_state", "shared_labels",
    "provider", "backend", "fused",
    "fwd_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_reps",
    "fwd_speedup_vs_reference", "fwdbwd_speedup_vs_reference",
    "fwd_speedup_vs_unfused", "fwdbwd_speedup_vs_unfused",
    "gflops_fwd", "gmacs_fwd", "gflops_fwd_per_image", "fwd_gflops_per_s",
    "peak_mem_mb", "peak_mem_fwd_increase_mb", "peak_mem_fwdbwd_increase_mb", "mem_kind",
    "max_rel_diff_vs_unfused", "error",
]


def add_arguments(p: argparse.ArgumentParser, common: bool = True) -> argparse.ArgumentParser:
    """The QMVL workload's options (shape and providers; with ``common``, the shared run options)."""
    g = p.add_argument_group("QMVL shape")
    g.add_argument("--batch", type=positive_int, default=None,
                   help="images per batch B (default 4 on cpu, 32 on cuda)")
    g.add_argument("--m", type=positive_int, default=196, help="visual tokens M (default 196)")
    g.add_argument("--c", type=positive_int, default=80, help="label tokens C (default 80)")
    g.add_argument("--d", type=positive_int, default=512, help="token width d_model (default 512)")
    g.add_argument("--d-state", type=positive_int, default=16, help="SSM state size N (default 16)")
    g.add_argument("--shared-labels", action="store_true",
                   help="label tokens t of shape (C, d), shared by every image (default (B, C, d))")
    r = p.add_argument_group("QMVL providers")
    r.add_argument("--providers", type=H.choice_list(list(PROVIDERS), "provider"), default=list(PROVIDERS),
                   help="comma list of fused,unfused,reference (default all three)")
    r.add_argument("--ref-reps", type=positive_int, default=3, help="timed forward reps of reference (default 3)")
    r.add_argument("--ref-bwd-reps", type=positive_int, default=1,
                   help="timed forward+backward reps of reference (default 1; ~60 s each at the default shape "
                        "on CPU; it gets no warm-up, its forward warm-up is enough)")
    if common:
        H.add_common_arguments(p)
    return p


def _make_model(cfg: Dict[str, Any], provider: str):
    import torch

    import vlssm

    torch.manual_seed(cfg["seed"])
    kw = PROVIDERS[provider]
    return vlssm.QMVL(cfg["d"], d_state=cfg["d_state"], fused=kw["fused"], backend=kw["backend"],
                      device=torch.device(cfg["device"]), dtype=H.torch_dtype(cfg["dtype"]))


def _make_inputs(cfg: Dict[str, Any]):
    """Seeded random inputs x (B, M, d), t (B, C, d) or (C, d), and output gradients."""
    B, M, C, d = cfg["batch"], cfg["m"], cfg["c"], cfg["d"]
    mk = H.seeded_randn(cfg["seed"] + 1, cfg["device"], cfg["dtype"])
    x = mk(B, M, d)
    t = mk(C, d) if cfg["shared_labels"] else mk(B, C, d)
    gx, gt = mk(B, M, d), mk(B, C, d)
    return x, t, gx, gt


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

    H.prime_layer(model, x, t, params, device)

    ref = provider == "reference"
    reps_f = cfg["ref_reps"] if ref else cfg["reps"]
    reps_b = cfg["ref_bwd_reps"] if ref else cfg["reps"]
    warm_b = 0 if ref else cfg["warmup"]
    H.log(t0, f"{provider:<9} timing: {reps_f} forward and {reps_b} forward+backward rep(s) ({res['backend']} "
              "backend)")
    return H.time_fwd_fwdbwd(res, fwd, fwdbwd, cfg, (reps_f, reps_b), (cfg["warmup"], warm_b), label=f"{provider:<9}")


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The harness's entry point: one provider (``cfg["provider"]``) in this process."""
    return _bench_provider(cfg, cfg["provider"])


def _sanity_check(cfg: Dict[str, Any], providers: Sequence[str]) -> Dict[str, float]:
    """Outputs of every provider on the same weights and inputs, compared without the residual.

    Returns {"fused vs unfused": diff, ...}: max over x_rf and t_rf of max|a-b| / max|b|.
    """
    import torch

    from vlssm.testing import max_rel_diff

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
            diffs[f"{a} vs {b}"] = max(max_rel_diff(oa, ob) for oa, ob in zip(outs[a], outs[b]))
    return diffs


def _env_columns(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """The machine columns and the layer shape of a row."""
    return {**H.machine_columns(cfg), "batch": cfg["batch"], "m": cfg["m"], "c": cfg["c"], "d": cfg["d"],
            "d_state": cfg["d_state"], "shared_labels": cfg["shared_labels"]}


def _table(rows: List[Dict[str, Any]]) -> str:
    cols = [
        ("provider", "provider", "s"), ("backend", "backend", "s"),
        ("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
        ("fwd x ref", "fwd_speedup_vs_reference", ".2f"), ("f+b x ref", "fwdbwd_speedup_vs_reference", ".2f"),
        ("fwd x unf", "fwd_speedup_vs_unfused", ".2f"), ("f+b x unf", "fwdbwd_speedup_vs_unfused", ".2f"),
        ("GFLOPs fwd", "gflops_fwd", ".3g"), ("GFLOP/s", "fwd_gflops_per_s", ".1f"),
        ("peak MB", "peak_mem_mb", ".0f"), ("+fwd MB", "peak_mem_fwd_increase_mb", ".0f"),
        ("+f+b MB", "peak_mem_fwdbwd_increase_mb", ".0f"),
    ]
    return H.format_table(rows, cols, left=2)


def run(args: argparse.Namespace) -> int:
    """The QMVL benchmark for parsed ``vlssm bench qmvl`` arguments; returns the exit code."""
    from vlssm.profile.flops import qmvl_flops

    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4

    t0 = time.time()
    providers = args.providers
    cfg = {k: getattr(args, k) for k in ("batch", "m", "c", "d", "d_state", "dtype", "device", "reps", "ref_reps",
                                         "ref_bwd_reps", "warmup", "budget", "threads", "seed", "shared_labels",
                                         "memory")}
    cfg.update(t0=t0, workload="qmvl", worker=__name__)

    env = _env_columns(cfg)
    shape = (f"B={args.batch} M={args.m} C={args.c} d={args.d} d_state={args.d_state} {args.dtype} "
             f"t={'(C, d) shared' if args.shared_labels else '(B, C, d)'}")
    header = H.header(f"QMVL benchmark  {shape}", env)
    H.log(t0, f"QMVL benchmark {shape} on {args.device} ({env['device_name']}); providers {', '.join(providers)}"
             + ("; memory: one subprocess per provider" if args.memory else "; --no-memory: in-process"))

    H.log(t0, f"sanity check: outputs of {', '.join(providers)} on the same weights and inputs")
    try:
        diffs = _sanity_check(cfg, providers)
        check_error = ""
    except Exception as e:
        traceback.print_exc()
        diffs, check_error = {}, f"{type(e).__name__}: {e}"
    for k, v in diffs.items():
        H.log(t0, f"sanity check: {k}: max rel diff {v:.3e}")

    results: List[Dict[str, Any]] = []
    for p in providers:
        res = H.run_row(cfg, p)
        if res.get("error"):
            H.log(t0, f"{p:<9} FAILED: {res['error']}")
        results.append(res)

    by = {r["provider"]: r for r in results if not r.get("error")}
    rows = []
    for r in results:
        p = r["provider"]
        fl = qmvl_flops(args.batch, args.m, args.c, args.d, d_state=args.d_state, fused=PROVIDERS[p]["fused"],
                        shared_labels=args.shared_labels).total
        row = dict(env)
        row.update(provider=p, backend=r.get("backend", ""), fused=PROVIDERS[p]["fused"],
                   gflops_fwd=fl / 1e9, gmacs_fwd=fl / 2e9, gflops_fwd_per_image=fl / 1e9 / args.batch,
                   error=r.get("error", ""))
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

    name = (f"qmvl-{args.device}-{args.dtype}-B{args.batch}-M{args.m}-C{args.c}-d{args.d}"
            f"{'-shared' if args.shared_labels else ''}-{H.stamp()}.csv")
    path = H.write_csv(os.path.join(args.out, name), rows, CSV_COLUMNS)

    tol = H.TOLERANCE[args.dtype]
    bad = {k: v for k, v in diffs.items() if not v <= tol}
    print(header)
    print()
    print(_table(rows))
    print()
    fu = qmvl_flops(1, args.m, args.c, args.d, d_state=args.d_state, fused=False).total
    ff = qmvl_flops(1, args.m, args.c, args.d, d_state=args.d_state, fused=True).total
    print(f"analytic forward cost per image: unfused/reference {fu / 1e9:.3g} GFLOPs ({fu / 2e9:.3g} GMACs), "
          f"fused {ff / 1e9:.3g} GFLOPs ({ff / 2e9:.3g} GMACs): {fu / ff:.2f}x less work "
          "(GFLOPs: 2 per multiply-add, torch's convention; GMACs: multiply-accumulates, the papers' \"FLOPs\")")
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
    H.log(t0, f"done; wrote {path}")
    failed = [r["provider"] for r in results if r.get("error")]
    if failed or bad or check_error:
        return 1
    return 0


