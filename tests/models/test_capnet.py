"""Tests of CAPNET (vlssm.models.capnet) on tiny open_clip configs (tests/models/conftest.py), random weights.

Checked: registration and config defaults; output shapes and types for a ModifiedResNet and a ViT; a finite
loss equal to the distribution-balanced focal loss recomputed here from the logits (preset and overrides);
the gradient reaches exactly the adapters, the soft context, the GCN and the logit scale; zero-initialised
adapters leave open_clip's image feature unchanged (and perturbed ones change it); the label graph against a
literal NumPy re-implementation of ML-GCN's gen_A / gen_adj; the hard prompts of the graph against open_clip's
encode_text; checkpoint round trip through ``create_model(pretrained=...)``; ``torch.compile`` of the eval
forward; the eval-mode label cache (no text-encoder or GCN call on the second forward, invalidated by weight
changes); that CAPNET trains on a small learnable problem; bad inputs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")

import vlssm.models.capnet as capnet  # noqa: E402  (registers "capnet")
from vlssm import models  # noqa: E402
from vlssm.losses import DistributionBalancedFocalLoss  # noqa: E402
from vlssm.testing.models import batch, create, trainable  # noqa: E402

RN = "vlssm-test-tiny-RN"
VIT = "vlssm-test-tiny-ViT"
NAMES = ["cat", "dining_table", "traffic light", "person", "hair drier"]
FREQ = [40, 12, 5, 90, 1]
N_TRAIN = 120
S = 64


def _build(backbone=RN, classnames=NAMES, seed=0, adapters=False, **cfg):
    """A model with random weights; open_clip's zero-initialised bn3 weights (each ResNet residual
    branch starts as zero, hiding its gradients) drawn around 1 instead; with ``adapters`` the
    zero-initialised adapter up-projections drawn too (else no gradient reaches the down-projections)."""
    cfg.setdefault("class_freq", FREQ[:len(classnames)])
    cfg.setdefault("train_num", N_TRAIN)
    model = create("capnet", classnames, backbone, S, seed, **cfg)
    if adapters:
        with torch.no_grad():
            _perturb_adapters(model)
    return model


def _perturb_adapters(model, std=0.3):
    with torch.no_grad():
        for a in model.adapters():
            a.up.weight.normal_(0.0, std)
            a.up.bias.normal_(0.0, std)


def _batch(B=2, C=len(NAMES), seed=1, dtype=torch.float32):
    return batch(B, C, S, seed, dtype)


_trainable = trainable


def _adapter_names(model):
    return {n for n, _ in model.named_parameters() if ".adapter." in n}


def test_registered_with_documented_defaults():
    assert "capnet" in models.list_models()
    cfg = capnet.CAPNetConfig()
    assert (cfg.backbone, cfg.image_size, cfg.clip_checkpoint) == ("RN50", 224, None)
    assert (cfg.n_ctx, cfg.ctx_init, cfg.graph_template) == (4, "a photo of a", "a photo of a {}.")
    assert (cfg.graph_tau, cfg.graph_p, cfg.gcn_layers, cfg.gcn_negative_slope) == (0.4, 0.25, 3, 0.2)
    assert (cfg.adapter_bottleneck, cfg.adapter_scale, cfg.adapter_dropout) == (64, 0.1, 0.1)
    assert cfg.learn_logit_scale and abs(cfg.logit_scale_init - np.log(1 / 0.07)) < 1e-12
    assert (cfg.class_freq, cfg.train_num, cfg.db_preset) == (None, None, "coco-lt")
    # plain data: tensors / arrays / numpy scalars become tuples of ints
    cfg = capnet.CAPNetConfig(class_freq=torch.tensor(FREQ), train_num=np.int64(N_TRAIN))
    assert cfg.class_freq == tuple(FREQ) and type(cfg.class_freq[0]) is int and type(cfg.train_num) is int
    assert capnet.CAPNetConfig(**dataclasses.asdict(cfg)) == cfg


@pytest.mark.parametrize("backbone,d", [(RN, 32), (VIT, 48)])
def test_shapes_and_loss(backbone, d):
    model = _build(backbone, adapters=True)
    images, targets = _batch()
    model.eval()  # deterministic (adapter dropout off) for the logits-only call
    with torch.no_grad():
        logits = model(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, len(NAMES)) and logits.dtype == torch.float32
    assert model.label_features().shape == (len(NAMES), d) and model.adjacency.shape == (len(NAMES),) * 2
    out = model(images, targets)
    assert isinstance(out, models.ModelOutput) and set(out.aux) == {"cls"}
    assert out.loss.dim() == 0 and torch.isfinite(out.loss) and out.loss.requires_grad
    torch.testing.assert_close(out.logits, logits)
    want = DistributionBalancedFocalLoss.from_preset("coco-lt", FREQ, N_TRAIN)(out.logits, targets)
    torch.testing.assert_close(out.loss, want, rtol=0, atol=0)
    torch.testing.assert_close(out.aux["cls"], want)
    # the cosine head: |logit| <= s = exp(logit_scale)
    assert float(logits.abs().max()) <= float(model.logit_scale.detach().exp()) * (1 + 1e-6)
    model.train()
    out = model(images, targets)  # training mode: the loss matches its own logits too
    torch.testing.assert_close(out.loss, DistributionBalancedFocalLoss.from_preset("coco-lt", FREQ, N_TRAIN)(
        out.logits, targets), rtol=0, atol=0)


def test_loss_preset_and_overrides_reach_the_loss():
    model = _build(db_preset="voc-lt", db_gamma=1.0, db_balance_param=1.5).eval()
    images, targets = _batch()
    with torch.no_grad():
        out = model(images, targets)
    want = DistributionBalancedFocalLoss.from_preset("voc-lt", FREQ, N_TRAIN, gamma=1.0, balance_param=1.5)
    torch.testing.assert_close(out.loss, want(out.logits, targets), rtol=0, atol=0)
    default = DistributionBalancedFocalLoss.from_preset("coco-lt", FREQ, N_TRAIN)(out.logits, targets)
    assert abs(float(out.loss) - float(default)) > 1e-3  # the overrides matter
    assert (model.loss_fn.mu, model.loss_fn.neg_scale, model.loss_fn.gamma) == (0.3, 5.0, 1.0)


@pytest.mark.parametrize("backbone", [RN, VIT])
def test_gradient_reaches_exactly_the_trainable_parameters(backbone):
    model = _build(backbone, adapters=True)
    model(*_batch()).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    blocks = ([f"backbone.visual.layer{i}.0" for i in (1, 2, 3, 4)] if backbone == RN
              else [f"backbone.visual.transformer.resblocks.{i}" for i in (0, 1)])
    adapters = {f"{b}.adapter.{m}.{w}" for b in blocks for m in ("down", "up") for w in ("weight", "bias")}
    assert _adapter_names(model) == adapters  # one adapter per residual block, nothing else in the tower
    expected = adapters | {"pdlr.ctx", "logit_scale"} | {f"gcn.layers.{i}.weight" for i in range(3)}
    assert _trainable(model) == expected
    assert got == expected, (sorted(expected - got)[:5], sorted(got - expected)[:5])
    # nothing of the encoders but the adapters: no backbone weight, no text encoder
    assert not any(n.startswith("pdlr.text_encoder.") for n in _trainable(model))
    assert not any(n.startswith("backbone.") and ".adapter." not in n for n in _trainable(model))


def test_frozen_encoders_stay_in_eval_mode_and_adapters_follow():
    model = _build(VIT)
    model.train()
    assert not model.backbone.visual.training and not model.pdlr.text_encoder.training
    assert all(a.training for a in model.adapters()) and len(model.adapters()) == 2
    model.eval()
    assert not any(a.training for a in model.adapters())


@pytest.mark.parametrize("backbone", [RN, VIT])
def test_zero_initialised_adapters_leave_the_image_feature_unchanged(backbone):
    model = _build(backbone).eval()
    plain = models.build_clip(backbone, S)
    # the tower's own parameters keep open_clip's names: a strict load of all but the adapters
    plain.visual.load_state_dict({k: v for k, v in model.backbone.visual.state_dict().items() if ".adapter." not in k})
    images, _ = _batch()
    with torch.no_grad():
        want = plain.encode_image(images)
        torch.testing.assert_close(model.backbone(images).pooled, want, rtol=0, atol=0)
        _perturb_adapters(model)
        changed = model.backbone(images).pooled
    assert (changed - want).abs().max() > 1e-3  # the adapters are in the forward path


def test_adapted_blocks_follow_adaptformer():
    """Each adapted block against its formula, written out: ViT (AdaptFormer's parallel Block.forward)
    x' = x + attn(ln_1 x); out = x' + mlp(ln_2 x') + 0.1 up(relu(down x')); ResNet Bottleneck
    out = relu(bn3(conv3(...)) + shortcut(x) + 0.1 up(relu(down(avgpool_stride x))))."""
    F = torch.nn.functional
    vit = _build(VIT, adapters=True).eval()
    blk = vit.backbone.visual.transformer.resblocks[1]
    a = blk.adapter
    x = torch.randn(2, 17, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = blk.ln_1(x)
        x1 = x + blk.attn(h, h, h, need_weights=False)[0]
        want = x1 + blk.mlp(blk.ln_2(x1)) + 0.1 * F.linear(F.relu(F.linear(x1, a.down.weight, a.down.bias)),
                                                          a.up.weight, a.up.bias)
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-6)
    rn = _build(RN, adapters=True).eval()
    blk = rn.backbone.visual.layer2[0]  # stride 2, with a downsampling shortcut: 64 -> 128 channels
    a = blk.adapter
    assert blk.stride == 2 and blk.downsample is not None and a.down.in_channels == 64 and a.up.out_channels == 128
    x = torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(3)).relu()
    with torch.no_grad():
        out = blk.bn3(blk.conv3(blk.avgpool(blk.act2(blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(x)))))))))
        side = 0.1 * F.conv2d(F.relu(F.conv2d(F.avg_pool2d(x, 2), a.down.weight, a.down.bias)), a.up.weight, a.up.bias)
        want = F.relu(out + blk.downsample(x) + side)
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-6)
    assert side.abs().max() > 1e-3  # the perturbed adapter contributes


def test_label_features_and_logits_formula():
    """f_hat = F_t + A lrelu(A lrelu(A F_t W1) W2) W3 and logits = exp(logit_scale) cos(pooled, f_hat)."""
    F = torch.nn.functional
    model = _build(graph_tau=0.9, adapters=True).eval()
    with torch.no_grad():
        model.logit_scale.add_(0.3)
        images, _ = _batch()
        t = model.pdlr.soft()
        A = model.adjacency
        W1, W2, W3 = (layer.weight for layer in model.gcn.layers)
        f_hat = t + A @ F.leaky_relu(A @ F.leaky_relu(A @ t @ W1, 0.2) @ W2, 0.2) @ W3
        torch.testing.assert_close(model.label_features(), f_hat, rtol=1e-5, atol=1e-6)
        assert (model.label_features() - t).abs().max() > 1e-3  # the GCN residual is not zero
        v = model.backbone(images).pooled
        want = model.logit_scale.exp() * F.normalize(v, dim=-1) @ F.normalize(f_hat, dim=-1).t()
        torch.testing.assert_close(model(images), want, rtol=1e-5, atol=1e-5)


def _ml_gcn_adjacency(emb, t, p):
    """ML-GCN util.py gen_A + gen_adj, literally, on cosine similarities of label embeddings (float64)
    (ML-GCN's two in-place assignments binarise at t for t > 0 only: at t <= 0 the second also turns the
    zeroed entries into 1; vlssm's label_graph binarises S >= t for any t.)"""
    num_classes = emb.shape[0]
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    _adj = e @ e.T
    _adj = (_adj + _adj.T) / 2
    _adj[_adj < t] = 0
    _adj[_adj >= t] = 1
    np.fill_diagonal(_adj, 0)  # a label's similarity with itself is no co-occurrence
    _adj = _adj * p / (_adj.sum(0, keepdims=True) + 1e-6)
    _adj = _adj + np.identity(num_classes)
    D = np.power(_adj.sum(1), -0.5)
    D = np.diag(D)
    return np.matmul(np.matmul(_adj, D).T, D), e @ e.T


@pytest.mark.parametrize("tau,p", [(0.4, 0.25), (0.05, 0.25), (0.1, 0.5), (0.99, 0.25)])
def test_label_graph_matches_ml_gcn(tau, p):
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(7, 16, generator=g, dtype=torch.float64)
    emb[1] = emb[0] + 0.3 * emb[1]  # a few strongly similar pairs: unequal degrees
    emb[2] = emb[0] + 0.5 * emb[2]
    want, _ = _ml_gcn_adjacency(emb.numpy(), tau, p)
    got = capnet.label_graph(emb, tau, p)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-12, atol=1e-14)
    if tau in (0.05, 0.1):  # unequal degrees: the literal transpose order matters (A is column-normalised)
        assert not np.allclose(want, want.T)
    if tau == 0.99:  # no edges: the identity
        torch.testing.assert_close(got, torch.eye(7, dtype=torch.float64))


def test_model_graph_from_the_hard_prompt_embeddings():
    model = _build()
    emb = model.pdlr.t_hard.double().numpy()
    want, sim = _ml_gcn_adjacency(emb, 0.4, 0.25)
    torch.testing.assert_close(model.adjacency, torch.from_numpy(want).float(), rtol=1e-6, atol=1e-7)
    assert model.adjacency.dtype == torch.float32 and "adjacency" in model.state_dict()
    # a threshold between two off-diagonal similarities: a graph with edges and non-edges
    off = np.unique(np.round(sim[~np.eye(len(NAMES), dtype=bool)], 6))
    tau = float(off[len(off) // 2 - 1] + off[len(off) // 2]) / 2
    model = _build(graph_tau=tau, graph_p=0.3)
    want, _ = _ml_gcn_adjacency(model.pdlr.t_hard.double().numpy(), tau, 0.3)
    torch.testing.assert_close(model.adjacency, torch.from_numpy(want).float(), rtol=1e-6, atol=1e-7)
    binary = (model.adjacency > 0) & ~torch.eye(len(NAMES), dtype=torch.bool)
    assert 0 < int(binary.sum()) < len(NAMES) * (len(NAMES) - 1)


def test_open_clip_checkpoint_loads_into_both_encoders_and_the_graph(tmp_path):
    torch.manual_seed(5)
    clip = open_clip.create_model(RN, pretrained=None)
    path = tmp_path / "clip.pt"
    torch.save(clip.state_dict(), path)
    model = models.create_model("capnet", NAMES, backbone=RN, image_size=S, pretrained=str(path))
    assert model.config.clip_checkpoint == str(path) and model.loss_fn is None
    sd = clip.state_dict()
    torch.testing.assert_close(model.backbone.visual.conv1.weight, sd["visual.conv1.weight"], rtol=0, atol=0)
    tok = open_clip.get_tokenizer(RN)
    with torch.no_grad():  # the graph's hard prompts: "a photo of a {}." through this checkpoint's text encoder
        want = clip.encode_text(tok([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    torch.testing.assert_close(model.pdlr.t_hard, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.adjacency, capnet.label_graph(want, 0.4, 0.25).float(), rtol=1e-5, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    model = _build(VIT, seed=3, adapters=True, graph_tau=0.9)
    with torch.no_grad():  # move off the init so a fresh build cannot pass by chance
        model.pdlr.ctx.add_(0.3)
        model.logit_scale.add_(0.5)
        for p in model.gcn.parameters():
            p.mul_(1.5)
    model.eval()
    images, targets = _batch()
    with torch.no_grad():
        want = model(images, targets)
    path = tmp_path / "capnet.pt"
    models.save_checkpoint(model, path, epoch=2)
    loaded = models.create_model("capnet", NAMES, pretrained=str(path)).eval()
    assert loaded.config == model.config and loaded.config.class_freq == tuple(FREQ)
    with torch.no_grad():
        got = loaded(images, targets)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(loaded.adjacency, model.adjacency, rtol=0, atol=0)
    assert models.load_checkpoint(path)["epoch"] == 2
    with pytest.raises(ValueError, match="has 5 classes, classnames has 4"):
        models.create_model("capnet", NAMES[:4], pretrained=str(path))


def test_torch_compile_forward():
    """Dynamo capture of the eval forward (graph breaks at the label caches, which run in Python) through
    AOTAutograd; the ``aot_eager`` backend keeps this test fast. The default inductor backend gives the
    same logits (to ~1e-6) but takes about a minute to compile cold on a busy two-core machine."""
    model = _build(adapters=True).eval()
    images, _ = _batch()
    with torch.no_grad():
        want = model(images)
        compiled = torch.compile(model, backend="aot_eager")
        got = compiled(images)
        again = compiled(images)  # a second call, with the label features cached
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_eval_caches_label_features_and_skips_the_text_encoder():
    model = _build().eval()
    text, gcn = [], []
    model.pdlr.text_encoder.register_forward_hook(lambda *_: text.append(1))
    model.gcn.register_forward_hook(lambda *_: gcn.append(1))
    images, _ = _batch()
    with torch.no_grad():
        first = model(images)
        n = (len(text), len(gcn))
        second = model(images)
        assert n == (1, 1) and (len(text), len(gcn)) == (1, 1)  # the second forward ran neither
        torch.testing.assert_close(second, first, rtol=0, atol=0)
        model.gcn.layers[2].weight.mul_(-2.0)  # a GCN weight changed in place: the GCN runs again
        third = model(images)
        assert (len(text), len(gcn)) == (1, 2) and (third - first).abs().max() > 1e-4
        model.pdlr.ctx.add_(0.5)  # the context changed: the text encoder runs again
        model(images)
        assert (len(text), len(gcn)) == (2, 3)
    model(images)  # eval with autograd on: nothing cached (gradients may be wanted)
    assert (len(text), len(gcn)) == (3, 4)
    model.train()
    model(images)
    model(images)
    assert (len(text), len(gcn)) == (5, 6)  # training runs both once per step


def test_capnet_trains_on_a_small_learnable_problem(learnable):
    """30 AdamW steps on 32 images (tests/models/conftest.py; every class occurs) must cut the training
    loss and rank the held-out labels well above chance."""
    problem = learnable.problem(len(NAMES), S, every_class=True)
    freq = [int(v) for v in problem[1].sum(0)]
    model = _build(seed=0, class_freq=freq, train_num=len(problem[1]))
    first, last, m, chance = learnable.fit(model, problem, steps=30, lr=3e-3)
    assert last < 0.6 * first, (first, last)
    assert m > chance + 0.2, (m, chance)


def test_bad_inputs():
    images, targets = _batch()
    with pytest.raises(ValueError, match="class_freq has 4 entries, classnames has 5"):
        _build(class_freq=FREQ[:4])
    with pytest.raises(ValueError, match=r"class_freq must be > 0 .*class 2 has 0"):
        _build(class_freq=[40, 12, 0, 90, 1])
    with pytest.raises(ValueError, match="class_freq must hold integer counts"):
        _build(class_freq=[40, 12, 2.5, 90, 1])
    with pytest.raises(ValueError, match="train_num must be > every class frequency"):
        _build(train_num=90)
    with pytest.raises(ValueError, match="class_freq was given without train_num"):
        models.create_model("capnet", NAMES, backbone=RN, image_size=S, class_freq=FREQ)
    with pytest.raises(ValueError, match="train_num was given without class_freq"):
        models.create_model("capnet", NAMES, backbone=RN, image_size=S, train_num=N_TRAIN)
    with pytest.raises(TypeError, match="train_num must be an int"):
        _build(train_num=120.0)
    with pytest.raises(TypeError, match=r"unknown config field\(s\) \['class_frequency'\]"):
        models.create_model("capnet", NAMES, backbone=RN, image_size=S, class_frequency=FREQ)
    # built without the training statistics: inference works, the loss names what it needs
    model = models.create_model("capnet", NAMES, backbone=RN, image_size=S)
    assert model(images).shape == (2, len(NAMES))
    with pytest.raises(ValueError, match="class_freq .* and train_num"):
        model(images, targets)
    model = _build()
    with pytest.raises(ValueError, match=r"targets must have shape \(B, C\) = \(2, 5\), got \(2, 4\)"):
        model(images, targets[:, :4])
    with pytest.raises(ValueError, match="targets must hold only 0 and 1"):
        model(images, targets * 2)
    with pytest.raises(ValueError, match="images"):
        model(images[:, :, :32])
    with pytest.raises(ValueError, match="graph_tau"):
        _build(graph_tau=1.5)
