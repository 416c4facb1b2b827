"""Tests of vlssm.ops.attention_with_probs and its raw ops
torch.ops.vlssm.attention_with_probs{,_backward} (cpu) and
torch.ops.vlssm.attention_with_probs{,_backward}_triton (Triton; interpreted on
CPU tensors when there is no GPU, so the Triton shapes stay tiny).

Ground truth: vlssm.reference.attention_with_probs_ref in float64 on the same
inputs upcast, itself checked against an independent literal row loop.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import attention_with_probs_ref

F32, F64 = torch.float32, torch.float64


class Case(NamedTuple):
    q: Tuple[int, ...]
    k: Tuple[int, ...]
    v: Tuple[int, ...]
    scale: Optional[float] = None
    triton: bool = True  # small enough for the Triton interpreter

    def inputs(self, seed, dtype=F32):
        g = T.gen(seed)
        return dict(q=T.randn(g, *self.q, dtype=dtype), k=T.randn(g, *self.k, dtype=dtype),
                    v=T.randn(g, *self.v, dtype=dtype))

    def out_shapes(self):
        batch = torch.broadcast_shapes(self.q[:-2], self.k[:-2], self.v[:-2])
        return (*batch, self.q[-2], self.v[-1]), (*batch, self.q[-2], self.k[-2])


def _id(c: Case) -> str:
    s = lambda t: "x".join(map(str, t))  # noqa: E731
    return f"q{s(c.q)}-k{s(c.k)}-v{s(c.v)}" + ("" if c.scale is None else f"-s{c.scale:g}")


CASES = [
    Case((3, 8), (5, 8), (5, 4)),                       # no leading dims
    Case((2, 1, 16), (2, 7, 16), (2, 7, 16)),           # Lq = 1
    Case((2, 5, 8), (2, 1, 8), (2, 1, 3)),              # Lk = 1
    Case((1, 4, 1), (1, 6, 1), (1, 6, 2), 0.7),         # d = 1
    Case((1, 3, 12), (3, 9, 12), (3, 9, 12)),           # q broadcast over the batch
    Case((2, 1, 5, 8), (1, 3, 7, 8), (2, 3, 7, 5), -0.4),  # 4-D, every operand broadcast somewhere
    Case((2, 40, 48), (2, 37, 48), (2, 37, 20)),        # several query / key blocks
    Case((1, 5, 80), (1, 6, 80), (1, 6, 70)),           # head-dim loop, dv split over the grid
    Case((2, 33, 40), (2, 257, 40), (2, 257, 24), triton=False),  # Lk = 257
    Case((1, 5, 1024), (1, 9, 1024), (1, 9, 1024), triton=False),  # large head dim
]
TRITON_CASES = [c for c in CASES if c.triton]
GRAD_CASES = [CASES[0], CASES[1], CASES[2], CASES[3], CASES[4], CASES[5], CASES[6], CASES[8]]


def _skip_big(c: Case, backend: str):
    if backend == "triton" and not c.triton:
        pytest.skip("too large for the Triton interpreter")


def run(inp, c: Case, backend):
    return ops.attention_with_probs(inp["q"], inp["k"], inp["v"], c.scale, backend=backend)


def ref64(inp, c: Case):
    return attention_with_probs_ref(T.up(inp["q"]), T.up(inp["k"]), T.up(inp["v"]), c.scale)


def ref_same(inp, c: Case):
    return attention_with_probs_ref(inp["q"], inp["k"], inp["v"], c.scale)


def raw_ops(backend):
    return T.raw_op("attention_with_probs", backend), T.raw_op("attention_with_probs", backend, True)


def flat3(q, k, v):
    """The raw ops' 3-D operands: leading dims broadcast (stride 0 where possible) and flattened."""
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return tuple(x.expand(*batch, *x.shape[-2:]).reshape(-1, *x.shape[-2:]) for x in (q, k, v))


def literal_attention(q, k, v, scale):
    """Row by row in Python, float64: probs[i, j] = exp(s_ij - max) / sum, out = sum_j probs v_j."""
    q, k, v = q.double(), k.double(), v.double()
    Lq, Lk = q.shape[0], k.shape[0]
    probs = torch.empty(Lq, Lk, dtype=F64)
    out = torch.empty(Lq, v.shape[1], dtype=F64)
    for i in range(Lq):
        s = [scale * float((q[i] * k[j]).sum()) for j in range(Lk)]
        m = max(s)
        e = [math.exp(x - m) for x in s]
        tot = sum(e)
        for j in range(Lk):
            probs[i, j] = e[j] / tot
        out[i] = sum(probs[i, j] * v[j] for j in range(Lk))
    return out, probs


# --------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("c", [CASES[0], CASES[3], Case((4, 6), (9, 6), (9, 2), 3.0)], ids=_id)
def test_reference_matches_literal_loop(c, seed):
    inp = c.inputs(seed, F64)
    out, probs = ref64(inp, c)
    scale = c.scale if c.scale is not None else c.q[-1] ** -0.5
    flat = {k: v.reshape(-1, *v.shape[-2:])[0] for k, v in inp.items()}
    lo, lp = literal_attention(flat["q"], flat["k"], flat["v"], scale)
    T.assert_rel("out", out.reshape(-1, *out.shape[-2:])[0], lo, 1e-13)
    T.assert_rel("probs", probs.reshape(-1, *probs.shape[-2:])[0], lp, 1e-13)


def test_reference_half_is_float32_rounded(seed):
    c = CASES[4]
    inp = c.inputs(seed, torch.bfloat16)
    out, probs = ref_same(inp, c)
    assert out.dtype == probs.dtype == torch.bfloat16
    eo, ep = ref64(inp, c)
    assert 0 < T.rel_err(out, eo) < 4e-3 and 0 < T.rel_err(probs, ep) < 4e-3


# --------------------------------------------------------------------------
# Forward vs the float64 reference


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_forward(c, dtype, seed, backend):
    _skip_big(c, backend)
    inp = c.inputs(seed, dtype)
    out, probs = run(inp, c, backend)
    ro, rp = ref64(inp, c)
    so, sp = c.out_shapes()
    assert out.dtype == probs.dtype == dtype and out.shape == so and probs.shape == sp
    T.assert_rel("out", out, ro, T.FWD_TOL[dtype])
    T.assert_rel("probs", probs, rp, T.FWD_TOL[dtype])
    T.assert_elementwise("out", out, ro, *T.ELEMENTWISE_TOL[dtype])
    T.assert_elementwise("probs", probs, rp, *T.ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", [CASES[0], CASES[5], CASES[6], CASES[8]], ids=_id)
def test_forward_half(c, dtype, seed, kernel_backend):
    _skip_big(c, kernel_backend)
    inp = c.inputs(seed, dtype)
    out, probs = run(inp, c, kernel_backend)
    assert out.dtype == probs.dtype == dtype
    ro, rp = ref64(inp, c)
    so, sp = ref_same(inp, c)
    T.assert_half_rule("out", out, so, ro)
    T.assert_half_rule("probs", probs, sp, rp)
    T.assert_elementwise("out", out, ro, 2e-2, 2e-2)
    T.assert_elementwise("probs", probs, rp, 2e-2, 2e-2)


@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=str)
def test_large_logits(dtype, seed, backend):
    """scale * q k^T around 1e3: no overflow, no NaN; as accurate as the same-precision reference.

    Logits of 1e3 amplify the input rounding 1e3-fold, so below float64 the
    bound is the same-precision reference's error (x2, like the half rule).
    """
    c = Case((2, 7, 16), (2, 11, 16), (2, 11, 5), scale=100.0)
    inp = c.inputs(seed, dtype)
    out, probs = run(inp, c, backend)
    ro, rp = ref64(inp, c)
    logits = c.scale * (inp["q"].double() @ inp["k"].double().transpose(-1, -2))
    assert logits.abs().max() > 500, "the logits are not large: the test is vacuous"
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    if dtype == F64:
        T.assert_rel("out", out, ro, 1e-10)
        T.assert_rel("probs", probs, rp, 1e-10)
    else:
        so, sp = ref_same(inp, c)
        for name, a, same, exact in (("out", out, so, ro), ("probs", probs, sp, rp)):
            err, bound = T.rel_err(a, exact), 2 * T.rel_err(same, exact) + T.FWD_TOL[F32]
            assert err <= bound, f"{name}: rel err {err:.3g} > {bound:.3g}"
    sums = probs.double().sum(-1)
    assert (sums - 1).abs().max() < (1e-2 if dtype == torch.bfloat16 else 1e-5), "rows do not sum to 1"


def test_default_scale(seed, backend):
    c = CASES[6]
    inp = c.inputs(seed, F32)
    out, probs = run(inp, c, backend)
    out2, probs2 = ops.attention_with_probs(inp["q"], inp["k"], inp["v"], 48 ** -0.5, backend=backend)
    assert torch.equal(out, out2) and torch.equal(probs, probs2)
    out3, _ = ops.attention_with_probs(inp["q"], inp["k"], inp["v"], 1.0, backend=backend)
    assert not torch.allclose(out, out3), "scale has no effect"


@pytest.mark.parametrize("c", [CASES[5], CASES[6], CASES[7], CASES[8]], ids=_id)
def test_raw_op_writes_every_element(c, seed, kernel_backend):
    """Outputs of the raw op on NaN-poisoned memory: finite, elementwise right, twice identical."""
    _skip_big(c, kernel_backend)
    inp = c.inputs(seed, F32)
    q3, k3, v3 = flat3(inp["q"], inp["k"], inp["v"])
    n = q3.shape[0]
    fwd, bwd = raw_ops(kernel_backend)
    scale = 0.3
    shapes = [torch.empty(n, c.q[-2], c.v[-1]), torch.empty(n, c.q[-2], c.k[-2])]
    T.poison_allocator(*shapes)
    out, probs = fwd(q3, k3, v3, scale)
    ro, rp = attention_with_probs_ref(q3.double(), k3.double(), v3.double(), scale)
    T.assert_elementwise("out", out, ro, 1e-4, 1e-5)
    T.assert_elementwise("probs", probs, rp, 1e-4, 1e-5)
    g = T.gen(seed + 1)
    dout, dprobs = T.randn(g, *out.shape), T.randn(g, *probs.shape)
    T.poison_allocator(torch.empty(q3.shape), torch.empty(k3.shape), torch.empty(v3.shape), *shapes)
    grads = bwd(dout, dprobs, q3, k3, v3, probs, scale)
    leaves = [x.double().requires_grad_(True) for x in (q3, k3, v3)]
    o, p = attention_with_probs_ref(*leaves, scale)
    want = torch.autograd.grad((o * dout.double()).sum() + (p * dprobs.double()).sum(), leaves)
    for name, a, e in zip(("dq", "dk", "dv"), grads, want):
        T.assert_elementwise(name, a, e, 1e-3, 1e-5)
    T.poison_allocator(*shapes)
    out2, probs2 = fwd(q3, k3, v3, scale)
    grads2 = bwd(dout, dprobs, q3, k3, v3, probs, scale)
    assert torch.equal(out, out2) and torch.equal(probs, probs2)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2))


# --------------------------------------------------------------------------
# Gradients


def _grads(c, dtype, seed, backend, use_out=True, use_probs=True, inp=None):
    inp = c.inputs(seed, dtype) if inp is None else inp
    g = T.gen(seed + 7)
    so, sp = c.out_shapes()
    cot = [T.randn(g, *so, dtype=F64) * (1.0 if use_out else 0.0),
           T.randn(g, *sp, dtype=F64) * (1.0 if use_probs else 0.0)]

    def fn(**a):
        out, probs = run(a, c, backend)
        return (out if use_out else out.detach()), (probs if use_probs else probs.detach())

    _, grads = T.grads_of(fn, inp, cot)
    _, rgrads = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)
    return inp, grads, rgrads


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", GRAD_CASES, ids=_id)
def test_gradients(c, dtype, seed, backend):
    _skip_big(c, backend)
    inp, grads, rgrads = _grads(c, dtype, seed, backend)
    T.assert_grads(grads, rgrads, inp, T.GRAD_TOL[dtype], zero_atol=1e-6)  # zero: dq, dk when Lk = 1


@pytest.mark.parametrize("use_out,use_probs", [(False, True), (True, False)], ids=["dprobs-only", "dout-only"])
@pytest.mark.parametrize("c", [CASES[5], CASES[6]], ids=_id)
def test_gradients_one_output(c, use_out, use_probs, seed, kernel_backend):
    _, grads, rgrads = _grads(c, F64, seed, kernel_backend, use_out, use_probs)
    for k in grads:
        if rgrads[k].norm() == 0:  # dv when only probs is used
            assert grads[k].norm() == 0, f"d{k} must be zero"
        else:
            T.assert_rel(f"d{k}", grads[k], rgrads[k], 1e-10)
    if not use_out:
        assert rgrads["v"].norm() == 0


def test_gradient_of_broadcast_probs_cotangent(seed, kernel_backend):
    """probs.sum(-2) reaches the backward as a stride-0 dprobs; q shared by the batch (stride-0 q)."""
    c = Case((1, 6, 8), (3, 9, 8), (3, 9, 4))
    inp = c.inputs(seed, F64)
    w = T.randn(T.gen(seed + 1), 3, 9, dtype=F64)

    def loss(be, **a):
        out, probs = (run(a, c, be) if be else ref64(a, c))
        return (probs.sum(-2) * w).sum() + out.sum()

    leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    got = torch.autograd.grad(loss(kernel_backend, **leaves), list(leaves.values()))
    rleaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
    want = torch.autograd.grad(loss(None, **rleaves), list(rleaves.values()))
    for name, a, e in zip(leaves, got, want):
        assert a.shape == inp[name].shape
        T.assert_rel(f"d{name}", a, e, 1e-10)


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
def test_gradients_half(dtype, seed, kernel_backend):
    """Every gradient within 2x the error of the same-precision reference autograd (+ eps)."""
    c = CASES[6] if kernel_backend == "triton" else CASES[8]
    inp = c.inputs(seed, dtype)
    g = T.gen(seed + 7)
    so, sp = c.out_shapes()
    cot = [T.randn(g, *so, dtype=dtype), T.randn(g, *sp, dtype=dtype)]
    _, grads = T.grads_of(lambda **a: run(a, c, kernel_backend), inp, cot)
    _, same = T.grads_of(lambda **a: ref_same(a, c), inp, cot)
    _, exact = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)
    for k in grads:
        assert grads[k].dtype == dtype, k
        T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


@pytest.mark.parametrize("c", [Case((2, 3, 4), (2, 5, 4), (2, 5, 3), 0.8), Case((3, 2), (1, 4, 2), (4, 3)),
                               Case((1, 1, 1), (1, 1, 1), (1, 1, 2))], ids=_id)
def test_gradcheck(c, seed, cpu_backend):
    T.gradcheck(lambda a: run(a, c, cpu_backend), c.inputs(seed, F64), cpu_backend)


def test_gradcheck_triton(seed):
    T.require_backend("triton")
    c = Case((1, 2, 3), (1, 3, 3), (1, 3, 2), 0.9)
    T.gradcheck(lambda a: run(a, c, "triton"), c.inputs(seed, F64), "triton", fast_mode=False)  # the full Jacobian


# --------------------------------------------------------------------------
# Layouts


def test_noncontiguous_and_stride0_inputs(seed, kernel_backend):
    """Transposed / sliced / stride-0 operands give the results (and gradients) of contiguous ones."""
    n, Lq, Lk, d, dv = 3, 7, 9, 6, 5
    g = T.gen(seed)
    qT = T.randn(g, n, d, Lq).transpose(1, 2)                        # d-major
    kw = T.randn(g, n, Lk, 2 * d)[..., ::2]                           # step-2 slice of the head dim
    v0 = T.randn(g, 1, Lk, dv).expand(n, Lk, dv)                      # stride-0 batch
    assert not qT.is_contiguous() and not kw.is_contiguous() and v0.stride(0) == 0
    fwd, bwd = raw_ops(kernel_backend)
    out, probs = fwd(qT, kw, v0, 0.5)
    out_c, probs_c = fwd(qT.contiguous(), kw.contiguous(), v0.contiguous(), 0.5)
    T.assert_rel("out", out, out_c, 1e-6)
    T.assert_rel("probs", probs, probs_c, 1e-6)
    dout = T.randn(g, 1, Lq, dv).expand(n, Lq, dv)                     # stride-0 gradients
    dprobs = T.randn(g, n, Lk, Lq).transpose(1, 2)
    ga = bwd(dout, dprobs, qT, kw, v0, probs, 0.5)
    gb = bwd(dout.contiguous(), dprobs.contiguous(), qT.contiguous(), kw.contiguous(), v0.contiguous(),
             probs_c, 0.5)
    for name, a, b in zip(("dq", "dk", "dv"), ga, gb):
        T.assert_rel(name, a, b, 1e-6)
    ro, rp = attention_with_probs_ref(qT.double(), kw.double(), v0.double(), 0.5)
    T.assert_rel("out", out, ro, 1e-5)


# --------------------------------------------------------------------------
# Registration: opcheck, torch.compile


@pytest.mark.parametrize("dtype,requires_grad", [(F32, True), (F64, False), (torch.bfloat16, True)],
                         ids=["f32-grad", "f64-nograd", "bf16-grad"])
def test_opcheck_forward(dtype, requires_grad, seed, kernel_backend):
    g = T.gen(seed)
    q, k, v = (T.randn(g, *s, dtype=dtype).requires_grad_(requires_grad) for s in ((2, 5, 4), (2, 6, 4), (2, 6, 3)))
    T.opcheck(raw_ops(kernel_backend)[0].default, (q, k, v, 0.5))


@pytest.mark.parametrize("dtype,with_dprobs", [(F32, True), (F64, False)], ids=["f32-dprobs", "f64-nodprobs"])
def test_opcheck_backward(dtype, with_dprobs, seed, kernel_backend):
    g = T.gen(seed)
    q, k, v = (T.randn(g, *s, dtype=dtype) for s in ((2, 5, 4), (2, 6, 4), (2, 6, 3)))
    fwd, bwd = raw_ops(kernel_backend)
    _, probs = fwd(q, k, v, 0.5)
    dout = T.randn(g, 2, 5, 3, dtype=dtype)
    dprobs = T.randn(g, 2, 5, 6, dtype=dtype) if with_dprobs else None
    T.opcheck(bwd.default, (dout, dprobs, q, k, v, probs, 0.5))


@pytest.mark.parametrize("api", ["public", "raw"])
def test_compile_fullgraph_aot_eager(api, seed, kernel_backend, clean_env):
    c = CASES[5]
    inp = c.inputs(seed, F32)
    fwd, _ = raw_ops(kernel_backend)

    def fn(q, k, v):
        if api == "public":
            out, probs = ops.attention_with_probs(q, k, v, c.scale, backend=kernel_backend)
        else:
            out, probs = fwd(*flat3(q, k, v), 0.25)
        return torch.tanh(out) * 2, probs * 3

    torch._dynamo.reset()
    T.compile_check(fn, inp, ["q", "k", "v"], "aot_eager")


# --------------------------------------------------------------------------
# Backends


def test_backends_agree(seed):
    c = CASES[6]
    inp = c.inputs(seed, F32)
    bes = ["reference"] + (["cpu"] if T.HAS_EXT else []) + (["triton"] if T.triton_reason() is None else [])
    if len(bes) < 2:
        pytest.skip("only the reference backend is available")
    want = run(inp, c, "reference")
    for be in bes[1:]:
        got = run(inp, c, be)
        T.assert_rel(f"{be} out", got[0], want[0], 1e-5)
        T.assert_rel(f"{be} probs", got[1], want[1], 1e-5)


def test_default_backend_selection(seed, cpu_backend, clean_env):
    c = CASES[8]
    inp = c.inputs(seed, F32)
    T.assert_backend_selection(lambda be: run(inp, c, be)[0], clean_env)


# --------------------------------------------------------------------------
# Bad inputs

ARG_NAMES = ("q", "k", "v", "scale", "backend")


def _valid():
    g = T.gen(5)
    return dict(q=T.randn(g, 2, 3, 4), k=T.randn(g, 2, 5, 4), v=T.randn(g, 2, 5, 6), scale=None)


BAD = [
    ("q-rank1", ValueError, "q", dict(q=torch.randn(4))),
    ("q-int", TypeError, "q", dict(q=torch.ones(2, 3, 4, dtype=torch.int64))),
    ("q-list", TypeError, "q", dict(q=[[1.0]])),
    ("q-empty-Lq", ValueError, "q", dict(q=torch.randn(2, 0, 4))),
    ("q-empty-batch", ValueError, "q", dict(q=torch.randn(0, 3, 4))),
    ("k-d", ValueError, "k", dict(k=torch.randn(2, 5, 3))),
    ("k-rank1", ValueError, "k", dict(k=torch.randn(4))),
    ("k-batch", ValueError, "k", dict(k=torch.randn(3, 5, 4))),
    ("k-float64", TypeError, "k", dict(k=torch.randn(2, 5, 4, dtype=F64))),
    ("k-meta", ValueError, "k", dict(k=torch.empty(2, 5, 4, device="meta"))),
    ("k-numpy", TypeError, "k", dict(k=torch.randn(2, 5, 4).numpy())),
    ("v-Lk", ValueError, "v", dict(v=torch.randn(2, 4, 6))),
    ("v-batch", ValueError, "v", dict(v=torch.randn(4, 5, 6))),
    ("v-bfloat16", TypeError, "v", dict(v=torch.randn(2, 5, 6, dtype=torch.bfloat16))),
    ("v-empty-dv", ValueError, "v", dict(v=torch.randn(2, 5, 0))),
    ("scale-str", TypeError, "scale", dict(scale="1")),
    ("scale-bool", TypeError, "scale", dict(scale=True)),
    ("scale-nan", ValueError, "scale", dict(scale=float("nan"))),
    ("scale-inf", ValueError, "scale", dict(scale=float("inf"))),
]


@pytest.mark.parametrize("spec", BAD, ids=[s[0] for s in BAD])
def test_bad_input(spec, backend):
    _, exc, name, over = spec
    a = {**_valid(), **over}
    T.check_raises_first(exc, name, ARG_NAMES, ops.attention_with_probs, a["q"], a["k"], a["v"], a["scale"],
                         backend=backend)


@pytest.mark.parametrize("bad", ["nonsense", 3])
def test_bad_backend(bad):
    a = _valid()
    T.check_raises(ValueError, "backend", ops.attention_with_probs, a["q"], a["k"], a["v"], backend=bad)


RAW_BAD = [
    ("q-rank2", ValueError, "q", dict(q=torch.randn(3, 4))),
    ("k-batch", ValueError, "k", dict(k=torch.randn(1, 5, 4))),
    ("k-d", ValueError, "k", dict(k=torch.randn(2, 5, 3))),
    ("v-Lk", ValueError, "v", dict(v=torch.randn(2, 4, 6))),
    ("v-float64", TypeError, "v", dict(v=torch.randn(2, 5, 6, dtype=F64))),
    ("k-empty", ValueError, "k", dict(k=torch.randn(2, 0, 4), v=torch.randn(2, 0, 6))),
    ("scale-nan", ValueError, "scale", dict(scale=float("nan"))),
]


@pytest.mark.parametrize("spec", RAW_BAD, ids=[s[0] for s in RAW_BAD])
def test_raw_op_bad_input(spec, kernel_backend):
    """The raw ops check again: a direct torch.ops call never reads out of bounds."""
    _, exc, name, over = spec
    a = {**_valid(), "scale": 0.5, **over}
    fwd, _ = raw_ops(kernel_backend)
    T.check_raises(exc, name, fwd, a["q"], a["k"], a["v"], a["scale"])


@pytest.mark.parametrize("which", ["dout", "dprobs", "probs"])
def test_raw_backward_bad_input(which, kernel_backend):
    a = _valid()
    fwd, bwd = raw_ops(kernel_backend)
    _, probs = fwd(a["q"], a["k"], a["v"], 0.5)
    args = dict(dout=torch.randn(2, 3, 6), dprobs=torch.randn(2, 3, 5), probs=probs)
    args[which] = args[which][:, :, :-1]
    T.check_raises(ValueError, which, bwd, args["dout"], args["dprobs"], a["q"], a["k"], a["v"], args["probs"], 0.5)
