"""Tests of vlssm.ops.selective_scan and torch.ops.vlssm.selective_scan{,_backward}.

Ground truth: vlssm.reference.selective_scan_ref in float64 on the same inputs
upcast, itself checked against an independent literal step loop (and against
mamba_ssm's reference when mamba_ssm imports).
"""
from __future__ import annotations

import sys
import types
from typing import NamedTuple

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import selective_scan_ref

F32, F64 = torch.float32, torch.float64


class Case(NamedTuple):
    b: int
    dim: int
    L: int
    N: int
    reverse: bool = False
    has_D: bool = True
    has_z: bool = True
    has_bias: bool = True
    has_h0: bool = False
    softplus: bool = True
    A_style: str = "exp"

    def inputs(self, seed, dtype=F32):
        return T.scan_inputs(seed, self.b, self.dim, self.L, self.N, dtype, has_D=self.has_D, has_z=self.has_z,
                             has_bias=self.has_bias, has_h0=self.has_h0, softplus=self.softplus,
                             A_style=self.A_style)


def _id(c: Case) -> str:
    opts = "".join(k for k, on in (("D", c.has_D), ("z", c.has_z), ("b", c.has_bias), ("h", c.has_h0)) if on)
    return (f"b{c.b}-d{c.dim}-l{c.L}-n{c.N}{'-rev' if c.reverse else ''}-{opts or 'none'}"
            f"{'-sp' if c.softplus else ''}-{c.A_style}")


FWD_CASES = [
    Case(1, 1, 1, 1, False, False, False, False, False, False),
    Case(1, 1, 1, 1, True, True, True, True, True, True, "arange"),
    Case(2, 3, 7, 2, True, True, True, True, True, True),
    Case(1, 5, 64, 16, False, True, True, False, False, True, "arange"),
    Case(2, 63, 65, 4, True, False, False, True, True, False),
    Case(3, 33, 129, 3, False, True, True, True, True, True),
    Case(2, 4, 128, 8, True, False, True, False, False, True, "arange"),
    Case(1, 2, 200, 5, True, False, False, False, True, False),
    Case(2, 64, 31, 1, False, True, False, True, True, True, "arange"),
    Case(1, 65, 20, 7, True, True, True, True, False, True),
    Case(2, 3, 9, 12, False, True, True, True, True, False, "arange"),
]
LONG_CASES = [  # fp32 only: the float64 reference loops over L in Python
    Case(1, 3, 2048, 4, False, True, True, True, True, True),
    Case(1, 1, 2048, 16, True, True, False, True, False, True, "arange"),
]
HALF_CASES = [
    Case(2, 3, 7, 2, True, True, True, True, True, True),
    Case(1, 5, 64, 16, False, True, True, False, False, True, "arange"),
    Case(2, 33, 129, 3, False, True, True, True, True, True),
    Case(1, 4, 300, 8, True, False, True, True, False, True),
]
GRAD_CASES = [
    Case(1, 1, 1, 1, False, False, False, False, False, False),
    Case(2, 3, 7, 2, True, True, True, True, True, True),
    Case(1, 5, 70, 16, False, True, True, True, True, True, "arange"),
    Case(2, 33, 130, 4, True, True, False, True, False, False),
    Case(3, 5, 65, 3, False, False, True, False, True, True),
    Case(1, 3, 129, 5, True, True, True, False, True, True, "arange"),
]


def run(inp, c: Case, backend, return_last_state=True, **over):
    a = {**inp, **over}
    return ops.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                              c.softplus, return_last_state, reverse=c.reverse,
                              initial_state=a["initial_state"], backend=backend)


def ref64(inp, c: Case, return_last_state=True):
    a = {k: T.up(v) for k, v in inp.items()}
    return selective_scan_ref(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                              c.softplus, return_last_state, reverse=c.reverse, initial_state=a["initial_state"])


def ref_same(inp, c: Case):
    return selective_scan_ref(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                              inp["delta_bias"], c.softplus, True, reverse=c.reverse,
                              initial_state=inp["initial_state"])


def raw_op(backend: str, backward: bool = False):
    return T.raw_op("selective_scan", backend, backward)


def _small(c: Case, steps: int = 140) -> bool:
    """Cheap enough for the Triton interpreter: scan steps times blocks of 64 channels."""
    return c.b * c.L * -(-c.dim // 64) <= steps


def raw(inp, c: Case, backend="cpu"):
    return raw_op(backend)(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                           inp["delta_bias"], inp["initial_state"], c.softplus, c.reverse)


# --------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("c", [FWD_CASES[1], FWD_CASES[2], FWD_CASES[4], FWD_CASES[7],
                               Case(2, 3, 11, 4, False, True, True, True, True, True, "arange")], ids=_id)
def test_reference_matches_literal_loop(c, seed):
    inp = c.inputs(seed, F64)
    out, last = ref64(inp, c)
    lit, lit_last = T.literal_selective_scan(**inp, delta_softplus=c.softplus, reverse=c.reverse)
    T.assert_rel("out", out, lit, 1e-13)
    T.assert_rel("last_state", last, lit_last, 1e-13)
    assert out.dtype == F64 and last.dtype == F64


def test_reference_keeps_dtypes_and_rounds_half(seed):
    c = Case(2, 3, 9, 4)
    inp = c.inputs(seed, torch.bfloat16)
    out, last = ref_same(inp, c)
    assert out.dtype == torch.bfloat16 and last.dtype == F32
    exact, exact_last = ref64(inp, c)
    assert 0 < T.rel_err(out, exact) < 4e-3  # one bf16 rounding of a float32 computation
    T.assert_rel("last_state", last, exact_last, 1e-5)


# --------------------------------------------------------------------------
# Forward vs the float64 reference


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", FWD_CASES, ids=_id)
def test_forward(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c, 70))
    inp = c.inputs(seed, dtype)
    out, last = run(inp, c, kernel_backend)
    ref, ref_last = ref64(inp, c)
    assert out.dtype == dtype and out.shape == (c.b, c.dim, c.L)
    assert last.dtype == T.acc_dtype(dtype) and last.shape == (c.b, c.dim, c.N)
    T.assert_rel("out", out, ref, T.FWD_TOL[dtype])
    T.assert_rel("last_state", last, ref_last, T.FWD_TOL[dtype])
    T.assert_elementwise("out", out, ref, *T.ELEMENTWISE_TOL[dtype])
    T.assert_elementwise("last_state", last, ref_last, *T.ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("c", LONG_CASES, ids=_id)
def test_forward_long(c, seed, cpu_backend):
    inp = c.inputs(seed, F32)
    out, last = run(inp, c, cpu_backend)
    ref, ref_last = ref64(inp, c)
    T.assert_rel("out", out, ref, 1e-5)
    T.assert_rel("last_state", last, ref_last, 1e-5)
    T.assert_elementwise("out", out, ref, 1e-4, 1e-5)


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", HALF_CASES, ids=_id)
def test_forward_half(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, dtype)
    out, last = run(inp, c, kernel_backend)
    assert out.dtype == dtype and last.dtype == F32
    ref, ref_last = ref64(inp, c)
    same, same_last = ref_same(inp, c)
    T.assert_half_rule("out", out, same, ref)
    # the state is kept in float32 by both: compare it at float32 accuracy
    T.assert_rel("last_state", last, ref_last, 1e-5)
    T.assert_elementwise("out", out, ref, 2e-2, 2e-2)


@pytest.mark.parametrize("c", [FWD_CASES[2], FWD_CASES[5], Case(2, 40, 150, 5, True, True, True, True, True),
                               Case(1, 3, 70, 4, True, True, True, True, True, True)], ids=_id)
def test_raw_op_writes_every_element(c, seed, kernel_backend):
    """out, last_state and checkpoints of the raw op: finite, elementwise right, twice identical.

    checkpoints[:, :, k] is documented as the state before scan step 64 k (in scan order).
    """
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, F32)
    nck = -(-c.L // 64)
    shapes = [torch.empty(c.b, c.dim, c.L), torch.empty(c.b, c.dim, c.N), torch.empty(c.b, c.dim, nck, c.N)]
    T.poison_allocator(*shapes)
    out, last, ck = raw(inp, c, kernel_backend)
    assert ck.shape == (c.b, c.dim, nck, c.N) and ck.dtype == F32
    ref, ref_last = ref64(inp, c)
    T.assert_elementwise("out", out, ref, 1e-4, 1e-5)
    T.assert_elementwise("last_state", last, ref_last, 1e-4, 1e-5)
    for k in range(nck):
        steps = 64 * k
        if steps == 0:
            want = inp["initial_state"] if inp["initial_state"] is not None else torch.zeros(c.b, c.dim, c.N)
        else:
            sl = slice(c.L - steps, c.L) if c.reverse else slice(0, steps)
            part = {kk: (v[..., sl] if kk in ("u", "delta", "B", "C", "z") and v is not None else v)
                    for kk, v in inp.items()}
            _, want = ref64(part, c)
        T.assert_elementwise(f"checkpoints[:, :, {k}]", ck[:, :, k], want.float(), 1e-4, 1e-5)
    T.poison_allocator(*shapes)
    out2, last2, ck2 = raw(inp, c, kernel_backend)
    assert torch.equal(out, out2) and torch.equal(last, last2) and torch.equal(ck, ck2)


def test_softplus_threshold(seed, kernel_backend):
    """delta + delta_bias around mamba_ssm's softplus threshold 20 (identity above)."""
    c = Case(2, 4, 40, 3, True, True, True, True, True, True)
    inp = c.inputs(seed, F64)
    g = T.gen(seed + 1)
    inp["delta"] = 19 + 2 * torch.rand(c.b, c.dim, c.L, generator=g, dtype=F64)
    inp["A"] = -0.01 * torch.rand(c.dim, c.N, generator=g, dtype=F64) - 1e-3
    inp["delta_bias"] = 0.5 * torch.randn(c.dim, generator=g, dtype=F64)
    cot = [T.randn(g, c.b, c.dim, c.L, dtype=F64), T.randn(g, c.b, c.dim, c.N, dtype=F64)]
    outs, grads = T.grads_of(lambda **a: run(a, c, kernel_backend), inp, cot)
    routs, rgrads = T.grads_of(lambda **a: ref64(a, c), inp, cot)
    for n, a, e in zip(("out", "last_state"), outs, routs):
        T.assert_rel(n, a, e, 1e-12)
    for k in grads:
        T.assert_rel(f"d{k}", grads[k], rgrads[k], 1e-10)


# --------------------------------------------------------------------------
# Gradients


def _grad_check(c, dtype, seed, backend, use_out=True, use_last=True):
    inp = c.inputs(seed, dtype)
    g = T.gen(seed + 7)
    cot = [T.randn(g, c.b, c.dim, c.L, dtype=F64) * (1.0 if use_out else 0.0),
           T.randn(g, c.b, c.dim, c.N, dtype=F64) * (1.0 if use_last else 0.0)]

    def fn(**a):
        out, last = run(a, c, backend)
        return (out if use_out else out.detach()), (last if use_last else last.detach())

    outs, grads = T.grads_of(fn, inp, cot)
    routs, rgrads = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)  # float64 leaves
    return inp, grads, rgrads


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", GRAD_CASES, ids=_id)
def test_gradients(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c, 100))
    inp, grads, rgrads = _grad_check(c, dtype, seed, kernel_backend)
    T.assert_grads(grads, rgrads, inp, T.GRAD_TOL[dtype])


@pytest.mark.parametrize("use_out,use_last", [(False, True), (True, False)], ids=["only-last", "only-out"])
def test_gradients_one_output(use_out, use_last, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, use_last)
    c = Case(2, 5, 70, 3, True, True, True, True, True, True)
    inp, grads, rgrads = _grad_check(c, F64, seed, kernel_backend, use_out, use_last)
    assert set(grads) == set(rgrads) == {k for k, v in inp.items() if v is not None}
    for k in grads:
        if rgrads[k].norm() == 0:  # e.g. dz when only last_state is used
            assert grads[k].norm() == 0, f"d{k} must be zero"
        else:
            T.assert_rel(f"d{k}", grads[k], rgrads[k], 1e-10)


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
def test_gradients_half(dtype, seed, kernel_backend):
    """Every gradient within 2x the error of the same-precision reference autograd (+ eps)."""
    c = Case(2, 5, 40, 4, True, True, True, True, True, True)
    inp = c.inputs(seed, dtype)
    g = T.gen(seed + 7)
    cot = [T.randn(g, c.b, c.dim, c.L, dtype=dtype), T.randn(g, c.b, c.dim, c.N, dtype=F32)]
    _, grads = T.grads_of(lambda **a: run(a, c, kernel_backend), inp, cot)
    _, same = T.grads_of(lambda **a: ref_same(a, c), inp, cot)
    _, exact = T.grads_of(lambda **a: ref64(a, c), T.up_all(inp), cot)  # float64 leaves
    for k in grads:
        assert grads[k].dtype == inp[k].dtype, k
        if inp[k].dtype == F32:  # float32 parameter grads: both accumulate in float32
            T.assert_rel(f"d{k}", grads[k], exact[k], 1e-4)
        else:
            T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


GRADCHECK_CASES = [
    Case(1, 2, 5, 2, False, True, True, True, True, True),
    Case(2, 2, 4, 3, True, True, True, True, True, True, "arange"),
    Case(1, 3, 6, 1, False, False, False, False, False, False),
    Case(1, 2, 3, 2, True, False, True, False, True, False),
    Case(1, 1, 70, 1, True, True, False, True, True, True),  # crosses the 64-step checkpoint
]


@pytest.mark.parametrize("c", GRADCHECK_CASES, ids=_id)
def test_gradcheck(c, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.L < 64 and c.has_D)
    T.gradcheck(lambda a: run(a, c, kernel_backend), c.inputs(seed, F64), kernel_backend)


# --------------------------------------------------------------------------
# Registration: opcheck, torch.compile


OPCHECK_CASES = [
    (Case(2, 3, 7, 4, True, True, True, True, True, True), F32, True),
    (Case(1, 2, 70, 3, False, False, False, False, False, False), F32, False),
    (Case(2, 3, 5, 2, False, True, True, True, True, False), F64, True),
    (Case(1, 4, 6, 2, True, False, True, False, False, True), F64, False),
]


@pytest.mark.parametrize("c,dtype,requires_grad", OPCHECK_CASES,
                         ids=[f"{_id(c)}-{d}-{'grad' if r else 'nograd'}" for c, d, r in OPCHECK_CASES])
def test_opcheck_forward(c, dtype, requires_grad, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c) and requires_grad)
    inp = c.inputs(seed, dtype)
    args = [None if inp[k] is None else inp[k].clone().requires_grad_(requires_grad) for k in T.SCAN_KEYS]
    T.opcheck(raw_op(kernel_backend).default, (*args, c.softplus, c.reverse))


@pytest.mark.parametrize("c,dtype,with_dlast", [
    (Case(2, 3, 7, 4, True, True, True, True, True, True), F32, True),
    (Case(1, 2, 70, 3, False, False, False, False, False, False), F64, False),
    (Case(2, 3, 5, 2, False, True, False, True, True, False), F64, True),
], ids=["all-f32", "none-f64-L70", "some-f64"])
def test_opcheck_backward(c, dtype, with_dlast, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.L < 64)
    inp = c.inputs(seed, dtype)
    _, _, ck = raw(inp, c, kernel_backend)
    g = T.gen(seed + 3)
    dout = T.randn(g, c.b, c.dim, c.L, dtype=dtype)
    dlast = T.randn(g, c.b, c.dim, c.N, dtype=T.acc_dtype(dtype)) if with_dlast else None
    args = (dout, dlast, *[inp[k] for k in T.SCAN_KEYS], ck, c.softplus, c.reverse)
    T.opcheck(raw_op(kernel_backend, True).default, args)


@pytest.mark.parametrize("api,c", [
    ("public", Case(2, 3, 9, 4, True, True, True, True, True, True)),
    ("raw", Case(2, 3, 9, 4, True, True, True, True, True, True)),
    ("public", Case(1, 2, 70, 3, False, False, False, False, False, False)),
], ids=["public-all", "raw-all", "public-none-L70"])
def test_compile_fullgraph_aot_eager(api, c, seed, kernel_backend, clean_env):
    T.skip_slow_triton(kernel_backend, api == "public" and c.L < 64)
    inp = c.inputs(seed, F32)
    names = [k for k in T.SCAN_KEYS if inp[k] is not None]

    def fn(*xs):
        a = {**dict.fromkeys(T.SCAN_KEYS), **dict(zip(names, xs))}
        if api == "public":
            out, last = ops.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                           a["delta_bias"], c.softplus, True, reverse=c.reverse,
                                           initial_state=a["initial_state"], backend=kernel_backend)
        else:
            out, last, _ = raw_op(kernel_backend)(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"],
                                                  a["delta_bias"], a["initial_state"], c.softplus, c.reverse)
        return torch.tanh(out) * 2, last * 3

    T.compile_check(fn, inp, names, "aot_eager")


def test_compile_fullgraph_inductor(seed, cpu_backend, clean_env):
    c = Case(1, 2, 5, 2, False, True, True, True, False, True)
    inp = c.inputs(seed, F32)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

    def fn(u, delta, A, B, C, D, z, delta_bias):
        return (ops.selective_scan(u, delta, A, B, C, D, z, delta_bias, True) + 1,)

    T.compile_check(fn, inp, names, "inductor", tol=1e-5)


# --------------------------------------------------------------------------
# Determinism, layouts, dtypes of parameters


def _fwd_bwd(inp, c, backend):
    g = T.gen(5)
    cot = [T.randn(g, c.b, c.dim, c.L), T.randn(g, c.b, c.dim, c.N)]
    outs, grads = T.grads_of(lambda **a: run(a, c, backend), inp, cot)
    return outs + [grads[k] for k in sorted(grads)]


def test_deterministic_and_thread_count_independent(seed, cpu_backend):
    c = Case(3, 70, 150, 5, True, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    T.assert_deterministic(lambda: _fwd_bwd(inp, c, cpu_backend))


def _noncontig(inp, c):
    """Same values, other layouts: token-major transposes, slices of wider tensors, strided params."""
    b, dim, L, N = c.b, c.dim, c.L, c.N
    nc = {}
    xz = torch.empty(b, L, 2 * dim + 1)                 # in_proj output (token-major), sliced like mamba
    xz[..., :dim] = inp["u"].transpose(1, 2)
    xz[..., dim + 1:] = inp["z"].transpose(1, 2)
    nc["u"] = xz[..., :dim].transpose(1, 2)
    nc["z"] = xz[..., dim + 1:].transpose(1, 2)
    dl = torch.empty(b, dim, 2 * L)
    dl[..., ::2] = inp["delta"]
    nc["delta"] = dl[..., ::2]                            # step-2 slice along L
    xdbl = torch.empty(b, L, 3 + 2 * N)                  # x_proj output: [dt | B | C]
    xdbl[..., 3:3 + N] = inp["B"].transpose(1, 2)
    xdbl[..., 3 + N:] = inp["C"].transpose(1, 2)
    nc["B"] = xdbl[..., 3:3 + N].transpose(1, 2)
    nc["C"] = xdbl[..., 3 + N:].transpose(1, 2)
    nc["A"] = inp["A"].t().contiguous().t()
    nc["D"] = torch.stack([inp["D"], inp["D"]], 1)[:, 0]
    nc["delta_bias"] = torch.stack([inp["delta_bias"], inp["delta_bias"]], 1)[:, 1]
    nc["initial_state"] = inp["initial_state"].transpose(1, 2).contiguous().transpose(1, 2)
    for k, v in nc.items():
        assert torch.equal(v, inp[k]) and not v.is_contiguous(), k
    return nc


def test_noncontiguous_inputs(seed, kernel_backend):
    c = Case(2, 5, 70, 3, True, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    nc = _noncontig(inp, c)
    g = T.gen(seed + 1)
    cot = [T.randn(g, c.b, c.dim, c.L), T.randn(g, c.b, c.dim, c.N)]
    T.assert_layout_invariant(lambda **a: run(a, c, kernel_backend), inp, nc, cot, ("out", "last_state"))


def test_batch_broadcast_views(seed, kernel_backend):
    """B, C and z shared by the batch as stride-0 expand views."""
    c = Case(3, 4, 33, 5, False, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    g = T.gen(seed + 2)
    for k, shape in (("B", (1, c.N, c.L)), ("C", (1, c.N, c.L)), ("z", (1, c.dim, c.L))):
        inp[k] = T.randn(g, *shape).expand(c.b, *shape[1:])
        assert inp[k].stride(0) == 0
    out, last = run(inp, c, kernel_backend)
    dense = {k: (None if v is None else v.contiguous()) for k, v in inp.items()}
    out_d, last_d = run(dense, c, kernel_backend)
    assert torch.equal(out, out_d) and torch.equal(last, last_d)
    ref, _ = ref64(inp, c)
    T.assert_rel("out", out, ref, 1e-5)


def test_parameter_dtypes_are_cast(seed, kernel_backend):
    """A, D, delta_bias, initial_state of any floating dtype are used in float32 (fp32 inputs)."""
    c = Case(2, 3, 20, 4, True, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    odd = dict(inp, A=inp["A"].double(), D=inp["D"].half(), delta_bias=inp["delta_bias"].bfloat16(),
               initial_state=inp["initial_state"].double())
    cast = {k: (v.float() if k in ("A", "D", "delta_bias", "initial_state") else v) for k, v in odd.items()}
    out, last = run(odd, c, kernel_backend)
    out_c, last_c = run(cast, c, kernel_backend)
    assert torch.equal(out, out_c) and torch.equal(last, last_c) and last.dtype == F32
    leaves = {k: v.clone().requires_grad_(True) for k, v in odd.items()}
    o, l_ = run(leaves, c, kernel_backend)
    (o.sum() + l_.sum()).backward()
    for k in ("A", "D", "delta_bias", "initial_state"):
        assert leaves[k].grad.dtype == odd[k].dtype, k


# --------------------------------------------------------------------------
# Backends


def test_backends_agree(seed, kernel_backend):
    c = Case(2, 7, 70, 6, True, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    out_c, last_c = run(inp, c, kernel_backend)
    out_r, last_r = run(inp, c, "reference")
    assert out_r.dtype == out_c.dtype == F32
    T.assert_rel("out", out_c, out_r, 1e-5)
    T.assert_rel("last_state", last_c, last_r, 1e-5)


def test_default_backend_selection(seed, cpu_backend, clean_env):
    c = Case(2, 8, 40, 4, False)
    inp = c.inputs(seed, F32)
    T.assert_backend_selection(lambda be: run(inp, c, be)[0], clean_env)


def test_reference_backend_without_extension(seed):
    """backend="reference" is the float64 reference (works whether or not _C is built)."""
    c = Case(2, 3, 12, 4, True, True, True, True, True, True)
    inp = c.inputs(seed, F64)
    out, last = run(inp, c, "reference")
    lit, lit_last = T.literal_selective_scan(**inp, delta_softplus=c.softplus, reverse=c.reverse)
    T.assert_rel("out", out, lit, 1e-13)
    T.assert_rel("last_state", last, lit_last, 1e-13)


def _mamba_ssm_selective_scan_ref():
    """mamba_ssm's pure-PyTorch selective_scan_ref, or skip.

    Its module imports the CUDA extension selective_scan_cuda at the top; on a
    CPU-only install that import fails although the reference needs no CUDA. Then
    it is imported with a stub in place of the extension, and the stub and the
    mamba_ssm modules are removed again so no other test sees a half-working mamba_ssm.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
        return selective_scan_ref
    except ModuleNotFoundError as e:
        if e.name != "selective_scan_cuda":
            pytest.skip(f"mamba_ssm is not importable: {e}")
    except Exception as e:  # pragma: no cover - broken install
        pytest.skip(f"mamba_ssm is not importable: {type(e).__name__}: {e}")
    before = set(sys.modules)
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception as e:
        pytest.skip(f"mamba_ssm is not importable even with selective_scan_cuda stubbed: {type(e).__name__}: {e}")
    finally:
        for name in set(sys.modules) - before:
            if name == "selective_scan_cuda" or name.split(".")[0] == "mamba_ssm":
                del sys.modules[name]
    return selective_scan_ref


def test_matches_mamba_ssm_reference(seed):
    """Same function as mamba_ssm's selective_scan_ref (which computes in float32)."""
    mamba_ref = _mamba_ssm_selective_scan_ref()
    for i, c in enumerate([Case(2, 3, 17, 4), Case(1, 5, 70, 16, False, False, False, False),
                           Case(2, 4, 9, 3, False, True, True, True, False, False, "arange")]):
        inp = c.inputs(seed + i, F32)
        want, want_last = mamba_ref(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], inp["D"], inp["z"],
                                    inp["delta_bias"], c.softplus, True)
        exact, exact_last = ref64(inp, c)
        T.assert_rel("mamba_ssm out vs float64 reference", want, exact, 1e-5)
        T.assert_rel("mamba_ssm last_state vs float64 reference", want_last, exact_last, 1e-5)
        for be in ["reference"] + (["cpu"] if T.HAS_EXT else []):
            out, last = run(inp, c, be)
            T.assert_rel(f"{be} out", out, want, 1e-5)
            T.assert_rel(f"{be} last_state", last, want_last, 1e-5)


# --------------------------------------------------------------------------
# Bad inputs


ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "delta_softplus", "reverse",
             "backend", "return_last_state")
BAD_B, BAD_D, BAD_L, BAD_N = 2, 3, 5, 4


def _valid():
    return T.scan_inputs(11, BAD_B, BAD_D, BAD_L, BAD_N, F32, has_h0=True)


BAD = [
    # (id, exception, argument named, overrides)
    ("u-rank2", ValueError, "u", dict(u=torch.randn(BAD_B, BAD_D))),
    ("u-rank4", ValueError, "u", dict(u=torch.randn(BAD_B, BAD_D, BAD_L, 1))),
    ("delta-shape", ValueError, "delta", dict(delta=torch.rand(BAD_B, BAD_D, BAD_L + 1))),
    ("delta-batch", ValueError, "delta", dict(delta=torch.rand(BAD_B + 1, BAD_D, BAD_L))),
    ("A-rank", ValueError, "A", dict(A=-torch.rand(BAD_D))),
    ("A-dim", ValueError, "A", dict(A=-torch.rand(BAD_D + 1, BAD_N))),
    ("B-dstate", ValueError, "B", dict(B=torch.randn(BAD_B, BAD_N + 1, BAD_L))),
    ("B-batch", ValueError, "B", dict(B=torch.randn(1, BAD_N, BAD_L))),
    ("B-rank2", ValueError, "B", dict(B=torch.randn(BAD_N, BAD_L))),
    ("C-seqlen", ValueError, "C", dict(C=torch.randn(BAD_B, BAD_N, BAD_L - 1))),
    ("D-size", ValueError, "D", dict(D=torch.randn(BAD_D + 1))),
    ("D-rank", ValueError, "D", dict(D=torch.randn(BAD_D, 1))),
    ("z-shape", ValueError, "z", dict(z=torch.randn(BAD_B, BAD_D, BAD_L + 2))),
    ("delta_bias-size", ValueError, "delta_bias", dict(delta_bias=torch.randn(BAD_D - 1))),
    ("initial_state-shape", ValueError, "initial_state", dict(initial_state=torch.randn(BAD_B, BAD_D, BAD_N + 1))),
    ("initial_state-batch", ValueError, "initial_state", dict(initial_state=torch.randn(1, BAD_D, BAD_N))),
    ("delta-float64", TypeError, "delta", dict(delta=torch.rand(BAD_B, BAD_D, BAD_L, dtype=F64))),
    ("B-bfloat16", TypeError, "B", dict(B=torch.randn(BAD_B, BAD_N, BAD_L, dtype=torch.bfloat16))),
    ("C-float16", TypeError, "C", dict(C=torch.randn(BAD_B, BAD_N, BAD_L, dtype=torch.float16))),
    ("z-float64", TypeError, "z", dict(z=torch.randn(BAD_B, BAD_D, BAD_L, dtype=F64))),
    ("u-int", TypeError, "u", dict(u=torch.ones(BAD_B, BAD_D, BAD_L, dtype=torch.int64))),
    ("delta-int", TypeError, "delta", dict(delta=torch.ones(BAD_B, BAD_D, BAD_L, dtype=torch.int32))),
    ("A-int", TypeError, "A", dict(A=-torch.ones(BAD_D, BAD_N, dtype=torch.int64))),
    ("D-bool", TypeError, "D", dict(D=torch.ones(BAD_D, dtype=torch.bool))),
    ("delta-meta", ValueError, "delta", "meta:delta"),
    ("A-meta", ValueError, "A", "meta:A"),
    ("B-meta", ValueError, "B", "meta:B"),
    ("D-meta", ValueError, "D", "meta:D"),
    ("z-meta", ValueError, "z", "meta:z"),
    ("delta_bias-meta", ValueError, "delta_bias", "meta:delta_bias"),
    ("initial_state-meta", ValueError, "initial_state", "meta:initial_state"),
    ("u-list", TypeError, "u", dict(u=[[[1.0]]])),
    ("A-float", TypeError, "A", dict(A=-1.0)),
    ("B-numpy", TypeError, "B", "numpy:B"),
    ("D-float", TypeError, "D", dict(D=1.0)),
    ("initial_state-list", TypeError, "initial_state", dict(initial_state=[0.0])),
    ("u-empty-L", ValueError, "u", "empty:L"),
    ("u-empty-D", ValueError, "u", "empty:D"),
    ("u-empty-b", ValueError, "u", "empty:b"),
    ("A-empty-N", ValueError, "A", dict(A=torch.empty(BAD_D, 0))),
]


def _apply_bad(spec):
    """T.with_bad on the valid inputs; "empty:<b|D|L>": every input with that size 0."""
    if not (isinstance(spec, str) and spec.startswith("empty:")):
        return T.with_bad(_valid(), spec)
    which = spec[6:]
    b, d, L, N = BAD_B, BAD_D, BAD_L, BAD_N
    b, d, L = (0 if which == "b" else b), (0 if which == "D" else d), (0 if which == "L" else L)
    inp = T.scan_inputs(0, max(b, 1), max(d, 1), max(L, 1), N, F32, has_h0=True)
    inp.update(u=torch.empty(b, d, L), delta=torch.empty(b, d, L), z=torch.empty(b, d, L),
               B=torch.empty(b, N, L), C=torch.empty(b, N, L), A=-torch.rand(d, N), D=torch.rand(d),
               delta_bias=torch.rand(d), initial_state=torch.rand(b, d, N))
    return inp


@pytest.mark.parametrize("spec", BAD, ids=[s[0] for s in BAD])
def test_bad_input(spec, backend):
    _, exc, name, over = spec
    c = Case(BAD_B, BAD_D, BAD_L, BAD_N, True, True, True, True, True, True)
    T.check_raises_first(exc, name, ARG_NAMES, run, _apply_bad(over), c, backend)


@pytest.mark.parametrize("kw,name,exc", [
    (dict(delta_softplus="yes"), "delta_softplus", TypeError),
    (dict(reverse=1), "reverse", TypeError),
    (dict(backend="nonsense"), "backend", ValueError),
    (dict(backend=3), "backend", ValueError),
])
def test_bad_flags(kw, name, exc):
    inp = _valid()
    call = dict(delta_softplus=True, reverse=False, backend="reference")
    call.update(kw)
    T.check_raises(exc, name, ops.selective_scan, inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                   delta_softplus=call["delta_softplus"], reverse=call["reverse"], backend=call["backend"])


@pytest.mark.parametrize("over,name,exc", [
    (dict(A="f64"), "A", TypeError),            # raw op: parameters must be float32 for float32 u
    (dict(D="f64"), "D", TypeError),
    (dict(initial_state="f64"), "initial_state", TypeError),
    (dict(delta="f64"), "delta", TypeError),
    (dict(B="short"), "B", ValueError),
    (dict(u="empty"), "u", ValueError),
    (dict(z="meta"), "z", (ValueError, RuntimeError)),  # never a silent result from the fake kernel
], ids=["A-f64", "D-f64", "h0-f64", "delta-f64", "B-short", "u-empty", "z-meta"])
def test_raw_op_bad_input(over, name, exc, kernel_backend):
    """The compiled op checks again: a direct torch.ops call never reads out of bounds."""
    inp = _valid()
    (k, how), = over.items()
    if how == "f64":
        inp[k] = inp[k].double()
    elif how == "short":
        inp[k] = inp[k][..., :-1]
    elif how == "empty":
        inp[k] = inp[k][..., :0]
    elif how == "meta":
        inp[k] = T.meta_like(inp[k])
    T.check_raises(exc, name, raw, inp, Case(BAD_B, BAD_D, BAD_L, BAD_N, True), kernel_backend)


def test_raw_backward_checks_checkpoints(seed, kernel_backend):
    c = Case(2, 3, 70, 4, False, True, True, True, True, True)
    inp = c.inputs(seed, F32)
    _, _, ck = raw(inp, c, kernel_backend)
    dout = torch.randn(c.b, c.dim, c.L)
    args = [inp[k] for k in T.SCAN_KEYS]
    T.check_raises(ValueError, "checkpoints", raw_op(kernel_backend, True), dout, None, *args,
                   ck[:, :, :1], c.softplus, c.reverse)
    T.check_raises(ValueError, "dout", raw_op(kernel_backend, True), dout[..., 1:], None, *args,
                   ck, c.softplus, c.reverse)
    T.check_raises(ValueError, "dlast_state", raw_op(kernel_backend, True), dout,
                   torch.randn(c.b, c.dim, c.N + 1), *args, ck, c.softplus, c.reverse)
