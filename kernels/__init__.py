"""vlssm.kernels: the Triton kernels (``backend="triton"``), installed from kernels/.

One file per op family: its ``@triton.jit`` kernels, the ops built from them
(:mod:`._op`: triton_op on GPU, custom_op under ``TRITON_INTERPRET=1``), their
fake and autograd registrations (and, at the end, their FLOP formulas:
vlssm/ops/flops.py). Importing this package defines the ops; it is
imported by ``import vlssm.ops`` when triton is installed (never inside a
torch.compile trace). Kernels read their operands through strides or the op
makes them contiguous first: a stride-0 gradient (from ``.sum()``) is common.
"""
from ..ops import flops as _flops
from . import attention, conv, ifm, scan  # noqa: F401 - importing each defines its Triton ops

# FLOP formulas (torch.utils.flop_counter) for the ops just defined; idempotent.
_flops.register()
