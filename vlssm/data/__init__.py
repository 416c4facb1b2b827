"""vlssm.data: datasets, transforms and a feature cache for the multi-label recognition models.

Readers, each returning ``(image, target)`` with the class names in file order:

- :class:`DigitMosaics` (``"demo"``): multi-label mosaics of scikit-learn's bundled
  handwritten digits; no download, the default dataset of ``vlssm train``;
- :class:`COCODataset` (``"coco"``): MS-COCO 2014 / 2017 instances json + images; COCO-LT via ``ids_file``;
- :class:`VOCDataset` (``"voc"``): PASCAL VOC 2007 / 2012 XMLs, difficult objects positive /
  negative / ignored; VOC-LT via ``ids_file``;
- :class:`ListDataset` (``"list"``): ``path idx idx ...`` list files (NUS-WIDE, the LT repos' lists);
- :class:`CSVDataset` (``"csv"``): ``path,label;label`` CSVs;
- :class:`FolderDataset` (``"folder"``): single-label ImageFolder trees with a base/new split
  and an imbalance ratio (Candle).

Targets: multi-label -> float32 (C,) of 1 / 0 / -1 (-1: ignore, VOC ``difficult="ignore"``);
single-label -> int64 class index. :func:`frequency_groups` gives the head / medium / tail
classes of a training split's :meth:`~MultiLabelDataset.class_counts`.
:func:`build_transform` makes CLIP's preprocessing and the training augmentation;
:func:`cache_features` encodes a dataset once for frozen-encoder models.
:func:`build_dataset`, :func:`add_data_arguments` and :func:`datasets_from_args` build them by
name / from the command line.

Bad input (a missing or corrupt image, an unknown class, an empty split, a bad line) raises
ValueError naming the file (and line); ``skip_bad=True`` (``--skip-bad``) drops, logs (logger
``"vlssm.data"``) and counts (``bad_items``) the bad items instead.
"""
from __future__ import annotations

from ._base import MultiLabelDataset, frequency_groups
from .build import DATASETS, DEFAULT_SPLITS, add_data_arguments, build_dataset, datasets_from_args
from .cache import FeatureDataset, cache_features
from .coco import COCODataset
from .demo import DigitMosaics
from .folder import FolderDataset
from .listfile import CSVDataset, ListDataset
from .transforms import AUGMENTS, CLIP_MEAN, CLIP_STD, build_transform
from .voc import DIFFICULT_MODES, VOC_CLASSES, VOCDataset

__all__ = [
    "MultiLabelDataset", "DigitMosaics", "COCODataset", "VOCDataset", "ListDataset", "CSVDataset", "FolderDataset",
    "FeatureDataset", "cache_features", "build_dataset", "build_transform", "add_data_arguments",
    "datasets_from_args", "frequency_groups", "DATASETS", "DEFAULT_SPLITS", "AUGMENTS", "CLIP_MEAN", "CLIP_STD",
    "VOC_CLASSES", "DIFFICULT_MODES",
]
