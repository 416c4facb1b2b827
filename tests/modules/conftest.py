"""Shared helpers for the module tests.

``literal_*`` is an implementation of the Mamba block and of QMVL that is
independent of vlssm's ops and modules (plain tensor algebra, F.conv1d and a
Python loop over time), reading only the parameters of a vlssm module. It is the
yardstick that lets these tests fail when an op is wrong.

Tests run with ``--import-mode=importlib``, so they cannot import this file:
they get the helpers through the ``helpers`` fixture (a namespace of this
module's public names) and the backends through the ``backend`` fixture.
"""
from __future__ import annotations

import types
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from vlssm import _backend

HAS_CPU_EXT = _backend.load_extension() is not None
CPU_SKIP_REASON = f"compiled extension vlssm._C is not importable: {_backend.extension_error()}"

#: Backends of the code under test; "cpu" is skipped when the extension is missing.
BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif(not HAS_CPU_EXT, reason=CPU_SKIP_REASON)),
]

#: Relative (norm-wise) tolerance per dtype.
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}

#: mamba_ssm.Mamba's state_dict: key -> shape as a function of (d, E, N, R, K).
MAMBA_SSM_KEYS = (
    ("A_log", lambda d, E, N, R, K: (E, N)),
    ("D", lambda d, E, N, R, K: (E,)),
    ("in_proj.weight", lambda d, E, N, R, K: (2 * E, d)),
    ("conv1d.weight", lambda d, E, N, R, K: (E, 1, K)),
    ("conv1d.bias", lambda d, E, N, R, K: (E,)),
    ("x_proj.weight", lambda d, E, N, R, K: (R + 2 * N, E)),
    ("dt_proj.weight", lambda d, E, N, R, K: (E, R)),
    ("dt_proj.bias", lambda d, E, N, R, K: (E,)),
    ("out_proj.weight", lambda d, E, N, R, K: (d, E)),
)


def mamba_ssm_state_shapes(d: int, d_state: int = 16, d_conv: int = 4, expand: int = 2) -> Dict[str, tuple]:
    """The hand-listed mamba_ssm.Mamba state_dict keys and shapes for these sizes."""
    E = expand * d
    R = -(-d // 16)
    return {k: f(d, E, d_state, R, d_conv) for k, f in MAMBA_SSM_KEYS}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def randomize_(module: torch.nn.Module, g: torch.Generator, scale: float = 0.3) -> torch.nn.Module:
    """Perturb every parameter so no gradient path hides behind an init constant (D = 1, ...)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * randn(g, *p.shape, dtype=p.dtype))
    return module


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close_rel(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor], rtol: float,
                     names: Sequence[str]) -> None:
    assert len(actual) == len(expected) == len(names)
    bad = []
    for a, e, n in zip(actual, expected, names):
        assert a.shape == e.shape, f"{n}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert torch.isfinite(a).all(), f"{n}: non-finite values"
        err = rel_err(a, e)
        if not err <= rtol:
            bad.append(f"{n}: rel err {err:.3g} > {rtol:.1g}")
    assert not bad, "; ".join(bad)


def forward_and_grads(fn, inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                      cotangents: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Outputs of ``fn(*inputs)`` then d<outputs, cotangents>/d(inputs, params)."""
    inputs = [i.detach().requires_grad_(True) for i in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    loss = sum((o * c).sum() for o, c in zip(outs, cotangents))
    grads = torch.autograd.grad(loss, [*inputs, *params])
    return [o.detach() for o in outs] + list(grads)


# --------------------------------------------------------------------------
# Independent literal implementation.

def literal_layer_norm(norm: torch.nn.LayerNorm, h: torch.Tensor) -> torch.Tensor:
    mu = h.mean(-1, keepdim=True)
    var = ((h - mu) ** 2).mean(-1, keepdim=True)
    return (h - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def literal_mamba(m, h: torch.Tensor) -> torch.Tensor:
    """mamba_ssm Mamba (slow path) on (B, L, d) from ``m``'s parameters, with a time loop."""
    Bsz, L, _ = h.shape
    E, N, R, K = m.d_inner, m.d_state, m.dt_rank, m.d_conv
    xz = h @ m.in_proj.weight.T
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias
    x, z = xz[..., :E], xz[..., E:]  # (B, L, E)
    xc = F.conv1d(x.transpose(1, 2), m.conv1d.weight, m.conv1d.bias, padding=K - 1, groups=E)[..., :L]
    xc = xc * torch.sigmoid(xc)  # (B, E, L)
    u = xc.transpose(1, 2)  # (B, L, E)
    x_dbl = u @ m.x_proj.weight.T
    dt_low, Bm, Cm = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    v = dt_low @ m.dt_proj.weight.T + m.dt_proj.bias
    dt = torch.where(v > 20, v, torch.log1p(torch.exp(v.clamp(max=20))))  # softplus, threshold 20
    A = -torch.exp(m.A_log)
    state = h.new_zeros(Bsz, E, N)
    ys = []
    for l in range(L):
        dA = torch.exp(dt[:, l, :, None] * A)
        state = dA * state + dt[:, l, :, None] * Bm[:, l, None, :] * u[:, l, :, None]
        ys.append((state * Cm[:, l, None, :]).sum(-1) + m.D * u[:, l])
    y = torch.stack(ys, 1) * (z * torch.sigmoid(z))
    out = y @ m.out_proj.weight.T
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias
    return out


def literal_block(block, h: torch.Tensor) -> torch.Tensor:
    return literal_mamba(block.mixer, literal_layer_norm(block.norm, h))


def literal_qmvl(q, x: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """docs/design.md section 1, literally: four sequences, cat and flip."""
    B, M, d = x.shape
    C = t.shape[-2]
    t3 = t if t.dim() == 3 else t.unsqueeze(0).repeat(B, 1, 1)
    lb, vb = q.label_block, q.visual_block
    y1 = literal_block(lb, torch.cat([x, t3], 1))[:, M:]
    y2 = literal_block(lb, torch.cat([x, t3.flip(1)], 1))[:, M:].flip(1)
    y3 = literal_block(vb, torch.cat([t3, x], 1))[:, C:]
    y4 = literal_block(vb, torch.cat([t3, x.flip(1)], 1))[:, C:].flip(1)
    if q.residual:
        return x + y3 + y4, t + y1 + y2
    return y3 + y4, y1 + y2


# --------------------------------------------------------------------------
# Fixtures.

@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each backend of the code under test ("reference", and "cpu" when compiled)."""
    return request.param


@pytest.fixture
def cpu_backend() -> str:
    """The compiled CPU backend; skips when the extension is missing."""
    if not HAS_CPU_EXT:
        pytest.skip(CPU_SKIP_REASON)
    return "cpu"


@pytest.fixture(scope="session")
def helpers() -> types.SimpleNamespace:
    """This module's public helpers (literal_*, rel_err, randn, ...)."""
    return types.SimpleNamespace(
        **{k: v for k, v in globals().items() if not k.startswith("_") and k not in ("pytest", "torch", "F")}
    )
