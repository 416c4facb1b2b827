"""Shared set-up of the model tests: tiny open_clip configs under test-only names, so that every
model builds in milliseconds with random weights (nothing is downloaded), and one intra-op thread.

The configs (registered in open_clip's config registry for the session):

* ``vlssm-test-tiny-RN``: a ModifiedResNet (layers [1, 1, 1, 1], width 16), embed_dim 32, 64 x 64;
* ``vlssm-test-tiny-ViT``: a ViT (width 64, 2 layers, patch 16), embed_dim 48, 64 x 64;
* ``vlssm-test-timm-tower``: a timm visual tower (unsupported by the backbone adapter);

each with a 1-layer, width-32 text tower of CLIP's context length and vocabulary (CLIP's BPE
tokenizer). Tests import nothing from here (``--import-mode=importlib``): they name the configs.
"""
from __future__ import annotations

import json

import pytest
import torch

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "vlssm-test-tiny-RN": {"embed_dim": 32, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}},
    "vlssm-test-tiny-ViT": {"embed_dim": 48, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}},
    "vlssm-test-timm-tower": {"embed_dim": 32, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 224, "timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "linear"}},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread per module: on these tiny tensors OpenMP threads cost more than they
    save, badly so on a busy machine (a tiny ResNet step took seconds with 2 threads, ms with 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session", autouse=True)
def tiny_configs(tmp_path_factory):
    """Register the tiny configs in open_clip's config registry (when open_clip is installed)."""
    try:
        import open_clip
    except ImportError:
        yield
        return
    d = tmp_path_factory.mktemp("open_clip_configs")
    for name, cfg in CONFIGS.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    assert set(CONFIGS) <= set(open_clip.list_models())
    yield


class _Learnable:
    """A small learnable multi-label problem and a short training run on it, for the "it trains" tests:
    each image is noise plus a fixed random pattern per present class."""

    @staticmethod
    def problem(C: int, S: int, n: int = 32, seed: int = 0, every_class: bool = False):
        """(x_train, y_train, x_val, y_val): n images (n, 3, S, S) and multi-hot labels (n, C) each;
        every_class: the first C images of each split hold one class each (every class occurs)."""
        g = torch.Generator().manual_seed(seed)
        patterns = torch.randn(C, 3, S, S, generator=g)

        def data():
            y = (torch.rand(n, C, generator=g) < 0.4).float()
            if every_class:
                y[:C] = torch.eye(C)
            return 0.5 * torch.randn(n, 3, S, S, generator=g) + torch.einsum("nc,chwk->nhwk", y, patterns), y

        return (*data(), *data())

    @staticmethod
    def fit(model, problem, steps: int, lr: float, batch: int = 8):
        """AdamW on the trainable parameters over the training split in order; returns (mean loss of
        the first 4 steps, of the last 4, held-out mAP after training, the held-out positive rate: what
        random scores get on average)."""
        from vlssm.metrics import mean_average_precision

        xt, yt, xv, yv = problem
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        losses = []
        for step in range(steps):
            i = torch.arange(batch) + batch * (step % (len(xt) // batch))
            loss = model(xt[i], yt[i]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            m = mean_average_precision(torch.sigmoid(model(xv)), yv)
        return sum(losses[:4]) / 4, sum(losses[-4:]) / 4, m, float(yv.mean())


@pytest.fixture
def learnable():
    return _Learnable
