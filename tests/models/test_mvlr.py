"""Tests of vlssm.models: the registry and factory, MVLR and its Baseline on tiny open_clip configs
(tests/models/conftest.py), random weights.

Checked: output shapes and types; a finite loss equal to its terms (ASL + 4 KCR) recomputed here; the
gradient reaches exactly the parameters that should train; ``backend="reference", fused=False`` (plain
PyTorch, the literal composition) equals the default backend in float64, forward and gradients;
checkpoint round trip through ``create_model(pretrained=...)`` and its refusals; ``torch.compile`` of
the forward; the eval-mode label cache (no text-encoder call, same logits); that MVLR trains on a
small learnable problem; bad inputs.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vlssm import models  # noqa: E402
from vlssm.losses import AsymmetricLoss  # noqa: E402
from vlssm.testing.models import batch, create, trainable  # noqa: E402

RN = "vlssm-test-tiny-RN"
VIT = "vlssm-test-tiny-ViT"
NAMES = ["cat", "dining_table", "traffic light", "person", "hair drier"]
S = 64


def _build(name="mvlr", backbone=RN, classnames=NAMES, seed=0, **cfg):
    return create(name, classnames, backbone, S, seed, **cfg)


def _batch(B=2, C=len(NAMES), seed=1, dtype=torch.float32):
    return batch(B, C, S, seed, dtype)


_trainable = trainable


def test_registry():
    assert {"mvlr", "mvlr_baseline"} <= set(models.list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.create_model("nope", NAMES)
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['n_cxt'\]"):
        _build(n_cxt=3)


@pytest.mark.parametrize("backbone", [RN, VIT])
@pytest.mark.parametrize("name", ["mvlr", "mvlr_baseline"])
def test_shapes_and_loss(name, backbone):
    model = _build(name, backbone)
    images, targets = _batch()
    logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, len(NAMES)) and logits.dtype == torch.float32
    out = model(images, targets)
    assert isinstance(out, models.ModelOutput)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, logits)
    asl = AsymmetricLoss(gamma_neg=2, gamma_pos=0, clip=0.05, reduction="mean")(logits, targets)
    torch.testing.assert_close(out.aux["cls"], asl)
    if name == "mvlr":
        assert set(out.aux) == {"cls", "kcr"}
        torch.testing.assert_close(out.loss, asl + 4.0 * out.aux["kcr"])
        assert 0 <= float(out.aux["kcr"]) <= 2
    else:
        assert set(out.aux) == {"cls"}
        torch.testing.assert_close(out.loss, asl)


@pytest.mark.parametrize("freeze", [False, True])
def test_gradient_reaches_exactly_the_trainable_parameters(freeze):
    model = _build(freeze_backbone=freeze)
    assert float(model.ifm_gate.detach()) == 0.0  # the gated skip starts closed: IFM's relation weight gets no gradient
    with torch.no_grad():
        model.ifm_gate.fill_(0.3)  # as after some training: every IFM parameter then gets gradient
    model(*_batch()).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    visual = {n for n, _ in model.named_parameters() if n.startswith("backbone.")}
    expected = {"pdlr.ctx", "logit_scale", "ifm_gate"} | {n for n, _ in model.named_parameters()
                                              if n.startswith(("ifm.", "qmvl."))}
    if not freeze:  # all of the image encoder but the pooled feature's query / key (MVLR reads tokens)
        expected |= {n for n in visual if ".attnpool.q_proj." not in n and ".attnpool.k_proj." not in n}
    assert _trainable(model) == expected
    assert got == expected, (sorted(expected - got)[:5], sorted(got - expected)[:5])
    assert not any(n.startswith("pdlr.text_encoder.") for n in _trainable(model))  # the text encoder never trains


def test_baseline_trains_backbone_and_scale_only():
    model = _build("mvlr_baseline")
    model(*_batch()).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert got == _trainable(model) == {n for n, _ in model.named_parameters()
                                        if n.startswith("backbone.")} | {"logit_scale"}
    assert model.label_embeddings.shape == (len(NAMES), 32) and not hasattr(model, "pdlr")


def test_reference_backend_equals_default_in_float64():
    """The default backend (vlssm's kernels) vs plain PyTorch with the literal four-sequence QMVL,
    same weights, float64: logits, loss and every parameter gradient."""
    fast = _build().double()
    ref = copy.deepcopy(fast)
    ref.ifm.backend = "reference"
    ref.qmvl.backend, ref.qmvl.fused = "reference", False
    images, targets = _batch(dtype=torch.float64)
    outs = []
    for model in (fast, ref):
        out = model(images, targets)
        out.loss.backward()
        outs.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = outs
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-10, atol=1e-12)
    assert ga.keys() == gb.keys() and len(ga) > 20
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-8, atol=1e-10, msg=n)


def test_checkpoint_round_trip(tmp_path):
    model = _build(seed=3)
    with torch.no_grad():  # move off the init so a fresh build cannot pass by chance
        model.pdlr.ctx.add_(0.3)
        model.logit_scale.add_(0.5)
    model.eval()
    images, _ = _batch()
    with torch.no_grad():
        want = model(images)
    path = tmp_path / "mvlr.pt"
    models.save_checkpoint(model, path, epoch=7)
    loaded = models.create_model("mvlr", NAMES, pretrained=str(path)).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), want, rtol=0, atol=0)
    assert models.load_checkpoint(path)["epoch"] == 7
    with pytest.raises(ValueError, match="checkpoint of model 'mvlr', not 'mvlr_baseline'"):
        models.create_model("mvlr_baseline", NAMES, pretrained=str(path))
    with pytest.raises(ValueError, match="has 5 classes, classnames has 4"):
        models.create_model("mvlr", NAMES[:4], pretrained=str(path))
    with pytest.raises(ValueError, match=r"other classnames: \[1\] 'dining_table' != 'table'"):
        models.create_model("mvlr", [NAMES[0], "table", *NAMES[2:]], pretrained=str(path))
    with pytest.raises(ValueError, match="pretrained file not found"):
        models.create_model("mvlr", NAMES, pretrained=str(tmp_path / "missing.pt"))


def test_open_clip_checkpoint_loads_into_both_encoders(tmp_path):
    torch.manual_seed(5)
    clip = open_clip.create_model(RN, pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = models.create_model("mvlr", NAMES, backbone=RN, image_size=S, pretrained=str(path))
    assert model.config.clip_checkpoint == str(path)
    sd = clip.state_dict()
    torch.testing.assert_close(model.backbone.visual.conv1.weight, sd["visual.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.pdlr.text_encoder.token_embedding.weight, sd["token_embedding.weight"],
                               rtol=0, atol=0)


def test_eval_caches_label_embeddings_and_skips_the_text_encoder():
    model = _build().eval()
    calls = []
    model.pdlr.text_encoder.register_forward_hook(lambda *_: calls.append(1))
    images, _ = _batch()
    with torch.no_grad():
        first = model(images)
        n = len(calls)
        second = model(images)
    assert n == 1 and len(calls) == 1  # the second forward ran no text encoder
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    model.train()
    model(images)
    assert len(calls) == 2  # training runs it (once per step)


def test_torch_compile_forward():
    model = _build().eval()
    images, _ = _batch()
    with torch.no_grad():
        want = model(images)
        got = torch.compile(model)(images)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_training_step():
    """The loss with targets compiles as one graph (the targets' value checks, which read the data, are
    skipped while compiling, `vlssm train --compile`); loss and gradients as eager."""
    images, targets = _batch()
    model = _build()
    eager = copy.deepcopy(model)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(images, targets)
    ref = eager(images, targets)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_mvlr_trains_on_a_small_learnable_problem(learnable):
    """40 AdamW steps on 32 images (tests/models/conftest.py) must cut the training loss by more than
    half and rank the held-out labels well above chance."""
    first, last, m, chance = learnable.fit(_build(seed=0), learnable.problem(len(NAMES), S), steps=40, lr=1e-3)
    assert last < 0.5 * first, (first, last)
    assert m > chance + 0.2, (m, chance)  # seen: 0.68 vs 0.41


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(classnames=[]), ValueError, "classnames must not be empty"),
    (dict(classnames="cat"), TypeError, "classnames must be a list or tuple"),
    (dict(classnames=["cat", "dog", "Cat"]), ValueError, r"classnames has a duplicate: \[0\] 'cat' and \[2\] 'Cat'"),
    (dict(classnames=["cat", ""]), ValueError, r"classnames\[1\] is empty"),
    (dict(image_size=60), ValueError, "image_size"),
    (dict(backbone="RN-nope"), ValueError, "RN-nope"),
])
def test_bad_construction(kwargs, exc, match):
    args = dict(classnames=NAMES, backbone=RN, image_size=S)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        models.create_model("mvlr", **args)


def test_bad_targets_and_images():
    model = _build("mvlr_baseline")
    images, targets = _batch()
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(2, 5\), got \(2, 4\)"):
        model(images, targets[:, :4])
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(2, 5\), got \(5,\)"):
        model(images, targets[0])
    with pytest.raises(ValueError, match="targets must hold only 0 and 1"):
        model(images, targets * 2)
    with pytest.raises(TypeError, match="targets must be a"):
        model(images, targets.tolist())
    with pytest.raises(ValueError, match="images"):
        model(images[:, :, :32])


def test_ifm_gate_composition():
    """T = T^soft + tanh(g) T^ifm with the gate; T = T^ifm (Eq. 10) with ifm_gate=False; same weights otherwise."""
    images, targets = _batch()
    gated = _build()
    plain = _build(ifm_gate=False)
    assert plain.ifm_gate is None and "ifm_gate" not in dict(plain.named_parameters())
    state = {k: v for k, v in gated.state_dict().items() if k != "ifm_gate"}
    plain.load_state_dict(state)
    with torch.no_grad():
        gated.ifm_gate.fill_(0.7)
    seen = {}
    for name, m in (("gated", gated), ("plain", plain)):
        m.qmvl.register_forward_pre_hook(lambda mod, args, name=name: seen.__setitem__(name, args[1].detach()))
        m(images)
    x = gated.backbone(images, pooled=False).tokens
    t_hard, t_soft = gated.pdlr()
    t_ifm = gated.ifm(x, t_hard, t_soft).labels
    torch.testing.assert_close(seen["plain"], t_ifm)
    torch.testing.assert_close(seen["gated"], t_soft + math.tanh(0.7) * t_ifm)
