"""A feature cache for frozen-encoder models (Candle): encode a dataset once, train from the features.

    feats = cache_features(model.encode_image, train_ds, path="cache/train.pt", key=fingerprint)
    loader = DataLoader(feats, batch_size=256, shuffle=True)     # (feature (d,), target)

The cache file is a ``torch.save``'d dict ``{"format", "key", "features", "labels",
"classnames", "multi_label", "num_base"}``, written atomically (a temporary file in the
same folder, then ``os.replace``), so an interrupted run never leaves a half-written cache.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader

from ._base import LabelledData, logger

__all__ = ["FeatureDataset", "cache_features"]

_FORMAT = 1


class FeatureDataset(LabelledData):
    """Precomputed features with their targets; items are ``(feature (d,) float32, target)``.

    Args:
        features: (N, d) float32 (converted, on the CPU).
        labels: (N, C) float32 multi-hot (multi-label; -1 = ignore) or (N,) int64 (single-label).
        classnames: the C class names.
        multi_label: the kind of ``labels``.
        num_base: the base classes of a base/new split, or None.
        split, source: names for :meth:`describe`.
    """

    name = "features"

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str], multi_label: bool,
                 num_base: Optional[int] = None, split: str = "", source: str = ""):
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            raise ValueError(f"features must be a (N, d) tensor, got {getattr(features, 'shape', type(features))}")
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if not isinstance(multi_label, bool):
            raise TypeError(f"multi_label must be a bool, got {type(multi_label).__name__}")
        C = len(classnames)
        if multi_label and (labels.dim() != 2 or labels.shape[1] != C):
            raise ValueError(f"labels must be (N, C={C}) for multi-label data, got {tuple(labels.shape)}")
        if not multi_label and (labels.dim() != 1 or labels.dtype != torch.int64):
            raise ValueError(f"labels must be (N,) int64 for single-label data, "
                             f"got {tuple(labels.shape)} {labels.dtype}")
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"features ({features.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        self.features = features.detach().to("cpu", torch.float32).contiguous()
        self._targets = labels.detach().cpu()
        self.classnames: List[str] = list(classnames)
        self.multi_label = multi_label
        self.num_base = num_base
        self.split, self.source = split, source
        self.bad_items: list = []
        self.transform = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def __getitem__(self, index: int):
        return self.features[index], self._targets[index].clone()

    @property
    def dim(self) -> int:
        """d, the feature size."""
        return int(self.features.shape[1])

    def describe(self) -> str:
        kind = "multi-label" if self.multi_label else "single-label"
        return (f"{self.name} {self.split!r} ({self.source}): {len(self)} x {self.dim} features, "
                f"{self.num_classes} classes, {kind}")


def _load(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"feature cache {path} cannot be read ({type(e).__name__}: {e}); "
                         "delete it to re-encode") from e


def cache_features(encode: Callable[[torch.Tensor], torch.Tensor], dataset, path: Optional[str] = None,
                   key: str = "", batch_size: int = 64, num_workers: int = 0, device="cpu",
                   desc: str = "encoding") -> FeatureDataset:
    """Encode ``dataset`` once with ``encode`` and return (and optionally cache) the features.

    ``encode(images)`` gets each batch (B, 3, S, S) on ``device`` (the dataset's transform
    must make tensors) and returns (B, d); it runs under ``torch.no_grad()`` over the
    dataset in order (a DataLoader, no shuffling; a tqdm bar). The features are kept as
    float32 on the CPU; the labels are ``dataset.labels()``.

    With ``path``: if the file holds a cache with the same ``key`` (the caller's fingerprint
    of the encoder, weights, transform and data) and the same labels and classnames, it is
    loaded and nothing is encoded. Otherwise (no file, another key, or the data changed:
    logged) the dataset is encoded and the file (over)written atomically. A file that
    cannot be read raises ValueError naming it (it is not silently replaced).

    Returns:
        :class:`FeatureDataset` with the dataset's classnames, multi_label and num_base.
    """
    if not callable(encode):
        raise TypeError(f"encode must be callable, got {type(encode).__name__}")
    if not isinstance(key, str):
        raise TypeError(f"key must be a string, got {type(key).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    for attr in ("labels", "classnames", "multi_label"):
        if not hasattr(dataset, attr):
            raise TypeError(f"dataset must be a vlssm.data dataset (no {attr!r}), got {type(dataset).__name__}")
    if getattr(dataset, "transform", None) is None:
        raise ValueError(f"dataset.transform is None: set a transform that makes image tensors "
                         f"(build_transform) before encoding {type(dataset).__name__}")
    labels = dataset.labels()
    classnames = list(dataset.classnames)
    multi_label = bool(dataset.multi_label)
    num_base = getattr(dataset, "num_base", None)
    split, source = getattr(dataset, "split", ""), getattr(dataset, "source", "")

    if path is not None:
        path = os.fspath(path)
        if os.path.isfile(path):
            blob = _load(path)
            if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
                raise ValueError(f"feature cache {path} is not a vlssm feature cache (format {_FORMAT}); "
                                 f"delete it or choose another path")
            if blob.get("key") != key:
                logger.info("feature cache %s was made with another key: re-encoding %d items", path, len(dataset))
            elif (blob["classnames"] != classnames or blob["multi_label"] != multi_label
                  or blob["labels"].shape != labels.shape or not torch.equal(blob["labels"], labels)):
                logger.warning("feature cache %s has the same key but other labels / classnames than the "
                               "dataset: re-encoding %d items", path, len(dataset))
            else:
                logger.info("feature cache %s: loaded %d features", path, blob["features"].shape[0])
                return FeatureDataset(blob["features"], blob["labels"], blob["classnames"], blob["multi_label"],
                                      blob["num_base"], split, f"cache {path}")

    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks = []
    with torch.no_grad():
        for images, _ in tqdm(loader, desc=desc, total=len(loader), unit="batch"):
            out = encode(images.to(device))
            if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != images.shape[0]:
                raise ValueError(f"encode must return a (B={images.shape[0]}, d) tensor, got "
                                 f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
            chunks.append(out.detach().to("cpu", torch.float32))
    features = torch.cat(chunks)
    result = FeatureDataset(features, labels, classnames, multi_label, num_base, split, source)

    if path is not None:
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
        blob = {"format": _FORMAT, "key": key, "features": result.features, "labels": labels,
                "classnames": classnames, "multi_label": multi_label, "num_base": num_base}
        try:
            torch.save(blob, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        logger.info("feature cache %s: wrote %d x %d features", path, *result.features.shape)
    return result
