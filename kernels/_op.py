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

__all__ = ["INTERPRET", "kernel_op", "launch"]

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
