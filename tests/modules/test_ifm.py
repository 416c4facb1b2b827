"""IFM: equals the literal paper formulas written with plain torch ops."""
import math

import pytest
import torch
import torch.nn.functional as F

from vlssm import testing as T
from vlssm.modules.ifm import IFM

#: Every backend of the IFM ops, through the ``backend`` fixture (tests/modules/conftest.py: it skips
#: the missing one).
ALL_BACKENDS = pytest.mark.parametrize("backend", ["reference", "cpu", "triton"], indirect=True)


def _attn(layer, query, context=None):
    """Literal multi-head single-projection attention: (out, map averaged over heads)."""
    ctx = query if context is None else context
    q, k, v = query @ layer.q_proj.weight.T, ctx @ layer.k_proj.weight.T, ctx @ layer.v_proj.weight.T
    h, dh = layer.heads, layer.d // layer.heads
    outs, maps = [], []
    for i in range(h):
        sl = slice(i * dh, (i + 1) * dh)
        p = torch.softmax(q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(dh), dim=-1)
        outs.append(p @ v[..., sl])
        maps.append(p)
    return torch.cat(outs, -1), torch.stack(maps).mean(0)


def _paper(m, x, t_hard, t_soft):
    t_ka, m_ka = _attn(m.label_attn, t_hard)
    t_soft2, _ = _attn(m.cross_attn, t_soft, x)
    t_ca, m_ca = _attn(m.context_attn, t_soft2)
    t_ca = t_ca + m.mlp(torch.cat([t_ka.expand_as(t_ca), t_ca], -1))
    kcr = (1 - F.cosine_similarity(t_ka.expand_as(t_ca), t_ca, dim=-1)).mean()
    a = torch.sigmoid(m.alpha_logit)
    labels = (a * m_ka + (1 - a) * m_ca) @ t_ca
    return labels, kcr, m_ka, m_ca


def _inputs(B, M, C, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((B, M, d), (C, d), (C, d))]


@pytest.mark.parametrize("B,M,C,d,heads,folds", [(2, 5, 3, 8, 1, True), (1, 1, 1, 4, 2, True),
                                                  (3, 7, 4, 6, 3, False), (2, 3, 9, 8, 1, False)])
def test_cross_attention_folds_when_cheaper(B, M, C, d, heads, folds):
    """Both paths of the cross-attention are exercised by the equality tests."""
    m = IFM(d, heads=heads, backend="reference")
    assert m.cross_attn.folds(C, M) is folds
    h = heads
    fold_macs = 2 * h * C * M * d + C * d * d
    plain_macs = 2 * M * d * d + 2 * C * M * d
    assert (fold_macs < plain_macs) is folds


def test_plain_torch_baseline_is_the_paper():
    """vlssm.reference.ifm (the benchmark's naive IFM) equals the literal formulas."""
    from vlssm.reference.ifm import ifm_ref

    torch.manual_seed(3)
    m = IFM(12, heads=3, backend="reference").double()
    x, th, ts = _inputs(2, 6, 5, 12, torch.float64, seed=9)
    for a, b in zip(ifm_ref(m, x, th, ts), _paper(m, x, th, ts)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@ALL_BACKENDS
@pytest.mark.parametrize("B,M,C,d,heads", [(2, 5, 3, 8, 1), (1, 1, 1, 4, 2), (3, 7, 4, 6, 3), (2, 3, 9, 8, 1)])
def test_matches_paper_formulas_fp64(backend, B, M, C, d, heads):
    torch.manual_seed(B * 100 + C)
    m = IFM(d, heads=heads, backend=backend).double()
    with torch.no_grad():
        m.alpha_logit.fill_(0.3)
    x, th, ts = _inputs(B, M, C, d, torch.float64, seed=C + M)
    for t in (x, th, ts):
        t.requires_grad_(True)
    out = m(x, th, ts)
    ref = _paper(m, x, th, ts)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # gradients of every input and parameter, through labels and the loss
    w = torch.randn(out.labels.shape, dtype=torch.float64)
    params = [x, th, ts, *m.parameters()]
    g1 = torch.autograd.grad((out.labels * w).sum() + out.kcr_loss, params)
    g2 = torch.autograd.grad((ref[0] * w).sum() + ref[1], params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


@ALL_BACKENDS
def test_fp32_close_to_fp64(backend):
    torch.manual_seed(0)
    m = IFM(16, heads=2, backend=backend)
    x, th, ts = _inputs(2, 9, 5, 16, torch.float32, seed=1)
    out = m(x, th, ts)
    m64 = IFM(16, heads=2, backend="reference").double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    ref = m64(x.double(), th.double(), ts.double())
    for a, b in zip(out, ref):
        assert T.rel_err(a, b) < 1e-5


def test_label_attention_computed_once_and_cached_in_eval(monkeypatch):
    torch.manual_seed(0)
    m = IFM(8, backend="reference")
    x, th, ts = _inputs(3, 4, 2, 8, torch.float32, seed=2)
    calls = []
    orig = m.label_attn.forward
    monkeypatch.setattr(m.label_attn, "forward", lambda *a: calls.append(a[0].shape) or orig(*a))
    m(x, th, ts)
    assert calls == [torch.Size([2, 8])]  # once per forward, on (C, d), not per image
    m.eval()
    with torch.no_grad():
        first = m(x, th, ts)
        second = m(x, th, ts)
    assert len(calls) == 2  # computed once in eval, then cached
    torch.testing.assert_close(first.labels, second.labels, rtol=0, atol=0)
    with torch.no_grad():
        m.label_attn.q_proj.weight.mul_(1.5)  # a parameter change invalidates the cache
        third = m(x, th, ts)
    assert len(calls) == 3
    assert not torch.equal(third.m_ka, first.m_ka)
    with torch.no_grad():
        th.add_(1.0)  # so does a change of T^hard
        m(x, th, ts)
    assert len(calls) == 4
    m.train()
    m(x, th, ts)
    m(x, th, ts)
    assert len(calls) == 6  # never cached in training mode


def test_alpha_in_unit_interval_and_learnable():
    m = IFM(8, backend="reference")
    assert abs(m.alpha.item() - 0.5) < 1e-7
    x, th, ts = _inputs(2, 3, 2, 8, torch.float32, seed=3)
    m(x, th, ts).labels.sum().backward()
    assert m.alpha_logit.grad is not None and torch.isfinite(m.alpha_logit.grad)
    with torch.no_grad():
        m.alpha_logit.fill_(50.0)
    assert 0.0 <= m.alpha.item() <= 1.0


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (lambda x, th, ts: (x[0], th, ts), ValueError, "x"),
        (lambda x, th, ts: (x, th[:, :3], ts), ValueError, "t_hard"),
        (lambda x, th, ts: (x, th, ts[:1]), ValueError, "t_soft"),
        (lambda x, th, ts: (x, th.double(), ts), TypeError, "t_hard"),
        (lambda x, th, ts: (x, th, [1.0]), TypeError, "t_soft"),
        (lambda x, th, ts: (x[:, :0], th, ts), ValueError, "x"),
    ],
)
def test_bad_inputs(args, exc, match):
    m = IFM(8, backend="reference")
    x, th, ts = _inputs(2, 3, 2, 8, torch.float32, seed=4)
    with pytest.raises(exc, match=match):
        m(*args(x, th, ts))


def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = IFM(8, heads=2, backend="cpu" if T.HAS_EXT else "reference")
    x, th, ts = _inputs(2, 5, 3, 8, torch.float32, seed=5)
    eager = m(x, th, ts)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")(x, th, ts)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
