"""Session-wide test set-up: tiny open_clip configs under test-only names, so that every model
builds in milliseconds with random weights (nothing is downloaded).

The configs (registered in open_clip's config registry for the session):

* ``vlssm-test-tiny-RN``: a ModifiedResNet (layers [1, 1, 1, 1], width 16), embed_dim 32, 64 x 64;
* ``vlssm-test-tiny-ViT``: a ViT (width 64, 2 layers, patch 16), embed_dim 48, 64 x 64;
* ``vlssm-test-timm-tower``: a timm visual tower (unsupported by the backbone adapter);

each with a 1-layer, width-32 text tower of CLIP's context length and vocabulary (CLIP's BPE
tokenizer). Tests import nothing from here (``--import-mode=importlib``): they name the configs
(tests/models, tests/profile, tests/train). The ``seed`` fixture gives every test case its own
reproducible seed. Shared helpers are :mod:`vlssm.testing`.
"""
from __future__ import annotations

import json

import pytest

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
CONFIGS = {
    "vlssm-test-tiny-RN": {"embed_dim": 32, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}},
    "vlssm-test-tiny-ViT": {"embed_dim": 48, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16}},
    "vlssm-test-timm-tower": {"embed_dim": 32, "text_cfg": TEXT, "vision_cfg": {
        "image_size": 224, "timm_model_name": "resnet18", "timm_pool": "avg", "timm_proj": "linear"}},
}


@pytest.fixture
def seed(request) -> int:
    """A different, reproducible seed for every test case (from its node id)."""
    from vlssm import testing

    return testing.seed_of(request.node.nodeid)


@pytest.fixture
def cpu_backend() -> str:
    """The compiled CPU backend ("cpu"); skips when vlssm._C is missing."""
    from vlssm import testing

    return testing.require_backend("cpu")


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
