"""vlssm.kernels: the Triton kernels (``backend="triton"``), installed from kernels/.

One file per op family: its ``@triton.jit`` kernels, the ops built from them
(:mod:`._op`: triton_op on GPU, custom_op under ``TRITON_INTERPRET=1``), their
fake and autograd registrations (and, at the end, their FLOP formulas:
vlssm/ops/flops.py). Importing this package defines the ops; it is
imported by ``import vlssm.ops`` when triton is installed (never inside a
torch.compile trace). Kernels read their operands through strides or the op
makes them contiguous first: a stride-0 gradient (from ``.sum()``) is common.
"""
from . import attention  # noqa: E402,F401
from . import ifm_ops  # noqa: E402,F401
from . import fork_conv1d  # noqa: E402,F401
from . import scan  # noqa: E402,F401

# FLOP formulas (torch.utils.flop_counter) for the ops just defined; idempotent.
from ..ops import flops as _flops  # noqa: E402

_flops.register()
