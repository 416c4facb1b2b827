"""Tests of vlssm.models.candle (Candle on frozen CLIP features), on the tiny open_clip configs of
tests/models/conftest.py with random weights.

Checked: output shapes, and that images and precomputed features give the same scores; the loss
equals its three CLA terms recomputed here from the literal formula (cross-entropy / BCE of
l + tau log((n + 1) / sum(n + 1)), over the images and the prototype rows), single- and multi-label;
the gradient reaches exactly the trainable parameters (never the encoders or the base prototypes);
identity W_I / W_T give l0 = s cos(v, t) of the raw features; the text features and image features
are open_clip's own; the head recomputed literally (LN, the authors' residual on the normalised
sequence, the row layout); base prototypes are class means; subset scores are columns of the full
score; checkpoint round trip; torch.compile; extreme logits stay finite; bad inputs.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

import vlssm.models.candle  # noqa: E402,F401  (registers "candle")
from vlssm import models  # noqa: E402
from vlssm.models.candle import CandleConfig  # noqa: E402
from vlssm.testing.models import create  # noqa: E402

RN = "vlssm-test-tiny-RN"     # d = 32
VIT = "vlssm-test-tiny-ViT"   # d = 48
NAMES = ["cat", "dining_table", "traffic light", "person", "hair drier"]
COUNTS = [6, 3, 1, 0, 0]      # 3 base classes (long-tailed), 2 new
NB, C = 3, len(NAMES)
S = 64
TRAINABLE = {"virtual_prototypes", "proj_image", "proj_text", "fusion.rho", "fusion.norm.weight",
             "fusion.norm.bias", "fusion.attn.in_proj_weight", "fusion.attn.in_proj_bias",
             "fusion.attn.out_proj.weight", "fusion.attn.out_proj.bias"}


def _build(backbone=RN, seed=0, classnames=NAMES, **cfg):
    """A model with random weights (open_clip's zero-initialised ResNet bn3 weights drawn around 1, so
    that different images give different features)."""
    cfg.setdefault("class_counts", COUNTS)
    return create("candle", classnames, backbone, S, seed, **cfg)


def _feats(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, model.feature_dim, generator=g)


def _ready(model, seed=2):
    """Set the base prototypes from random features of 2 images per base class; returns (features, labels)."""
    f = _feats(model, 2 * model.num_base, seed)
    y = torch.arange(model.num_base).repeat(2)
    model.set_base_prototypes(f, y)
    return f, y


def _images(B=4, seed=3):
    return torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _log_prior(counts):
    tot = sum(n + 1 for n in counts)
    return torch.tensor([math.log((n + 1) / tot) for n in counts], dtype=torch.float64)


def _ce(logits, y, counts, tau):
    a = logits.double() + tau * _log_prior(counts)
    return (torch.logsumexp(a, 1) - a[torch.arange(len(y)), y]).mean()


def _bce(logits, y, counts, tau):
    a = logits.double() + tau * _log_prior(counts)
    y = y.double()
    return (y * F.softplus(-a) + (1 - y) * F.softplus(a)).mean()   # -[y log s(a) + (1-y) log(1 - s(a))]


# ----------------------------------------------------------------------------

def test_registry_and_config():
    assert "candle" in models.list_models()
    cfg = CandleConfig()
    assert (cfg.backbone, cfg.image_size, cfg.template, cfg.heads, cfg.dropout, cfg.rho_init, cfg.tau,
            cfg.logit_scale, cfg.visual_scale, cfg.multi_label, cfg.prototype_rows, cfg.num_base,
            cfg.class_counts, cfg.clip_checkpoint) == (
        "ViT-B-16", 224, "a photo of a {}.", 8, 0.1, 0.1, 1.0, 100.0, 1.0, False, True, None, None, None)
    cfg = CandleConfig(class_counts=torch.tensor([4, 0]))   # plain data for checkpoints
    assert cfg.class_counts == [4, 0] and all(type(n) is int for n in cfg.class_counts)
    assert dataclasses.asdict(cfg)["class_counts"] == [4, 0]
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['num_bases'\]"):
        _build(num_bases=3)


@pytest.mark.parametrize("backbone", [RN, VIT])
def test_shapes_and_images_vs_features(backbone):
    model = _build(backbone)
    assert model.num_base == NB and model.num_new == C - NB     # from the counts' positive prefix
    d = model.feature_dim
    assert d == (32 if backbone == RN else 48)
    assert model.text_features.shape == (C, d) and model.virtual_prototypes.shape == (C - NB, d)
    assert not hasattr(model, "pdlr") and not hasattr(model, "clip")   # the text encoder is dropped
    x = _images()
    f = model.encode_images(x)
    assert f.shape == (4, d) and not f.requires_grad
    torch.testing.assert_close(f, model.backbone.visual(x), rtol=0, atol=0)   # open_clip's encode_image
    model.set_base_prototypes(model.encode_images(_images(6, seed=9)), torch.tensor([0, 1, 2, 0, 1, 2]))
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = model(features=f)
        c = model(f)                                 # a 2-D first argument is read as features
    assert a.shape == (4, C) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    assert a.std() > 1e-3                            # not a constant score
    out = model(x, torch.tensor([0, 1, 2, 0]))
    assert isinstance(out, models.ModelOutput) and set(out.aux) == {"l0", "vt", "vv"}
    assert out.logits.shape == (4, C) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, a)


@pytest.mark.parametrize("rows", [True, False])
def test_loss_equals_three_cla_terms_single_label(rows):
    model = _build(tau=0.7, prototype_rows=rows).eval()     # eval: no attention dropout, one draw
    _ready(model)
    f = _feats(model, 4)
    y = torch.tensor([0, 0, 1, 2])
    out = model(f, y)
    lg = model.compute_logits(f, with_prototypes=rows)
    R = 4 + C if rows else 4
    assert all(t.shape == (R, C) for t in lg)
    yy = torch.cat([y, torch.arange(C)]) if rows else y     # prototype c is a sample of class c
    want = {k: _ce(t, yy, COUNTS, 0.7) for k, t in zip(("l0", "vt", "vv"), lg)}
    for k in want:
        torch.testing.assert_close(out.aux[k].double(), want[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), sum(want.values()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, (lg.vt + lg.vv)[:4])
    # tau matters (the test can tell the prior apart from plain cross-entropy)
    assert abs(float(_ce(lg.l0.detach(), yy, COUNTS, 0.0)) - float(want["l0"].detach())) > 1e-3


def test_loss_equals_three_cla_terms_multi_label():
    model = _build(multi_label=True).eval()
    _ready(model)
    f = _feats(model, 4)
    y = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    out = model(f, y)
    lg = model.compute_logits(f, with_prototypes=True)
    yy = torch.cat([y, torch.eye(C)])
    want = {k: _bce(t, yy, COUNTS, 1.0) for k, t in zip(("l0", "vt", "vv"), lg)}
    for k in want:
        torch.testing.assert_close(out.aux[k].double(), want[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.loss.double(), sum(want.values()), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("multi_label", [False, True])
def test_gradient_reaches_exactly_the_trainable_parameters(multi_label):
    model = _build(multi_label=multi_label)
    _ready(model)
    assert model.training
    base = model.base_prototypes.clone()
    y = torch.tensor([0, 1, 2, 1]) if not multi_label else torch.tensor(
        [[1, 0, 1, 0, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0]])
    model(_images(), y).loss.backward()               # the images path: through the frozen encoder
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert trainable == TRAINABLE
    assert got == TRAINABLE, (sorted(TRAINABLE - got), sorted(got - TRAINABLE))
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("backbone."))
    buffers = dict(model.named_buffers())
    for name in ("base_prototypes", "text_features", "logit_scale", "prototype_counts"):
        assert name in buffers and not buffers[name].requires_grad
    assert model.backbone.visual.training is False    # frozen encoder stays in eval mode
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    torch.testing.assert_close(model.base_prototypes, base, rtol=0, atol=0)


def test_identity_projections_give_clip_zero_shot_l0():
    model = _build()
    _ready(model)
    torch.testing.assert_close(model.proj_image, torch.eye(32), rtol=0, atol=0)
    torch.testing.assert_close(model.proj_text, torch.eye(32), rtol=0, atol=0)
    torch.testing.assert_close(model.virtual_prototypes, model.text_features[NB:], rtol=0, atol=0)
    f = _feats(model, 4)
    t = model.text_features
    lit = torch.stack([torch.stack([100.0 * torch.dot(v, w) / (v.norm() * w.norm()) for w in t]) for v in f])
    lg = model.compute_logits(f, with_prototypes=True)
    torch.testing.assert_close(lg.l0[:4], lit, rtol=1e-5, atol=1e-4)
    P = torch.cat([model.base_prototypes, model.virtual_prototypes])
    torch.testing.assert_close(lg.l0[4:], 100.0 * F.normalize(P, dim=1) @ F.normalize(t, dim=1).t(),
                               rtol=1e-5, atol=1e-4)
    with torch.no_grad():
        model.proj_image.add_(0.3 * torch.randn(32, 32))
    assert not torch.allclose(model.compute_logits(f).l0, lit, atol=1e-2)


def test_head_recomputed_literally():
    """The authors' Fusion: Z = LN(X) + rho MHA(LN(X)) over X = [v W_I; P W_I; t W_T]; vt = s cos(v', t'),
    vv = s k cos(v', p'). With rho = 0 the attention drops out and LN is checked by hand; with rho != 0,
    random W_I / W_T and k = 0.5 the whole head against a re-composition here."""
    model = _build(visual_scale=0.5).eval()
    _ready(model)
    f = _feats(model, 3)
    P = torch.cat([model.base_prototypes, model.virtual_prototypes]).detach()
    t = model.text_features

    def ln(x):
        return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)

    def cos(a, b):
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()

    with torch.no_grad():
        model.fusion.rho.zero_()
        lg = model.compute_logits(f)
        torch.testing.assert_close(lg.vt, 100 * cos(ln(f), ln(t)), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lg.vv, 50 * cos(ln(f), ln(P)), rtol=1e-5, atol=1e-4)
        model.fusion.rho.fill_(0.7)
        model.proj_image.add_(0.2 * torch.randn(32, 32))
        model.proj_text.add_(0.2 * torch.randn(32, 32))
        lg = model.compute_logits(f, with_prototypes=True)
        X = torch.cat([f @ model.proj_image, P @ model.proj_image, t @ model.proj_text])
        Y = model.fusion.norm(X)
        A = model.fusion.attn(Y[None], Y[None], Y[None])[0][0]
        Z = Y + 0.7 * A
        v2, p2, t2 = Z[:3], Z[3:3 + C], Z[3 + C:]
        rows = torch.cat([v2, p2])
        torch.testing.assert_close(lg.l0, 100 * cos(X[:3 + C], X[3 + C:]), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lg.vt, 100 * cos(rows, t2), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lg.vv, 50 * cos(rows, p2), rtol=1e-5, atol=1e-4)


def test_encoders_match_open_clip(tmp_path):
    """Text features are open_clip's encode_text of the template prompts ('_' read as a space), image
    features its encode_image; logit_scale=None takes the CLIP model's exp(logit_scale)."""
    torch.manual_seed(5)
    clip = open_clip.create_model(RN, pretrained=None).eval()
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = models.create_model("candle", NAMES, backbone=RN, image_size=S, pretrained=str(path),
                                class_counts=COUNTS, logit_scale=None, template="a blurry photo of a {}.")
    tok = open_clip.get_tokenizer(RN)
    with torch.no_grad():
        t = clip.encode_text(tok([f"a blurry photo of a {n.replace('_', ' ')}." for n in NAMES]))
        x = _images(2)
        torch.testing.assert_close(model.encode_images(x), clip.encode_image(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.text_features, t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.logit_scale, clip.logit_scale.exp().detach())
    assert abs(float(model.logit_scale) - 1 / 0.07) < 1e-3


def test_base_prototypes_are_class_means():
    model = _build()
    f = _feats(model, 4)
    with pytest.raises(RuntimeError, match="base prototypes are not set"):
        model(f)
    assert not model.prototypes_ready
    feats = _feats(model, 9, seed=7)
    labels = torch.tensor([2, 0, 0, 1, 0, 2, 1, 0, 0])
    got = model.set_base_prototypes(feats, labels)
    want = torch.stack([feats[[i for i in range(9) if int(labels[i]) == c]].mean(0) for c in range(NB)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert model.prototype_counts.tolist() == [5, 2, 2] and model.prototypes_ready
    model(f)   # usable now
    # multi-hot labels (an image counts toward each of its classes), (N, C) or (N, num_base)
    mh = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1]])
    feats4 = feats[:4]
    want = torch.stack([feats4[mh[:, c] == 1].mean(0) for c in range(NB)])
    torch.testing.assert_close(model.set_base_prototypes(feats4, mh), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model.set_base_prototypes(feats4, torch.cat([mh, torch.zeros(4, 2, dtype=mh.dtype)], 1)),
                               want, rtol=1e-6, atol=1e-6)
    # from images: the same as from their features
    x = _images(3)
    model.set_base_prototypes(x, torch.tensor([0, 1, 2]))
    torch.testing.assert_close(model.base_prototypes, model.encode_images(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"labels include new class 3 \('person'\)"):
        model.set_base_prototypes(feats[:3], torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match=r"base class 2 \('traffic light'\) has no image"):
        model.set_base_prototypes(feats[:3], torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        model.set_base_prototypes(feats[:3], torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer class indices"):
        model.set_base_prototypes(feats[:3], torch.tensor([0.0, 1.0, 2.0]))


def test_subset_scores_are_columns_of_the_full_score():
    model = _build().eval()
    _ready(model)
    f = _feats(model, 5)
    with torch.no_grad():
        full = model(f)
        lg = model.compute_logits(f)
        base = model.predict(features=f, subset="base")
        new = model.predict(f, subset="new")
        alls = model.predict(features=f)
    assert base.shape == (5, NB) and new.shape == (5, C - NB) and alls.shape == (5, C)
    torch.testing.assert_close(full, lg.vt + lg.vv, rtol=0, atol=0)
    torch.testing.assert_close(base, full[:, :NB], rtol=0, atol=0)
    torch.testing.assert_close(new, full[:, NB:], rtol=0, atol=0)
    torch.testing.assert_close(alls, full, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"subset must be one of \('all', 'base', 'new'\), got 'novel'"):
        model.predict(features=f, subset="novel")
    closed = _build(class_counts=[2, 2, 1, 1, 1])     # every class is base: no new classes
    assert closed.num_base == C and closed.virtual_prototypes.shape == (0, 32)
    with pytest.raises(ValueError, match="no new classes"):
        closed.predict(features=f, subset="new")


def test_checkpoint_round_trip(tmp_path):
    model = _build(seed=3, multi_label=True, num_base=NB, visual_scale=0.5)
    _ready(model)
    with torch.no_grad():   # move off the init so that a fresh build cannot pass by chance
        model.virtual_prototypes.add_(0.5)
        model.proj_image.add_(0.1 * torch.randn(32, 32))
        model.fusion.rho.fill_(0.4)
    model.eval()
    f = _feats(model, 4)
    with torch.no_grad():
        want = model(f)
    path = tmp_path / "candle.pt"
    models.save_checkpoint(model, path, epoch=3)
    saved = models.load_checkpoint(path)
    assert saved["config"]["class_counts"] == COUNTS and saved["epoch"] == 3
    loaded = models.create_model("candle", NAMES, pretrained=str(path)).eval()
    assert loaded.config == model.config and loaded.prototypes_ready
    with torch.no_grad():
        torch.testing.assert_close(loaded(f), want, rtol=0, atol=0)
    fresh = _build(seed=4, multi_label=True, num_base=NB, visual_scale=0.5).eval()
    assert not fresh.prototypes_ready
    fresh.load_state_dict(model.state_dict())          # the buffers carry the prototypes and their counts
    assert fresh.prototypes_ready
    with torch.no_grad():
        torch.testing.assert_close(fresh(f), want, rtol=0, atol=0)


def test_torch_compile_features_path():
    model = _build().eval()
    _ready(model)
    f = _feats(model, 4)
    with torch.no_grad():
        want = model(features=f)
        got = torch.compile(model)(features=f)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_extreme_logits_stay_finite():
    """Features along +-t_c give cosines of exactly +-1: logits of +-s = +-100 (the fp32 CLA must not
    overflow); a zero feature gives cosine 0, not NaN."""
    model = _build()
    _ready(model)
    t = model.text_features
    f = torch.stack([t[0], -t[1], t[3], torch.zeros_like(t[0])])
    with torch.no_grad():
        lg = model.compute_logits(f, with_prototypes=True)
    assert float(lg.l0.max()) == pytest.approx(100.0, abs=1e-3)
    assert float(lg.l0.min()) == pytest.approx(-100.0, abs=1e-3)
    assert all(bool(torch.isfinite(x).all()) and float(x.abs().max()) <= 100.0 + 1e-3 for x in lg)
    for multi, y in ((False, torch.tensor([1, 0, 2, 0])),
                     (True, torch.tensor([[0, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 0, 0]]))):
        model = _build(multi_label=multi)
        _ready(model)
        out = model(f, y)
        assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.aux.values())
        out.loss.backward()
        assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def test_trains_on_a_small_problem():
    """Features = a class direction + noise (base classes only, long-tailed counts); 30 Adam steps on
    the head cut the training loss by more than a third."""
    model = _build()
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(NB, 32, generator=g)
    y = torch.tensor([c for c in range(NB) for _ in range(COUNTS[c])])
    x = centers[y] + 0.8 * torch.randn(len(y), 32, generator=g)
    model.set_base_prototypes(x, y)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.66 * losses[0], losses


@pytest.mark.parametrize("cfg,exc,match", [
    (dict(class_counts=[1, 2, 3]), ValueError, r"class_counts must have one count per class: 5 .*got 3"),
    (dict(class_counts=[1, -2, 3, 0, 0]), ValueError, "class_counts must be >= 0; class 1 has -2"),
    (dict(class_counts=[1, 2.5, 3, 0, 0]), ValueError, r"class_counts\[1\] must be an integer count"),
    (dict(class_counts="12300"), TypeError, "class_counts must be a sequence of ints"),
    (dict(class_counts=[0, 2, 3, 0, 0]), ValueError, "class 0 has no training images"),
    (dict(class_counts=[1, 0, 3, 0, 0]), ValueError, r"base classes \(count > 0\) must come first"),
    (dict(num_base=0), ValueError, r"num_base must be in \[1, 5\]"),
    (dict(num_base=6), ValueError, r"num_base must be in \[1, 5\]"),
    (dict(num_base=2.0), TypeError, "num_base must be an int"),
    (dict(num_base=4), ValueError, r"base class 3 \('person'\) has no training images"),
    (dict(num_base=2), ValueError, r"new class 2 \('traffic light'\) has 1 training images"),
    (dict(heads=5), ValueError, "heads must divide the feature width d = 32"),
    (dict(template="a photo"), ValueError, "template must contain exactly one"),
    (dict(dropout=1.0), ValueError, "dropout must be < 1"),
    (dict(logit_scale=0.0), ValueError, "logit_scale must be > 0"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
    (dict(visual_scale=-1.0), ValueError, "visual_scale must be > 0"),
    (dict(tau=-1.0), ValueError, "tau must be >= 0"),
    (dict(multi_label=1), TypeError, "multi_label must be a bool"),
])
def test_bad_config(cfg, exc, match):
    with pytest.raises(exc, match=match):
        _build(**cfg)


def test_bad_inputs():
    model = _build()
    _ready(model)
    f = _feats(model, 2)
    with pytest.raises(ValueError, match=r"targets must have shape \(B,\) = \(2,\)"):
        model(f, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \(B,\) = \(2,\)"):
        model(f, torch.zeros(2, C, dtype=torch.long))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        model(f, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 5\), got 5"):
        model(f, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="targets must be a"):
        model(f, [0, 1])
    ml = _build(multi_label=True)
    _ready(ml)
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(2, 5\), got \(2,\)"):
        ml(f, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must hold only 0 and 1"):
        ml(f, 2 * torch.ones(2, C))
    with pytest.raises(ValueError, match=r"features must have shape \(B, 32\)"):
        model(features=torch.randn(2, 31))
    with pytest.raises(ValueError, match="not both"):
        model(_images(2), features=f)
    with pytest.raises(ValueError, match="give images"):
        model()
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 64, 64\)"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="the loss needs class_counts"):
        nolabels = _build(class_counts=None)
        assert nolabels.num_base == C
        _ready(nolabels)
        nolabels(f, torch.tensor([0, 1]))
