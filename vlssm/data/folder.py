"""Single-label image folders (torchvision's ImageFolder layout) with a base/new class split and a long tail.

Layout::

    root[/split]/<class name>/<image file>

The setting of Candle's base-to-new / long-tailed experiments.
"""
from __future__ import annotations

import os
from typing import List, Optional

import numpy as np
import torch

from ._base import (
    IMG_EXTENSIONS,
    MultiLabelDataset,
    check_bool,
    check_imbalance,
    check_path_arg,
    logger,
    lt_counts,
    read_classnames,
)

__all__ = ["FolderDataset"]


class FolderDataset(MultiLabelDataset):
    """Single-label images in ``root[/split]/<class>/<image>``; targets are int64 class indices.

    Classes: the sorted subfolder names (or ``classnames``, e.g. the training split's, when
    given: every subfolder must then be one of them; a class without a subfolder has no
    image). Images: files whose name ends in an image suffix (torchvision's ImageFolder
    set: .jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, any case), sorted by name; other
    files (``.DS_Store``, notes) are not images and are passed over, as ImageFolder does.
    Files in deeper folders are not read.

    Base/new split: the first ``num_base`` classes (or ``round(C * base_ratio)``) in class
    order are the base classes, the rest the new ones. With ``train=True`` only base-class
    images are kept (the new classes are unseen in training); with ``train=False`` all classes.

    Long tail (``imbalance=r`` in (0, 1], ``train=True`` only): with ``b`` training classes
    (the base classes, or all C) and ``n_max`` the largest of their image counts, class ``i``
    keeps ``n_i = max(1, int(n_max * r ** (i / (b - 1))))`` images (the CIFAR-LT formula; class
    0 the head), a uniformly random choice (numpy, ``seed``) of its images kept in name
    order. A class with fewer than ``n_i`` images keeps all (a warning is logged). An
    evaluation split (``train=False``) is never subsampled: it stays balanced, as in the
    long-tailed benchmarks.

    Args:
        root: the folder (holding ``split`` when given).
        split: a subfolder of ``root`` holding the class folders, or None (``root`` itself).
        classnames: None (the sorted subfolders), a list, or a text file of names.
        num_base / base_ratio: the base/new split (at most one; None: no split).
        imbalance, seed: the long tail of a training split (above).
        train: a training split (base classes only, imbalance applied) or an evaluation one.
        transform, skip_bad: see :class:`MultiLabelDataset`.

    Raises:
        ValueError: a missing folder; a subfolder not among ``classnames``; no image at all;
            bad ``num_base`` / ``base_ratio`` / ``imbalance``.
    """

    name = "folder"

    def __init__(self, root, split: Optional[str] = None, *, classnames=None, num_base: Optional[int] = None,
                 base_ratio: Optional[float] = None, imbalance: Optional[float] = None, seed: int = 0,
                 train: bool = False, transform=None, skip_bad: bool = False):
        root = check_path_arg("root", root)
        if split is not None and (not isinstance(split, str) or not split):
            raise TypeError(f"split must be a non-empty string or None, got {split!r}")
        train = check_bool("train", train)
        imbalance = check_imbalance(imbalance)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        folder = os.path.join(root, split) if split is not None else root
        if not os.path.isdir(folder):
            raise ValueError(f"folder: {folder} is not a folder (expected {folder}/<class>/<image>)")
        subdirs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if classnames is None:
            names = subdirs
            if not names:
                raise ValueError(f"folder: {folder} has no class subfolders (expected {folder}/<class>/<image>)")
        else:
            names = read_classnames(classnames)
            unknown = [d for d in subdirs if d not in names]
            if unknown:
                raise ValueError(f"folder: {os.path.join(folder, unknown[0])} is a class folder not among the "
                                 f"{len(names)} classnames")
        C = len(names)
        if num_base is not None and base_ratio is not None:
            raise ValueError("give num_base or base_ratio, not both")
        if base_ratio is not None:
            if isinstance(base_ratio, bool) or not isinstance(base_ratio, (int, float)) or not 0 < base_ratio <= 1:
                raise ValueError(f"base_ratio must be a number in (0, 1], got {base_ratio!r}")
            num_base = int(round(C * base_ratio))
            if num_base < 1:
                raise ValueError(f"base_ratio={base_ratio} of {C} classes leaves no base class")
        super().__init__(names, multi_label=False, split=split or os.path.basename(os.path.normpath(root)),
                         source=folder, num_base=num_base, transform=transform, skip_bad=skip_bad)
        self.root, self.folder, self.train = root, folder, train
        self.imbalance, self.seed = imbalance, seed

        per_class: List[List[str]] = []
        for c in names:
            d = os.path.join(folder, c)
            files = sorted(e.name for e in os.scandir(d) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)) \
                if os.path.isdir(d) else []
            per_class.append([os.path.join(d, f) for f in files])
        if not any(per_class):
            raise ValueError(f"folder: no image file under {folder}/<class>/ (suffixes {' '.join(IMG_EXTENSIONS)})")

        b = C
        if train and num_base is not None:
            b = num_base
            per_class = per_class[:b] + [[] for _ in range(C - b)]
        if train and imbalance is not None:
            n_max = max(len(per_class[i]) for i in range(b))
            want = lt_counts(n_max, b, imbalance)
            rng = np.random.default_rng(seed)
            for i in range(b):
                have = len(per_class[i])
                if have > want[i]:
                    pick = np.sort(rng.choice(have, size=want[i], replace=False))
                    per_class[i] = [per_class[i][j] for j in pick]
                elif have < want[i]:
                    logger.warning("folder %s: class %r has %d images, fewer than the %d of the long tail: keeping all",
                                   folder, names[i], have, want[i])
        paths = [p for files in per_class for p in files]
        targets = torch.tensor([c for c, files in enumerate(per_class) for _ in files], dtype=torch.int64)
        self._set_items(paths, targets)
