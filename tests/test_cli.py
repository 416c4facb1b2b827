"""The ``vlssm`` command line: ``vlssm env`` and ``vlssm bench`` (tiny shapes)."""
import csv
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from vlssm import _backend
from vlssm import testing as T
from vlssm.bench.qmvl import CSV_COLUMNS
from vlssm.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["qmvl", "--batch", "1", "--m", "5", "--c", "3", "--d", "16", "--reps", "1", "--ref-reps", "1"]


def _run(args, cwd, timeout=600):
    """Run ``python -m vlssm.cli ARGS`` on the very vlssm these tests imported, from ``cwd``."""
    return subprocess.run([sys.executable, "-m", "vlssm.cli", *args], cwd=cwd, env=T.child_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def _read_csv(folder):
    files = sorted(Path(folder).glob("*.csv"))
    assert len(files) == 1, files
    with open(files[0], newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_env_reports_extension_status(tmp_path):
    r = _run(["env"], tmp_path)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "extension vlssm._C" in out
    if _backend.load_extension() is not None:
        assert "loaded from" in out and "_C" in out
    else:
        assert "NOT loaded" in out
    for key in ("torch", "triton", "CUDA available", "CPU threads", "auto on cpu"):
        assert key in out


def test_env_json(tmp_path):
    r = _run(["env", "--json"], tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    import torch

    assert info["torch"]["version"] == torch.__version__
    assert info["extension"]["loaded"] == (_backend.load_extension() is not None)
    if info["extension"]["loaded"]:
        assert info["extension"]["path"].endswith(os.path.basename(_backend.load_extension().__file__))
        assert any(k.startswith("vlssm::") for k in info["extension"]["cpu_kernels"])
    else:
        assert info["extension"]["error"]
    want = "cpu" if info["extension"]["loaded"] else "reference"
    if os.environ.get("VLSSM_BACKEND", "auto") in ("", "auto"):
        assert info["backends"]["auto_resolves_to"]["cpu"] == want
    assert isinstance(info["cuda"]["available"], bool)
    assert isinstance(info["cpu"]["torch_threads"], int)


def test_env_in_process(capsys):
    assert main(["env"]) == 0
    assert "auto on cpu" in capsys.readouterr().out


def test_bench_tiny_writes_csv(tmp_path):
    out = tmp_path / "results"
    r = _run(["bench", *TINY, "--no-memory", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    fields, rows = _read_csv(out)
    assert fields == CSV_COLUMNS
    assert [row["provider"] for row in rows] == ["fused", "unfused", "reference"]
    for row in rows:
        assert row["error"] == ""
        assert (row["batch"], row["m"], row["c"], row["d"], row["dtype"]) == ("1", "5", "3", "16", "float32")
        assert row["device"] == "cpu" and row["device_name"]
        assert row["torch"] and row["date_utc"]
        datetime.fromisoformat(row["date_utc"])
        assert float(row["fwd_ms"]) > 0 and float(row["fwdbwd_ms"]) > 0
        assert float(row["gflops_fwd"]) > 0
        assert row["peak_mem_mb"] == ""  # --no-memory
    fused, unfused, ref = rows
    assert fused["fused"] == "True" and unfused["fused"] == "False"
    assert ref["backend"] == "reference"
    assert float(ref["fwd_speedup_vs_reference"]) == 1.0
    assert float(unfused["fwd_speedup_vs_unfused"]) == 1.0
    assert float(fused["gflops_fwd"]) < float(unfused["gflops_fwd"]) == float(ref["gflops_fwd"])
    assert float(fused["max_rel_diff_vs_unfused"]) < 1e-4
    # table on stdout, progress on stderr
    assert "provider" in r.stdout and "fused vs unfused" in r.stdout and str(out) in r.stdout
    for p in ("fused", "unfused", "reference"):
        assert p in r.stderr
    assert "forward+backward" in r.stderr


def test_bench_memory_subprocess_and_options(tmp_path):
    out = tmp_path / "r"
    r = _run(["bench", *TINY, "--providers", "unfused,fused", "--shared-labels", "--dtype", "float64",
              "--threads", "1", "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    _, rows = _read_csv(out)
    assert [row["provider"] for row in rows] == ["unfused", "fused"]
    for row in rows:
        assert row["error"] == ""
        assert row["dtype"] == "float64" and row["shared_labels"] == "True" and row["cpu_threads"] == "1"
        assert float(row["peak_mem_mb"]) > 0
        assert float(row["peak_mem_fwdbwd_increase_mb"]) >= 0
        assert row["fwd_speedup_vs_reference"] == ""  # no reference provider in this run
    assert float(rows[1]["max_rel_diff_vs_unfused"]) < 1e-9


IFM_TINY = ["bench", "ifm", "--batch", "2", "--d", "8", "--heads", "2", "--c", "3,1",
            "--m", "5", "--reps", "1"]


def test_bench_ifm_sweep_writes_csv(tmp_path):
    from vlssm.bench.ifm import CSV_COLUMNS as IFM_COLUMNS

    out = tmp_path / "ifm"
    r = _run([*IFM_TINY, "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    fields, rows = _read_csv(out)
    assert fields == IFM_COLUMNS
    assert [(row["c"], row["m"], row["provider"]) for row in rows] == [
        ("3", "5", "fused"), ("3", "5", "naive"), ("1", "5", "fused"), ("1", "5", "naive")]
    for row in rows:
        assert row["error"] == "" and row["heads"] == "2" and row["batch"] == "2" and row["d"] == "8"
        assert float(row["fwd_ms"]) > 0 and float(row["fwdbwd_ms"]) > 0 and float(row["gmacs_fwd"]) > 0
        assert float(row["peak_mem_mb"]) > 0  # one subprocess per provider
        assert row["cuda_kernels_fwd"] == ""  # CPU run
        assert float(row["max_rel_diff_vs_naive"]) < 1e-4
    assert float(rows[1]["fwd_speedup_vs_naive"]) == 1.0
    assert "fwd x naive" in r.stdout and str(out) in r.stdout


def test_bench_default_runs_both_workloads(tmp_path):
    out = tmp_path / "both"
    r = _run(["bench", *TINY[1:], "--providers", "fused", "--ifm-c", "2", "--ifm-m", "3", "--no-memory",
              "--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    names = sorted(p.name.split("-")[0] for p in out.glob("*.csv"))
    assert names == ["ifm", "qmvl"]
    assert "QMVL benchmark" in r.stdout and "IFM benchmark" in r.stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--providers", "fused,foo"], "unknown provider"),
        (["bench", "--batch", "0"], "--batch"),
        (["bench", "--reps", "two"], "--reps"),
        (["bench", "--dtype", "float16"], "--dtype"),
        (["bench", "--device", "tpu"], "--device"),
        (["bench", "--budget", "-1"], "--budget"),
        (["bench", "--ifm-c", "20,x"], "--ifm-c"),
        (["bench", "--ifm-m", "0"], "--ifm-m"),
        (["bench", "ifm", "--c", "20,x"], "--c"),
        (["bench", "frobnicate"], "invalid choice"),
        (["bench", "gpu", "--gpu-providers", "fused-cuda,flash"], "--gpu-providers"),
        (["bench", "gpu", "--gpu-dtypes", "float16"], "--gpu-dtypes"),
        (["bench", "gpu", "--gpu-m", "196,-1"], "--gpu-m"),
        (["bench", "scan", "--ops", "fork_scan,nope"], "--ops"),
        (["bench", "models", "--device", "cuda"], "--device"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_options_error_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err


def test_bench_cuda_without_cuda(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    assert main(["bench", *TINY, "--device", "cuda", "--no-memory", "--out", str(tmp_path)]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_bench_script_help(tmp_path):
    script = REPO / "bench" / "qmvl.py"
    if not script.exists():
        pytest.skip("bench/qmvl.py is not in this tree")
    r = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, env=T.child_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--providers" in r.stdout
