"""``vlssm profile`` (vlssm.profile.profiler): keys, units, part sums, layers, bad input, and the RN101 anchor.

The models run on the tiny open_clip configs of tests/conftest.py, so each builds in a fraction of a second
with random weights.
"""
from __future__ import annotations

import csv
import json

import pytest
import torch

RN, VIT = "vlssm-test-tiny-RN", "vlssm-test-tiny-ViT"
KEYS = {"gmacs", "gflops", "params", "trainable_params", "used_params", "parts", "latency_ms", "peak_mem_mb",
        "mem_kind", "label_once", "model", "backbone", "image_size", "num_classes", "batch", "dtype", "device", "env",
        "units"}
PART_KEYS = {"gmacs", "gflops", "params", "trainable_params", "used_params", "in_total"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (tiny tensors). The tiny open_clip configs come from tests/conftest.py."""
    pytest.importorskip("open_clip")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(capsys, *argv: str):
    """(exit status, stdout, stderr) of ``vlssm profile argv``."""
    from vlssm.profile.profiler import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def profile_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def check_sums(r: dict) -> None:
    """Every key present; MACs = FLOPs / 2; the parts sum to the totals."""
    assert KEYS <= set(r), KEYS - set(r)
    assert r["error"] == ""
    assert r["gmacs"] == pytest.approx(r["gflops"] / 2, rel=1e-12)
    parts = r["parts"]
    for name, p in parts.items():
        assert PART_KEYS <= set(p), (name, PART_KEYS - set(p))
        assert p["gmacs"] == pytest.approx(p["gflops"] / 2, rel=1e-12)
        assert 0 <= p["used_params"] <= p["params"] and 0 <= p["trainable_params"] <= p["params"]
    assert sum(p["params"] for p in parts.values()) == r["params"]
    assert sum(p["trainable_params"] for p in parts.values()) == r["trainable_params"]
    assert sum(p["used_params"] for p in parts.values()) == r["used_params"]
    assert sum(p["gflops"] for p in parts.values() if p["in_total"]) == pytest.approx(r["gflops"], rel=1e-9)
    assert r["gflops"] > 0


def built_params(name: str, backbone: str, image_size: int, C: int):
    """(params, trainable) of the model as vlssm.models.create_model builds it."""
    from vlssm import models
    from vlssm.data.coco import coco_classnames

    m = models.create_model(name, coco_classnames(C), backbone=backbone, image_size=image_size)
    return sum(p.numel() for p in m.parameters()), sum(p.numel() for p in m.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- models

@pytest.mark.parametrize("name,backbone,parts", [
    ("mvlr", RN, {"backbone", "text", "ifm", "qmvl", "head"}),
    ("mvlr", VIT, {"backbone", "text", "ifm", "qmvl", "head"}),
    ("mvlr_baseline", RN, {"backbone", "text", "head"}),
    ("capnet", RN, {"backbone", "adapters", "text", "gcn", "head"}),
    ("candle", VIT, {"backbone", "fusion", "text", "head"}),
])
def test_model_counts(capsys, name, backbone, parts):
    r = profile_json(capsys, name, "--backbone", backbone, "--image-size", 64, "--num-classes", 5, "--no-timing")
    check_sums(r)
    assert set(r["parts"]) == parts
    assert (r["model"], r["backbone"], r["image_size"], r["num_classes"], r["batch"]) == (name, backbone, 64, 5, 1)
    assert r["latency_ms"] is None and r["peak_mem_mb"] is None  # --no-timing
    assert (r["params"], r["trainable_params"]) == built_params(name, backbone, 64, 5)
    # the text encoder is excluded from the inference totals: the label side is cached
    text = r["parts"]["text"]
    assert text["in_total"] is False and text["gflops"] > 0 and text["used_params"] == 0
    assert r["label_once"]["in_total"] is False and r["label_once"]["gmacs"] >= text["gmacs"]
    assert r["env"]["torch"] == torch.__version__ and r["env"]["date_utc"]


def test_mvlr_parts_match_the_layers(capsys):
    """MVLR's qmvl part counts what the qmvl layer does alone on the same shapes; its backbone tokens and
    width give M and d."""
    r = profile_json(capsys, "mvlr", "--backbone", RN, "--image-size", 64, "--num-classes", 5, "--no-timing")
    M, d = r["tokens"], r["d"]
    assert (M, d) == (4, 32)
    q = profile_json(capsys, "qmvl", "--backbone", RN, "--image-size", 64, "--num-classes", 5, "--d", d, "--no-timing")
    assert q["tokens"] == M
    assert r["parts"]["qmvl"]["gflops"] == pytest.approx(q["gflops"], rel=1e-12)
    assert r["parts"]["qmvl"]["params"] == q["params"]
    assert r["parts"]["ifm"]["once_gmacs"] > 0  # IFM's label attention: cached, reported apart


def test_table(capsys):
    code, out, err = run(capsys, "mvlr", "--backbone", RN, "--image-size", 64, "--num-classes", 5, "--no-timing")
    assert code == 0, err
    assert "counting FLOPs" in err  # progress on stderr
    for word in ("GMACs", "GFLOPs", "backbone", "text", "no: once", "qmvl", "total", "not measured (--no-timing)",
                 "label side, computed once"):
        assert word in out


def test_timing_json_csv(capsys, tmp_path):
    """Latency, memory and per-part times (in a fresh subprocess, to which the tiny config is passed on),
    the JSON, the CSV (one row per part and a total row) and the table's latency lines."""
    from vlssm.profile.profiler import format_profile

    path = tmp_path / "profile.csv"
    r = profile_json(capsys, "qmvl", "--backbone", RN, "--image-size", 64, "--num-classes", 5, "--d", 32,
                     "--reps", 3, "--warmup", 0, "--csv", path)
    check_sums(r)
    lat = r["latency_ms"]
    assert set(lat) >= {"median", "min", "max", "iqr", "reps"} and lat["reps"] == 3
    assert lat["min"] <= lat["median"] <= lat["max"]
    assert r["peak_mem_mb"] is not None and r["peak_mem_mb"] >= 0 and "RSS" in r["mem_kind"]
    # QMVL's blocks run through MambaBlock.fork (not forward): timed and counted all the same
    for block in ("label_block", "visual_block"):
        assert r["parts"][block]["time_ms"] > 0 and r["parts"][block]["gflops"] > 0
    text = format_profile(r)
    assert "latency: median" in text and "peak memory" in text

    rows = list(csv.DictReader(path.open()))
    assert [row["part"] for row in rows] == ["label_block", "visual_block", "other", "total"]
    total = rows[-1]
    assert float(total["latency_median_ms"]) == pytest.approx(lat["median"], rel=1e-5) and total["reps"] == "3"
    assert total["mem_kind"] and float(total["gmacs"]) == pytest.approx(float(total["gflops"]) / 2, rel=1e-5)
    assert int(total["params"]) == sum(int(row["params"]) for row in rows[:-1]) == r["params"]
    assert all(row["device"] == "cpu" and row["torch"] == torch.__version__ for row in rows)


# ----------------------------------------------------------------------------- layers

LAYER_ARGS = ("--backbone", RN, "--image-size", 64, "--num-classes", 5, "--d", 32, "--no-timing")


def test_qmvl_layer_matches_the_analytic_count(capsys):
    from vlssm.profile.flops import qmvl_flops

    r = profile_json(capsys, "qmvl", *LAYER_ARGS, "--batch", 2)
    check_sums(r)
    assert (r["tokens"], r["d"], r["batch"]) == (4, 32, 2)
    assert r["gflops"] * 1e9 == pytest.approx(qmvl_flops(2, 4, 5, 32).total, rel=1e-12)
    assert set(r["parts"]) == {"label_block", "visual_block", "other"}
    assert r["layer_class"] == "vlssm.modules.qmvl.QMVL"


@pytest.mark.parametrize("layer,cls,parts", [
    ("ifm", "vlssm.modules.ifm.IFM", {"label_attn", "cross_attn", "context_attn", "mlp", "other"}),
    ("self-attn", "vlssm.modules.baselines.SDPASelfBlock", {"attn", "mlp", "other"}),
    ("cross-attn", "vlssm.modules.baselines.SDPACrossBlock", {"x_from_t", "t_from_x", "mlp_x", "mlp_t", "other"}),
])
def test_layers(capsys, layer, cls, parts):
    r = profile_json(capsys, layer, *LAYER_ARGS)
    check_sums(r)
    assert r["layer_class"] == cls and set(r["parts"]) == parts
    if layer == "ifm":  # label attention reads only the labels: computed once, cached
        assert r["parts"]["label_attn"]["in_total"] is False and r["label_once"]["gmacs"] > 0
    else:
        assert r["heads"] == 1 and all(p["in_total"] for p in r["parts"].values())  # d // 64, at least 1


def test_several_batches(capsys):
    out = profile_json(capsys, "self-attn", *LAYER_ARGS, "--batch", "1,3")
    a, b = out["runs"]
    assert (a["batch"], b["batch"]) == (1, 3)
    assert b["gflops"] == pytest.approx(3 * a["gflops"], rel=1e-12) and a["params"] == b["params"]


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv,flag", [
    (["nosuchmodel"], "MODEL"),
    (["mvlr", "--backbone", RN, "--image-size", 48], "--image-size"),    # not a multiple of 32
    (["candle", "--backbone", VIT, "--image-size", 40], "--image-size"),  # not a multiple of the patch 16
    (["qmvl", "--backbone", "nosuchbackbone"], "--backbone"),
    (["self-attn", "--d", 100, "--heads", 8], "--d"),
    (["ifm", "--d", 30, "--heads", 4], "--d"),
    (["self-attn", "--d", 0], "--d"),
    (["mvlr", "--d", 64], "--d"),
    (["qmvl", "--heads", 2], "--heads"),
    (["qmvl", "--cuda-graphs"], "--cuda-graphs"),
    (["qmvl", "--batch", "1,x"], "--batch"),
])
def test_bad_input_exits_2_naming_the_flag(capsys, argv, flag):
    try:
        code, out, err = run(capsys, *argv)
    except SystemExit as e:  # argparse's own checks (the flag's type) exit; the rest return 2
        code, err = e.code, capsys.readouterr().err
    assert code == 2
    assert f"argument {flag}" in err
    if flag == "MODEL":
        assert "mvlr" in err and "qmvl" in err  # the choices are listed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(capsys):
    code, out, err = run(capsys, "qmvl", "--device", "cuda", "--no-timing")
    assert code == 2 and "--device cuda" in err and "CUDA is not available" in err and out == ""


# ----------------------------------------------------------------------------- the anchor

def test_rn101_448_backbone_anchor(capsys):
    """CLIP RN101 at 448 x 448, batch 1: the image trunk plus the attention pool's value / output
    projections over the 196 tokens (MVLR's backbone part) is 37.5 GMACs and 47.8 M parameters by
    fvcore's counting (MVLR's paper: 37.6 G / 47.8 M for the whole model). torch's counter leaves out the
    0.14 GMACs of batch norm fvcore counts (37.35); the backbone also holds the attention pool's query /
    key projections, which MVLR's forward never reads, and its positional embedding (0.40 M at 448)."""
    r = profile_json(capsys, "mvlr", "--backbone", "RN101", "--image-size", 448, "--num-classes", 80, "--no-timing")
    check_sums(r)
    bb = r["parts"]["backbone"]
    assert r["tokens"] == 196 and r["d"] == 512
    assert bb["gmacs"] == pytest.approx(37.5, rel=0.01)
    assert bb["used_params"] == pytest.approx(47.8e6, rel=0.01)
    qk = 2 * (2048 * 2048 + 2048)  # attnpool.q_proj, k_proj: never read by MVLR's forward
    assert bb["params"] - bb["used_params"] == qk
    assert r["parts"]["text"]["in_total"] is False


def test_out_of_memory_names_the_configuration_and_goes_on(capsys, monkeypatch):
    """A run that fails (here a simulated out-of-memory at batch 2) is reported with its configuration,
    the next batch size still runs, and the exit status is 1."""
    from vlssm.profile import profiler

    build = profiler._build_target

    def build_or_fail(cfg):
        if cfg["batch"] == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return build(cfg)

    monkeypatch.setattr(profiler, "_build_target", build_or_fail)
    code, out, err = run(capsys, "self-attn", *LAYER_ARGS, "--batch", "1,2,3", "--json")
    assert code == 1
    runs = json.loads(out)["runs"]
    assert [r["batch"] for r in runs] == [1, 2, 3] and runs[0]["error"] == runs[2]["error"] == ""
    assert "out of memory" in runs[1]["error"] and "batch 2" in runs[1]["error"]
    assert "out of memory while building self-attn (d=32, M=4, C=5, batch 2, float32, cpu)" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("extra", [[], ["--cuda-graphs"]])
def test_cuda_timing(capsys, extra):
    r = profile_json(capsys, "qmvl", *LAYER_ARGS[:-1], "--device", "cuda", "--reps", 3, *extra)
    check_sums(r)
    assert r["timer"].startswith("cuda events") and r["mem_kind"] == "cuda max_memory_allocated"
    assert r["latency_ms"]["reps"] == 3 and r["peak_mem_mb"] > 0
