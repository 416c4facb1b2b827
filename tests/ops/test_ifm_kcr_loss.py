"""Tests of vlssm.ops.kcr_loss and its raw ops (cpu: torch.ops.vlssm.kcr_loss{,_backward};
triton: ..._triton, run by the interpreter without a GPU).

Ground truth: vlssm.reference.kcr_loss_ref in float64 on the same inputs upcast,
itself checked against ``1 - torch.nn.functional.cosine_similarity(...).mean()``
and an independent per-row loop.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple

import pytest
import torch
import torch.nn.functional as F

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import kcr_loss_ref

F32, F64 = torch.float32, torch.float64
KEYS = ("t_ka", "t_ca")

#: The kernel backends only, through the ``backend`` fixture (tests/ops/conftest.py: it skips the
#: missing one); a test without this mark runs every backend.
KERNEL_BACKENDS = pytest.mark.parametrize("backend", ["cpu", "triton"], indirect=True)


class Case(NamedTuple):
    ka: Tuple[int, ...]
    ca: Tuple[int, ...]

    def inputs(self, seed, dtype=F32):
        g = T.gen(seed)
        return dict(t_ka=T.randn(g, *self.ka, dtype=dtype), t_ca=T.randn(g, *self.ca, dtype=dtype, shift=0.3))


def _id(c: Case) -> str:
    return "x".join(map(str, c.ka)) + "-vs-" + "x".join(map(str, c.ca))


CASES = [
    Case((1, 1), (1, 1)),            # one row, d = 1
    Case((3, 1), (3, 1)),            # d = 1
    Case((5, 7), (5, 7)),            # no leading dims
    Case((5, 7), (2, 5, 7)),         # t_ka broadcast over the batch
    Case((2, 5, 7), (5, 7)),         # t_ca broadcast over the batch
    Case((1, 3, 40), (4, 3, 40)),    # size-1 batch dim broadcast
    Case((2, 1, 3, 9), (4, 3, 9)),   # both broadcast
    Case((1, 37), (3, 2, 37)),       # C = 1 against (3, 2)
    Case((2, 3, 4, 5, 6), (5, 6)),   # 4 leading dims
    Case((3, 33, 70), (3, 33, 70)),
]


def raw_ops(backend):
    """The raw (forward, backward) ops of a kernel backend."""
    return T.raw_op("kcr_loss", backend), T.raw_op("kcr_loss", backend, True)


def run(inp, backend, eps=1e-8):
    return ops.kcr_loss(inp["t_ka"], inp["t_ca"], eps, backend=backend)


def ref64(inp, eps=1e-8):
    return kcr_loss_ref(T.up(inp["t_ka"]), T.up(inp["t_ca"]), eps)


def literal(t_ka, t_ca, eps=1e-8):
    """Row loop over the broadcast, float64, independent of vlssm."""
    a, b = torch.broadcast_tensors(t_ka.double(), t_ca.double())
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    total = 0.0
    for x, y in zip(a, b):
        dot = sum(float(p) * float(q) for p, q in zip(x, y))
        nx = math.sqrt(sum(float(p) ** 2 for p in x))
        ny = math.sqrt(sum(float(q) ** 2 for q in y))
        total += 1 - dot / (max(nx, eps) * max(ny, eps))
    return torch.tensor(total / a.shape[0], dtype=F64)


def torch_cos(t_ka, t_ca, eps=1e-8):
    return 1 - F.cosine_similarity(t_ka, t_ca, dim=-1, eps=eps).mean()


def _check(name, actual, expected, tol):
    """assert_rel; where the expected value is exactly zero (d = 1: cos = +-1, constant), an absolute check."""
    if expected.double().norm() == 0:
        assert actual.shape == expected.shape and torch.isfinite(actual).all(), name
        assert float(actual.double().abs().max()) <= tol, f"{name}: {actual} != 0"
    else:
        T.assert_rel(name, actual, expected, tol)


def _zero_rows(inp):
    """Row 0 of t_ka all zeros, row 1 of t_ca tiny (|b| < eps); the other rows stay random."""
    inp = {k: v.clone() for k, v in inp.items()}
    inp["t_ka"][..., 0, :] = 0
    inp["t_ca"][..., 1, :] *= 1e-12
    return inp


# --------------------------------------------------------------------------
# Reference


@pytest.mark.parametrize("c", [CASES[0], CASES[2], CASES[3], CASES[6], CASES[7]], ids=_id)
def test_reference_matches_literal_and_torch(c, seed):
    inp = c.inputs(seed, F64)
    want = literal(**inp)
    T.assert_rel("loss", kcr_loss_ref(**inp), want, 1e-13)
    T.assert_rel("1 - F.cosine_similarity", torch_cos(**inp), want, 1e-13)


def test_reference_zero_rows_match_torch(seed):
    inp = _zero_rows(Case((2, 4, 6), (4, 6)).inputs(seed, F64))
    for eps in (1e-8, 1e-3):
        T.assert_rel("loss", kcr_loss_ref(**inp, eps=eps), torch_cos(**inp, eps=eps), 1e-13)
        T.assert_rel("loss", kcr_loss_ref(**inp, eps=eps), literal(**inp, eps=eps), 1e-13)


# --------------------------------------------------------------------------
# Forward and gradients


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", CASES, ids=_id)
def test_forward_and_gradients(backend, c, dtype, seed):
    inp = c.inputs(seed, dtype)
    outs, grads = T.grads_of(lambda **a: run(a, backend), inp, [torch.tensor(1.7, dtype=F64)])
    routs, rgrads = T.grads_of(lambda **a: ref64(a), T.up_all(inp), [torch.tensor(1.7, dtype=F64)])
    loss = outs[0]
    assert loss.dtype == dtype and loss.shape == ()
    _check("loss", loss, routs[0], T.FWD_TOL[dtype])
    _check("loss vs F.cosine_similarity", loss, torch_cos(*(T.up(inp[k]) for k in KEYS)), T.FWD_TOL[dtype])
    R = routs[0].new_zeros(torch.broadcast_shapes(c.ka[:-1], c.ca[:-1])).numel()
    for k in KEYS:
        assert grads[k].dtype == dtype and grads[k].shape == inp[k].shape, k
        if inp[k].shape[-1] == 1:  # cos = +-1 is constant: the gradient is zero up to rounding
            scale = float((1.7 / R / inp[k].double().abs()).max()) * R  # largest |d cos / dx| term, summed
            assert float(grads[k].double().abs().max()) <= 10 * torch.finfo(dtype).eps * scale, f"d{k} not ~0"
            continue
        _check(f"d{k}", grads[k], rgrads[k], T.GRAD_TOL[dtype])
        if rgrads[k].double().norm() > 0:
            fine = {F32: (1e-3, 1e-5), F64: (1e-8, 1e-11)}[dtype]
            T.assert_elementwise(f"d{k}", grads[k], rgrads[k], *fine)


@pytest.mark.parametrize("eps", [1e-8, 1e-3])
@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_zero_rows(backend, dtype, eps, seed):
    """|a| = 0 and 0 < |b| < eps: finite, equal to the reference (and to F.cosine_similarity)."""
    inp = _zero_rows(Case((2, 4, 6), (4, 6)).inputs(seed, dtype))
    outs, grads = T.grads_of(lambda **a: run(a, backend, eps), inp, [torch.tensor(1.0, dtype=F64)])
    routs, rgrads = T.grads_of(lambda **a: ref64(a, eps), T.up_all(inp), [torch.tensor(1.0, dtype=F64)])
    T.assert_rel("loss", outs[0], routs[0], T.FWD_TOL[dtype])
    T.assert_rel("loss vs F.cosine_similarity", outs[0], torch_cos(*(T.up(inp[k]) for k in KEYS), eps=eps),
                 T.FWD_TOL[dtype])
    for k in KEYS:
        T.assert_rel(f"d{k}", grads[k], rgrads[k], T.GRAD_TOL[dtype])
    assert torch.isfinite(grads["t_ka"][:, 0]).all()


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@KERNEL_BACKENDS
@pytest.mark.parametrize("c", [Case((9, 20), (3, 9, 20)), Case((2, 5, 33), (5, 33))], ids=_id)
def test_half(c, backend, dtype, seed):
    """The loss is float32 (accumulated in float32); gradients within 2x the same-precision reference error."""
    inp = c.inputs(seed, dtype)
    cot = [torch.tensor(1.0)]
    outs, grads = T.grads_of(lambda **a: run(a, backend), inp, cot)
    souts, same = T.grads_of(lambda **a: kcr_loss_ref(**a), inp, cot)
    routs, exact = T.grads_of(lambda **a: ref64(a), T.up_all(inp), cot)
    assert outs[0].dtype == F32 and souts[0].dtype == F32
    T.assert_rel("loss", outs[0], routs[0], 1e-5)  # float32 accuracy of the bf16 / fp16 inputs
    for k in KEYS:
        assert grads[k].dtype == dtype, k
        T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


@pytest.mark.parametrize("c", [Case((3, 4), (2, 3, 4)), Case((2, 1, 3, 4), (2, 3, 4)), Case((3, 1), (3, 1))],
                         ids=_id)
def test_gradcheck(c, seed, cpu_backend):
    T.gradcheck(lambda a: run(a, cpu_backend), c.inputs(seed, F64), cpu_backend)


# --------------------------------------------------------------------------
# Layouts, raw ops, determinism


@KERNEL_BACKENDS
def test_strided_and_expanded_inputs(backend, seed):
    inp = Case((2, 5, 8), (2, 5, 8)).inputs(seed, F32)
    nc = {"t_ka": inp["t_ka"][0].expand(3, 5, 8),                                  # stride-0 batch
          "t_ca": torch.stack([inp["t_ca"][0]] * 3, -1).transpose(0, 1)[:, :, 1]}   # (3, 5, 8) non-contiguous
    nc["t_ca"] = torch.cat([inp["t_ca"], inp["t_ca"][:1]]).transpose(1, 2).contiguous().transpose(1, 2)
    assert nc["t_ka"].stride(0) == 0 and not nc["t_ca"].is_contiguous()
    leaves = {k: v.detach().requires_grad_(True) for k, v in nc.items()}
    run(leaves, backend).backward()
    rl = {k: v.detach().double().contiguous().requires_grad_(True) for k, v in nc.items()}
    ref64(rl).backward()
    for k in KEYS:
        T.assert_rel(f"d{k}", leaves[k].grad, rl[k].grad, 1e-4)


@KERNEL_BACKENDS
@pytest.mark.parametrize("c", [Case((5, 7), (3, 5, 7)), Case((2, 1, 20, 40), (3, 20, 40))], ids=_id)
def test_raw_ops_write_every_element(backend, c, seed):
    """NaN-poisoned allocations: loss, stats and gradients right elementwise, twice identical."""
    fwd, bwd = raw_ops(backend)
    inp = c.inputs(seed, F32)
    rows = torch.broadcast_shapes(c.ka[:-1], c.ca[:-1])
    T.poison_allocator(torch.empty(*rows, 3), *inp.values())
    loss, stats = fwd(inp["t_ka"], inp["t_ca"], 1e-8)
    a, b = torch.broadcast_tensors(inp["t_ka"].double(), inp["t_ca"].double())
    want = torch.stack([(a * b).sum(-1), a.norm(dim=-1), b.norm(dim=-1)], -1)
    assert stats.shape == (*rows, 3) and stats.dtype == F32
    T.assert_elementwise("stats", stats, want, 1e-5, 1e-6)
    T.assert_rel("loss", loss, ref64(inp), 1e-5)
    gl = torch.tensor(0.7)
    T.poison_allocator(*inp.values())
    grads = bwd(gl, inp["t_ka"], inp["t_ca"], stats, 1e-8)
    leaves = {k: v.detach().double().requires_grad_(True) for k, v in inp.items()}
    rgrads = torch.autograd.grad(ref64(leaves) * 0.7, [leaves[k] for k in KEYS])
    for k, g, e in zip(KEYS, grads, rgrads):
        assert g.shape == inp[k].shape, k
        T.assert_elementwise(f"d{k}", g, e, 1e-3, 1e-5)
    l2, s2 = fwd(inp["t_ka"], inp["t_ca"], 1e-8)
    assert torch.equal(l2, loss) and torch.equal(s2, stats)
    for g, g2 in zip(grads, bwd(gl, inp["t_ka"], inp["t_ca"], stats, 1e-8)):
        assert torch.equal(g, g2), "backward is not deterministic"


def test_cpu_deterministic_across_thread_counts(seed, cpu_backend):
    inp = Case((64, 50), (7, 64, 50)).inputs(seed, F32)

    def both():
        leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
        loss = run(leaves, cpu_backend)
        loss.backward()
        return [loss.detach()] + [leaves[k].grad for k in KEYS]

    T.assert_deterministic(both)


@KERNEL_BACKENDS
@pytest.mark.parametrize("c,dtype", [(Case((3, 4), (2, 3, 4)), F32), (Case((2, 3, 5), (3, 5)), F64)],
                         ids=["ka-bcast-f32", "ca-bcast-f64"])
def test_opcheck(backend, c, dtype, seed):
    fwd, bwd = raw_ops(backend)
    inp = c.inputs(seed, dtype)
    T.opcheck(fwd.default, (inp["t_ka"].clone().requires_grad_(True), inp["t_ca"].clone().requires_grad_(True), 1e-8))
    T.opcheck(fwd.default, (inp["t_ka"], inp["t_ca"], 1e-8))
    _, stats = fwd(inp["t_ka"], inp["t_ca"], 1e-8)
    T.opcheck(bwd.default, (torch.tensor(0.5, dtype=dtype), inp["t_ka"], inp["t_ca"], stats, 1e-8))


@KERNEL_BACKENDS
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend, compiler, seed, clean_env):
    inp = Case((3, 4), (2, 3, 4)).inputs(seed, F32)

    def fn(t_ka, t_ca):
        return (ops.kcr_loss(torch.tanh(t_ka), t_ca * 2, backend=backend) * 3,)

    T.compile_check(fn, inp, list(KEYS), compiler)


# --------------------------------------------------------------------------
# Bad inputs


def _valid():
    return Case((3, 4), (2, 3, 4)).inputs(11, F32)


BAD = [
    ("t_ka-rank1", ValueError, "t_ka", dict(t_ka=torch.randn(4))),
    ("t_ca-rank1", ValueError, "t_ca", dict(t_ca=torch.randn(4))),
    ("t_ka-int", TypeError, "t_ka", dict(t_ka=torch.ones(3, 4, dtype=torch.int64))),
    ("t_ka-list", TypeError, "t_ka", dict(t_ka=[[1.0]])),
    ("t_ca-dtype", TypeError, "t_ca", dict(t_ca=torch.randn(2, 3, 4, dtype=F64))),
    ("t_ca-dim", ValueError, "t_ca", dict(t_ca=torch.randn(2, 3, 5))),
    ("t_ca-bcast", ValueError, "t_ca", dict(t_ca=torch.randn(2, 4, 4))),
    ("t_ca-empty", ValueError, "t_ca", dict(t_ca=torch.randn(0, 3, 4))),
    ("t_ca-meta", ValueError, "t_ca", dict(t_ca=torch.empty(2, 3, 4, device="meta"))),
]


@pytest.mark.parametrize("exc,name,over", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_public(backend, exc, name, over):
    T.check_raises(exc, name, run, {**_valid(), **over}, backend)


def test_bad_eps(backend):
    T.check_raises(ValueError, "eps", run, _valid(), backend, -1.0)
    T.check_raises(TypeError, "eps", run, _valid(), backend, "1e-8")


RAW_BAD = [b for b in BAD if b[0] not in ("t_ka-list", "t_ca-empty")]


@pytest.mark.parametrize("exc,name,over", [b[1:] for b in RAW_BAD], ids=[b[0] for b in RAW_BAD])
@KERNEL_BACKENDS
def test_bad_inputs_raw(backend, exc, name, over):
    fwd, bwd = raw_ops(backend)
    a = {**_valid(), **over}
    T.check_raises(exc, name, fwd, a["t_ka"], a["t_ca"], 1e-8)
    T.check_raises(exc, name, bwd, torch.tensor(1.0), a["t_ka"], a["t_ca"], torch.zeros(2, 3, 3), 1e-8)


@KERNEL_BACKENDS
def test_bad_stats_and_grad_raw(backend):
    v = _valid()
    bwd = raw_ops(backend)[1]
    T.check_raises(ValueError, "stats", bwd, torch.tensor(1.0), v["t_ka"], v["t_ca"], torch.zeros(3, 3), 1e-8)
    T.check_raises(ValueError, "grad", bwd, torch.ones(2), v["t_ka"], v["t_ca"], torch.zeros(2, 3, 3), 1e-8)
