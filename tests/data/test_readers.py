"""Tests of the file readers on small fixture trees written here in the real formats, with real
image files: COCO (instances json), VOC (XML, difficult), list file, CSV, ImageFolder; the
long-tailed id lists and counts; missing / corrupt images; bad lines."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from vlssm.data import VOC_CLASSES, COCODataset, CSVDataset, FolderDataset, ListDataset, VOCDataset, frequency_groups


def T(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ============================================================================================ COCO
COCO_IMAGES = [(10, "000000000010.jpg"), (11, "000000000011.jpg"), (12, "000000000012.jpg"),
               (13, "000000000013.jpg"), (14, "000000000014.jpg")]
# (annotation id, image id, category id, iscrowd)
COCO_ANNS = [(100, 10, 1, 0), (101, 10, 7, 0), (102, 11, 3, 1), (103, 13, 1, 0), (104, 13, 1, 0),
             (105, 13, 3, 0), (106, 14, 7, 0)]
# categories in the file in this order (non-contiguous ids): sorted by id -> person(1), car(3), zebra(7)
COCO_CATS = [(7, "zebra"), (1, "person"), (3, "car")]
COCO_EXPECTED = T([1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0], [0, 0, 1])


def write_coco(root, write_image, split="train2017", anns=COCO_ANNS, images=COCO_IMAGES):
    data = {
        "info": {"description": "fixture"},
        "images": [{"id": i, "file_name": f, "width": 40, "height": 30} for i, f in images],
        "annotations": [{"id": a, "image_id": i, "category_id": c, "iscrowd": z, "bbox": [1, 2, 3, 4], "area": 12.0}
                        for a, i, c, z in anns],
        "categories": [{"id": c, "name": n, "supercategory": "thing"} for c, n in COCO_CATS],
    }
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(path, "w") as f:
        json.dump(data, f)
    for _, fname in images:
        write_image(os.path.join(root, split, fname))
    return path


def test_coco_labels_and_id_mapping(tmp_path, write_image):
    root = str(tmp_path / "coco")
    write_coco(root, write_image)
    ds = COCODataset(root, "train2017")
    assert ds.classnames == ["person", "car", "zebra"]  # sorted by category id 1, 3, 7
    assert ds.category_ids == [1, 3, 7]
    assert ds.multi_label and len(ds) == 5
    assert ds.image_ids == [10, 11, 12, 13, 14]
    assert torch.equal(ds.labels(), COCO_EXPECTED)  # iscrowd counts; image 12 kept all-negative
    assert ds.class_counts() == [2, 2, 2]
    image, target = ds[3]
    assert image.mode == "RGB" and image.size == (40, 30)
    assert torch.equal(target, COCO_EXPECTED[3])
    assert ds.paths[0] == os.path.join(root, "train2017", "000000000010.jpg")
    assert "COCO" in ds.describe() and "5 images" in ds.describe()


def test_coco_explicit_files(tmp_path, write_image):
    ann = write_coco(str(tmp_path / "c"), write_image, split="val2014")
    ds = COCODataset(None, "val2014", ann_file=ann, image_dir=str(tmp_path / "c" / "val2014"))
    assert len(ds) == 5
    with pytest.raises(ValueError, match="root is required"):
        COCODataset(None, "val2014", ann_file=ann)


def test_coco_unknown_category(tmp_path, write_image, caplog):
    root = str(tmp_path / "coco")
    ann = write_coco(root, write_image, anns=COCO_ANNS + [(999, 11, 42, 0)])
    with pytest.raises(ValueError) as e:
        COCODataset(root, "train2017")
    assert ann in str(e.value) and "annotation id 999" in str(e.value) and "42" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="vlssm.data"):
        ds = COCODataset(root, "train2017", skip_bad=True)
    assert torch.equal(ds.labels(), COCO_EXPECTED)
    assert len(ds.bad_items) == 1 and ds.bad_items[0][0] == ann and "999" in ds.bad_items[0][1]
    assert "skipped 1 bad item" in caplog.text


def test_coco_bad_json(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_val2017.json").write_text("{not json")
    with pytest.raises(ValueError, match="instances_val2017.json is not valid JSON"):
        COCODataset(str(tmp_path), "val2017")
    with pytest.raises(ValueError, match="instances_train2014.json does not exist"):
        COCODataset(str(tmp_path), "train2014")
    (tmp_path / "annotations" / "instances_val2017.json").write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(ValueError, match="'annotations'"):
        COCODataset(str(tmp_path), "val2017")


def test_coco_lt_ids_file(tmp_path, write_image):
    root = str(tmp_path / "coco")
    write_coco(root, write_image)
    ids = tmp_path / "coco_lt_train.txt"
    ids.write_text("14\n# a comment\n\n000000000010.jpg 0 2\ntrain2017/000000000013.jpg\n")
    ds = COCODataset(root, "train2017", ids_file=str(ids))
    assert ds.image_ids == [14, 10, 13]
    assert torch.equal(ds.labels(), COCO_EXPECTED[[4, 0, 3]])
    assert ds.class_counts() == [2, 1, 2]
    ids.write_text("14\n10\n77\n")
    with pytest.raises(ValueError, match=rf"{ids}:3: image '77' is not in the annotation file"):
        COCODataset(root, "train2017", ids_file=str(ids))
    ids.write_text("14\n10\n14\n")
    with pytest.raises(ValueError, match=rf"{ids}:3: .*twice"):
        COCODataset(root, "train2017", ids_file=str(ids))


# ============================================================================================ VOC
def voc_xml(filename, objects):
    objs = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
        + (f"<difficult>{diff}</difficult>" if diff is not None else "")
        + "<bndbox><xmin>1</xmin><ymin>2</ymin><xmax>20</xmax><ymax>25</ymax></bndbox></object>"
        for name, diff in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{filename}</filename>"
            f"<source><database>The VOC2007 Database</database></source>"
            f"<size><width>40</width><height>30</height><depth>3</depth></size><segmented>0</segmented>"
            f"{objs}</annotation>")


VOC_OBJECTS = {
    "000001": [("dog", 0), ("person", 1)],                  # person only difficult
    "000002": [("car", 1), ("car", 0), ("cat", 1)],         # car also non-difficult; cat only difficult
    "000003": [("bird", None)],                             # no <difficult> tag: not difficult
    "000004": [("aeroplane", 0), ("tvmonitor", 0), ("aeroplane", 0)],
}


def write_voc(root, write_image, objects=VOC_OBJECTS, splits=None):
    splits = splits or {"trainval": list(objects), "test": ["000003"]}
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    for img_id, objs in objects.items():
        with open(os.path.join(root, "Annotations", f"{img_id}.xml"), "w") as f:
            f.write(voc_xml(f"{img_id}.jpg", objs))
        write_image(os.path.join(root, "JPEGImages", f"{img_id}.jpg"))
    for split, ids in splits.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))


def voc_row(**values):
    row = torch.zeros(20)
    for name, v in values.items():
        row[VOC_CLASSES.index(name)] = v
    return row


@pytest.mark.parametrize("mode, d", [("positive", 1.0), ("negative", 0.0), ("ignore", -1.0)])
def test_voc_labels_and_difficult(tmp_path, write_image, mode, d):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image)
    ds = VOCDataset(root, "trainval", difficult=mode)
    assert ds.classnames == list(VOC_CLASSES) and len(VOC_CLASSES) == 20
    assert ds.classnames[0] == "aeroplane" and ds.classnames[14] == "person" and ds.classnames[-1] == "tvmonitor"
    assert ds.image_ids == ["000001", "000002", "000003", "000004"]
    expected = torch.stack([voc_row(dog=1, person=d), voc_row(car=1, cat=d), voc_row(bird=1),
                            voc_row(aeroplane=1, tvmonitor=1)])
    assert torch.equal(ds.labels(), expected)
    counts = ds.class_counts()  # -1 (ignore) is not a positive
    assert counts[VOC_CLASSES.index("person")] == (1 if mode == "positive" else 0)
    assert counts[VOC_CLASSES.index("car")] == 1
    image, target = ds[1]
    assert image.size == (40, 30) and torch.equal(target, expected[1])
    assert ds.paths[0] == os.path.join(root, "JPEGImages", "000001.jpg")
    assert len(VOCDataset(root, "test")) == 1


def test_voc_default_difficult_is_positive(tmp_path, write_image):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image)
    assert VOCDataset(root).difficult == "positive"
    assert VOCDataset(root).labels()[0, VOC_CLASSES.index("person")] == 1.0
    with pytest.raises(ValueError, match="difficult must be one of"):
        VOCDataset(root, difficult="skip")


def test_voc_unknown_class(tmp_path, write_image, caplog):
    root = str(tmp_path / "VOC2012")
    objects = dict(VOC_OBJECTS, **{"000005": [("dog", 0), ("unicorn", 0)]})
    write_voc(root, write_image, objects=objects)
    xml = os.path.join(root, "Annotations", "000005.xml")
    with pytest.raises(ValueError) as e:
        VOCDataset(root, "trainval")
    assert xml in str(e.value) and "'unicorn'" in str(e.value)
    with caplog.at_level(logging.WARNING, logger="vlssm.data"):
        ds = VOCDataset(root, "trainval", skip_bad=True)
    assert len(ds) == 5 and torch.equal(ds.labels()[4], voc_row(dog=1))  # the object is dropped, not the image
    assert ds.bad_items[0][0] == xml and "unicorn" in caplog.text


def test_voc_split_line_naming_missing_xml(tmp_path, write_image):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image, splits={"trainval": ["000001", "000002", "000099", "000003"]})
    split_file = os.path.join(root, "ImageSets", "Main", "trainval.txt")
    with pytest.raises(ValueError, match=rf"{split_file}:3: image '000099': annotation file .*000099.xml does not"):
        VOCDataset(root, "trainval")
    ds = VOCDataset(root, "trainval", skip_bad=True)
    assert ds.image_ids == ["000001", "000002", "000003"] and len(ds.bad_items) == 1
    with pytest.raises(ValueError, match=r"split file .*val.txt does not exist"):
        VOCDataset(root, "val")


def test_voc_malformed_xml(tmp_path, write_image):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image)
    xml = os.path.join(root, "Annotations", "000002.xml")
    with open(xml, "w") as f:
        f.write("<annotation><object><name>car</name>")
    with pytest.raises(ValueError, match=rf"{xml} is not valid XML"):
        VOCDataset(root)


def test_voc_lt_ids_file(tmp_path, write_image):
    root = str(tmp_path / "VOC2012")
    write_voc(root, write_image)
    ids = tmp_path / "voc_lt_ids.txt"
    ids.write_text("000004\nJPEGImages/000001.jpg 11 14\n")
    ds = VOCDataset(root, "trainval", ids_file=str(ids))
    assert ds.image_ids == ["000004", "000001"]
    assert torch.equal(ds.labels(), torch.stack([voc_row(aeroplane=1, tvmonitor=1), voc_row(dog=1, person=1)]))
    ids.write_text("000004\n000042\n")
    with pytest.raises(ValueError, match=rf"{ids}:2: image id '000042' is not in the 'trainval' split"):
        VOCDataset(root, "trainval", ids_file=str(ids))


def test_empty_split(tmp_path, write_image):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image, splits={"trainval": ["000001"], "val": []})
    with pytest.raises(ValueError, match=r"split 'val' of .*val.txt is empty"):
        VOCDataset(root, "val")


# ============================================================================================ list file
def test_list_file(tmp_path, write_image):
    for name in ("a.jpg", "b.png", "sub/c.jpg"):
        write_image(tmp_path / "img" / name)
    names = tmp_path / "classes.txt"
    names.write_text("cat\ndog\n\n# comment\nbird\n")
    lst = tmp_path / "train.txt"
    lst.write_text("# path idx idx ...\na.jpg 0 2\n\nb.png\nsub/c.jpg 1 1 2\n")
    ds = ListDataset(str(lst), str(tmp_path / "img"), str(names))
    assert ds.classnames == ["cat", "dog", "bird"] and ds.split == "train"
    assert torch.equal(ds.labels(), T([1, 0, 1], [0, 0, 0], [0, 1, 1]))
    image, target = ds[2]
    assert image.mode == "RGB" and torch.equal(target, T([0, 1, 1])[0])
    ds2 = ListDataset(str(lst), str(tmp_path / "img"), ["x", "y", "z"], split="mine")
    assert ds2.classnames == ["x", "y", "z"] and ds2.split == "mine"


@pytest.mark.parametrize("bad_line, match", [("a.jpg 0 x", "class index 'x' is not an integer"),
                                             ("a.jpg 3", "class index 3 out of range for 3 classes"),
                                             ("a.jpg -1", "class index -1 out of range")])
def test_list_file_bad_line(tmp_path, write_image, bad_line, match):
    write_image(tmp_path / "img" / "a.jpg")
    lst = tmp_path / "train.txt"
    lst.write_text(f"a.jpg 0\n\n{bad_line}\na.jpg 2\n")
    with pytest.raises(ValueError, match=rf"{lst}:3: {match}"):
        ListDataset(str(lst), str(tmp_path / "img"), ["a", "b", "c"])
    ds = ListDataset(str(lst), str(tmp_path / "img"), ["a", "b", "c"], skip_bad=True)
    assert len(ds) == 2 and ds.bad_items[0][0] == f"{lst}:3"


def test_list_file_classnames_errors(tmp_path, write_image):
    write_image(tmp_path / "a.jpg")
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\n")
    with pytest.raises(ValueError, match="twice"):
        ListDataset(str(lst), str(tmp_path), ["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        ListDataset(str(lst), str(tmp_path), [])
    with pytest.raises(ValueError, match="nope.txt does not exist"):
        ListDataset(str(lst), str(tmp_path), str(tmp_path / "nope.txt"))


def test_lt_counts_and_frequency_groups(tmp_path, write_image):
    """A long-tailed list (the same few images repeated): class counts and head / medium / tail."""
    for k in range(3):
        write_image(tmp_path / "img" / f"{k}.jpg")
    lines = [f"{k % 3}.jpg 0" for k in range(70)] + [f"{k % 3}.jpg 0 1" for k in range(50)] \
        + [f"{k % 3}.jpg 2 3" for k in range(5)] + ["0.jpg 3"] * 14
    lst = tmp_path / "lt.txt"
    lst.write_text("\n".join(lines) + "\n")
    ds = ListDataset(str(lst), str(tmp_path / "img"), ["head", "medium", "tail", "edge"])
    counts = ds.class_counts()
    assert counts == [120, 50, 5, 19]
    groups = frequency_groups(counts)
    assert groups["head"].tolist() == [0] and groups["medium"].tolist() == [1] and groups["tail"].tolist() == [2, 3]
    assert frequency_groups([100, 99, 20, 19])["medium"].tolist() == [1, 2]  # edges: >= 100 / 20-99 / < 20


# ============================================================================================ CSV
def test_csv(tmp_path, write_image):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        write_image(tmp_path / "img" / name)
    f = tmp_path / "train.csv"
    f.write_text("path,labels\na.jpg,person;dog\nb.jpg,\n\nc.jpg, cat ;dog;\n")
    ds = CSVDataset(str(f), str(tmp_path / "img"))
    assert ds.classnames == ["cat", "dog", "person"]  # sorted names seen
    assert torch.equal(ds.labels(), T([0, 1, 1], [0, 0, 0], [1, 1, 0]))
    ds2 = CSVDataset(str(f), str(tmp_path / "img"), classnames=["person", "dog", "cat", "car"])
    assert torch.equal(ds2.labels(), T([1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0]))
    g = tmp_path / "noheader.csv"
    g.write_text('a.jpg,dog\n"b.jpg",cat;dog\n')
    assert torch.equal(CSVDataset(str(g), str(tmp_path / "img")).labels(), T([0, 1], [1, 1]))


def test_csv_bad_rows(tmp_path, write_image):
    write_image(tmp_path / "img" / "a.jpg")
    f = tmp_path / "val.csv"
    f.write_text("path,labels\na.jpg,dog\na.jpg,zebra\n")
    with pytest.raises(ValueError, match=rf"{f}:3: unknown label 'zebra'"):
        CSVDataset(str(f), str(tmp_path / "img"), classnames=["dog", "cat"])
    ds = CSVDataset(str(f), str(tmp_path / "img"), classnames=["dog", "cat"], skip_bad=True)
    assert len(ds) == 1 and ds.bad_items == [(f"{f}:3", f"{f}:3: unknown label 'zebra' (not among the 2 classnames)")]
    f.write_text("a.jpg,dog\na.jpg,dog,cat\n")
    with pytest.raises(ValueError, match=rf"{f}:2: expected 2 columns"):
        CSVDataset(str(f), str(tmp_path / "img"))


# ============================================================================================ folder
FOLDER_CLASSES = ["cat", "dog", "fish", "owl"]


def write_folder(root, write_image, per_class=6, split="train"):
    for c in FOLDER_CLASSES:
        for k in range(per_class):
            write_image(os.path.join(root, split, c, f"{c}_{k:02d}" + (".jpg" if k % 2 else ".png")))
    with open(os.path.join(root, split, "cat", "notes.txt"), "w") as f:
        f.write("not an image")


def test_folder_single_label(tmp_path, write_image):
    root = str(tmp_path / "f")
    write_folder(root, write_image)
    ds = FolderDataset(root, "train")
    assert ds.classnames == FOLDER_CLASSES and not ds.multi_label and ds.num_base is None
    y = ds.labels()
    assert y.dtype == torch.int64 and y.tolist() == [c for c in range(4) for _ in range(6)]
    assert ds.class_counts() == [6, 6, 6, 6]
    image, target = ds[7]
    assert image.mode == "RGB" and target.dtype == torch.int64 and target.dim() == 0 and target.item() == 1
    assert os.path.basename(ds.paths[0]) == "cat_00.png"  # sorted by name; notes.txt is not an image


def test_folder_base_new_and_imbalance(tmp_path, write_image):
    root = str(tmp_path / "f")
    write_folder(root, write_image)
    tr = FolderDataset(root, "train", num_base=3, imbalance=0.5, train=True, seed=1)
    n = [int(6 * 0.5 ** (i / 2)) for i in range(3)]  # n_i = n_max * r^(i/(b-1)), b = 3 base classes
    assert n == [6, 4, 3]
    assert tr.class_counts() == n + [0] and tr.num_base == 3
    again = FolderDataset(root, "train", num_base=3, imbalance=0.5, train=True, seed=1)
    assert again.paths == tr.paths  # a seeded choice
    assert all(os.path.basename(p).startswith(FOLDER_CLASSES[int(c)]) for p, c in zip(tr.paths, tr.labels()))
    ev = FolderDataset(root, "train", num_base=3, imbalance=0.5, train=False)
    assert ev.class_counts() == [6, 6, 6, 6] and ev.num_base == 3  # evaluation: all classes, balanced
    half = FolderDataset(root, "train", base_ratio=0.5, train=True)
    assert half.num_base == 2 and half.class_counts() == [6, 6, 0, 0]
    lt = FolderDataset(root, "train", imbalance=0.25, train=True)  # no base split: all 4 classes long-tailed
    assert lt.class_counts() == [max(1, int(6 * 0.25 ** (i / 3))) for i in range(4)]
    with pytest.raises(ValueError, match="not both"):
        FolderDataset(root, "train", num_base=2, base_ratio=0.5)
    with pytest.raises(ValueError, match="num_base"):
        FolderDataset(root, "train", num_base=5)
    with pytest.raises(ValueError, match="imbalance"):
        FolderDataset(root, "train", imbalance=2.0)


def test_folder_classnames_from_train(tmp_path, write_image):
    root = str(tmp_path / "f")
    write_folder(root, write_image)
    write_image(os.path.join(root, "val", "dog", "x.jpg"))
    val = FolderDataset(root, "val", classnames=FOLDER_CLASSES)
    assert val.classnames == FOLDER_CLASSES and val.labels().tolist() == [1]
    write_image(os.path.join(root, "val", "yak", "y.jpg"))
    with pytest.raises(ValueError, match=r"yak is a class folder not among"):
        FolderDataset(root, "val", classnames=FOLDER_CLASSES)
    with pytest.raises(ValueError, match="is not a folder"):
        FolderDataset(root, "test")


# ============================================================================================ bad images
def test_missing_image(tmp_path, write_image, caplog):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image)
    missing = os.path.join(root, "JPEGImages", "000002.jpg")
    os.remove(missing)
    with pytest.raises(ValueError, match=rf"image file {missing} does not exist"):
        VOCDataset(root)
    with caplog.at_level(logging.WARNING, logger="vlssm.data"):
        ds = VOCDataset(root, skip_bad=True)
    assert ds.image_ids == ["000001", "000003", "000004"]
    assert ds.bad_items == [(missing, "missing file")] and "skipped 1 bad item" in caplog.text
    assert "1 bad items skipped" in ds.describe()


def test_corrupt_image(tmp_path, write_image, write_garbage):
    for name in ("a.jpg", "c.jpg"):
        write_image(tmp_path / "img" / name)
    bad = write_garbage(tmp_path / "img" / "b.jpg")
    lst = tmp_path / "l.txt"
    lst.write_text("a.jpg 0\nb.jpg 1\nc.jpg 0 1\n")
    ds = ListDataset(str(lst), str(tmp_path / "img"), ["x", "y"])
    assert len(ds) == 3  # construction checks existence only
    ds[0]
    with pytest.raises(ValueError, match=rf"cannot read image file {bad}"):
        ds[1]
    assert ds.verify(progress=False) == 1
    assert len(ds) == 2 and ds.bad_items[0][0] == bad
    assert torch.equal(ds.labels(), T([1, 0], [1, 1]))
    ds[1]
    # a truncated JPEG too
    with open(tmp_path / "img" / "c.jpg", "rb") as f:
        data = f.read()
    with open(tmp_path / "img" / "c.jpg", "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="c.jpg"):
        ds[1]


def test_coco_verify_keeps_ids_aligned(tmp_path, write_image, write_garbage):
    root = str(tmp_path / "coco")
    write_coco(root, write_image)
    write_garbage(os.path.join(root, "train2017", "000000000011.jpg"))
    ds = COCODataset(root, "train2017")
    assert ds.verify(progress=False) == 1
    assert ds.image_ids == [10, 12, 13, 14] and torch.equal(ds.labels(), COCO_EXPECTED[[0, 2, 3, 4]])
