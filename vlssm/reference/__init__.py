"""Pure-PyTorch references (float64-capable): the ground truth for every op, one file per op
family (scan, conv, attention, ifm)."""
from .attention import attention_with_probs_ref
from .conv import fork_conv1d_ref
from .ifm import kcr_loss_ref, relation_aggregate_ref
from .scan import fork_scan_ref, selective_scan_ref

__all__ = ["selective_scan_ref", "fork_conv1d_ref", "fork_scan_ref", "attention_with_probs_ref",
           "relation_aggregate_ref", "kcr_loss_ref"]
