"""Pure-PyTorch references (float64-capable): the ground truth for every op."""
from .scan import fork_conv1d_ref, fork_scan_ref, selective_scan_ref

__all__ = ["selective_scan_ref", "fork_conv1d_ref", "fork_scan_ref"]
