"""Public ops of vlssm, in four families: scan, conv, attention, ifm. Each family has one name in
every layer: schemas csrc/<family>.cpp, kernels csrc/cpu/<family>_cpu.cpp, csrc/cuda/<family>_cuda.cu
and kernels/<family>.py (Triton), the public functions with their fake and autograd registrations
vlssm/ops/<family>.py, the pure-PyTorch reference vlssm/reference/<family>.py, the tests
tests/ops/test_<family>*.py (README "Where things live").

- :func:`selective_scan` — mamba_ssm ``selective_scan_fn`` semantics (channel-major
  (b, D, L)) plus ``reverse`` and ``initial_state``.
- :func:`fork_conv1d` — depthwise causal conv + SiLU of ``[P, S]`` and ``[P, rev S]``
  (token-major (b, L, E)).
- :func:`fork_scan` — scan the prefix once, fork the state into the forward and the
  reversed suffix, add D*u, sum, gate (token-major).
- :func:`attention_with_probs` — softmax attention returning ``(out, probs)``, both
  differentiable, in one pass.
- :func:`relation_aggregate`, :func:`kcr_loss` — MVLR's Interaction and Fusion
  Module: mixed relation map times label embeddings; knowledge-consistency loss.
"""
from .attention import attention_with_probs
from .conv import fork_conv1d
from .ifm import kcr_loss, relation_aggregate
from .scan import fork_scan, selective_scan

__all__ = ["selective_scan", "fork_conv1d", "fork_scan", "attention_with_probs", "relation_aggregate",
           "kcr_loss"]

#: The op families and their ops. A family has one name in every layer: csrc/<family>.cpp (schemas),
#: csrc/cpu/<family>_cpu.cpp, csrc/cuda/<family>_cuda.cu, kernels/<family>.py, vlssm/ops/<family>.py,
#: vlssm/reference/<family>.py, tests/ops/test_<family>*.py (README "Where things live";
#: tests/test_layout.py holds the tree to it).
FAMILIES = {
    "scan": ("selective_scan", "fork_scan"),
    "conv": ("fork_conv1d",),
    "attention": ("attention_with_probs",),
    "ifm": ("relation_aggregate", "kcr_loss"),
}


def _register() -> None:
    """Fake (meta) and autograd registrations; called once vlssm._C is loaded (the FLOP formulas:
    the end of this module, and kernels/__init__.py for the Triton ops)."""
    from . import attention, conv, ifm, scan

    scan.register()
    conv.register()
    attention.register()
    ifm.register()


# Register the compiled kernels with their fake / autograd implementations now,
# outside any torch.compile trace. Without the extension the ops still work on
# the reference backend, and `vlssm env` says why.
from .._backend import load_extension as _load_extension  # noqa: E402
from .._backend import load_kernels as _load_kernels  # noqa: E402
from .._backend import triton_available as _triton_available  # noqa: E402

_load_extension()
# The Triton kernels define their own ops (torch.library.triton_op); define them
# now too, so that a torch.compile trace never imports them.
if _triton_available():
    _load_kernels()
# FLOP formulas (vlssm/ops/flops.py) for every op defined now: the compiled ops, the Triton ops and
# the aten ops torch's counter misses (also without the extension). kernels/__init__.py registers its
# ops' formulas again when imported on its own; register() is idempotent.
from . import flops as _flops  # noqa: E402

_flops.register()
