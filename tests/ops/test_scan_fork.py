"""Tests of vlssm.ops.fork_scan and torch.ops.vlssm.fork_scan{,_backward}.

Ground truth: vlssm.reference.fork_scan_ref in float64 on the same inputs
upcast, itself checked against two literal scans of [P, S] and [P, rev S].
Also: the fused conv + fork_scan pipeline against the unfused composition of
two full sequences through selective_scan (docs/design.md section 2).
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import fork_scan_ref

F32, F64 = torch.float32, torch.float64


class Case(NamedTuple):
    b: int
    p: int
    s: int
    E: int
    N: int
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    softplus: bool = True
    A_style: str = "exp"

    @property
    def L(self):
        return self.p + 2 * self.s

    def inputs(self, seed, dtype=F32):
        return T.fork_inputs(seed, self.b, self.p, self.s, self.E, self.N, dtype, has_D=self.has_D,
                             has_z=self.has_z, has_bias=self.has_bias, softplus=self.softplus, A_style=self.A_style)


def _id(c: Case) -> str:
    opts = "".join(k for k, on in (("D", c.has_D), ("z", c.has_z), ("b", c.has_bias)) if on)
    return f"b{c.b}-p{c.p}-s{c.s}-e{c.E}-n{c.N}-{opts or 'none'}{'-sp' if c.softplus else ''}-{c.A_style}"


FWD_CASES = [
    Case(1, 0, 1, 1, 1, False, False, False, False),
    Case(2, 1, 1, 3, 2, True, True, True, True),
    Case(2, 2, 3, 5, 4, True, False, True, True, "arange"),
    Case(1, 63, 2, 63, 16, True, True, False, True),
    Case(2, 64, 64, 4, 3, False, True, True, False),
    Case(1, 65, 65, 5, 8, True, True, True, True, "arange"),
    Case(2, 130, 7, 3, 5, True, True, True, True),
    Case(1, 0, 70, 6, 2, True, True, True, True),
    Case(3, 196, 80, 4, 16, True, True, True, True, "arange"),  # MVLR label block (p = M, s = C), narrow
    Case(1, 80, 196, 3, 4, True, True, True, True),             # visual block
    Case(2, 5, 1, 33, 3, True, True, True, False),
    Case(1, 3, 9, 65, 2, False, False, False, True),
]
HALF_CASES = [Case(2, 2, 3, 5, 4), Case(1, 65, 65, 5, 8, A_style="arange"), Case(2, 130, 7, 33, 5)]
GRAD_CASES = [
    Case(1, 0, 1, 1, 1, False, False, False, False),
    Case(2, 2, 3, 5, 4, True, True, True, True),
    Case(1, 70, 3, 3, 2, True, True, True, True),
    Case(2, 5, 66, 4, 3, True, True, False, False),
    Case(1, 0, 65, 2, 16, True, True, True, True, "arange"),
    Case(2, 196, 20, 3, 4, True, True, True, True),
    Case(1, 3, 1, 33, 5, False, True, False, False),
]


def run(inp, c: Case, backend, **over):
    a = {**inp, **over}
    return ops.fork_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], c.p,
                         c.softplus, backend=backend)


def ref64(inp, c: Case, **over):
    a = {k: T.up(v) for k, v in {**inp, **over}.items()}
    return fork_scan_ref(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"], c.p,
                         c.softplus)


def raw_op(backend: str, backward: bool = False):
    return T.raw_op("fork_scan", backend, backward)


def _small(c: Case, steps: int = 140) -> bool:
    """Cheap enough for the Triton interpreter: scan steps times blocks of 64 channels."""
    return c.b * c.L * -(-c.E // 64) <= steps


def raw(inp, c: Case, backend="cpu"):
    return raw_op(backend)(*[inp[k] for k in T.FORK_KEYS], c.p, c.softplus)


# --------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("c", [FWD_CASES[0], FWD_CASES[1], FWD_CASES[2], FWD_CASES[4], Case(2, 4, 5, 3, 2)],
                         ids=_id)
def test_reference_matches_literal(c, seed):
    inp = c.inputs(seed, F64)
    T.assert_rel("out", ref64(inp, c), T.literal_fork_scan(**inp, prefix_len=c.p, delta_softplus=c.softplus), 1e-13)


# --------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", FWD_CASES, ids=_id)
def test_forward(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, dtype)
    out = run(inp, c, kernel_backend)
    ref = ref64(inp, c)
    assert out.dtype == dtype and out.shape == (c.b, c.s, c.E)
    T.assert_rel("out", out, ref, T.FWD_TOL[dtype])
    T.assert_elementwise("out", out, ref, *T.ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", HALF_CASES, ids=_id)
def test_forward_half(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, dtype)
    out = run(inp, c, kernel_backend)
    assert out.dtype == dtype
    same = fork_scan_ref(*[inp[k] for k in T.FORK_KEYS], c.p, c.softplus)
    T.assert_half_rule("out", out, same, ref64(inp, c))
    T.assert_elementwise("out", out, ref64(inp, c), 2e-2, 2e-2)


@pytest.mark.parametrize("c", [FWD_CASES[2], Case(2, 70, 66, 40, 3), Case(1, 0, 3, 5, 2, False, False, False)],
                         ids=_id)
def test_raw_op_writes_every_element(c, seed, kernel_backend):
    """out, ysum (pre-gate sum, accumulation dtype) and checkpoints: finite, right, twice identical."""
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, F32)
    nck = -(-c.p // 64) + 2 * -(-c.s // 64)
    like = [torch.empty(c.b, c.s, c.E), torch.empty(c.b, c.s, c.E), torch.empty(c.b, c.E, nck, c.N)]
    T.poison_allocator(*like)
    out, ysum, ck = raw(inp, c, kernel_backend)
    assert ysum.dtype == F32 and ysum.shape == (c.b, c.s, c.E)
    assert ck.dtype == F32 and ck.shape == (c.b, c.E, nck, c.N)
    assert torch.isfinite(ck).all()
    T.assert_elementwise("out", out, ref64(inp, c), 1e-4, 1e-5)
    T.assert_elementwise("ysum", ysum, ref64(inp, c, z=None), 1e-4, 1e-5)
    T.poison_allocator(*like)
    out2, ysum2, ck2 = raw(inp, c, kernel_backend)
    assert torch.equal(out, out2) and torch.equal(ysum, ysum2) and torch.equal(ck, ck2)


# --------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", GRAD_CASES, ids=_id)
def test_gradients(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c, 100))
    inp = c.inputs(seed, dtype)
    cot = [T.randn(T.gen(seed + 7), c.b, c.s, c.E, dtype=F64)]
    _, grads = T.grads_of(lambda **a: run(a, c, kernel_backend), inp, cot)
    _, rgrads = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)
    T.assert_grads(grads, rgrads, inp, T.GRAD_TOL[dtype])
    if c.p:  # C of the prefix is never read: its gradient is exactly zero
        assert torch.count_nonzero(grads["C"][:, :c.p]) == 0


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
def test_gradients_half(dtype, seed, kernel_backend):
    c = Case(2, 9, 8, 5, 4)
    inp = c.inputs(seed, dtype)
    cot = [T.randn(T.gen(seed + 7), c.b, c.s, c.E, dtype=dtype)]
    _, grads = T.grads_of(lambda **a: run(a, c, kernel_backend), inp, cot)
    _, same = T.grads_of(lambda **a: fork_scan_ref(*[a[k] for k in T.FORK_KEYS], c.p, c.softplus), inp, cot)
    _, exact = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)
    for k in grads:
        assert grads[k].dtype == inp[k].dtype, k
        if inp[k].dtype == F32:
            T.assert_rel(f"d{k}", grads[k], exact[k], 1e-4)
        elif k == "C":  # the prefix part is exactly zero in all three
            T.assert_half_rule("dC", grads[k][:, c.p:], same[k][:, c.p:], exact[k][:, c.p:])
        else:
            T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


GRADCHECK_CASES = [
    Case(1, 0, 2, 2, 2, True, True, True, True),
    Case(1, 2, 3, 2, 2, True, True, True, True, "arange"),
    Case(2, 1, 1, 2, 1, False, False, False, False),
    Case(1, 70, 1, 1, 1, True, False, True, True),  # the prefix crosses a 64-step checkpoint
]


@pytest.mark.parametrize("c", GRADCHECK_CASES, ids=_id)
def test_gradcheck(c, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.L < 64)
    T.gradcheck(lambda a: run(a, c, kernel_backend), c.inputs(seed, F64), kernel_backend)


def test_gradcheck_batch_broadcast_z(seed, kernel_backend):
    c = Case(3, 2, 2, 2, 2)
    inp = c.inputs(seed, F64)

    def call(a):
        z = a["z1"].expand(c.b, c.s, c.E)
        assert z.stride(0) == 0
        return run(dict(inp, u=a["u"], z=z), c, kernel_backend)

    T.gradcheck(call, dict(u=inp["u"], z1=inp["z"][:1]), kernel_backend)


# --------------------------------------------------------------------------
# The fused pipeline equals the unfused composition (docs/design.md section 2)


def _pipeline_params(seed, E, N, R, K, dtype=F64):
    g = T.gen(seed)
    return dict(
        conv_w=T.randn(g, E, K, dtype=dtype, scale=K ** -0.5),
        conv_b=T.randn(g, E, dtype=dtype, scale=0.3),
        x_proj=T.randn(g, R + 2 * N, E, dtype=dtype, scale=E ** -0.5),
        dt_proj=T.randn(g, E, R, dtype=dtype, scale=R ** -0.5),
        dt_bias=T.randn(g, E, dtype=dtype, scale=0.5, shift=-1.0),
        A=T.make_A(g, E, N, "arange", dtype),
        D=T.randn(g, E, dtype=dtype),
    )


def _fused(xP, xS, z, prm, R, N, backend):
    u = ops.fork_conv1d(xP, xS, prm["conv_w"], prm["conv_b"], backend=backend)
    x_dbl = u @ prm["x_proj"].T
    dt = x_dbl[..., :R] @ prm["dt_proj"].T
    B, C = x_dbl[..., R:R + N], x_dbl[..., R + N:]
    return ops.fork_scan(u, dt, prm["A"], B, C, prm["D"], z, prm["dt_bias"], xP.shape[1], True, backend=backend)


def _unfused(xP, xS, z, prm, R, N, backend):
    p, K = xP.shape[1], prm["conv_w"].shape[1]
    outs = []
    for seq, zz in ((torch.cat([xP, xS], 1), z), (torch.cat([xP, xS.flip(1)], 1), z.flip(1))):
        L = seq.shape[1]
        u = F.silu(F.conv1d(seq.transpose(1, 2), prm["conv_w"][:, None], prm["conv_b"], padding=K - 1,
                            groups=seq.shape[2])[..., :L])            # (b, E, L)
        x_dbl = u.transpose(1, 2) @ prm["x_proj"].T
        dt = (x_dbl[..., :R] @ prm["dt_proj"].T).transpose(1, 2)
        B, C = x_dbl[..., R:R + N].transpose(1, 2), x_dbl[..., R + N:].transpose(1, 2)
        zfull = torch.cat([torch.ones_like(xP), zz], 1).transpose(1, 2)  # prefix outputs are discarded
        y = ops.selective_scan(u, dt, prm["A"], B, C, prm["D"], zfull, prm["dt_bias"], True, backend=backend)
        outs.append(y[..., p:].transpose(1, 2))
    return outs[0] + outs[1].flip(1)


@pytest.mark.parametrize("b,p,s,E,N,R,K", [(2, 7, 5, 6, 4, 2, 4), (1, 0, 3, 3, 2, 1, 4), (2, 2, 4, 5, 3, 2, 4),
                                           (1, 70, 9, 4, 2, 1, 3)], ids=lambda v: str(v))
def test_fused_pipeline_equals_unfused(b, p, s, E, N, R, K, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, p + 2 * s <= 20)
    prm = _pipeline_params(seed, E, N, R, K)
    g = T.gen(seed + 1)
    xP, xS, z = T.randn(g, b, p, E, dtype=F64), T.randn(g, b, s, E, dtype=F64), T.randn(g, b, s, E, dtype=F64)
    cot = T.randn(g, b, s, E, dtype=F64)
    res = {}
    for name, fn in (("fused", _fused), ("unfused", _unfused)):
        leaves = [t.clone().requires_grad_(True) for t in (xP, xS, z, *prm.values())]
        out = fn(*leaves[:3], dict(zip(prm, leaves[3:])), R, N, kernel_backend)
        grads = torch.autograd.grad((out * cot).sum(), [t for t in leaves if t.numel()])
        res[name] = (out, grads)
    T.assert_rel("out", res["fused"][0], res["unfused"][0], 1e-12)
    names = [n for n, t in zip(("xP", "xS", "z", *prm), (xP, xS, z, *prm.values())) if t.numel()]
    for n, a, e in zip(names, res["fused"][1], res["unfused"][1]):
        T.assert_rel(f"d{n}", a, e, 1e-10)


# --------------------------------------------------------------------------
# Registration


OPCHECK_CASES = [
    (Case(2, 3, 2, 5, 4, True, True, True, True), F32, True),
    (Case(1, 0, 3, 4, 2, False, False, False, False), F32, False),
    (Case(1, 70, 2, 3, 2, True, False, True, True), F64, True),
    (Case(2, 1, 1, 2, 3, False, True, False, True), F64, False),
]


@pytest.mark.parametrize("c,dtype,requires_grad", OPCHECK_CASES,
                         ids=[f"{_id(c)}-{d}-{'grad' if r else 'nograd'}" for c, d, r in OPCHECK_CASES])
def test_opcheck_forward(c, dtype, requires_grad, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.L < 64 and requires_grad)
    inp = c.inputs(seed, dtype)
    args = [None if inp[k] is None else inp[k].clone().requires_grad_(requires_grad) for k in T.FORK_KEYS]
    T.opcheck(raw_op(kernel_backend).default, (*args, c.p, c.softplus))


@pytest.mark.parametrize("c,dtype", [(Case(2, 3, 2, 5, 4, True, True, True, True), F32),
                                     (Case(1, 0, 3, 4, 2, False, False, False, False), F64),
                                     (Case(1, 66, 2, 3, 2, True, False, True, False), F32)],
                         ids=["all-f32", "none-p0-f64", "Db-p66-f32"])
def test_opcheck_backward(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.L < 64)
    inp = c.inputs(seed, dtype)
    _, ysum, ck = raw(inp, c, kernel_backend)
    dout = T.randn(T.gen(seed + 1), c.b, c.s, c.E, dtype=dtype)
    T.opcheck(raw_op(kernel_backend, True).default,
             (dout, *[inp[k] for k in T.FORK_KEYS], ysum, ck, c.p, c.softplus))


@pytest.mark.parametrize("api", ["public", "raw"])
def test_compile_fullgraph_aot_eager(api, seed, kernel_backend, clean_env):
    """conv -> projections -> fork_scan, forward + backward, compiled with fullgraph=True."""
    T.skip_slow_triton(kernel_backend, api == "public")
    b, p, s, E, N, R, K = 2, 5, 3, 4, 3, 2, 4
    prm = _pipeline_params(seed, E, N, R, K, F32)
    g = T.gen(seed + 1)
    xP, xS, z = T.randn(g, b, p, E), T.randn(g, b, s, E), T.randn(g, b, s, E)

    def fn(xP, xS, z, conv_w, conv_b, x_proj, dt_proj, dt_bias, A, D):
        if api == "public":
            u = ops.fork_conv1d(xP, xS, conv_w, conv_b, backend=kernel_backend)
        else:
            u = torch.ops.vlssm.fork_conv1d(xP, xS, conv_w, conv_b)
        x_dbl = u @ x_proj.T
        dt = x_dbl[..., :R] @ dt_proj.T
        B, C = x_dbl[..., R:R + N], x_dbl[..., R + N:]
        if api == "public":
            return ops.fork_scan(u, dt, A, B, C, D, z, dt_bias, p, True, backend=kernel_backend)
        return torch.ops.vlssm.fork_scan(u, dt, A, B, C, D, z, dt_bias, p, True)[0]

    inp = dict(xP=xP, xS=xS, z=z, **prm)
    T.compile_check(lambda *xs: (fn(*xs),), inp, list(inp), "aot_eager")


# --------------------------------------------------------------------------
# Determinism, layouts


def test_deterministic_and_thread_count_independent(seed, cpu_backend):
    c = Case(3, 70, 40, 70, 5)
    inp = c.inputs(seed, F32)
    cot = [T.randn(T.gen(seed + 1), c.b, c.s, c.E)]

    def once():
        outs, grads = T.grads_of(lambda **a: run(a, c, cpu_backend), inp, cot)
        return outs + [grads[k] for k in sorted(grads)]

    T.assert_deterministic(once)


def test_noncontiguous_inputs(seed, kernel_backend):
    """Slices of the x_proj / in_proj outputs, channel-major storage, strided parameters."""
    c = Case(2, 6, 5, 7, 3)
    inp = c.inputs(seed, F32)
    L, E, N = c.L, c.E, c.N
    x_dbl = torch.empty(c.b, L, 2 + 2 * N)
    x_dbl[..., 2:2 + N] = inp["B"]
    x_dbl[..., 2 + N:] = inp["C"]
    xz = torch.empty(c.b, c.p + c.s, 2 * E)
    xz[:, c.p:, E:] = inp["z"]
    dl = torch.empty(c.b, L, 2 * E)
    dl[..., 1::2] = inp["delta"]
    nc = dict(
        u=inp["u"].transpose(1, 2).contiguous().transpose(1, 2),
        delta=dl[..., 1::2],
        A=inp["A"].t().contiguous().t(),
        B=x_dbl[..., 2:2 + N],
        C=x_dbl[..., 2 + N:],
        D=torch.stack([inp["D"], inp["D"]], 1)[:, 0],
        z=xz[:, c.p:, E:],
        delta_bias=torch.stack([inp["delta_bias"], inp["delta_bias"]], 1)[:, 1],
    )
    for k, v in nc.items():
        assert torch.equal(v, inp[k]) and not v.is_contiguous(), k
    cot = [T.randn(T.gen(seed + 1), c.b, c.s, c.E)]
    T.assert_layout_invariant(lambda **a: run(a, c, kernel_backend), inp, nc, cot)


def test_batch_broadcast_z(seed, kernel_backend):
    c = Case(4, 3, 6, 9, 4)
    inp = c.inputs(seed, F32)
    z = inp["z"][:1].expand(c.b, c.s, c.E)
    assert z.stride(0) == 0
    out = run(inp, c, kernel_backend, z=z)
    assert torch.equal(out, run(inp, c, kernel_backend, z=z.contiguous()))
    T.assert_rel("out", out, ref64(inp, c, z=z), 1e-5)


# --------------------------------------------------------------------------
# Backends


def test_backends_agree(seed, kernel_backend):
    c = Case(2, 9, 6, 11, 4)
    inp = c.inputs(seed, F32)
    T.assert_rel("out", run(inp, c, kernel_backend), run(inp, c, "reference"), 1e-5)


def test_default_backend_selection(seed, cpu_backend, clean_env):
    c = Case(2, 9, 6, 20, 4)
    inp = c.inputs(seed, F32)
    T.assert_backend_selection(lambda be: run(inp, c, be), clean_env)


# --------------------------------------------------------------------------
# Bad inputs

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "prefix_len", "delta_softplus", "backend")
NB, NP, NS, NE, NN = 2, 3, 2, 5, 4
NL = NP + 2 * NS


def _valid():
    return T.fork_inputs(9, NB, NP, NS, NE, NN, F32)


BAD = [
    ("u-rank2", ValueError, "u", dict(u=torch.randn(NB, NL))),
    ("delta-shape", ValueError, "delta", dict(delta=torch.rand(NB, NL + 2, NE))),
    ("delta-dim", ValueError, "delta", dict(delta=torch.rand(NB, NL, NE + 1))),
    ("A-dim", ValueError, "A", dict(A=-torch.rand(NE + 1, NN))),
    ("A-rank", ValueError, "A", dict(A=-torch.rand(NE))),
    ("B-length", ValueError, "B", dict(B=torch.randn(NB, NL - 1, NN))),
    ("B-batch", ValueError, "B", dict(B=torch.randn(1, NL, NN))),
    ("C-dstate", ValueError, "C", dict(C=torch.randn(NB, NL, NN + 1))),
    ("D-size", ValueError, "D", dict(D=torch.randn(NE + 1))),
    ("z-full-length", ValueError, "z", dict(z=torch.randn(NB, NL, NE))),   # z covers the suffix only
    ("z-suffix+1", ValueError, "z", dict(z=torch.randn(NB, NS + 1, NE))),
    ("delta_bias-size", ValueError, "delta_bias", dict(delta_bias=torch.randn(2 * NE))),
    ("delta-float64", TypeError, "delta", dict(delta=torch.rand(NB, NL, NE, dtype=F64))),
    ("B-bfloat16", TypeError, "B", dict(B=torch.randn(NB, NL, NN, dtype=torch.bfloat16))),
    ("z-float16", TypeError, "z", dict(z=torch.randn(NB, NS, NE, dtype=torch.float16))),
    ("u-int", TypeError, "u", dict(u=torch.ones(NB, NL, NE, dtype=torch.int32))),
    ("C-int", TypeError, "C", dict(C=torch.ones(NB, NL, NN, dtype=torch.int64))),
    ("delta-meta", ValueError, "delta", "meta:delta"),
    ("A-meta", ValueError, "A", "meta:A"),
    ("C-meta", ValueError, "C", "meta:C"),
    ("z-meta", ValueError, "z", "meta:z"),
    ("delta_bias-meta", ValueError, "delta_bias", "meta:delta_bias"),
    ("u-tuple", TypeError, "u", dict(u=(1.0, 2.0))),
    ("A-numpy", TypeError, "A", "numpy:A"),
    ("z-float", TypeError, "z", dict(z=1.0)),
    ("u-empty-b", ValueError, "u", dict(u=torch.randn(0, NL, NE))),
    ("u-empty-E", ValueError, "u", dict(u=torch.randn(NB, NL, 0))),
    ("u-empty-L", ValueError, "u", dict(u=torch.randn(NB, 0, NE))),
    ("A-empty-N", ValueError, "A", dict(A=torch.randn(NE, 0))),
    ("prefix_len-odd-remainder", ValueError, "prefix_len", dict(prefix_len=NP + 1)),
    ("prefix_len-negative", ValueError, "prefix_len", dict(prefix_len=-1)),
    ("prefix_len-equals-L", ValueError, "prefix_len", dict(prefix_len=NL)),
    ("prefix_len-above-L", ValueError, "prefix_len", dict(prefix_len=NL + 2)),
    ("prefix_len-bool", TypeError, "prefix_len", dict(prefix_len=True)),
    ("prefix_len-float", TypeError, "prefix_len", dict(prefix_len=3.0)),
    ("prefix_len-None", TypeError, "prefix_len", dict(prefix_len=None)),
    ("prefix_len-tensor", TypeError, "prefix_len", dict(prefix_len=torch.tensor(3))),
    ("delta_softplus-str", TypeError, "delta_softplus", dict(delta_softplus="yes")),
    ("backend-nonsense", ValueError, "backend", dict(backend="nonsense")),
]


def _call_bad(spec, backend):
    inp = T.with_bad(dict(_valid(), prefix_len=NP, delta_softplus=True, backend=backend), spec)
    return ops.fork_scan(*[inp[k] for k in T.FORK_KEYS], inp["prefix_len"], inp["delta_softplus"],
                         backend=inp["backend"])


@pytest.mark.parametrize("spec", BAD, ids=[s[0] for s in BAD])
def test_bad_input(spec, backend):
    _, exc, name, over = spec
    T.check_raises_first(exc, name, ARG_NAMES, _call_bad, over, backend)


@pytest.mark.parametrize("over,name,exc", [
    (dict(prefix_len=NP + 1), "prefix_len", ValueError),
    (dict(prefix_len=-2), "prefix_len", ValueError),
    (dict(prefix_len=NL), "prefix_len", ValueError),
    (dict(A=-torch.rand(NE, NN, dtype=F64)), "A", TypeError),
    (dict(delta_bias=torch.rand(NE, dtype=F64)), "delta_bias", TypeError),
    (dict(z=torch.randn(NB, NL, NE)), "z", ValueError),
    (dict(C=torch.randn(NB, NL, NN + 1)), "C", ValueError),
    (dict(z=torch.empty(NB, NS, NE, device="meta")), "z", (ValueError, RuntimeError)),
], ids=["p-odd", "p-neg", "p-L", "A-f64", "bias-f64", "z-full", "C-dstate", "z-meta"])
def test_raw_op_bad_input(over, name, exc, kernel_backend):
    inp = dict(_valid(), prefix_len=NP)
    inp.update(over)
    T.check_raises(exc, name, raw_op(kernel_backend), *[inp[k] for k in T.FORK_KEYS], inp["prefix_len"], True)


def test_raw_backward_checks(seed, kernel_backend):
    c = Case(NB, NP, NS, NE, NN)
    inp = c.inputs(seed, F32)
    _, ysum, ck = raw(inp, c, kernel_backend)
    dout = torch.randn(c.b, c.s, c.E)
    args = [inp[k] for k in T.FORK_KEYS]
    bw = raw_op(kernel_backend, True)
    T.check_raises(ValueError, "checkpoints", bw, dout, *args, ysum, ck[:, :, :1], c.p, True)
    T.check_raises(ValueError, "ysum", bw, dout, *args, ysum[:, :1], ck, c.p, True)
    T.check_raises(TypeError, "ysum", bw, dout, *args, ysum.double(), ck, c.p, True)
    T.check_raises(ValueError, "dout", bw, dout[:, :1], *args, ysum, ck, c.p, True)
