"""How vlssm's Triton kernels become torch ops.

On a GPU a kernel op is a :func:`torch.library.triton_op` whose launches go
through :func:`torch.library.wrap_triton`, so torch.compile sees the Triton
kernels themselves. Under ``TRITON_INTERPRET=1`` (CPU tensors, CI) triton.jit
returns interpreter functions that wrap_triton cannot trace (the interpreter
would run them on fake tensors), so there the op is an opaque
:func:`torch.library.custom_op` and the launch is a plain call. Every op still
gets an explicit ``register_fake`` so both variants trace the same way.

Usage (one file per op, the kernels, the op and its autograd together)::

    @kernel_op("vlssm::my_op_triton")
    def my_op(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty_like(x)
        launch(_my_kernel)[grid](x, y, ...)
        return y
"""
from __future__ import annotations

import os

import torch

__all__ = ["INTERPRET", "kernel_op", "launch", "interpreter_problem"]

#: Whether triton.jit builds interpreter functions (read once, like triton does).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernel_op(name: str, mutates_args=()):
    """Decorator defining the op ``name`` (``"vlssm::..."``) from a Python function."""
    if INTERPRET:
        return torch.library.custom_op(name, mutates_args=mutates_args)
    return torch.library.triton_op(name, mutates_args=mutates_args)


def launch(kernel):
    """The launchable form of a ``@triton.jit`` kernel inside a :func:`kernel_op`."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def interpreter_problem():
    """None when Triton's interpreter runs vlssm's kernels here, else why it cannot. Launches a probe
    kernel: call it once (vlssm._backend.load_kernels does, and keeps the answer).

    The kernels loop over runtime bounds (``for i in range(0, n, BLOCK)``). triton 3.6's interpreter
    (torch 2.11's) turns a scalar argument into a 1-element array and takes ``int()`` of it, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars"); later
    triton releases squeeze it first. A one-element probe kernel shows which case this is.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _probe(x_ptr, n):
        for i in range(0, n, 1):
            tl.store(x_ptr + i, i + 1)

    x = torch.zeros(2, dtype=torch.int32)
    try:
        _probe[(1,)](x, 2)
    except Exception as e:  # noqa: BLE001 - any failure is the reason
        import numpy

        return (f"Triton {triton.__version__}'s interpreter fails with numpy {numpy.__version__} "
                f"({type(e).__name__}: {e}); triton 3.6 needs numpy < 2.4 (`pip install 'numpy<2.4'`), "
                "or use a newer triton")
    return None if x.tolist() == [1, 2] else f"the Triton interpreter's probe kernel wrote {x.tolist()}, not [1, 2]"
