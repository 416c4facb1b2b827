"""B / C layouts of vlssm.ops.selective_scan and vlssm.ops.fork_scan (mamba_ssm's three).

Each of B and C independently:

- time-varying, one group ("tv"): selective_scan (b, N, L), fork_scan (b, L, N), u's dtype;
- time-varying grouped ("g<G>"): (b, G, N, L) / (b, L, G, N), u's dtype; channel d reads
  group d // (dim // G);
- input-independent ("ii"): (dim, N), any floating dtype at the public API (used in the
  accumulation dtype, the dtype the raw ops require).

Ground truth: the float64 references (vlssm.reference), which expand B / C per channel
literally. Besides the comparisons with them: a grouped call equals G calls on the
channel slices, an input-independent B / C equals one group per channel (a stride-0
view), gradcheck, opcheck and torch.compile of the raw ops, and the argument checks.
The ops of both kinds run through the same tests: ``Scan`` and ``Fork`` cases.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.reference import fork_scan_ref, selective_scan_ref

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# ``backend`` (conftest.py): every backend of the public ops, the reference first (it checks the tests themselves).


def raw_op(op: str, backend: str, backward: bool = False):
    """torch.ops.vlssm.{selective_scan,fork_scan}[_backward][_triton]."""
    return T.raw_op({"scan": "selective_scan", "fork": "fork_scan"}[op], backend, backward)


def groups(layout: str) -> int:
    """Time-varying group count of a layout: "tv" 1, "g<G>" G, "ii" 0."""
    return {"tv": 1, "ii": 0}[layout] if layout in ("tv", "ii") else int(layout[1:])


def make_bc(g: torch.Generator, layout: str, b: int, dim: int, L: int, N: int, dtype: torch.dtype,
            token_major: bool) -> torch.Tensor:
    """B or C in ``layout``; input-independent ones in the accumulation dtype (what the raw ops take)."""
    if layout == "ii":
        return T.randn(g, dim, N, dtype=T.acc_dtype(dtype))
    G = groups(layout)
    x = T.randn(g, *((b, L, G, N) if token_major else (b, G, N, L)), dtype=dtype)
    return x.squeeze(2 if token_major else 1) if layout == "tv" else x


class _Case:
    """What Scan and Fork share: B / C generation, sizes, references, group slices."""

    keys: Tuple[str, ...]
    token_major: bool
    out_names: Tuple[str, ...]

    @property
    def chan_axis(self) -> int:
        """The channel axis of u, delta, z, initial_state and of every output; also the group axis of a
        grouped B / C."""
        return 2 if self.token_major else 1

    @property
    def G(self) -> int:
        """The time-varying group count of the call (0: B and C both input-independent)."""
        return max(groups(self.B), groups(self.C))

    def with_bc(self, inp: Dict, seed: int, dtype: torch.dtype) -> Dict:
        g = T.gen(seed + 1)
        for k in ("B", "C"):
            inp[k] = make_bc(g, getattr(self, k), self.b, self.dim, self.L, self.N, dtype, self.token_major)
        return inp

    def small(self, steps: int = 140, per_channel: bool = False) -> bool:
        """Cheap enough for the Triton interpreter: scan steps times programs, a program per batch and
        block of 64 channels inside a group (``per_channel``: a group per channel)."""
        G = self.dim if per_channel else max(self.G, 1)
        return self.b * self.L * G * -(-self.dim // G // 64) <= steps

    def ref64(self, inp: Dict) -> Tuple[torch.Tensor, ...]:
        return self.reference({k: T.up(v) for k, v in inp.items()})

    def cotangents(self, g: torch.Generator, dtype: torch.dtype) -> List[torch.Tensor]:
        """One per output: the output's own dtype (``dtype`` for out, the accumulation dtype for the state)."""
        dts = (dtype, T.acc_dtype(dtype))
        return [T.randn(g, *s, dtype=dt) for s, dt in zip(self.out_shapes(), dts)]

    def group_inputs(self, inp: Dict, gi: int) -> Dict:
        """The inputs of group ``gi``'s channels alone, B / C as one group (3-D) or input-independent."""
        w = self.dim // self.G
        sl = slice(gi * w, (gi + 1) * w)
        sub = {}
        for k, v in inp.items():
            if v is None:
                sub[k] = None
            elif k in ("A", "D", "delta_bias") or (k in ("B", "C") and v.dim() == 2):
                sub[k] = v[sl]
            elif k in ("B", "C"):
                sub[k] = v.select(self.chan_axis, gi)
            else:
                sub[k] = v.narrow(self.chan_axis, gi * w, w)
        return sub

    def per_channel(self, X: torch.Tensor, layout: str) -> torch.Tensor:
        """B / C as the same function in the grouped layout with one group per channel (G = dim):
        stride-0 views for "ii" and "tv", a repeat for "g<G>"."""
        b, dim, L, N = self.b, self.dim, self.L, self.N
        if layout == "ii":
            return X[None, None].expand(b, L, dim, N) if self.token_major else X[None, :, :, None].expand(b, dim, N, L)
        if layout == "tv":
            return X[:, :, None].expand(b, L, dim, N) if self.token_major else X[:, None].expand(b, dim, N, L)
        return X.repeat_interleave(dim // groups(layout), dim=self.chan_axis)


@dataclasses.dataclass(frozen=True)
class Scan(_Case):
    """A selective_scan case; ``opts``: the optional inputs present (D, z, delta_bias "b", initial_state "h")."""
    b: int
    dim: int
    L: int
    N: int
    B: str = "g2"
    C: str = "g2"
    reverse: bool = False
    opts: str = "Dzb"
    softplus: bool = True

    keys = T.SCAN_KEYS
    token_major = False
    out_names = ("out", "last_state")

    def __str__(self):
        return (f"scan-b{self.b}-d{self.dim}-l{self.L}-n{self.N}-B{self.B}-C{self.C}{'-rev' if self.reverse else ''}"
                f"-{self.opts or 'none'}{'-sp' if self.softplus else ''}")

    def inputs(self, seed: int, dtype=F32) -> Dict:
        o = self.opts
        inp = T.scan_inputs(seed, self.b, self.dim, self.L, self.N, dtype, has_D="D" in o, has_z="z" in o,
                            has_bias="b" in o, has_h0="h" in o, softplus=self.softplus)
        return self.with_bc(inp, seed, dtype)

    def out_shapes(self):
        return [(self.b, self.dim, self.L), (self.b, self.dim, self.N)]

    def call(self, a: Dict, backend: Optional[str], return_last_state: bool = True):
        return ops.selective_scan(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                  self.softplus, return_last_state, reverse=self.reverse,
                                  initial_state=a["initial_state"], backend=backend)

    def reference(self, a: Dict):
        return selective_scan_ref(a["u"], a["delta"], a["A"], a["B"], a["C"], a["D"], a["z"], a["delta_bias"],
                                  self.softplus, True, reverse=self.reverse, initial_state=a["initial_state"])

    def raw(self, a: Dict, backend: str):
        return raw_op("scan", backend)(*[a[k] for k in self.keys], self.softplus, self.reverse)

    def raw_backward_args(self, a: Dict, fwd, couts: Sequence[torch.Tensor]):
        """The raw backward's arguments: cotangents, inputs, the forward's checkpoints, flags."""
        return (*couts, *[a[k] for k in self.keys], fwd[2], self.softplus, self.reverse)


@dataclasses.dataclass(frozen=True)
class Fork(_Case):
    """A fork_scan case (token-major, L = p + 2s); ``opts`` as in Scan (no initial_state)."""
    b: int
    p: int
    s: int
    dim: int
    N: int
    B: str = "g2"
    C: str = "g2"
    opts: str = "Dzb"
    softplus: bool = True

    keys = T.FORK_KEYS
    token_major = True
    out_names = ("out",)

    @property
    def L(self) -> int:
        return self.p + 2 * self.s

    def __str__(self):
        return (f"fork-b{self.b}-p{self.p}-s{self.s}-e{self.dim}-n{self.N}-B{self.B}-C{self.C}"
                f"-{self.opts or 'none'}{'-sp' if self.softplus else ''}")

    def inputs(self, seed: int, dtype=F32) -> Dict:
        o = self.opts
        inp = T.fork_inputs(seed, self.b, self.p, self.s, self.dim, self.N, dtype, has_D="D" in o, has_z="z" in o,
                            has_bias="b" in o, softplus=self.softplus)
        return self.with_bc(inp, seed, dtype)

    def out_shapes(self):
        return [(self.b, self.s, self.dim)]

    def call(self, a: Dict, backend: Optional[str]):
        return (ops.fork_scan(*[a[k] for k in self.keys], self.p, self.softplus, backend=backend),)

    def reference(self, a: Dict):
        return (fork_scan_ref(*[a[k] for k in self.keys], self.p, self.softplus),)

    def raw(self, a: Dict, backend: str):
        return raw_op("fork", backend)(*[a[k] for k in self.keys], self.p, self.softplus)

    def raw_backward_args(self, a: Dict, fwd, couts: Sequence[torch.Tensor]):
        return (*couts, *[a[k] for k in self.keys], fwd[1], fwd[2], self.p, self.softplus)


# --------------------------------------------------------------------------
# Cases. Channel counts put groups across the kernels' 16- / 64-channel blocks:
# 12 = 4 x 3, 66 = 2 x 33, 68 = 4 x 17, 130 = 2 x 65.

FWD_CASES = [
    Scan(1, 4, 1, 2, "g2", "g2", False, "", False),
    Scan(2, 12, 7, 3, "g4", "g4", True, "Dzbh"),
    Scan(2, 12, 7, 3, "ii", "tv", False, "Dzb"),
    Scan(1, 12, 9, 4, "tv", "ii", True, "zh"),
    Scan(2, 8, 64, 4, "ii", "ii", False, "Dzbh", False),
    Scan(3, 12, 33, 5, "g1", "g1", False, "Dz"),
    Scan(1, 66, 65, 4, "g2", "g2", True, "Dzbh"),
    Scan(2, 68, 65, 3, "g4", "ii", False, "Db"),
    Scan(2, 64, 31, 2, "ii", "g4", True, "zb", False),
    Scan(1, 130, 129, 2, "ii", "g2", True, "Dzbh"),
    Scan(2, 130, 20, 4, "g2", "ii", True, "bh", False),
    Scan(1, 68, 129, 16, "g4", "g4", False, "Dzbh"),
    Scan(1, 130, 3, 4, "g2", "ii", True, "Dzbh"),
    Scan(1, 68, 5, 2, "g4", "g4", False, "Dzb"),
    Fork(1, 0, 1, 4, 2, "g2", "g2", "", False),
    Fork(2, 3, 2, 12, 3, "g4", "g4"),
    Fork(2, 0, 5, 12, 4, "ii", "tv"),
    Fork(1, 2, 3, 8, 2, "tv", "ii", "zb"),
    Fork(1, 5, 4, 66, 3, "g2", "ii"),
    Fork(2, 70, 3, 68, 4, "ii", "ii", "Dz", False),
    Fork(1, 65, 65, 130, 2, "g2", "g2"),
    Fork(1, 3, 9, 68, 5, "ii", "g4", "z"),
]
HALF_CASES = [
    Scan(2, 12, 7, 3, "g4", "g4", True, "Dzbh"),
    Scan(1, 8, 64, 16, "ii", "ii", False, "Dz"),
    Scan(2, 66, 65, 3, "g2", "ii", False, "Dzbh"),
    Scan(1, 68, 130, 4, "ii", "g4", True, "Dzb"),
    Fork(2, 2, 3, 12, 4, "g2", "g2"),
    Fork(1, 65, 65, 8, 8, "ii", "tv"),
    Fork(2, 130, 7, 66, 5, "g2", "ii"),
]
GRAD_CASES = [
    Scan(1, 4, 1, 2, "g2", "g2", False, "", False),
    Scan(2, 12, 7, 3, "g4", "g4", True, "Dzbh"),
    Scan(2, 12, 9, 3, "ii", "tv", False, "Dzbh"),
    Scan(1, 8, 7, 4, "tv", "ii", True, "Dzbh", False),
    Scan(2, 8, 10, 2, "ii", "ii", False, "Dzbh"),
    Scan(1, 66, 65, 4, "g2", "ii", True, "Dzbh"),
    Scan(1, 68, 70, 3, "g4", "g4", False, "Dzb"),
    Scan(1, 130, 129, 2, "ii", "g2", True, "Dh"),
    Scan(1, 12, 130, 2, "g1", "g1", False, "Dzbh"),
    Scan(1, 66, 4, 2, "g2", "ii", False, "Dzbh"),
    Fork(1, 0, 1, 4, 2, "g2", "g2", ""),
    Fork(2, 2, 3, 12, 4, "g4", "g4"),
    Fork(1, 70, 3, 66, 2, "g2", "ii"),
    Fork(2, 5, 66, 8, 3, "ii", "ii", "Dz", False),
    Fork(1, 0, 65, 68, 2, "tv", "ii"),
    Fork(1, 3, 1, 130, 3, "ii", "g2", "b"),
]
HALF_GRAD_CASES = [
    Scan(2, 12, 20, 4, "g4", "ii", True, "Dzbh"),
    Scan(1, 8, 9, 3, "ii", "g2", False, "Dzb"),
    Fork(2, 9, 8, 12, 4, "g2", "g2"),
    Fork(1, 3, 5, 8, 3, "ii", "g4"),
    Fork(1, 1, 2, 8, 3, "ii", "g2"),
]
LONG_CASES = [  # float32, CPU only: the float64 reference loops over L in Python
    Scan(1, 8, 2048, 4, "g2", "ii", False, "Dzbh"),
    Scan(1, 4, 2048, 2, "ii", "g4", True, "Dzb"),
]


def _grads(c, inp: Dict, backend: str, cot: Sequence[torch.Tensor]):
    """(outputs, gradients) of the backend and of the float64 reference autograd (float64 leaves)."""
    outs, grads = T.grads_of(lambda **a: c.call(a, backend), inp, cot)
    routs, rgrads = T.grads_of(lambda **a: c.ref64(a), T.up_all(inp), cot)
    assert set(grads) == set(rgrads) == {k for k, v in inp.items() if v is not None}
    for k, gk in grads.items():
        assert gk.dtype == inp[k].dtype and gk.shape == inp[k].shape, f"d{k}: {gk.dtype} {tuple(gk.shape)}"
    return outs, grads, routs, rgrads


# --------------------------------------------------------------------------
# Forward vs the float64 reference


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", FWD_CASES, ids=str)
def test_forward(c, dtype, seed, backend):
    T.skip_slow_triton(backend, c.small(60))
    inp = c.inputs(seed, dtype)
    outs = c.call(inp, backend)
    for name, o, r, shape, dt in zip(c.out_names, outs, c.ref64(inp), c.out_shapes(), (dtype, T.acc_dtype(dtype))):
        assert o.dtype == dt and o.shape == shape, f"{name}: {o.dtype} {tuple(o.shape)}"
        T.assert_rel(name, o, r, T.FWD_TOL[dtype])
        T.assert_elementwise(name, o, r, *T.ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", HALF_CASES, ids=str)
def test_forward_half(c, dtype, seed, backend):
    """out within 2x the same-precision reference's error; the state (float32 in both) at float32 accuracy."""
    T.skip_slow_triton(backend, c.small(60))
    inp = c.inputs(seed, dtype)
    outs = c.call(inp, backend)
    exact, same = c.ref64(inp), c.reference(inp)
    assert outs[0].dtype == dtype
    T.assert_half_rule("out", outs[0], same[0], exact[0])
    T.assert_elementwise("out", outs[0], exact[0], 2e-2, 2e-2)
    if len(outs) > 1:
        assert outs[1].dtype == F32
        T.assert_rel("last_state", outs[1], exact[1], 1e-5)


@pytest.mark.parametrize("c", LONG_CASES, ids=str)
def test_long_sequence(c, seed, cpu_backend):
    inp = c.inputs(seed, F32)
    outs, grads, routs, rgrads = _grads(c, inp, cpu_backend, c.cotangents(T.gen(seed + 7), F64))
    for name, o, r in zip(c.out_names, outs, routs):
        T.assert_rel(name, o, r, 1e-5)
        T.assert_elementwise(name, o, r, 1e-4, 1e-5)
    T.assert_grads(grads, rgrads, inp, 1e-4)


@pytest.mark.parametrize("c", [FWD_CASES[1], FWD_CASES[3], FWD_CASES[13]], ids=str)
def test_return_last_state_false(c, seed, backend):
    """Without return_last_state selective_scan returns out alone (a tensor), the same values."""
    inp = c.inputs(seed, F32)
    if isinstance(c, Scan):
        out = c.call(inp, backend, return_last_state=False)
        assert isinstance(out, torch.Tensor)
        assert torch.equal(out, c.call(inp, backend)[0])
    else:
        out = ops.fork_scan(*[inp[k] for k in c.keys], c.p, backend=backend)  # delta_softplus defaults to True
        assert isinstance(out, torch.Tensor) and torch.equal(out, c.call(inp, backend)[0])


# --------------------------------------------------------------------------
# Gradients vs the float64 reference autograd


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("c", GRAD_CASES, ids=str)
def test_gradients(c, dtype, seed, backend):
    """Every gradient (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state where present)."""
    T.skip_slow_triton(backend, c.small(30))
    inp = c.inputs(seed, dtype)
    _, grads, _, rgrads = _grads(c, inp, backend, c.cotangents(T.gen(seed + 7), F64))
    T.assert_grads(grads, rgrads, inp, T.GRAD_TOL[dtype])
    if isinstance(c, Fork) and c.p and c.C != "ii":  # C of the prefix is never read
        assert torch.count_nonzero(grads["C"][:, :c.p]) == 0


@pytest.mark.parametrize("dtype", T.HALF_DTYPES, ids=str)
@pytest.mark.parametrize("c", HALF_GRAD_CASES, ids=str)
def test_gradients_half(c, dtype, seed, backend):
    """Half-precision gradients within 2x the same-precision reference autograd's error (+ eps);
    float32 ones (parameters, input-independent B / C) at float32 accuracy."""
    T.skip_slow_triton(backend, c.small(20))
    inp = c.inputs(seed, dtype)
    cot = c.cotangents(T.gen(seed + 7), dtype)
    _, grads, _, exact = _grads(c, inp, backend, cot)
    _, same = T.grads_of(lambda **a: c.reference(a), inp, cot)
    for k in grads:
        if inp[k].dtype == F32 and backend != "reference":  # the reference rounds y to u's dtype in between
            T.assert_rel(f"d{k}", grads[k], exact[k], 1e-4)
        else:
            T.assert_half_rule(f"d{k}", grads[k], same[k], exact[k])


GRADCHECK_CASES = [
    Scan(1, 4, 5, 2, "g2", "g2", True, "Dzbh"),
    Scan(1, 4, 4, 2, "ii", "g4", False, "Dzbh"),
    Scan(1, 2, 3, 2, "ii", "ii", True, "zh", False),
    Scan(1, 2, 70, 1, "g2", "ii", True, "Db"),  # crosses the 64-step checkpoint
    Fork(1, 0, 2, 2, 2, "g2", "g2"),
    Fork(1, 2, 2, 4, 2, "ii", "g4"),
    Fork(1, 1, 1, 2, 1, "tv", "ii", ""),
]


@pytest.mark.parametrize("c", GRADCHECK_CASES, ids=str)
def test_gradcheck(c, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, c.small(10))
    T.gradcheck(lambda a: c.call(a, kernel_backend), c.inputs(seed, F64), kernel_backend)


# --------------------------------------------------------------------------
# Equivalences between layouts

GROUP_EQ_CASES = [  # a grouped call == G calls on the channel slices (B / C of the slice's group), cat
    Scan(2, 12, 7, 3, "g4", "g4", True, "Dzbh"),
    Scan(1, 12, 3, 2, "g4", "g4", True, "Dzbh"),
    Scan(1, 6, 9, 2, "g1", "g1", False, "Dzbh"),   # 4-D with one group == 3-D
    Scan(1, 66, 20, 2, "g2", "ii", False, "Dzb"),
    Scan(1, 68, 9, 3, "ii", "g4", True, "zh"),
    Scan(1, 130, 65, 2, "g2", "g2", False, "Dzbh"),
    Fork(2, 3, 2, 12, 3, "g4", "g4"),
    Fork(1, 0, 4, 66, 2, "ii", "g2", "Dz"),
    Fork(1, 70, 3, 68, 2, "g4", "ii"),
]
CHANNEL_EQ_CASES = [  # an input-independent B / C == one group per channel (G = dim), B[d] broadcast: stride 0
    Scan(2, 8, 7, 3, "ii", "ii", True, "Dzbh"),
    Scan(1, 4, 5, 2, "ii", "ii", False, "Dzbh"),
    Scan(1, 6, 4, 2, "g2", "ii", True, "Dzbh"),
    Scan(2, 12, 9, 2, "ii", "tv", False, "Dzbh"),
    Scan(1, 66, 20, 3, "g2", "ii", True, "Dzb"),
    Scan(1, 12, 70, 2, "ii", "g4", False, "zh"),
    Fork(2, 2, 3, 8, 3, "ii", "ii"),
    Fork(1, 0, 4, 12, 2, "tv", "ii", "Dz"),
    Fork(1, 5, 3, 66, 2, "ii", "g2"),
]
EQ_CASES = [("per-group", c) for c in GROUP_EQ_CASES] + [("per-channel", c) for c in CHANNEL_EQ_CASES]
EQ_TOL = {F32: (2e-6, 1e-5), F64: (1e-13, 1e-11)}  # (outputs, gradients): only the summation order differs


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
@pytest.mark.parametrize("kind,c", EQ_CASES, ids=[f"{k}-{c}" for k, c in EQ_CASES])
def test_layout_equivalence(kind, c, dtype, seed, backend):
    """Outputs and every gradient of a call equal those of an equivalent call in another layout:

    - per-group: G calls on the channel slices of one group each (B / C of the group: 3-D), cat;
    - per-channel: B / C in the grouped layout with G = dim (an input-independent one broadcast over batch
      and time by a stride-0 view, its partner expanded likewise); autograd sums dB / dC through the view.
    """
    T.skip_slow_triton(backend, c.small(100, per_channel=True) if kind == "per-channel" else c.small(20))
    inp = c.inputs(seed, dtype)

    def other(**a):
        if kind == "per-channel":
            return c.call(dict(a, B=c.per_channel(a["B"], c.B), C=c.per_channel(a["C"], c.C)), backend)
        outs = [c.call(c.group_inputs(a, gi), backend) for gi in range(c.G)]
        return tuple(torch.cat(parts, c.chan_axis) for parts in zip(*outs))

    if kind == "per-channel" and c.B == "ii":
        assert 0 in c.per_channel(inp["B"], c.B).stride()
    cot = c.cotangents(T.gen(seed + 3), dtype)
    outs, grads = T.grads_of(lambda **a: c.call(a, backend), inp, cot)
    outs_o, grads_o = T.grads_of(other, inp, cot)
    tol_out, tol_grad = EQ_TOL[dtype]
    for name, a, b in zip(c.out_names, outs, outs_o):
        T.assert_rel(name, a, b, tol_out)
    for k in grads:
        T.assert_rel(f"d{k}", grads[k], grads_o[k], tol_grad)


def _strided(X: torch.Tensor, token_major: bool) -> torch.Tensor:
    """X's values, not contiguous: a time-varying B / C as a column slice of a token-major x_proj output
    (b, L, 3 + G N) (channel-major: its transpose), an input-independent one transposed twice."""
    if X.dim() == 2:
        v = X.t().contiguous().t()
    else:
        tm = X if token_major else X.movedim(-1, 1)     # (b, L, [G,] N)
        buf = torch.empty(*tm.shape[:2], 3 + tm[0, 0].numel(), dtype=X.dtype)
        buf[..., 3:] = tm.flatten(2)
        v = buf[..., 3:].view(tm.shape)
        v = v if token_major else v.movedim(1, -1)
    assert torch.equal(v, X) and not v.is_contiguous()
    return v


@pytest.mark.parametrize("c", [Scan(2, 12, 20, 3, "g4", "g4", True, "Dzbh"), Scan(2, 8, 9, 2, "ii", "g2"),
                               Fork(2, 3, 4, 12, 3, "g2", "ii"), Fork(1, 2, 3, 8, 2, "ii", "g4")], ids=str)
def test_strided_views(c, seed, backend):
    """B / C read in place as slices and transposes: the same outputs and gradients, bitwise."""
    T.skip_slow_triton(backend, c.small(40))
    inp = c.inputs(seed, F32)
    nc = dict(inp, B=_strided(inp["B"], c.token_major), C=_strided(inp["C"], c.token_major))
    T.assert_layout_invariant(lambda **a: c.call(a, backend), inp, nc, c.cotangents(T.gen(seed + 1), F32), c.out_names)


@pytest.mark.parametrize("u_dtype,B_dtype,C_dtype", [(F32, F64, F16), (F64, F32, BF16), (BF16, F64, BF16)],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("c", [Scan(1, 8, 9, 3, "ii", "ii", True, "Dzbh"), Fork(1, 3, 3, 8, 3, "ii", "ii")], ids=str)
def test_input_independent_dtypes_are_cast(c, u_dtype, B_dtype, C_dtype, seed, backend):
    """Input-independent B / C of any floating dtype == the same cast to the accumulation dtype (float32,
    float64 for float64 u; float32 for half u); dB / dC come back in B / C's own dtype."""
    T.skip_slow_triton(backend, True)
    inp = c.inputs(seed, u_dtype)
    odd = dict(inp, B=inp["B"].to(B_dtype), C=inp["C"].to(C_dtype))
    acc = T.acc_dtype(u_dtype)
    cast = dict(odd, B=odd["B"].to(acc), C=odd["C"].to(acc))
    for name, a, e in zip(c.out_names, c.call(odd, backend), c.call(cast, backend)):
        assert torch.equal(a, e), f"{name} differs from the result with B, C cast to {acc}"
    _, grads = T.grads_of(lambda **a: c.call(a, backend), odd, c.cotangents(T.gen(seed + 1), u_dtype))
    assert grads["B"].dtype == B_dtype and grads["C"].dtype == C_dtype


# --------------------------------------------------------------------------
# Raw ops: every element of dB / dC written; opcheck; torch.compile


@pytest.mark.parametrize("c", [Scan(2, 68, 20, 3, "g4", "ii", False, "Dzbh"), Scan(1, 12, 70, 4, "ii", "g2", True),
                               Scan(2, 12, 9, 2, "g4", "g4", True, "zh"), Scan(1, 12, 5, 2, "ii", "ii", True, "Dzbh"),
                               Fork(2, 3, 4, 66, 3, "g2", "g2"), Fork(1, 70, 3, 12, 2, "ii", "g4")], ids=str)
def test_raw_backward_writes_every_element(c, seed, kernel_backend):
    """dB, dC of the raw backward in B / C's layout: every element right (NaN-poisoned allocator), twice identical."""
    T.skip_slow_triton(kernel_backend, c.small(80))
    inp = c.inputs(seed, F32)
    cot = c.cotangents(T.gen(seed + 1), F32)
    fwd = c.raw(inp, kernel_backend)
    _, rgrads = T.grads_of(lambda **a: c.ref64(a), T.up_all(inp), cot)
    bw = raw_op("fork" if isinstance(c, Fork) else "scan", kernel_backend, True)
    args = c.raw_backward_args(inp, fwd, cot)
    res = []
    for _ in range(2):
        T.poison_allocator(inp["B"], inp["C"])
        grads = dict(zip(c.keys, bw(*args)))
        for k in ("B", "C"):
            assert grads[k].shape == inp[k].shape and grads[k].dtype == inp[k].dtype, k
            T.assert_elementwise(f"d{k}", grads[k], rgrads[k], 1e-4, 1e-5)
        res.append(grads)
    for k, v in inp.items():
        if v is not None:
            assert torch.equal(res[0][k], res[1][k]), f"d{k} differs between two runs"


OPCHECK_CASES = [
    (Scan(1, 4, 5, 3, "g2", "g2", True, "Dzbh"), F32),
    (Scan(1, 6, 5, 2, "ii", "g3", False, "Dz"), F64),
    (Fork(1, 3, 2, 4, 3, "g2", "g2"), F32),
    (Fork(1, 0, 3, 6, 2, "ii", "g3", ""), F64),
]


@pytest.mark.parametrize("requires_grad", [True, False], ids=["grad", "nograd"])
@pytest.mark.parametrize("c,dtype", OPCHECK_CASES, ids=[f"{c}-{d}" for c, d in OPCHECK_CASES])
def test_opcheck_forward(c, dtype, requires_grad, seed, kernel_backend):
    T.skip_slow_triton(kernel_backend, requires_grad)
    inp = c.inputs(seed, dtype)
    args = [None if inp[k] is None else inp[k].clone().requires_grad_(requires_grad) for k in c.keys]
    flags = (c.p, c.softplus) if isinstance(c, Fork) else (c.softplus, c.reverse)
    T.opcheck(raw_op("fork" if isinstance(c, Fork) else "scan", kernel_backend).default, (*args, *flags))


@pytest.mark.parametrize("c,dtype", OPCHECK_CASES, ids=[f"{c}-{d}" for c, d in OPCHECK_CASES])
def test_opcheck_backward(c, dtype, seed, kernel_backend):
    inp = c.inputs(seed, dtype)
    args = c.raw_backward_args(inp, c.raw(inp, kernel_backend), c.cotangents(T.gen(seed + 1), dtype))
    T.opcheck(raw_op("fork" if isinstance(c, Fork) else "scan", kernel_backend, True).default, args)


@pytest.mark.parametrize("api,c", [("public", Scan(1, 4, 9, 3, "g2", "g2", True, "Dzbh")),
                                   ("raw", Scan(2, 4, 5, 3, "g4", "ii", False, "Dzb")),
                                   ("public", Fork(2, 3, 2, 4, 3, "ii", "g2"))],
                         ids=lambda v: str(v))
def test_compile_fullgraph_aot_eager(api, c, seed, kernel_backend, clean_env):
    inp = c.inputs(seed, F32)
    names = [k for k in c.keys if inp[k] is not None]
    n_out = len(c.out_names)

    def fn(*xs):
        a = {**dict.fromkeys(c.keys), **dict(zip(names, xs))}
        outs = c.call(a, kernel_backend) if api == "public" else c.raw(a, kernel_backend)[:n_out]
        return tuple(torch.tanh(o) * (i + 2) for i, o in enumerate(outs))

    T.compile_check(fn, inp, names, "aot_eager")


# --------------------------------------------------------------------------
# Bad inputs

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "prefix_len")
NB, ND, NL, NN = 2, 8, 5, 4      # selective_scan: (b, dim, L, N)
FP, FS = 3, 1                    # fork_scan: prefix 3, suffix 1: L = 5 as well


def _t(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


BAD = [
    # (id, exception, argument named first, overrides of B / C / A, for (scan, fork), other text the message has)
    ("B-3-groups", ValueError, "B", (dict(B=_t(NB, 3, NN, NL)), dict(B=_t(NB, NL, 3, NN))), ("3 groups", "dim = 8")),
    ("C-3-groups", ValueError, "C", (dict(C=_t(NB, 3, NN, NL)), dict(C=_t(NB, NL, 3, NN))), ("3 groups", "dim = 8")),
    ("B-16-groups", ValueError, "B", (dict(B=_t(NB, 16, NN, NL)), dict(B=_t(NB, NL, 16, NN))), ("16 groups",)),
    ("B2-C4-groups", ValueError, "B",
     (dict(B=_t(NB, 2, NN, NL), C=_t(NB, 4, NN, NL)), dict(B=_t(NB, NL, 2, NN), C=_t(NB, NL, 4, NN))), ("C",)),
    ("B1-C2-groups", ValueError, "B", (dict(C=_t(NB, 2, NN, NL)), dict(C=_t(NB, NL, 2, NN))), ("C",)),
    ("B4-C1-groups", ValueError, "B", (dict(B=_t(NB, 4, NN, NL)), dict(B=_t(NB, NL, 4, NN))), ("C",)),
    ("B-grouped-bfloat16", TypeError, "B",
     (dict(B=_t(NB, 2, NN, NL, dtype=BF16)), dict(B=_t(NB, NL, 2, NN, dtype=BF16))), ()),
    ("C-grouped-float64", TypeError, "C",
     (dict(C=_t(NB, 2, NN, NL, dtype=F64)), dict(C=_t(NB, NL, 2, NN, dtype=F64))), ()),
    ("B-grouped-dstate", ValueError, "B", (dict(B=_t(NB, 2, NN + 1, NL)), dict(B=_t(NB, NL, 2, NN + 1))), ()),
    ("C-grouped-seqlen", ValueError, "C", (dict(C=_t(NB, 2, NN, NL + 1)), dict(C=_t(NB, NL + 1, 2, NN))), ()),
    ("B-grouped-batch", ValueError, "B", (dict(B=_t(1, 2, NN, NL)), dict(B=_t(1, NL, 2, NN))), ()),
    ("B-grouped-other-major", ValueError, "B", (dict(B=_t(NB, NL, 2, NN)), dict(B=_t(NB, 2, NN, NL))), ()),
    ("B-grouped-meta", ValueError, "B",
     (dict(B=torch.empty(NB, 2, NN, NL, device="meta")), dict(B=torch.empty(NB, NL, 2, NN, device="meta"))), ()),
    ("B-ii-dim", ValueError, "B", (dict(B=_t(ND + 1, NN)),) * 2, ()),
    ("C-ii-dstate", ValueError, "C", (dict(C=_t(ND, NN + 1)),) * 2, ()),
    ("C-ii-transposed", ValueError, "C", (dict(C=_t(NN, ND)),) * 2, ()),
    ("B-ii-int", TypeError, "B", (dict(B=torch.ones(ND, NN, dtype=torch.int64)),) * 2, ()),
    ("B-rank5", ValueError, "B", (dict(B=_t(NB, 2, NN, NL, 1)), dict(B=_t(NB, NL, 2, NN, 1))), ()),
    ("C-rank1", ValueError, "C", (dict(C=_t(NN)),) * 2, ()),
    ("A-complex", TypeError, "A", (dict(A=-torch.rand(ND, NN, dtype=torch.complex64)),) * 2, ("complex",)),
    ("B-complex", TypeError, "B",
     (dict(B=torch.randn(NB, NN, NL, dtype=torch.complex64)), dict(B=torch.randn(NB, NL, NN, dtype=torch.complex64))),
     ("complex",)),
    ("C-ii-complex", TypeError, "C", (dict(C=torch.randn(ND, NN, dtype=torch.complex128)),) * 2, ("complex",)),
]


def _bad_inputs(op: str, over: Dict) -> Dict:
    if op == "scan":
        inp = T.scan_inputs(5, NB, ND, NL, NN, F32, has_h0=True)
    else:
        inp = T.fork_inputs(5, NB, FP, FS, ND, NN, F32)
    inp.update(over)
    return inp


def _call_bad(op: str, inp: Dict, backend: str):
    if op == "scan":
        return Scan(NB, ND, NL, NN).call(inp, backend)
    return Fork(NB, FP, FS, ND, NN).call(inp, backend)


@pytest.mark.parametrize("op", ["scan", "fork"])
@pytest.mark.parametrize("spec", BAD, ids=[s[0] for s in BAD])
def test_bad_input(spec, op, backend):
    """The public op (every backend): the error names the argument first; also what else it must say."""
    _, exc, name, over, says = spec
    inp = _bad_inputs(op, over[op == "fork"])
    msg = T.check_raises_first(exc, name, ARG_NAMES, _call_bad, op, inp, backend)
    for text in says:
        assert re.search(rf"(?<!\w){re.escape(text)}(?!\w)", msg), f"message does not say {text!r}: {msg!r}"


RAW_BAD = [
    # (id, exception, argument named, overrides for (scan, fork), another argument the message names)
    ("B-3-groups", ValueError, "B", (dict(B=_t(NB, 3, NN, NL)), dict(B=_t(NB, NL, 3, NN))), None),
    ("C-3-groups", ValueError, "C", (dict(C=_t(NB, 3, NN, NL)), dict(C=_t(NB, NL, 3, NN))), None),
    ("B2-C4-groups", ValueError, "B",
     (dict(B=_t(NB, 2, NN, NL), C=_t(NB, 4, NN, NL)), dict(B=_t(NB, NL, 2, NN), C=_t(NB, NL, 4, NN))), "C"),
    ("B-grouped-bfloat16", TypeError, "B",
     (dict(B=_t(NB, 2, NN, NL, dtype=BF16)), dict(B=_t(NB, NL, 2, NN, dtype=BF16))), None),
    ("B-ii-float64", TypeError, "B", (dict(B=_t(ND, NN, dtype=F64)),) * 2, None),  # raw: accumulation dtype only
    ("C-ii-float16", TypeError, "C", (dict(C=_t(ND, NN, dtype=F16)),) * 2, None),
    ("B-ii-dim", ValueError, "B", (dict(B=_t(ND + 1, NN)),) * 2, None),
    ("C-grouped-seqlen", ValueError, "C", (dict(C=_t(NB, 2, NN, NL - 1)), dict(C=_t(NB, NL - 1, 2, NN))), None),
]


@pytest.mark.parametrize("op", ["scan", "fork"])
@pytest.mark.parametrize("spec", RAW_BAD, ids=[s[0] for s in RAW_BAD])
def test_raw_op_bad_input(spec, op, kernel_backend):
    """The compiled ops check B / C again: a direct torch.ops call raises, never reads out of bounds."""
    _, exc, name, over, also = spec
    inp = _bad_inputs(op, over[op == "fork"])
    c = Scan(NB, ND, NL, NN) if op == "scan" else Fork(NB, FP, FS, ND, NN)
    msg = T.check_raises(exc, name, c.raw, inp, kernel_backend)
    if also:
        assert T.first_named(msg, (also,)) == also, f"message does not name {also!r}: {msg!r}"


def test_raw_op_input_independent_half(kernel_backend):
    """Half-precision u: the raw op takes an input-independent B / C in float32 only (the public op casts)."""
    c = Scan(NB, ND, NL, NN, "ii", "ii")
    inp = c.inputs(3, BF16)
    assert inp["B"].dtype == F32
    c.raw(inp, kernel_backend)
    T.check_raises(TypeError, "C", c.raw, dict(inp, C=inp["C"].to(BF16)), kernel_backend)
