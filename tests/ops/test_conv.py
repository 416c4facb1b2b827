"""Tests of vlssm.ops.fork_conv1d and torch.ops.vlssm.fork_conv1d{,_backward}.

Ground truth: vlssm.reference.fork_conv1d_ref in float64 on the same inputs
upcast, itself checked against an independent tap loop over [P, S] and [P, rev S].
"""
from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import fork_conv1d_ref

F32, F64 = torch.float32, torch.float64


class Case(NamedTuple):
    b: int
    p: int
    s: int
    E: int
    K: int = 4
    has_bias: bool = True

    def inputs(self, seed, dtype=F32):
        return T.conv_inputs(seed, self.b, self.p, self.s, self.E, self.K, dtype, has_bias=self.has_bias)


def _id(c: Case) -> str:
    return f"b{c.b}-p{c.p}-s{c.s}-e{c.E}-k{c.K}{'-bias' if c.has_bias else ''}"


FWD_CASES = [
    Case(1, 0, 1, 1, 4, True),
    Case(2, 1, 1, 3, 4, False),
    Case(2, 2, 3, 5, 4, True),     # prefix shorter than d_conv - 1
    Case(1, 3, 2, 63, 4, True),    # prefix == d_conv - 1
    Case(3, 17, 7, 64, 3, False),
    Case(2, 0, 5, 33, 1, True),    # pointwise conv
    Case(1, 5, 9, 7, 5, True),
    Case(2, 4, 2, 6, 6, True),     # window spans suffix, prefix and padding
    Case(1, 1, 3, 2, 8, False),    # window longer than the whole sequence
    Case(2, 196, 80, 16, 4, True),  # MVLR label block shape (p = M, s = C), narrow
    Case(1, 80, 196, 5, 4, True),   # visual block
    Case(2, 0, 1, 130, 2, True),
]
HALF_CASES = [Case(2, 2, 3, 5, 4, True), Case(2, 17, 7, 64, 3, False), Case(1, 196, 80, 16, 4, True)]
GRAD_CASES = [
    Case(1, 0, 1, 1, 4, True),
    Case(2, 2, 3, 5, 4, True),
    Case(2, 1, 1, 3, 2, False),
    Case(3, 17, 7, 64, 3, True),
    Case(2, 4, 2, 70, 6, True),
    Case(1, 1, 3, 2, 8, False),
    Case(2, 30, 20, 9, 4, True),
]


def run(inp, backend, **over):
    a = {**inp, **over}
    return ops.fork_conv1d(a["x_prefix"], a["x_suffix"], a["weight"], a["bias"], backend=backend)


def ref64(inp):
    a = {k: T.up(v) for k, v in inp.items()}
    return fork_conv1d_ref(a["x_prefix"], a["x_suffix"], a["weight"], a["bias"])


def raw_op(backend: str, backward: bool = False):
    return T.raw_op("fork_conv1d", backend, backward)


def _small(c: Case) -> bool:
    """Cheap enough for the Triton interpreter: one block of channels, few outputs."""
    return c.E <= 64 and c.b * (c.p + 2 * c.s) * c.E <= 2000


def raw(inp, backend="cpu"):
    return raw_op(backend)(inp["x_prefix"], inp["x_suffix"], inp["weight"], inp["bias"])


# --------------------------------------------------------------------------
# The reference itself


@pytest.mark.parametrize("c", [FWD_CASES[0], FWD_CASES[2], FWD_CASES[6], FWD_CASES[7], FWD_CASES[8],
                               Case(2, 6, 4, 3, 4, True)], ids=_id)
def test_reference_matches_literal_taps(c, seed):
    inp = c.inputs(seed, F64)
    out = ref64(inp)
    assert out.shape == (c.b, c.p + 2 * c.s, c.E)
    T.assert_rel("y", out, T.literal_fork_conv1d(**inp), 1e-14)


def test_reference_segments_are_the_two_sequences(seed):
    """Segments [prefix | S in [P, S] | S in [P, rev S]]: first two = plain causal conv of [P, S]."""
    c = Case(2, 5, 4, 3, 3, True)
    inp = c.inputs(seed, F64)
    y = ref64(inp)
    plain = T.literal_causal_conv_silu(torch.cat([inp["x_prefix"], inp["x_suffix"]], 1), inp["weight"],
                                       inp["bias"])
    T.assert_rel("prefix + forward suffix", y[:, :c.p + c.s], plain, 1e-14)
    rev = T.literal_causal_conv_silu(torch.cat([inp["x_prefix"], inp["x_suffix"].flip(1)], 1), inp["weight"],
                                     inp["bias"])
    T.assert_rel("reversed suffix", y[:, c.p + c.s:].flip(1), rev[:, c.p:], 1e-14)
    T.assert_rel("prefix (shared)", rev[:, :c.p], y[:, :c.p], 1e-14)


# --------------------------------------------------------------------------
# Forward


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", FWD_CASES, ids=_id)
def test_forward(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, dtype)
    y = run(inp, kernel_backend)
    ref = ref64(inp)
    assert y.dtype == dtype and y.shape == (c.b, c.p + 2 * c.s, c.E)
    T.assert_rel("y", y, ref, T.FWD_TOL[dtype])
    T.assert_elementwise("y", y, ref, *{F32: (1e-5, 1e-6), F64: (1e-12, 1e-13)}[dtype])


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", HALF_CASES, ids=_id)
def test_forward_half(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp = c.inputs(seed, dtype)
    y = run(inp, kernel_backend)
    assert y.dtype == dtype
    T.assert_half_rule("y", y, fork_conv1d_ref(**inp), ref64(inp))
    T.assert_elementwise("y", y, ref64(inp), 2e-2, 2e-2)


@pytest.mark.parametrize("c", [FWD_CASES[2], FWD_CASES[7], Case(3, 40, 33, 70, 4, True)], ids=_id)
def test_raw_op_writes_every_element(c, seed, kernel_backend):
    inp = c.inputs(seed, F32)
    like = torch.empty(c.b, c.p + 2 * c.s, c.E)
    T.poison_allocator(like)
    y = raw(inp, kernel_backend)
    T.assert_elementwise("y", y, ref64(inp), 1e-5, 1e-6)
    T.poison_allocator(like)
    assert torch.equal(raw(inp, kernel_backend), y)


# --------------------------------------------------------------------------
# Gradients


def _grads(c, dtype, seed, backend):
    inp = c.inputs(seed, dtype)
    cot = [T.randn(T.gen(seed + 7), c.b, c.p + 2 * c.s, c.E, dtype=F64)]
    _, grads = T.grads_of(lambda **a: run(a, backend), inp, cot)
    _, rgrads = T.grads_of(lambda **a: ref64(a), T.up_all(inp), cot)
    return inp, grads, rgrads


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", GRAD_CASES, ids=_id)
def test_gradients(c, dtype, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, _small(c))
    inp, grads, rgrads = _grads(c, dtype, seed, kernel_backend)
    T.assert_grads(grads, rgrads, inp, T.GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
def test_gradients_half(dtype, seed, kernel_backend):
    c = Case(2, 5, 6, 9, 4, True)
    inp = c.inputs(seed, dtype)
    cot = [T.randn(T.gen(seed + 7), c.b, c.p + 2 * c.s, c.E, dtype=dtype)]
    _, grads = T.grads_of(lambda **a: run(a, kernel_backend), inp, cot)
    _, same = T.grads_of(lambda **a: fork_conv1d_ref(**a), inp, cot)
    _, exact = T.grads_of(lambda **a: ref64(a), T.up_all(inp), cot)
    for k in grads:
        assert grads[k].dtype == dtype
        T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


GRADCHECK_CASES = [
    Case(1, 0, 2, 2, 4, True),
    Case(1, 2, 3, 2, 4, True),
    Case(2, 1, 1, 3, 2, False),
    Case(1, 3, 2, 1, 6, True),
]


@pytest.mark.parametrize("c", GRADCHECK_CASES, ids=_id)
def test_gradcheck(c, seed, kernel_backend):
    T.gradcheck(lambda a: run(a, kernel_backend), c.inputs(seed, F64), kernel_backend, atol=1e-7, rtol=1e-6)


def test_gradcheck_batch_broadcast_suffix(seed, kernel_backend):
    """x_suffix = t.expand(b, s, E) (stride 0): the gradient reaches t summed over the batch."""
    c = Case(3, 2, 3, 2, 4, True)
    inp = c.inputs(seed, F64)

    def call(a):
        xs = a["t"].expand(c.b, c.s, c.E)
        assert xs.stride(0) == 0
        return run(dict(inp, x_prefix=a["x_prefix"], x_suffix=xs), kernel_backend)

    T.gradcheck(call, dict(x_prefix=inp["x_prefix"], t=inp["x_suffix"][:1]), kernel_backend, atol=1e-7, rtol=1e-6)


# --------------------------------------------------------------------------
# Registration


OPCHECK_CASES = [
    (Case(2, 3, 2, 5, 4, True), F32, True),
    (Case(1, 0, 3, 4, 4, False), F32, False),
    (Case(2, 2, 1, 3, 3, False), F64, True),
    (Case(1, 1, 2, 2, 4, True), F64, False),
]


@pytest.mark.parametrize("c,dtype,requires_grad", OPCHECK_CASES,
                         ids=[f"{_id(c)}-{d}-{'grad' if r else 'nograd'}" for c, d, r in OPCHECK_CASES])
def test_opcheck_forward(c, dtype, requires_grad, seed, kernel_backend):
    inp = c.inputs(seed, dtype)
    args = [None if inp[k] is None else inp[k].clone().requires_grad_(requires_grad) for k in T.CONV_KEYS]
    T.opcheck(raw_op(kernel_backend).default, tuple(args))


@pytest.mark.parametrize("c,dtype", [(Case(2, 3, 2, 5, 4, True), F32), (Case(1, 0, 3, 4, 4, False), F64),
                                     (Case(2, 2, 1, 3, 3, False), F32)], ids=["bias-f32", "p0-f64", "nobias-f32"])
def test_opcheck_backward(c, dtype, seed, kernel_backend):
    inp = c.inputs(seed, dtype)
    dy = T.randn(T.gen(seed + 1), c.b, c.p + 2 * c.s, c.E, dtype=dtype)
    T.opcheck(raw_op(kernel_backend, True).default, (dy, *[inp[k] for k in T.CONV_KEYS]))


@pytest.mark.parametrize("api", ["public", "raw"])
def test_compile_fullgraph_aot_eager(api, seed, kernel_backend, clean_env):
    c = Case(2, 3, 4, 5, 4, True)
    inp = c.inputs(seed, F32)
    names = list(T.CONV_KEYS)

    def fn(xp, xs, w, bias):
        if api == "public":
            y = ops.fork_conv1d(xp, xs, w, bias, backend=kernel_backend)
        else:
            y = raw_op(kernel_backend)(xp, xs, w, bias)
        return (y * y.sum(-1, keepdim=True),)

    T.compile_check(fn, inp, names, "aot_eager")


# --------------------------------------------------------------------------
# Determinism, layouts


def test_deterministic_and_thread_count_independent(seed, cpu_backend):
    c = Case(3, 50, 30, 130, 4, True)
    inp = c.inputs(seed, F32)
    cot = [T.randn(T.gen(seed + 1), c.b, c.p + 2 * c.s, c.E)]

    def once():
        outs, grads = T.grads_of(lambda **a: run(a, cpu_backend), inp, cot)
        return outs + [grads[k] for k in T.CONV_KEYS]

    T.assert_deterministic(once)


def test_noncontiguous_inputs(seed, kernel_backend):
    """Slices of a token-major in_proj output, channel-major storage, strided weight / bias."""
    c = Case(2, 6, 5, 7, 4, True)
    inp = c.inputs(seed, F32)
    xz = torch.empty(c.b, c.p + c.s, 2 * c.E + 3)
    xz[:, :c.p, 3:3 + c.E] = inp["x_prefix"]
    xz[:, c.p:, 3:3 + c.E] = inp["x_suffix"]
    nc = dict(
        x_prefix=xz[:, :c.p, 3:3 + c.E],
        x_suffix=inp["x_suffix"].transpose(1, 2).contiguous().transpose(1, 2),
        weight=inp["weight"].t().contiguous().t(),
        bias=torch.stack([inp["bias"], inp["bias"]], 1)[:, 1],
    )
    for k, v in nc.items():
        assert torch.equal(v, inp[k]) and not v.is_contiguous(), k
    cot = [T.randn(T.gen(seed + 1), c.b, c.p + 2 * c.s, c.E)]
    T.assert_layout_invariant(lambda **a: run(a, kernel_backend), inp, nc, cot)


def test_batch_broadcast_suffix(seed, kernel_backend):
    c = Case(4, 3, 6, 9, 4, True)
    inp = c.inputs(seed, F32)
    t = inp["x_suffix"][:1]
    expanded = t.expand(c.b, c.s, c.E)
    assert expanded.stride(0) == 0
    y = run(dict(inp, x_suffix=expanded), kernel_backend)
    y_dense = run(dict(inp, x_suffix=expanded.contiguous()), kernel_backend)
    assert torch.equal(y, y_dense)
    T.assert_rel("y", y, ref64(dict(inp, x_suffix=expanded)), 1e-5)


def test_prefix_empty_any_layout(seed, kernel_backend):
    """p = 0: an empty x_prefix of any strides gives the conv of S and of rev S."""
    c = Case(2, 0, 5, 4, 4, True)
    inp = c.inputs(seed, F32)
    y = run(inp, kernel_backend)
    odd = torch.empty(c.b, c.E, 0).transpose(1, 2)
    assert torch.equal(run(dict(inp, x_prefix=odd), kernel_backend), y)
    T.assert_rel("y", y, T.literal_fork_conv1d(**inp), 1e-5)


# --------------------------------------------------------------------------
# Backends


def test_backends_agree(seed, kernel_backend):
    c = Case(2, 9, 6, 11, 4, True)
    inp = c.inputs(seed, F32)
    T.assert_rel("y", run(inp, kernel_backend), run(inp, "reference"), 1e-5)


def test_default_backend_selection(seed, cpu_backend, clean_env):
    inp = Case(2, 9, 6, 40, 4, True).inputs(seed, F32)
    T.assert_backend_selection(lambda be: run(inp, be), clean_env)


# --------------------------------------------------------------------------
# Bad inputs

ARG_NAMES = ("x_prefix", "x_suffix", "weight", "bias", "backend")
NB, NP, NS, NE, NK = 2, 3, 4, 5, 4


def _valid():
    return T.conv_inputs(5, NB, NP, NS, NE, NK, F32)


BAD = [
    ("x_prefix-rank2", ValueError, "x_prefix", dict(x_prefix=torch.randn(NB, NE))),
    ("x_suffix-rank4", ValueError, "x_suffix", dict(x_suffix=torch.randn(NB, NS, NE, 1))),
    ("x_suffix-batch", ValueError, "x_suffix", dict(x_suffix=torch.randn(NB + 1, NS, NE))),
    ("x_suffix-dim", ValueError, "x_suffix", dict(x_suffix=torch.randn(NB, NS, NE + 1))),
    ("x_prefix-batch-p0", ValueError, "x_suffix", dict(x_prefix=torch.randn(NB + 1, 0, NE))),
    ("weight-dim", ValueError, "weight", dict(weight=torch.randn(NE + 1, NK))),
    ("weight-rank3", ValueError, "weight", dict(weight=torch.randn(NE, 1, NK))),
    ("bias-size", ValueError, "bias", dict(bias=torch.randn(NE - 1))),
    ("bias-rank", ValueError, "bias", dict(bias=torch.randn(1, NE))),
    ("x_suffix-float64", TypeError, "x_suffix", dict(x_suffix=torch.randn(NB, NS, NE, dtype=F64))),
    ("weight-float64", TypeError, "weight", dict(weight=torch.randn(NE, NK, dtype=F64))),
    ("bias-bfloat16", TypeError, "bias", dict(bias=torch.randn(NE, dtype=torch.bfloat16))),
    ("x_prefix-int", TypeError, "x_prefix", dict(x_prefix=torch.ones(NB, NP, NE, dtype=torch.int64))),
    ("weight-int", TypeError, "weight", dict(weight=torch.ones(NE, NK, dtype=torch.int32))),
    ("x_suffix-meta", ValueError, "x_suffix", "meta:x_suffix"),
    ("weight-meta", ValueError, "weight", "meta:weight"),
    ("bias-meta", ValueError, "bias", "meta:bias"),
    ("x_prefix-list", TypeError, "x_prefix", dict(x_prefix=[[[0.0]]])),
    ("weight-numpy", TypeError, "weight", "numpy:weight"),
    ("bias-float", TypeError, "bias", dict(bias=0.5)),
    ("x_suffix-empty", ValueError, "x_suffix", dict(x_suffix=torch.randn(NB, 0, NE))),
    ("x_prefix-empty-E", ValueError, "x_prefix", dict(x_prefix=torch.randn(NB, NP, 0))),
    ("x_prefix-empty-b", ValueError, "x_prefix", dict(x_prefix=torch.randn(0, NP, NE))),
    ("x_suffix-empty-E", ValueError, "x_suffix", dict(x_prefix=torch.randn(NB, NP, 0),
                                                      x_suffix=torch.randn(NB, NS, 0))),
    ("weight-empty-K", ValueError, "weight", dict(weight=torch.randn(NE, 0))),
]


@pytest.mark.parametrize("spec", BAD, ids=[s[0] for s in BAD])
def test_bad_input(spec, backend):
    _, exc, name, over = spec
    T.check_raises_first(exc, name, ARG_NAMES, run, T.with_bad(_valid(), over), backend)


def test_bad_backend():
    T.check_raises(ValueError, "backend", run, _valid(), "nonsense")


def test_cuda_backend_refuses_cpu_tensors():
    """backend="cuda" names the device it needs instead of silently running elsewhere."""
    with pytest.raises(ValueError, match=r"backend='cuda' runs the compiled CUDA kernels; the tensors are on cpu"):
        run(_valid(), "cuda")


@pytest.mark.parametrize("over,name,exc", [
    (dict(weight=torch.randn(NE, NK, dtype=F64)), "weight", TypeError),
    (dict(x_suffix=torch.randn(NB, NS, NE + 1)), "x_suffix", ValueError),
    (dict(x_suffix=torch.randn(NB, 0, NE)), "x_suffix", ValueError),
    (dict(bias=torch.randn(NE + 2)), "bias", ValueError),
    (dict(bias=torch.empty(NE, device="meta")), "bias", (ValueError, RuntimeError)),
], ids=["weight-f64", "x_suffix-dim", "x_suffix-empty", "bias-size", "bias-meta"])
def test_raw_op_bad_input(over, name, exc, kernel_backend):
    inp = dict(_valid(), **over)
    T.check_raises(exc, name, raw, inp, kernel_backend)


def test_raw_backward_checks_dy(seed, kernel_backend):
    inp = _valid()
    dy = torch.randn(NB, NP + 2 * NS - 1, NE)
    T.check_raises(ValueError, "dy", raw_op(kernel_backend, True), dy, *[inp[k] for k in T.CONV_KEYS])
