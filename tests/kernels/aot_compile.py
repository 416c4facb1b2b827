"""Compile every Triton kernel of vlssm.kernels for a GPU, on a machine without one.

    python tests/kernels/aot_compile.py [sm]      (default sm 90; run by test_gpu_compile.py)

The interpreter (what the op tests run) never compiles a kernel, so a kernel
that only fails to compile for a GPU (a type the compiler rejects, a shape it
cannot lay out, a loop it cannot lower) would pass CI and fail on the first
GPU. Here Triton runs compiled (TRITON_INTERPRET=0) against a stand-in CUDA
driver that reports a GPU target and no device: every launch is a
``warmup`` (compile to PTX and a cubin with ptxas, launch nothing). The ops
are then called with backend="triton" on CPU tensors, forward and backward,
in float32, bfloat16 and float64, so every kernel is compiled with the
constexpr variants the ops really use, through torch.library.triton_op +
wrap_triton as on a GPU; and QMVL on the Triton backend is traced whole by
torch.compile(fullgraph=True) (run by aot_eager), forward and backward. The outputs are garbage (nothing ran); only the
compilation is checked. Prints one line per kernel (variants compiled; the most registers, shared
memory, stack frame and local bytes over them; cuobjdump's counts) and
exits 1 if any kernel (a ``@triton.jit`` function named ``*_kernel``; the
others are helpers they call) failed to compile or was never launched.
"""
from __future__ import annotations

import os
import sys
from collections import defaultdict

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SM = int(sys.argv[1]) if len(sys.argv) > 1 else 90


class StandInCuda(CudaDriver):
    """A CUDA driver with a target and no device: enough to compile."""

    def __init__(self):  # no libcuda
        self.target = GPUTarget("cuda", SM, 32)

    @staticmethod
    def is_active():
        return True

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0


compiled = defaultdict(dict)  # kernel name -> {cubin: shared memory bytes Triton asks for}
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled[self.fn.__name__][kernel.asm["cubin"]] = kernel.metadata.shared
    return kernel


def resource_usage(cubin: bytes) -> dict:
    """{"REG": n, "STACK": n, "LOCAL": n} of a cubin (Triton's bundled cuobjdump); spilled
    registers live in the stack frame."""
    import re
    import subprocess
    import tempfile

    import triton.backends.nvidia as nv

    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def main() -> int:
    driver.set_active(StandInCuda())
    JITFunction.run = _compile_only
    from vlssm import _backend, ops
    from vlssm._dtypes import acc_dtype

    usable = _backend._usable
    _backend._usable = lambda name, device: None if name == "triton" else usable(name, device)
    kernels = _backend.load_kernels()
    assert kernels is not None, _backend.kernels_error()

    def leaf(*shape, dtype):
        return torch.randn(*shape).to(dtype).requires_grad_(True)

    def backward(*outs):
        torch.autograd.backward([o for o in outs if o.requires_grad],
                                [torch.ones_like(o) for o in outs if o.requires_grad])

    for dt in (torch.float32, torch.bfloat16, torch.float64):
        acc = acc_dtype(dt)
        b, p, s, E, N, K = 2, 7, 5, 48, 16, 4
        L = p + 2 * s
        prm = lambda *sh: torch.randn(*sh, dtype=acc).requires_grad_(True)  # noqa: E731
        backward(ops.fork_scan(leaf(b, L, E, dtype=dt), leaf(b, L, E, dtype=dt), -prm(E, N).exp(),
                               leaf(b, L, N, dtype=dt), leaf(b, L, N, dtype=dt), prm(E), leaf(b, s, E, dtype=dt),
                               prm(E), p, backend="triton"))
        out, last = ops.selective_scan(leaf(b, E, L, dtype=dt), leaf(b, E, L, dtype=dt), -prm(E, N).exp(),
                                       leaf(b, N, L, dtype=dt), leaf(b, N, L, dtype=dt), prm(E),
                                       leaf(b, E, L, dtype=dt), prm(E), True, True, reverse=True,
                                       initial_state=prm(b, E, N), backend="triton")
        backward(out, last)
        backward(ops.fork_conv1d(leaf(b, p, E, dtype=dt), leaf(b, s, E, dtype=dt), leaf(E, K, dtype=dt),
                                 leaf(E, dtype=dt), backend="triton"))
        backward(*ops.attention_with_probs(leaf(b, 9, 32, dtype=dt), leaf(b, 11, 32, dtype=dt),
                                           leaf(b, 11, 16, dtype=dt), backend="triton"))
        C = 20
        backward(ops.relation_aggregate(leaf(C, C, dtype=dt), leaf(b, C, C, dtype=dt), leaf(b, C, 32, dtype=dt),
                                        torch.tensor(0.3, dtype=dt, requires_grad=True), backend="triton"))
        backward(ops.kcr_loss(leaf(C, 32, dtype=dt), leaf(b, C, 32, dtype=dt), backend="triton"))

    # The GPU op path (torch.library.triton_op + wrap_triton) under torch.compile: QMVL on the
    # Triton backend, forward and backward, traced whole (fullgraph) and run by aot_eager.
    import vlssm

    model = vlssm.QMVL(32, backend="triton")
    x, t = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 3, 32, requires_grad=True)
    backward(*torch.compile(model, fullgraph=True, backend="aot_eager")(x, t))
    print("torch.compile(fullgraph=True) traced QMVL forward+backward on the Triton ops")

    launched = {name for name, obj in vars_of_kernels(kernels)
                if isinstance(obj, JITFunction) and name.endswith("_kernel")}  # not the @triton.jit helpers
    for name in sorted(compiled):
        use = [dict(resource_usage(c), SHARED=shared) for c, shared in compiled[name].items()]
        top = {k: max(u.get(k, 0) for u in use) for k in ("REG", "SHARED", "STACK", "LOCAL")}
        print(f"compiled for sm_{SM}: {name}: {len(use)} variant(s); at most {top['REG']} registers, "
              f"{top['SHARED']} B shared memory, {top['STACK']} B stack frame (spills), {top['LOCAL']} B local")
    never = sorted(launched - set(compiled))
    for name in never:
        print(f"NEVER LAUNCHED: {name}")
    return 1 if never else 0


def vars_of_kernels(pkg):
    """(name, object) of every top-level object of the vlssm.kernels modules."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        yield from vars(mod).items()


if __name__ == "__main__":
    sys.exit(main())
