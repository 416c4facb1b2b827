"""PASCAL VOC 2007 / 2012 multi-label classification from the detection XMLs, and VOC-LT.

Layout (the official devkit's ``VOC2007`` / ``VOC2012`` folder)::

    root/Annotations/<id>.xml
    root/ImageSets/Main/{split}.txt     split: trainval | train | val | test
    root/JPEGImages/<id>.jpg
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Dict, List, Tuple

import torch

from ._base import MultiLabelDataset, check_path_arg, read_ids_file, read_text_lines

__all__ = ["VOCDataset", "VOC_CLASSES", "DIFFICULT_MODES"]

#: the 20 VOC classes in the standard (devkit) order
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
#: what a class seen only on "difficult" objects becomes: 1 / 0 / -1 (ignore)
DIFFICULT_MODES = {"positive": 1.0, "negative": 0.0, "ignore": -1.0}


class VOCDataset(MultiLabelDataset):
    """VOC images with multi-hot targets over the 20 classes (standard order).

    Labels: a class is positive (1) for an image if any non-difficult object has it. A class
    the image has only on objects marked ``<difficult>1</difficult>`` becomes, per
    ``difficult``:

    - ``"positive"`` (default): 1, the convention of ML-GCN's and ASL's VOC loaders, which the
      papers' VOC numbers follow;
    - ``"negative"``: 0;
    - ``"ignore"``: -1, to be ignored by the loss and the metrics (``ignore_index=-1``), the
      VOC devkit's own evaluation convention.

    Image order: the split file's (or the ``ids_file``'s) order; the image of ``<id>`` is
    ``root/JPEGImages/<id>.jpg``.

    Args:
        root: the ``VOC2007`` or ``VOC2012`` folder.
        split: ``"trainval"`` | ``"train"`` | ``"val"`` | ``"test"``: ``ImageSets/Main/{split}.txt``.
        difficult: ``"positive"`` | ``"negative"`` | ``"ignore"`` (above).
        ids_file: VOC-LT: the images to keep, one per line (an id, or a path whose file stem is
            the id; the first token of a line counts; blank and ``#`` lines skipped), each of
            which must be in the split. An unknown or repeated id -> ValueError naming the file and line.
        transform, skip_bad: see :class:`MultiLabelDataset`. With ``skip_bad`` an image whose
            XML is missing or malformed is dropped, and an object of an unknown class is dropped.

    Raises:
        ValueError: a missing split file; a split line naming a missing XML (naming the split
            file and line); a malformed XML or an object of an unknown class (naming the XML
            and the class); a missing image; an empty split.
    """

    name = "VOC"

    def __init__(self, root, split: str = "trainval", difficult: str = "positive", ids_file=None,
                 transform=None, skip_bad: bool = False):
        root = check_path_arg("root", root)
        if not isinstance(split, str) or not split:
            raise TypeError(f"split must be a non-empty string, got {split!r}")
        if difficult not in DIFFICULT_MODES:
            raise ValueError(f"difficult must be one of {tuple(DIFFICULT_MODES)}, got {difficult!r}")
        ids_file = check_path_arg("ids_file", ids_file, required=False)
        self.root, self.difficult, self.ids_file = root, difficult, ids_file
        self.split_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isdir(root):
            raise ValueError(f"VOC: root {root} is not a folder (expected the VOC2007 / VOC2012 folder)")
        if not os.path.isfile(self.split_file):
            raise ValueError(f"VOC: split file {self.split_file} does not exist (split {split!r})")
        source = self.split_file + (f" + ids {ids_file}" if ids_file else "")
        super().__init__(VOC_CLASSES, multi_label=True, split=split, source=source, transform=transform,
                         skip_bad=skip_bad)

        entries: List[Tuple[str, int, str]] = []  # (file, line, id)
        first: Dict[str, int] = {}
        for line, text in read_text_lines(self.split_file, "split file"):
            img_id = text.split()[0]
            if img_id in first:
                raise ValueError(f"{self.split_file}:{line}: image id {img_id!r} listed twice "
                                 f"(first on line {first[img_id]})")
            first[img_id] = line
            entries.append((self.split_file, line, img_id))
        if ids_file is not None:
            entries = self._apply_ids(ids_file, first)

        index = {c: k for k, c in enumerate(VOC_CLASSES)}
        ids, paths, rows, bad = [], [], [], []
        for src, line, img_id in entries:
            xml = os.path.join(root, "Annotations", f"{img_id}.xml")
            try:
                row = self._parse_xml(xml, index, bad)
            except ValueError as err:
                e = err
                if not os.path.isfile(xml):
                    e = ValueError(f"{src}:{line}: image {img_id!r}: annotation file {xml} does not exist")
                if not skip_bad:
                    raise e from None
                bad.append((xml, str(e)))
                continue
            ids.append(img_id)
            paths.append(os.path.join(root, "JPEGImages", f"{img_id}.jpg"))
            rows.append(row)
        self._record_bad(bad)
        targets = torch.stack(rows) if rows else torch.zeros(0, len(VOC_CLASSES))
        kept = self._set_items(paths, targets)
        self.image_ids = [ids[i] for i in kept]

    def _parse_xml(self, xml: str, index: Dict[str, int], bad: list) -> torch.Tensor:
        """(20,) float32 target of one annotation XML (objects of unknown classes: error / dropped)."""
        if not os.path.isfile(xml):
            raise ValueError(f"annotation file {xml} does not exist")
        try:
            tree = ET.parse(xml)
        except ET.ParseError as e:
            raise ValueError(f"VOC: annotation file {xml} is not valid XML: {e}") from None
        pos = torch.zeros(len(VOC_CLASSES), dtype=torch.bool)
        diff = torch.zeros(len(VOC_CLASSES), dtype=torch.bool)
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                problem = (f"VOC: annotation file {xml}: object of unknown class {name!r} "
                           "(not one of the 20 VOC classes)")
                if not self.skip_bad:
                    raise ValueError(problem)
                bad.append((xml, problem))
                continue
            text = (obj.findtext("difficult") or "0").strip()
            if text not in ("0", "1"):
                raise ValueError(f"VOC: annotation file {xml}: object {name!r} has <difficult>{text}</difficult>, "
                                 f"expected 0 or 1")
            if text == "1":
                diff[index[name]] = True
            else:
                pos[index[name]] = True
        row = pos.to(torch.float32)
        only_difficult = diff & ~pos
        row[only_difficult] = DIFFICULT_MODES[self.difficult]
        return row

    def _apply_ids(self, ids_file: str, in_split: Dict[str, int]) -> List[Tuple[str, int, str]]:
        out, seen = [], {}
        for line, tok in read_ids_file(ids_file):
            img_id = os.path.splitext(os.path.basename(tok))[0]
            if img_id not in in_split:
                raise ValueError(f"{ids_file}:{line}: image id {img_id!r} is not in the {self.split!r} split "
                                 f"({self.split_file})")
            if img_id in seen:
                raise ValueError(f"{ids_file}:{line}: image id {img_id!r} listed twice (first on line {seen[img_id]})")
            seen[img_id] = line
            out.append((ids_file, line, img_id))
        if not out:
            raise ValueError(f"VOC: ids_file {ids_file} lists no images")
        return out

    def _subset_extra(self, keep: List[int]) -> None:
        self.image_ids = [self.image_ids[i] for i in keep]
