"""Models on vlssm's ops: a registry and factory (``create_model``), the CLIP backbone adapter and
the model families (MVLR and its Baseline, CAPNET, Candle). Importing this package fills the registry; ``import
vlssm`` does not import it (``vlssm.models`` is loaded on first access).

    from vlssm import models
    model = models.create_model("mvlr", classnames, backbone="RN101", image_size=448)
    logits = model(images)                 # (B, C)
    out = model(images, targets)           # ModelOutput(logits, loss, aux)
"""
from ._clip import BackboneOutput, CLIPBackbone, build_clip
from ._registry import (
                        CHECKPOINT_FORMAT,
                        ModelOutput,
                        create_model,
                        list_models,
                        load_checkpoint,
                        register_model,
                        save_checkpoint,
)
from .candle import Candle, CandleConfig
from .capnet import CAPNet, CAPNetConfig
from .mvlr import MVLR, MVLRBaseline, MVLRConfig

__all__ = ["BackboneOutput", "CLIPBackbone", "build_clip", "CHECKPOINT_FORMAT", "ModelOutput", "create_model",
           "list_models", "load_checkpoint", "register_model", "save_checkpoint", "MVLR", "MVLRBaseline",
           "MVLRConfig", "Candle", "CandleConfig", "CAPNet", "CAPNetConfig"]
