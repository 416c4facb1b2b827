"""Tests of vlssm.data.build_transform (CLIP preprocessing, augmentation) and the feature cache."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from PIL import Image

from vlssm.data import CLIP_MEAN, CLIP_STD, DigitMosaics, FeatureDataset, build_transform, cache_features


def solid(rgb=(128, 64, 255), size=(50, 30)):
    return Image.new("RGB", size, rgb)


def expected_solid(rgb, S):
    v = torch.tensor(rgb, dtype=torch.float32) / 255.0
    v = (v - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return v.view(3, 1, 1).expand(3, S, S)


def test_clip_constants():
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


@pytest.mark.parametrize("train, augment", [(False, "default"), (True, "none"), (True, "flip"), (True, "default")])
@pytest.mark.parametrize("multi_label", [True, False])
def test_shape_dtype_normalisation(train, augment, multi_label):
    t = build_transform(32, train, augment, multi_label=multi_label)
    x = t(solid())
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    if augment != "default" or not train:  # geometry only: a solid image stays solid
        torch.testing.assert_close(x, expected_solid((128, 64, 255), 32), atol=1e-5, rtol=0)


def test_grey_input_made_rgb():
    x = build_transform(16, False)(Image.new("L", (20, 20), 100))
    assert x.shape == (3, 16, 16)
    torch.testing.assert_close(x, expected_solid((100, 100, 100), 16), atol=1e-5, rtol=0)


def test_eval_multi_label_keeps_edges_single_label_crops():
    """Multi-label eval squashes the whole image (no crop); single-label eval center-crops."""
    im = Image.new("RGB", (60, 20), (0, 0, 0))
    im.paste((255, 255, 255), (0, 0, 10, 20))  # a white object at the left edge
    ml = build_transform(20, False, multi_label=True)(im)
    sl = build_transform(20, False, multi_label=False)(im)
    white = (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert ml[0, 10, 0].item() == pytest.approx(white, abs=1e-3)  # the object survives
    assert sl[0].max().item() < 0  # cropped away


def test_train_default_is_random_and_flip_flips():
    torch.manual_seed(0)
    im = Image.fromarray((torch.rand(40, 40, 3) * 255).to(torch.uint8).numpy())
    t = build_transform(24, True, "default")
    assert not torch.equal(t(im), t(im))
    half = Image.new("RGB", (24, 24), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 12, 24))
    flip = build_transform(24, True, "flip")
    outs = {tuple(flip(half)[0, 0, [0, -1]].sign().tolist()) for _ in range(40)}
    assert outs == {(1.0, -1.0), (-1.0, 1.0)}  # both orientations seen


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        build_transform(0, False)
    with pytest.raises(TypeError, match="image_size"):
        build_transform(22.5, False)
    with pytest.raises(ValueError, match="augment"):
        build_transform(32, True, "cutout")
    with pytest.raises(TypeError, match="train"):
        build_transform(32, "yes")
    with pytest.raises(TypeError, match="multi_label"):
        build_transform(32, True, multi_label=1)


# -------------------------------------------------------------------------------- feature cache
class CountingEncoder:
    """(B, 3, S, S) -> (B, 4): channel means and one global max; counts its calls."""

    def __init__(self, scale=1.0):
        self.calls = 0
        self.scale = scale

    def __call__(self, x):
        self.grad_enabled = torch.is_grad_enabled()
        self.calls += 1
        return torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(1, 2, 3))[:, None]], 1) * self.scale


def digits(n=20, **kw):
    return DigitMosaics("test", n=n, image_size=16, transform=build_transform(16, False), **kw)


def test_cache_in_memory():
    ds = digits()
    enc = CountingEncoder()
    feats = cache_features(enc, ds, batch_size=8)
    assert enc.calls == 3 and not enc.grad_enabled  # under torch.no_grad()
    assert isinstance(feats, FeatureDataset) and len(feats) == 20 and feats.dim == 4
    assert feats.features.dtype == torch.float32
    assert torch.equal(feats.labels(), ds.labels())
    assert feats.classnames == ds.classnames and feats.multi_label and feats.num_base is None
    assert feats.class_counts() == ds.class_counts()
    f5, y5 = feats[5]
    torch.testing.assert_close(f5, enc(ds[5][0][None])[0])
    assert torch.equal(y5, ds[5][1])


def test_cache_file_reused_and_rekeyed(tmp_path, caplog):
    ds = digits(single_label=True, num_base=4)
    path = str(tmp_path / "sub" / "feats.pt")
    enc = CountingEncoder()
    a = cache_features(enc, ds, path=path, key="rn50-16-v1", batch_size=8)
    assert enc.calls == 3 and os.path.isfile(path)
    assert [f for f in os.listdir(tmp_path / "sub")] == ["feats.pt"]  # no temporary file left
    blob = torch.load(path, weights_only=True)
    assert blob["key"] == "rn50-16-v1" and blob["num_base"] == 4 and blob["multi_label"] is False
    b = cache_features(enc, ds, path=path, key="rn50-16-v1", batch_size=8)
    assert enc.calls == 3  # loaded, not encoded
    assert torch.equal(a.features, b.features) and torch.equal(b.labels(), ds.labels())
    assert not b.multi_label and b.num_base == 4 and b.labels().dtype == torch.int64
    enc2 = CountingEncoder(scale=2.0)
    with caplog.at_level(logging.INFO, logger="vlssm.data"):
        c = cache_features(enc2, ds, path=path, key="rn50-16-v2", batch_size=8)
    assert enc2.calls == 3 and "another key" in caplog.text
    torch.testing.assert_close(c.features, 2 * a.features)
    assert torch.load(path, weights_only=True)["key"] == "rn50-16-v2"  # overwritten
    # the same key but other data: re-encoded, with a warning
    with caplog.at_level(logging.WARNING, logger="vlssm.data"):
        cache_features(enc2, digits(n=12), path=path, key="rn50-16-v2", batch_size=8)
    assert enc2.calls == 5 and "other labels" in caplog.text


def test_cache_errors(tmp_path):
    ds = digits(n=4)
    with pytest.raises(ValueError, match="transform is None"):
        cache_features(CountingEncoder(), DigitMosaics("test", n=4))
    with pytest.raises(ValueError, match=r"encode must return a \(B=4, d\)"):
        cache_features(lambda x: x, ds)
    with pytest.raises(TypeError, match="encode"):
        cache_features(None, ds)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=rf"feature cache {bad} cannot be read"):
        cache_features(CountingEncoder(), ds, path=str(bad))
    with pytest.raises(ValueError, match="labels must be"):
        FeatureDataset(torch.zeros(3, 2), torch.zeros(3), ["a", "b"], multi_label=False)
