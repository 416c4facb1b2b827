"""Build datasets by name, and the data options of ``vlssm train`` (argparse).

    ds = build_dataset("voc", "test", root="data/VOC2007", image_size=448, difficult="ignore")

    add_data_arguments(parser)
    args = parser.parse_args()
    try:
        train_ds, val_ds = datasets_from_args(args, image_size=224)
    except ValueError as e:
        parser.error(str(e))
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

from .._argtypes import nonneg_int, positive_int, ratio
from ._base import MultiLabelDataset
from .transforms import AUGMENTS, build_transform

__all__ = ["DATASETS", "DEFAULT_SPLITS", "build_dataset", "add_data_arguments", "datasets_from_args"]

DATASETS = ("demo", "coco", "voc", "list", "csv", "folder")
#: (train split, validation split) of each kind when --train-split / --val-split are not given
DEFAULT_SPLITS = {"demo": ("train", "test"), "coco": ("train2014", "val2014"), "voc": ("trainval", "test"),
                  "list": ("train", "val"), "csv": ("train", "val"), "folder": ("train", "val")}
#: mosaics in the demo's train split when --demo-size is not given (the test split: a quarter)
DEMO_TRAIN_SIZE = 2000


def _construct(name: str, split: str, root, train: bool, skip_bad: bool, image_size: int, options: dict):
    from .coco import COCODataset
    from .demo import DigitMosaics
    from .folder import FolderDataset
    from .listfile import CSVDataset, ListDataset
    from .voc import VOCDataset

    if name == "demo":
        if root is not None:
            raise ValueError("the demo dataset (sklearn's digits) reads no files: it takes no root (--data-root)")
        if skip_bad:
            raise ValueError("the demo dataset reads no files: skip_bad (--skip-bad) does not apply")
        options.setdefault("image_size", image_size)
        return DigitMosaics(split=split, **options)
    if name == "coco":
        if root is None and ("ann_file" not in options or "image_dir" not in options):
            raise ValueError("dataset 'coco' needs root (--data-root: the folder holding annotations/ and "
                             "the image folders)")
        return COCODataset(root, split, skip_bad=skip_bad, **options)
    if name == "voc":
        if root is None:
            raise ValueError("dataset 'voc' needs root (--data-root: the VOC2007 / VOC2012 folder)")
        return VOCDataset(root, split, skip_bad=skip_bad, **options)
    if name == "folder":
        if root is None:
            raise ValueError("dataset 'folder' needs root (--data-root: the folder holding <split>/<class>/<image>)")
        return FolderDataset(root, split, train=train, skip_bad=skip_bad, **options)
    file_key = "list_file" if name == "list" else "csv_file"
    if options.get(file_key) is None:
        raise ValueError(f"dataset {name!r} needs {file_key} (--train-list / --val-list) for split {split!r}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs root (--data-root: the folder the paths in the {name} file are "
                         f"relative to)")
    if name == "list":
        if options.get("classnames") is None:
            raise ValueError("dataset 'list' needs classnames (--classnames FILE: one class name per line, in "
                             "index order)")
        return ListDataset(options.pop("list_file"), root, options.pop("classnames"), split=split,
                           skip_bad=skip_bad, **options)
    return CSVDataset(options.pop("csv_file"), root, options.pop("classnames", None), split=split,
                      skip_bad=skip_bad, **options)


def build_dataset(name: str, split: str, *, root=None, image_size: int = 224, train: bool = False,
                  augment: str = "default", skip_bad: bool = False, **options) -> MultiLabelDataset:
    """One split of a dataset by name, with its transform (:func:`build_transform`).

    Args:
        name: one of :data:`DATASETS`: ``"demo"`` (:class:`DigitMosaics`; no root; ``image_size``
            is also the mosaics' render size unless given in ``options``), ``"coco"``
            (:class:`COCODataset`), ``"voc"`` (:class:`VOCDataset`), ``"list"``
            (:class:`ListDataset`: ``list_file=``, ``classnames=``; ``root`` = the image root),
            ``"csv"`` (:class:`CSVDataset`: ``csv_file=``, optional ``classnames=``), ``"folder"``
            (:class:`FolderDataset`, given ``train``).
        split: the split's name (a COCO / VOC split, a demo / folder split; a label for list / csv).
        root: the dataset folder.
        image_size, train, augment: the transform (``augment`` is read for training only).
        skip_bad: drop missing images (and bad lines / annotations) at construction, then open
            every image (:meth:`MultiLabelDataset.verify`, a progress bar) and drop unreadable ones.
        options: passed to the dataset's constructor.

    Raises:
        ValueError: an unknown ``name`` (listing DATASETS), a missing root / file, an empty split
            (naming the split and the source), and the readers' errors.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if not isinstance(split, str) or not split:
        raise TypeError(f"split must be a non-empty string, got {split!r}")
    build_transform(image_size, train, augment)  # check the transform's arguments before reading any file
    ds = _construct(name, split, root, train, skip_bad, image_size, dict(options))
    if skip_bad:
        ds.verify()
    if len(ds) == 0:  # the readers refuse an empty split already; kept as the contract of this function
        raise ValueError(f"split {split!r} of {ds.source} is empty")
    ds.transform = build_transform(image_size, train, augment, multi_label=ds.multi_label)
    return ds


# ------------------------------------------------------------------------------------- argparse
def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the data options (an argument group "data") to ``parser``; returns it."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", choices=DATASETS, default="demo",
                   help="dataset kind (default: demo, multi-label mosaics of scikit-learn's bundled digits)")
    g.add_argument("--data-root", metavar="PATH", default=None,
                   help="dataset folder: COCO root (annotations/, train2014/, ...), the VOC2007/VOC2012 folder, "
                        "the image root of --data list/csv, the folder of --data folder")
    g.add_argument("--val-root", metavar="PATH", default=None,
                   help="dataset folder of the validation split when it differs (e.g. VOC-LT: train on VOC2012, "
                        "test on VOC2007); default: --data-root")
    g.add_argument("--train-split", default=None,
                   help="train split (defaults: " + ", ".join(f"{k} {v[0]}" for k, v in DEFAULT_SPLITS.items()) + ")")
    g.add_argument("--val-split", default=None,
                   help="validation split (defaults: " + ", ".join(f"{k} {v[1]}" for k, v in DEFAULT_SPLITS.items())
                        + ")")
    g.add_argument("--train-list", metavar="FILE", default=None,
                   help="--data list: the train list file (path idx idx ...); "
                        "--data csv: the train CSV (path,label;label)")
    g.add_argument("--val-list", metavar="FILE", default=None, help="the validation list file / CSV")
    g.add_argument("--classnames", metavar="FILE", default=None,
                   help="class names, one per line in index order (required for --data list; for csv default: "
                        "the sorted names the train CSV uses)")
    g.add_argument("--ids-file", metavar="FILE", default=None,
                   help="COCO-LT / VOC-LT: image ids of the long-tailed train split, one per line (--data coco/voc)")
    g.add_argument("--difficult", choices=("positive", "negative", "ignore"), default=None,
                   help="VOC objects marked difficult: a class seen only on them is positive (default, ML-GCN/ASL), "
                        "negative, or ignored (target -1)")
    g.add_argument("--imbalance", metavar="R", type=ratio, default=None,
                   help="long-tail the train split with ratio R in (0, 1]: n_i = n_max * R^(i/(C-1)) "
                        "(--data demo / folder)")
    g.add_argument("--num-base", metavar="B", type=positive_int, default=None,
                   help="base/new split: the first B classes are base, the only ones trained on "
                        "(--data folder, --data demo --single-label)")
    g.add_argument("--demo-size", metavar="N", type=positive_int, default=None,
                   help=f"--data demo: train mosaics (default {DEMO_TRAIN_SIZE}); "
                        "the test split has N // 4 (at least 10)")
    g.add_argument("--augment", choices=AUGMENTS, default="default",
                   help="training augmentation: default (random resized crop + flip + RandAugment), flip, none")
    g.add_argument("--workers", metavar="N", type=nonneg_int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader worker processes (default: min(4, CPU count))")
    g.add_argument("--skip-bad", action="store_true",
                   help="drop missing / unreadable images and bad list lines or annotations (logged and counted; "
                        "every image is opened once at start) instead of stopping with an error")
    g.add_argument("--single-label", action="store_true",
                   help="--data demo: single-label digits (one per image; Candle)")
    return parser


_FLAG_KINDS = {  # option -> the kinds it applies to
    "val_root": ("coco", "voc", "list", "csv", "folder"),
    "train_list": ("list", "csv"), "val_list": ("list", "csv"), "classnames": ("list", "csv"),
    "ids_file": ("coco", "voc"), "difficult": ("voc",), "imbalance": ("demo", "folder"),
    "num_base": ("demo", "folder"), "demo_size": ("demo",), "single_label": ("demo",),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def datasets_from_args(args: argparse.Namespace, image_size: int, *,
                       single_label: Optional[bool] = None) -> Tuple[MultiLabelDataset, MultiLabelDataset]:
    """(train, validation) datasets from :func:`add_data_arguments`' options.

    The train split gets the training transform (``--augment``), the validation split the
    evaluation one. The validation split shares the train split's class names (CSV /
    folder classes are taken from the train split) and ``num_base``; ``--ids-file`` and
    ``--imbalance`` shape the train split only.

    Args:
        args: the parsed namespace.
        image_size: the model's input side.
        single_label: what the model needs: True (e.g. Candle's single-label mode), False
            (multi-label), or None (whatever the data are). For ``--data demo``, True selects
            the single-label digits.

    Raises:
        ValueError: an option that does not apply to ``--data``, a missing ``--data-root`` or
            file, data of the wrong kind for ``single_label``, the readers' errors; every
            message is self-contained (for ``parser.error``).
    """
    kind = args.data
    if kind not in DATASETS:
        raise ValueError(f"--data must be one of {', '.join(DATASETS)}, got {kind!r}")
    for opt, kinds in _FLAG_KINDS.items():
        v = getattr(args, opt, None)
        if v not in (None, False) and kind not in kinds:
            raise ValueError(f"{_flag(opt)} applies to --data {'/'.join(kinds)}, not --data {kind}")
    train_split = args.train_split or DEFAULT_SPLITS[kind][0]
    val_split = args.val_split or DEFAULT_SPLITS[kind][1]
    root = args.data_root
    val_root = getattr(args, "val_root", None) or root
    common = dict(image_size=image_size, augment=args.augment, skip_bad=args.skip_bad)

    if kind == "demo":
        single = bool(args.single_label) or single_label is True
        if single_label is False and single:
            raise ValueError("this model needs multi-label data: drop --single-label")
        if args.num_base is not None and not single:
            raise ValueError("--num-base with --data demo needs single-label digits (--single-label)")
        n_train = args.demo_size or DEMO_TRAIN_SIZE
        if args.data_root is not None:
            raise ValueError("--data demo reads no files: drop --data-root")
        if args.skip_bad:
            raise ValueError("--data demo reads no files: drop --skip-bad")
        opts = dict(single_label=single, num_base=args.num_base)
        common["skip_bad"] = False
        train = build_dataset("demo", train_split, train=True, n=n_train, imbalance=args.imbalance, **opts, **common)
        val = build_dataset("demo", val_split, train=False, n=max(10, n_train // 4), **opts, **common)
        return train, val

    if single_label is True and kind != "folder":
        raise ValueError(f"this model needs single-label data: --data {kind} is multi-label "
                         f"(use --data folder, or --data demo --single-label)")
    if single_label is False and kind == "folder":
        raise ValueError("this model needs multi-label data: --data folder is single-label")
    if root is None:
        raise ValueError(f"--data {kind} needs --data-root")
    for opt in ("data_root", "val_root"):
        p = getattr(args, opt, None)
        if p is not None and not os.path.isdir(p):
            raise ValueError(f"{_flag(opt)} {p} is not a folder")

    if kind == "coco":
        train = build_dataset("coco", train_split, root=root, train=True, ids_file=args.ids_file, **common)
        val = build_dataset("coco", val_split, root=val_root, train=False, **common)
    elif kind == "voc":
        difficult = args.difficult or "positive"
        train = build_dataset("voc", train_split, root=root, train=True, ids_file=args.ids_file,
                              difficult=difficult, **common)
        val = build_dataset("voc", val_split, root=val_root, train=False, difficult=difficult, **common)
    elif kind in ("list", "csv"):
        for opt in ("train_list", "val_list"):
            if getattr(args, opt) is None:
                raise ValueError(f"--data {kind} needs {_flag(opt)} (the {'list file' if kind == 'list' else 'CSV'} "
                                 f"of the {'train' if opt == 'train_list' else 'validation'} split)")
        if kind == "list" and args.classnames is None:
            raise ValueError("--data list needs --classnames FILE (one class name per line, in index order)")
        key = "list_file" if kind == "list" else "csv_file"
        train = build_dataset(kind, train_split, root=root, train=True, classnames=args.classnames,
                              **{key: args.train_list}, **common)
        val = build_dataset(kind, val_split, root=val_root, train=False, classnames=train.classnames,
                            **{key: args.val_list}, **common)
    else:  # folder
        train = build_dataset("folder", train_split, root=root, train=True, num_base=args.num_base,
                              imbalance=args.imbalance, **common)
        val = build_dataset("folder", val_split, root=val_root, train=False, classnames=train.classnames,
                            num_base=args.num_base, **common)
    if val.classnames != train.classnames:
        raise ValueError(f"the train split ({train.source}) and the validation split ({val.source}) have different "
                         f"classes ({len(train.classnames)} vs {len(val.classnames)})")
    return train, val
