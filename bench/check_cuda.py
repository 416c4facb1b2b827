"""Compare the CUDA kernels of vlssm._C with the CPU kernels, op by op.

    python bench/check_cuda.py            # needs a GPU; prints one line per case
    python bench/check_cuda.py --device cpu   # self-check of this script (CPU vs CPU)

The same cases run without a GPU against the CUDA kernels built for the CPU
emulation (tests/cuda_emu): `cases()` lists them, each takes the op namespace
under test and its device.

Same inputs on both devices (made on the CPU, copied), float64 and float32
expect ~1e-12 / ~1e-5 relative error, bf16 / fp16 ~1e-2. Covers every N config
of the scan kernels (N = 1, 4, 16, 17, 64, 256), odd sizes (D = 1, 3, 197;
L = 1, 63, 65, 129), p = 0, stride-0 batch broadcast of z / x_suffix,
transposed channel-major views, reverse, initial_state, dlast_state.
"""
import argparse
import itertools

import torch

import vlssm.ops  # noqa: F401  (registers the ops)

ops = torch.ops.vlssm


def rel(a, b):
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}[dtype]


def report(name, outs_dev, outs_cpu, dtype, failures):
    worst, nonfinite = 0.0, []
    for i, (a, b) in enumerate(zip(outs_dev, outs_cpu)):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, i, a.shape, b.shape, a.dtype, b.dtype)
        if not torch.isfinite(a.double()).all():
            nonfinite.append(i)
        else:
            worst = max(worst, rel(a, b))
    ok = not nonfinite and worst <= tol(dtype)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {worst:.2e}"
          + (f"; outputs {nonfinite} have non-finite values" if nonfinite else ""))
    if not ok:
        failures.append(name)


def to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def selective_case(dut, dev, failures, b, D, L, N, dtype, reverse, with_opt, transposed):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(b * 1000 + D * 10 + L + N)
    if transposed:  # (b, L, D) memory viewed as (b, D, L)
        u = torch.randn(b, L, D, generator=g).to(dtype).transpose(1, 2)
        delta = (torch.randn(b, L, D, generator=g) * 0.5).to(dtype).transpose(1, 2)
    else:
        u = torch.randn(b, D, L, generator=g).to(dtype)
        delta = (torch.randn(b, D, L, generator=g) * 0.5).to(dtype)
    A = -torch.rand(D, N, generator=g, dtype=acc).add(0.5)
    B = torch.randn(b, N, L, generator=g).to(dtype)
    C = torch.randn(b, N, L, generator=g).to(dtype)
    Dk = torch.randn(D, generator=g, dtype=acc) if with_opt else None
    z = torch.randn(b, D, L, generator=g).to(dtype) if with_opt else None
    bias = torch.randn(D, generator=g, dtype=acc) * 0.1 if with_opt else None
    h0 = torch.randn(b, D, N, generator=g, dtype=acc) if with_opt else None
    args = (u, delta, A, B, C, Dk, z, bias, h0)
    fc = ops.selective_scan(*args, True, reverse)
    fd = dut.selective_scan(*to(dev, *args), True, reverse)
    name = f"selective_scan b={b} D={D} L={L} N={N} {dtype} rev={reverse} opt={with_opt} T={transposed}"
    report(name, fd, fc, dtype, failures)
    dout = torch.randn(b, D, L, generator=g).to(dtype)
    dlast = torch.randn(b, D, N, generator=g, dtype=acc) if with_opt else None
    gc = ops.selective_scan_backward(dout, dlast, *args, fc[2], True, reverse)
    gd = dut.selective_scan_backward(*to(dev, dout, dlast, *args, fc[2]), True, reverse)
    report(name + " backward", gd, gc, dtype, failures)


def fork_case(dut, dev, failures, b, E, p, s, N, dtype, with_opt, bcast_z):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    L = p + 2 * s
    g = torch.Generator().manual_seed(b * 1000 + E * 10 + p + s + N)
    u = torch.randn(b, L, E, generator=g).to(dtype)
    delta = (torch.randn(b, L, E, generator=g) * 0.5).to(dtype)
    A = -torch.rand(E, N, generator=g, dtype=acc).add(0.5)
    B = torch.randn(b, L, N, generator=g).to(dtype)
    C = torch.randn(b, L, N, generator=g).to(dtype)
    Dk = torch.randn(E, generator=g, dtype=acc) if with_opt else None
    z = None
    if with_opt:
        z = torch.randn(1 if bcast_z else b, s, E, generator=g).to(dtype)
        if bcast_z:
            z = z.expand(b, s, E)
    bias = torch.randn(E, generator=g, dtype=acc) * 0.1 if with_opt else None
    args = (u, delta, A, B, C, Dk, z, bias)
    fc = ops.fork_scan(*args, p, True)
    fd = dut.fork_scan(*to(dev, *args), p, True)
    name = f"fork_scan b={b} E={E} p={p} s={s} N={N} {dtype} opt={with_opt} bz={bcast_z}"
    report(name, fd, fc, dtype, failures)
    dout = torch.randn(b, s, E, generator=g).to(dtype)
    gc = ops.fork_scan_backward(dout, *args, fc[1], fc[2], p, True)
    gd = dut.fork_scan_backward(*to(dev, dout, *args, fc[1], fc[2]), p, True)
    report(name + " backward", gd, gc, dtype, failures)


def conv_case(dut, dev, failures, b, E, p, s, K, dtype, with_bias, bcast):
    g = torch.Generator().manual_seed(b * 100 + E + p + s + K)
    xp = torch.randn(b, p, E, generator=g).to(dtype)
    xs = torch.randn(1 if bcast else b, s, E, generator=g).to(dtype)
    if bcast:
        xs = xs.expand(b, s, E)
    w = torch.randn(E, K, generator=g).to(dtype) * 0.5
    bias = torch.randn(E, generator=g).to(dtype) if with_bias else None
    yc = ops.fork_conv1d(xp, xs, w, bias)
    yd = dut.fork_conv1d(*to(dev, xp, xs, w, bias))
    name = f"fork_conv1d b={b} E={E} p={p} s={s} K={K} {dtype} bias={with_bias} bcast={bcast}"
    report(name, [yd], [yc], dtype, failures)
    dy = torch.randn(b, p + 2 * s, E, generator=g).to(dtype)
    gc = ops.fork_conv1d_backward(dy, xp, xs, w, bias)
    gd = dut.fork_conv1d_backward(*to(dev, dy, xp, xs, w, bias))
    report(name + " backward", gd, gc, dtype, failures)


def cases(quick=False, dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)):
    """(id, case function, its shape arguments): call as fn(dut, dev, failures, *args)."""
    out = []
    for dtype in dtypes:
        dt = str(dtype).replace("torch.", "")
        for N in (1, 4, 16, 17, 64, 256):
            out.append((f"selective-{dt}-N{N}", selective_case, (2, 3, 65, N, dtype, False, True, False)))
            out.append((f"fork-{dt}-N{N}", fork_case, (2, 5, 7, 9, N, dtype, True, False)))
        if quick:
            continue
        for (b, D, L), rev, opt, tr in itertools.product([(1, 1, 1), (3, 197, 63), (2, 40, 129)], [False, True],
                                                         [False, True], [False, True]):
            out.append((f"selective-{dt}-{b}x{D}x{L}-rev{rev:d}-opt{opt:d}-T{tr:d}", selective_case,
                        (b, D, L, 16, dtype, rev, opt, tr)))
        for (b, E, p, s), opt, bz in itertools.product([(1, 1, 0, 1), (3, 197, 20, 63), (2, 64, 196, 80)],
                                                       [False, True], [False, True]):
            if bz and not opt:
                continue
            out.append((f"fork-{dt}-{b}x{E}-p{p}s{s}-opt{opt:d}-bz{bz:d}", fork_case, (b, E, p, s, 16, dtype, opt, bz)))
        for (b, E, p, s), K, bias, bc in itertools.product([(1, 1, 0, 1), (3, 197, 5, 63), (2, 64, 2, 3)],
                                                          [1, 4, 5, 17], [False, True], [False, True]):
            out.append((f"conv-{dt}-{b}x{E}-p{p}s{s}-K{K}-bias{bias:d}-bc{bc:d}", conv_case,
                        (b, E, p, s, K, dtype, bias, bc)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer cases")
    a = ap.parse_args()
    dev = torch.device(a.device)
    failures = []
    for _, fn, args in cases(a.quick):
        fn(ops, dev, failures, *args)
    print(f"{len(failures)} failures")
    for f in failures:
        print("  ", f)
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
