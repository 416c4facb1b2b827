"""Analytic cost models and profiling helpers (no GPU needed)."""
from .flops import FlopBreakdown, mamba_dims, qmvl_flops, qmvl_flops_per_image

__all__ = ["FlopBreakdown", "mamba_dims", "qmvl_flops", "qmvl_flops_per_image"]
