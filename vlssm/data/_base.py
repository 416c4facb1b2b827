"""The dataset base class and the helpers every reader shares.

Conventions (every dataset in :mod:`vlssm.data`):

- ``classnames``: the label order, fixed by the source ("file order").
- ``multi_label=True``: a target is a float32 tensor (C,) holding 1.0 (present), 0.0
  (absent) or -1.0 (**ignore**: VOC's difficult-only classes under ``difficult="ignore"``;
  the losses' and metrics' ``ignore_index=-1``). ``multi_label=False``: a target is an
  int64 0-dim tensor, the class index.
- ``labels()`` gives every target at once, without reading an image.
- Bad input raises ``ValueError`` naming the file (and line, where there is one). With
  ``skip_bad=True`` the bad items are dropped instead, each recorded in ``bad_items`` as
  ``(path, reason)`` and counted in a warning on the ``"vlssm.data"`` logger.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

__all__ = ["MultiLabelDataset", "frequency_groups", "logger"]

logger = logging.getLogger("vlssm.data")

#: Image file suffixes recognised where a folder is listed (torchvision's ImageFolder set).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def frequency_groups(counts, head_min: int = 100, tail_below: int = 20) -> Dict[str, torch.Tensor]:
    """The head / medium / tail split of the long-tailed benchmarks from training-set class counts.

    Args:
        counts: (C,) training images per class (e.g. ``train_ds.class_counts()``).
        head_min, tail_below: head is ``count >= 100``, tail ``count < 20``, medium the rest
            (the VOC-LT / COCO-LT convention).

    Returns:
        ``{"head", "medium", "tail"}`` -> int64 tensors of class indices (ascending, possibly
        empty); computed by :func:`vlssm.metrics.split_by_frequency`.
    """
    from ..metrics import split_by_frequency

    return split_by_frequency(counts, head_min=head_min, tail_below=tail_below)


def load_rgb(path: str):
    """Open ``path`` as an RGB PIL image (decoded fully); any failure -> ValueError naming the path."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot read image file {path}: {type(e).__name__}: {e}") from e


def multi_hot(index_lists: Sequence[Iterable[int]], num_classes: int) -> torch.Tensor:
    """Index lists -> (N, C) float32 multi-hot (indices already validated)."""
    t = torch.zeros(len(index_lists), num_classes, dtype=torch.float32)
    for i, idx in enumerate(index_lists):
        idx = list(idx)
        if idx:
            t[i, idx] = 1.0
    return t


def read_text_lines(path: str, what: str) -> List[Tuple[int, str]]:
    """``(line number, stripped text)`` of the non-blank, non-``#`` lines of a text file."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} does not exist (or is not a file)")
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            s = line.strip()
            if s and not s.startswith("#"):
                out.append((n, s))
    return out


def read_classnames(classnames, what: str = "classnames") -> List[str]:
    """A list of class names, or a path to a text file with one name per line (blank / # lines skipped)."""
    if isinstance(classnames, (str, os.PathLike)):
        path = os.fspath(classnames)
        names = [s for _, s in read_text_lines(path, f"{what} file")]
        src = f"{what} file {path}"
    elif isinstance(classnames, Sequence):
        names = list(classnames)
        src = what
        for i, c in enumerate(names):
            if not isinstance(c, str) or not c.strip():
                raise TypeError(f"{what}[{i}] must be a non-empty string, got {c!r}")
    else:
        raise TypeError(f"{what} must be a list of names or a path to a text file, got {type(classnames).__name__}")
    if not names:
        raise ValueError(f"{src} is empty: need at least one class name")
    seen = set()
    for c in names:
        if c in seen:
            raise ValueError(f"{src} names class {c!r} twice")
        seen.add(c)
    return names


def check_bool(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def check_imbalance(v) -> Optional[float]:
    """``None`` or a ratio r in (0, 1]."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"imbalance must be a number in (0, 1], got {type(v).__name__}")
    if not 0.0 < float(v) <= 1.0:
        raise ValueError(f"imbalance must be in (0, 1] (r = n_min / n_max), got {v}")
    return float(v)


def lt_counts(n_max: int, num_classes: int, imbalance: float) -> List[int]:
    """Per-class sizes of an exponentially imbalanced set: ``n_i = max(1, int(n_max * r**(i / (C - 1))))``.

    The formula of the CIFAR-LT / ImageNet-LT protocols (Cao et al., LDAM, ``img_max *
    imb_factor ** (cls_idx / (cls_num - 1))`` truncated by ``int``); class 0 is the head. With
    one class, ``n_0 = n_max``.
    """
    if num_classes == 1:
        return [n_max]
    return [max(1, int(n_max * imbalance ** (i / (num_classes - 1)))) for i in range(num_classes)]


class LabelledData(Dataset):
    """What every dataset here (images or cached features) answers without reading an item: its
    ``classnames``, ``multi_label`` and targets ``_targets`` ((N, C) float32 with -1 = ignore, or (N,)
    int64), set by the subclass."""

    classnames: List[str]
    multi_label: bool
    _targets: torch.Tensor

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def labels(self) -> torch.Tensor:
        """Every target, without reading an item: (N, C) float32 (multi-label) or (N,) int64."""
        return self._targets.clone()

    def class_counts(self) -> List[int]:
        """Items per class in this split (positives only: 0 and -1 do not count); length C."""
        if self.multi_label:
            return [int(v) for v in (self._targets == 1).sum(0).tolist()]
        return [int(v) for v in torch.bincount(self._targets, minlength=self.num_classes).tolist()]


class MultiLabelDataset(LabelledData):
    """Base of every image dataset here: ``(image, target)`` items with class names in file order.

    Subclasses fill ``paths`` (one image file per item) and the targets through
    :meth:`_set_items`, or override :meth:`_load_image` (the demo mosaics render in memory).

    Attributes:
        classnames: list of C class names, the label order.
        multi_label: targets are multi-hot float32 (C,) (True) or int64 class indices (False).
        num_base: the first ``num_base`` classes are the base classes of a base/new split, or None.
        transform: applied to the RGB PIL image in ``__getitem__`` (None: the PIL image itself).
        split, source: the split's name and where it was read from (for messages).
        paths: image file per item (file-backed datasets).
        bad_items: ``(path, reason)`` of each item dropped under ``skip_bad``.
    """

    #: a short name for messages and :meth:`describe`
    name = "dataset"

    def __init__(self, classnames: Sequence[str], *, multi_label: bool = True, split: str = "",
                 source: str = "", num_base: Optional[int] = None,
                 transform: Optional[Callable] = None, skip_bad: bool = False):
        self.classnames = list(classnames)
        self.multi_label = check_bool("multi_label", multi_label)
        self.skip_bad = check_bool("skip_bad", skip_bad)
        self.split = split
        self.source = source
        if num_base is not None:
            if isinstance(num_base, bool) or not isinstance(num_base, int):
                raise TypeError(f"num_base must be an int or None, got {type(num_base).__name__}")
            if not 1 <= num_base <= len(self.classnames):
                raise ValueError(f"num_base must be in [1, C={len(self.classnames)}], got {num_base}")
        self.num_base = num_base
        self.transform = transform
        self.paths: List[str] = []
        self.bad_items: List[Tuple[str, str]] = []
        self._targets = torch.zeros(0, len(self.classnames)) if multi_label else torch.zeros(0, dtype=torch.int64)

    # ----------------------------------------------------------------- construction helpers
    def _set_items(self, paths: List[str], targets: torch.Tensor, *, check_files: bool = True) -> List[int]:
        """Set the items; check (cheaply) that each image file exists; refuse an empty split.

        A missing file raises ValueError naming it, or with ``skip_bad`` is dropped into
        ``bad_items`` (and the count logged as a warning). Returns the indices kept.
        """
        if len(paths) != targets.shape[0]:
            raise AssertionError("paths and targets differ in length")
        keep = list(range(len(paths)))
        if check_files:
            keep = []
            missing = []
            for i, p in enumerate(paths):
                if os.path.isfile(p):
                    keep.append(i)
                else:
                    missing.append(p)
            if missing:
                if not self.skip_bad:
                    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
                    raise ValueError(f"{self.name} {self.split!r} ({self.source}): image file {missing[0]} does "
                                     f"not exist{more}; pass skip_bad=True (--skip-bad) to drop missing images")
                self._record_bad([(p, "missing file") for p in missing])
                paths = [paths[i] for i in keep]
                targets = targets[torch.tensor(keep, dtype=torch.int64)] if keep else targets[:0]
        self.paths = list(paths)
        self._targets = targets
        self._check_not_empty()
        return keep

    def _record_bad(self, bad: List[Tuple[str, str]]) -> None:
        if not bad:
            return
        self.bad_items.extend(bad)
        logger.warning("%s %r (%s): skipped %d bad item(s), e.g. %s: %s", self.name, self.split, self.source,
                       len(bad), bad[0][0], bad[0][1])

    def _check_not_empty(self) -> None:
        if len(self) == 0:
            extra = f" after skipping {len(self.bad_items)} bad item(s)" if self.bad_items else ""
            raise ValueError(f"{self.name}: split {self.split!r} of {self.source} is empty (0 images{extra})")

    # ----------------------------------------------------------------- Dataset protocol
    def __len__(self) -> int:
        return int(self._targets.shape[0])

    def _load_image(self, index: int):
        """The RGB PIL image of item ``index``; an unreadable file -> ValueError naming the path."""
        return load_rgb(self.paths[index])

    def __getitem__(self, index: int):
        """``(image, target)``: ``transform(PIL RGB image)`` (or the PIL image when transform is None),
        and a float32 (C,) multi-hot (1 / 0 / -1 = ignore) or an int64 0-dim class index."""
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"{self.name}: index {index} out of range for {n} items")
        image = self._load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self._targets[index].clone()

    # ----------------------------------------------------------------- labels
    @property
    def items(self) -> List[str]:
        """One name per item: its image path (file datasets)."""
        return list(self.paths)

    def describe(self) -> str:
        """One line: name, split, source, N, C, label kind (and skipped items)."""
        kind = "multi-label" if self.multi_label else "single-label"
        base = f", {self.num_base} base classes" if self.num_base is not None else ""
        bad = f", {len(self.bad_items)} bad items skipped" if self.bad_items else ""
        return (f"{self.name} {self.split!r} ({self.source}): {len(self)} images, {self.num_classes} classes, "
                f"{kind}{base}{bad}")

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"

    # ----------------------------------------------------------------- verification
    def verify(self, progress: bool = True) -> int:
        """Open every image with PIL (fully decoded) and drop the unreadable ones into ``bad_items``.

        A Dataset cannot drop an item lazily in ``__getitem__`` (its length is fixed), so
        without this a corrupt file raises ValueError (naming the path) when it is read.
        ``--skip-bad`` (:func:`build_dataset` with ``skip_bad=True``) runs this at build time.
        Returns the number of items dropped; raises ValueError if none is left.
        """
        if not self.paths:
            return 0
        from tqdm import tqdm

        keep, bad = [], []
        for i, p in enumerate(tqdm(self.paths, desc=f"verifying {self.name} {self.split}", disable=not progress,
                                   unit="img")):
            try:
                load_rgb(p)
                keep.append(i)
            except ValueError as e:
                bad.append((p, str(e)))
        if bad:
            self._record_bad(bad)
            self.paths = [self.paths[i] for i in keep]
            self._targets = self._targets[torch.tensor(keep, dtype=torch.int64)] if keep else self._targets[:0]
            self._subset_extra(keep)
            self._check_not_empty()
        return len(bad)

    def _subset_extra(self, keep: List[int]) -> None:
        """Keep a subclass's per-item side lists aligned when :meth:`verify` drops items."""


def read_ids_file(path: str) -> List[Tuple[int, str]]:
    """``(line number, id token)`` per line of a long-tailed split's id list (VOC-LT / COCO-LT).

    A line's id is its first whitespace-separated token (so a list file ``path idx idx ...``
    serves as an id list too); blank lines and lines starting with ``#`` are skipped.
    """
    return [(n, s.split()[0]) for n, s in read_text_lines(path, "ids_file")]


def check_path_arg(name: str, v, *, required: bool = True) -> Optional[str]:
    if v is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if not isinstance(v, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, got {type(v).__name__}")
    return os.fspath(v)
