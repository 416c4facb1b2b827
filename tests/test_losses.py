"""Tests of vlssm.losses: ASL, DB-Focal, Candle's compensating logit-adjusted loss, KCRLoss.

Ground truth, written here independently of vlssm:

- ``*_literal``: the published formula, one element at a time in float64 (Python loops
  over torch scalars, so that autograd gives the reference gradient);
- ``asl_official`` / ``db_official``: the official code's arithmetic transcribed line by
  line (Alibaba-MIIL/ASL ``AsymmetricLoss.forward``; wutong16/DistributionBalancedLoss
  ``ResampleLoss`` with rebalance weighting, logit_reg and focal), in float64.

The literal formulas are checked at moderate logits (where ASL's eps clamp does not bind);
the official transcriptions also at extreme logits (+-100), in float32 and bfloat16.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from vlssm import (
    ops,
    testing,  # not `as T`: T is a targets tensor below
)
from vlssm.losses import AsymmetricLoss, CompensatingLogitAdjustedLoss, DistributionBalancedFocalLoss, KCRLoss

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


# --------------------------------------------------------------------------
# Helpers

def logits_targets(seed: int, shape=(3, 5), scale: float = 4.0, dtype=F64):
    g = testing.gen(seed)
    z = (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)
    y = (torch.rand(shape, generator=g) < 0.4).to(F64)
    y[0] = 0.0                      # an image without positives
    y[1, 0], y[1, 1] = 1.0, 0.0     # both kinds in row 1
    return z, y


def extreme_logits(shape=(4, 6), dtype=F32):
    """+-100, +-30, +-5 and 0 against both target values."""
    vals = torch.tensor([100.0, -100.0, 30.0, -30.0, 5.0, -5.0, 0.0, 100.0, -100.0, 17.0, -17.0, 1.0], dtype=F64)
    z = vals.repeat(shape[0] * shape[1] // vals.numel() + 1)[: shape[0] * shape[1]].reshape(shape)
    y = torch.zeros(shape, dtype=F64)
    y[::2, :] = 1.0
    y[:, ::3] = 1.0 - y[:, ::3]
    return z.to(dtype), y


def grad_of(fn, z):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z)
    (g,) = torch.autograd.grad(out.sum(), z)
    return out.detach(), g


def assert_close(actual, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=rtol, atol=atol)


def sig(x):
    return 1.0 / (1.0 + torch.exp(-x))


def stack(values, shape):
    return torch.stack(values).reshape(shape)


# --------------------------------------------------------------------------
# ASL references

def asl_literal(z, y, gamma_neg, gamma_pos, clip):
    """Ridnik et al. 2021: L+ = (1-p)^g+ log p, L- = p_m^g- log(1-p_m), p_m = max(p-m, 0);
    elementwise -(y L+ + (1-y) L-), float64, one element at a time."""
    out = []
    for idx in itertools.product(*map(range, z.shape)):
        p = sig(z[idx])
        if y[idx] == 1:
            out.append(-((1 - p) ** gamma_pos) * torch.log(p))
        else:
            p_m = torch.clamp(p - clip, min=0.0)
            out.append(-(p_m ** gamma_neg) * torch.log(1 - p_m))
    return stack(out, z.shape)


def asl_official(x, y, gamma_neg=4, gamma_pos=1, clip=0.05, eps=1e-8, disable_torch_grad_focal_loss=False):
    """Alibaba-MIIL/ASL src/loss_functions/losses.py AsymmetricLoss.forward, elementwise
    (before its final -loss.sum()). ``with torch.no_grad()`` stands for its set_grad_enabled(False)."""
    x_sigmoid = torch.sigmoid(x)
    xs_pos = x_sigmoid
    xs_neg = 1 - x_sigmoid
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    if gamma_neg > 0 or gamma_pos > 0:
        with torch.set_grad_enabled(not disable_torch_grad_focal_loss and torch.is_grad_enabled()):
            pt0 = xs_pos * y
            pt1 = xs_neg * (1 - y)
            pt = pt0 + pt1
            one_sided_gamma = gamma_pos * y + gamma_neg * (1 - y)
            one_sided_w = torch.pow(1 - pt, one_sided_gamma)
        loss = loss * one_sided_w
    return -loss


ASL_CONFIGS = [
    dict(gamma_neg=4, gamma_pos=1, clip=0.05),      # ASL defaults
    dict(gamma_neg=2, gamma_pos=0, clip=0.05),      # MVLR
    dict(gamma_neg=0, gamma_pos=0, clip=0.0),       # plain BCE
    dict(gamma_neg=3.5, gamma_pos=0.5, clip=0.2),   # fractional exponents, wide margin
    dict(gamma_neg=2, gamma_pos=1, clip=0.0),       # focusing without shift
    dict(gamma_neg=0, gamma_pos=1, clip=0.1),       # shift without negative focusing: min(1 - p + m, 1) shows
]


@pytest.mark.parametrize("cfg", ASL_CONFIGS, ids=lambda c: "gn{gamma_neg}-gp{gamma_pos}-m{clip}".format(**c))
def test_asl_matches_paper_formula(cfg):
    z, y = logits_targets(0)
    loss = AsymmetricLoss(**cfg, reduction="none")
    got, g = grad_of(lambda t: loss(t, y), z)
    want, g_want = grad_of(lambda t: asl_literal(t, y, cfg["gamma_neg"], cfg["gamma_pos"], cfg["clip"]), z)
    assert got.dtype == F64 and got.shape == z.shape
    assert_close(got, want)
    assert_close(g, g_want)


@pytest.mark.parametrize("disable", [False, True])
@pytest.mark.parametrize("cfg", ASL_CONFIGS, ids=lambda c: "gn{gamma_neg}-gp{gamma_pos}-m{clip}".format(**c))
def test_asl_matches_official_code(cfg, disable):
    z, y = logits_targets(1, shape=(4, 7), scale=6.0)
    z = torch.cat([z, extreme_logits((2, 7), F64)[0]])
    y = torch.cat([y, extreme_logits((2, 7), F64)[1]])
    loss = AsymmetricLoss(**cfg, disable_torch_grad_focal_loss=disable)   # reduction "sum", ASL's
    got, g = grad_of(lambda t: loss(t, y), z)
    want, g_want = grad_of(lambda t: asl_official(t, y, **cfg, disable_torch_grad_focal_loss=disable).sum(), z)
    assert got.dim() == 0
    assert_close(got, want)
    # The code's pow(1 - pt, gamma) has an inf * 0 = NaN gradient where 1 - pt is exactly 0 and
    # 0 < gamma < 1 (a positive at +100 with gamma_pos = 0.5); the loss has a finite one there.
    finite = torch.isfinite(g_want)
    fractional = any(0 < cfg[k] < 1 for k in ("gamma_neg", "gamma_pos")) and not disable
    assert finite.all() or fractional
    assert torch.isfinite(g).all()
    assert_close(g[finite], g_want[finite])


def test_asl_focusing_gradient_flag_matters():
    """With the focusing weight detached the gradient differs from the formula's."""
    z, y = logits_targets(2)
    _, g_exact = grad_of(lambda t: AsymmetricLoss()(t, y), z)
    _, g_detached = grad_of(lambda t: AsymmetricLoss(disable_torch_grad_focal_loss=True)(t, y), z)
    assert not torch.allclose(g_exact, g_detached, rtol=1e-3, atol=1e-6)


def test_asl_plain_bce_limit():
    """gamma = 0, no shift: binary cross-entropy with logits."""
    z, y = logits_targets(3, scale=3.0)
    got = AsymmetricLoss(gamma_neg=0, gamma_pos=0, clip=None, reduction="mean")(z, y)
    assert_close(got, F.binary_cross_entropy_with_logits(z, y))


def test_asl_reductions():
    z, y = logits_targets(4)
    elem = asl_official(z, y)
    assert_close(AsymmetricLoss(reduction="none")(z, y), elem)
    assert_close(AsymmetricLoss(reduction="sum")(z, y), elem.sum())
    assert_close(AsymmetricLoss(reduction="mean")(z, y), elem.sum() / z.numel())
    assert_close(AsymmetricLoss()(z, y), elem.sum())                # default "sum", ASL's
    # Targets of any 0/1 dtype.
    for t in (y.bool(), y.long(), y.float()):
        assert_close(AsymmetricLoss()(z, t), elem.sum())


def test_asl_for_mvlr():
    """MVLR Eq. 13: gamma+ = 0, gamma- = 2, (1/C) sum over classes (batch-averaged)."""
    loss = AsymmetricLoss.for_mvlr()
    assert (loss.gamma_pos, loss.gamma_neg, loss.clip, loss.eps, loss.reduction) == (0, 2, 0.05, 1e-8, "mean")
    z, y = logits_targets(5)
    per_image = asl_official(z, y, gamma_neg=2, gamma_pos=0).sum(1) / z.shape[1]
    assert_close(loss(z, y), per_image.mean())
    assert AsymmetricLoss.for_mvlr(clip=0.0).clip == 0.0


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("disable", [False, True])
def test_asl_extreme_logits(dtype, disable):
    z, y = extreme_logits(dtype=dtype)
    cfg = dict(gamma_neg=4, gamma_pos=1, clip=0.05, disable_torch_grad_focal_loss=disable)
    got, g = grad_of(lambda t: AsymmetricLoss(**cfg, reduction="none")(t, y.to(dtype)), z)
    assert got.dtype == F32 and g.dtype == dtype
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    want, g_want = grad_of(lambda t: asl_official(t, y, **cfg), z.to(F64))
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(g, g_want, rtol=1e-2 if dtype == BF16 else 1e-5, atol=1e-5)
    # The eps clamp: a positive at -100 costs -log(eps) (its focusing weight is 1), not 100.
    assert got[z == -100][y[z == -100] == 1][0].item() == pytest.approx(-math.log(1e-8), rel=1e-6)


@pytest.mark.parametrize("cfg", [dict(gamma_neg=0.5, gamma_pos=0.5, clip=0.05), dict(gamma_neg=0.3, gamma_pos=0.7,
                                                                                      clip=0.0)])
def test_asl_fractional_gamma_finite_gradient(cfg):
    """Fractional exponents at the zero of the shifted probability (p <= m) and at +-100:
    finite gradients (the reference code's pow would give inf * 0 there)."""
    z = torch.tensor([[-100.0, -3.0, math.log(0.05 / 0.95), 0.0, 100.0]], dtype=F32)
    y = torch.tensor([[0, 0, 0, 1, 1]])
    _, g = grad_of(lambda t: AsymmetricLoss(**cfg)(t, y), z)
    assert torch.isfinite(g).all()


def test_asl_ignore_index():
    z, y = logits_targets(6)
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[0, 1] = keep[2, 3] = keep[1, 4] = False
    y_ign = torch.where(keep, y, torch.full_like(y, -1.0))
    elem = asl_official(z, y)
    loss = AsymmetricLoss(ignore_index=-1, reduction="none")
    got, g = grad_of(lambda t: loss(t, y_ign), z)
    assert_close(got, torch.where(keep, elem, 0.0))
    _, g_want = grad_of(lambda t: torch.where(keep, asl_official(t, y), 0.0).sum(), z)
    assert_close(g, g_want)
    assert (g[~keep] == 0).all() and (g_want[~keep] == 0).all() and (g_want[keep] != 0).any()
    assert_close(AsymmetricLoss(ignore_index=-1)(z, y_ign), elem[keep].sum())
    assert_close(AsymmetricLoss(ignore_index=-1, reduction="mean")(z, y_ign), elem[keep].mean())
    assert_close(AsymmetricLoss(ignore_index=-1, reduction="mean")(z, y_ign.long()), elem[keep].mean())
    all_ignored = AsymmetricLoss(ignore_index=-1, reduction="mean")(z, torch.full_like(y, -1.0))
    assert all_ignored.item() == 0.0
    # Without ignore_index, -1 is a bad target.
    testing.check_raises(ValueError, "targets", AsymmetricLoss(), z, y_ign)


# --------------------------------------------------------------------------
# DB-Focal references

FREQ = [300, 120, 40, 9, 2]     # per-class positive counts (long tail)
TRAIN_NUM = 500


def db_literal(z, y, class_freq, train_num, alpha, beta, mu, neg_scale, init_bias, gamma, balance_param):
    """Wu et al. 2020, one element at a time, float64 (the official code's sign/scale of the shift):
    P^C_i = 1/(C n_i), P^I = sum_{y_j=1} 1/(C n_j), r = P^C/P^I, r_hat = alpha + sigmoid(beta (r - mu));
    b_i = -log(N/n_i - 1), q = z + kappa b_i / lambda;
    positive: r_hat (1 - sigmoid(q))^gamma * -log sigmoid(q);
    negative: (r_hat / lambda) sigmoid(lambda q)^gamma * -log(1 - sigmoid(lambda q)); times balance_param."""
    B, C = z.shape
    out = []
    for k in range(B):
        p_inst = sum(1.0 / (C * class_freq[j]) for j in range(C) if y[k, j] == 1)
        for i in range(C):
            if p_inst > 0:
                r = (1.0 / (C * class_freq[i])) / p_inst
                r_hat = alpha + 1.0 / (1.0 + math.exp(-beta * (r - mu)))
            else:
                r_hat = alpha + 1.0          # r = inf
            b = -math.log(train_num / class_freq[i] - 1.0)
            q = z[k, i] + init_bias * b / neg_scale
            if y[k, i] == 1:
                p = sig(q)
                term = r_hat * (1 - p) ** gamma * -torch.log(p)
            else:
                p = sig(neg_scale * q)
                term = (r_hat / neg_scale) * p ** gamma * -torch.log(1 - p)
            out.append(balance_param * term)
    return stack(out, z.shape)


def db_official(cls_score, label, class_freq, train_num, alpha, beta, mu, neg_scale, init_bias, gamma,
                balance_param):
    """wutong16/DistributionBalancedLoss mllt/models/losses/resample_loss.py ResampleLoss.forward with
    use_sigmoid, reweight_func='rebalance', focal, logit_reg; map_param (alpha, beta, gamma=mu).
    Elementwise (its training loop takes the mean). Out of place where the original adds in place."""
    class_freq = torch.tensor(class_freq, dtype=F64)
    label = label.to(F64)
    init_bias_v = -torch.log(train_num / class_freq - 1) * init_bias / neg_scale
    freq_inv = torch.ones(class_freq.shape, dtype=F64) / class_freq
    # rebalance_weight
    repeat_rate = torch.sum(label * freq_inv, dim=1, keepdim=True)
    pos_weight = freq_inv.clone().detach().unsqueeze(0) / repeat_rate
    weight = torch.sigmoid(beta * (pos_weight - mu)) + alpha
    # logit_reg_functions
    logits = cls_score + init_bias_v
    logits = logits * (1 - label) * neg_scale + logits * label
    weight = weight / neg_scale * (1 - label) + weight * label
    # focal
    logpt = -F.binary_cross_entropy_with_logits(logits.clone(), label, reduction="none")
    pt = torch.exp(logpt)
    loss = F.binary_cross_entropy_with_logits(logits, label, weight=weight, reduction="none")
    loss = ((1 - pt) ** gamma) * loss
    return balance_param * loss


DB_CONFIGS = {
    "coco-lt": DistributionBalancedFocalLoss.PRESETS["coco-lt"],
    "voc-lt": DistributionBalancedFocalLoss.PRESETS["voc-lt"],
    "gamma0": dict(alpha=0.2, beta=5.0, mu=0.1, neg_scale=1.0, init_bias=0.0, gamma=0.0, balance_param=1.0),
    "fractional": dict(alpha=0.0, beta=3.0, mu=0.5, neg_scale=3.5, init_bias=0.2, gamma=0.5, balance_param=1.5),
}


def test_db_defaults_are_the_official_coco_config():
    loss = DistributionBalancedFocalLoss(FREQ, TRAIN_NUM)
    got = {k: getattr(loss, k) for k in DB_CONFIGS["coco-lt"]}
    assert got == dict(alpha=0.1, beta=10.0, mu=0.2, neg_scale=2.0, init_bias=0.05, gamma=2.0, balance_param=2.0)
    assert loss.reduction == "mean"
    voc = DistributionBalancedFocalLoss.from_preset("voc-lt", FREQ, TRAIN_NUM, reduction="sum")
    assert (voc.mu, voc.neg_scale, voc.init_bias, voc.reduction) == (0.3, 5.0, 0.05, "sum")


def test_db_weights_by_hand():
    """n = (1, 4): an image with both labels has P^I = (1 + 1/4)/C, r = (0.8, 0.2); an image
    with none gets alpha + 1. The shift of class i is kappa (-log(N/n_i - 1)) / lambda."""
    loss = DistributionBalancedFocalLoss([1, 4], 10, alpha=0.1, beta=10.0, mu=0.2, neg_scale=2.0, init_bias=0.05)
    pos = torch.tensor([[True, True], [False, False], [False, True]])
    w = loss.rebalance_weight(pos, F64)
    def s(x):
        return 1 / (1 + math.exp(-x))

    # Image 1: r = (0.8, 0.2) -> 0.1 + s(10 (r - 0.2)); image 3 (class 1 only): P^I = 1/(4C), r = (4, 1).
    expected = torch.tensor([[0.1 + s(6.0), 0.6], [1.1, 1.1], [0.1 + s(38.0), 0.1 + s(8.0)]], dtype=F64)
    assert_close(w, expected)
    assert_close(loss.logit_shift(F64), torch.tensor([-math.log(9.0), -math.log(1.5)], dtype=F64) * 0.025)


@pytest.mark.parametrize("name", list(DB_CONFIGS))
def test_db_matches_paper_formula(name):
    cfg = DB_CONFIGS[name]
    z, y = logits_targets(10, shape=(4, 5), scale=2.0)
    loss = DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, **cfg, reduction="none")
    got, g = grad_of(lambda t: loss(t, y), z)
    want, g_want = grad_of(lambda t: db_literal(t, y, FREQ, TRAIN_NUM, **cfg), z)
    assert got.dtype == F64
    assert_close(got, want)
    assert_close(g, g_want)


@pytest.mark.parametrize("name", list(DB_CONFIGS))
def test_db_matches_official_code(name):
    cfg = DB_CONFIGS[name]
    z, y = logits_targets(11, shape=(3, 5), scale=8.0)
    ze, ye = extreme_logits((3, 5), F64)
    z, y = torch.cat([z, ze]), torch.cat([y, ye])
    loss = DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, **cfg)
    got, g = grad_of(lambda t: loss(t, y), z)
    want, g_want = grad_of(lambda t: db_official(t, y, FREQ, TRAIN_NUM, **cfg).mean(), z)
    assert_close(got, want)
    # The code's (1 - pt) ** gamma has a NaN gradient where 1 - pt is exactly 0 and gamma < 1
    # (extreme logits, config "fractional"); the loss has a finite one there.
    finite = torch.isfinite(g_want)
    assert finite.all() or 0 < cfg["gamma"] < 1
    assert torch.isfinite(g).all()
    assert_close(g[finite], g_want[finite])


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_db_extreme_logits(dtype):
    z, y = extreme_logits((4, 5), dtype)
    cfg = DB_CONFIGS["voc-lt"]
    got, g = grad_of(lambda t: DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, **cfg, reduction="none")(t, y), z)
    assert got.dtype == F32 and g.dtype == dtype
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    want, g_want = grad_of(lambda t: db_official(t, y, FREQ, TRAIN_NUM, **cfg), z.to(F64))
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert_close(g, g_want, rtol=1e-2 if dtype == BF16 else 1e-5, atol=1e-5)


def test_db_reductions_and_ignore():
    z, y = logits_targets(12, shape=(4, 5), scale=2.0)
    cfg = DB_CONFIGS["coco-lt"]
    elem = db_literal(z, y, FREQ, TRAIN_NUM, **cfg)
    assert_close(DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, reduction="sum")(z, y), elem.sum())
    assert_close(DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, reduction="mean")(z, y), elem.mean())
    # Ignored entries: neither positive in P^I nor a negative; no loss, no gradient, not counted.
    keep = torch.ones_like(y, dtype=torch.bool)
    keep[1, 0] = keep[3, 2] = keep[2, 4] = False          # [1, 0] is a positive: P^I of image 1 changes
    y_ign = torch.where(keep, y, torch.full_like(y, -1.0))
    y_as_neg = torch.where(keep, y, 0.0)                   # what the literal sees for P^I
    elem_ign = db_literal(z, y_as_neg, FREQ, TRAIN_NUM, **cfg)
    loss = DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, ignore_index=-1, reduction="none")
    got, g = grad_of(lambda t: loss(t, y_ign), z)
    assert_close(got, torch.where(keep, elem_ign, 0.0))
    assert (g[~keep] == 0).all()
    assert not torch.allclose(got[1], torch.where(keep, elem, 0.0)[1])   # P^I without the ignored positive
    mean = DistributionBalancedFocalLoss(FREQ, TRAIN_NUM, ignore_index=-1)(z, y_ign)
    assert_close(mean, elem_ign[keep].mean())


def test_db_counts_survive_module_casts():
    loss = DistributionBalancedFocalLoss([300, 257, 2], 1000).to(BF16)
    z, y = logits_targets(13, shape=(2, 3), scale=2.0)
    want = db_literal(z, y, [300, 257, 2], 1000, **DB_CONFIGS["coco-lt"]).mean()
    assert_close(loss(z, y), want)


# --------------------------------------------------------------------------
# Candle

COUNTS = [50, 20, 5, 0, 0]   # two new classes without samples


def cla_literal_single(z, t, counts, tau):
    """-log softmax(l + tau log pi)_y, pi_c = (n_c + 1) / sum (n_j + 1); per image, float64."""
    total = sum(n + 1 for n in counts)
    log_pi = [math.log((n + 1) / total) for n in counts]
    out = []
    for k in range(z.shape[0]):
        adj = [z[k, c] + tau * log_pi[c] for c in range(z.shape[1])]
        out.append(torch.log(sum(torch.exp(a) for a in adj)) - adj[int(t[k])])
    return torch.stack(out)


def cla_literal_multi(z, y, counts, tau):
    """-[y log sigmoid(a) + (1 - y) log(1 - sigmoid(a))], a = l + tau log pi; elementwise, float64."""
    total = sum(n + 1 for n in counts)
    out = []
    for k, c in itertools.product(range(z.shape[0]), range(z.shape[1])):
        p = sig(z[k, c] + tau * math.log((counts[c] + 1) / total))
        out.append(-torch.log(p) if y[k, c] == 1 else -torch.log(1 - p))
    return stack(out, z.shape)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_cla_single_label_matches_formula(tau):
    z, _ = logits_targets(20, shape=(6, 5), scale=3.0)
    t = torch.tensor([0, 1, 2, 3, 4, 0])
    loss = CompensatingLogitAdjustedLoss(COUNTS, tau=tau, reduction="none")
    got, g = grad_of(lambda u: loss(u, t), z)
    want, g_want = grad_of(lambda u: cla_literal_single(u, t, COUNTS, tau), z)
    assert got.shape == (6,)
    assert_close(got, want)
    assert_close(g, g_want)
    assert_close(CompensatingLogitAdjustedLoss(COUNTS, tau=tau)(z, t), want.mean())
    assert_close(CompensatingLogitAdjustedLoss(COUNTS, tau=tau, reduction="sum")(z, t), want.sum())


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_cla_multi_label_matches_formula(tau):
    z, y = logits_targets(21, shape=(4, 5), scale=3.0)
    loss = CompensatingLogitAdjustedLoss(COUNTS, tau=tau, multi_label=True, reduction="none")
    got, g = grad_of(lambda u: loss(u, y), z)
    want, g_want = grad_of(lambda u: cla_literal_multi(u, y, COUNTS, tau), z)
    assert got.shape == z.shape
    assert_close(got, want)
    assert_close(g, g_want)
    assert_close(CompensatingLogitAdjustedLoss(COUNTS, tau=tau, multi_label=True)(z, y), want.mean())


def test_cla_limits():
    """tau = 0 or a uniform prior (softmax is shift invariant): plain cross-entropy; a skewed
    prior moves the loss (rare classes cost more when they are the target)."""
    z, _ = logits_targets(22, shape=(5, 4), scale=2.0)
    t = torch.tensor([0, 1, 2, 3, 3])
    ce = F.cross_entropy(z, t)
    assert_close(CompensatingLogitAdjustedLoss([7, 3, 0, 1], tau=0.0)(z, t), ce)
    assert_close(CompensatingLogitAdjustedLoss([4, 4, 4, 4])(z, t), ce)
    assert_close(CompensatingLogitAdjustedLoss([4, 4, 4, 4], multi_label=True, tau=0.0)(z, (z > 0).to(F64)),
                 F.binary_cross_entropy_with_logits(z, (z > 0).to(F64)))
    skewed = CompensatingLogitAdjustedLoss([100, 100, 100, 0], reduction="none")(z, t)
    plain = F.cross_entropy(z, t, reduction="none")
    assert (skewed[t == 3] > plain[t == 3]).all() and (skewed[t != 3] < plain[t != 3]).all()


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("multi_label", [False, True])
def test_cla_extreme_logits(dtype, multi_label):
    z, y = extreme_logits((4, 5), dtype)
    t = y if multi_label else torch.tensor([0, 1, 3, 4])
    loss = CompensatingLogitAdjustedLoss(COUNTS, multi_label=multi_label, reduction="none")
    got, g = grad_of(lambda u: loss(u, t), z)
    assert got.dtype == F32 and g.dtype == dtype
    assert torch.isfinite(got).all() and torch.isfinite(g).all()
    log_pi = torch.log(torch.tensor(COUNTS, dtype=F64) + 1) - math.log(sum(COUNTS) + len(COUNTS))
    adj = z.to(F64) + log_pi
    if multi_label:
        want = F.binary_cross_entropy_with_logits(adj, y, reduction="none")
    else:
        want = F.cross_entropy(adj, t, reduction="none")
    assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cla_ignore_index():
    z, y = logits_targets(23, shape=(4, 5), scale=2.0)
    t = torch.tensor([0, -100, 4, 2])
    loss = CompensatingLogitAdjustedLoss(COUNTS, ignore_index=-100, reduction="none")
    got, g = grad_of(lambda u: loss(u, t), z)
    keep = t != -100
    want = cla_literal_single(z[keep], t[keep], COUNTS, 1.0)
    assert_close(got[keep], want)
    assert got[1].item() == 0.0 and (g[1] == 0).all()
    assert_close(CompensatingLogitAdjustedLoss(COUNTS, ignore_index=-100)(z, t), want.mean())
    y_ign = y.clone()
    y_ign[2, 3] = -1
    multi = CompensatingLogitAdjustedLoss(COUNTS, multi_label=True, ignore_index=-1)(z, y_ign)
    mask = y_ign != -1
    assert_close(multi, cla_literal_multi(z, y, COUNTS, 1.0)[mask].mean())


# --------------------------------------------------------------------------
# KCR

def kcr_literal(t_ka, t_ca, eps=1e-8):
    """(1/rows) sum_j (1 - <a_j, b_j> / (max(|a_j|, eps) max(|b_j|, eps))) over the broadcast rows."""
    a, b = torch.broadcast_tensors(t_ka, t_ca)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    terms = []
    for x, w in zip(a, b):
        dot = sum(x[i] * w[i] for i in range(x.numel()))
        nx = torch.sqrt(sum(x[i] ** 2 for i in range(x.numel()))).clamp(min=eps)
        nw = torch.sqrt(sum(w[i] ** 2 for i in range(w.numel()))).clamp(min=eps)
        terms.append(1 - dot / (nx * nw))
    return sum(terms) / len(terms)


KCR_BACKENDS = [None, "reference",
                pytest.param("cpu", marks=testing.requires_ext)]


@pytest.mark.parametrize("backend", KCR_BACKENDS)
def test_kcr_loss_matches_eq9(backend):
    g = testing.gen(30)
    t_ka = torch.randn(5, 6, generator=g, dtype=F64)             # (C, d): shared by the batch
    t_ca = torch.randn(2, 5, 6, generator=g, dtype=F64) + 0.3    # (B, C, d)
    loss = KCRLoss(backend=backend)
    t_ka_, t_ca_ = t_ka.clone().requires_grad_(), t_ca.clone().requires_grad_()
    got = loss(t_ka_, t_ca_)
    ga, gc = torch.autograd.grad(got, (t_ka_, t_ca_))
    t_ka_, t_ca_ = t_ka.clone().requires_grad_(), t_ca.clone().requires_grad_()
    want = kcr_literal(t_ka_, t_ca_)
    wa, wc = torch.autograd.grad(want, (t_ka_, t_ca_))
    assert got.dim() == 0
    assert_close(got, want, rtol=1e-9)
    assert_close(ga, wa, rtol=1e-9)
    assert_close(gc, wc, rtol=1e-9)
    # Same rows aligned: zero; opposite: 2.
    assert abs(loss(t_ka, t_ka).item()) < 1e-12
    assert loss(t_ka, -2 * t_ka).item() == pytest.approx(2.0)


def test_kcr_loss_is_the_op():
    g = testing.gen(31)
    t_ka, t_ca = torch.randn(3, 4, 8, generator=g, dtype=F64), torch.randn(3, 4, 8, generator=g, dtype=F64)
    t_ka[0, 1] *= 1e-9                        # a row whose norm is below eps: the clamp binds
    got = KCRLoss(eps=1e-6)(t_ka, t_ca)
    assert torch.equal(got, ops.kcr_loss(t_ka, t_ca, 1e-6))
    assert_close(got, kcr_literal(t_ka, t_ca, eps=1e-6), rtol=1e-9)
    assert not torch.allclose(got, KCRLoss()(t_ka, t_ca))


# --------------------------------------------------------------------------
# Bad inputs

Z = torch.zeros(2, 3)
Y = torch.zeros(2, 3)
T = torch.tensor([0, 2])
ASL = AsymmetricLoss()
DB = DistributionBalancedFocalLoss([1, 2, 3], 10)
CLA = CompensatingLogitAdjustedLoss([1, 0, 3])
CLA_M = CompensatingLogitAdjustedLoss([1, 0, 3], multi_label=True)

BAD = [
    # forward: logits
    ("asl-int-logits", lambda: ASL(Z.long(), Y), TypeError, "logits"),
    ("asl-list-logits", lambda: ASL([[0.0]], Y), TypeError, "logits"),
    ("asl-empty", lambda: ASL(torch.zeros(0, 3), torch.zeros(0, 3)), ValueError, "logits"),
    ("db-1d-logits", lambda: DB(torch.zeros(3), torch.zeros(3)), ValueError, "logits"),
    ("db-wrong-C", lambda: DB(torch.zeros(2, 4), torch.zeros(2, 4)), ValueError, "logits"),
    ("cla-wrong-C", lambda: CLA(torch.zeros(2, 4), T), ValueError, "logits"),
    ("cla-int-logits", lambda: CLA(Z.int(), T), TypeError, "logits"),
    # forward: targets
    ("asl-shape", lambda: ASL(Z, torch.zeros(3, 2)), ValueError, "targets"),
    ("asl-broadcast", lambda: ASL(Z, torch.zeros(1, 3)), ValueError, "targets"),
    ("asl-value-2", lambda: ASL(Z, torch.full((2, 3), 2.0)), ValueError, "targets"),
    ("asl-value-soft", lambda: ASL(Z, torch.full((2, 3), 0.5)), ValueError, "targets"),
    ("asl-value-nan", lambda: ASL(Z, torch.full((2, 3), float("nan"))), ValueError, "targets"),
    ("asl-not-tensor", lambda: ASL(Z, [[0, 1, 0], [1, 0, 0]]), TypeError, "targets"),
    ("db-value", lambda: DB(Z, torch.full((2, 3), 3)), ValueError, "targets"),
    ("db-shape", lambda: DB(Z, torch.zeros(2, 1)), ValueError, "targets"),
    ("cla-float-index", lambda: CLA(Z, T.float()), TypeError, "targets"),
    ("cla-index-range", lambda: CLA(Z, torch.tensor([0, 3])), ValueError, "targets"),
    ("cla-negative-index", lambda: CLA(Z, torch.tensor([-1, 0])), ValueError, "targets"),
    ("cla-index-shape", lambda: CLA(Z, torch.tensor([[0], [1]])), ValueError, "targets"),
    ("cla-multi-value", lambda: CLA_M(Z, torch.full((2, 3), 2.0)), ValueError, "targets"),
    ("cla-multi-shape", lambda: CLA_M(Z, T), ValueError, "targets"),
    # hyperparameters
    ("asl-gamma-neg", lambda: AsymmetricLoss(gamma_neg=-1), ValueError, "gamma_neg"),
    ("asl-gamma-pos", lambda: AsymmetricLoss(gamma_pos=-0.5), ValueError, "gamma_pos"),
    ("asl-gamma-inf", lambda: AsymmetricLoss(gamma_neg=float("inf")), ValueError, "gamma_neg"),
    ("asl-gamma-str", lambda: AsymmetricLoss(gamma_neg="2"), TypeError, "gamma_neg"),
    ("asl-eps-0", lambda: AsymmetricLoss(eps=0), ValueError, "eps"),
    ("asl-eps-neg", lambda: AsymmetricLoss(eps=-1e-8), ValueError, "eps"),
    ("asl-clip", lambda: AsymmetricLoss(clip=1.0), ValueError, "clip"),
    ("asl-clip-neg", lambda: AsymmetricLoss(clip=-0.1), ValueError, "clip"),
    ("asl-reduction", lambda: AsymmetricLoss(reduction="avg"), ValueError, "reduction"),
    ("asl-flag", lambda: AsymmetricLoss(disable_torch_grad_focal_loss=1), TypeError, "disable_torch_grad_focal_loss"),
    ("asl-ignore-0", lambda: AsymmetricLoss(ignore_index=0), ValueError, "ignore_index"),
    ("asl-ignore-float", lambda: AsymmetricLoss(ignore_index=-1.0), TypeError, "ignore_index"),
    ("db-zero-freq", lambda: DistributionBalancedFocalLoss([3, 0, 2], 10), ValueError, "class_freq"),
    ("db-negative-freq", lambda: DistributionBalancedFocalLoss([3, -1], 10), ValueError, "class_freq"),
    ("db-fraction-freq", lambda: DistributionBalancedFocalLoss([0.3, 0.1], 10), ValueError, "class_freq"),
    ("db-2d-freq", lambda: DistributionBalancedFocalLoss([[3, 2]], 10), ValueError, "class_freq"),
    ("db-empty-freq", lambda: DistributionBalancedFocalLoss([], 10), ValueError, "class_freq"),
    ("db-train-num-small", lambda: DistributionBalancedFocalLoss([3, 10], 10), ValueError, "train_num"),
    ("db-train-num-float", lambda: DistributionBalancedFocalLoss([3, 10], 20.5), TypeError, "train_num"),
    ("db-neg-scale", lambda: DistributionBalancedFocalLoss([3], 10, neg_scale=0), ValueError, "neg_scale"),
    ("db-gamma", lambda: DistributionBalancedFocalLoss([3], 10, gamma=-2), ValueError, "gamma"),
    ("db-init-bias", lambda: DistributionBalancedFocalLoss([3], 10, init_bias=-0.1), ValueError, "init_bias"),
    ("db-alpha", lambda: DistributionBalancedFocalLoss([3], 10, alpha=-0.1), ValueError, "alpha"),
    ("db-balance", lambda: DistributionBalancedFocalLoss([3], 10, balance_param=0), ValueError, "balance_param"),
    ("db-reduction", lambda: DistributionBalancedFocalLoss([3], 10, reduction=None), ValueError, "reduction"),
    ("db-preset", lambda: DistributionBalancedFocalLoss.from_preset("lvis", [3], 10), ValueError, "name"),
    ("cla-negative-count", lambda: CompensatingLogitAdjustedLoss([3, -1]), ValueError, "class_counts"),
    ("cla-nan-count", lambda: CompensatingLogitAdjustedLoss([3, float("nan")]), ValueError, "class_counts"),
    ("cla-tau", lambda: CompensatingLogitAdjustedLoss([3, 1], tau=-1), ValueError, "tau"),
    ("cla-multi-flag", lambda: CompensatingLogitAdjustedLoss([3, 1], multi_label="yes"), TypeError, "multi_label"),
    ("cla-ignore-class", lambda: CompensatingLogitAdjustedLoss([3, 1], ignore_index=1), ValueError, "ignore_index"),
    ("cla-reduction", lambda: CompensatingLogitAdjustedLoss([3, 1], reduction="batchmean"), ValueError, "reduction"),
    ("kcr-eps", lambda: KCRLoss(eps=-1.0), ValueError, "eps"),
    ("kcr-backend", lambda: KCRLoss(backend="gpu"), ValueError, "backend"),
    ("kcr-dim", lambda: KCRLoss()(torch.zeros(3, 4), torch.zeros(3, 5)), ValueError, "t_ca"),
]


@pytest.mark.parametrize("fn,exc,name", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs(fn, exc, name):
    testing.check_raises(exc, name, fn)


def test_zero_frequency_message_names_the_class():
    msg = testing.check_raises(ValueError, "class_freq", DistributionBalancedFocalLoss, [3, 5, 0, 2], 10)
    assert "class 2" in msg
