"""The demo dataset that ships with the code: multi-label mosaics of real handwritten digits.

The scans are scikit-learn's bundled ``load_digits`` set (1,797 real 8 x 8 scans of the
digits 0-9, grey levels 0..16; no download). A mosaic is a ``grid x grid`` canvas of 8 x 8
cells (16 x 16 pixels for grid=2) holding distinct digits in distinct cells, the other
cells black; its label set is which digits appear. It is the default dataset of
``vlssm train``: a real (if small) multi-label recognition task that runs anywhere.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import numpy as np
import torch

from ._base import MultiLabelDataset, check_bool, check_imbalance, lt_counts

__all__ = ["DigitMosaics"]

_SPLITS = ("train", "test")
#: fraction of each digit's scans in the train pool (the rest: the test pool)
_TRAIN_FRACTION = 0.8
#: the pools' seed, fixed and independent of the ``seed`` argument: every DigitMosaics, whatever
#: its seed, draws its test mosaics from scans no train mosaic uses
_POOL_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits() -> Tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) uint8 scans scaled from 0..16 to 0..255, and their (1797,) int64 digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images.setflags(write=False)
    target = d.target.astype(np.int64)
    target.setflags(write=False)
    return images, target


@functools.lru_cache(maxsize=1)
def _pools() -> dict:
    """split -> 10 int64 arrays: the scans of each digit in that split's pool (stratified ~80/20)."""
    _, target = _digits()
    rng = np.random.default_rng(_POOL_SEED)
    pools = {"train": [], "test": []}
    for d in range(10):
        idx = np.flatnonzero(target == d)
        perm = rng.permutation(idx)
        n_train = int(round(_TRAIN_FRACTION * len(idx)))
        pools["train"].append(np.sort(perm[:n_train]))
        pools["test"].append(np.sort(perm[n_train:]))
    return pools


def _int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return int(v)


class DigitMosaics(MultiLabelDataset):
    """Multi-label (or single-label) mosaics of real handwritten digit scans; no file IO.

    Source pools: the 1,797 scans are split once, stratified by digit, ~80% / 20% into a
    train pool and a test pool (a fixed seed, 0, independent of ``seed``), so test mosaics
    are made of scans no train mosaic uses.

    Multi-label (default): each canvas holds ``k`` distinct digit classes, ``k`` uniform in
    ``[min_digits, max_digits]``, placed in ``k`` distinct random cells, each a random scan
    of that digit from the split's pool; the target is the multi-hot (10,) of the digits present.

    Long tail (``imbalance=r`` in (0, 1], train split only): multi-label: class ``i`` is drawn
    with weight ``r ** (i / 9)`` (a weighted draw without replacement of the ``k`` classes), so
    class counts fall off roughly geometrically from class 0 (the head) to class 9 (the rarest,
    weight ``r``); single-label: class ``i`` gets exactly ``n_i = max(1, int(n_max * r ** (i / (C' - 1))))``
    images, ``n_max = n // C'``, ``C'`` the train classes. The test split is always balanced,
    as in the long-tailed benchmarks (``imbalance`` is not applied to it).

    Single-label (``single_label=True``, Candle): one digit per canvas in a random cell, int
    targets, ``n // C'`` images per class (the remainder of ``n`` to the first classes). With
    ``num_base=b`` the train split holds only the base classes ``0..b-1``; the test split
    holds all 10 classes, balanced.

    Rendering: the canvas (grid * 8 pixels square, grey levels 0..16 scaled to 0..255) is
    upscaled to ``image_size`` with **nearest-neighbour** resampling (crisp pixels: a digit's
    cell stays exactly its block of the image), made RGB (grey replicated), then
    ``transform`` is applied. Generation is deterministic in (split, seed) and the other
    arguments: the composition (which scan goes in which cell) is drawn at construction
    (``layout``); ``__getitem__`` renders it.

    Args:
        split: ``"train"`` or ``"test"``.
        image_size: side of the rendered PIL image.
        n: mosaics in the split (default 2000 train / 500 test); single-label with imbalance:
            the size of the balanced set (the split then has ``sum(n_i)`` images).
        seed: a non-negative int; the composition's seed (with the split).
        min_digits, max_digits: digits per multi-label canvas, ``1 <= min <= max <= min(10, grid**2)``.
        grid: cells per side.
        imbalance: None or r in (0, 1] (see above).
        single_label: one digit per canvas, int64 targets.
        num_base: base classes (single-label only): the train split holds classes ``< num_base``.
        transform: applied to the PIL image.

    Attributes:
        layout: (N, grid * grid) int64 numpy array: the scan (row of ``DigitMosaics.scans()``)
            in each cell, in row-major cell order; -1 for an empty (black) cell.
    """

    name = "digits"
    CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

    def __init__(self, split: str = "train", image_size: int = 64, n: Optional[int] = None, seed: int = 0,
                 min_digits: int = 2, max_digits: int = 4, grid: int = 2, imbalance: Optional[float] = None,
                 single_label: bool = False, num_base: Optional[int] = None, transform=None):
        if split not in _SPLITS:
            raise ValueError(f"DigitMosaics: split must be one of {_SPLITS}, got {split!r}")
        single_label = check_bool("single_label", single_label)
        if num_base is not None and not single_label:
            raise ValueError("DigitMosaics: num_base (a base/new class split) needs single_label=True")
        super().__init__(self.CLASSNAMES, multi_label=not single_label, split=split,
                         source="sklearn load_digits mosaics", num_base=num_base, transform=transform)
        self.image_size = _int("image_size", image_size, 1)
        self.grid = _int("grid", grid, 1)
        self.seed = _int("seed", seed, 0)
        self.min_digits = _int("min_digits", min_digits, 1)
        self.max_digits = _int("max_digits", max_digits, 1)
        cells = self.grid * self.grid
        if not self.min_digits <= self.max_digits <= min(10, cells):
            raise ValueError(f"DigitMosaics: need 1 <= min_digits <= max_digits <= min(10, grid**2 = {cells}), "
                             f"got min_digits={min_digits}, max_digits={max_digits}")
        self.n = _int("n", n, 1) if n is not None else (2000 if split == "train" else 500)
        self.imbalance = check_imbalance(imbalance)
        self.single_label = single_label

        pools = _pools()[split]
        rng = np.random.default_rng([self.seed, _SPLITS.index(split)])
        lt = self.imbalance if split == "train" else None
        if single_label:
            layout, targets = self._single_label_layout(rng, pools, lt)
        else:
            layout, targets = self._multi_label_layout(rng, pools, lt)
        self.layout = layout
        self._targets = targets
        self._check_not_empty()

    # ------------------------------------------------------------------ composition
    def _multi_label_layout(self, rng, pools, imbalance):
        C, cells = 10, self.grid * self.grid
        w = np.ones(C) if imbalance is None else imbalance ** (np.arange(C) / (C - 1))
        p = w / w.sum()
        layout = np.full((self.n, cells), -1, dtype=np.int64)
        targets = torch.zeros(self.n, C, dtype=torch.float32)
        for i in range(self.n):
            k = int(rng.integers(self.min_digits, self.max_digits + 1))
            classes = rng.choice(C, size=k, replace=False, p=p)
            where = rng.choice(cells, size=k, replace=False)
            for c, cell in zip(classes, where):
                pool = pools[c]
                layout[i, cell] = pool[rng.integers(len(pool))]
                targets[i, int(c)] = 1.0
        return layout, targets

    def _single_label_layout(self, rng, pools, imbalance):
        C_split = self.num_base if (self.num_base is not None and self.split == "train") else 10
        if self.n < C_split:
            raise ValueError(f"DigitMosaics: n={self.n} is fewer than the {C_split} classes of the {self.split} split")
        if imbalance is not None:
            counts = lt_counts(self.n // C_split, C_split, imbalance)
        else:
            counts = [self.n // C_split + (1 if c < self.n % C_split else 0) for c in range(C_split)]
        classes = np.repeat(np.arange(C_split), counts)
        classes = classes[rng.permutation(len(classes))]
        cells = rng.integers(self.grid * self.grid, size=len(classes))
        layout = np.full((len(classes), self.grid * self.grid), -1, dtype=np.int64)
        for i, (c, cell) in enumerate(zip(classes, cells)):
            pool = pools[c]
            layout[i, cell] = pool[rng.integers(len(pool))]
        return layout, torch.from_numpy(classes.astype(np.int64))

    # ------------------------------------------------------------------ rendering
    @staticmethod
    def scans() -> Tuple[np.ndarray, np.ndarray]:
        """All 1,797 scans (1797, 8, 8) uint8 (0..255) and their digits (1797,) int64 (read-only)."""
        return _digits()

    @staticmethod
    def pool(split: str) -> List[np.ndarray]:
        """The scan indices of each digit in ``split``'s pool (10 sorted int64 arrays)."""
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        return list(_pools()[split])

    def canvas(self, index: int) -> np.ndarray:
        """The unscaled canvas of item ``index``: (grid * 8, grid * 8) uint8."""
        images, _ = _digits()
        g = self.grid
        out = np.zeros((g * 8, g * 8), dtype=np.uint8)
        for cell, scan in enumerate(self.layout[index]):
            if scan >= 0:
                r, c = divmod(cell, g)
                out[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = images[scan]
        return out

    def _load_image(self, index: int):
        from PIL import Image

        im = Image.fromarray(self.canvas(index))  # 2-D uint8 -> mode "L"
        if im.size != (self.image_size, self.image_size):
            im = im.resize((self.image_size, self.image_size), Image.NEAREST)
        return im.convert("RGB")

    @property
    def items(self) -> List[str]:
        return [f"digits-{self.split}-{i}" for i in range(len(self))]

    def verify(self, progress: bool = True) -> int:
        """Nothing to verify (no files): returns 0."""
        return 0

    def describe(self) -> str:
        lt = f", imbalance {self.imbalance}" if self.imbalance is not None and self.split == "train" else ""
        return super().describe() + f", seed {self.seed}{lt}"
