"""The source tree follows the op-family naming scheme (README "Where things live").

Every op of ``vlssm.ops.FAMILIES`` has its files under its family's name in every layer, those
files hold what the scheme says (the schema, the kernel registrations, the public function, the
reference, the tests), and no layer holds a file outside the scheme. Reads the checkout's sources
(the files next to this test), so it runs from the repository as CI does.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import vlssm.ops
import vlssm.reference

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = vlssm.ops.FAMILIES
OPS = [(family, op) for family, ops in FAMILIES.items() for op in ops]

#: Files of each layer that are shared by every family (the README's second table).
SHARED = {
    "csrc": {"vlssm.cpp", "checks.h", "fast_math.h"},
    "csrc/cpu": {"simd.h"},
    "csrc/cuda": {"plumbing.cuh"},
    "kernels": {"__init__.py", "_op.py"},
    "vlssm/ops": {"__init__.py", "_checks.py", "flops.py"},
    "vlssm/reference": {"__init__.py"},
}
#: The file name pattern of a family's file in each layer.
PATTERNS = {
    "csrc": ("{f}.cpp", "{f}_shapes.h"),
    "csrc/cpu": ("{f}_cpu.cpp",),
    "csrc/cuda": ("{f}_cuda.cu",),
    "kernels": ("{f}.py",),
    "vlssm/ops": ("{f}.py",),
    "vlssm/reference": ("{f}.py",),
}


def _read(rel: str) -> str:
    return (ROOT / rel).read_text()


pytestmark = pytest.mark.skipif(not (ROOT / "csrc").is_dir(), reason="needs the source checkout")


def test_every_public_op_belongs_to_one_family():
    listed = [op for _, op in OPS]
    assert sorted(listed) == sorted(vlssm.ops.__all__), "vlssm.ops.FAMILIES and vlssm.ops.__all__ disagree"
    assert len(set(listed)) == len(listed), "an op is listed in two families"


@pytest.mark.parametrize("layer", sorted(PATTERNS))
def test_no_file_outside_the_scheme(layer):
    allowed = set(SHARED.get(layer, ())) | {p.format(f=f) for f in FAMILIES for p in PATTERNS[layer]}
    sources = (".cpp", ".h", ".cu", ".cuh", ".py")
    present = {p.name for p in (ROOT / layer).iterdir() if p.is_file() and p.suffix in sources}
    stray = sorted(present - allowed)
    assert not stray, f"{layer}/ holds files outside the family scheme: {stray} (README 'Where things live')"


@pytest.mark.parametrize("family,op", OPS)
def test_op_files_follow_its_family(family, op):
    # schema: in the family's fragment and nowhere else
    for cpp in sorted((ROOT / "csrc").glob("*.cpp")):
        defines = re.search(rf'm\.def\(\s*"{op}\(', cpp.read_text()) is not None
        assert defines == (cpp.name == f"{family}.cpp"), f"{op}'s schema: expected in csrc/{family}.cpp, {cpp.name}"
    # the CPU kernel (and the CUDA kernel where the family has one) registers the op and its backward
    cpu = _read(f"csrc/cpu/{family}_cpu.cpp")
    assert f'm.impl("{op}"' in cpu and f'm.impl("{op}_backward"' in cpu, f"csrc/cpu/{family}_cpu.cpp"
    cuda = ROOT / "csrc" / "cuda" / f"{family}_cuda.cu"
    if cuda.exists():
        assert f'm.impl("{op}"' in cuda.read_text(), f"csrc/cuda/{family}_cuda.cu does not register {op}"
    # the Triton pair
    kern = _read(f"kernels/{family}.py")
    assert f'"vlssm::{op}_triton"' in kern and f'"vlssm::{op}_backward_triton"' in kern, f"kernels/{family}.py"
    # the public function, its registrations and its reference
    assert getattr(vlssm.ops, op).__module__ == f"vlssm.ops.{family}"
    assert f'"vlssm::{op}"' in _read(f"vlssm/ops/{family}.py"), f"vlssm/ops/{family}.py registers no fake for {op}"
    assert getattr(vlssm.reference, f"{op}_ref").__module__ == f"vlssm.reference.{family}"
    # tests
    tests = sorted((ROOT / "tests" / "ops").glob(f"test_{family}*.py"))
    assert any(op in t.read_text() for t in tests), f"no tests/ops/test_{family}*.py tests {op}"


def test_readme_table_names_every_family_and_op():
    readme = _read("README.md")
    section = readme[readme.index("## Where things live"):]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    for family, ops in FAMILIES.items():
        assert family in rows, f"README 'Where things live' has no row for {family}"
        for op in ops:
            assert f"`{op}`" in rows[family], f"README row {family} does not name {op}"
        for layer, patterns in PATTERNS.items():
            for p in patterns:
                name = p.format(f=family)
                if (ROOT / layer / name).exists():
                    assert f"{layer}/{name}" in rows[family], f"README row {family} does not name {layer}/{name}"


def test_op_test_files_are_named_for_their_family():
    shared = {"conftest.py", "test_op_flops.py"}  # fixtures; the FLOP formulas of every family
    names = {p.name for p in (ROOT / "tests" / "ops").glob("*.py")} - shared
    stray = sorted(n for n in names if not any(n.startswith(f"test_{f}") for f in FAMILIES))
    assert not stray, f"tests/ops/ files not named test_<family>*.py: {stray}"
