"""Tests of vlssm.modules.QMVL: fused == unfused == reference composition ==
an independent literal implementation, forward and backward; torch.compile;
determinism; input validation; parameter layout."""
from __future__ import annotations

import copy

import pytest
import torch

from vlssm import ops
from vlssm import testing as T
from vlssm.modules import QMVL
from vlssm.testing import modules as TM

D_MODEL = 8
D_STATE = 4


def _qmvl(dtype, seed, **kw) -> QMVL:
    torch.manual_seed(seed)
    q = QMVL(D_MODEL, d_state=D_STATE, dtype=dtype, **kw).to(dtype)
    return TM.randomize_(q, T.gen(seed + 1000))


def _inputs(g, B, M, C, shared, dtype):
    x = T.randn(g, B, M, D_MODEL, dtype=dtype)
    t = T.randn(g, *((C,) if shared else (B, C)), D_MODEL, dtype=dtype)
    cot = [T.randn(g, B, M, D_MODEL, dtype=dtype), T.randn(g, B, C, D_MODEL, dtype=dtype)]
    return x, t, cot


def _run(q: QMVL, fused: bool, backend: str, x, t, cot):
    q.fused, q.backend = fused, backend
    return TM.forward_and_grads(q, [x, t], list(q.parameters()), cot)


def _names(q):
    return ["x_rf", "t_rf", "d_x", "d_t"] + [f"d_{n}" for n, _ in q.named_parameters()]


# --------------------------------------------------------------------------
# Agreement: fused / unfused (backend under test) vs the reference composition


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shared", [False, True], ids=["labels3d", "labels2d"])
@pytest.mark.parametrize("B,M,C", [(2, 5, 3), (1, 1, 7), (3, 7, 1), (2, 3, 5)])
def test_fused_unfused_reference_agree(backend, dtype, shared, B, M, C):
    g = T.gen(B * 100 + M * 10 + C)
    q = _qmvl(dtype, seed=M + C)
    x, t, cot = _inputs(g, B, M, C, shared, dtype)
    ref = _run(q, False, "reference", x, t, cot)
    assert ref[1].shape == (B, C, D_MODEL)
    rtol = T.RTOL[dtype]
    T.assert_close_rel(_run(q, True, backend, x, t, cot), ref, rtol, _names(q))
    if backend != "reference":
        T.assert_close_rel(_run(q, False, backend, x, t, cot), ref, rtol, _names(q))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("residual,bias,shared", [(True, False, False), (False, True, True), (True, True, False)])
def test_matches_literal_implementation(backend, fused, residual, bias, shared):
    """Against plain torch (LayerNorm, Linear, F.conv1d, a time loop): fails if an op is wrong."""
    dtype = torch.float64
    g = T.gen(42 + residual + 2 * bias + 4 * shared)
    q = _qmvl(dtype, seed=3, residual=residual, bias=bias)
    x, t, cot = _inputs(g, 2, 6, 4, shared, dtype)
    got = _run(q, fused, backend, x, t, cot)
    want = TM.forward_and_grads(lambda x, t: TM.literal_qmvl(q, x, t), [x, t], list(q.parameters()), cot)
    T.assert_close_rel(got, want, T.RTOL[dtype], _names(q))


def test_literal_matches_at_default_sizes(backend):
    """Default d_state=16, d_conv=4, expand=2, a d_model > 16 (dt_rank 2), float32."""
    torch.manual_seed(0)
    q = QMVL(20, backend=backend)
    g = T.gen(5)
    x, t = T.randn(g, 2, 9, 20, dtype=torch.float32), T.randn(g, 5, 20, dtype=torch.float32)
    with torch.no_grad():
        got = q(x, t)
        want = TM.literal_qmvl(q, x, t)
    T.assert_close_rel(list(got), list(want), 1e-5, ["x_rf", "t_rf"])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_low_precision_within_twice_reference_error(backend, dtype):
    """bf16: the fused error (vs float64 truth) is within 2x the bf16 reference composition's."""
    q = _qmvl(torch.float64, seed=9)
    g = T.gen(9)
    x, t, _ = _inputs(g, 2, 7, 5, False, torch.float64)
    q.fused, q.backend = False, "reference"
    with torch.no_grad():
        truth = q(x, t)
        qh = copy.deepcopy(q).to(dtype)
        ref_h = qh(x.to(dtype), t.to(dtype))
        qh.fused, qh.backend = True, backend
        fused_h = qh(x.to(dtype), t.to(dtype))
    for i in range(2):
        e_ref, e_fused = T.rel_err(ref_h[i], truth[i]), T.rel_err(fused_h[i], truth[i])
        assert fused_h[i].dtype == dtype
        assert e_fused <= 2 * e_ref + 1e-3, (i, e_fused, e_ref)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_cpu_autocast_bf16(backend, fused):
    """Under torch.autocast("cpu", bfloat16) (float32 weights, bf16 projections): the fork conv runs in
    the activations' dtype as nn.Conv1d does; outputs and gradients within bf16 error of float32."""
    q = _qmvl(torch.float32, seed=11)
    g = T.gen(11)
    x, t, _ = _inputs(g, 2, 7, 5, False, torch.float32)
    q.fused, q.backend = fused, backend
    want = q(x, t)
    x_, t_ = x.clone().requires_grad_(), t.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(x_, t_)
    (got[0].float().sum() + got[1].float().sum()).backward()
    for i in range(2):
        assert T.rel_err(got[i].float(), want[i]) < 5e-2, i
    assert torch.isfinite(x_.grad).all() and torch.isfinite(t_.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in q.parameters())


def test_shared_labels_broadcast(backend):
    """(C, d) labels == the same labels repeated per image; t_rf is (B, C, d)."""
    q = _qmvl(torch.float64, seed=4, backend=backend)
    g = T.gen(4)
    x, t = T.randn(g, 3, 5, D_MODEL, dtype=torch.float64), T.randn(g, 6, D_MODEL, dtype=torch.float64)
    xs, ts = q(x, t)
    xr, tr = q(x, t.unsqueeze(0).repeat(3, 1, 1))
    assert ts.shape == (3, 6, D_MODEL)
    assert T.rel_err(xs, xr) < 1e-12 and T.rel_err(ts, tr) < 1e-12


def test_fused_path_has_no_cat_or_flip(monkeypatch):
    """The fused layer never concatenates or flips (docs/design.md section 2)."""
    q = _qmvl(torch.float32, seed=0, backend="cpu" if T.HAS_EXT else "reference")
    if q.backend == "reference":
        pytest.skip("the reference ops themselves cat and flip; " + T.EXT_SKIP_REASON)
    x, t = torch.randn(2, 5, D_MODEL), torch.randn(3, D_MODEL)

    def forbidden(*a, **k):
        raise AssertionError("cat/flip on the fused path")

    monkeypatch.setattr(torch, "cat", forbidden)
    monkeypatch.setattr(torch, "flip", forbidden)
    monkeypatch.setattr(torch.Tensor, "flip", forbidden)
    x_rf, t_rf = q(x, t)
    (x_rf.sum() + t_rf.sum()).backward()


def test_fused_calls_each_fork_op_once_per_block(monkeypatch):
    q = _qmvl(torch.float32, seed=0, backend="reference")
    calls = []
    for name in ("fork_conv1d", "fork_scan", "selective_scan"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    q(torch.randn(2, 5, D_MODEL), torch.randn(2, 3, D_MODEL))
    assert sorted(calls) == ["fork_conv1d"] * 2 + ["fork_scan"] * 2
    calls.clear()
    q.fused = False
    q(torch.randn(2, 5, D_MODEL), torch.randn(2, 3, D_MODEL))
    assert calls == ["selective_scan"] * 4


# --------------------------------------------------------------------------
# torch.compile


def _compile_check(q, compile_backend, shared):
    g = T.gen(11)
    x, t, cot = _inputs(g, 2, 5, 3, shared, torch.float32)
    eager = TM.forward_and_grads(q, [x, t], list(q.parameters()), cot)
    compiled = torch.compile(q, backend=compile_backend, fullgraph=True)
    got = TM.forward_and_grads(compiled, [x, t], list(q.parameters()), cot)
    T.assert_close_rel(got, eager, 1e-5, _names(q))


@pytest.mark.parametrize(
    "fused,shared", [(True, False), (True, True), (False, True)], ids=["fused-labels3d", "fused-labels2d", "unfused"]
)
def test_compile_fullgraph_aot_eager(cpu_backend, fused, shared):
    torch._dynamo.reset()
    q = _qmvl(torch.float32, seed=2, fused=fused, backend=cpu_backend)
    _compile_check(q, "aot_eager", shared)


def test_compile_fullgraph_inductor(cpu_backend):
    """Inductor once, on a tiny shape (a cold compile takes ~30 s on 2 cores)."""
    torch._dynamo.reset()
    q = _qmvl(torch.float32, seed=2, fused=True, backend=cpu_backend)
    _compile_check(q, "inductor", shared=True)


# --------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_deterministic(backend, fused):
    q = _qmvl(torch.float32, seed=6, fused=fused, backend=backend)
    g = T.gen(6)
    x, t, cot = _inputs(g, 3, 7, 5, True, torch.float32)
    a = TM.forward_and_grads(q, [x, t], list(q.parameters()), cot)
    b = TM.forward_and_grads(q, [x, t], list(q.parameters()), cot)
    for u, v, n in zip(a, b, _names(q)):
        assert torch.equal(u, v), n


# --------------------------------------------------------------------------
# Bad inputs


def _bad_cases():
    d = D_MODEL
    x, t = torch.randn(2, 5, d), torch.randn(2, 3, d)
    return [
        ("x 2-D", torch.randn(5, d), t, ValueError, r"x must have shape \(batch, M, 8\)"),
        ("x 4-D", torch.randn(2, 5, d, 1), t, ValueError, r"x must have shape"),
        ("x wrong d", torch.randn(2, 5, d + 1), t, ValueError, r"x must have shape \(batch, M, 8\)"),
        ("t 1-D", x, torch.randn(d), ValueError, r"t must have shape \(batch, C, 8\) or \(C, 8\)"),
        ("t 4-D", x, torch.randn(1, 2, 3, d), ValueError, r"t must have shape"),
        ("t wrong d", x, torch.randn(3, d - 1), ValueError, r"t must have shape"),
        ("batch mismatch", x, torch.randn(3, 3, d), ValueError, r"t must have shape \(batch, C, 8\) with the batch"),
        ("x empty batch", torch.randn(0, 5, d), torch.randn(3, d), ValueError, r"x must be non-empty"),
        ("x empty M", torch.randn(2, 0, d), t, ValueError, r"x must be non-empty"),
        ("t empty C", x, torch.randn(2, 0, d), ValueError, r"t must be non-empty"),
        ("t empty C shared", x, torch.randn(0, d), ValueError, r"t must be non-empty"),
        ("mixed dtype", x, t.double(), TypeError, r"t must have the dtype of x"),
        ("module dtype", x.double(), t.double(), TypeError, r"x must have the module's parameter dtype"),
        ("int x", x.long(), t.long(), TypeError, r"x must be a floating-point"),
        ("x not tensor", x.tolist(), t, TypeError, r"x must be a torch.Tensor"),
        ("t not tensor", x, None, TypeError, r"t must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bad_inputs_raise(case, fused):
    _, x, t, exc, match = case
    q = _qmvl(torch.float32, seed=0, fused=fused, backend="reference")
    with pytest.raises(exc, match=match):
        q(x, t)


def test_mixed_device_raises():
    if not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA) to mix devices")
    q = _qmvl(torch.float32, seed=0)
    with pytest.raises(ValueError, match="t must be on the device of x"):
        q(torch.randn(2, 5, D_MODEL), torch.randn(3, D_MODEL, device="cuda"))


def test_bad_backend_raises():
    with pytest.raises(ValueError, match="backend"):
        QMVL(D_MODEL, backend="triton-please")
    q = QMVL(D_MODEL)
    with pytest.raises(ValueError, match="backend"):
        q.backend = "nope"


# --------------------------------------------------------------------------
# Parameters


def test_state_dict_keys_and_shapes():
    q = QMVL(D_MODEL, d_state=D_STATE)
    mixer = TM.mamba_ssm_state_shapes(D_MODEL, D_STATE)
    want = {}
    for blk in ("label_block", "visual_block"):
        want[f"{blk}.norm.weight"] = (D_MODEL,)
        want[f"{blk}.norm.bias"] = (D_MODEL,)
        want.update({f"{blk}.mixer.{k}": v for k, v in mixer.items()})
    assert {k: tuple(v.shape) for k, v in q.state_dict().items()} == want
    # fused and unfused share one parameter layout
    q2 = QMVL(D_MODEL, d_state=D_STATE, fused=False, backend="reference")
    q2.load_state_dict(q.state_dict())


def test_extra_repr_and_backend_propagation():
    q = QMVL(D_MODEL, fused=False, backend="reference")
    r = repr(q)
    assert "d_model=8" in r and "fused=False" in r and "backend='reference'" in r
    q.backend = "auto"
    assert q.label_block.mixer.backend == "auto" and q.visual_block.mixer.backend == "auto"
    assert QMVL(D_MODEL, backend=None).backend is None
