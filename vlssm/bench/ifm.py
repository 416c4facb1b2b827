"""IFM benchmark: vlssm's fused IFM vs the plain-PyTorch IFM, over a sweep of shapes.

Run it as ``vlssm bench ifm`` (part of the default ``vlssm bench``).
Providers, both on the same seeded :class:`vlssm.IFM` weights and inputs:

- ``fused``: ``IFM(backend="auto")``: attention_with_probs (one pass returning
  the map), the cross-attention folded so the visual tokens are never projected
  (:meth:`vlssm.modules.ifm.LabelAttention.folds`), T^ka and W_1 T^ka once per
  forward, fused kcr_loss and relation_aggregate;
- ``naive``: :func:`vlssm.reference.ifm.ifm_ref`: the paper's formulas with
  plain torch ops (three projections, scores, softmax, P V; cat + MLP;
  F.cosine_similarity; the mixed map materialised).

Shapes: B = ``--batch``, d = ``--d``, ``--heads``, and every (C, M) of
``--ifm-c`` x ``--ifm-m`` (default C = 20, 80, 1000 and M = 196, 784). For each:
median forward time (no grad) and forward+backward time (gradients of x, T^soft
and every parameter; T^hard frozen, as PDLR makes it), analytic forward
multiply-adds of each provider, peak memory of a fresh subprocess per provider
(as the QMVL benchmark), and on CUDA the number of CUDA kernels one forward
launches, total and outside the GEMMs of the projections (torch.profiler).
"""
from __future__ import annotations

import os
import time
import traceback
from typing import Any, Dict, List

from .._argtypes import positive_int
from . import _harness as H

__all__ = ["PROVIDERS", "CSV_COLUMNS", "ifm_macs", "add_arguments", "bench_provider", "run"]

PROVIDERS = ("fused", "naive")

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "cpu_threads", "python", "torch", "cuda", "triton", "vlssm",
    "dtype", "batch", "m", "c", "d", "heads", "provider", "backend",
    "fwd_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_reps", "fwd_speedup_vs_naive", "fwdbwd_speedup_vs_naive",
    "gmacs_fwd", "gflops_fwd", "cuda_kernels_fwd", "cuda_kernels_fwd_non_gemm",
    "peak_mem_mb", "peak_mem_fwd_increase_mb", "peak_mem_fwdbwd_increase_mb", "mem_kind",
    "max_rel_diff_vs_naive", "error",
]


def add_arguments(p, common: bool = True, prefix: str = ""):
    """The IFM sweep's options: ``--c`` / ``--m`` lists, ``--heads``, ``--batch``, ``--d`` (``prefix``
    ``"ifm-"`` names them ``--ifm-c`` / ``--ifm-m`` beside the QMVL options of the default run)."""
    g = p.add_argument_group("IFM sweep")
    g.add_argument(f"--{prefix}c", dest="ifm_c", type=H.int_list, default=[20, 80, 1000],
                   help="label counts C to sweep, comma-separated (default 20,80,1000)")
    g.add_argument(f"--{prefix}m", dest="ifm_m", type=H.int_list, default=[196, 784],
                   help="visual token counts M to sweep, comma-separated (default 196,784)")
    g.add_argument("--heads", type=positive_int, default=1, help="IFM attention heads (default 1)")
    g.add_argument("--plot", action="store_true",
                   help="also draw the sweep's PNG (time vs C per provider and M) beside its CSV (needs matplotlib)")
    if common:
        g.add_argument("--batch", type=positive_int, default=None, help="images per batch B (default 4 on cpu, "
                       "32 on cuda)")
        g.add_argument("--d", type=positive_int, default=512, help="token width d (default 512)")
        H.add_common_arguments(p)
    return p


def ifm_macs(B: int, M: int, C: int, d: int, heads: int = 1, *, fused: bool, mlp_hidden=None) -> int:
    """Analytic forward multiply-adds of the IFM (matmuls only; softmax and elementwise not counted).

    naive: label attention once (3 C d^2 + 2 C^2 d), cross attention with K, V of all
    B M tokens (C d^2 + 2 B M d^2 + 2 B C M d), context attention (3 B C d^2 + 2 B C^2 d),
    MLP on [T^ka, T^ca] (B C (2d h + h d)), mixed map times T^ca (B C^2 d).
    fused: the same, except the cross attention is folded when
    :meth:`LabelAttention.folds` says so (C d^2 for Q, C d^2 for Q W_K, 2 B H C M d,
    B C d^2 for W_V) and W_1 T^ka is applied once (C d h instead of B C d h).
    """
    h = d if mlp_hidden is None else mlp_hidden
    label = 3 * C * d * d + 2 * C * C * d
    context = 3 * B * C * d * d + 2 * B * C * C * d
    relation = B * C * C * d
    fold = 2 * heads * C * M * d + C * d * d < 2 * M * d * d + 2 * C * M * d
    if fused and fold:
        cross = 2 * C * d * d + 2 * B * heads * C * M * d + B * C * d * d
    else:
        cross = C * d * d + 2 * B * M * d * d + 2 * B * C * M * d
    mlp = (C * d * h + B * C * d * h + B * C * h * d) if fused else B * C * (2 * d * h + h * d)
    return label + cross + context + mlp + relation


def _make(cfg: Dict[str, Any]):
    """Seeded IFM, inputs x (B, M, d), t_hard (C, d) (frozen), t_soft (C, d), output gradient."""
    import torch

    import vlssm

    dt, dev = H.torch_dtype(cfg["dtype"]), torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model = vlssm.IFM(cfg["d"], heads=cfg["heads"], backend="auto", device=dev, dtype=dt)
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    mk = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float32).to(device=dev, dtype=dt)  # noqa: E731
    B, M, C, d = cfg["batch"], cfg["m"], cfg["c"], cfg["d"]
    return model, mk(B, M, d), mk(C, d), mk(C, d), mk(B, C, d)


def _forward_fn(model, provider: str):
    from vlssm.reference.ifm import ifm_ref

    if provider == "fused":
        return model
    if provider == "naive":
        return lambda x, th, ts: ifm_ref(model, x, th, ts)
    raise ValueError(f"unknown IFM provider {provider!r}; expected one of {PROVIDERS}")


def _count_cuda_kernels(fn) -> Dict[str, int]:
    """CUDA kernels launched by one call of ``fn``: total and not GEMM (the projections)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gemm = ("gemm", "cutlass", "sm80_", "sm90_", "ampere_", "hopper_", "cublas", "nvjet")
    return {"cuda_kernels_fwd": len(names),
            "cuda_kernels_fwd_non_gemm": sum(1 for n in names if not any(g in n.lower() for g in gemm))}


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Time (and measure the memory of) one IFM provider in this process."""
    import torch

    from vlssm import _backend

    provider, device, t0 = cfg["provider"], cfg["device"], cfg["t0"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    res: Dict[str, Any] = {"provider": provider, "error": ""}
    res["backend"] = _backend.resolve_backend("auto", torch.device(device)) if provider == "fused" else "torch"
    model, x, t_hard, t_soft, gy = _make(cfg)
    f = _forward_fn(model, provider)
    xg = x.detach().clone().requires_grad_(True)
    tg = t_soft.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def fwd():
        with torch.no_grad():
            f(x, t_hard, t_soft)

    def fwdbwd():
        for p in params:
            p.grad = None
        xg.grad = tg.grad = None
        out = f(xg, t_hard, tg)
        ((out[0] * gy).sum() + out[1]).backward()

    # Prime the code paths (library pages count in RSS) on a tiny slice before the baseline.
    out = f(xg[:1, :3], t_hard[:2], tg[:2])
    (out[0].sum() + out[1]).backward()
    for p in params:
        p.grad = None
    del out
    H.sync(device)
    if device == "cuda":
        fwd()
        res.update(_count_cuda_kernels(fwd))

    label = f"C={cfg['c']} M={cfg['m']} {provider:<5}"
    H.time_fwd_fwdbwd(res, fwd, fwdbwd, cfg, (cfg["reps"],) * 2, (cfg["warmup"],) * 2, detailed_kind=False)
    H.log(t0, f"ifm {label} fwd {res['fwd_ms']:9.2f} ms  fwd+bwd {res['fwdbwd_ms']:9.2f} ms")
    return res


def _sanity(cfg: Dict[str, Any]) -> float:
    """max |fused - naive| / max |naive| over labels, loss and both maps."""
    import torch

    from vlssm.testing import max_rel_diff

    model, x, t_hard, t_soft, _ = _make(cfg)
    with torch.no_grad():
        a = _forward_fn(model, "fused")(x, t_hard, t_soft)
        b = _forward_fn(model, "naive")(x, t_hard, t_soft)
    return max(max_rel_diff(u, v) for u, v in zip(a, b))


def _table(rows: List[Dict[str, Any]]) -> str:
    cols = [("C", "c", "d"), ("M", "m", "d"), ("provider", "provider", "s"), ("backend", "backend", "s"),
            ("fwd ms", "fwd_ms", ".2f"), ("fwd+bwd ms", "fwdbwd_ms", ".2f"),
            ("fwd x naive", "fwd_speedup_vs_naive", ".2f"), ("f+b x naive", "fwdbwd_speedup_vs_naive", ".2f"),
            ("GMACs fwd", "gmacs_fwd", ".3g"), ("kernels", "cuda_kernels_fwd", "d"),
            ("non-GEMM", "cuda_kernels_fwd_non_gemm", "d"),
            ("peak MB", "peak_mem_mb", ".0f"), ("+fwd MB", "peak_mem_fwd_increase_mb", ".0f"),
            ("+f+b MB", "peak_mem_fwdbwd_increase_mb", ".0f")]
    return H.format_table(rows, cols, left=(2, 3))


def run(args) -> int:
    """The IFM sweep for parsed ``vlssm bench`` arguments; returns the exit code."""
    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4
    t0 = time.time()
    cfg0 = {k: getattr(args, k) for k in ("batch", "d", "heads", "dtype", "device", "reps", "warmup", "budget",
                                          "threads", "seed", "memory")}
    cfg0.update(t0=t0, workload="ifm", worker=__name__)
    env = dict(H.machine_columns(cfg0), batch=args.batch, d=args.d)
    shapes = [(c, m) for c in args.ifm_c for m in args.ifm_m]
    H.log(t0, f"IFM benchmark B={args.batch} d={args.d} heads={args.heads} {args.dtype} on {args.device}: "
                f"(C, M) in {shapes}; providers {', '.join(PROVIDERS)}")
    rows: List[Dict[str, Any]] = []
    tol = H.TOLERANCE[args.dtype]
    bad: List[str] = []
    for c, m in shapes:
        cfg = dict(cfg0, c=c, m=m)
        try:
            diff = _sanity(cfg)
        except Exception as e:
            traceback.print_exc()
            diff, bad = float("nan"), bad + [f"C={c} M={m}: {type(e).__name__}: {e}"]
        if not diff <= tol:
            bad.append(f"C={c} M={m}: fused vs naive max rel diff {diff:.3e} > {tol:g}")
        results = {}
        for p in PROVIDERS:
            results[p] = H.run_row(cfg, p)
        for p, r in results.items():
            row = dict(env, m=m, c=c, heads=args.heads, provider=p, backend=r.get("backend", ""),
                       error=r.get("error", ""), max_rel_diff_vs_naive=0.0 if p == "naive" else diff,
                       gmacs_fwd=ifm_macs(args.batch, m, c, args.d, args.heads, fused=p == "fused") / 1e9)
            row["gflops_fwd"] = 2 * row["gmacs_fwd"]
            for k in ("fwd_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_reps", "cuda_kernels_fwd",
                      "cuda_kernels_fwd_non_gemm", "peak_mem_mb", "peak_mem_fwd_increase_mb",
                      "peak_mem_fwdbwd_increase_mb", "mem_kind"):
                row[k] = r.get(k, "")
            naive = results.get("naive", {})
            if not row["error"] and not naive.get("error") and "fwd_ms" in naive:
                row["fwd_speedup_vs_naive"] = naive["fwd_ms"] / r["fwd_ms"]
                row["fwdbwd_speedup_vs_naive"] = naive["fwdbwd_ms"] / r["fwdbwd_ms"]
            if row["error"]:
                bad.append(f"C={c} M={m} {p}: {row['error']}")
            rows.append({k: row.get(k, "") for k in CSV_COLUMNS})

    name = f"ifm-{args.device}-{args.dtype}-B{args.batch}-d{args.d}-h{args.heads}-{H.stamp()}.csv"
    path = H.write_csv(os.path.join(args.out, name), rows, CSV_COLUMNS)
    print(H.header(f"IFM benchmark  B={args.batch} d={args.d} heads={args.heads} {args.dtype}", env))
    print()
    print(_table(rows))
    print()
    print("fused = vlssm.IFM (auto backend); naive = the paper's formulas in plain torch (vlssm.reference.ifm); "
          "x naive = speed-up; GMACs fwd = analytic multiply-adds (the CSV's gflops_fwd: twice that); kernels = "
          "CUDA kernels per forward (non-GEMM: outside the projections' GEMMs; CUDA only)")
    for msg in bad:
        print(f"FAILED: {msg}")
    print(f"results: {path}")
    if args.plot:  # (vlssm.bench.run checked for matplotlib before any timing)
        from . import plot

        for png in plot.plot_ifm(rows, args.out, os.path.splitext(name)[0]):
            print(f"figure: {png}")
    return 1 if bad else 0
