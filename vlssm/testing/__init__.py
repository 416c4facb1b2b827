"""Test helpers of vlssm, importable by every test, benchmark check and the CUDA case checker.

One home for what the tests share (``from vlssm import testing as T``):

- tolerances: :data:`FWD_TOL` / :data:`GRAD_TOL` (kernel vs the float64 reference, norm-wise),
  :data:`ELEMENTWISE_TOL` (the same, every element), :data:`RTOL` (modules), :data:`HALF_EPS` and
  :func:`assert_half_rule` (flash-attention's rule for bfloat16 / float16: kernel error <= 2x the
  same-precision reference error + eps);
- errors: :func:`rel_err` (||a - b|| / ||b|| in float64), :func:`assert_rel`,
  :func:`assert_elementwise`, :func:`assert_close_rel`;
- :func:`poison_allocator` (NaN-filled freed blocks, so an unwritten output reads NaN) and
  :func:`deterministic_algorithms` (a context);
- seeds and draws: :func:`seed_of`, :func:`gen`, :func:`randn`; :func:`grads_of`, :func:`compile_check`;
- bad input: :func:`check_raises` (the error names the argument), :func:`check_raises_first` (and
  names it first), :func:`with_bad` / :func:`meta_like` (a bad-input case applied to valid inputs);
- backends: :data:`HAS_EXT`, ``requires_ext`` (a pytest mark), :func:`triton_reason`,
  :func:`require_backend` (skip), :func:`skip_slow_triton`, :func:`raw_op`;
  :func:`assert_backend_selection` (backend=None / "auto" / VLSSM_BACKEND);
  :func:`~vlssm._dtypes.acc_dtype` (the one accumulation-dtype rule);
- the op tests' shared checks: :func:`assert_grads` (every gradient vs the reference's),
  :func:`gradcheck`, :func:`opcheck`, :func:`assert_deterministic` (bitwise, any thread count),
  :func:`assert_layout_invariant` (strided views give the contiguous result bitwise);
- :mod:`vlssm.testing.ops`: the ops' input generators and literal implementations written
  independently of vlssm (re-exported here); :mod:`vlssm.testing.modules`: the literal Mamba block
  and QMVL; :mod:`vlssm.testing.models`: small random models and batches.

Importing it needs torch only; pytest is imported by the helpers that raise or skip.
"""
from __future__ import annotations

import contextlib
import re
import zlib
from typing import Callable, Dict, Iterable, Optional, Sequence

import torch

from .. import _backend
from .._dtypes import acc_dtype  # noqa: F401 - T.acc_dtype, the one accumulation-dtype rule

HAS_EXT = _backend.load_extension() is not None


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """torch.use_deterministic_algorithms(True, warn_only=warn_only) inside the block, the caller's
    setting (both flags) after it."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


EXT_SKIP_REASON = f"compiled extension vlssm._C is not importable: {_backend.extension_error()}"


def __getattr__(name: str):
    # pytest marks, made on first use so that importing this module never needs pytest
    if name == "requires_ext":
        import pytest

        return pytest.mark.skipif(not HAS_EXT, reason=EXT_SKIP_REASON)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: The Triton kernels run under the interpreter (CPU tensors): about 0.2 ms per
#: block operation, so the tests give them only their smallest cases.
TRITON_INTERPRETED = _backend.triton_interpreting()


def triton_reason() -> Optional[str]:
    """Why backend="triton" cannot run on CPU tensors here, or None."""
    return _backend._usable("triton", torch.device("cpu"))


def child_env(**overrides: str) -> Dict[str, str]:
    """The environment of a child Python process (``subprocess.run([sys.executable, ...], env=...)``)
    that must import the very vlssm this process imported, installed or a source tree:
    ``os.environ`` with that vlssm's parent folder first on PYTHONPATH, then ``overrides``.

    PYTHONPATH comes after the child's own first ``sys.path`` entry: the script's folder, or the
    working directory for ``-c`` / ``-m``. Run such a child where no other ``vlssm/`` folder lies
    (a temporary folder, or that parent folder itself). vlssm.bench's worker subprocesses put the
    folder first in ``sys.path`` instead (``_harness.run_isolated``): they run from any directory."""
    import os

    import vlssm

    root = os.path.dirname(os.path.dirname(os.path.abspath(vlssm.__file__)))
    rest = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=root + (os.pathsep + rest if rest else ""))
    env.update(overrides)
    return env


def require_backend(backend: Optional[str], device: str = "cpu") -> Optional[str]:
    """Skip the calling test where ``backend`` cannot run on ``device`` tensors here.

    The reason is the backend resolver's own (``vlssm._backend._usable``): e.g. "cpu" without the
    compiled extension vlssm._C, "triton" without triton or its interpreter on CPU tensors, any
    backend on "cuda" without a CUDA device. "reference", None and "auto" always run. Returns
    ``backend``."""
    import pytest

    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend in ("cpu", "cuda", "triton"):
        why = _backend._usable(backend, dev)
        if why is not None:
            pytest.skip(why)
    return backend


def raw_op(name: str, backend: str, backward: bool = False):
    """The raw op ``torch.ops.vlssm.<name>[_backward][_triton]`` of a kernel backend ("cpu" or
    "triton"): ``raw_op("fork_scan", "triton", True)`` is torch.ops.vlssm.fork_scan_backward_triton."""
    if backend not in ("cpu", "triton"):
        raise ValueError(f"raw ops exist for the kernel backends 'cpu' and 'triton', not {backend!r}")
    suffix = ("_backward" if backward else "") + ("_triton" if backend == "triton" else "")
    return getattr(torch.ops.vlssm, name + suffix)


def skip_slow_triton(backend: str, small: bool) -> None:
    """Skip a case that is not ``small`` on the interpreted Triton backend (tests/gpu runs such sizes on a GPU)."""
    if backend == "triton" and TRITON_INTERPRETED and not small:
        import pytest

        pytest.skip("too slow for the Triton interpreter (tests/gpu runs such sizes on a GPU)")


#: Norm-wise relative tolerance of the forward of a kernel vs the float64 reference.
FWD_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
#: Norm-wise relative tolerance of every gradient vs the float64 reference autograd.
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
#: Added to 2x the same-precision reference error in the half-precision rule.
HALF_EPS = 1e-6
#: Norm-wise relative tolerance of a module (vlssm.modules) vs its literal float64 / float32 version.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}
#: Norm-wise relative tolerance of one compiled backend vs another on the same inputs (CUDA vs CPU
#: kernels, vlssm.bench.check_cuda), outputs and gradients alike.
CROSS_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}

#: (rtol, atol_frac) of :func:`assert_elementwise` for a kernel's result vs the float64 reference:
#: every element, where the norm-wise :data:`FWD_TOL` could hide one wrong element.
ELEMENTWISE_TOL = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-11)}

HALF_DTYPES = (torch.bfloat16, torch.float16)


def seed_of(*parts) -> int:
    """A stable seed from any printable parts (e.g. the test's node id)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(g: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0):
    """float64 normal draws (scale, shift) cast to ``dtype``: same values for every dtype."""
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


def up(t):
    """float64 version of ``t``, differentiable (None stays None)."""
    return None if t is None else t.double()


def up_all(inputs: Dict[str, Optional[torch.Tensor]]) -> Dict[str, Optional[torch.Tensor]]:
    """float64 copies of every input: leaves whose gradients are not rounded to a lower dtype."""
    return {k: (None if v is None else v.detach().double()) for k, v in inputs.items()}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, computed in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (max |a - b| when b is all zeros): the benchmarks' sanity check."""
    a, b = a.detach().double(), b.detach().double()
    den = b.abs().max().item() if b.numel() else 0.0
    num = (a - b).abs().max().item() if a.numel() else 0.0
    return num / den if den > 0 else num


def assert_close_rel(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float,
                     names: Sequence[str]) -> None:
    """Every ``actual[i]`` finite, of ``expected[i]``'s shape, within ``rtol`` (norm-wise); one
    assertion that lists every tensor that is not."""
    assert len(actual) == len(expected) == len(names)
    bad = []
    for a, e, n in zip(actual, expected, names):
        assert a.shape == e.shape, f"{n}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{n}: non-finite values"
        err = rel_err(a, e)
        if not err <= rtol:
            bad.append(f"{n}: rel err {err:.3g} > {rtol:.1g}")
    assert not bad, "; ".join(bad)


def assert_rel(name: str, actual: torch.Tensor, expected: torch.Tensor, tol: float) -> float:
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    assert expected.double().norm() > 0, f"{name}: the expected value is all zeros; the check would be vacuous"
    err = rel_err(actual, expected)
    assert err < tol, f"{name}: rel err {err:.3g} >= {tol:.1g}"
    return err


def assert_elementwise(name: str, actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol_frac: float):
    """Every element close: catches a single unwritten / garbage element that a norm hides."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(a))[:5].tolist()}"
    atol = atol_frac * float(e.abs().max())
    bad = (a - e).abs() > atol + rtol * e.abs()
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements differ, first at "
        f"{torch.nonzero(bad)[:5].tolist()}: {a[bad][:5].tolist()} vs {e[bad][:5].tolist()}"
    )


def assert_half_rule(name: str, kernel_out, ref_same_prec, ref64) -> None:
    """flash-attention's rule: kernel error <= 2x the same-precision reference error + eps."""
    assert torch.isfinite(kernel_out).all(), f"{name}: non-finite values"
    k = rel_err(kernel_out, ref64)
    r = rel_err(ref_same_prec, ref64)
    assert r > 0, f"{name}: the same-precision reference is exact; the rule would be vacuous"
    assert k <= 2 * r + HALF_EPS, f"{name}: kernel rel err {k:.3g} > 2 x reference rel err {r:.3g} + {HALF_EPS}"


def compile_check(fn, inp, names, compiled_backend, tol=1e-6):
    """``torch.compile(fn, fullgraph=True)`` matches eager ``fn`` on ``inp[names]``: outputs and gradients."""
    leaves_e = [inp[k].clone().requires_grad_(True) for k in names]
    leaves_c = [inp[k].clone().requires_grad_(True) for k in names]
    out_e = fn(*leaves_e)
    cfn = torch.compile(fn, fullgraph=True, backend=compiled_backend)
    out_c = cfn(*leaves_c)
    g = gen(99)
    cots = [randn(g, *o.shape, dtype=o.dtype) for o in out_e]
    sum((o * w).sum() for o, w in zip(out_e, cots)).backward()
    sum((o * w).sum() for o, w in zip(out_c, cots)).backward()
    for i, (a, e) in enumerate(zip(out_c, out_e)):
        assert_rel(f"output {i}", a, e, tol)
    for k, a, e in zip(names, leaves_c, leaves_e):
        assert_rel(f"d{k}", a.grad, e.grad, tol)


def poison_allocator(*tensors_like: torch.Tensor, copies: int = 4) -> None:
    """Best effort: leave NaN-filled freed blocks of the outputs' sizes behind,
    on each like-tensor's device.

    Outputs are allocated inside the ops (``at::empty``), so they cannot be
    pre-filled; small freed blocks are often handed out again by malloc (CPU)
    or the caching allocator (CUDA), so an unwritten output element then reads
    NaN and fails ``isfinite``. The elementwise comparisons are the guaranteed
    check.
    """
    keep = []
    for t in tensors_like:
        for _ in range(copies):
            keep.append(torch.full(t.shape, float("nan"), dtype=t.dtype, device=t.device))
    del keep


def check_raises(exc, name: str, fn, *args, **kwargs) -> str:
    """``fn(*args)`` raises ``exc`` and ``name`` is the first argument its message names."""
    import pytest

    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"message does not name {name!r}: {msg!r}"
    return msg


def check_raises_first(exc, name: str, names: Iterable[str], fn, *args, **kwargs) -> str:
    """:func:`check_raises`, and ``name`` is the first of ``names`` (every argument of the op) that the
    message names: the error points at the argument that is wrong, not at one it was checked against."""
    msg = check_raises(exc, name, fn, *args, **kwargs)
    assert first_named(msg, names) == name, f"first argument named should be {name!r}: {msg!r}"
    return msg


def meta_like(t: torch.Tensor) -> torch.Tensor:
    """An empty tensor of ``t``'s shape and dtype on the meta device (no data: a bad input for a kernel)."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def with_bad(valid: Dict, spec) -> Dict:
    """A copy of the inputs ``valid`` with one bad-input case applied. ``spec``: a dict of overrides;
    "meta:<k>": input k as :func:`meta_like`; "numpy:<k>": input k as a numpy array."""
    inp = dict(valid)
    if isinstance(spec, dict):
        inp.update(spec)
    elif spec.startswith("meta:"):
        inp[spec[5:]] = meta_like(inp[spec[5:]])
    elif spec.startswith("numpy:"):
        inp[spec[6:]] = inp[spec[6:]].numpy()
    else:
        raise ValueError(f"unknown bad-input spec {spec!r}")
    return inp


def first_named(msg: str, names: Iterable[str]) -> Optional[str]:
    """The first of ``names`` that occurs as a whole word in ``msg``."""
    best = None
    for n in names:
        m = re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), n)
    return None if best is None else best[1]


def grads_of(fn, inputs: Dict[str, Optional[torch.Tensor]], cotangents: Sequence[torch.Tensor], copy: bool = True):
    """Outputs of ``fn(**leaves)`` and d<outputs, cotangents>/d(every non-None input), by name.

    ``copy=False`` keeps the inputs' layout: the leaves are detached aliases (same strides).
    """
    leaves = {k: (None if v is None else (v.detach().clone() if copy else v.detach()).requires_grad_(True))
              for k, v in inputs.items()}
    outs = fn(**leaves)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o.double() * c.double()).sum() for o, c in zip(outs, cotangents))
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return [o.detach() for o in outs], dict(zip(names, grads))


def assert_grads(grads: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                 inputs: Dict[str, Optional[torch.Tensor]], tol: float, *, zero_atol: Optional[float] = None) -> None:
    """Gradients (by input name) vs ``expected`` ones, e.g. the float64 reference autograd's: one for
    every non-None input and no other; each d<k> of input k's dtype and shape and finite; and
    rel_err(d<k>, expected[k]) < ``tol``, in one assertion that lists every gradient that is not.
    An empty gradient has nothing more to compare. Where expected[k] is all zeros and ``zero_atol`` is
    given, every |d<k>| < ``zero_atol`` instead (a relative error is undefined there; without
    ``zero_atol`` such a gradient must be exactly zero)."""
    want = {k for k, v in inputs.items() if v is not None}
    assert set(grads) == set(expected) == want, \
        f"gradients of {sorted(grads)}, expected {sorted(expected)}, inputs {sorted(want)}"
    bad = []
    for k, gk in grads.items():
        assert gk.dtype == inputs[k].dtype and gk.shape == inputs[k].shape, \
            f"d{k}: {gk.dtype} {tuple(gk.shape)}, input {inputs[k].dtype} {tuple(inputs[k].shape)}"
        assert torch.isfinite(gk).all(), f"d{k} not finite"
        if gk.numel() == 0:
            continue
        if zero_atol is not None and expected[k].norm() == 0:
            assert gk.abs().max() < zero_atol, f"d{k} must be zero"
            continue
        err = rel_err(gk, expected[k])
        if not err < tol:
            bad.append(f"d{k}: {err:.3g}")
    assert not bad, f"rel err >= tol {tol:.1g}: " + ", ".join(bad)


def gradcheck(call: Callable[[Dict], object], inputs: Dict, backend: Optional[str] = None, *, eps: float = 1e-6,
              atol: float = 1e-6, rtol: float = 1e-5, fast_mode: Optional[bool] = None) -> None:
    """``torch.autograd.gradcheck`` of ``call(a)`` w.r.t. every non-empty tensor of ``inputs`` (float64;
    clones are the leaves, ``a`` is ``inputs`` with the leaves in place; None and other values pass as
    they are). ``fast_mode`` None: on the interpreted Triton ``backend`` one random direction per input
    instead of the full Jacobian, elsewhere the full Jacobian."""
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.numel() > 0]
    leaves = [inputs[k].clone().requires_grad_(True) for k in names]
    if fast_mode is None:
        fast_mode = backend == "triton" and TRITON_INTERPRETED

    def fn(*xs):
        return call({**inputs, **dict(zip(names, xs))})

    assert torch.autograd.gradcheck(fn, leaves, eps=eps, atol=atol, rtol=rtol, fast_mode=fast_mode)


def opcheck(op, args) -> None:
    """``torch.library.opcheck(op, args)``: every check (schema, fake tensor, autograd registration,
    AOT dispatch) reports SUCCESS."""
    res = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in res.values()), res


def assert_deterministic(fn: Callable[[], Sequence[torch.Tensor]]) -> None:
    """``fn()`` (e.g. an op's outputs and gradients) is deterministic and independent of the thread
    count: under ``torch.use_deterministic_algorithms(True)`` (an op that alerts raises) it runs twice
    with 2 threads and once with 1 thread, and every result is bitwise equal across the three runs.
    The caller's thread count and deterministic setting are restored."""
    n = torch.get_num_threads()
    try:
        with deterministic_algorithms():
            torch.set_num_threads(2)
            r1, r2 = list(fn()), list(fn())
            torch.set_num_threads(1)
            r3 = list(fn())
    finally:
        torch.set_num_threads(n)
    assert len(r1) == len(r2) == len(r3) > 0
    for i, (a, b, c) in enumerate(zip(r1, r2, r3)):
        assert torch.equal(a, b), f"result {i} differs between two runs"
        assert torch.equal(a, c), f"result {i} differs between 2 threads and 1 thread"


def assert_layout_invariant(call, inputs: Dict[str, Optional[torch.Tensor]], views: Dict[str, Optional[torch.Tensor]],
                            cotangents: Sequence[torch.Tensor], out_names: Optional[Sequence[str]] = None) -> None:
    """``call(**views)`` gives bitwise the outputs and gradients (:func:`grads_of`) of ``call(**inputs)``:
    ``views`` hold the same values as ``inputs`` in other layouts (slices, transposes, stride 0) and
    are the leaves themselves (no copy in between)."""
    outs, grads = grads_of(call, inputs, cotangents)
    outs_v, grads_v = grads_of(call, views, cotangents, copy=False)
    names = list(out_names) if out_names is not None else [f"output {i}" for i in range(len(outs))]
    assert len(outs_v) == len(outs) and set(grads_v) == set(grads)
    for name, a, e in zip(names, outs_v, outs):
        assert torch.equal(a, e), f"{name} differs from the contiguous result"
    for k in grads:
        assert torch.equal(grads_v[k], grads[k]), f"d{k} differs from the contiguous result"


def assert_backend_selection(call: Callable[[Optional[str]], torch.Tensor], monkeypatch) -> None:
    """How an op picks its backend on CPU tensors; ``call(backend)`` runs the op (same inputs) and
    returns a tensor, which must differ bitwise between "cpu" and "reference" (else the check is vacuous):

    - backend=None and "auto" pick "cpu" (the compiled kernel);
    - VLSSM_BACKEND=reference makes None pick the reference; an explicit backend="cpu" still wins;
    - a nonsense VLSSM_BACKEND raises ValueError naming VLSSM_BACKEND.

    ``monkeypatch`` (pytest's) sets the variable; it is unset at the start."""
    monkeypatch.delenv("VLSSM_BACKEND", raising=False)
    y_cpu, y_ref = call("cpu"), call("reference")
    assert not torch.equal(y_cpu, y_ref), "cpu and reference agree bitwise: the selection check is vacuous"
    assert torch.equal(call(None), y_cpu), "backend=None did not pick cpu"
    assert torch.equal(call("auto"), y_cpu), "backend='auto' did not pick cpu"
    monkeypatch.setenv("VLSSM_BACKEND", "reference")
    assert torch.equal(call(None), y_ref), "VLSSM_BACKEND=reference: backend=None did not pick the reference"
    assert torch.equal(call("cpu"), y_cpu), "VLSSM_BACKEND=reference overrode an explicit backend='cpu'"
    monkeypatch.setenv("VLSSM_BACKEND", "nonsense")
    check_raises(ValueError, "VLSSM_BACKEND", call, None)


from .ops import *  # noqa: E402,F401,F403 - the op tests' generators and literals, as T.*
