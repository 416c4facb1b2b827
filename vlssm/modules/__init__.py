"""nn.Modules built on the vlssm ops: the Mamba mixer and block, and QMVL."""
from .mamba import Mamba, MambaBlock
from .qmvl import QMVL

__all__ = ["Mamba", "MambaBlock", "QMVL"]
