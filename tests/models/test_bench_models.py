"""``vlssm bench models`` end to end on a tiny open_clip config (tests/models/conftest.py),
in-process (--no-memory): every row runs, the table prints the three ratios, the CSV has a row each."""
from __future__ import annotations

import csv

import pytest

pytest.importorskip("open_clip")

from vlssm import bench  # noqa: E402
from vlssm.bench.models import ROWS as MODEL_ROWS  # noqa: E402


def test_models_workload_runs_every_row(tmp_path, capsys):
    rc = bench.main(["models", "--model-backbone", "vlssm-test-tiny-RN", "--model-image-size", "64",
                     "--model-c", "3", "--reps", "1", "--model-train-reps", "1", "--warmup", "0", "--no-memory",
                     "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for key in ("MVLR / Baseline inference:", "reference / default training step:", "full / truncated text encoding:"):
        line = next(ln for ln in out.splitlines() if ln.startswith(key))
        assert float(line.split(":")[1]) > 0, line
    (path,) = tmp_path.glob("models-vlssm-test-tiny-RN-64-c3-*.csv")
    rows = list(csv.DictReader(path.open()))
    assert [r["row"] for r in rows] == list(MODEL_ROWS)
    assert all(float(r["ms"]) > 0 and r["error"] == "" and r["device_name"] for r in rows)
    tokens = {r["row"]: r["text_tokens"] for r in rows if r["text_tokens"]}
    # the longest soft prompt: SOS, 4 context tokens, "person" / "bicycle" / "car", ".", EOS
    assert tokens == {"text-truncated": "8", "text-full": "77"}


def test_models_workload_bad_options():
    with pytest.raises(SystemExit):
        bench.main(["models", "--model-rows", "infer-mvlr,nope"])
    with pytest.raises(SystemExit):  # CPU only: argparse refuses the choice
        bench.main(["models", "--device", "cuda"])
