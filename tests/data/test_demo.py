"""Tests of vlssm.data.DigitMosaics: determinism, disjoint scan pools, targets = what is drawn,
the long tail, the single-label base/new split, argument errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlssm.data import DigitMosaics


def test_classnames_and_defaults():
    ds = DigitMosaics("train", n=50)
    assert ds.classnames == ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    assert list(DigitMosaics.CLASSNAMES) == ds.classnames
    assert ds.multi_label and ds.num_base is None and ds.bad_items == []
    assert len(DigitMosaics("train")) == 2000 and len(DigitMosaics("test")) == 500
    image, target = ds[0]
    assert image.mode == "RGB" and image.size == (64, 64)
    assert target.dtype == torch.float32 and target.shape == (10,)
    assert "digits" in ds.describe() and "'train'" in ds.describe()


def test_deterministic_in_split_and_seed():
    a, b = DigitMosaics("train", n=100, seed=3), DigitMosaics("train", n=100, seed=3)
    assert np.array_equal(a.layout, b.layout)
    assert torch.equal(a.labels(), b.labels())
    assert np.array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))
    c = DigitMosaics("train", n=100, seed=4)
    assert not np.array_equal(a.layout, c.layout)
    t = DigitMosaics("test", n=100, seed=3)
    assert not np.array_equal(a.layout, t.layout)


def test_train_and_test_use_disjoint_scans():
    scans, digits = DigitMosaics.scans()
    assert scans.shape == (1797, 8, 8) and scans.dtype == np.uint8
    train_pool = np.concatenate(DigitMosaics.pool("train"))
    test_pool = np.concatenate(DigitMosaics.pool("test"))
    assert not set(train_pool.tolist()) & set(test_pool.tolist())
    assert len(train_pool) + len(test_pool) == 1797
    for d, (p_tr, p_te) in enumerate(zip(DigitMosaics.pool("train"), DigitMosaics.pool("test"))):
        assert (digits[p_tr] == d).all() and (digits[p_te] == d).all()
        n = len(p_tr) + len(p_te)
        assert abs(len(p_tr) - 0.8 * n) <= 1  # stratified ~80/20
    # whatever the seed, test mosaics never use a train scan
    used_train = set(DigitMosaics("train", n=400, seed=1).layout.ravel().tolist()) - {-1}
    used_test = set(DigitMosaics("test", n=400, seed=2).layout.ravel().tolist()) - {-1}
    assert used_train and used_test and not used_train & used_test


@pytest.mark.parametrize("image_size", [16, 64])
def test_targets_are_the_digits_drawn(image_size):
    ds = DigitMosaics("train", n=60, image_size=image_size, seed=5)
    scans, digits = DigitMosaics.scans()
    scale = image_size // 16
    y = ds.labels()
    assert ((y.sum(1) >= 2) & (y.sum(1) <= 4)).all()
    for i in range(len(ds)):
        image, target = ds[i]
        px = np.asarray(image)
        assert px.shape == (image_size, image_size, 3)
        assert (px[..., 0] == px[..., 1]).all() and (px[..., 0] == px[..., 2]).all()  # grey, replicated
        gray = px[..., 0]
        drawn = []
        for cell in range(4):
            r, c = divmod(cell, 2)
            block = gray[r * 8 * scale:(r + 1) * 8 * scale, c * 8 * scale:(c + 1) * 8 * scale]
            scan = ds.layout[i, cell]
            if scan < 0:
                assert (block == 0).all()
            else:
                assert block.any()
                # nearest upscaling: the block is the scan (0..16 -> 0..255) repeated scale x scale
                expected = np.kron(scans[scan], np.ones((scale, scale), dtype=np.uint8))
                assert np.array_equal(block, expected)
                drawn.append(int(digits[scan]))
        assert len(set(drawn)) == len(drawn)  # distinct digits
        expected_target = torch.zeros(10)
        expected_target[drawn] = 1.0
        assert torch.equal(target, expected_target)
        assert torch.equal(y[i], expected_target)


def test_long_tail_multi_label():
    counts = DigitMosaics("train", n=2000, imbalance=0.01).class_counts()
    assert counts[0] > 10 * counts[9]
    assert all(counts[i] > counts[i + 3] for i in range(7))  # falling off
    test_counts = DigitMosaics("test", imbalance=0.01).class_counts()  # the test split stays balanced
    assert max(test_counts) < 1.5 * min(test_counts)


def test_single_label_base_new_and_long_tail():
    ds = DigitMosaics("train", n=1000, single_label=True, num_base=5, imbalance=0.1, seed=2)
    assert not ds.multi_label and ds.num_base == 5
    y = ds.labels()
    assert y.dtype == torch.int64 and y.shape == (len(ds),)
    expected = [int(200 * 0.1 ** (i / 4)) for i in range(5)] + [0] * 5
    assert ds.class_counts() == expected
    image, target = ds[3]
    assert target.dtype == torch.int64 and target.dim() == 0
    # one digit, of the target's class
    scans, digits = DigitMosaics.scans()
    row = ds.layout[3]
    assert (row >= 0).sum() == 1 and digits[row[row >= 0][0]] == target.item()
    test = DigitMosaics("test", n=500, single_label=True, num_base=5, imbalance=0.1)
    assert test.class_counts() == [50] * 10 and test.num_base == 5
    balanced = DigitMosaics("train", n=103, single_label=True)
    assert balanced.class_counts() == [11, 11, 11] + [10] * 7


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(split="val"), ValueError, "split"),
    (dict(imbalance=0.0), ValueError, "imbalance"),
    (dict(imbalance=1.5), ValueError, "imbalance"),
    (dict(num_base=3), ValueError, "single_label"),
    (dict(min_digits=3, max_digits=2), ValueError, "min_digits"),
    (dict(max_digits=5), ValueError, "max_digits"),
    (dict(n=0), ValueError, "n must"),
    (dict(image_size=8.0), TypeError, "image_size"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(single_label=True, n=5), ValueError, "n=5"),
    (dict(single_label=True, num_base=11), ValueError, "num_base"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DigitMosaics(**kwargs)


def test_transform_applied():
    ds = DigitMosaics("test", n=4, transform=lambda im: torch.tensor(im.size))
    image, _ = ds[0]
    assert image.tolist() == [64, 64]
