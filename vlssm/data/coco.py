"""MS-COCO (2014 / 2017) multi-label classification from the detection annotations, and COCO-LT.

Layout (the official one)::

    root/annotations/instances_{split}.json    split: train2014 | val2014 | train2017 | val2017
    root/{split}/<file_name>                   the images the json names

An image's target is the multi-hot of the categories of its annotations.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

from ._base import MultiLabelDataset, check_path_arg, multi_hot, read_ids_file

__all__ = ["COCODataset", "COCO_CLASSES", "coco_classnames"]


#: MS-COCO's 80 class names in label order (category ids sorted), as the multi-label papers use them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)



def coco_classnames(C: int = 80) -> List[str]:
    """C class names: COCO's first C, then "class k" for k >= 80."""
    return [COCO_CLASSES[i] if i < len(COCO_CLASSES) else f"class {i}" for i in range(C)]


def _field(d, key: str, typ, where: str):
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing field {key!r}")
    v = d[key]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValueError(f"{where}: field {key!r} must be an int, got {v!r}")
    if typ is str and not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {v!r}")
    return v


class COCODataset(MultiLabelDataset):
    """COCO's images with multi-hot targets over its categories.

    Choices:

    - classes: the json's ``categories`` sorted by category id, mapped to 0..C-1 (COCO's 80
      ids 1..90 with gaps -> 0..79; any other category list is accepted as it is);
    - images with no annotation are kept, all-negative (they are part of the val set the
      papers evaluate on);
    - ``iscrowd`` annotations count as positives (a crowd of people is "person" present);
    - image order: the json's ``images`` order, or the ``ids_file``'s order when given.

    Args:
        root: the COCO folder (for the default ``ann_file`` / ``image_dir``); may be None when both are given.
        split: ``"train2014"`` | ``"val2014"`` | ``"train2017"`` | ``"val2017"`` (names the defaults).
        ann_file: default ``root/annotations/instances_{split}.json``.
        image_dir: default ``root/{split}``.
        ids_file: COCO-LT: a text file of the images to keep, one per line: an image id, or a
            file name (matched by its base name); the first token of a line counts, blank
            and ``#`` lines are skipped. An id not in the json, or twice -> ValueError naming
            the file and line.
        transform, skip_bad: see :class:`MultiLabelDataset`. With ``skip_bad`` an
            annotation of an unknown category or image is dropped (and logged) instead of
            raising; a missing image file is dropped.

    Raises:
        ValueError: a missing / malformed json (naming it), an annotation whose
            ``category_id`` is not among the categories (naming the json and the annotation
            id), a missing image file, an empty split.
    """

    name = "COCO"

    def __init__(self, root=None, split: str = "train2014", ann_file=None, image_dir=None, ids_file=None,
                 transform=None, skip_bad: bool = False):
        root = check_path_arg("root", root, required=ann_file is None or image_dir is None)
        if not isinstance(split, str) or not split:
            raise TypeError(f"split must be a non-empty string, got {split!r}")
        ann_file = check_path_arg("ann_file", ann_file, required=False) or \
            os.path.join(root, "annotations", f"instances_{split}.json")
        image_dir = check_path_arg("image_dir", image_dir, required=False) or os.path.join(root, split)
        ids_file = check_path_arg("ids_file", ids_file, required=False)
        self.ann_file, self.image_dir, self.ids_file = ann_file, image_dir, ids_file
        if not os.path.isfile(ann_file):
            raise ValueError(f"COCO: annotation file {ann_file} does not exist")
        try:
            with open(ann_file, "r", encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"COCO: annotation file {ann_file} is not valid JSON: {e}") from e
        for key in ("images", "annotations", "categories"):
            if not isinstance(data, dict) or not isinstance(data.get(key), list):
                raise ValueError(f"COCO: annotation file {ann_file} has no {key!r} list "
                                 f"(an instances_*.json is needed; image_info_* files carry no labels)")

        cats = []
        for j, c in enumerate(data["categories"]):
            where = f"{ann_file}: categories[{j}]"
            cats.append((_field(c, "id", int, where), _field(c, "name", str, where)))
        if not cats:
            raise ValueError(f"COCO: annotation file {ann_file} lists no categories")
        cats.sort()
        cat_index: Dict[int, int] = {}
        for k, (cid, cname) in enumerate(cats):
            if cid in cat_index:
                raise ValueError(f"COCO: annotation file {ann_file} lists category id {cid} twice")
            cat_index[cid] = k
        self.category_ids = [cid for cid, _ in cats]
        source = f"{ann_file}" + (f" + ids {ids_file}" if ids_file else "")
        super().__init__([name for _, name in cats], multi_label=True, split=split, source=source,
                         transform=transform, skip_bad=skip_bad)

        images: Dict[int, str] = {}
        order: List[int] = []
        for j, im in enumerate(data["images"]):
            where = f"{ann_file}: images[{j}]"
            iid, fname = _field(im, "id", int, where), _field(im, "file_name", str, where)
            if iid in images:
                raise ValueError(f"{where}: image id {iid} appears twice")
            images[iid] = fname
            order.append(iid)

        labels: Dict[int, set] = {iid: set() for iid in order}
        bad = []
        for j, a in enumerate(data["annotations"]):
            aid = a.get("id", f"#{j}") if isinstance(a, dict) else f"#{j}"
            where = f"{ann_file}: annotation id {aid}"
            iid = _field(a, "image_id", int, where)
            cid = _field(a, "category_id", int, where)
            problem = None
            if cid not in cat_index:
                problem = f"annotation id {aid} has category_id {cid}, not among the file's {len(cats)} categories"
            elif iid not in labels:
                problem = f"annotation id {aid} names image_id {iid}, not among the file's images"
            if problem is not None:
                if not skip_bad:
                    raise ValueError(f"COCO: {ann_file}: {problem}")
                bad.append((ann_file, problem))
                continue
            labels[iid].add(cat_index[cid])
        self._record_bad(bad)

        if ids_file is not None:
            order = self._apply_ids(ids_file, images, order)
        self.image_ids = order
        paths = [os.path.join(image_dir, images[iid]) for iid in order]
        targets = multi_hot([sorted(labels[iid]) for iid in order], len(cats))
        kept = self._set_items(paths, targets)
        self.image_ids = [order[i] for i in kept]

    def _subset_extra(self, keep: List[int]) -> None:
        self.image_ids = [self.image_ids[i] for i in keep]

    @staticmethod
    def _apply_ids(ids_file: str, images: Dict[int, str], order: List[int]) -> List[int]:
        by_name: Dict[str, int] = {}
        for iid in order:
            by_name.setdefault(os.path.basename(images[iid]), iid)
        out, seen = [], {}
        for line, tok in read_ids_file(ids_file):
            iid = None
            try:
                iid = int(tok)
            except ValueError:
                iid = by_name.get(os.path.basename(tok))
            if iid is None or iid not in images:
                raise ValueError(f"{ids_file}:{line}: image {tok!r} is not in the annotation file")
            if iid in seen:
                raise ValueError(f"{ids_file}:{line}: image {tok!r} listed twice (first on line {seen[iid]})")
            seen[iid] = line
            out.append(iid)
        if not out:
            raise ValueError(f"COCO: ids_file {ids_file} lists no images")
        return out
