"""Build csrc/cuda/*.cu as a CPU library that runs under the CUDA emulation.

    python tests/cuda_emu/build.py [-v] [--mutant=NAME]   # builds (or reuses) and prints the .so path

The sources are copied with five mechanical rewrites (each must match, so a
change in the kernels' syntax fails loudly here instead of testing something
else):
  k<<<grid, block, smem, stream>>>(args)  ->  ::emu::launch(k, grid, block, smem, stream)(args)
  extern __shared__ ... T name[];         ->  T* name = ::emu::dynamic_smem();
  __shared__ T name[R][C];                ->  auto& name = ::emu::static_smem<T[R][C]>();
  TORCH_LIBRARY_IMPL(vlssm, CUDA, m) { m.impl(...) }
                                          ->  TORCH_LIBRARY_FRAGMENT(vlssm_cuda_emu, m) { m.def(...) }
  t.is_cuda()                             ->  t.is_cpu()   (the emulated kernels take CPU tensors)
and compiled with g++ against include/ (cuda_emu.h and fake c10/cuda
headers) ahead of torch's headers. The ops then live in
torch.ops.<library name> (vlssm_cuda_emu; the ASan and mutant builds have
their own names) with the CUDA functions' signatures, on CPU tensors;
selftest.cu (the emulator's own checks) adds torch.ops.<library name>_selftest.

VLSSM_EMU_ASAN=1 builds with AddressSanitizer (load it with libasan preloaded;
see test_cuda_emu.py).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CSRC = ROOT / "csrc"
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
        raise RuntimeError(f"{path.name}: expected {what} to rewrite, found none; update tests/cuda_emu/build.py")
    return out


# Planted bugs (file, original, replacement): a build with one must fail the
# comparisons (tests/cuda_emu/test_cuda_emu.py), showing they can. A mutant
# name may join several with "+" (one build, all of them planted).
MUTANTS = {
    # the backward drops dB / dC of the last state n = N - 1
    "dB-last-state": ("scan_cuda.cu", "if (j >= jend || n >= P.N) continue;", "if (j >= jend || n >= P.N - 1) continue;"),
    # the forward's dynamic shared memory is one element short (an out-of-bounds write: AddressSanitizer)
    "fwd-smem-short": ("scan_cuda.cu", "(2 * kTileF * CF::kNpad + 3 * kTileF * CF::kCPB)",
                       "(2 * kTileF * CF::kNpad + 3 * kTileF * CF::kCPB - 1)"),
    # the forward skips the barrier between staging a tile and reading it (a shared-memory race)
    "fwd-stage-race": ("scan_cuda.cu", "stage_tile<T, Acc, CF, kTileF>(P, ln, sg, j0, jend, tl, false);\n    __syncthreads();",
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


def sources_dir(out: Path, mutant: str = "", ns: str = NAMESPACE) -> list:
    """Write the rewritten csrc/cuda and selftest.cu into out/cuda (and csrc's headers into out/), the .cu
    files as .cpp; returns the .cpp paths."""
    (out / "cuda").mkdir(parents=True, exist_ok=True)
    for h in CSRC.glob("*.h"):
        shutil.copyfile(h, out / h.name)
    srcs = []
    files = [(f, True) for f in sorted((CSRC / "cuda").iterdir()) if f.suffix in (".cu", ".cuh")]
    for f, registers in files + [(HERE / "selftest.cu", False)]:
        dst = out / "cuda" / (f.stem + ".cpp" if f.suffix == ".cu" else f.name)
        text = rewrite(f, registers, mutant, ns)
        if not dst.exists() or dst.read_text() != text:  # keep mtimes: ninja rebuilds only what changed
            dst.write_text(text)
        if f.suffix == ".cu":
            srcs.append(str(dst))
    return srcs


def asan() -> bool:
    return os.environ.get("VLSSM_EMU_ASAN", "") not in ("", "0")


def build(verbose: bool = False, mutant: str = "") -> str:
    """Build (or reuse) the emulation library; returns the path of the .so (not loaded).

    mutant: a key of MUTANTS to plant that bug, or keys joined by "+" (its own library name and build folder).
    """
    from torch.utils import cpp_extension

    name = NAMESPACE + ("_asan" if asan() else "") + (f"_{mutant.replace('-', '_').replace('+', '_')}" if mutant else "")
    base = Path(os.environ.get("VLSSM_EMU_BUILD", ROOT / "build" / "cuda_emu"))
    out = base / name
    srcs = sources_dir(out / "src", mutant, ns=name)
    flags = ["-O2", "-g0", "-pthread", "-Wno-unknown-pragmas"]
    ldflags = ["-pthread"]
    if asan():
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    cpp_extension.load(name=name, sources=srcs, extra_cflags=flags, extra_ldflags=ldflags,
                       extra_include_paths=[str(HERE / "include")], build_directory=str(out),
                       is_python_module=False, verbose=verbose)
    return str(out / f"{name}.so")


if __name__ == "__main__":
    mut = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--mutant=")]
    print(build(verbose="-v" in sys.argv, mutant=mut[0] if mut else ""))
