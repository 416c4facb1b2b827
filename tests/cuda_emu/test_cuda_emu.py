"""The CUDA kernels of csrc/cuda, run on the CPU under an emulation of the CUDA
execution model (include/cuda_emu.h, built by vlssm.testing.cuda_emu), against
vlssm's CPU kernels: the cases of vlssm.bench.check_cuda (every N config of the scan
kernels, every dtype, odd sizes, views, broadcast, reverse, initial / final
states), forward and backward; its "layout-" cases (grouped and
input-independent B / C) against the float64 reference instead.

What it shows: the kernels' indexing, tiling, staging, reductions and
segment walks compute what the CPU kernels compute, on a machine without a
GPU. What it cannot show: speed, the device-only math (__expf), or the
hardware memory model; those need bench/gpu.sh on a GPU.

The emulator's own behaviour (shuffles, atomics, shared memory, barrier
misuse) is checked by selftest.cu; a build with a planted bug must fail the
comparison; an AddressSanitizer build (when libasan is found) runs the cases
again in a subprocess to catch out-of-bounds accesses of global and shared
memory, and outputs left unwritten (every allocation starts as NaN there).
VLSSM_EMU_FULL=1 runs every case of check_cuda (391, about 17 minutes on
2 cores) and every planted bug.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from vlssm import testing as T
from vlssm.bench import check_cuda
from vlssm.testing import cuda_emu

ROOT = Path(__file__).resolve().parents[2]  # the checkout: csrc/ and this folder's emulator (include/, selftest.cu)

CPU = torch.device("cpu")
FULL = os.environ.get("VLSSM_EMU_FULL", "") not in ("", "0")


def _cpu_kernels() -> bool:
    from vlssm import _backend

    return _backend._usable("cpu", CPU) is None


pytestmark = [
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler"),
    pytest.mark.skipif(not _cpu_kernels(), reason="vlssm._C (the CPU kernels compared against) is not built"),
]


@pytest.fixture(scope="module")
def emu():
    torch.ops.load_library(cuda_emu.build(root=ROOT))
    return torch.ops.vlssm_cuda_emu


@pytest.fixture(scope="module")
def selftest(emu):
    return torch.ops.vlssm_cuda_emu_selftest


# Odd-size cases run by default besides the quick ones (every dtype x every N
# config): one, two or three blocks of channels, L = 1 / 129 / 356 tokens
# (several checkpoint chunks), reverse, views, broadcast, conv taps 1 to 17.
ODD = {
    "selective-float32-1x1x1-rev0-opt0-T0", "selective-float32-1x1x1-rev1-opt1-T1",
    "selective-float32-2x40x129-rev1-opt1-T0", "selective-float32-2x40x129-rev0-opt0-T1",
    "selective-float32-3x197x63-rev1-opt1-T1", "selective-bfloat16-2x40x129-rev1-opt1-T1",
    "selective-float64-2x40x129-rev1-opt1-T0",
    "fork-float32-1x1-p0s1-opt1-bz1", "fork-float32-3x197-p20s63-opt1-bz1", "fork-float32-2x64-p196s80-opt1-bz0",
    "fork-bfloat16-2x64-p196s80-opt1-bz1", "fork-float16-1x1-p0s1-opt0-bz0",
    "conv-float32-1x1-p0s1-K4-bias1-bc0", "conv-float32-3x197-p5s63-K17-bias1-bc1",
    "conv-float32-2x64-p2s3-K5-bias0-bc1", "conv-float32-2x64-p2s3-K1-bias1-bc0",
    "conv-bfloat16-3x197-p5s63-K4-bias1-bc1",
}
# Grouped / input-independent B and C run by default (the cheap ones): G = 2 and 4 with odd
# group sizes (one and two blocks per group, padding channels), B / C / both input-independent,
# float32 / float64 / bfloat16, reverse, initial_state, fork_scan with p = 0 and p > 64, N = 1 to 256.
LAYOUT = {
    "layout-sel-float32-2x74x9-N16-Bg2-Cg2-rev1-opt1-S1", "layout-sel-float32-2x262x5-N4-Bi-Cg2-rev0-opt1-S1",
    "layout-sel-float32-1x148x9-N1-Bg4-Ci-rev0-opt1-S0", "layout-sel-float32-2x6x65-N17-Bg1-Ci-rev0-opt0-S1",
    "layout-sel-float32-1x3x20-N256-Bi-Ci-rev1-opt1-S0", "layout-sel-float64-2x10x33-N4-Bi-Cg2-rev1-opt1-S0",
    "layout-fork-float32-2x74-p2s3-N16-Bg2-Cg2-opt1-S0", "layout-fork-float32-1x148-p3s6-N1-Bg4-Ci-opt1-S1",
    "layout-fork-float32-1x6-p0s33-N17-Bg1-Ci-opt0-S1", "layout-fork-bfloat16-2x12-p70s10-N16-Bi-Ci-opt1-S0",
}
# ... and in the deterministic mode (per-block partials of a group's dB / dC, per-batch ones of
# input-independent dB / dC)
LAYOUT_DET = {
    "layout-sel-float32-2x74x9-N16-Bg2-Cg2-rev1-opt1-S1", "layout-fork-float32-2x74-p2s3-N16-Bg2-Cg2-opt1-S0",
    "layout-fork-bfloat16-2x12-p70s10-N16-Bi-Ci-opt1-S0",
}
QUICK = {cid for cid, _, _ in check_cuda.cases(quick=True)}
ALL = check_cuda.cases()
assert ODD | LAYOUT <= {cid for cid, _, _ in ALL}, (ODD | LAYOUT) - {cid for cid, _, _ in ALL}
CASES = [c for c in ALL if FULL or c[0] in QUICK or c[0] in ODD or c[0] in LAYOUT]


@pytest.mark.parametrize("cid,fn,args", CASES, ids=[c[0] for c in CASES])
def test_cuda_kernel_matches_cpu(emu, cid, fn, args, capsys):
    failures = []
    fn(emu, CPU, failures, *args)
    assert not failures, capsys.readouterr().out + "\n".join(failures)


# The backward's deterministic mode (per-warp / per-batch partials instead of atomics): the odd sizes
# by default (several channel blocks, partial warps, several checkpoint chunks), everything with FULL.
DET_CASES = [c for c in ALL if FULL or c[0] in ODD or c[0] in LAYOUT_DET]


@pytest.mark.parametrize("cid,fn,args", DET_CASES, ids=[c[0] for c in DET_CASES])
def test_cuda_kernel_matches_cpu_deterministic_mode(emu, cid, fn, args, capsys):
    failures = []
    with T.deterministic_algorithms():
        fn(emu, CPU, failures, *args)
    assert not failures, capsys.readouterr().out + "\n".join(failures)


# -- determinism --------------------------------------------------------------


def _backward_calls(ns, N=4):
    """(name, forward call, backward call) of each op with a small input, through op namespace ns."""
    g = torch.Generator().manual_seed(0)
    b, D, L, p, s, K = 2, 5, 7, 3, 2, 4
    A = -torch.rand(D, N, generator=g).add(0.5)
    u, delta, dout = (torch.randn(b, D, L, generator=g) for _ in range(3))
    B, C = (torch.randn(b, N, L, generator=g) for _ in range(2))
    sel = (u, delta, A, B, C, None, None, None, None)
    uf, df = (torch.randn(b, p + 2 * s, D, generator=g) for _ in range(2))
    Bf, Cf = (torch.randn(b, p + 2 * s, N, generator=g) for _ in range(2))
    fork = (uf, df, A, Bf, Cf, None, None, None)
    xp, xs, w = torch.randn(b, p, D, generator=g), torch.randn(b, s, D, generator=g), torch.randn(D, K, generator=g)
    dy = torch.randn(b, p + 2 * s, D, generator=g)

    def sel_bwd():
        ck = ns.selective_scan(*sel, True, False)[2]
        return ns.selective_scan_backward(dout, None, *sel, ck, True, False)

    def fork_bwd():
        out, ysum, ck = ns.fork_scan(*fork, p, True)
        return ns.fork_scan_backward(torch.ones_like(out), *fork, ysum, ck, p, True)

    return [
        ("selective_scan", lambda: ns.selective_scan(*sel, True, False), sel_bwd),
        ("fork_scan", lambda: ns.fork_scan(*fork, p, True), fork_bwd),
        ("fork_conv1d", lambda: ns.fork_conv1d(xp, xs, w, None),
         lambda: ns.fork_conv1d_backward(dy, xp, xs, w, None)),
    ]


@pytest.mark.parametrize("i", range(3), ids=["selective_scan", "fork_scan", "fork_conv1d"])
def test_backward_repeatable_under_deterministic_algorithms(emu, i):
    """Under torch.use_deterministic_algorithms(True) the CUDA backward ops take their atomic-free
    path: no alert, bitwise-equal results run to run, and the same gradients as the atomic path and
    the CPU kernels."""
    name, fwd, bwd = _backward_calls(emu)[i]
    _, _, cpu_bwd = _backward_calls(torch.ops.vlssm)[i]
    atomic = bwd()
    with T.deterministic_algorithms(), warnings.catch_warnings():
        warnings.simplefilter("error")
        fwd()
        first, second = bwd(), bwd()
        cpu = cpu_bwd()
    for k, (a, b, c, r) in enumerate(zip(first, second, atomic, cpu)):
        assert torch.equal(a, b), f"{name} backward output {k} differs between two runs"
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=f"{name} output {k}: deterministic vs atomic")
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6, msg=f"{name} output {k}: deterministic vs CPU")


@contextlib.contextmanager
def _warnings(selftest):
    """The messages of the UserWarnings raised inside, on every torch version: Python warnings, and the
    C++ warnings torch <= 2.14 leaves in C++ when they are raised inside a direct torch.ops call (2.15
    turns those into Python warnings; autograd's backward does on every version)."""
    got = []
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        selftest.capture_cpp_warnings(True)
        try:
            yield got
        finally:
            got += selftest.capture_cpp_warnings(False)
    got += [str(w.message) for w in rec if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize("i", range(2), ids=["selective_scan", "fork_scan"])
def test_backward_with_large_dstate_alerts_under_deterministic_algorithms(emu, selftest, i):
    """N > 16 has no deterministic CUDA backward (its partials would be 4-8x larger): it raises under
    torch.use_deterministic_algorithms(True) and warns once per call with warn_only, as ATen's atomic
    kernels do; without deterministic algorithms it says nothing."""
    name, fwd, bwd = _backward_calls(emu, N=17)[i]
    alert = f"vlssm::{name}_backward on CUDA with dstate N > 16"
    with T.deterministic_algorithms():
        fwd()
        with pytest.raises(RuntimeError, match=f"{alert}.*does not have"):
            bwd()
    with T.deterministic_algorithms(warn_only=True), _warnings(selftest) as got:
        bwd()
    assert [m for m in got if alert in m and "warn_only=True" in m] == got and len(got) == 1, got
    with _warnings(selftest) as got:
        bwd()
    assert got == []


def test_cpp_warning_capture_sees_a_warning_torch_leaves_in_cpp(selftest):
    """The capture above, on a warning raised inside a direct torch.ops call (aten's resize of an out=
    tensor): one message, whichever channel this torch version uses."""
    a = torch.ones(3)
    with _warnings(selftest) as got:
        torch.ops.aten.add.out(a, a, out=torch.empty(5))
    assert len(got) == 1 and "An output with one or more elements was resized" in got[0], got


# -- the emulator itself ------------------------------------------------------

def test_emulated_shuffle_butterfly(selftest):
    out = selftest.shfl_sum(3, 64).view(6, 32)  # 3 blocks x 2 warps, every lane holds its warp's sum
    warp_sums = [float(sum(range(32))), float(sum(range(32, 64)))]  # of threadIdx.x
    assert torch.equal(out, torch.tensor(warp_sums).repeat(3)[:, None].expand(6, 32))


def test_emulated_atomics_are_atomic(selftest):
    assert selftest.atomic_count(3, 96, 200) == (3 * 96 * 200.0, 3 * 96 * 200.0)


def test_emulated_static_shared_memory_is_per_block_and_poisoned(selftest):
    out = selftest.smem_exchange(3, 40)
    assert torch.isnan(out[:, 0]).all(), "shared memory must start as NaN in every block"
    t = torch.arange(40)
    want = torch.stack([blk * 1000 + (t + 1) % 40 for blk in range(3)]).float()
    assert torch.equal(out[:, 1], want)


def test_emulated_dynamic_shared_memory_limit(selftest):
    assert selftest.dyn_smem(48 * 1024, 0) == 7
    with pytest.raises(RuntimeError, match="dynamic shared memory, the kernel allows 49152"):
        selftest.dyn_smem(48 * 1024 + 16, 0)
    assert selftest.dyn_smem(100 * 1024, 100 * 1024) == 7


def test_emulated_deadlock_raises(selftest, monkeypatch):
    monkeypatch.setenv("VLSSM_EMU_BARRIER_TIMEOUT", "1")
    with pytest.raises(RuntimeError, match="not every thread arrived"):
        selftest.deadlock()


def test_emulated_shuffle_after_exit_raises(selftest):
    with pytest.raises(RuntimeError, match="exited while lanes of its warp wait|after lanes of the warp exited"):
        selftest.shfl_after_exit()


# -- the comparison can fail --------------------------------------------------

@pytest.mark.parametrize("mutant", [
    # two bugs in one build (one compile): the 3-D case sees only the first, the grouped case the second
    "dB-last-state+B-group-offset",
    pytest.param("B-group-offset", marks=pytest.mark.skipif(not FULL, reason="alone: one more build (~1 min)")),
    pytest.param("fwd-stage-race", marks=pytest.mark.skipif(
        not FULL, reason="a race: caught through the NaN-poisoned shared memory, but not deterministically")),
])
def test_planted_bug_fails_the_comparison(mutant):
    lib = cuda_emu.build(root=ROOT, mutant=mutant)
    torch.ops.load_library(lib)
    planted = getattr(torch.ops, Path(lib).stem)  # the mutant's ops live in a namespace of its own
    bugs = mutant.split("+")
    failures = []
    check_cuda.fork_case(planted, CPU, failures, 2, 5, 7, 9, 16, torch.float32, True, False)
    name = "fork_scan b=2 E=5 p=7 s=9 N=16 torch.float32 opt=True bz=False"
    if "dB-last-state" in bugs:
        assert failures == [name + " backward"], failures
    elif "fwd-stage-race" in bugs:
        assert name in failures, failures
    else:
        assert failures == [], failures  # one group: the dropped group offset is 0 anyway
    if "B-group-offset" in bugs:  # B of group 1 read from group 0: forward and backward are wrong
        failures = []
        check_cuda.fork_layout_case(planted, CPU, failures, 2, 2 * 37, 2, 3, 16, torch.float32, 2, 2, True, False)
        name = "fork_scan b=2 E=74 p=2 s=3 N=16 torch.float32 B=g2 C=g2 opt=True S=False vs reference"
        assert failures == [name, name + " backward"], failures


# -- out-of-bounds accesses ---------------------------------------------------

def _compiler_lib(name: str):
    """The real path of the shared library `name` of the C++ compiler's runtime, or None."""
    for cc in ("c++", "g++"):
        if shutil.which(cc):
            r = subprocess.run([cc, f"-print-file-name={name}"], capture_output=True, text=True)
            path = r.stdout.strip()
            if r.returncode == 0 and os.path.isabs(path) and os.path.exists(path):
                return os.path.realpath(path)
    return None


def _asan_preload():
    """LD_PRELOAD for the ASan child: libasan first (it must be the first library loaded), then the C++
    runtime. python itself does not link libstdc++, so ASan's __cxa_throw interceptor can find no real
    __cxa_throw behind it, and the first C++ exception aborts the process ('CHECK failed:
    asan_interceptors.cpp ... real___cxa_throw'). triton 3.8 (torch 2.14.1's) throws and catches one
    while importing (libtriton's AMD module init), so the child died before running a case."""
    libs = [_compiler_lib("libasan.so"), _compiler_lib("libstdc++.so")]
    return None if None in libs else " ".join(libs)


# Runs with libasan preloaded (an ASan-built library cannot load otherwise),
# so it also builds the library: cpp_extension.load loads what it builds.
ASAN_SCRIPT = """
import sys, torch
from pathlib import Path
from vlssm.testing import cuda_emu
from vlssm.bench import check_cuda
lib = cuda_emu.build(root={root!r}, mutant={mutant!r})
emu = getattr(torch.ops, Path(lib).stem)
failures = []
for det in (False, True):  # the backward's atomic and deterministic (partials) paths
    # warn_only: N > 16 (no deterministic path) warns instead of raising, so its cases run in both modes
    torch.use_deterministic_algorithms(det, warn_only=True)
    for cid, fn, args in check_cuda.cases():
        if cid in {ids!r}:
            fn(emu, torch.device("cpu"), failures, *args)
print("FAILURES", failures)
sys.exit(1 if failures else 0)
"""


@pytest.mark.parametrize("mutant", [
    "",
    pytest.param("fwd-smem-short", marks=pytest.mark.skipif(not FULL, reason="a second ASan build (~1 min)")),
])
def test_no_out_of_bounds_access_under_asan(mutant, tmp_path):
    """The quick float32 / bfloat16 cases, the odd sizes and the default layout cases in an AddressSanitizer
    build, with every allocation NaN-filled (so an unwritten output or partial-sum slot fails the comparison), in the
    default and the deterministic mode; a planted one-element shared-memory overflow must be reported."""
    preload = _asan_preload()
    if preload is None:
        pytest.skip("libasan or libstdc++ not found")
    script = tmp_path / "asan_cases.py"
    ids = sorted(ODD | LAYOUT | {cid for cid in QUICK if "float32" in cid or "bfloat16" in cid})
    script.write_text(ASAN_SCRIPT.format(root=str(ROOT), mutant=mutant, ids=ids))
    # malloc_fill_byte: every allocation starts as 0xff bytes (NaN), so an output element no thread writes
    # fails check_cuda's isfinite check
    env = dict(os.environ, VLSSM_EMU_ASAN="1", LD_PRELOAD=preload,
               ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:malloc_fill_byte=255:max_malloc_fill_size=1073741824")
    r = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=1800)
    if mutant:
        assert r.returncode != 0 and "AddressSanitizer: heap-buffer-overflow" in r.stderr, r.stderr[-4000:]
        return
    assert r.returncode == 0, f"stdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-6000:]}"
    assert "FAILURES []" in r.stdout
