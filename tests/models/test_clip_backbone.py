"""Tests of vlssm.models._clip (CLIPBackbone, build_clip) against open_clip itself.

Tiny open_clip configs registered under test-only names (a ModifiedResNet with
layers [1, 1, 1, 1] and width 16; a ViT with width 64, 2 layers, patch 16; a
1-layer text tower), random weights perturbed so that no path hides behind an
init constant (open_clip zeroes every bn3 weight). Checked:

* shapes of tokens (B, M, d) and pooled (B, d) at the config's size and others;
* ResNet: pooled == open_clip ``encode_image``; tokens == a literal float64
  computation from the ``layer4`` feature map (captured by a hook during
  ``encode_image``): (F + P[1:]) @ Wv^T + bv, then @ Wc^T + bc;
* ViT: pooled == ``encode_image``; tokens == a literal LayerNorm(ln_post) and
  ``@ proj`` of the transformer's patch outputs (hooked the same way);
* positional-embedding interpolation when loading a checkpoint saved at S0
  into a backbone at S1: equal to interpolating by hand (bicubic, antialias,
  as open_clip's resize_pos_embed) and loading that; identity at S1 == S0;
* frozen (no grads, eval mode kept) and trainable (grads reach every visual
  parameter);
* input validation; the real RN50 / RN101 / ViT-B-16 sizes (on the meta
  device, nothing computed); import without open_clip.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")

from vlssm import testing as T  # noqa: E402
from vlssm.models._clip import BackboneOutput, CLIPBackbone, build_clip  # noqa: E402

RN = "vlssm-test-tiny-RN"
VIT = "vlssm-test-tiny-ViT"
TIMM = "vlssm-test-timm-tower"
NATIVE = 64  # image_size of both tiny configs
OUT_DIM = {RN: 32, VIT: 48}
STRIDE = {RN: 32, VIT: 16}
POS_KEY = {RN: "visual.attnpool.positional_embedding", VIT: "visual.positional_embedding"}
RTOL64 = 1e-10


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, scale: float = 0.2) -> torch.nn.Module:
    """Perturb every parameter and BatchNorm statistic of ``model`` (so no gradient path is zero)."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g, dtype=torch.float64))
    return model


def make(name: str, size: int = NATIVE, seed: int = 0, dtype=torch.float32):
    """A tiny open_clip model with random (perturbed) weights, visual tower at ``size``, eval mode."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, force_image_size=size)
    return randomize_(model, seed + 1).to(dtype).eval()


def images(size: int, batch: int = 2, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64).to(dtype)


def capture_input(module: torch.nn.Module, fn):
    """Run ``fn()`` and return (its result, the first positional input ``module`` received)."""
    seen = []
    h = module.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    try:
        out = fn()
    finally:
        h.remove()
    assert len(seen) == 1
    return out, seen[0]


def capture_output(module: torch.nn.Module, fn):
    seen = []
    h = module.register_forward_hook(lambda m, args, out: seen.append(out.detach().clone()))
    try:
        out = fn()
    finally:
        h.remove()
    assert len(seen) == 1
    return out, seen[0]


# --------------------------------------------------------------------------
# Literal dense tokens (plain tensor algebra, float64)

def literal_resnet_tokens(visual, fmap: torch.Tensor, with_pos: bool = True) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, d): value path of the attention pool, row-major positions."""
    fmap = fmap.double()
    B, C, h, w = fmap.shape
    pool = visual.attnpool
    t = torch.stack([fmap[:, :, i, j] for i in range(h) for j in range(w)], dim=1)  # (B, M, C)
    if with_pos:
        t = t + pool.positional_embedding.detach().double()[1:]
    t = t @ pool.v_proj.weight.detach().double().T + pool.v_proj.bias.detach().double()
    return t @ pool.c_proj.weight.detach().double().T + pool.c_proj.bias.detach().double()


def literal_vit_tokens(visual, hidden: torch.Tensor) -> torch.Tensor:
    """(B, 1 + M, width) transformer outputs -> (B, M, d): LayerNorm(ln_post) of the patch tokens, @ proj."""
    x = hidden.double()[:, 1:]
    ln = visual.ln_post
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    x = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight.detach().double() + ln.bias.detach().double()
    return x @ visual.proj.detach().double()


def hand_resize(pos: torch.Tensor, grid: int, mode: str = "bicubic") -> torch.Tensor:
    """open_clip's resize_pos_embed, written out: keep row 0, resize the square grid."""
    C = pos.shape[1]
    g0 = int(round((pos.shape[0] - 1) ** 0.5))
    img = pos[1:].reshape(1, g0, g0, C).permute(0, 3, 1, 2)
    kw = dict(antialias=True) if mode == "bicubic" else {}
    img = F.interpolate(img, size=(grid, grid), mode=mode, align_corners=False, **kw)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid * grid, C)], 0)


# --------------------------------------------------------------------------
# Shapes

@pytest.mark.parametrize("name,size", [(RN, 64), (RN, 128), (VIT, 64), (VIT, 96)])
def test_shapes(name, size):
    bb = CLIPBackbone.from_name(name, image_size=size)
    grid = size // STRIDE[name]
    M, d = grid * grid, OUT_DIM[name]
    assert (bb.image_size, bb.grid_size, bb.num_tokens, bb.out_dim) == (size, grid, M, d)
    assert bb.kind == ("resnet" if name == RN else "vit")
    out = bb(images(size, batch=3, dtype=torch.float32))
    assert isinstance(out, BackboneOutput)
    assert out.tokens.shape == (3, M, d) and out.pooled.shape == (3, d)
    assert out.tokens.dtype == out.pooled.dtype == torch.float32
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()
    pos = bb.visual.attnpool.positional_embedding if name == RN else bb.visual.positional_embedding
    assert pos.shape[0] == 1 + M


def test_real_config_sizes():
    """RN50 / RN101 / ViT-B-16 at 448, from open_clip's own configs, on the meta device (nothing computed)."""
    expected = {"RN50": (1024, 196), "RN101": (512, 196), "ViT-B-16": (512, 784)}
    for name, (d, M) in expected.items():
        with torch.device("meta"):
            model = open_clip.create_model(name, pretrained=None, device="meta")
        bb = CLIPBackbone(model, image_size=448)  # 224 -> 448: the positional embedding is resized
        assert (bb.out_dim, bb.num_tokens, bb.image_size) == (d, M, 448), name
        pos = bb.visual.attnpool.positional_embedding if bb.kind == "resnet" else bb.visual.positional_embedding
        assert pos.shape[0] == 1 + M
        assert bb.mean == tuple(open_clip.OPENAI_DATASET_MEAN) and bb.std == tuple(open_clip.OPENAI_DATASET_STD)


# --------------------------------------------------------------------------
# Agreement with open_clip and with the literal computation

@pytest.mark.parametrize("size", [64, 96])
def test_resnet_tokens_and_pooled(size):
    model = make(RN, size, seed=1, dtype=torch.float64)
    bb = CLIPBackbone(model)
    x = images(size)
    expected_pooled, fmap = capture_input(model.visual.attnpool, lambda: model.encode_image(x))
    out = bb(x)
    assert out.tokens.dtype == torch.float64
    assert T.rel_err(out.pooled, expected_pooled) <= RTOL64
    expected = literal_resnet_tokens(model.visual, fmap)
    assert out.tokens.shape == expected.shape == (2, (size // 32) ** 2, OUT_DIM[RN])
    assert T.rel_err(out.tokens, expected) <= RTOL64
    # the positional embedding matters (so the comparison above can fail), and dense_pos_embed=False drops it
    no_pos = literal_resnet_tokens(model.visual, fmap, with_pos=False)
    assert T.rel_err(no_pos, expected) > 1e-3
    out2 = CLIPBackbone(model, dense_pos_embed=False)(x)
    assert T.rel_err(out2.tokens, no_pos) <= RTOL64
    assert torch.equal(out2.pooled, out.pooled)


def test_resnet_token_order_is_row_major():
    """Token m is feature-map position (m // w, m % w): a single perturbed position moves one token."""
    model = make(RN, 96, seed=2, dtype=torch.float64)
    bb = CLIPBackbone(model)
    fmap = torch.zeros(1, model.visual.attnpool.v_proj.in_features, 3, 3, dtype=torch.float64)
    h = model.visual.layer4.register_forward_hook(lambda m, a, o: fmap.expand_as(o).clone())
    try:
        base = bb(images(96, batch=1)).tokens
        fmap[0, :, 1, 2] = 1.0
        moved = bb(images(96, batch=1)).tokens
    finally:
        h.remove()
    changed = (moved - base).abs().sum(-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [1 * 3 + 2]


@pytest.mark.parametrize("size", [64, 96])
def test_vit_tokens_and_pooled(size):
    model = make(VIT, size, seed=3, dtype=torch.float64)
    bb = CLIPBackbone(model)
    x = images(size)
    expected_pooled, hidden = capture_output(model.visual.transformer, lambda: model.encode_image(x))
    out = bb(x)
    assert T.rel_err(out.pooled, expected_pooled) <= RTOL64
    expected = literal_vit_tokens(model.visual, hidden)
    assert out.tokens.shape == expected.shape == (2, (size // 16) ** 2, OUT_DIM[VIT])
    assert T.rel_err(out.tokens, expected) <= RTOL64
    # the class token is excluded: the first token is patch 0, not the class token
    cls = literal_vit_tokens(model.visual, hidden[:, [1, 0]])[:, 0]
    assert T.rel_err(out.tokens[:, 0], cls) > 1e-3


def test_float32_input_cast_to_tower_dtype():
    model = make(RN, seed=4, dtype=torch.float64)
    bb = CLIPBackbone(model)
    x = images(NATIVE)
    out32 = bb(x.float())
    assert out32.tokens.dtype == torch.float64
    torch.testing.assert_close(out32.tokens, bb(x.float().double()).tokens, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Positional-embedding interpolation

@pytest.mark.parametrize("name,s0,s1", [(RN, 96, 160), (RN, 96, 64), (VIT, 64, 96), (VIT, 64, 32)])
def test_checkpoint_at_other_size(name, s0, s1, tmp_path):
    model = make(name, s0, seed=5)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    bb = CLIPBackbone.from_name(name, image_size=s1, pretrained=str(path))
    assert bb.image_size == s1 and bb.visual.image_size in (s1, (s1, s1))

    # by hand: resize the saved embedding, load into a fresh model built at s1
    sd = torch.load(path, weights_only=True)
    sd[POS_KEY[name]] = hand_resize(sd[POS_KEY[name]], s1 // STRIDE[name])
    ref = open_clip.create_model(name, pretrained=None, force_image_size=s1).eval()
    ref.load_state_dict(sd)
    ref_sd, got_sd = ref.visual.state_dict(), bb.visual.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        torch.testing.assert_close(got_sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    # the interpolation is not trivial (a bilinear resize differs)
    assert not torch.allclose(hand_resize(model.state_dict()[POS_KEY[name]], s1 // STRIDE[name], "bilinear"),
                              ref_sd[POS_KEY[name][len("visual."):]])
    x = images(s1, dtype=torch.float32)
    out = bb(x)
    torch.testing.assert_close(out.pooled, ref.encode_image(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.tokens, CLIPBackbone(ref)(x).tokens, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,s0", [(RN, 96), (VIT, 64)])
def test_checkpoint_at_same_size_is_identity(name, s0, tmp_path):
    model = make(name, s0, seed=6)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    clip = build_clip(name, image_size=s0, pretrained=path)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(clip.state_dict()[k], v, rtol=0, atol=0, msg=k)
    x = images(s0, dtype=torch.float32)
    a, b = CLIPBackbone(clip)(x), CLIPBackbone(model)(x)
    torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=0)


def test_checkpoint_at_other_size_default_image_size(tmp_path):
    """image_size=None: the config's own size (64), whatever size the checkpoint was made at."""
    model = make(RN, 128, seed=7)
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    clip = build_clip(RN, pretrained=str(path))
    assert clip.visual.image_size == NATIVE
    expected = hand_resize(model.state_dict()[POS_KEY[RN]], NATIVE // 32)
    torch.testing.assert_close(clip.visual.attnpool.positional_embedding.detach(), expected, rtol=0, atol=0)


def test_constructor_resizes_shared_tower_in_place():
    model = make(VIT, 64, seed=8)
    pos0 = model.visual.positional_embedding.detach().clone()
    bb = CLIPBackbone(model, image_size=96)
    assert bb.visual is model.visual
    assert model.visual.image_size == (96, 96) and model.visual.grid_size == (6, 6)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), hand_resize(pos0, 6), rtol=0, atol=0)
    x = images(96, dtype=torch.float32)
    torch.testing.assert_close(bb(x).pooled, model.encode_image(x), rtol=1e-6, atol=1e-6)


def test_random_weights_built_at_size():
    torch.manual_seed(0)
    clip = build_clip(RN, image_size=160)
    assert clip.visual.image_size == 160
    assert clip.visual.attnpool.positional_embedding.shape == (1 + 25, 512)
    assert clip.visual.preprocess_cfg["size"] in (160, (160, 160))
    clip = build_clip(VIT, image_size=32, dtype=torch.float64)
    assert clip.visual.positional_embedding.shape == (1 + 4, 64)
    assert all(p.dtype == torch.float64 for p in clip.parameters())


# --------------------------------------------------------------------------
# Frozen / trainable

def test_frozen_by_default():
    model = make(RN, seed=9)
    bb = CLIPBackbone(model)
    assert bb.frozen
    assert all(not p.requires_grad for p in bb.parameters())
    assert bb.train() is bb and bb.training
    assert not any(m.training for m in bb.visual.modules())
    bb.visual.train()  # even when set by hand, train() restores eval
    bb.train(True)
    assert not any(m.training for m in bb.visual.modules())
    x = images(NATIVE, dtype=torch.float32).requires_grad_(True)
    out = bb(x)
    (out.tokens.sum() + out.pooled.sum()).backward()  # gradients reach the images only
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.parameters())
    # eval mode: BatchNorm running statistics, so the batch does not change the output
    with torch.no_grad():
        one = bb(x[:1].detach()).tokens
    assert T.rel_err(one, out.tokens[:1]) <= 1e-5


@pytest.mark.parametrize("name", [RN, VIT])
def test_trainable_gradients_reach_visual(name):
    model = make(name, seed=10)
    model.visual.requires_grad_(False)  # frozen=False makes the tower trainable again
    bb = CLIPBackbone(model, frozen=False)
    assert not bb.frozen
    bb.train()
    assert all(m.training for m in bb.visual.modules())
    bb.eval()
    assert not any(m.training for m in bb.visual.modules())
    bb.train()
    g = torch.Generator().manual_seed(11)
    out = bb(images(NATIVE, batch=3, dtype=torch.float32))
    loss = (out.tokens * torch.randn(out.tokens.shape, generator=g)).sum() + (out.pooled ** 2).sum()
    loss.backward()
    params = list(bb.visual.named_parameters())
    assert params and all(p.requires_grad for _, p in params)
    missing = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"visual parameters without gradient: {missing}"


def test_shared_model_with_pdlr():
    """The caller passes one CLIP model to the backbone (visual) and to PDLR (text)."""
    from vlssm.modules import PDLR

    clip = make(RN, seed=12)
    bb = CLIPBackbone(clip)
    pdlr = PDLR(["cat", "dog"], RN, clip_model=clip)
    t_hard, t_soft = pdlr()
    out = bb(images(NATIVE, dtype=torch.float32))
    assert t_hard.shape == (2, bb.out_dim) and out.tokens.shape[-1] == bb.out_dim
    logits = torch.einsum("bmd,cd->bcm", out.tokens, t_soft)
    assert logits.shape == (2, 2, bb.num_tokens)


# --------------------------------------------------------------------------
# Input validation

@pytest.fixture(scope="module")
def rn_backbone():
    return CLIPBackbone(make(RN, seed=13))


@pytest.mark.parametrize(
    "x,exc,match",
    [
        (torch.zeros(3, 64, 64), ValueError, r"images must have shape \(B, 3, 64, 64\), got \(3, 64, 64\)"),
        (torch.zeros(2, 1, 64, 64), ValueError, r"images must have shape \(B, 3, 64, 64\)"),
        (torch.zeros(2, 3, 96, 96), ValueError, r"images must have shape \(B, 3, 64, 64\), got \(2, 3, 96, 96\)"),
        (torch.zeros(2, 3, 64, 32), ValueError, r"images must have shape"),
        (torch.zeros(2, 3, 64, 64, dtype=torch.uint8), TypeError, "images must be a floating-point"),
        ([[0.0]], TypeError, "images must be a torch.Tensor"),
    ],
    ids=["3d", "channels", "size", "non-square", "uint8", "list"],
)
def test_bad_images(rn_backbone, x, exc, match):
    with pytest.raises(exc, match=match):
        rn_backbone(x)


@pytest.mark.parametrize(
    "name,size",
    [(RN, 100), (RN, 16), (RN, 0), (RN, -32), (RN, 64.0), (RN, "64"), (RN, True), (VIT, 72), (VIT, 8)],
)
def test_bad_image_size(name, size):
    with pytest.raises(ValueError, match="image_size"):
        build_clip(name, image_size=size)
    with pytest.raises(ValueError, match="image_size"):
        CLIPBackbone.from_name(name, image_size=size)


def test_bad_image_size_in_constructor():
    model = make(VIT, seed=14)
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 16"):
        CLIPBackbone(model, image_size=40)
    assert model.visual.image_size == (64, 64)  # untouched


def test_unknown_backbone():
    with pytest.raises(ValueError, match=r"unknown open_clip backbone 'NoSuchNet-9'.*e\.g\. RN50, RN101, ViT-B-16"):
        build_clip("NoSuchNet-9")
    with pytest.raises(ValueError, match="unknown open_clip backbone"):
        CLIPBackbone.from_name("NoSuchNet-9", image_size=224)
    with pytest.raises(TypeError, match="backbone must be a str"):
        build_clip(50)


def test_timm_tower_rejected():
    with pytest.raises(ValueError, match=r"timm.*'resnet18'.*ModifiedResNet and VisionTransformer"):
        build_clip(TIMM)


def test_non_clip_modules_rejected():
    with pytest.raises(TypeError, match="open_clip CLIP visual tower"):
        CLIPBackbone(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        CLIPBackbone("RN50")
    from open_clip.transformer import VisionTransformer

    coca_like = VisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=1, mlp_ratio=2.0,
                                  attentional_pool=True, attn_pooler_queries=4, attn_pooler_heads=1, output_dim=16)
    with pytest.raises(ValueError, match="attentional pooler"):
        CLIPBackbone(coca_like)
    with pytest.raises(TypeError, match="frozen must be a bool"):
        CLIPBackbone(make(RN, seed=15), frozen=None)


def test_bad_pretrained(tmp_path):
    with pytest.raises(ValueError, match="pretrained checkpoint file not found: 'openai'"):
        build_clip(RN, pretrained="openai")
    with pytest.raises(ValueError, match="not found"):
        CLIPBackbone.from_name(RN, pretrained=str(tmp_path / "missing.pt"))
    with pytest.raises(TypeError, match="pretrained must be a local file path"):
        build_clip(RN, pretrained=3)


def test_normalisation_constants(rn_backbone):
    assert rn_backbone.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert rn_backbone.std == tuple(open_clip.OPENAI_DATASET_STD)


# --------------------------------------------------------------------------
# open_clip is optional

def test_import_without_open_clip():
    """vlssm.models imports without open_clip; building a backbone then says how to install it."""
    import vlssm

    root = os.path.dirname(os.path.dirname(os.path.abspath(vlssm.__file__)))
    code = (
        "import sys\n"
        "sys.modules['open_clip'] = None\n"  # makes `import open_clip` raise ImportError
        "from vlssm.models import build_clip, list_models\n"
        "assert 'mvlr' in list_models()\n"
        "try:\n"
        "    build_clip('RN50')\n"
        "except ImportError as e:\n"
        "    assert 'pip install open_clip_torch' in str(e), e\n"
        "    print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=T.child_env(), cwd=root,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]


def test_one_output_only(rn_backbone):
    """tokens=False / pooled=False skip that output's work and give the same other output."""
    x = images(NATIVE, dtype=torch.float32)
    both = rn_backbone(x)
    only_t, only_p = rn_backbone(x, pooled=False), rn_backbone(x, tokens=False)
    assert only_t.pooled is None and only_p.tokens is None
    torch.testing.assert_close(only_t.tokens, both.tokens, rtol=0, atol=0)
    torch.testing.assert_close(only_p.pooled, both.pooled, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ask for tokens, pooled or both"):
        rn_backbone(x, tokens=False, pooled=False)
