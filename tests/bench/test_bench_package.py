"""vlssm.bench as a package: one harness, workloads that never import one another, sub-commands."""
import ast
import csv
from pathlib import Path

import pytest

import vlssm.bench as bench
from vlssm import _backend

PKG = Path(bench.__file__).parent


def _bench_imports(path: Path):
    """The vlssm.bench modules that ``path`` imports (absolute or relative), as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from . import x / from .x import y
                found |= {node.module} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.startswith("vlssm.bench"):
                rest = node.module[len("vlssm.bench"):].lstrip(".")
                found |= {rest} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name[len("vlssm.bench."):] for a in node.names if a.name.startswith("vlssm.bench.")}
    return found


def test_every_workload_is_a_module_with_the_interface():
    for name in bench.WORKLOADS:
        mod = bench._module(name)
        assert callable(mod.add_arguments) and callable(mod.run), name
    not_workloads = ("plot", "check_cuda")  # the plotting helper; the CUDA case checker (python -m)
    modules = sorted(p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_") and p.stem not in not_workloads)
    assert modules == sorted(bench.WORKLOADS)


def test_workloads_import_only_the_harness():
    """No import cycle: a workload module imports the harness (and plotting), never another workload."""
    allowed = {"_harness", "plot"}
    for path in PKG.glob("*.py"):
        if path.stem in ("__init__", "__main__"):
            continue
        imports = _bench_imports(path)
        assert imports <= allowed, f"{path.name} imports {sorted(imports - allowed)} of vlssm.bench"
    assert _bench_imports(PKG / "_harness.py") == set()


def test_help_lists_every_workload(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in bench.WORKLOADS:
        assert name in out


def test_default_run_is_qmvl_then_ifm():
    args = bench.build_parser().parse_args(bench.normalize_argv(["--m", "5", "--ifm-c", "2"]))
    assert args.workload == bench.DEFAULT and args.m == 5 and args.ifm_c == [2] and args.ifm_m == [196, 784]
    assert bench.normalize_argv([]) == [bench.DEFAULT]
    assert bench.normalize_argv(["ifm", "--c", "3"]) == ["ifm", "--c", "3"]


def test_harness_format_table_and_choice_list():
    from vlssm.bench import _harness as H

    rows = [{"name": "a", "ms": 1.234}, {"name": "bb", "ms": None}, {"name": "c", "error": "boom"}]
    text = H.format_table(rows, [("name", "name", "s"), ("ms", "ms", ".2f")])
    lines = text.splitlines()
    assert lines[0].split() == ["name", "ms"] and lines[2].split() == ["a", "1.23"]
    assert lines[3].split() == ["bb", "-"] and lines[4] == "c  FAILED: boom"
    parse = H.choice_list(["x", "y"], "provider")
    assert parse("y, x,y") == ["y", "x"]
    with pytest.raises(Exception, match="unknown provider 'z'"):
        parse("x,z")


@pytest.mark.skipif(_backend.load_extension() is None, reason="needs the compiled CPU kernels")
def test_scan_workload_tiny(tmp_path, capsys):
    rc = bench.main(["scan", "--batch", "1", "--m", "5", "--c", "3", "--d", "16", "--heads", "2", "--reps", "1",
                     "--ref-reps", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    (path,) = tmp_path.glob("scan-cpu-*.csv")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["op"], r["backend"]) for r in rows] == [
        (op, b) for op in ("fork_scan-label", "fork_scan-visual", "selective_scan", "selective_scan-grouped",
                           "selective_scan-split", "attention_with_probs")
        for b in ("cpu", "reference")]
    assert {r["groups"] for r in rows} == {"4"}
    for r in rows:
        assert r["error"] == "" and float(r["fwd_us"]) > 0 and float(r["fwdbwd_us"]) > 0
        assert float(r["bytes_mb"]) > 0 and r["device_name"] and r["torch"]
        assert float(r["gflops_fwd"]) > 0 and float(r["gmacs_fwd"]) == pytest.approx(float(r["gflops_fwd"]) / 2)
    for r in rows[::2]:
        assert float(r["max_rel_diff_vs_reference"]) < 1e-4
    out = capsys.readouterr().out
    assert "fork_scan-label" in out
    assert "G=4 on cpu: fwd grouped / G=1 " in out and "split+cat / grouped" in out


def test_ifm_plot_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rc = bench.main(["ifm", "--batch", "1", "--d", "8", "--heads", "2", "--c", "3,5", "--m", "4,6", "--reps", "1",
                     "--warmup", "0", "--no-memory", "--plot", "--out", str(tmp_path)])
    assert rc == 0, capsys.readouterr()
    (png,) = tmp_path.glob("ifm-*-latency.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert str(png) in capsys.readouterr().out
