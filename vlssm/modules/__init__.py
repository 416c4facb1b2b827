"""nn.Modules built on the vlssm ops: the Mamba mixer and block, and QMVL; and PDLR
(prompt-driven label representation; needs open_clip, imported when a PDLR is built)."""
from .mamba import Mamba, MambaBlock
from .pdlr import PDLR
from .qmvl import QMVL

__all__ = ["Mamba", "MambaBlock", "PDLR", "QMVL"]
