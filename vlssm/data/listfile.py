"""Generic multi-label sets (NUS-WIDE, VOC-LT / COCO-LT lists, anything else): a list file or a CSV.

List file (the format long-tailed multi-label repositories ship, e.g. ``voc_lt_train.txt``)::

    # comment
    relative/path/a.jpg 3 17 42
    relative/path/b.jpg            <- no index: all negative

CSV (``csv`` module; an optional header row ``path,labels``)::

    path,labels
    images/a.jpg,person;dog
    images/b.jpg,
"""
from __future__ import annotations

import csv
import os
from typing import List, Optional

from ._base import MultiLabelDataset, check_path_arg, multi_hot, read_classnames, read_text_lines

__all__ = ["ListDataset", "CSVDataset"]


class ListDataset(MultiLabelDataset):
    """A list file of ``path idx idx ...`` lines (space-separated) with class names from elsewhere.

    Lines: an image path (relative to ``image_root``; an absolute path is used as is; no
    spaces in paths) then zero or more class indices in ``[0, C)`` (none: an all-negative
    image; a repeated index counts once). Blank lines and lines starting with ``#`` are skipped.

    Args:
        list_file: the list.
        image_root: the folder the paths are relative to.
        classnames: the C class names in label order: a list, or a text file with one name
            per line (blank / ``#`` lines skipped).
        split: a name for messages (default: the list file's stem).
        transform, skip_bad: see :class:`MultiLabelDataset`; with ``skip_bad`` a bad line is
            dropped (and logged) instead of raising.

    Raises:
        ValueError: a bad line (a non-integer or out-of-range index) as ``"FILE:LINE: ..."``;
            a missing image; an empty list.
    """

    name = "list"

    def __init__(self, list_file, image_root, classnames, split: Optional[str] = None, transform=None,
                 skip_bad: bool = False):
        list_file = check_path_arg("list_file", list_file)
        image_root = check_path_arg("image_root", image_root)
        names = read_classnames(classnames)
        if split is None:
            split = os.path.splitext(os.path.basename(list_file))[0]
        super().__init__(names, multi_label=True, split=split, source=list_file, transform=transform,
                         skip_bad=skip_bad)
        self.list_file, self.image_root = list_file, image_root
        C = len(names)
        paths: List[str] = []
        index_lists: List[List[int]] = []
        bad = []
        for line, text in read_text_lines(list_file, "list_file"):
            tokens = text.split()
            try:
                idx = []
                for t in tokens[1:]:
                    try:
                        k = int(t)
                    except ValueError:
                        raise ValueError(f"{list_file}:{line}: class index {t!r} is not an integer") from None
                    if not 0 <= k < C:
                        raise ValueError(f"{list_file}:{line}: class index {k} out of range for {C} classes")
                    idx.append(k)
            except ValueError as e:
                if not skip_bad:
                    raise
                bad.append((f"{list_file}:{line}", str(e)))
                continue
            paths.append(os.path.join(image_root, tokens[0]))
            index_lists.append(sorted(set(idx)))
        self._record_bad(bad)
        self._set_items(paths, multi_hot(index_lists, C))


class CSVDataset(MultiLabelDataset):
    """A CSV of ``path,label;label`` rows, labels by name.

    Rows: two columns, the image path (relative to ``image_root``) and the class names
    separated by ``;`` (whitespace around a name is stripped, empty names are skipped, so
    ``"a;"`` is ``a``; an empty second column or a one-column row: an all-negative image).
    A first row whose first cell is ``path`` (any case) is a header and skipped. Blank rows
    are skipped.

    Class order: ``classnames`` when given (then every name in the CSV must be among them),
    else the **sorted** set of every name the CSV uses (sort order is deterministic; a
    class no image has cannot appear, so give the validation set the training set's
    ``classnames``).

    Args:
        csv_file, image_root: the CSV and the folder its paths are relative to.
        classnames: None, a list, or a text file with one name per line.
        split: a name for messages (default: the CSV's stem).
        transform, skip_bad: see :class:`MultiLabelDataset`; with ``skip_bad`` a bad row is dropped.

    Raises:
        ValueError: a row with more than two columns or an unknown label, as ``"FILE:LINE: ..."``;
            a missing image; an empty CSV.
    """

    name = "csv"

    def __init__(self, csv_file, image_root, classnames=None, split: Optional[str] = None, transform=None,
                 skip_bad: bool = False):
        csv_file = check_path_arg("csv_file", csv_file)
        image_root = check_path_arg("image_root", image_root)
        if not os.path.isfile(csv_file):
            raise ValueError(f"csv_file {csv_file} does not exist (or is not a file)")
        names = read_classnames(classnames) if classnames is not None else None
        rows = []  # (line, path, [names])
        bad = []
        with open(csv_file, "r", encoding="utf-8", newline="") as f:
            reader = csv.reader(f)
            first = True
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if first:
                    first = False
                    if row[0].strip().lower() == "path":
                        continue
                try:
                    if len(row) > 2:
                        raise ValueError(f"{csv_file}:{line}: expected 2 columns (path,label;label), got {len(row)}")
                    path = row[0].strip()
                    if not path:
                        raise ValueError(f"{csv_file}:{line}: empty image path")
                    labels = [s.strip() for s in row[1].split(";")] if len(row) > 1 else []
                    labels = [s for s in labels if s]
                    if names is not None:
                        for s in labels:
                            if s not in names:
                                raise ValueError(f"{csv_file}:{line}: unknown label {s!r} (not among the "
                                                 f"{len(names)} classnames)")
                except ValueError as e:
                    if not skip_bad:
                        raise
                    bad.append((f"{csv_file}:{line}", str(e)))
                    continue
                rows.append((line, path, labels))
        if names is None:
            names = sorted({s for _, _, labels in rows for s in labels})
            if not names:
                raise ValueError(f"csv_file {csv_file} names no label at all: cannot infer the classnames "
                                 f"(pass classnames)")
        if split is None:
            split = os.path.splitext(os.path.basename(csv_file))[0]
        super().__init__(names, multi_label=True, split=split, source=csv_file, transform=transform,
                         skip_bad=skip_bad)
        self.csv_file, self.image_root = csv_file, image_root
        self._record_bad(bad)
        index = {c: k for k, c in enumerate(names)}
        paths = [os.path.join(image_root, p) for _, p, _ in rows]
        self._set_items(paths, multi_hot([sorted({index[s] for s in labels}) for _, _, labels in rows], len(names)))
