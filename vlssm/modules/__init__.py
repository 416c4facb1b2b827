"""nn.Modules built on the vlssm ops: the Mamba mixer and block, QMVL, the IFM; and PDLR
(prompt-driven label representation; needs open_clip, imported when a PDLR is built)."""
from .ifm import IFM, IFMOutput, LabelAttention
from .mamba import Mamba, MambaBlock
from .pdlr import PDLR
from .qmvl import QMVL

__all__ = ["Mamba", "MambaBlock", "QMVL", "IFM", "IFMOutput", "LabelAttention", "PDLR"]
