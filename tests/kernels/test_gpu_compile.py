"""Every Triton kernel compiles for sm_80 and sm_90, and QMVL on the Triton ops traces under
torch.compile(fullgraph=True), without a GPU (see aot_compile.py).

The op tests run the kernels in the interpreter, which compiles nothing; this
is the check that the same kernels, with the variants the ops launch, get
through Triton's compiler and ptxas for the GPUs vlssm targets.
"""
import subprocess
import sys
from pathlib import Path

import pytest

from vlssm import testing as T

SCRIPT = Path(__file__).with_name("aot_compile.py")
KERNELS = ["_scan_fwd_kernel", "_scan_bwd_kernel", "_conv_fwd_kernel", "_conv_dx_kernel", "_attn_fwd_kernel",
           "_attn_ds_kernel", "_mix_matmul_kernel", "_relagg_map_grad_kernel", "_kcr_fwd_kernel", "_kcr_bwd_kernel"]


@pytest.mark.parametrize("sm", [80, 90])
def test_triton_kernels_compile_for_gpu(sm, tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.driver", reason="triton without its CUDA backend")
    r = subprocess.run([sys.executable, str(SCRIPT), str(sm)], cwd=tmp_path, env=T.child_env(),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr[-4000:]}"
    assert "traced QMVL forward+backward" in r.stdout
    for name in KERNELS:
        assert f"compiled for sm_{sm}: {name}:" in r.stdout, f"{name} was not compiled:\n{r.stdout}"
