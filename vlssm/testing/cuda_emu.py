"""Build csrc/cuda/*.cu as a CPU library that runs under the CUDA emulation (tests/cuda_emu).

    python -m vlssm.testing.cuda_emu [-v] [--mutant=NAME] [--root=DIR]   # builds (or reuses), prints the .so path

The checkout it builds from is ``root`` (the ``root=`` argument of :func:`build`, else
$VLSSM_EMU_ROOT, else the current directory): its csrc/ (the kernels and their headers)
and tests/cuda_emu/ (the emulator: include/cuda_emu.h, the fake c10/cuda headers,
selftest.cu). The build lands in $VLSSM_EMU_BUILD, default <root>/build/cuda_emu.

The sources are copied with five mechanical rewrites (each must match, so a
change in the kernels' syntax fails loudly here instead of testing something
else):
  k<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(k, grid, block, smem, stream)(args)
  extern __shared__ ... T name[];         ->  T* name = ::emu::dynamic_smem();
  __shared__ T name[R][C];                ->  auto& name = ::emu::static_smem<T[R][C]>();
  TORCH_LIBRARY_IMPL(vlssm, CUDA, m) { m.impl(...) }
                                          ->  TORCH_LIBRARY_FRAGMENT(vlssm_cuda_emu, m) { m.def(...) }
  t.is_cuda()                             ->  t.is_cpu()   (the emulated kernels take CPU tensors)
(the .cu files of csrc/cuda become .cpp files, its .cuh headers (csrc/cuda/plumbing.cuh) are
copied beside them, csrc/*.h one folder up) and compiled with g++ against
tests/cuda_emu/include (cuda_emu.h and fake c10/cuda headers) ahead of torch's headers.
The ops then live in torch.ops.<library name> (vlssm_cuda_emu; the ASan and mutant builds
have their own names) with the CUDA functions' signatures, on CPU tensors; selftest.cu
(the emulator's own checks) adds torch.ops.<library name>_selftest.

VLSSM_EMU_ASAN=1 builds with AddressSanitizer (load it with libasan preloaded;
see tests/cuda_emu/test_cuda_emu.py).
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Union

NAMESPACE = "vlssm_cuda_emu"

LAUNCH = re.compile(r"(?P<k>[A-Za-z_]\w*(?:<[^<>;()]*>)?)\s*<<<(?P<cfg>.*?)>>>\s*\(", re.S)
DYN_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?(?P<t>[\w:]+(?:\s+[\w:]+)*?)\s+(?P<n>\w+)\[\];")
STATIC_SMEM = re.compile(r"(?<!extern )__shared__\s+(?P<t>[\w:<>]+)\s+(?P<n>\w+)(?P<dims>(?:\[[^\]]+\])+);")
LIB_IMPL = re.compile(r"TORCH_LIBRARY_IMPL\(vlssm,\s*CUDA,\s*m\)")


def _sub(pattern, repl, text: str, what: str, path: Path, *, at_least: int = 1) -> str:
    if isinstance(pattern, str):  # a literal
        pattern = re.compile(re.escape(pattern))
    out, n = pattern.subn(repl, text)
    if n < at_least:
        raise RuntimeError(f"{path.name}: expected {what} to rewrite, found none; update vlssm/testing/cuda_emu.py")
    return out


# Planted bugs (file, original, replacement): a build with one must fail the
# comparisons (tests/cuda_emu/test_cuda_emu.py), showing they can. A mutant
# name may join several with "+" (one build, all of them planted).
MUTANTS = {
    # the backward drops dB / dC of the last state n = N - 1
    "dB-last-state": ("scan_cuda.cu", "if (j >= jend || n >= P.N) continue;",
                      "if (j >= jend || n >= P.N - 1) continue;"),
    # the forward's dynamic shared memory is one element short (an out-of-bounds write: AddressSanitizer)
    "fwd-smem-short": ("scan_cuda.cu", "(2 * kTileF * CF::kNpad + 3 * kTileF * CF::kCPB)",
                       "(2 * kTileF * CF::kNpad + 3 * kTileF * CF::kCPB - 1)"),
    # the forward skips the barrier between staging a tile and reading it (a shared-memory race)
    "fwd-stage-race": ("scan_cuda.cu",
                       "stage_tile<T, Acc, CF, kTileF>(P, ln, sg, j0, jend, tl, false);\n    __syncthreads();",
                       "stage_tile<T, Acc, CF, kTileF>(P, ln, sg, j0, jend, tl, false);"),
    # a time-varying B is staged from group 0 in every block (the group offset dropped)
    "B-group-offset": ("scan_cuda.cu", "Bg.p += blockIdx.z * P.gB;", ""),
}


def rewrite(path: Path, registers: bool = True, mutant: str = "", ns: str = NAMESPACE) -> str:
    """The emulation source of one .cu / .cuh file (registers: it has a TORCH_LIBRARY_IMPL(vlssm, CUDA)),
    registering its ops in namespace ns (the selftest's in ns + "_selftest")."""
    text = path.read_text()
    text = text.replace(f"{NAMESPACE}_selftest", f"{ns}_selftest")
    for m in mutant.split("+") if mutant else ():
        if MUTANTS[m][0] == path.name:
            text = _sub(MUTANTS[m][1], MUTANTS[m][2], text, f"the code mutant {m} changes", path)
    if path.suffix == ".cu":
        text = _sub(LAUNCH, r"::emu::launch(\g<k>, \g<cfg>)(", text, "a <<<...>>> launch", path)
        if registers:
            text = _sub(LIB_IMPL, f"TORCH_LIBRARY_FRAGMENT({ns}, m)", text, "TORCH_LIBRARY_IMPL", path)
            text = _sub("m.impl(", "m.def(", text, "m.impl", path)
        text = _sub(DYN_SMEM, r"\g<t>* \g<n> = ::emu::dynamic_smem();", text, "extern __shared__", path, at_least=0)
        text = _sub(STATIC_SMEM, r"auto& \g<n> = ::emu::static_smem<\g<t>\g<dims>>();", text, "__shared__", path,
                    at_least=0)
        if "<<<" in text or "__shared__" in text:
            raise RuntimeError(f"{path.name}: a launch or __shared__ declaration the rewrite missed")
    else:
        text = _sub("is_cuda()", "is_cpu()", text, "is_cuda()", path)
    return text


def checkout_root(root: Union[str, Path, None] = None) -> Path:
    """The checkout to build from: ``root``, else $VLSSM_EMU_ROOT, else the current directory; it must hold
    csrc/cuda and tests/cuda_emu/include."""
    path = Path(root if root is not None else os.environ.get("VLSSM_EMU_ROOT") or os.getcwd()).resolve()
    for need in ("csrc/cuda", "tests/cuda_emu/include", "tests/cuda_emu/selftest.cu"):
        if not (path / need).exists():
            raise FileNotFoundError(f"{path} is not a vlssm checkout (no {need}): pass root= (--root=DIR) "
                                    f"or set VLSSM_EMU_ROOT")
    return path


def sources_dir(out: Path, mutant: str = "", ns: str = NAMESPACE, root: Union[str, Path, None] = None) -> List[str]:
    """Write the rewritten csrc/cuda and tests/cuda_emu/selftest.cu of checkout ``root`` into out/cuda (and
    csrc's headers into out/), the .cu files as .cpp; returns the .cpp paths."""
    root = checkout_root(root)
    csrc = root / "csrc"
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    for h in csrc.glob("*.h"):
        shutil.copyfile(h, out / h.name)
    srcs = []
    files = [(f, True) for f in sorted((csrc / "cuda").iterdir()) if f.suffix in (".cu", ".cuh")]
    for f, registers in files + [(root / "tests" / "cuda_emu" / "selftest.cu", False)]:
        dst = out / "cuda" / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
        text = rewrite(f, registers, mutant, ns)
        if not dst.exists() or dst.read_text() != text:  # keep mtimes: ninja rebuilds only what changed
            dst.write_text(text)
        if f.suffix == ".cu":
            srcs.append(str(dst))
    return srcs


def asan() -> bool:
    return os.environ.get("VLSSM_EMU_ASAN", "") not in ("", "0")


def build(root: Union[str, Path, None] = None, mutant: str = "", verbose: bool = False) -> str:
    """Build (or reuse) the emulation library of checkout ``root`` (see :func:`checkout_root`); returns the
    path of the .so (not loaded).

    mutant: a key of MUTANTS to plant that bug, or keys joined by "+" (its own library name and build folder).
    """
    from torch.utils import cpp_extension

    root = checkout_root(root)
    for m in mutant.split("+") if mutant else ():
        if m not in MUTANTS:
            raise ValueError(f"unknown mutant {m!r}; known: {sorted(MUTANTS)}")
    suffix = f"_{mutant.replace('-', '_').replace('+', '_')}" if mutant else ""
    name = NAMESPACE + ("_asan" if asan() else "") + suffix
    base = Path(os.environ.get("VLSSM_EMU_BUILD") or root / "build" / "cuda_emu")
    out = base / name
    srcs = sources_dir(out / "src", mutant, ns=name, root=root)
    flags = ["-O2", "-g0", "-pthread", "-Wno-unknown-pragmas"]
    ldflags = ["-pthread"]
    if asan():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    cpp_extension.load(name=name, sources=srcs, extra_cflags=flags, extra_ldflags=ldflags,
                       extra_include_paths=[str(root / "tests" / "cuda_emu" / "include")], build_directory=str(out),
                       is_python_module=False, verbose=verbose)
    return str(out / f"{name}.so")


def main(argv: Optional[List[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m vlssm.testing.cuda_emu", description=__doc__.split("\n\n")[0])
    ap.add_argument("-v", "--verbose", action="store_true", help="show the compiler's commands")
    ap.add_argument("--mutant", default="", help=f"plant bugs (names joined by '+'): {', '.join(MUTANTS)}")
    ap.add_argument("--root", default=None,
                    help="the vlssm checkout (default $VLSSM_EMU_ROOT, else the current directory)")
    a = ap.parse_args(argv)
    print(build(root=a.root, mutant=a.mutant, verbose=a.verbose))
    return 0


if __name__ == "__main__":
    sys.exit(main())
