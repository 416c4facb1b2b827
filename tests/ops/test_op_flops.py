"""FLOP formulas of the vlssm ops (vlssm/ops/flops.py) and what torch.utils.flop_counter counts with them.

The expected numbers are written out by hand (comments give the arithmetic), so a wrong
formula fails here rather than agreeing with itself. Conventions: a multiply-add = 2
FLOPs; the scan 9 per (token, channel, state) + 1 per (token, channel) for the D skip
and for the gate; every backward op = 2x its forward (module docstring of vlssm.ops.flops).
"""
from __future__ import annotations

import subprocess
import sys
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import vlssm
import vlssm.ops
from vlssm import testing as T
from vlssm.ops import flops as OF
from vlssm.profile import FlopCount, count_flops
from vlssm.profile import flops as PF
from vlssm.reference import attention_with_probs_ref, relation_aggregate_ref

VLSSM_OPS = ("selective_scan", "fork_conv1d", "fork_scan", "attention_with_probs", "relation_aggregate",
             "kcr_loss")
MATMUL_OPS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm")


def _count(fn: Callable[[], object]) -> Dict[str, int]:
    """FlopCounterMode's global counts by op name ("aten.mm", "vlssm.fork_scan", ...)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return {str(op): n for op, n in fc.get_flop_counts().get("Global", {}).items()}


def _fwd_bwd(loss_fn: Callable[[], torch.Tensor]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Counts of the forward (``loss_fn()``) and of its backward, separately."""
    box = {}
    fwd = _count(lambda: box.setdefault("loss", loss_fn()))
    bwd = _count(lambda: box["loss"].backward())
    return fwd, bwd


def _op(name: str, backend: str) -> str:
    return f"vlssm.{name}_triton" if backend == "triton" else f"vlssm.{name}"


def _leaf(*shape: int, positive: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, dtype=torch.float64)
    return (t.abs() + 0.1 if positive else t).requires_grad_()


# --------------------------------------------------------------------------
# The formulas alone (pure functions of shapes: no extension needed)


@pytest.mark.parametrize("b,D,L,N,has_D,has_z,want", [
    (1, 1, 1, 1, False, False, 9),
    (2, 3, 5, 4, True, True, 1140),     # 9*2*3*5*4 = 1080, + 30 skip + 30 gate
    (3, 7, 13, 5, True, False, 12558),  # b*D*L = 273: 9*273*5 = 12285 + 273
    (1, 5, 3, 2, False, True, 285),     # 9*15*2 = 270 + 15
])
def test_selective_scan_formula(b, D, L, N, has_D, has_z, want):
    u = torch.Size((b, D, L))
    BC = torch.Size((b, N, L))
    args = (u, u, torch.Size((D, N)), BC, BC, torch.Size((D,)) if has_D else None, u if has_z else None)
    assert OF.selective_scan_flop(*args, None, None, True, False, out_shape=None) == want
    ck = torch.Size((b, D, 1, N))
    assert OF.selective_scan_backward_flop(u, None, *args, None, None, ck, True, False) == 2 * want


@pytest.mark.parametrize("b,p,s,E,N,has_D,has_z,want", [
    (1, 0, 1, 1, 1, False, False, 18),  # p + 2s = 2 tokens: 9*2
    (2, 3, 2, 5, 4, True, True, 2610),  # L = 7, b*L*E = 70: 9*70*4 = 2520 + 70 skip + b*s*E = 20 gate
    (3, 5, 4, 6, 3, True, False, 6552),  # L = 13, b*L*E = 234: 9*234*3 = 6318 + 234
    (1, 4, 1, 3, 2, False, True, 327),  # L = 6, b*L*E = 18: 9*18*2 = 324 + 1*1*3
])
def test_fork_scan_formula(b, p, s, E, N, has_D, has_z, want):
    L = p + 2 * s
    u, BC = torch.Size((b, L, E)), torch.Size((b, L, N))
    D = torch.Size((E,)) if has_D else None
    z = torch.Size((b, s, E)) if has_z else None
    assert OF.fork_scan_flop(u, u, torch.Size((E, N)), BC, BC, D, z, None, p, True) == want
    ysum, ck = torch.Size((b, s, E)), torch.Size((b, E, 3, N))
    assert OF.fork_scan_backward_flop(ysum, u, u, torch.Size((E, N)), BC, BC, D, z, None, ysum, ck, p,
                                      True) == 2 * want


@pytest.mark.parametrize("b,p,s,d_model,N", [(1, 0, 1, 1, 1), (2, 3, 2, 5, 4), (3, 196, 80, 24, 16),
                                             (2, 81, 63, 7, 3)])
def test_fork_scan_formula_is_the_analytic_models(b, p, s, d_model, N):
    """The fused QMVL's scan + skip + gate in vlssm.profile.flops is exactly fork_scan's count."""
    E = 2 * d_model  # expand = 2
    L = p + 2 * s
    got = OF.fork_scan_flop((b, L, E), (b, L, E), (E, N), (b, L, N), (b, L, N), (E,), (b, s, E), (E,), p, True)
    part = PF.mamba_block_flops(p + s, p + 2 * s, s, d_model, d_state=N)
    assert got == b * (part.scan + part.skip + part.gate)
    assert OF.SCAN_FLOPS_PER_STATE == PF.SCAN_FLOPS_PER_STATE


@pytest.mark.parametrize("b,p,s,E,K,want", [
    (1, 0, 1, 1, 1, 4),        # 2*1*1*1*(0 + 2)
    (2, 3, 5, 7, 4, 1456),     # 2*4*7*2*13
    (3, 1, 2, 5, 3, 450),      # 2*3*5*3*5
])
def test_fork_conv1d_formula(b, p, s, E, K, want):
    xp, xs, w = torch.Size((b, p, E)), torch.Size((b, s, E)), torch.Size((E, K))
    assert OF.fork_conv1d_flop(xp, xs, w, None, out_shape=torch.Size((b, p + 2 * s, E))) == want
    assert OF.fork_conv1d_flop(xp, xs, w, torch.Size((E,))) == want  # the bias is free
    assert OF.fork_conv1d_backward_flop(torch.Size((b, p + 2 * s, E)), xp, xs, w, None) == 2 * want


@pytest.mark.parametrize("n,Lq,Lk,d,dv,want", [
    (1, 1, 1, 1, 1, 4),
    (2, 3, 5, 4, 6, 600),   # 2*2*3*5*4 = 240 (q k^T) + 2*2*3*5*6 = 360 (P v)
    (3, 7, 2, 5, 3, 672),   # 420 + 252
])
def test_attention_formula(n, Lq, Lk, d, dv, want):
    q, k, v = torch.Size((n, Lq, d)), torch.Size((n, Lk, d)), torch.Size((n, Lk, dv))
    assert OF.attention_with_probs_flop(q, k, v, 0.5) == want
    # torch's own sdpa formula on the same problem as (batch, heads = 1, L, d)
    assert sdpa_flop_count((n, 1, Lq, d), (n, 1, Lk, d), (n, 1, Lk, dv)) == want
    assert OF.attention_with_probs_backward_flop(torch.Size((n, Lq, dv)), None, q, k, v,
                                                 torch.Size((n, Lq, Lk)), 0.5) == 2 * want


@pytest.mark.parametrize("B,C,d,want", [(1, 1, 1, 2), (2, 3, 5, 180), (3, 7, 4, 1176)])  # 2*B*C*C*d
@pytest.mark.parametrize("shared_map", [False, True])
def test_relation_aggregate_formula(B, C, d, want, shared_map):
    m_ka = torch.Size((C, C) if shared_map else (B, C, C))
    args = (m_ka, torch.Size((B, C, C)), torch.Size((B, C, d)), torch.Size(()))
    assert OF.relation_aggregate_flop(*args) == want
    assert OF.relation_aggregate_backward_flop(torch.Size((B, C, d)), *args) == 2 * want


@pytest.mark.parametrize("a,b,want", [
    ((1, 1), (1, 1), 2),
    ((3, 5), (2, 3, 5), 60),          # R = 2*3 rows of d = 5: 2*6*5
    ((2, 1, 3, 4), (5, 3, 4), 240),   # rows broadcast to (2, 5, 3) = 30, d = 4
])
def test_kcr_loss_formula(a, b, want):
    assert OF.kcr_loss_flop(torch.Size(a), torch.Size(b), 1e-8) == want
    assert OF.kcr_loss_backward_flop(torch.Size(()), torch.Size(a), torch.Size(b), torch.Size((3,)), 1e-8) == 2 * want


def test_formulas_take_tensors_too():
    u = torch.zeros(2, 3, 5)
    assert OF.selective_scan_flop(u, u, torch.zeros(3, 4), torch.zeros(2, 4, 5), torch.zeros(2, 4, 5)) == 1080


# --------------------------------------------------------------------------
# Registration


def test_every_op_has_a_formula():
    missing = []
    for name in VLSSM_OPS:
        for op in (name, f"{name}_backward"):
            names = []
            if T.HAS_EXT:
                names.append(op)
            if T.triton_reason() is None:
                names.append(f"{op}_triton")
            missing += [n for n in names if getattr(torch.ops.vlssm, n) not in flop_registry]
    assert not missing
    assert OF.register() == []  # idempotent: everything is registered already


def test_import_registers_without_profile():
    """``import vlssm.ops`` alone registers the formulas, and does not import vlssm.profile (layering)."""
    code = ("import sys, torch, vlssm.ops\n"
            "from torch.utils.flop_counter import flop_registry\n"
            "assert 'vlssm.profile' not in sys.modules, 'vlssm.ops imported vlssm.profile'\n"
            "assert torch.ops.aten.mv in flop_registry\n"
            "from vlssm import _backend\n"
            "if _backend.load_extension() is not None:\n"
            "    assert torch.ops.vlssm.fork_scan in flop_registry\n"
            "    assert torch.ops.vlssm.selective_scan_backward in flop_registry\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]


# --------------------------------------------------------------------------
# Counted through the ops (compiled and Triton kernels), forward and backward


@pytest.mark.parametrize("has_D_z,want", [(True, 1140), (False, 1080)])
def test_selective_scan_counted(kernel_backend, has_D_z, want):
    b, D, L, N = 2, 3, 5, 4
    u, delta, z = _leaf(b, D, L), _leaf(b, D, L, positive=True), _leaf(b, D, L)
    A, B, C, Dp = -_leaf(D, N, positive=True), _leaf(b, N, L), _leaf(b, N, L), _leaf(D)

    def loss():
        return vlssm.ops.selective_scan(u, delta, A, B, C, Dp if has_D_z else None, z if has_D_z else None,
                                        delta_softplus=True, backend=kernel_backend).sum()

    fwd, bwd = _fwd_bwd(loss)
    assert fwd == {_op("selective_scan", kernel_backend): want}
    assert bwd == {_op("selective_scan_backward", kernel_backend): 2 * want}


@pytest.mark.parametrize("b,p,s,E,N,want", [(2, 3, 2, 5, 4, 2610), (1, 0, 1, 3, 2, 117)])  # 9*6*2 + 6 + 3
def test_fork_scan_counted(kernel_backend, b, p, s, E, N, want):
    L = p + 2 * s
    u, delta, z = _leaf(b, L, E), _leaf(b, L, E), _leaf(b, s, E)
    A, B, C, D, bias = -_leaf(E, N, positive=True), _leaf(b, L, N), _leaf(b, L, N), _leaf(E), _leaf(E)

    def loss():
        return vlssm.ops.fork_scan(u, delta, A, B, C, D, z, bias, p, backend=kernel_backend).sum()

    fwd, bwd = _fwd_bwd(loss)
    assert fwd == {_op("fork_scan", kernel_backend): want}
    assert bwd == {_op("fork_scan_backward", kernel_backend): 2 * want}


def test_fork_conv1d_counted(kernel_backend):
    b, p, s, E, K = 2, 3, 5, 7, 4
    xp, xs, w, bias = _leaf(b, p, E), _leaf(b, s, E), _leaf(E, K), _leaf(E)
    fwd, bwd = _fwd_bwd(lambda: vlssm.ops.fork_conv1d(xp, xs, w, bias, backend=kernel_backend).sum())
    assert fwd == {_op("fork_conv1d", kernel_backend): 1456}  # 2*K*E*b*(p + 2s) = 2*4*7*2*13
    assert bwd == {_op("fork_conv1d_backward", kernel_backend): 2912}


def test_fork_conv1d_is_a_depthwise_conv_over_p_plus_2s_outputs():
    """The fused conv does the work of a depthwise conv with exactly p + 2s outputs: torch counts the
    same for one (left-padded, so no padded outputs are computed), forward and input-grad."""
    b, p, s, E, K = 2, 3, 5, 7, 4
    x = torch.randn(b, E, p + 2 * s, dtype=torch.float64, requires_grad=True)
    w = torch.randn(E, 1, K, dtype=torch.float64)
    fwd, bwd = _fwd_bwd(lambda: F.conv1d(F.pad(x, (K - 1, 0)), w, groups=E).sum())
    assert fwd == {"aten.convolution": OF.fork_conv1d_flop((b, p, E), (b, s, E), (E, K))}
    # fork_conv1d_backward computes grad input and grad weight, torch's convolution_backward counts one
    # forward for each; only the input's here: torch's grad-weight count ignores groups (E times too many
    # for a depthwise conv, torch 2.14).
    assert 2 * bwd["aten.convolution_backward"] == OF.fork_conv1d_backward_flop(None, (b, p, E), (b, s, E), (E, K))


def test_attention_counted_and_equal_to_reference(kernel_backend):
    """Broadcast leading dims (2, 1) x (3,): n = 6 problems of q (3, 4) k (5, 4) v (5, 6)."""
    q, k, v = _leaf(2, 1, 3, 4), _leaf(3, 5, 4), _leaf(3, 5, 6)

    def loss(fn):
        out, probs = fn()
        return out.sum() + (probs * probs).sum()  # both outputs carry a gradient

    fwd, bwd = _fwd_bwd(lambda: loss(lambda: vlssm.ops.attention_with_probs(q, k, v, backend=kernel_backend)))
    want = 6 * 300  # 2*3*5*4 + 2*3*5*6 per problem
    assert fwd == {_op("attention_with_probs", kernel_backend): want}
    assert bwd == {_op("attention_with_probs_backward", kernel_backend): 2 * want}
    ref_fwd, ref_bwd = _fwd_bwd(lambda: loss(lambda: attention_with_probs_ref(q, k, v)))
    assert sum(ref_fwd.values()) == want and set(ref_fwd) == {"aten.bmm"}
    assert sum(ref_bwd.values()) == 2 * want and set(ref_bwd) == {"aten.bmm"}


@pytest.mark.parametrize("shared_map", [False, True])
def test_relation_aggregate_counted_and_equal_to_reference(kernel_backend, shared_map):
    B, C, d = 2, 3, 5
    m_ka = _leaf(C, C) if shared_map else _leaf(B, C, C)
    m_ca, t, alpha = _leaf(B, C, C), _leaf(B, C, d), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    fwd, bwd = _fwd_bwd(lambda: vlssm.ops.relation_aggregate(m_ka, m_ca, t, alpha, backend=kernel_backend).sum())
    assert fwd == {_op("relation_aggregate", kernel_backend): 180}  # 2*B*C*C*d
    assert bwd == {_op("relation_aggregate_backward", kernel_backend): 360}
    ref_fwd, ref_bwd = _fwd_bwd(lambda: relation_aggregate_ref(m_ka, m_ca, t, alpha).sum())
    assert sum(ref_fwd.values()) == 180 and sum(ref_bwd.values()) == 360


def test_kcr_loss_counted_and_equal_to_matmul_dots(kernel_backend):
    t_ka, t_ca = _leaf(3, 5), _leaf(2, 3, 5)
    fwd, bwd = _fwd_bwd(lambda: vlssm.ops.kcr_loss(t_ka, t_ca, backend=kernel_backend))
    assert fwd == {_op("kcr_loss", kernel_backend): 60}  # 2 * (2*3 rows) * 5
    assert bwd == {_op("kcr_loss_backward", kernel_backend): 120}

    def dots_as_matmul():  # the counted work: the row dot products, as (1, d) @ (d, 1) products
        a, b = torch.broadcast_tensors(t_ka, t_ca)
        return (a.unsqueeze(-2) @ b.unsqueeze(-1)).sum()

    ref_fwd, ref_bwd = _fwd_bwd(dots_as_matmul)
    assert sum(ref_fwd.values()) == 60 and sum(ref_bwd.values()) == 120


# --------------------------------------------------------------------------
# What torch's counter misses (registered by vlssm.ops.flops when torch has no formula)


@pytest.mark.parametrize("h_kv", [3, 1], ids=["mha", "gqa"])
def test_sdpa_on_cpu_is_counted(h_kv):
    """F.scaled_dot_product_attention on CPU runs aten._scaled_dot_product_flash_attention_for_cpu (d == dv),
    which torch 2.14 counts as 0 forward and backward."""
    b, h, Lq, Lk, d = 2, 3, 5, 7, 8
    q, k, v = _leaf(b, h, Lq, d), _leaf(b, h_kv, Lk, d), _leaf(b, h_kv, Lk, d)
    fwd, bwd = _fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=h_kv != h).sum())
    want = 2 * b * h * Lq * Lk * d * 2  # 6720: q k^T and P v, each 2*30*5*7*8 / 2
    assert want == 6720 == sdpa_flop_count((b, h, Lq, d), (b, h_kv, Lk, d), (b, h_kv, Lk, d))
    assert sum(fwd.values()) == want
    want_bwd = 2 * b * h * Lq * Lk * (3 * d + 2 * d)  # 5 matmuls: 16800
    assert sum(bwd.values()) == want_bwd == sdpa_backward_flop_count((b, h, Lq, d), (b, h, Lq, d), (b, h_kv, Lk, d),
                                                                     (b, h_kv, Lk, d))
    # the same forward as attention_with_probs on (b*h, L, d)
    assert want == OF.attention_with_probs_flop((b * h, Lq, d), (b * h, Lk, d), (b * h, Lk, d))


@pytest.mark.parametrize("cross", [False, True])
def test_multihead_attention_fast_path_is_counted(cross):
    """nn.MultiheadAttention in eval under no_grad runs the fused aten._native_multi_head_attention for
    self-attention, F.scaled_dot_product_attention for cross-attention (both counted 0 by torch 2.14); they
    must count what the training path's mm / bmm count."""
    torch.manual_seed(0)
    E, heads = 16, 4
    mha = nn.MultiheadAttention(E, heads, dropout=0.0, batch_first=True)
    x, y = torch.randn(2, 5, E), torch.randn(2, 6, E)
    kv = y if cross else x
    with torch.no_grad():
        mha.eval()
        fast = _count(lambda: mha(x, kv, kv, need_weights=False))
        mha.train()
        slow = _count(lambda: mha(x, kv, kv, need_weights=True))
    # self-attention takes the fused op; cross-attention the functional path, with the CPU sdpa kernel
    assert set(fast) == ({"aten.mm", "aten.addmm", "aten._scaled_dot_product_flash_attention_for_cpu"} if cross
                         else {"aten._native_multi_head_attention"})
    Lk = kv.shape[1]
    # in-projections 2*E*E*(10 + 2*2*Lk), attention 2 * 2*2*5*Lk*E, out-projection 2*10*E*E
    want = 2 * E * E * (10 + 2 * 2 * Lk) + 2 * 2 * 2 * 5 * Lk * E + 2 * 10 * E * E
    assert sum(fast.values()) == want == sum(slow.values())


def test_matrix_vector_products_are_counted():
    A, v, w = torch.randn(3, 4), torch.randn(4), torch.randn(4)
    assert _count(lambda: A @ v) == {"aten.mv": 24}  # 2*3*4
    assert _count(lambda: torch.addmv(torch.randn(3), A, v)) == {"aten.addmv": 24}
    assert _count(lambda: v @ w) == {"aten.dot": 8}
    assert _count(lambda: torch.vdot(v, w)) == {"aten.vdot": 8}
    b1, b2 = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    assert _count(lambda: torch.addbmm(torch.randn(3, 5), b1, b2)) == {"aten.addbmm": 240}  # 2*2*3*5*4


# --------------------------------------------------------------------------
# A whole QMVL layer


def _qmvl(backend: str, fused: bool, d: int, N: int) -> nn.Module:
    torch.manual_seed(0)
    return vlssm.QMVL(d, d_state=N, fused=fused, backend=backend)


@pytest.mark.parametrize("B,M,C,d,N,shared", [(2, 7, 3, 40, 4, False), (3, 5, 2, 24, 3, True),
                                               (1, 9, 4, 16, 2, False)])
def test_fused_qmvl_equals_the_analytic_count(cpu_backend, B, M, C, d, N, shared):
    model = _qmvl(cpu_backend, True, d, N)
    x = torch.randn(B, M, d)
    t = torch.randn(C, d) if shared else torch.randn(B, C, d)
    with torch.no_grad():
        got = count_flops(model, x, t)
    want = PF.qmvl_flops(B, M, C, d, d_state=N, fused=True, shared_labels=shared)
    assert got.flops == want.total  # matmul + conv + scan + skip + gate, all counted
    assert sum(n for op, n in got.by_op.items() if op in MATMUL_OPS) == want.matmul
    assert got.by_op["vlssm.fork_conv1d"] == want.conv
    assert got.by_op["vlssm.fork_scan"] == want.scan + want.skip + want.gate


def test_fused_qmvl_on_triton_equals_the_analytic_count():
    T.require_backend("triton")
    B, M, C, d, N = 2, 3, 2, 16, 2
    model = _qmvl("triton", True, d, N)
    with torch.no_grad():
        got = count_flops(model, torch.randn(B, M, d), torch.randn(B, C, d))
    want = PF.qmvl_flops(B, M, C, d, d_state=N, fused=True)
    assert got.flops == want.total
    assert got.by_op["vlssm.fork_scan_triton"] == want.scan + want.skip + want.gate


def test_fused_qmvl_forward_and_backward(cpu_backend):
    """Every backward counts 2x its forward (matmuls, the fork conv and scan): fwd + bwd = 3 fwd."""
    B, M, C, d, N = 2, 7, 3, 40, 4
    model = _qmvl(cpu_backend, True, d, N)
    x, t = torch.randn(B, M, d, requires_grad=True), torch.randn(B, C, d, requires_grad=True)

    def step():
        x_rf, t_rf = model(x, t)
        (x_rf.sum() + t_rf.sum()).backward()

    got = count_flops(step)
    fwd = PF.qmvl_flops(B, M, C, d, d_state=N, fused=True)
    assert got.flops == 3 * fwd.total
    assert got.by_op["vlssm.fork_scan_backward"] == 2 * got.by_op["vlssm.fork_scan"]
    assert got.by_op["vlssm.fork_conv1d_backward"] == 2 * got.by_op["vlssm.fork_conv1d"]


@pytest.mark.parametrize("B,M,C,d,N", [(2, 7, 3, 40, 4), (1, 5, 2, 24, 3)])
def test_unfused_qmvl_equals_the_literal_count_up_to_conv_padding(cpu_backend, B, M, C, d, N):
    """The literal composition runs vlssm.ops.selective_scan per sequence (counted exactly) and nn.Conv1d,
    which torch counts over its L + K - 1 padded outputs (tests/test_flops.py)."""
    model = _qmvl(cpu_backend, False, d, N)
    with torch.no_grad():
        got = count_flops(model, torch.randn(B, M, d), torch.randn(B, C, d))
    want = PF.qmvl_flops(B, M, C, d, d_state=N, fused=False)
    L, K = M + C, 4
    assert got.flops == want.total - want.conv + want.conv * (L + K - 1) // L
    assert got.by_op["vlssm.selective_scan"] == want.scan + want.skip + want.gate
    fused = PF.qmvl_flops(B, M, C, d, d_state=N, fused=True)
    assert fused.total < want.total < got.flops


def test_count_flops_result(cpu_backend):
    B, M, C, d, N = 2, 7, 3, 40, 4
    model = _qmvl(cpu_backend, True, d, N)
    with torch.no_grad():
        c = count_flops(model, torch.randn(B, M, d), t=torch.randn(B, C, d))
    assert isinstance(c, FlopCount) and isinstance(c.flops, int)
    # qmvl_flops(2, 7, 3, 40, d_state=4).total written out (E = 80, N = 4, R = 3, K = 4), per image:
    # label block (p 7, s 3): in_proj 80 * (3 * 160 + 7 * 80) = 83200; over 13 tokens conv 8320, x_proj 22880,
    # dt_proj 6240, scan 37440, skip 1040; over 3 tokens gate 240, out_proj 19200: 178560.
    # visual block (p 3, s 7): in_proj 108800; over 17 tokens 10880 + 29920 + 8160 + 48960 + 1360; over 7
    # tokens 560 + 44800: 253440. Two images: 864000.
    assert c.flops == sum(c.by_op.values()) == 864000
    assert c.macs == 432000 and c.gflops == 864000 / 1e9 and c.gmacs == 432000 / 1e9
    assert c.by_module["QMVL"] == c.flops
    # the fused path calls MambaBlock.fork, a method, whose projections are functional calls: no module
    # below QMVL gets a row of its own
    assert "QMVL.label_block" not in c.by_module
    with pytest.raises(AttributeError):
        c.flops = 0  # frozen
    unfused = _qmvl(cpu_backend, False, d, N)
    with torch.no_grad():
        u = count_flops(unfused, torch.randn(B, M, d), torch.randn(B, C, d))
    assert u.by_module["QMVL.label_block"] + u.by_module["QMVL.visual_block"] == u.by_module["QMVL"] == u.flops
    assert u.by_module["QMVL.label_block.mixer.conv1d"] == u.by_op["aten.convolution"] // 2


def test_count_flops_without_modules():
    c = count_flops(torch.mm, torch.randn(3, 4), torch.randn(4, 5))
    assert c.flops == 120 and c.by_op == {"aten.mm": 120} and c.by_module == {}  # 2*3*4*5
    assert c.macs == 60.0
    assert count_flops(lambda: None) == FlopCount(0)
