"""Shared helpers of the op tests (tests/ops/).

Tests run with ``--import-mode=importlib``; tests/ops/conftest.py puts this
directory on ``sys.path`` so test files can ``import _ops_testlib as T``.

Contents:
- input generators (seeded, realistic magnitudes, never zeros) for the three ops;
- error metrics (``rel_err`` = ||a - b|| / ||b|| in float64) and assertions;
- ``literal_*``: implementations of the three ops written independently of
  vlssm (plain Python loops over time / taps, explicit cat and reverse order),
  used to check the references, which in turn are the ground truth of the
  compiled kernels (docs/design.md section 4);
- ``check_raises``: bad-input assertion that the error names the argument.
"""
from __future__ import annotations

import contextlib
import re
import zlib
from typing import Dict, Iterable, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from vlssm import _backend

HAS_EXT = _backend.load_extension() is not None


@contextlib.contextmanager
def deterministic_algorithms(warn_only: bool = False):
    """torch.use_deterministic_algorithms(True, warn_only=warn_only) inside the block, the caller's
    setting (both flags) after it."""
    prev, prev_warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
EXT_SKIP_REASON = f"compiled extension vlssm._C is not importable: {_backend.extension_error()}"
requires_ext = pytest.mark.skipif(not HAS_EXT, reason=EXT_SKIP_REASON)

#: The Triton kernels run under the interpreter (CPU tensors): about 0.2 ms per
#: block operation, so the tests give them only their smallest cases.
TRITON_INTERPRETED = _backend.triton_interpreting()


def triton_reason() -> Optional[str]:
    """Why backend="triton" cannot run on CPU tensors here, or None."""
    return _backend._usable("triton", torch.device("cpu"))


def skip_slow_triton(backend: str, small: bool) -> None:
    """Skip a case that is not ``small`` on the interpreted Triton backend (tests/gpu runs such sizes on a GPU)."""
    if backend == "triton" and TRITON_INTERPRETED and not small:
        pytest.skip("too slow for the Triton interpreter (tests/gpu runs such sizes on a GPU)")


#: Norm-wise relative tolerance of the forward of a kernel vs the float64 reference.
FWD_TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
#: Norm-wise relative tolerance of every gradient vs the float64 reference autograd.
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
#: Added to 2x the same-precision reference error in the half-precision rule.
HALF_EPS = 1e-6

HALF_DTYPES = (torch.bfloat16, torch.float16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seed_of(*parts) -> int:
    """A stable seed from any printable parts (e.g. the test's node id)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def randn(g: torch.Generator, *shape: int, dtype=torch.float32, scale: float = 1.0, shift: float = 0.0):
    """float64 normal draws (scale, shift) cast to ``dtype``: same values for every dtype."""
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


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
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", msg), f"message does not name {name!r}: {msg!r}"
    return msg


def first_named(msg: str, names: Iterable[str]) -> Optional[str]:
    """The first of ``names`` that occurs as a whole word in ``msg``."""
    best = None
    for n in names:
        m = re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", msg)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), n)
    return None if best is None else best[1]


# --------------------------------------------------------------------------
# Input generators.

def make_A(g: torch.Generator, dim: int, N: int, style: str, dtype=torch.float32) -> torch.Tensor:
    """Negative A: "exp" = -exp(randn * 0.5), "arange" = -(1..N) per row (mamba init) + jitter."""
    if style == "exp":
        return (-torch.exp(randn(g, dim, N, dtype=torch.float64, scale=0.5))).to(dtype)
    base = -torch.arange(1, N + 1, dtype=torch.float64).expand(dim, N)
    return (base * torch.exp(randn(g, dim, N, dtype=torch.float64, scale=0.1))).to(dtype)


def make_delta(g: torch.Generator, *shape: int, softplus: bool, dtype=torch.float32) -> torch.Tensor:
    """delta ~ randn * 0.5 - 1 before softplus; positive dt of the same size without it."""
    raw = randn(g, *shape, dtype=torch.float64, scale=0.5, shift=-1.0)
    return (raw if softplus else F.softplus(raw)).to(dtype)


def make_bias(g: torch.Generator, dim: int, *, softplus: bool, dtype=torch.float32) -> torch.Tensor:
    """delta_bias: randn * 0.5 before softplus; small and positive without it (dt must stay > 0)."""
    raw = randn(g, dim, dtype=torch.float64, scale=0.5)
    return (raw if softplus else 0.05 + 0.1 * raw.abs()).to(dtype)


def scan_inputs(seed: int, b: int, dim: int, L: int, N: int, dtype=torch.float32, *, has_D=True, has_z=True,
                has_bias=True, has_h0=False, softplus=True, A_style="exp") -> Dict[str, Optional[torch.Tensor]]:
    """selective_scan inputs, channel-major: u, delta, z (b, D, L); B, C (b, N, L).

    Parameters (A, D, delta_bias, initial_state) are in the accumulation dtype.
    """
    g = gen(seed)
    pd = acc_dtype(dtype)
    return dict(
        u=randn(g, b, dim, L, dtype=dtype),
        delta=make_delta(g, b, dim, L, softplus=softplus, dtype=dtype),
        A=make_A(g, dim, N, A_style, pd),
        B=randn(g, b, N, L, dtype=dtype),
        C=randn(g, b, N, L, dtype=dtype),
        D=randn(g, dim, dtype=pd) if has_D else None,
        z=randn(g, b, dim, L, dtype=dtype) if has_z else None,
        delta_bias=make_bias(g, dim, softplus=softplus, dtype=pd) if has_bias else None,
        initial_state=randn(g, b, dim, N, dtype=pd) if has_h0 else None,
    )


SCAN_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def conv_inputs(seed: int, b: int, p: int, s: int, E: int, K: int, dtype=torch.float32, *, has_bias=True):
    """fork_conv1d inputs, token-major: x_prefix (b, p, E), x_suffix (b, s, E), weight (E, K), bias (E,)."""
    g = gen(seed)
    return dict(
        x_prefix=randn(g, b, p, E, dtype=dtype),
        x_suffix=randn(g, b, s, E, dtype=dtype),
        weight=randn(g, E, K, dtype=dtype, scale=K ** -0.5),
        bias=randn(g, E, dtype=dtype, scale=0.5) if has_bias else None,
    )


CONV_KEYS = ("x_prefix", "x_suffix", "weight", "bias")


def fork_inputs(seed: int, b: int, p: int, s: int, E: int, N: int, dtype=torch.float32, *, has_D=True, has_z=True,
                has_bias=True, softplus=True, A_style="exp") -> Dict[str, Optional[torch.Tensor]]:
    """fork_scan inputs, token-major: u, delta (b, p+2s, E); B, C (b, p+2s, N); z (b, s, E)."""
    g = gen(seed)
    pd = acc_dtype(dtype)
    L = p + 2 * s
    return dict(
        u=randn(g, b, L, E, dtype=dtype),
        delta=make_delta(g, b, L, E, softplus=softplus, dtype=dtype),
        A=make_A(g, E, N, A_style, pd),
        B=randn(g, b, L, N, dtype=dtype),
        C=randn(g, b, L, N, dtype=dtype),
        D=randn(g, E, dtype=pd) if has_D else None,
        z=randn(g, b, s, E, dtype=dtype) if has_z else None,
        delta_bias=make_bias(g, E, softplus=softplus, dtype=pd) if has_bias else None,
    )


FORK_KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


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


# --------------------------------------------------------------------------
# Literal implementations, independent of vlssm (float64, loops).

def _softplus_literal(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 20, x, torch.log(1 + torch.exp(torch.clamp(x, max=20))))


def literal_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           reverse=False, initial_state=None):
    """mamba_ssm semantics with a step loop in scan order (reverse walks l = L-1 .. 0); float64."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    b, dim, L = u.shape
    N = A.shape[1]
    h = torch.zeros(b, dim, N, dtype=torch.float64) if initial_state is None else initial_state.double().clone()
    out = torch.full((b, dim, L), float("nan"), dtype=torch.float64)
    for l in (range(L - 1, -1, -1) if reverse else range(L)):
        dt = delta[:, :, l] + (0 if delta_bias is None else delta_bias.double())
        if delta_softplus:
            dt = _softplus_literal(dt)
        h = torch.exp(dt[:, :, None] * A[None]) * h + (dt * u[:, :, l])[:, :, None] * B[:, None, :, l]
        y = (h * C[:, None, :, l]).sum(-1)
        if D is not None:
            y = y + D.double() * u[:, :, l]
        if z is not None:
            zl = z[:, :, l].double()
            y = y * zl / (1 + torch.exp(-zl))
        out[:, :, l] = y
    return out, h


def literal_causal_conv_silu(seq: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """(b, L, E) token-major; out[t] = silu(bias + sum_k w[:, k] * seq[t - (K-1) + k])."""
    b, L, E = seq.shape
    K = weight.shape[1]
    seq, weight = seq.double(), weight.double()
    out = torch.zeros(b, L, E, dtype=torch.float64) + (0 if bias is None else bias.double())
    for t in range(L):
        for k in range(K):
            q = t - (K - 1) + k
            if q >= 0:
                out[:, t] += weight[:, k] * seq[:, q]
    return out * torch.sigmoid(out)


def literal_fork_conv1d(x_prefix, x_suffix, weight, bias=None):
    """[prefix | suffix in [P, S] | suffix in [P, rev S] in token order], float64."""
    p, s = x_prefix.shape[1], x_suffix.shape[1]
    rev_idx = torch.arange(s - 1, -1, -1)
    seq_f = torch.cat([x_prefix, x_suffix], 1)
    seq_r = torch.cat([x_prefix, x_suffix[:, rev_idx]], 1)
    yf = literal_causal_conv_silu(seq_f, weight, bias)
    yr = literal_causal_conv_silu(seq_r, weight, bias)
    # token i of S sits at position p + s - 1 - i of [P, rev S]
    return torch.cat([yf, yr[:, p + s - 1 - torch.arange(s)]], 1)


def literal_fork_scan(u, delta, A, B, C, D, z, delta_bias, prefix_len, delta_softplus=True):
    """Two literal scans of [P, S] and [P, rev S], suffix outputs summed in token order, gated; float64."""
    p = prefix_len
    s = (u.shape[1] - p) // 2
    rev = p + s + torch.arange(s - 1, -1, -1)  # reversed segment, walked from its end

    def seqs(t):
        fwd = torch.cat([t[:, :p], t[:, p:p + s]], 1)
        rv = torch.cat([t[:, :p], t[:, rev]], 1)
        return fwd.transpose(1, 2), rv.transpose(1, 2)

    (u1, u2), (d1, d2), (B1, B2), (C1, C2) = seqs(u), seqs(delta), seqs(B), seqs(C)
    y1, _ = literal_selective_scan(u1, d1, A, B1, C1, D, None, delta_bias, delta_softplus)
    y2, _ = literal_selective_scan(u2, d2, A, B2, C2, D, None, delta_bias, delta_softplus)
    y1 = y1[:, :, p:]                      # suffix token i at position p + i
    y2 = y2[:, :, p + s - 1 - torch.arange(s)]  # suffix token i at position p + s - 1 - i
    y = (y1 + y2).transpose(1, 2)
    if z is not None:
        zz = z.double()
        y = y * zz * torch.sigmoid(zz)
    return y
