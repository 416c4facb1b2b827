"""``vlssm bench train``: the demo rows run, print their ratios and write one CSV."""
from __future__ import annotations

import csv

import pytest

from vlssm import bench

pytest.importorskip("open_clip")
pytest.importorskip("sklearn")


def test_train_workload_demo_rows(tmp_path, capsys):
    rows = ["loader-demo", "step-demo-default", "step-demo-reference"]
    rc = bench.main(["train", "--train-rows", ",".join(rows), "--reps", "1", "--warmup", "0",
                     "--loader-batches", "1", "--workers", "0", "--no-memory", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for key in ("demo: reference / default step time:", "demo: loader / default step images/s (goal >= 3):"):
        line = next(ln for ln in out.splitlines() if ln.startswith(key))
        assert float(line.split(":")[-1]) > 0, line
    (path,) = tmp_path.glob("train-RN101-448-*.csv")
    got = list(csv.DictReader(path.open()))
    assert [r["row"] for r in got] == rows
    assert all(float(r["images_per_s"]) > 0 and r["error"] == "" and r["device_name"] and r["torch"] for r in got)
    assert {r["backbone"] for r in got} == {"vlssm-demo-RN"} and {r["batch"] for r in got} == {"32"}
