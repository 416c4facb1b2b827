"""``vlssm bench attention`` on tiny shapes, its figures, its options, and the attention-block baselines."""
import contextlib
import csv
import importlib.util
import io
import math
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import vlssm
from vlssm import _backend, bench
from vlssm.bench import attention as A
from vlssm.modules.baselines import SDPACross, SDPACrossBlock, SDPASelf, SDPASelfBlock

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--m", "5,9", "--c", "3", "--d", "64", "--heads", "2", "--batch", "1", "--reps", "1", "--warmup", "0"]
needs_kernels = pytest.mark.skipif(_backend.load_extension() is None, reason="needs the compiled CPU kernels")


def _read(out_dir):
    (path,) = out_dir.glob("attention-cpu-float32-B1-*.csv")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return path, reader.fieldnames, list(reader)


def _check_pngs(paths, n):
    assert len(paths) == n, paths
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, (p, len(data))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """All six providers at M = 5, 9 (C = 3, d = 64, 2 heads, B = 1), in-process, with --plot when it can."""
    out = tmp_path_factory.mktemp("att")
    argv = ["attention", *TINY, "--no-memory", "--out", str(out)] + (["--plot"] if HAVE_MPL else [])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bench.main(argv)
    return rc, buf.getvalue(), out


@needs_kernels
def test_tiny_sweep_writes_every_row_and_column(tiny_run):
    rc, text, out = tiny_run
    assert rc == 0, text
    path, header, rows = _read(out)
    assert header == A.CSV_COLUMNS
    assert [(r["m"], r["provider"]) for r in rows] == [(m, p) for m in ("5", "9") for p in A.PROVIDERS]
    for r in rows:
        assert r["error"] == "", r["error"]
        assert (r["c"], r["d"], r["heads"], r["batch"], r["device"], r["dtype"]) == ("3", "64", "2", "1", "cpu",
                                                                                     "float32")
        assert r["kind"] == A.PROVIDERS[r["provider"]] and r["device_name"] and r["torch"]
        assert float(r["fwd_ms"]) > 0 and float(r["fwdbwd_ms"]) > 0
        assert float(r["gmacs_fwd"]) == pytest.approx(float(r["gflops_fwd"]) / 2, rel=1e-5)
        assert float(r["gmacs_fwd_per_image"]) == pytest.approx(float(r["gmacs_fwd"]), rel=1e-5)  # B = 1
        assert r["peak_mem_mb"] == "" and r["mem_kind"] == ""  # --no-memory
        assert r["resolution_px"] == ("96" if r["m"] == "9" else "")  # 9 = (96 / 32)^2; 5 is no square
        if r["provider"].startswith("qmvl"):
            assert r["sdpa_backend"] == "n/a" and r["qmvl_backend"] == "cpu"
        else:
            assert r["sdpa_backend"] == "cpu flash" and r["qmvl_backend"] == ""
    by = {(r["m"], r["provider"]): r for r in rows}
    for m in ("5", "9"):
        base = by[m, "self-attn-block"]
        assert float(base["fwd_ratio_vs_self_attn_block"]) == 1.0 == float(base["fwdbwd_ratio_vs_self_attn_block"])
        f = by[m, "qmvl-fused"]
        assert float(f["fwd_ratio_vs_self_attn_block"]) == pytest.approx(float(f["fwd_ms"]) / float(base["fwd_ms"]),
                                                                          rel=1e-4)
        flops = {p: float(by[m, p]["gflops_fwd"]) for p in A.PROVIDERS}
        assert flops["self-attn-block"] > flops["self-attn"] > 0 and flops["cross-attn-block"] > flops["cross-attn"] > 0
        assert flops["qmvl-literal"] > flops["qmvl-fused"] > 0
    # params == sum of numel, for a baseline and for QMVL
    assert int(by["5", "self-attn-block"]["params"]) == sum(p.numel() for p in SDPASelfBlock(64, 2).parameters())
    assert int(by["5", "qmvl-fused"]["params"]) == sum(p.numel() for p in vlssm.QMVL(64).parameters())
    assert "MVLR's shape (d=512, M=196, C=80) is not in this sweep" in text
    assert "crossover M where qmvl-fused becomes faster than self-attn-block (forward):" in text
    assert f"results: {path}" in text


@needs_kernels
@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib is not installed")
def test_plot_writes_pngs_and_plot_from_redraws(tiny_run, tmp_path, capsys):
    rc, _, out = tiny_run
    assert rc == 0
    path, _, _ = _read(out)
    stem = path.stem
    # no memory measured (--no-memory): latency, speed-up and FLOPs figures only
    _check_pngs(sorted(out.glob(f"{stem}-*.png")), 3)
    assert not (out / f"{stem}-memory.png").exists()
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    assert bench.main(["attention", "--plot-from", str(copy)]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    _check_pngs(pngs, 3)
    assert {p.name for p in pngs} == {f"{stem}-{k}.png" for k in ("latency", "speedup", "flops")}
    assert "figure:" in capsys.readouterr().out


@needs_kernels
def test_memory_rows_in_subprocesses(tmp_path, capsys):
    argv = ["attention", *TINY, "--m", "9", "--providers", "qmvl-fused,self-attn-block", "--out", str(tmp_path)]
    rc = bench.main(argv + (["--plot"] if HAVE_MPL else []))
    assert rc == 0, capsys.readouterr()
    path, _, rows = _read(tmp_path)
    assert [r["provider"] for r in rows] == ["qmvl-fused", "self-attn-block"]
    for r in rows:
        assert r["error"] == "" and float(r["peak_mem_mb"]) > 0 and r["mem_kind"].startswith("cpu peak RSS")
        assert float(r["peak_mem_fwd_increase_mb"]) >= 0 and float(r["peak_mem_fwdbwd_increase_mb"]) >= 0
        assert float(r["fwd_ratio_vs_self_attn_block"]) > 0
    if HAVE_MPL:
        _check_pngs(sorted(tmp_path.glob(f"{path.stem}-*.png")), 4)


def test_plot_without_matplotlib_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(["attention", *TINY, "--plot", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "matplotlib" in err and "pip install matplotlib" in err
    assert not list(tmp_path.iterdir())  # failed before timing anything


@pytest.mark.parametrize("argv, flag", [
    (["--providers", "qmvl-fused,bogus"], "--providers"),
    (["--m", "0"], "--m"),
    (["--c", "3,x"], "--c"),
    (["--d", "-64"], "--d"),
])
def test_bad_options_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(["attention", *argv])
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


def test_heads_must_divide_d(tmp_path, capsys):
    assert bench.main(["attention", "--d", "64,96", "--heads", "5", "--out", str(tmp_path)]) == 2
    assert "--heads" in capsys.readouterr().err


def test_defaults_and_sweep_shapes():
    a = bench.build_parser().parse_args(["attention"])
    assert (a.m, a.c, a.d, a.providers, a.grid, a.heads, a.batch) == (
        [49, 100, 196, 400, 784, 1024], [20, 80, 1000], [512], list(A.PROVIDERS), False, None, None)
    assert [A.resolution_px(m) for m in a.m] == [224, 320, 448, 640, 896, 1024]
    assert A.sweep_shapes(a.m, a.c, a.d) == [(m, 80, 512) for m in a.m] + [(196, 20, 512), (196, 1000, 512)]
    assert A.sweep_shapes([5, 9], [3], [64, 32]) == [(5, 3, 64), (9, 3, 64), (5, 3, 32)]
    assert A.sweep_shapes([5, 9], [3, 4], [64], grid=True) == [(5, 3, 64), (9, 3, 64), (5, 4, 64), (9, 4, 64)]


def test_crossover():
    ms = [49, 100, 196, 400]
    assert A.crossover(ms, [0.5, 0.6, 0.7, 0.9]).startswith("faster at every M")
    assert A.crossover(ms, [3.0, 2.0, 1.5, 1.0]).startswith("none in range")
    s = A.crossover(ms, [3.0, 1.2, 0.8, None])
    assert s.startswith("between M=100 and M=196")
    x = float(s.split("about M=")[1].split()[0])
    assert 100 < x < 196
    assert A.crossover(ms, [None] * 4) == "no data"


# ----------------------------------------------------------------------------- the baseline blocks

def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _mha(q_in, kv_in, attn, h, nq, nkv):
    """Literal multi-head attention: q = Wq LN(q_in), k, v = Wk, Wv LN(kv_in), softmax(q k^T / sqrt(dh)) v, Wo."""
    B, Lq, d = q_in.shape
    dh = d // h
    wk, wv = attn.kv.weight[:d], attn.kv.weight[d:]
    bk, bv = attn.kv.bias[:d], attn.kv.bias[d:]
    q = _ln(q_in, nq) @ attn.q.weight.T + attn.q.bias
    k = _ln(kv_in, nkv) @ wk.T + bk
    v = _ln(kv_in, nkv) @ wv.T + bv
    out = torch.empty_like(q)
    for b in range(B):
        for i in range(h):
            s = slice(i * dh, (i + 1) * dh)
            p = torch.softmax(q[b, :, s] @ k[b, :, s].T / math.sqrt(dh), -1)
            out[b, :, s] = p @ v[b, :, s]
    return out @ attn.out.weight.T + attn.out.bias


def _mlp(x, mlp):
    u = _ln(x, mlp.norm) @ mlp.fc1.weight.T + mlp.fc1.bias
    u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))  # exact GELU
    return u @ mlp.fc2.weight.T + mlp.fc2.bias


def test_self_attn_block_is_the_literal_transformer_block():
    torch.manual_seed(0)
    d, h, M, C = 16, 2, 5, 3
    blk = SDPASelfBlock(d, h, dtype=torch.float64)
    for p in blk.parameters():  # non-trivial LayerNorm affine too
        torch.nn.init.normal_(p, std=0.3)
    x, t = torch.randn(2, M, d, dtype=torch.float64), torch.randn(2, C, d, dtype=torch.float64)
    z = torch.cat([x, t], 1)
    hh = z + _mha(z, z, blk.attn, h, blk.attn.norm_q, blk.attn.norm_q)
    want = hh + _mlp(hh, blk.mlp)
    got_x, got_t = blk(x, t)
    assert got_x.shape == (2, M, d) and got_t.shape == (2, C, d)
    torch.testing.assert_close(torch.cat([got_x, got_t], 1), want, rtol=1e-12, atol=1e-12)
    blk.residual = False
    dx, dt = blk(x, t)
    torch.testing.assert_close(torch.cat([dx, dt], 1), want - z, rtol=1e-12, atol=1e-12)


def test_cross_attn_block_is_two_literal_cross_blocks():
    torch.manual_seed(1)
    d, h, M, C = 16, 4, 6, 2
    blk = SDPACrossBlock(d, h, dtype=torch.float64)
    x, t = torch.randn(3, M, d, dtype=torch.float64), torch.randn(3, C, d, dtype=torch.float64)
    a, b = blk.x_from_t, blk.t_from_x
    hx = x + _mha(x, t, a, h, a.norm_q, a.norm_kv)
    ht = t + _mha(t, x, b, h, b.norm_q, b.norm_kv)
    wx, wt = hx + _mlp(hx, blk.mlp_x), ht + _mlp(ht, blk.mlp_t)
    gx, gt = blk(x, t)
    assert gx.shape == (3, M, d) and gt.shape == (3, C, d)
    torch.testing.assert_close(gx, wx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gt, wt, rtol=1e-12, atol=1e-12)
    nres = SDPACrossBlock(d, h, dtype=torch.float64, residual=False)
    nres.load_state_dict(blk.state_dict())
    rx, rt = nres(x, t)
    torch.testing.assert_close(rx, wx - x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rt, wt - t, rtol=1e-12, atol=1e-12)


def test_blocks_defaults_params_and_heads():
    d = 128
    blk = SDPASelfBlock(d)
    assert blk.attn.heads == 2 and blk.residual and blk.mlp.fc1.out_features == 4 * d
    # one LayerNorm + q, kv, out projections + LayerNorm + MLP d -> 4d -> d
    assert sum(p.numel() for p in blk.parameters()) == 12 * d * d + 13 * d
    cross = SDPACrossBlock(d, 4, mlp_ratio=2)
    assert cross.x_from_t.heads == 4 and cross.mlp_t.fc1.out_features == 2 * d
    assert sum(p.numel() for p in cross.parameters()) == 2 * (4 * d * d + 8 * d) + 2 * (4 * d * d + 5 * d)
    assert SDPASelfBlock(32).attn.heads == 1  # d // 64, at least one head
    with pytest.raises(ValueError, match="heads"):
        SDPASelfBlock(64, 3)
    with pytest.raises(ValueError, match="heads"):
        SDPACrossBlock(64, 0)
    # the attention-only layers are smaller than their blocks and keep their old behaviour
    x, t = torch.randn(1, 4, d), torch.randn(1, 3, d)
    for layer in (SDPASelf(d, 2), SDPACross(d, 2), blk, cross):
        yx, yt = layer(x, t)
        assert yx.shape == x.shape and yt.shape == t.shape
    assert (sum(p.numel() for p in SDPASelf(d, 2).parameters())
            < sum(p.numel() for p in blk.parameters()))


def test_blocks_run_sdpa_and_backward():
    """Gradients reach the inputs and every parameter; SDPA is the op that attends."""
    blk = SDPACrossBlock(32, 2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    t = torch.randn(2, 3, 32, requires_grad=True)
    calls = []
    orig = F.scaled_dot_product_attention

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is orig:
                calls.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    with Spy():
        yx, yt = blk(x, t)
    (yx.sum() + yt.sum()).backward()
    assert calls == [(2, 2, 5, 16), (2, 2, 3, 16)]
    assert x.grad is not None and t.grad is not None
    assert all(p.grad is not None for p in blk.parameters())
    assert A.sdpa_backends(lambda: blk(x, t)) == "cpu flash"
    assert A.sdpa_backends(lambda: vlssm.QMVL(32)(x, t)) == "n/a"
    with sdpa_kernel(SDPBackend.MATH):
        assert A.sdpa_backends(lambda: blk(x, t)) == "math"
