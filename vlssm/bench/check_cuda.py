"""Compare the CUDA kernels of vlssm._C with the CPU kernels, op by op.

    python -m vlssm.bench.check_cuda                 # needs a GPU; prints one line per case
    python -m vlssm.bench.check_cuda --device cpu    # self-check of this module (CPU vs CPU)

The same cases run without a GPU against the CUDA kernels built for the CPU
emulation (tests/cuda_emu, vlssm.testing.cuda_emu): `cases()` lists them, each
takes the op namespace under test and its device.

Same inputs on both devices (made on the CPU, copied), float64 and float32
expect ~1e-12 / ~1e-5 relative error, bf16 / fp16 ~1e-2; a case fails above
vlssm.testing.CROSS_TOL (norm-wise relative error). Covers every N config
of the scan kernels (N = 1, 4, 16, 17, 64, 256), odd sizes (D = 1, 3, 197;
L = 1, 63, 65, 129), p = 0, stride-0 batch broadcast of z / x_suffix,
transposed channel-major views, reverse, initial_state, dlast_state.

The "layout-" cases cover mamba_ssm's other B / C layouts (grouped
(b, G, N, L) / (b, L, G, N) with G = 2, 4 and an odd group size, and
input-independent (dim, N), each for B, C or both) against the float64
reference (vlssm.reference) instead of the CPU kernels: forward outputs, and
the gradients of torch.autograd through the reference.
"""
import argparse
import itertools

import torch

import vlssm.ops  # noqa: F401  (registers the ops)
from vlssm import testing as T
from vlssm.reference import fork_scan_ref, selective_scan_ref

ops = torch.ops.vlssm


def rel(a, b):
    """T.rel_err of a (on any device) vs b; 0 for two empty tensors."""
    if a.numel() == 0 and b.numel() == 0:
        return 0.0
    return T.rel_err(a.cpu(), b.cpu())


def report(name, outs_dev, outs_cpu, dtype, failures, like=None):
    """like: tensors of the expected shapes and dtypes (default outs_cpu)."""
    worst, nonfinite = 0.0, []
    for i, (a, b, c) in enumerate(zip(outs_dev, outs_cpu, outs_cpu if like is None else like)):
        assert a.shape == c.shape and a.dtype == c.dtype, (name, i, a.shape, c.shape, a.dtype, c.dtype)
        if not torch.isfinite(a.double()).all():
            nonfinite.append(i)
        else:
            worst = max(worst, rel(a, b))
    ok = not nonfinite and worst <= T.CROSS_TOL[dtype]
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {worst:.2e}"
          + (f"; outputs {nonfinite} have non-finite values" if nonfinite else ""))
    if not ok:
        failures.append(name)


def to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


def selective_case(dut, dev, failures, b, D, L, N, dtype, reverse, with_opt, transposed):
    acc = T.acc_dtype(dtype)
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
    acc = T.acc_dtype(dtype)
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


def bc_operand(g, layout, b, D, L, N, dtype, acc, token_major, strided):
    """B or C: layout 0 input-independent (D, N) in acc; G >= 1 time-varying with G groups (G = 1: 3-D).
    strided: a time-varying one lives in the other major order's memory (a permuted view)."""
    if layout == 0:
        return torch.randn(D, N, generator=g, dtype=acc)
    cm, tm = (b, layout, N, L), (b, L, layout, N)  # channel-major / token-major grouped shapes
    if strided == token_major:
        t = torch.randn(*cm, generator=g).to(dtype)
        t = t.permute(0, 3, 1, 2) if token_major else t
    else:
        t = torch.randn(*tm, generator=g).to(dtype)
        t = t if token_major else t.permute(0, 2, 3, 1)
    if layout == 1:  # 3-D: squeeze the group axis (a view)
        t = t.squeeze(2 if token_major else 1)
    return t


def ref_grads(fn, inputs, douts):
    """(fn's outputs, gradients of sum(out * dout) w.r.t. inputs) in float64; None stays None."""
    xs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
    outs = fn(*xs)
    loss = sum((o * d.double()).sum() for o, d in zip(outs, douts) if d is not None)
    gs = iter(torch.autograd.grad(loss, [x for x in xs if x is not None]))
    return [o.detach() for o in outs], [None if x is None else next(gs) for x in xs]


def report_ref(name, outs_dev, refs, like, dtype, failures):
    """report() against float64 references; entries whose like is None (absent optionals) are skipped."""
    keep = [i for i, t in enumerate(like) if t is not None]
    report(name, [outs_dev[i] for i in keep], [refs[i] for i in keep], dtype, failures, [like[i] for i in keep])


def lay_name(layout):
    return "i" if layout == 0 else f"g{layout}"


def layout_inputs(b, D, L, N, dtype, Blay, Clay, with_opt, token_major, strided):
    """(generator, acc dtype, u, delta, A, B, C, D, delta_bias) of a layout case; D, delta_bias None without opt."""
    acc = T.acc_dtype(dtype)
    g = torch.Generator().manual_seed(b * 1000 + D * 10 + L + N + 7 * Blay + 3 * Clay)
    act = (b, L, D) if token_major else (b, D, L)
    u = torch.randn(*act, generator=g).to(dtype)
    delta = (torch.randn(*act, generator=g) * 0.5).to(dtype)
    A = -torch.rand(D, N, generator=g, dtype=acc).add(0.5)
    B = bc_operand(g, Blay, b, D, L, N, dtype, acc, token_major, strided)
    C = bc_operand(g, Clay, b, D, L, N, dtype, acc, token_major, strided)
    Dk = torch.randn(D, generator=g, dtype=acc) if with_opt else None
    bias = torch.randn(D, generator=g, dtype=acc) * 0.1 if with_opt else None
    return g, acc, u, delta, A, B, C, Dk, bias


def selective_layout_case(dut, dev, failures, b, D, L, N, dtype, Blay, Clay, reverse, with_opt, strided):
    """selective_scan with B / C layouts Blay / Clay (see bc_operand) against the float64 reference."""
    g, acc, u, delta, A, B, C, Dk, bias = layout_inputs(b, D, L, N, dtype, Blay, Clay, with_opt, False, strided)
    z = torch.randn(b, D, L, generator=g).to(dtype) if with_opt else None
    h0 = torch.randn(b, D, N, generator=g, dtype=acc) if with_opt else None
    args = (u, delta, A, B, C, Dk, z, bias, h0)
    dout = torch.randn(b, D, L, generator=g).to(dtype)
    dlast = torch.randn(b, D, N, generator=g, dtype=acc) if with_opt else None

    def ref(u, delta, A, B, C, Dk, z, bias, h0):
        return selective_scan_ref(u, delta, A, B, C, Dk, z, bias, True, True, reverse=reverse, initial_state=h0)

    refs, grads = ref_grads(ref, args, (dout, dlast))
    fd = dut.selective_scan(*to(dev, *args), True, reverse)
    name = (f"selective_scan b={b} D={D} L={L} N={N} {dtype} B={lay_name(Blay)} C={lay_name(Clay)} rev={reverse} "
            f"opt={with_opt} S={strided} vs reference")
    report_ref(name, fd[:2], refs, (u, torch.empty(b, D, N, dtype=acc)), dtype, failures)
    gd = dut.selective_scan_backward(*to(dev, dout, dlast, *args, fd[2]), True, reverse)
    report_ref(name + " backward", gd, grads, args, dtype, failures)


def fork_layout_case(dut, dev, failures, b, E, p, s, N, dtype, Blay, Clay, with_opt, strided):
    """fork_scan with B / C layouts Blay / Clay (see bc_operand) against the float64 reference."""
    g, acc, u, delta, A, B, C, Dk, bias = layout_inputs(b, E, p + 2 * s, N, dtype, Blay, Clay, with_opt, True, strided)
    z = torch.randn(b, s, E, generator=g).to(dtype) if with_opt else None
    args = (u, delta, A, B, C, Dk, z, bias)
    dout = torch.randn(b, s, E, generator=g).to(dtype)

    def ref(u, delta, A, B, C, Dk, z, bias):  # out, and ysum = the output without z
        return (fork_scan_ref(u, delta, A, B, C, Dk, z, bias, p, True),
                fork_scan_ref(u, delta, A, B, C, Dk, None, bias, p, True))

    refs, grads = ref_grads(ref, args, (dout, None))
    fd = dut.fork_scan(*to(dev, *args), p, True)
    name = (f"fork_scan b={b} E={E} p={p} s={s} N={N} {dtype} B={lay_name(Blay)} C={lay_name(Clay)} opt={with_opt} "
            f"S={strided} vs reference")
    report_ref(name, fd[:2], refs, (dout, refs[1].to(acc)), dtype, failures)
    gd = dut.fork_scan_backward(*to(dev, dout, *args, fd[1], fd[2]), p, True)
    report_ref(name + " backward", gd, grads, args, dtype, failures)


# The layout cases: (op, shape arguments). Grouped ones have an odd group size
# H = D / G that is not a multiple of any block width (several blocks per group
# at N = 1 and 16, padding channels in every block); every N config appears.
F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
LAYOUT_CASES = [
    # selective_scan: b, D, L, N, dtype, B layout, C layout, reverse, opt, strided
    ("sel", (2, 2 * 37, 65, 16, F32, 2, 2, False, True, False)),
    ("sel", (1, 4 * 3, 129, 64, BF16, 4, 4, True, True, True)),
    ("sel", (2, 2 * 5, 33, 4, F64, 0, 2, True, True, False)),
    ("sel", (2, 6, 65, 17, F32, 1, 0, False, False, True)),
    ("sel", (1, 3, 20, 256, F32, 0, 0, True, True, False)),
    ("sel", (1, 4 * 37, 9, 1, F32, 4, 0, False, True, False)),
    ("sel", (2, 2 * 131, 5, 4, F32, 0, 2, False, True, True)),
    ("sel", (2, 40, 65, 16, BF16, 0, 0, False, True, False)),
    ("sel", (2, 2 * 37, 65, 16, F64, 2, 0, True, True, False)),
    ("sel", (2, 2 * 37, 9, 16, F32, 2, 2, True, True, True)),
    # fork_scan: b, E, p, s, N, dtype, B layout, C layout, opt, strided
    ("fork", (2, 2 * 37, 0, 40, 16, F32, 2, 2, True, False)),
    ("fork", (2, 4 * 3, 20, 30, 64, BF16, 4, 4, True, True)),
    ("fork", (2, 2 * 5, 7, 9, 4, F64, 0, 2, True, False)),
    ("fork", (1, 6, 0, 33, 17, F32, 1, 0, False, True)),
    ("fork", (2, 3, 5, 4, 256, F32, 0, 0, True, False)),
    ("fork", (2, 4 * 3, 70, 10, 16, BF16, 0, 0, True, False)),
    ("fork", (1, 4 * 37, 3, 6, 1, F32, 4, 0, True, True)),
    ("fork", (2, 2 * 37, 66, 12, 16, F32, 2, 2, True, True)),
    ("fork", (2, 2 * 37, 2, 3, 16, F32, 2, 2, True, False)),
]


def layout_case_id(op, a):
    dt = str(a[5 if op == "fork" else 4]).replace("torch.", "")
    if op == "sel":
        b, D, L, N, _, Bl, Cl, rev, opt, st = a
        return f"layout-sel-{dt}-{b}x{D}x{L}-N{N}-B{lay_name(Bl)}-C{lay_name(Cl)}-rev{rev:d}-opt{opt:d}-S{st:d}"
    b, E, p, s, N, _, Bl, Cl, opt, st = a
    return f"layout-fork-{dt}-{b}x{E}-p{p}s{s}-N{N}-B{lay_name(Bl)}-C{lay_name(Cl)}-opt{opt:d}-S{st:d}"


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
    if not quick:
        out += [(layout_case_id(op, a), selective_layout_case if op == "sel" else fork_layout_case, a)
                for op, a in LAYOUT_CASES if a[5 if op == "fork" else 4] in dtypes]
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
