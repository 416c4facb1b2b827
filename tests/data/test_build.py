"""Tests of vlssm.data.build_dataset, add_data_arguments and datasets_from_args."""
from __future__ import annotations

import argparse
import os

import pytest
import torch

from vlssm.data import (
    DATASETS,
    CSVDataset,
    DigitMosaics,
    FolderDataset,
    VOCDataset,
    add_data_arguments,
    build_dataset,
    datasets_from_args,
)


def parse(*argv):
    p = add_data_arguments(argparse.ArgumentParser(prog="vlssm train"))
    return p.parse_args(list(argv))


def write_voc(root, write_image, ids=("000001", "000002"), split="trainval"):
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    os.makedirs(os.path.join(root, "ImageSets", "Main"), exist_ok=True)
    for i in ids:
        with open(os.path.join(root, "Annotations", f"{i}.xml"), "w") as f:
            f.write(f"<annotation><filename>{i}.jpg</filename><object><name>dog</name><difficult>0</difficult>"
                    f"</object><object><name>cat</name><difficult>1</difficult></object></annotation>")
        write_image(os.path.join(root, "JPEGImages", f"{i}.jpg"))
    with open(os.path.join(root, "ImageSets", "Main", f"{split}.txt"), "w") as f:
        f.write("\n".join(ids) + "\n")


def test_datasets_tuple():
    assert DATASETS == ("demo", "coco", "voc", "list", "csv", "folder")


def test_build_dataset_unknown_name():
    msg = "unknown dataset 'imagenet': choose one of demo, coco, voc, list, csv, folder"
    with pytest.raises(ValueError, match=msg):
        build_dataset("imagenet", "train")


def test_build_demo():
    ds = build_dataset("demo", "test", image_size=32, n=8)
    assert isinstance(ds, DigitMosaics) and ds.image_size == 32
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.shape == (10,)
    sl = build_dataset("demo", "train", image_size=32, train=True, n=20, single_label=True)
    assert sl[0][0].shape == (3, 32, 32) and sl[0][1].dtype == torch.int64
    with pytest.raises(ValueError, match="no root"):
        build_dataset("demo", "train", root="/tmp")
    with pytest.raises(ValueError, match="augment"):
        build_dataset("demo", "train", train=True, augment="mixup")


def test_build_voc_with_transform_and_skip_bad(tmp_path, write_image, write_garbage):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image, ids=("000001", "000002", "000003"))
    bad = write_garbage(os.path.join(root, "JPEGImages", "000002.jpg"))
    ds = build_dataset("voc", "trainval", root=root, image_size=32, difficult="ignore")
    assert isinstance(ds, VOCDataset) and len(ds) == 3
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y[7].item() == -1.0 and y[11].item() == 1.0  # cat ignored, dog positive
    with pytest.raises(ValueError, match=rf"cannot read image file {bad}"):
        ds[1]
    ok = build_dataset("voc", "trainval", root=root, image_size=32, skip_bad=True)
    assert len(ok) == 2 and ok.image_ids == ["000001", "000003"] and ok.bad_items[0][0] == bad
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("voc", "trainval")


def test_build_empty_split(tmp_path, write_image, write_garbage):
    root = str(tmp_path / "VOC2007")
    write_voc(root, write_image, ids=("000001",))
    open(os.path.join(root, "ImageSets", "Main", "test.txt"), "w").close()
    with pytest.raises(ValueError, match=r"split 'test' of .*test.txt is empty"):
        build_dataset("voc", "test", root=root)
    write_garbage(os.path.join(root, "JPEGImages", "000001.jpg"))
    with pytest.raises(ValueError, match=r"split 'trainval' .* is empty \(0 images after skipping 1 bad item"):
        build_dataset("voc", "trainval", root=root, skip_bad=True)


def test_build_list_and_csv_need_files(tmp_path):
    with pytest.raises(ValueError, match="needs list_file"):
        build_dataset("list", "train", root=str(tmp_path), classnames=["a"])
    with pytest.raises(ValueError, match="needs classnames"):
        build_dataset("list", "train", root=str(tmp_path), list_file=str(tmp_path / "x.txt"))
    with pytest.raises(ValueError, match="needs csv_file"):
        build_dataset("csv", "train", root=str(tmp_path))


# ------------------------------------------------------------------------------------ argparse
def test_argument_defaults():
    a = parse()
    assert a.data == "demo" and a.data_root is None and a.augment == "default" and a.skip_bad is False
    assert a.workers == min(4, os.cpu_count() or 1) and a.single_label is False and a.difficult is None


def test_argument_parse_errors(capsys):
    for argv in (["--data", "imagenet"], ["--imbalance", "0"], ["--imbalance", "2"], ["--num-base", "0"],
                 ["--demo-size", "x"], ["--workers", "-1"], ["--augment", "mixup"], ["--difficult", "maybe"]):
        with pytest.raises(SystemExit):
            parse(*argv)


def test_from_args_demo():
    train, val = datasets_from_args(parse("--demo-size", "40"), image_size=32)
    assert len(train) == 40 and len(val) == 10 and train.split == "train" and val.split == "test"
    assert train.multi_label and train.classnames == val.classnames
    assert train[0][0].shape == (3, 32, 32)
    assert train.transform is not None and repr(train.transform) != repr(val.transform)  # train: augmented
    tr, va = datasets_from_args(parse("--demo-size", "100", "--single-label", "--num-base", "5", "--imbalance",
                                      "0.5"), image_size=32)
    assert not tr.multi_label and tr.num_base == 5 and va.num_base == 5
    assert tr.class_counts() == [int(20 * 0.5 ** (i / 4)) for i in range(5)] + [0] * 5
    assert va.class_counts() == [3] * 5 + [2] * 5 and len(va) == 25  # 25 // 10 per class, remainder to the first
    tr, _ = datasets_from_args(parse("--demo-size", "40"), image_size=32, single_label=True)  # the model asks
    assert not tr.multi_label


def test_from_args_errors(tmp_path):
    cases = [
        (parse("--data-root", str(tmp_path)), "--data demo reads no files: drop --data-root"),
        (parse("--ids-file", "x.txt"), "--ids-file applies to --data coco/voc, not --data demo"),
        (parse("--data", "voc"), "--data voc needs --data-root"),
        (parse("--data", "coco", "--difficult", "ignore"), "--difficult applies to --data voc"),
        (parse("--data", "voc", "--data-root", str(tmp_path / "nope")), "--data-root .*nope is not a folder"),
        (parse("--data", "list", "--data-root", str(tmp_path)), "--data list needs --train-list"),
        (parse("--data", "list", "--data-root", str(tmp_path), "--train-list", "a", "--val-list", "b"),
         "--data list needs --classnames FILE"),
        (parse("--data", "coco", "--data-root", str(tmp_path), "--imbalance", "0.1"), "--imbalance applies to"),
        (parse("--num-base", "3"), "needs single-label digits"),
        (parse("--data", "coco", "--data-root", str(tmp_path)), r"instances_train2014.json does not exist"),
        (parse("--data", "voc", "--data-root", str(tmp_path)), r"ImageSets.Main.trainval.txt does not exist"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            datasets_from_args(args, 32)
    with pytest.raises(ValueError, match="needs multi-label data: drop --single-label"):
        datasets_from_args(parse("--single-label"), 32, single_label=False)
    with pytest.raises(ValueError, match="needs single-label data: --data voc is multi-label"):
        datasets_from_args(parse("--data", "voc", "--data-root", str(tmp_path)), 32, single_label=True)


def test_from_args_voc_lt(tmp_path, write_image):
    voc12, voc07 = str(tmp_path / "VOC2012"), str(tmp_path / "VOC2007")
    write_voc(voc12, write_image, ids=("2008_000001", "2008_000002", "2008_000003"))
    write_voc(voc07, write_image, ids=("000001",), split="test")
    ids = tmp_path / "voc_lt_ids.txt"
    ids.write_text("2008_000003\n2008_000001\n")
    train, val = datasets_from_args(parse("--data", "voc", "--data-root", voc12, "--val-root", voc07, "--ids-file",
                                          str(ids), "--difficult", "negative"), 32)
    assert train.image_ids == ["2008_000003", "2008_000001"] and val.image_ids == ["000001"]
    assert train.difficult == val.difficult == "negative"
    assert train.class_counts()[11] == 2 and train.class_counts()[7] == 0


def test_from_args_csv_shares_classnames(tmp_path, write_image):
    for n in ("a.jpg", "b.jpg"):
        write_image(tmp_path / "img" / n)
    (tmp_path / "train.csv").write_text("path,labels\na.jpg,dog;cat\nb.jpg,owl\n")
    (tmp_path / "val.csv").write_text("path,labels\nb.jpg,dog\n")
    train, val = datasets_from_args(parse("--data", "csv", "--data-root", str(tmp_path / "img"), "--train-list",
                                          str(tmp_path / "train.csv"), "--val-list", str(tmp_path / "val.csv")), 32)
    assert isinstance(train, CSVDataset) and train.classnames == val.classnames == ["cat", "dog", "owl"]
    assert val.labels().tolist() == [[0.0, 1.0, 0.0]]


def test_from_args_list(tmp_path, write_image):
    write_image(tmp_path / "img" / "a.jpg")
    (tmp_path / "classes.txt").write_text("x\ny\n")
    (tmp_path / "train.txt").write_text("a.jpg 0\n")
    (tmp_path / "val.txt").write_text("a.jpg 1\nmissing.jpg 0\n")
    args = parse("--data", "list", "--data-root", str(tmp_path / "img"), "--train-list", str(tmp_path / "train.txt"),
                 "--val-list", str(tmp_path / "val.txt"), "--classnames", str(tmp_path / "classes.txt"))
    with pytest.raises(ValueError, match=r"missing.jpg does not exist"):
        datasets_from_args(args, 32)
    args.skip_bad = True
    train, val = datasets_from_args(args, 32)
    assert train.classnames == val.classnames == ["x", "y"] and len(val) == 1 and len(val.bad_items) == 1


def test_from_args_folder(tmp_path, write_image):
    for split, n in (("train", 4), ("val", 1)):
        for c in ("ant", "bee", "cow"):
            for k in range(n):
                write_image(tmp_path / split / c / f"{k}.jpg")
    train, val = datasets_from_args(parse("--data", "folder", "--data-root", str(tmp_path), "--num-base", "2",
                                          "--imbalance", "0.5"), 32)
    assert isinstance(train, FolderDataset) and train.class_counts() == [4, 2, 0]
    assert val.class_counts() == [1, 1, 1] and val.num_base == train.num_base == 2
    x, y = val[0]
    assert x.shape == (3, 32, 32) and y.dtype == torch.int64
    with pytest.raises(ValueError, match="needs multi-label data: --data folder"):
        datasets_from_args(parse("--data", "folder", "--data-root", str(tmp_path)), 32, single_label=False)
