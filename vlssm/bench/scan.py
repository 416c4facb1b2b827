"""``vlssm bench scan``: the kernels alone, each backend vs the pure-PyTorch reference.

Rows (one per op, shape and backend), at the shapes one QMVL / IFM layer runs
them (B = ``--batch``, M = ``--m``, C = ``--c``, d = ``--d``, E = 2d channels,
N = ``--d-state``):

- ``fork_scan`` at the label block's shape (prefix M, suffix C) and the visual
  block's (prefix C, suffix M): token-major (B, p + 2s, E) in, (B, s, E) out;
- ``selective_scan`` over one literal sequence of M + C tokens, channel-major
  (B, E, M + C): what the unfused layer runs four times;
- ``selective_scan-grouped``: the same sequence with grouped B / C
  (B, G, N, M + C), G = ``--groups`` (VMamba's cross-scan layout: one call for
  G directions); ``selective_scan-split``: what a caller without grouped B / C
  does instead, G calls on the channel slices plus ``torch.cat``. The summary
  compares grouped with G = 1 (same u, goal: within 10%) and with the split
  calls (goal: at least 1.5x faster);
- ``attention_with_probs`` at the IFM's cross-attention: B x heads maps of
  (C, M) over d / heads channels.

Backends: on CPU the compiled kernels (``cpu``) and ``reference``; on CUDA
``cuda``, ``triton`` and ``reference``. Per row: median forward time and
forward+backward time (autograd through :mod:`vlssm.ops`, gradients of every
floating operand), the speed-up over the reference, the FLOPs by the registered
formulas (GFLOPs, 2 per multiply-add, and GMACs), and the bytes a forward must
move (every operand read once, every output written once) with the bandwidth
that implies. On CUDA also: the fork_scan backward alone, by default and under
``torch.use_deterministic_algorithms(True)``, and the bandwidth as a fraction of
a measured device-to-device copy.
"""
from __future__ import annotations

import argparse
import os
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

from .._argtypes import positive_int
from . import _harness as H

__all__ = ["CSV_COLUMNS", "OPS", "add_arguments", "bench_provider", "fork_scan_bytes", "run"]

#: row name -> op; the fork_scan rows differ in which sequence is the prefix.
OPS = ("fork_scan-label", "fork_scan-visual", "selective_scan", "selective_scan-grouped", "selective_scan-split",
       "attention_with_probs")

CSV_COLUMNS = [
    "date_utc", "device", "device_name", "cpu_threads", "python", "torch", "cuda", "triton", "vlssm", "dtype",
    "op", "batch", "m", "c", "d", "dim", "d_state", "groups", "heads", "shape", "backend",
    "fwd_us", "fwd_reps", "fwdbwd_us", "fwdbwd_reps", "fwd_speedup_vs_reference", "fwdbwd_speedup_vs_reference",
    "gflops_fwd", "gmacs_fwd", "bytes_mb", "gbps", "copy_gbps", "frac_of_copy", "bwd_us", "bwd_det_us",
    "max_rel_diff_vs_reference", "error",
]


def add_arguments(p: argparse.ArgumentParser, common: bool = True) -> argparse.ArgumentParser:
    g = p.add_argument_group("kernel shapes")
    g.add_argument("--batch", type=positive_int, default=None, help="images per batch B (default 4 on cpu, 32 on cuda)")
    g.add_argument("--m", type=positive_int, default=196, help="visual tokens M (default 196)")
    g.add_argument("--c", type=positive_int, default=80, help="label tokens C (default 80)")
    g.add_argument("--d", type=positive_int, default=512, help="layer width d; the scans run E = 2d channels "
                                                               "(default 512)")
    g.add_argument("--d-state", type=positive_int, default=16, help="SSM state size N (default 16)")
    g.add_argument("--groups", type=positive_int, default=4, help="B / C groups G of the selective_scan-grouped and "
                                                                   "-split rows; must divide 2d (default 4)")
    g.add_argument("--heads", type=positive_int, default=1, help="attention heads of the IFM rows (default 1)")
    g.add_argument("--ops", type=H.choice_list(OPS, "op"), default=list(OPS),
                   help=f"comma list of {','.join(OPS)} (default all)")
    g.add_argument("--ref-reps", type=positive_int, default=3, help="timed reps of the reference (default 3)")
    if common:
        H.add_common_arguments(p, memory=False)
    return p


def fork_scan_bytes(b: int, p: int, s: int, E: int, N: int, dtype) -> int:
    """Bytes fork_scan's forward must move: operands read once, outputs written once.

    Operands u, delta (b, p + 2s, E), B, C (b, p + 2s, N), z (b, s, E) in ``dtype``; A (E, N), D,
    delta_bias (E,) in float32 (float64 for float64). Outputs: out (b, s, E) in ``dtype``, the
    pre-gate sum (b, s, E) and the state checkpoints (b, E, n_ck, N) in the accumulation dtype.
    """
    import torch

    from ..ops.scan import num_checkpoints

    e = torch.finfo(dtype).bits // 8
    L = p + 2 * s
    acc = 8 if dtype == torch.float64 else 4
    read = (2 * b * L * E + 2 * b * L * N + b * s * E) * e + (E * N + 2 * E) * acc  # u, delta, B, C, z, A, D, bias
    nck = num_checkpoints(p) + 2 * num_checkpoints(s)
    written = b * s * E * e + b * s * E * acc + b * E * nck * N * acc  # out, ysum, checkpoints
    return read + written


def _backends(device: str) -> List[str]:
    return ["cuda", "triton", "reference"] if device == "cuda" else ["cpu", "reference"]


def _inputs(cfg: Dict[str, Any], op: str) -> Tuple[Callable[..., Any], Dict[str, Any], Dict[str, Any]]:
    """(public op, tensor operands, the other arguments) of one row, seeded; operands of a QMVL block."""
    import vlssm.ops as ops

    B, M, C, d, N = cfg["batch"], cfg["m"], cfg["c"], cfg["d"], cfg["d_state"]
    E, dev, dt = 2 * d, cfg["device"], cfg["dtype"]
    mk = H.seeded_randn(cfg["seed"] + 1, dev, dt)
    wk = H.seeded_randn(cfg["seed"] + 2, dev, "float64" if dt == "float64" else "float32")  # weights: fp32
    A = -(wk(E, N).abs() + 0.5)
    if op.startswith("fork_scan"):
        p, s = (M, C) if op == "fork_scan-label" else (C, M)
        L = p + 2 * s
        t = dict(u=mk(B, L, E), delta=mk(B, L, E) * 0.5, A=A, B=mk(B, L, N), C=mk(B, L, N), D=wk(E), z=mk(B, s, E),
                 delta_bias=wk(E) * 0.5 - 2.0)
        return ops.fork_scan, t, {"prefix_len": p, "delta_softplus": True}
    if op.startswith("selective_scan"):
        L, G = M + C, cfg["groups"]
        if op != "selective_scan" and E % G:
            raise ValueError(f"--groups {G} does not divide the {E} channels (2 x --d)")
        bc = (B, N, L) if op == "selective_scan" else (B, G, N, L)
        t = dict(u=mk(B, E, L), delta=mk(B, E, L) * 0.5, A=A, B=mk(*bc), C=mk(*bc), D=wk(E), z=mk(B, E, L),
                 delta_bias=wk(E) * 0.5 - 2.0)
        return (_split_calls if op == "selective_scan-split" else ops.selective_scan), t, {"delta_softplus": True}
    h = cfg["heads"]
    if d % h:
        raise ValueError(f"--d {d} is not divisible by --heads {h}")
    t = dict(q=mk(B * h, C, d // h), k=mk(B * h, M, d // h), v=mk(B * h, M, d // h))
    return ops.attention_with_probs, t, {}


def _split_calls(u, delta, A, B, C, D, z, delta_bias, delta_softplus, backend):
    """Grouped B / C without the grouped layout: one selective_scan per group on its channel slice, then cat."""
    import torch

    import vlssm.ops as ops

    G = B.shape[1]
    H = u.shape[1] // G
    sl = [slice(g * H, (g + 1) * H) for g in range(G)]
    return torch.cat([ops.selective_scan(u[:, c], delta[:, c], A[c], B[:, g], C[:, g], D[c], z[:, c], delta_bias[c],
                                         delta_softplus, backend=backend) for g, c in enumerate(sl)], dim=1)


def _shape_text(cfg: Dict[str, Any], op: str) -> str:
    B, M, C, d, N, h = cfg["batch"], cfg["m"], cfg["c"], cfg["d"], cfg["d_state"], cfg["heads"]
    if op.startswith("fork_scan"):
        p, s = (M, C) if op == "fork_scan-label" else (C, M)
        return f"u ({B}, {p}+2x{s}, {2 * d}) N={N}"
    if op == "selective_scan":
        return f"u ({B}, {2 * d}, {M + C}) N={N}"
    if op.startswith("selective_scan"):
        return f"u ({B}, {2 * d}, {M + C}) N={N} G={cfg['groups']}"
    return f"q ({B * h}, {C}, {d // h}) k/v ({B * h}, {M}, {d // h})"


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def bench_provider(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """One (op, backend) row in this process: ``cfg["op"]``, ``cfg["provider"]`` = the backend."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    op, backend, dev = cfg["op"], cfg["provider"], cfg["device"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    fn, t, kw = _inputs(cfg, op)
    res: Dict[str, Any] = {"provider": backend, "backend": backend, "error": ""}
    call = lambda **ts: fn(**ts, **kw, backend=backend)  # noqa: E731
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in t.items()}
    grads = [v for v in leaves.values() if v.requires_grad]
    g_out = torch.randn_like(_first(call(**t)))

    def fwd():
        with torch.no_grad():
            call(**t)

    def fwdbwd():
        for v in grads:
            v.grad = None
        torch.autograd.backward(_first(call(**leaves)), g_out)

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        call(**t)
    res.update(gflops_fwd=fc.get_total_flops() / 1e9, gmacs_fwd=fc.get_total_flops() / 2e9)
    reps = cfg["ref_reps"] if backend == "reference" else cfg["reps"]
    tf = H.time_phase(fwd, reps, cfg["warmup"], cfg["budget"], dev)
    tb = H.time_phase(fwdbwd, reps, cfg["warmup"], cfg["budget"], dev)
    res.update(fwd_us=tf["median_s"] * 1e6, fwd_reps=tf["reps"], fwdbwd_us=tb["median_s"] * 1e6,
               fwdbwd_reps=tb["reps"])
    if op.startswith("fork_scan"):
        p, s = kw["prefix_len"], (t["u"].shape[1] - kw["prefix_len"]) // 2
        nbytes = fork_scan_bytes(t["u"].shape[0], p, s, t["u"].shape[2], t["A"].shape[1], t["u"].dtype)
    else:  # operands read once, the outputs the caller gets written once
        with torch.no_grad():
            outs = call(**t)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        nbytes = sum(v.nbytes for v in t.values()) + sum(o.nbytes for o in outs)
    res.update(bytes_mb=nbytes / 1e6, gbps=nbytes / tf["median_s"] / 1e9)
    if dev == "cuda" and backend != "reference" and op.startswith("fork_scan"):
        res.update(_cuda_backward_only(cfg, backend, t, kw))
    H.log(cfg["t0"], f"{op:<20} {backend:<9} fwd {res['fwd_us']:10.1f} us  fwd+bwd {res['fwdbwd_us']:10.1f} us")
    return res


def _cuda_backward_only(cfg: Dict[str, Any], backend: str, t: Dict[str, Any], kw: Dict[str, Any]) -> Dict[str, Any]:
    """fork_scan's backward op alone, by default and deterministic (CUDA: partial sums instead of
    atomics; torch then also NaN-fills new allocations, as a user sees it)."""
    import torch

    name = "fork_scan" if backend == "cuda" else "fork_scan_triton"
    fwd_op = getattr(torch.ops.vlssm, name)
    bwd_op = getattr(torch.ops.vlssm, name.replace("fork_scan", "fork_scan_backward"))
    args = (t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], kw["prefix_len"], True)
    out, ysum, ck = fwd_op(*args)
    bargs = (torch.randn_like(out), *args[:8], ysum, ck, kw["prefix_len"], True)
    res = {"bwd_us": H.cuda_time_ms(lambda: bwd_op(*bargs), cfg["reps"]) * 1e3}
    prev = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        res["bwd_det_us"] = H.cuda_time_ms(lambda: bwd_op(*bargs), cfg["reps"]) * 1e3
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
    return res


def copy_bandwidth_gbps(nbytes: int = 1 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (bytes read + written), GB/s."""
    import torch

    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = H.cuda_time_ms(lambda: dst.copy_(src), reps)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _check(cfg: Dict[str, Any], op: str, backend: str) -> float:
    """max |backend - reference| / max |reference| of the forward output."""
    import torch

    from vlssm.testing import max_rel_diff

    fn, t, kw = _inputs(cfg, op)
    with torch.no_grad():
        a = _first(fn(**t, **kw, backend=backend))
        b = _first(fn(**t, **kw, backend="reference"))
    return max_rel_diff(a, b)


def _groups_summary(rows: List[Dict[str, Any]], G: int) -> List[str]:
    """The grouped-B/C goals per kernel backend: grouped vs G = 1 (<= 1.10) and split calls vs grouped (>= 1.5)."""
    by = {(r["op"], r["backend"]): r for r in rows if not r.get("error") and r.get("fwd_us")}
    lines = []
    for backend in sorted({b for _, b in by if b != "reference"}):
        one, grp, split = (by.get((op, backend)) for op in ("selective_scan", "selective_scan-grouped",
                                                            "selective_scan-split"))
        if grp is None:
            continue
        parts = []
        for phase, key in (("fwd", "fwd_us"), ("fwd+bwd", "fwdbwd_us")):
            if one is not None:
                x = grp[key] / one[key]
                parts.append(f"{phase} grouped / G=1 {x:.2f} ({'meets' if x <= 1.10 else 'misses'} <= 1.10)")
            if split is not None:
                x = split[key] / grp[key]
                parts.append(f"{phase} split+cat / grouped {x:.2f} ({'meets' if x >= 1.5 else 'misses'} >= 1.5)")
        lines.append(f"G={G} on {backend}: " + "; ".join(parts))
    return lines


def run(args: argparse.Namespace) -> int:
    """The kernel microbenchmarks for parsed ``vlssm bench scan`` arguments; returns the exit code."""
    if args.batch is None:
        args.batch = 32 if args.device == "cuda" else 4
    t0 = time.time()
    keys = ("batch", "m", "c", "d", "d_state", "groups", "heads", "dtype", "device", "reps", "ref_reps", "warmup",
            "budget", "threads", "seed")
    cfg0 = {k: getattr(args, k) for k in keys}
    cfg0.update(t0=t0, workload="scan", worker=__name__, memory=False)
    env = H.machine_columns(cfg0)
    copy_gbps = copy_bandwidth_gbps() if args.device == "cuda" else None
    tol = H.TOLERANCE[args.dtype]
    rows: List[Dict[str, Any]] = []
    bad: List[str] = []
    for op in args.ops:
        results: Dict[str, Dict[str, Any]] = {}
        for backend in _backends(args.device):
            cfg = dict(cfg0, op=op)
            res = H.run_row(cfg, backend)
            if not res.get("error") and backend != "reference":
                try:
                    res["max_rel_diff_vs_reference"] = _check(cfg, op, backend)
                    if not res["max_rel_diff_vs_reference"] <= tol:
                        bad.append(f"{op} {backend}: max rel diff vs reference {res['max_rel_diff_vs_reference']:.2e}"
                                   f" > {tol:g}")
                except Exception as e:
                    traceback.print_exc()
                    res["error"] = f"{type(e).__name__}: {e}"
            results[backend] = res
        ref = results.get("reference", {})
        # One count per op: the registered formula of the kernel (the reference's own arithmetic differs).
        kernel = next((r for b, r in results.items() if b != "reference" and not r.get("error")), None)
        if kernel is not None:
            for r in results.values():
                r.update(gflops_fwd=kernel["gflops_fwd"], gmacs_fwd=kernel["gmacs_fwd"])
        for backend, r in results.items():
            row = {**env, **{k: cfg0[k] for k in ("batch", "m", "c", "d", "d_state", "groups", "heads")}, **r, "op": op,
                   "dim": 2 * args.d, "shape": _shape_text(cfg0, op), "backend": backend}
            if copy_gbps and r.get("gbps"):
                row.update(copy_gbps=copy_gbps, frac_of_copy=r["gbps"] / copy_gbps)
            if not r.get("error") and ref.get("fwd_us"):
                row["fwd_speedup_vs_reference"] = ref["fwd_us"] / r["fwd_us"]
                row["fwdbwd_speedup_vs_reference"] = ref["fwdbwd_us"] / r["fwdbwd_us"]
            if r.get("error"):
                bad.append(f"{op} {backend}: {r['error']}")
            rows.append(row)
    name = f"scan-{args.device}-{args.dtype}-B{args.batch}-M{args.m}-C{args.c}-d{args.d}-{H.stamp()}.csv"
    path = H.write_csv(os.path.join(args.out, name), rows, CSV_COLUMNS)
    print(H.header(f"Kernel benchmark  B={args.batch} M={args.m} C={args.c} d={args.d} (E={2 * args.d}) "
                   f"N={args.d_state} heads={args.heads} {args.dtype}", env))
    print()
    cols = [("op", "op", "s"), ("backend", "backend", "s"), ("shape", "shape", "s"), ("fwd us", "fwd_us", ".1f"),
            ("fwd+bwd us", "fwdbwd_us", ".1f"), ("fwd x ref", "fwd_speedup_vs_reference", ".1f"),
            ("f+b x ref", "fwdbwd_speedup_vs_reference", ".1f"), ("GFLOPs", "gflops_fwd", ".3g"),
            ("MB", "bytes_mb", ".1f"), ("GB/s", "gbps", ".1f"), ("of copy", "frac_of_copy", ".2f"),
            ("bwd us", "bwd_us", ".1f"), ("det us", "bwd_det_us", ".1f"), ("diff", "max_rel_diff_vs_reference", ".1e")]
    print(H.format_table(rows, cols, left=3))
    print()
    print("fwd / fwd+bwd: median of timed reps (autograd through vlssm.ops); x ref = speed-up over the reference; "
          "GFLOPs = the registered flop formula (2 per multiply-add); MB = operands read once + outputs written "
          "once; GB/s = MB over the forward time" + (f"; device copy {copy_gbps:.0f} GB/s" if copy_gbps else ""))
    for line in _groups_summary(rows, args.groups):
        print(line)
    for msg in bad:
        print(f"FAILED: {msg}")
    print(f"results: {path}")
    return 1 if bad else 0
