"""Analytic cost models and profiling helpers (no GPU needed)."""
from .flops import FlopBreakdown, FlopCount, count_flops, mamba_dims, qmvl_flops, qmvl_flops_per_image

__all__ = ["FlopBreakdown", "FlopCount", "count_flops", "mamba_dims", "qmvl_flops", "qmvl_flops_per_image"]
