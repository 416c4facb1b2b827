"""Build vlssm: the compiled extension vlssm._C (csrc/) and the Triton package vlssm.kernels (kernels/).

C++ CPU kernels are always built. CUDA sources (csrc/cuda/*.cu) are compiled when
torch has CUDA and nvcc is found; VLSSM_FORCE_CUDA=1 / VLSSM_SKIP_CUDA=1 override
the detection. TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured (torch reads them).
Nothing is downloaded. Build without isolation so the extension matches the
installed torch:  pip install --no-build-isolation .
"""
import glob
import os
import re
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_home_from_wrapper():
    """Resolve CUDA_HOME when `nvcc` on PATH is a wrapper script that execs the real one."""
    nvcc = shutil.which("nvcc")
    if not nvcc:
        return None
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    m = re.search(rb"exec\s+(\S+/bin/nvcc)", head)
    return os.path.dirname(os.path.dirname(m.group(1).decode())) if m else None


def _want_cuda():
    if _truthy("VLSSM_SKIP_CUDA"):
        return False
    cu_sources = glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
    if _truthy("VLSSM_FORCE_CUDA"):
        return True
    if not cu_sources:
        return False
    import torch

    return torch.version.cuda is not None and (shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME"))


def extensions():
    want_cuda = _want_cuda()
    if want_cuda and not os.environ.get("CUDA_HOME"):
        home = _cuda_home_from_wrapper()
        if home:
            os.environ["CUDA_HOME"] = home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if want_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        return [CUDAExtension("vlssm._C", sources,
                              extra_compile_args={"cxx": cxx + ["-DVLSSM_WITH_CUDA"], "nvcc": nvcc},
                              extra_link_args=["-fopenmp"])]
    return [CppExtension("vlssm._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]


def build_ext_cls():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)


setup(
    packages=["vlssm", "vlssm.ops", "vlssm.reference", "vlssm.modules", "vlssm.models", "vlssm.profile",
              "vlssm.kernels", "vlssm.data", "vlssm.bench", "vlssm.testing"],
    package_dir={"vlssm.kernels": "kernels"},
    package_data={"vlssm.models": ["configs/*.json"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": build_ext_cls()},
)
