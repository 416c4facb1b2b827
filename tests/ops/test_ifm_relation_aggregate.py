"""Tests of vlssm.ops.relation_aggregate and its raw ops (cpu: torch.ops.vlssm.relation_aggregate{,_backward};
triton: ..._triton, run by the interpreter without a GPU).

Ground truth: vlssm.reference.relation_aggregate_ref in float64 on the same inputs
upcast, itself checked against an independent triple loop.
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import relation_aggregate_ref

F32, F64 = torch.float32, torch.float64
KEYS = ("m_ka", "m_ca", "t_ca", "alpha")

#: The kernel backends only, through the ``backend`` fixture (tests/ops/conftest.py: it skips the
#: missing one); a test without this mark runs every backend.
KERNEL_BACKENDS = pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)


class Case(NamedTuple):
    B: int
    C: int
    d: int
    shared: bool  # m_ka (C, C) shared by the batch, else (B, C, C)

    def inputs(self, seed, dtype=F32, alpha=0.5):
        g = T.gen(seed)
        lead = () if self.shared else (self.B,)
        return dict(
            m_ka=T.randn(g, *lead, self.C, self.C, dtype=dtype),
            m_ca=T.randn(g, self.B, self.C, self.C, dtype=dtype),
            t_ca=T.randn(g, self.B, self.C, self.d, dtype=dtype),
            alpha=torch.tensor(alpha, dtype=dtype),
        )


def _id(c: Case) -> str:
    return f"B{c.B}-C{c.C}-d{c.d}-{'shared' if c.shared else 'batched'}"


CASES = [Case(1, 1, 1, True), Case(1, 1, 1, False), Case(2, 3, 5, True), Case(3, 3, 1, False),
         Case(1, 5, 7, False), Case(2, 33, 40, True), Case(3, 17, 35, False)]
ALPHAS = [0.0, 1.0, 0.5, 0.3]


def raw_ops(backend):
    """The raw (forward, backward) ops of a kernel backend."""
    return T.raw_op("relation_aggregate", backend), T.raw_op("relation_aggregate", backend, True)


def run(inp, backend):
    return ops.relation_aggregate(inp["m_ka"], inp["m_ca"], inp["t_ca"], inp["alpha"], backend=backend)


def ref64(inp):
    return relation_aggregate_ref(*(T.up(inp[k]) for k in KEYS))


def literal(m_ka, m_ca, t_ca, alpha):
    """Triple loop, float64, independent of vlssm."""
    B, C, d = t_ca.shape
    a = float(alpha)
    out = torch.zeros(B, C, d, dtype=F64)
    for b in range(B):
        ka = m_ka.double() if m_ka.dim() == 2 else m_ka[b].double()
        for i in range(C):
            for k in range(C):
                out[b, i] += (a * ka[i, k] + (1 - a) * m_ca[b, i, k].double()) * t_ca[b, k].double()
    return out


def _assert_grad(name, actual, expected, tol):
    if expected.double().norm() == 0:  # e.g. dm_ka at alpha = 0
        assert torch.isfinite(actual).all() and actual.double().norm() == 0, f"{name} must be zero"
    else:
        T.assert_rel(name, actual, expected, tol)


# --------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("c", [CASES[0], CASES[2], CASES[3], CASES[4]], ids=_id)
def test_reference_matches_literal(c, seed):
    inp = c.inputs(seed, F64, alpha=0.3)
    out = relation_aggregate_ref(**inp)
    T.assert_rel("out", out, literal(**inp), 1e-13)
    assert relation_aggregate_ref(**{**inp, "alpha": 0.3}).equal(out)  # python float alpha


# --------------------------------------------------------------------------
# Forward and gradients vs the float64 reference


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_forward_and_gradients(backend, c, dtype, alpha, seed):
    inp = c.inputs(seed, dtype, alpha)
    g = T.gen(seed + 1)
    cot = [T.randn(g, c.B, c.C, c.d, dtype=F64)]
    outs, grads = T.grads_of(lambda **a: run(a, backend), inp, cot)
    routs, rgrads = T.grads_of(lambda **a: ref64(a), T.up_all(inp), cot)
    out = outs[0]
    assert out.dtype == dtype and out.shape == (c.B, c.C, c.d)
    T.assert_rel("out", out, routs[0], T.FWD_TOL[dtype])
    T.assert_elementwise("out", out, routs[0], *T.ELEMENTWISE_TOL[dtype])
    assert set(grads) == set(KEYS)
    for k in KEYS:
        assert grads[k].dtype == dtype and grads[k].shape == inp[k].shape, k
        _assert_grad(f"d{k}", grads[k], rgrads[k], T.GRAD_TOL[dtype])


def test_alpha_python_float_and_dtype(backend, seed):
    c = Case(2, 3, 4, True)
    inp = c.inputs(seed, F32, 0.25)
    want = run(inp, backend)
    assert torch.equal(run({**inp, "alpha": 0.25}, backend), want)
    # alpha of another floating dtype: used in the accumulation dtype, gradient in its own dtype
    a64 = torch.tensor(0.25, dtype=F64, requires_grad=True)
    t = inp["t_ca"].clone().requires_grad_(True)
    y = ops.relation_aggregate(inp["m_ka"], inp["m_ca"], t, a64, backend=backend)
    T.assert_rel("out", y, ref64(inp), 1e-5)
    y.sum().backward()
    assert a64.grad.dtype == F64 and torch.isfinite(a64.grad)
    leaves = T.up_all(inp)
    leaves["alpha"].requires_grad_(True)
    ref64(leaves).sum().backward()
    T.assert_rel("dalpha", a64.grad, leaves["alpha"].grad, 1e-4)


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@KERNEL_BACKENDS
@pytest.mark.parametrize("c", [Case(2, 9, 20, True), Case(3, 5, 33, False)], ids=_id)
def test_half(c, backend, dtype, seed):
    """Output and every gradient within 2x the error of the same-precision reference (+ eps)."""
    inp = c.inputs(seed, dtype, 0.375)
    g = T.gen(seed + 7)
    cot = [T.randn(g, c.B, c.C, c.d, dtype=dtype)]
    outs, grads = T.grads_of(lambda **a: run(a, backend), inp, cot)
    souts, same = T.grads_of(lambda **a: relation_aggregate_ref(**a), inp, cot)
    routs, exact = T.grads_of(lambda **a: ref64(a), T.up_all(inp), cot)
    assert outs[0].dtype == dtype
    T.assert_half_rule("out", outs[0], souts[0], routs[0])
    for k in ("m_ka", "m_ca", "t_ca"):
        assert grads[k].dtype == dtype, k
        T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])
    assert grads["alpha"].dtype == dtype
    T.assert_rel("dalpha", grads["alpha"], exact["alpha"], 2e-2)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "batched"])
def test_gradcheck(shared, seed, cpu_backend):
    T.gradcheck(lambda a: run(a, cpu_backend), Case(2, 3, 4, shared).inputs(seed, F64, 0.3), cpu_backend)


# --------------------------------------------------------------------------
# Layouts, raw ops, determinism


@KERNEL_BACKENDS
def test_strided_and_broadcast_inputs(backend, seed):
    """Transposed / sliced / stride-0 inputs, and the stride-0 gradient of .sum()."""
    c = Case(3, 6, 10, False)
    inp = c.inputs(seed, F32, 0.4)
    nc = dict(inp)
    nc["t_ca"] = inp["t_ca"].transpose(1, 2).contiguous().transpose(1, 2)
    nc["m_ca"] = torch.stack([inp["m_ca"], inp["m_ca"]], -1)[..., 1]
    nc["m_ka"] = inp["m_ka"][0].expand(c.B, c.C, c.C)  # one map broadcast over the batch (stride 0)
    assert not nc["t_ca"].is_contiguous() and not nc["m_ca"].is_contiguous() and nc["m_ka"].stride(0) == 0
    leaves = {k: v.detach().requires_grad_(True) for k, v in nc.items()}
    y = run(leaves, backend)
    y.sum().backward()  # stride-0 upstream gradient
    rl = {k: v.detach().double().contiguous().requires_grad_(True) for k, v in nc.items()}
    ry = ref64(rl)
    ry.sum().backward()
    T.assert_rel("out", y, ry, 1e-5)
    for k in KEYS:
        T.assert_rel(f"d{k}", leaves[k].grad, rl[k].grad, 1e-4)


@KERNEL_BACKENDS
@pytest.mark.parametrize("c", [Case(2, 35, 33, True), Case(3, 7, 9, False)], ids=_id)
def test_raw_ops_write_every_element(backend, c, seed):
    """NaN-poisoned allocations: every output element written, elementwise right, twice identical."""
    fwd, bwd = raw_ops(backend)
    inp = c.inputs(seed, F32, 0.6)
    g = T.gen(seed + 3)
    dy = T.randn(g, c.B, c.C, c.d)
    shapes = [torch.empty(c.B, c.C, c.d), torch.empty(c.B, c.C, c.C), inp["m_ka"]]
    T.poison_allocator(*shapes)
    out = fwd(*(inp[k] for k in KEYS))
    T.poison_allocator(*shapes)
    grads = bwd(dy, *(inp[k] for k in KEYS))
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()}
    ry = ref64(leaves)
    rgrads = torch.autograd.grad(ry, [leaves[k] for k in KEYS], dy.double())
    T.assert_elementwise("out", out, ry, 1e-4, 1e-5)
    for k, a, e in zip(KEYS, grads, rgrads):
        assert a.shape == inp[k].shape and a.dtype == inp[k].dtype, k
        T.assert_elementwise(f"d{k}", a, e, 1e-4, 1e-5)
    T.poison_allocator(*shapes)
    assert torch.equal(fwd(*(inp[k] for k in KEYS)), out)
    for a, b in zip(bwd(dy, *(inp[k] for k in KEYS)), grads):
        assert torch.equal(a, b), "backward is not deterministic"


@KERNEL_BACKENDS
@pytest.mark.parametrize("c,dtype", [(Case(2, 3, 5, True), F32), (Case(2, 4, 3, False), F64)],
                         ids=["shared-f32", "batched-f64"])
def test_opcheck(backend, c, dtype, seed):
    fwd, bwd = raw_ops(backend)
    inp = c.inputs(seed, dtype, 0.3)
    T.opcheck(fwd.default, tuple(inp[k].clone().requires_grad_(True) for k in KEYS))
    T.opcheck(fwd.default, tuple(inp[k] for k in KEYS))
    dy = T.randn(T.gen(seed + 1), c.B, c.C, c.d, dtype=dtype)
    T.opcheck(bwd.default, (dy, *(inp[k] for k in KEYS)))


@KERNEL_BACKENDS
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler, seed, clean_env):
    c = Case(2, 3, 5, True)
    inp = c.inputs(seed, F32, 0.3)

    def fn(m_ka, m_ca, t_ca, alpha):
        return (torch.tanh(ops.relation_aggregate(m_ka, m_ca, t_ca, alpha, backend=backend)) * 2,)

    T.compile_check(fn, inp, list(KEYS), compiler)


def test_default_backend_selection(seed, cpu_backend, clean_env):
    """auto / None pick the compiled kernel on CPU tensors; VLSSM_BACKEND=reference the reference."""
    import vlssm.ops.ifm as mod

    inp = Case(2, 8, 40, False).inputs(seed, F32, 0.3)
    calls = []

    def spy(*a):
        calls.append(1)
        return relation_aggregate_ref(*a)

    clean_env.setattr(mod, "relation_aggregate_ref", spy)
    want = run(inp, "cpu")
    assert torch.equal(run(inp, None), want) and torch.equal(run(inp, "auto"), want)
    assert not calls, "auto used the reference"
    clean_env.setenv("VLSSM_BACKEND", "reference")
    T.assert_rel("out", run(inp, None), want, 1e-6)
    assert len(calls) == 1, "VLSSM_BACKEND=reference did not use the reference"


# --------------------------------------------------------------------------
# Bad inputs

_B, _C, _D = 2, 3, 4


def _valid():
    return Case(_B, _C, _D, False).inputs(11, F32, 0.5)


BAD = [
    ("t_ca-rank2", ValueError, "t_ca", dict(t_ca=torch.randn(_C, _D))),
    ("t_ca-int", TypeError, "t_ca", dict(t_ca=torch.ones(_B, _C, _D, dtype=torch.int32))),
    ("t_ca-empty", ValueError, "t_ca", dict(t_ca=torch.randn(_B, 0, _D))),
    ("m_ka-shape", ValueError, "m_ka", dict(m_ka=torch.randn(_B, _C, _C + 1))),
    ("m_ka-shape2d", ValueError, "m_ka", dict(m_ka=torch.randn(_C, _C + 1))),
    ("m_ka-rank1", ValueError, "m_ka", dict(m_ka=torch.randn(_C))),
    ("m_ka-dtype", TypeError, "m_ka", dict(m_ka=torch.randn(_B, _C, _C, dtype=F64))),
    ("m_ka-list", TypeError, "m_ka", dict(m_ka=[[1.0]])),
    ("m_ca-shape", ValueError, "m_ca", dict(m_ca=torch.randn(_C, _C))),
    ("m_ca-dtype", TypeError, "m_ca", dict(m_ca=torch.randn(_B, _C, _C, dtype=torch.bfloat16))),
    ("m_ca-meta", ValueError, "m_ca", dict(m_ca=torch.empty(_B, _C, _C, device="meta"))),
    ("alpha-shape", ValueError, "alpha", dict(alpha=torch.tensor([0.5]))),
    ("alpha-int", TypeError, "alpha", dict(alpha=torch.tensor(1))),
    ("alpha-str", TypeError, "alpha", dict(alpha="0.5")),
    ("alpha-meta", ValueError, "alpha", dict(alpha=torch.empty((), device="meta"))),
]


@pytest.mark.parametrize("exc,name,over", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_public(backend, exc, name, over):
    T.check_raises(exc, name, run, {**_valid(), **over}, backend)


RAW_BAD = [b for b in BAD if isinstance(b[3].get(b[2], torch.empty(0)), torch.Tensor) and b[0] != "alpha-int"]


@pytest.mark.parametrize("exc,name,over", [b[1:] for b in RAW_BAD], ids=[b[0] for b in RAW_BAD])
@KERNEL_BACKENDS
def test_bad_inputs_raw(backend, exc, name, over):
    fwd, bwd = raw_ops(backend)
    a = {**_valid(), **over}
    T.check_raises(exc, name, fwd, *(a[k] for k in KEYS))
    T.check_raises(exc, name, bwd, _valid()["t_ca"], *(a[k] for k in KEYS))


@KERNEL_BACKENDS
def test_bad_grad_raw(backend):
    v = _valid()
    T.check_raises(ValueError, "grad", raw_ops(backend)[1], v["t_ca"][:, :1], *(v[k] for k in KEYS))


def test_bad_backend(seed):
    T.check_raises(ValueError, "backend", run, _valid(), "cuda")
