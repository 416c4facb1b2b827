"""``vlssm bench attention``: QMVL vs the attention blocks it replaces (MVLR Table 6 and Figure 5).

Providers, all on the same seeded inputs x (B, M, d) and t (B, C, d), each returning (x_rf, t_rf):

- ``qmvl-fused``       ``vlssm.QMVL(d, fused=True, backend="auto")``: the shared-prefix fork.
- ``qmvl-literal``     ``vlssm.QMVL(d, fused=False, backend="auto")``: the literal four-sequence
                       composition on vlssm's selective_scan (same weights as qmvl-fused).
- ``self-attn-block``  the standard pre-norm transformer block over [X, T]
                       (:class:`vlssm.modules.baselines.SDPASelfBlock`: self-attention + residual,
                       MLP of ratio 4 (GELU) + residual); Table 6's "Self-Attn.", the ratio baseline.
- ``cross-attn-block`` two cross-attention transformer blocks, X <- T and T <- X, each with its MLP
                       (:class:`~vlssm.modules.baselines.SDPACrossBlock`); Table 6's "Cross-Attn.".
- ``self-attn``        attention only over [X, T] (:class:`~vlssm.modules.baselines.SDPASelf`).
- ``cross-attn``       attention only, X <- T and T <- X (:class:`~vlssm.modules.baselines.SDPACross`).

Heads: ``--heads``, default d // 64 (head width 64, as the GPU benchmark). All attention runs
through ``F.scaled_dot_product_attention``; the ``sdpa_backend`` column names the kernel that ran
(observed, not predicted: a dispatch mode records which fused SDPA op executed, e.g. ``cpu flash``
= ``aten._scaled_dot_product_flash_attention_for_cpu``, ``flash`` / ``efficient`` / ``cudnn`` on
CUDA; an SDPA call that ran none of them took the ``math`` decomposition).

Sweep (``--m``, ``--c``, ``--d`` lists; M = visual tokens, C = labels, d = width): M over its list
at C = C0 and d = d0, then C over its list at M = M0, d = d0, then d over its list at M = M0, C = C0,
de-duplicated, where M0 / C0 / d0 are MVLR's 196 / 80 / 512 when the list holds them, else the
list's first value; ``--grid`` runs the full product instead. The default M list is the stride-32
token count M = (S / 32)^2 of input resolutions S = 224, 320, 448, 640, 896, 1024 px
(M = 49, 100, 196, 400, 784, 1024; MVLR's RN101 at 448 px gives M = 196); ViT-B/16 gives the
same counts at half the resolution (196 at 224 px, 784 at 448 px).

Per (shape, provider): parameters; forward FLOPs counted by :func:`vlssm.profile.flops.count_flops`
(torch's FlopCounterMode with the formulas of vlssm's custom ops; SDPA counted on its math
decomposition, the same q k^T and P v matmuls whatever kernel runs), GMACs = GFLOPs / 2; median
(and fastest, ``*_min_ms``: the least disturbed rep on a shared machine) forward (no grad) and
forward+backward (gradients of the inputs and every parameter) times after a warm-up; the medians'
ratio to ``self-attn-block`` at the same shape;
unless ``--no-memory``, peak memory of a fresh subprocess per row
(:class:`vlssm.bench._harness.PhaseMemory`). A row that fails (out of memory included) records its
error and the sweep goes on; the exit code is then 1.

Output: a table and a summary on stdout (at MVLR's shape d = 512, M = 196, C = 80: the
qmvl-fused / self-attn-block ratios; the ratios over the M sweep; the crossover M where QMVL
fused becomes faster), progress on stderr, one CSV ``attention-<device>-<dtype>-B<batch>-<stamp>.csv``
under ``--out``; with ``--plot`` the figures of :func:`vlssm.bench.plot.plot_attention` beside it
(``--plot-from CSV`` redraws them from an earlier CSV without timing anything).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .._argtypes import positive_int
from . import _harness as H

__all__ = ["PROVIDERS", "BASELINE", "DEFAULT_M", "CSV_COLUMNS", "resolution_px", "sweep_shapes", "crossover",
           "add_arguments", "bench_provider", "run"]

#: provider name -> the ``kind`` column.
PROVIDERS: Dict[str, str] = {
    "qmvl-fused": "mamba (fused)",
    "qmvl-literal": "mamba (literal)",
    "self-attn-block": "transformer block",
    "cross-attn-block": "transformer block",
    "self-attn": "attention only",
    "cross-attn": "attention only",
}

#: the provider the ratio columns divide by.
BASELINE = "self-attn-block"
#: the provider the summary's ratios and crossover are about.
SUBJECT = "qmvl-fused"
#: the token stride of the default M list (ResNet / CLIP RN101's final feature map).
STRIDE = 32
#: M = (S / 32)^2 for S = 224, 320, 448, 640, 896, 1024 px.
DEFAULT_M = [49, 100, 196, 400, 784, 1024]
DEFAULT_C = [20, 80, 1000]
DEFAULT_D = [512]
#: MVLR's shape (M, C, d): RN101 at 448 px, COCO's 80 labels, width 512.
MVLR_SHAPE = (196, 80, 512)

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "cpu_threads", "python", "torch", "cuda", "triton", "vlssm",
    "dtype", "batch", "m", "c", "d", "heads", "resolution_px", "provider", "kind", "qmvl_backend", "sdpa_backend",
    "params", "gflops_fwd", "gmacs_fwd", "gmacs_fwd_per_image", "flops_counter",
    "fwd_ms", "fwd_min_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_min_ms", "fwdbwd_reps", "fwd_ratio_vs_self_attn_block",
    "fwdbwd_ratio_vs_self_attn_block", "peak_mem_mb", "peak_mem_fwd_increase_mb", "peak_mem_fwdbwd_increase_mb",
    "mem_kind", "error",
]

#: keys of a bench_provider result copied into the row.
_RESULT_KEYS = ("qmvl_backend", "sdpa_backend", "params", "gflops_fwd", "gmacs_fwd", "gmacs_fwd_per_image",
                "flops_counter", "fwd_ms", "fwd_min_ms", "fwd_reps", "fwdbwd_ms", "fwdbwd_min_ms", "fwdbwd_reps",
                "peak_mem_mb", "peak_mem_fwd_increase_mb", "peak_mem_fwdbwd_increase_mb", "mem_kind")


# ----------------------------------------------------------------------------- shapes

def resolution_px(m: int, stride: int = STRIDE) -> Optional[int]:
    """The input resolution S with M = (S / stride)^2 tokens, or None when M is not a square."""
    r = math.isqrt(m)
    return stride * r if r * r == m else None


def _pick(values: Sequence[int], preferred: int) -> int:
    return preferred if preferred in values else values[0]


def sweep_shapes(ms: Sequence[int], cs: Sequence[int], ds: Sequence[int],
                 grid: bool = False) -> List[Tuple[int, int, int]]:
    """The (M, C, d) shapes of a run, in order, without repeats.

    ``grid``: every (d, C, M) of the product. Otherwise M over ``ms`` at (C0, d0), C over ``cs`` at
    (M0, d0), d over ``ds`` at (M0, C0), where M0, C0, d0 are MVLR's 196, 80, 512 when the lists hold
    them, else each list's first value.
    """
    if grid:
        shapes = [(m, c, d) for d in ds for c in cs for m in ms]
    else:
        m0, c0, d0 = (_pick(v, p) for v, p in zip((ms, cs, ds), MVLR_SHAPE))
        shapes = [(m, c0, d0) for m in ms] + [(m0, c, d0) for c in cs] + [(m0, c0, d) for d in ds]
    return list(dict.fromkeys(shapes))


def crossover(ms: Sequence[int], ratios: Sequence[Optional[float]]) -> str:
    """Where ``ratios`` (subject time / baseline time at each M, ascending M) falls below 1 for good.

    Returns a sentence: "faster at every M in range", "none in range" (slower or equal at the
    largest M), or "between M=a and M=b (about M=x by log-log interpolation)"; M values without a
    ratio (failed rows) are skipped.
    """
    pts = [(m, r) for m, r in zip(ms, ratios) if r is not None and r > 0]
    if not pts:
        return "no data"
    last_slow = max((i for i, (_, r) in enumerate(pts) if r >= 1.0), default=None)
    if last_slow is None:
        return f"faster at every M in range (M={pts[0][0]}..{pts[-1][0]})"
    if last_slow == len(pts) - 1:
        return f"none in range (M <= {pts[-1][0]})"
    (ma, ra), (mb, rb) = pts[last_slow], pts[last_slow + 1]
    f = math.log(ra) / (math.log(ra) - math.log(rb)) if ra != rb else 0.0
    mx = math.exp(math.log(ma) + f * (math.log(mb) - math.log(ma)))
    return f"between M={ma} and M={mb} (about M={mx:.0f} by log-log interpolation)"


# ----------------------------------------------------------------------------- options

def add_arguments(p: argparse.ArgumentParser, common: bool = True) -> argparse.ArgumentParser:
    """The attention workload's options (sweep, providers, plots; with ``common``, the shared run options)."""
    g = p.add_argument_group("attention sweep")
    g.add_argument("--m", type=H.int_list, default=list(DEFAULT_M),
                   help="visual token counts M, comma-separated (default 49,100,196,400,784,1024: stride-32 "
                        "tokens (S/32)^2 of S = 224,320,448,640,896,1024 px; ViT-B/16 has 196 at 224 px and "
                        "784 at 448 px)")
    g.add_argument("--c", type=H.int_list, default=list(DEFAULT_C), help="label counts C (default 20,80,1000)")
    g.add_argument("--d", type=H.int_list, default=list(DEFAULT_D), help="token widths d (default 512; e.g. "
                   "256,512,768)")
    g.add_argument("--grid", action="store_true",
                   help="run every (M, C, d) of the lists instead of the three one-at-a-time sweeps (M at C=80, "
                        "d=512; C at M=196; d at M=196, C=80: MVLR's values where listed, else the first)")
    g.add_argument("--heads", type=positive_int, default=None,
                   help="attention heads of the baselines (default d // 64: head width 64); must divide every d")
    g.add_argument("--batch", type=positive_int, default=None, help="images per batch B (default 4 on cpu, "
                   "32 on cuda)")
    g.add_argument("--providers", type=H.choice_list(list(PROVIDERS), "provider"), default=list(PROVIDERS),
                   help=f"comma list of {','.join(PROVIDERS)} (default all six)")
    o = p.add_argument_group("figures")
    o.add_argument("--plot", action="store_true",
                   help="also draw PNG figures beside the CSV (needs matplotlib: pip install matplotlib)")
    o.add_argument("--plot-from", metavar="CSV", default=None,
                   help="only redraw the figures of an earlier attention CSV (beside it); times nothing")
    if common:
        H.add_common_arguments(p)
    return p


# ----------------------------------------------------------------------------- one row

def _heads(cfg: Dict[str, Any]) -> int:
    from vlssm.modules.baselines import default_heads

    return cfg.get("heads") or default_heads(cfg["d"])


def _make_model(cfg: Dict[str, Any], provider: str):
    """The provider's layer with weights from ``torch.manual_seed(cfg['seed'])``."""
    import torch

    import vlssm
    from vlssm.modules import baselines as bl

    torch.manual_seed(cfg["seed"])
    kw = dict(device=torch.device(cfg["device"]), dtype=H.torch_dtype(cfg["dtype"]))
    d, heads = cfg["d"], _heads(cfg)
    if provider in ("qmvl-fused", "qmvl-literal"):
        return vlssm.QMVL(d, fused=provider == "qmvl-fused", backend="auto", **kw)
    cls = {"self-attn-block": bl.SDPASelfBlock, "cross-attn-block": bl.SDPACrossBlock,
           "self-attn": bl.SDPASelf, "cross-attn": bl.SDPACross}[provider]
    return cls(d, heads, **kw)


def _make_inputs(cfg: Dict[str, Any]):
    """Seeded x (B, M, d), t (B, C, d) and output gradients gx, gt of the same shapes."""
    B, M, C, d = cfg["batch"], cfg["m"], cfg["c"], cfg["d"]
    mk = H.seeded_randn(cfg["seed"] + 1, cfg["device"], cfg["dtype"])
    return mk(B, M, d), mk(B, C, d), mk(B, M, d), mk(B, C, d)


#: fused SDPA ops (``aten.<name>``) -> the backend name of the ``sdpa_backend`` column.
SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention_for_cpu": "cpu flash",
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_cudnn_attention": "cudnn",
    "_scaled_dot_product_fused_attention_overrideable": "overrideable",
    "_scaled_dot_product_attention_math_for_mps": "mps math",
}


def sdpa_backends(fn: Callable[[], Any]) -> str:
    """Which SDPA kernel(s) ``fn()`` ran: "cpu flash", "flash", "efficient", "cudnn", "math" ("+"-joined
    when several), or "n/a" when it called no ``F.scaled_dot_product_attention``.

    A TorchFunctionMode counts the SDPA calls and a TorchDispatchMode records the fused SDPA ops that
    executed (forward ones; the math path is a composite of bmm / softmax, so a call that ran no fused
    op is counted as math).
    """
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.scaled_dot_product_attention:
                self.n += 1
            return func(*args, **(kwargs or {}))

    class Kernels(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: List[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = SDPA_KERNELS.get(func.overloadpacket.__name__)
            if name:
                self.names.append(name)
            return func(*args, **(kwargs or {}))

    with Calls() as calls, Kernels() as kernels:
        fn()
    if not calls.n:
        return "n/a"
    names = kernels.names + ["math"] * max(0, calls.n - len(kernels.names))
    return "+".join(dict.fromkeys(names))


def count_forward_flops(fn: Callable[[], Any]) -> Dict[str, Any]:
    """FLOPs of one ``fn()`` (a forward; run under no_grad), 2 per multiply-add, torch's convention,
    counted by :func:`vlssm.profile.flops.count_flops` (FlopCounterMode with the formulas of vlssm's
    custom ops). SDPA runs on its math backend while counting, so its matmuls are counted whatever
    kernel the device would pick (torch itself has no formula for some of them, e.g. the CPU flash
    kernel). Returns ``{"flops", "flops_counter"}``.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlssm.profile.flops import count_flops

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        n = count_flops(fn).flops
    return {"flops": int(n), "flops_counter": "vlssm count_flops (FlopCounterMode; SDPA as math)"}


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One provider (``cfg["provider"]``) at one shape in this process: parameters, counted forward
    FLOPs, SDPA backend, median forward and forward+backward times, and peak memory when
    ``cfg["memory"]`` (the harness runs this in a fresh subprocess then)."""
    import torch

    from vlssm import _backend

    provider, device, t0 = cfg["provider"], cfg["device"], cfg["t0"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    res: Dict[str, Any] = {"provider": provider, "error": ""}
    res["qmvl_backend"] = (_backend.resolve_backend("auto", torch.device(device)) if provider.startswith("qmvl")
                           else "")
    model = _make_model(cfg, provider)
    res["params"] = sum(p.numel() for p in model.parameters())
    x, t, gx, gt = _make_inputs(cfg)
    xg = x.detach().clone().requires_grad_(True)
    tg = t.detach().clone().requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> None:
        model(x, t)

    def fwd() -> None:
        with torch.no_grad():
            model(x, t)

    def fwdbwd() -> None:
        for p in params:
            p.grad = None
        xg.grad = tg.grad = None
        torch.autograd.backward(model(xg, tg), (gx, gt))

    H.prime_layer(model, x, t, params, device)

    label = f"M={cfg['m']:<5} C={cfg['c']:<5} d={cfg['d']:<4} {provider:<16}"
    H.time_fwd_fwdbwd(res, fwd, fwdbwd, cfg, (cfg["reps"],) * 2, (cfg["warmup"],) * 2, detailed_kind=False)

    # Counted after the timed phases, so that their full-size tensors (pages the allocator keeps)
    # are not in the memory baseline.
    fl = count_forward_flops(forward)
    res.update(gflops_fwd=fl["flops"] / 1e9, gmacs_fwd=fl["flops"] / 2e9,
               gmacs_fwd_per_image=fl["flops"] / 2e9 / cfg["batch"], flops_counter=fl["flops_counter"])
    sdpa_f, sdpa_b = sdpa_backends(fwd), sdpa_backends(fwdbwd)
    res["sdpa_backend"] = sdpa_f if sdpa_f == sdpa_b else f"fwd {sdpa_f}; fwd+bwd {sdpa_b}"
    H.log(t0, f"{label} fwd {res['fwd_ms']:9.2f} ms  fwd+bwd {res['fwdbwd_ms']:9.2f} ms  "
              f"{res['gmacs_fwd_per_image']:.3g} GMACs/image  sdpa {res['sdpa_backend']}")
    return res


# ----------------------------------------------------------------------------- the sweep

def _table(rows: List[Dict[str, Any]]) -> str:
    cols = [("M", "m", "d"), ("C", "c", "d"), ("d", "d", "d"), ("px", "resolution_px", "d"),
            ("provider", "provider", "s"), ("kind", "kind", "s"), ("params M", "params_m", ".3f"),
            ("GMACs/img", "gmacs_fwd_per_image", ".3g"), ("fwd ms", "fwd_ms", ".2f"),
            ("fwd+bwd ms", "fwdbwd_ms", ".2f"), ("fwd /SAB", "fwd_ratio_vs_self_attn_block", ".2f"),
            ("f+b /SAB", "fwdbwd_ratio_vs_self_attn_block", ".2f"), ("peak MB", "peak_mem_mb", ".0f"),
            ("+fwd MB", "peak_mem_fwd_increase_mb", ".0f"), ("+f+b MB", "peak_mem_fwdbwd_increase_mb", ".0f"),
            ("sdpa", "sdpa_backend", "s")]
    shown = [dict(r, params_m=r["params"] / 1e6 if isinstance(r.get("params"), int) else "") for r in rows]
    return H.format_table(shown, cols, left=(4, 5))


def _ratio(row: Optional[Dict[str, Any]], key: str) -> Optional[float]:
    v = None if row is None else row.get(key)
    return v if isinstance(v, float) else None


def _summary(rows: List[Dict[str, Any]], shapes: List[Tuple[int, int, int]], cs: Sequence[int],
             ds: Sequence[int], providers: Sequence[str]) -> List[str]:
    """The summary lines: MVLR's shape, the M sweep's ratios, the crossover."""
    by = {(r["m"], r["c"], r["d"], r["provider"]): r for r in rows}
    out: List[str] = []
    if SUBJECT not in providers or BASELINE not in providers:
        return [f"(no ratios: the summary needs providers {SUBJECT} and {BASELINE})"]
    m0, c0, d0 = MVLR_SHAPE
    r = by.get((m0, c0, d0, SUBJECT))
    if r is None:
        out.append(f"MVLR's shape (d={d0}, M={m0}, C={c0}) is not in this sweep")
    else:
        f, b = _ratio(r, "fwd_ratio_vs_self_attn_block"), _ratio(r, "fwdbwd_ratio_vs_self_attn_block")
        if f is None or b is None:
            out.append(f"MVLR's shape (d={d0}, M={m0}, C={c0}): no ratio ({r.get('error') or 'a row failed'})")
        else:
            ok = f <= 1.0 and b <= 1.5
            out.append(f"MVLR's shape (d={d0}, M={m0}, C={c0}): {SUBJECT} / {BASELINE} time: fwd {f:.2f}x, "
                       f"fwd+bwd {b:.2f}x  [goal fwd <= 1, fwd+bwd <= 1.5: {'met' if ok else 'NOT met'}]")
    mc, md = _pick(cs, c0), _pick(ds, d0)
    sweep = sorted({m for m, c, d in shapes if c == mc and d == md})
    if len(sweep) < 2:
        return out
    others = [p for p in ("qmvl-literal", "cross-attn-block") if p in providers]
    out.append(f"M sweep at C={mc}, d={md}: time / {BASELINE} time (fwd, fwd+bwd)")
    head = f"  {'M':>5} {'px':>5}  " + "  ".join(f"{p:>22}" for p in [SUBJECT] + others)
    out.append(head)
    for m in sweep:
        cells = []
        for p in [SUBJECT] + others:
            rr = by.get((m, mc, md, p))
            f, b = _ratio(rr, "fwd_ratio_vs_self_attn_block"), _ratio(rr, "fwdbwd_ratio_vs_self_attn_block")
            cells.append(f"{H.fmt(f, '.2f'):>10} {H.fmt(b, '.2f'):>11}")
        px = resolution_px(m)
        out.append(f"  {m:>5} {H.fmt(px, 'd'):>5}  " + "  ".join(cells))
    for key, what in (("fwd_ratio_vs_self_attn_block", "forward"), ("fwdbwd_ratio_vs_self_attn_block",
                                                                     "forward+backward")):
        ratios = [_ratio(by.get((m, mc, md, SUBJECT)), key) for m in sweep]
        out.append(f"crossover M where {SUBJECT} becomes faster than {BASELINE} ({what}): "
                   f"{crossover(sweep, ratios)}")
    return out


def _replot(path: str) -> int:
    from . import plot

    try:
        pngs = plot.plot_attention(plot.load_csv(path), os.path.dirname(path) or ".",
                                   os.path.splitext(os.path.basename(path))[0])
    except (OSError, ValueError, KeyError) as e:
        print(f"vlssm bench attention: error: --plot-from {path!r}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    for p in pngs:
        print(f"figure: {p}")
    return 0


def run(args: argparse.Namespace) -> int:
    """The attention sweep for parsed ``vlssm bench attention`` arguments; returns the exit code
    (0, 1 when a row failed, 2 for a usage error found here)."""
    from vlssm.modules.baselines import default_heads

    if args.plot_from:  # (vlssm.bench.run checked for matplotlib)
        return _replot(args.plot_from)
    bad_d = [d for d in args.d if d % (args.heads or default_heads(d))]
    if bad_d:
        print(f"vlssm bench attention: error: --heads {args.heads or 'd // 64'} does not divide d = "
              f"{', '.join(map(str, bad_d))}", file=sys.stderr)
        return 2
    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4

    t0 = time.time()
    providers = args.providers
    shapes = sweep_shapes(args.m, args.c, args.d, args.grid)
    cfg0 = {k: getattr(args, k) for k in ("batch", "heads", "dtype", "device", "reps", "warmup", "budget", "threads",
                                          "seed", "memory")}
    cfg0.update(t0=t0, workload="attention", worker=__name__)
    env = H.machine_columns(cfg0)
    H.log(t0, f"attention benchmark B={args.batch} {args.dtype} on {args.device} ({env['device_name']}): "
              f"{len(shapes)} shape(s) (M, C, d) {shapes}; providers {', '.join(providers)}"
              + ("; memory: one subprocess per row" if args.memory else "; --no-memory: in-process"))

    rows: List[Dict[str, Any]] = []
    for m, c, d in shapes:
        cfg = dict(cfg0, m=m, c=c, d=d)
        heads = args.heads or default_heads(d)
        results = {}
        for p in providers:
            res = H.run_row(cfg, p)
            if res.get("error"):
                H.log(t0, f"M={m} C={c} d={d} {p} FAILED: {res['error']}")
            results[p] = res
            if args.device == "cuda" and not args.memory:
                import torch

                torch.cuda.empty_cache()
        base = results.get(BASELINE, {})
        for p, r in results.items():
            row = dict(env, batch=args.batch, m=m, c=c, d=d, heads=heads, resolution_px=resolution_px(m),
                       provider=p, kind=PROVIDERS[p], error=r.get("error", ""))
            row.update({k: r[k] for k in _RESULT_KEYS if k in r})
            if not row["error"] and not base.get("error") and "fwd_ms" in base:
                row["fwd_ratio_vs_self_attn_block"] = r["fwd_ms"] / base["fwd_ms"]
                row["fwdbwd_ratio_vs_self_attn_block"] = r["fwdbwd_ms"] / base["fwdbwd_ms"]
            rows.append({k: row.get(k, "") for k in CSV_COLUMNS})

    name = f"attention-{args.device}-{args.dtype}-B{args.batch}-{H.stamp()}.csv"
    path = H.write_csv(os.path.join(args.out, name), rows, CSV_COLUMNS)
    print(H.header(f"attention benchmark: QMVL vs attention blocks  B={args.batch} {args.dtype}", env))
    print()
    print(_table(rows))
    print()
    print(f"time ratios /SAB = time / {BASELINE} time at the same shape (< 1: faster); GMACs/img = counted forward "
          "multiply-adds per image (vlssm.profile.flops.count_flops, SDPA counted as its math matmuls); px = "
          f"input resolution at stride {STRIDE}")
    if args.memory:
        print("memory: peak of a fresh process per row; +fwd / +f+b = peak increase over the memory before the "
              "timed work, after the forward / forward+backward phase")
    for line in _summary(rows, shapes, args.c, args.d, providers):
        print(line)
    failed = [f"M={r['m']} C={r['c']} d={r['d']} {r['provider']}: {r['error']}" for r in rows if r["error"]]
    for msg in failed:
        print(f"FAILED: {msg}")
    print(f"results: {path}")
    if args.plot:
        from . import plot

        for png in plot.plot_attention(rows, args.out, os.path.splitext(name)[0]):
            print(f"figure: {png}")
    H.log(t0, f"done; wrote {path}")
    return 1 if failed else 0
