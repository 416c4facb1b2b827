"""Tests of vlssm.modules.PDLR against open_clip itself: the cached hard-prompt
features equal ``CLIP.encode_text`` of the hard prompts, the soft path with the
context set to the embeddings of "a photo of a" equals ``encode_text`` of
"a photo of a {name}.", shapes for RN50 / RN101 / ViT-B-16 (random weights),
gradients reach the context only, the encoder stays frozen and in eval mode,
checkpoint loading, input validation, and ``import vlssm`` without open_clip.

Each open_clip config is built once per module (module-scoped fixtures); the
PDLRs of a config share its text encoder (PDLR freezes it in place).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from vlssm import testing as T  # noqa: E402
from vlssm.modules import PDLR  # noqa: E402

CONFIGS = ["RN50", "RN101", "ViT-B-16"]
#: text projection width d of each config.
OUT_DIM = {"RN50": 1024, "RN101": 512, "ViT-B-16": 512}
WIDTH = 512  # token-embedding width of all three
#: names of different token counts; "_" is read as a space.
CLASSNAMES = ["cat", "dining_table", "traffic light", "hair drier", "person"]
NAMES = ["cat", "dining table", "traffic light", "hair drier", "person"]
HARD = "This photo contains {}."
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def models():
    """open_clip models with random weights by config name, each built at most once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            torch.manual_seed(sum(map(ord, name)))
            cache[name] = open_clip.create_model(name, pretrained=None).eval()
        return cache[name]

    yield get
    cache.clear()


@pytest.fixture(scope="module", params=CONFIGS)
def built(request, models):
    """(config name, open_clip model, PDLR on its text encoder) for each config."""
    model = models(request.param)
    return request.param, model, PDLR(CLASSNAMES, request.param, clip_model=model)


@pytest.fixture(scope="module")
def rn50(models):
    """The RN50 model, for the tests that need one config only."""
    return models("RN50")


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("RN50")  # the same CLIP BPE tokenizer for the three configs


@torch.no_grad()
def _encode_text(model, tokenizer, texts):
    return model.encode_text(tokenizer(texts), normalize=False)


@torch.no_grad()
def _phrase_embedding(model, tokenizer, phrase: str, n: int = 4) -> torch.Tensor:
    ids = tokenizer([phrase])[0]
    assert int(ids.argmax()) == n + 1, f"{phrase!r} is not {n} tokens"
    return model.token_embedding(ids[1:1 + n])


def _frozen_state(pdlr):
    return {n: (p.detach().double().sum().item(), p.detach().double().norm().item())
            for n, p in pdlr.text_encoder.named_parameters()}


# --------------------------------------------------------------------------
# Shapes and agreement with open_clip

def test_shapes(built):
    name, model, pdlr = built
    C, d = len(CLASSNAMES), OUT_DIM[name]
    t_hard, t_soft = pdlr()
    assert t_hard.shape == (C, d) and t_soft.shape == (C, d)
    assert pdlr.out_dim == d and pdlr.num_classes == C
    assert torch.isfinite(t_hard).all() and torch.isfinite(t_soft).all()
    assert pdlr.ctx.shape == (4, WIDTH) and pdlr.ctx.requires_grad
    assert pdlr.classnames == NAMES
    # only the text parts are kept: no visual tower, no logit_scale
    assert not any(k.startswith("visual") or "logit" in k for k in pdlr.state_dict())
    assert "ctx" in pdlr.state_dict() and "t_hard" in pdlr.state_dict()
    assert [n for n, p in pdlr.named_parameters() if p.requires_grad] == ["ctx"]


def test_hard_equals_open_clip_encode_text(built, tokenizer):
    name, model, pdlr = built
    expected = _encode_text(model, tokenizer, [HARD.format(n) for n in NAMES])
    torch.testing.assert_close(pdlr.t_hard, expected, **TOL)
    torch.testing.assert_close(pdlr()[0], expected, **TOL)
    assert not pdlr.t_hard.requires_grad


def test_soft_equals_open_clip_encode_text(built, tokenizer):
    name, model, pdlr = built
    emb = _phrase_embedding(model, tokenizer, "a photo of a")
    # the CoOp init (n_ctx = 4, "a photo of a") is that embedding
    assert pdlr.ctx_init_phrase == "a photo of a"
    torch.testing.assert_close(pdlr.ctx.detach(), emb, rtol=0, atol=0)
    saved = pdlr.ctx.detach().clone()
    try:
        with torch.no_grad():
            pdlr.ctx.normal_(std=0.02)
        expected = _encode_text(model, tokenizer, [f"a photo of a {n}." for n in NAMES])
        assert not torch.allclose(pdlr()[1], expected, **TOL)  # the comparison below can fail
        with torch.no_grad():
            pdlr.ctx.copy_(emb)
        t_soft = pdlr()[1]
        assert t_soft.requires_grad
        torch.testing.assert_close(t_soft, expected, **TOL)
    finally:
        with torch.no_grad():
            pdlr.ctx.copy_(saved)


def test_class_specific_context(rn50, tokenizer):
    phrases = ["a photo of a", "a picture of the", "an image of a", "a drawing of my", "a close up of"]
    pdlr = PDLR(CLASSNAMES, "RN50", class_specific=True, clip_model=rn50)
    assert pdlr.ctx.shape == (len(CLASSNAMES), 4, WIDTH)
    with torch.no_grad():
        for c, ph in enumerate(phrases):
            pdlr.ctx[c].copy_(_phrase_embedding(rn50, tokenizer, ph))
    expected = _encode_text(rn50, tokenizer, [f"{ph} {n}." for ph, n in zip(phrases, NAMES)])
    torch.testing.assert_close(pdlr()[1], expected, **TOL)
    # each class's features depend on its own context only
    pdlr()[1][2].sum().backward()
    g = pdlr.ctx.grad
    assert g[2].abs().sum() > 0
    assert g[[0, 1, 3, 4]].abs().sum() == 0


def test_random_context_init(rn50):
    torch.manual_seed(0)
    p2 = PDLR(CLASSNAMES, "RN50", n_ctx=2, clip_model=rn50)  # "a photo of a" has 4 tokens: random init
    assert p2.ctx_init_phrase is None and p2.ctx.shape == (2, WIDTH)
    assert 0.015 < p2.ctx.detach().std().item() < 0.025
    assert (p2.soft_tokens[:, 1:3] == p2.soft_tokens[0, 1]).all()
    assert p2()[1].shape == (len(CLASSNAMES), OUT_DIM["RN50"])
    p4 = PDLR(CLASSNAMES, "RN50", ctx_init=None, clip_model=rn50)
    assert p4.ctx_init_phrase is None and 0.015 < p4.ctx.detach().std().item() < 0.025


# --------------------------------------------------------------------------
# Truncation after the last EOS, and the eval-mode cache of T^soft

LONG_NAMES = ["cat", "dining_table", "a very long and rather wordy class name for a thing", "hair drier dryer"]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_truncated_soft_encoding_equals_full_length(rn50, dtype, rtol):
    """The causal text transformer gives the same EOS features from the prompts cut after the longest
    EOS (names of 1 to 12 tokens) as from all 77 positions, values and gradients."""
    pdlr = PDLR(LONG_NAMES, "RN50", clip_model=rn50)
    if dtype != torch.float32:
        pdlr = copy.deepcopy(pdlr).to(dtype)  # the text parts only: rn50 stays float32
    ids = pdlr.soft_tokens.argmax(-1)
    assert pdlr.soft_length == int(ids.max()) + 1 < pdlr.text_encoder.context_length
    assert len(set(ids.tolist())) == len(LONG_NAMES)  # different EOS positions
    with torch.no_grad():
        pdlr.ctx.normal_(std=0.5)  # away from the init, so the context matters
    grads, outs = [], []
    for truncate in (True, False):
        pdlr.truncate = truncate
        pdlr.ctx.grad = None
        t = pdlr()[1]
        assert t.shape == (len(LONG_NAMES), 1024) and t.dtype == dtype
        (t * torch.linspace(-1, 1, t.numel(), dtype=dtype).view_as(t)).sum().backward()
        outs.append(t.detach())
        grads.append(pdlr.ctx.grad.clone())
    scale = outs[1].abs().max()
    assert (outs[0] - outs[1]).abs().max() <= rtol * scale, (outs[0] - outs[1]).abs().max() / scale
    gscale = grads[1].abs().max()
    assert gscale > 0 and (grads[0] - grads[1]).abs().max() <= 10 * rtol * gscale


def _count_calls(module):
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_soft_features_cached_in_eval_until_an_input_changes(rn50):
    pdlr = PDLR(CLASSNAMES, "RN50", clip_model=rn50)
    calls = _count_calls(pdlr.text_encoder)
    pdlr.train()
    pdlr(), pdlr()
    assert len(calls) == 2  # training: once per call, never cached
    pdlr.eval()
    with torch.no_grad():
        first = pdlr()[1]
        again = pdlr()[1]
    assert len(calls) == 3 and again is first  # the second eval call ran no encoder
    saved = pdlr.ctx.detach().clone()
    with torch.no_grad():
        pdlr.ctx.add_(0.1)  # an in-place change invalidates
        changed = pdlr()[1]
    assert len(calls) == 4 and not torch.allclose(changed, first)
    pdlr.load_state_dict({**pdlr.state_dict(), "ctx": saved})  # as loading a checkpoint does
    with torch.no_grad():
        restored = pdlr()[1]
    assert len(calls) == 5
    torch.testing.assert_close(restored, first, rtol=0, atol=0)
    with torch.no_grad():  # an encoder weight changed in place
        pdlr.text_encoder.ln_final.weight.mul_(1.5)
        pdlr()
        pdlr.text_encoder.ln_final.weight.div_(1.5)
    assert len(calls) == 6
    t = pdlr()[1]  # eval with autograd on and a trainable ctx: not cached, differentiable
    assert t.requires_grad and len(calls) == 7
    pdlr.ctx.requires_grad_(False)  # frozen context: cached even with autograd on
    try:
        a, b = pdlr()[1], pdlr()[1]
        assert b is a and len(calls) == 8
    finally:
        pdlr.ctx.requires_grad_(True)


# --------------------------------------------------------------------------
# Training: gradients reach the context only; the hard features stay put

def test_gradients_reach_context_only(rn50):
    pdlr = PDLR(CLASSNAMES, "RN50", clip_model=rn50)
    t_hard, t_soft = pdlr()
    loss = (t_soft * t_hard).sum() + t_soft.pow(2).mean()
    loss.backward()
    assert pdlr.ctx.grad is not None and pdlr.ctx.grad.abs().sum() > 0
    frozen = list(pdlr.text_encoder.named_parameters())
    assert len(frozen) > 100
    bad = [n for n, p in frozen if p.grad is not None or p.requires_grad]
    assert not bad, f"text-encoder parameters with a grad or requires_grad: {bad[:5]}"


def test_t_hard_unchanged_by_training(rn50):
    pdlr = PDLR(CLASSNAMES, "RN50", clip_model=rn50)
    before_hard = pdlr.t_hard.clone()
    before_soft = pdlr()[1].detach().clone()
    before_ctx = pdlr.ctx.detach().clone()
    before_enc = _frozen_state(pdlr)
    opt = torch.optim.SGD(pdlr.parameters(), lr=10.0)
    for _ in range(2):
        opt.zero_grad()
        t_hard, t_soft = pdlr()
        loss = (t_soft - t_hard).pow(2).sum() + t_hard.sum()
        loss.backward()
        opt.step()
    assert not torch.equal(pdlr.ctx.detach(), before_ctx)  # training did something
    assert not torch.allclose(pdlr()[1], before_soft)
    assert torch.equal(pdlr.t_hard, before_hard)
    assert torch.equal(pdlr()[0], before_hard)
    assert _frozen_state(pdlr) == before_enc
    # the cache still equals a fresh encoding
    torch.testing.assert_close(pdlr.text_encoder.encode(pdlr.hard_tokens), before_hard, rtol=0, atol=0)


def test_train_keeps_encoder_in_eval(rn50):
    pdlr = PDLR(CLASSNAMES[:2], "RN50", clip_model=rn50)
    assert not any(m.training for m in pdlr.text_encoder.modules())
    assert pdlr.train() is pdlr
    assert pdlr.training
    assert not any(m.training for m in pdlr.text_encoder.modules())
    pdlr.text_encoder.train()  # even when set by hand, PDLR.train() restores eval
    pdlr.train(True)
    assert not any(m.training for m in pdlr.text_encoder.modules())
    pdlr.eval()
    assert not pdlr.training and not any(m.training for m in pdlr.text_encoder.modules())


# --------------------------------------------------------------------------
# Construction paths: checkpoint file, default random weights

def test_checkpoint_loading(rn50, tokenizer, tmp_path):
    path = tmp_path / "rn50_random.pt"
    torch.save(rn50.state_dict(), path)
    pdlr = PDLR(CLASSNAMES, "RN50", checkpoint=str(path))
    expected = _encode_text(rn50, tokenizer, [HARD.format(n) for n in NAMES])
    torch.testing.assert_close(pdlr.t_hard, expected, **TOL)
    emb = _phrase_embedding(rn50, tokenizer, "a photo of a")
    torch.testing.assert_close(pdlr.ctx.detach(), emb, rtol=0, atol=0)
    torch.testing.assert_close(pdlr()[1], _encode_text(rn50, tokenizer, [f"a photo of a {n}." for n in NAMES]), **TOL)


def test_default_random_weights_and_dtype(rn50, tokenizer):
    torch.manual_seed(123)
    pdlr = PDLR(CLASSNAMES[:3], "RN50", dtype=torch.float64)  # own random model, nothing downloaded
    t_hard, t_soft = pdlr()
    assert t_hard.shape == t_soft.shape == (3, OUT_DIM["RN50"])
    assert t_hard.dtype == t_soft.dtype == pdlr.ctx.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in pdlr.text_encoder.parameters())
    # other random weights than rn50 (so the checkpoint test can fail)
    other = _encode_text(rn50, tokenizer, [HARD.format(n) for n in NAMES[:3]])
    assert not torch.allclose(t_hard.float(), other, **TOL)


# --------------------------------------------------------------------------
# Input validation (all raise before any model is built)

@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(classnames=[]), ValueError, "classnames must be non-empty"),
        (dict(classnames="cat"), TypeError, "classnames must be a list"),
        (dict(classnames=["cat", 3]), TypeError, r"classnames\[1\]"),
        (dict(classnames=["cat", " "]), ValueError, r"classnames\[1\] is empty"),
        (dict(n_ctx=0), ValueError, "n_ctx must be >= 1"),
        (dict(n_ctx=2.0), TypeError, "n_ctx must be an int"),
        (dict(model_name="NoSuchNet-9"), ValueError, r"'NoSuchNet-9'.*open_clip\.list_models\(\)"),
        (dict(model_name=16), TypeError, "model_name"),
        (dict(checkpoint="/nonexistent/ckpt.pt"), ValueError, "checkpoint file not found: '/nonexistent/ckpt.pt'"),
        (dict(hard_template="This photo contains"), ValueError, "hard_template"),
        (dict(ctx_init=4), TypeError, "ctx_init"),
        (dict(clip_model="ViT-B-16"), TypeError, "clip_model"),
        (dict(clip_model=torch.nn.Linear(2, 2)), TypeError, "clip_model must be an open_clip CLIP model"),
    ],
    ids=["empty", "str", "non-str", "blank", "n_ctx0", "n_ctx-float", "unknown-model", "model-int",
         "missing-ckpt", "template", "ctx_init", "clip-str", "clip-linear"],
)
def test_bad_inputs(kwargs, exc, match):
    kw = dict(classnames=["cat"], model_name="RN50")
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        PDLR(**kw)


def test_checkpoint_and_clip_model_exclusive(rn50, tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="either checkpoint or clip_model"):
        PDLR(["cat"], "RN50", checkpoint=str(path), clip_model=rn50)


def test_too_long_class_name(rn50):
    with pytest.raises(ValueError, match="more than the context length 77"):
        PDLR(["cat", " ".join(["word"] * 80)], "RN50", clip_model=rn50)


# --------------------------------------------------------------------------
# open_clip is optional

def test_import_without_open_clip():
    import vlssm

    root = os.path.dirname(os.path.dirname(os.path.abspath(vlssm.__file__)))
    code = (
        "import sys; sys.modules['open_clip'] = None\n"  # makes `import open_clip` raise ImportError
        "import vlssm, vlssm.modules\n"
        "from vlssm import PDLR\n"
        "try:\n"
        "    PDLR(['cat'])\n"
        "except ImportError as e:\n"
        "    assert 'pip install open_clip_torch' in str(e), e\n"
        "    print('OK')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=T.child_env(), cwd=root,
                       timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr[-2000:]
