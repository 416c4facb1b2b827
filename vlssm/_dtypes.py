"""The dtype rules every layer shares (ops, kernels, references, modules, losses, tests).

One rule, written once: states, parameters and reductions are accumulated in
float32, or in float64 when the inputs are float64 (mamba_ssm's ``.float()``,
with float64 kept as the ground-truth precision). The compiled kernels apply the
same rule in csrc/checks.h (``acc_dtype``).
"""
from __future__ import annotations

import torch

__all__ = ["FLOATING", "acc_dtype"]

#: The floating dtypes every op accepts.
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation (state / parameter) dtype for inputs of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
