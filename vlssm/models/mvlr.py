"""MVLR (Mamba-enhanced visual-linguistic representation) and its Baseline, on vlssm's ops.

MVLR ("Mamba-Enhanced Visual-Linguistic Representation for Multi-Label Image Recognition",
sections 3.2-3.5), for images (B, 3, S, S) and C class names::

    X               = backbone(images)                 (B, M, d)  CLIP dense tokens (models._clip)
    T^hard, T^soft  = PDLR(classnames)                 (C, d)     hard / soft prompts, frozen text encoder
    T^ifm, L_KCR    = IFM(X, T^hard, T^soft)           (B, C, d)  label attention, context-aware attention,
                                                                  channel interaction, relation aggregation
    T               = T^soft + tanh(g) T^ifm           (B, C, d)  gated skip, g learnable, 0 at init
                                                                  (``ifm_gate``; False: T = T^ifm, Eq. 10)
    X^rf, T^rf      = QMVL(X, T)                       (B, M, d), (B, C, d)
    logit_j         = s * cos(mean_m X^rf_m, T^rf_j)   (B, C)     p_j = sigmoid(logit_j)      (Eq. 12)
    L               = ASL(gamma+ = 0, gamma- = 2) + 4.0 * L_KCR                                  (Eq. 14)

The Baseline (paper Table 4 / Table 9): the same backbone, logits from fixed label
embeddings of the bare class names, no PDLR / IFM / QMVL::

    logit_j = s * cos(pooled(images), T^name_j),     L = ASL

Assumptions where the paper is silent (each also on the config field):

* Token pooling and logit scale (Eq. 12 writes ``sigmoid(X^rf T_j^T)`` without saying how
  the M tokens of X^rf become one vector): the mean over tokens (global average pooling,
  as the ResNet heads of ASL and ML-GCN) and a cosine similarity times a learnable scale
  ``s`` = exp(logit_scale), initialised to CLIP's 1 / 0.07. CLIP's joint space compares
  directions, and a raw dot product of d = 512 features starts the sigmoid saturated.
* The image encoder is fine-tuned (``freeze_backbone=False``): the paper says only that
  "the text encoder remains fixed during the training phase", and trains with AdamW at
  1e-4 for 30 epochs, as ASL / Q2L fine-tune their backbones.
* ASL: ``clip`` = 0.05 and ``eps`` = 1e-8 (ASL's published defaults; MVLR follows ASL and
  gives only the gammas); the classification loss is Eq. 13's mean over the C classes, then
  the mean over the batch (``reduction="mean"``), so that lambda = 4 weighs L_KCR (a mean
  over classes, in [0, 2]) against a loss of the same scale.
* Dense tokens for ResNets: the final feature map through the attention pool's value and
  output projections (DualCoOp's convention; see models._clip).
* The Baseline's label embeddings use the bare class name as the prompt (the paper's
  "pure category names"); ``baseline_template`` changes it.
* A gated skip around IFM (``ifm_gate=True``, this library's addition; ``False`` is Eq. 10 as
  written): ``T = T^soft + tanh(g) T^ifm`` with one learnable scalar g initialised to 0, the
  zero-initialised tanh gate of Flamingo's gated cross-attention (which the paper cites). Why:
  every IFM output row is a convex combination (attention, then Eq. 10's relation aggregation) of
  the same rows, and at initialisation the attention maps are near uniform, so IFM maps distinct
  labels to one vector. Measured with random weights: orthogonal T^hard, T^soft (d = 512, M = 196)
  come out of IFM with a mean pairwise cosine of 0.9999, so the classifier weights T^rf start
  identical for every class. On the demo (``vlssm train mvlr``: digit mosaics, a random tiny
  backbone, 300 steps of AdamW at 1e-3), MVLR as written reached a test mAP of 0.38 (chance) and
  0.69 after 2,000 steps; with the gate 0.999 after 300, as the Baseline's 0.99. With the gate at 0
  the model starts as PDLR + QMVL; IFM's weights first get gradient from L_KCR and the gate's
  (relation aggregation's ``alpha`` once the gate has moved).

Inference never runs the text encoder: T^hard is a buffer, T^soft is cached by PDLR in eval
mode while no gradient can reach its context (invalidated by any change), and IFM caches its
label attention the same way. Training runs the text encoder once per step (not per image)
on the soft prompts cut after their last end-of-text token (PDLR.truncate).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import AsymmetricLoss
from ..modules import IFM, PDLR, QMVL
from ._clip import CLIPBackbone, build_clip
from ._registry import ModelOutput, register_model

__all__ = ["MVLRConfig", "MVLR", "MVLRBaseline", "check_targets"]

_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial logit scale


@dataclass
class MVLRConfig:
    """MVLR's settings; the defaults are the paper's (section 4.2) or the documented assumptions.

    Fields:
        backbone: open_clip model name (ResNet-101 by default, as the paper).
        image_size: input side S (448 in the paper).
        clip_checkpoint: a local open_clip / OpenAI CLIP file for both encoders, or None (random).
        freeze_backbone: keep the image encoder frozen (default False: fine-tuned; an assumption).
        n_ctx: learnable soft-prompt tokens L (4).
        hard_template: the hard prompt ("This photo contains [CLS].").
        ctx_init: phrase initialising the soft context (CoOp's "a photo of a" for L = 4).
        ifm_heads, ifm_mlp_ratio, alpha_init: IFM sizes; alpha is learnable (paper: 0.5 best).
        d_state, d_conv, expand: QMVL's Mamba sizes (mamba_ssm defaults).
        fused: QMVL's fused shared-prefix fork (False: the literal four sequences).
        backend: op backend for IFM and QMVL (None: VLSSM_BACKEND / auto; "reference": plain PyTorch).
        gamma_pos, gamma_neg, asl_clip, asl_eps: ASL settings (paper: 0 and 2; clip, eps: ASL's defaults).
        kcr_weight: lambda of Eq. 14 (4.0).
        logit_scale_init: initial log of the logit scale s (CLIP's log(1 / 0.07)).
        baseline_template: the Baseline's prompt ("{}": the bare class name).
        ifm_gate: the gated skip ``T = T^soft + tanh(g) T^ifm`` (True; see the module docstring), or
            the IFM output itself as in Eq. 10 (False).
    """

    backbone: str = "RN101"
    image_size: int = 448
    clip_checkpoint: Optional[str] = None
    freeze_backbone: bool = False
    n_ctx: int = 4
    hard_template: str = "This photo contains {}."
    ctx_init: Optional[str] = "a photo of a"
    ifm_heads: int = 1
    ifm_mlp_ratio: float = 1.0
    alpha_init: float = 0.5
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    fused: bool = True
    backend: Optional[str] = None
    gamma_pos: float = 0.0
    gamma_neg: float = 2.0
    asl_clip: float = 0.05
    asl_eps: float = 1e-8
    kcr_weight: float = 4.0
    logit_scale_init: float = _CLIP_LOGIT_SCALE
    baseline_template: str = "{}"
    ifm_gate: bool = True


def check_targets(targets: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``targets`` (B, C) multi-hot in {0, 1}, as ``logits``' dtype; ValueError / TypeError naming it."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a (B, C) tensor of 0 / 1, got {type(targets).__name__}")
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have shape (B, C) = {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.is_complex():
        raise TypeError(f"targets must be real 0 / 1 values, got {targets.dtype}")
    # the value check reads the data (a sync, and a graph break under torch.compile): skipped while
    # compiling, as vlssm.losses does; the losses' own checks then are skipped too
    if not torch.compiler.is_compiling() and not bool(((targets == 0) | (targets == 1)).all()):
        raise ValueError("targets must hold only 0 and 1")
    return targets.to(device=logits.device, dtype=logits.dtype)


def _cosine_logits(v: torch.Tensor, t: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """s * cos(v_b, t_bj): v (B, d), t (C, d) or (B, C, d) -> (B, C)."""
    v = F.normalize(v, dim=-1)
    t = F.normalize(t, dim=-1)
    sim = v @ t.t() if t.dim() == 2 else torch.einsum("bd,bcd->bc", v, t)
    return log_scale.exp().to(sim.dtype) * sim


class _CLIPClassifier(nn.Module):
    """What MVLR and its Baseline share: the backbone, the class names, the ASL and the output."""

    def __init__(self, classnames, config: MVLRConfig) -> None:
        super().__init__()
        self.config = config
        self.classnames = list(classnames)
        self.clip = build_clip(config.backbone, config.image_size, config.clip_checkpoint)
        self.backbone = CLIPBackbone(self.clip.visual, config.image_size, frozen=config.freeze_backbone)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.asl = AsymmetricLoss(gamma_neg=config.gamma_neg, gamma_pos=config.gamma_pos, clip=config.asl_clip,
                                  eps=config.asl_eps, reduction="mean")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _output(self, logits: torch.Tensor, targets, aux_loss=None) -> ModelOutput:
        y = check_targets(targets, logits)
        cls = self.asl(logits.float(), y.float())
        aux = {"cls": cls.detach()}
        loss = cls
        if aux_loss is not None:
            loss = loss + self.config.kcr_weight * aux_loss.float()
            aux["kcr"] = aux_loss.detach()
        return ModelOutput(logits, loss, aux)


class MVLR(_CLIPClassifier):
    """MVLR: CLIP encoders, PDLR, IFM, QMVL and a cosine head (see the module docstring).

    ``forward(images (B, 3, S, S)) -> logits (B, C)``;
    ``forward(images, targets (B, C) in {0, 1}) -> ModelOutput(logits, loss, aux={"cls", "kcr"})``.

    Submodules: ``backbone`` (:class:`CLIPBackbone`), ``pdlr`` (:class:`vlssm.PDLR`, the frozen
    text encoder and the soft context), ``ifm`` (:class:`vlssm.IFM`), ``qmvl`` (:class:`vlssm.QMVL`);
    parameter ``logit_scale``. Trainable: the image encoder (unless ``freeze_backbone``), the soft
    context, IFM, QMVL, the IFM gate ``ifm_gate`` and the logit scale; the text encoder never.
    """

    def __init__(self, classnames, config: MVLRConfig) -> None:
        super().__init__(classnames, config)
        self.pdlr = PDLR(self.classnames, config.backbone, n_ctx=config.n_ctx, hard_template=config.hard_template,
                         ctx_init=config.ctx_init, clip_model=self.clip)
        del self.clip  # the backbone holds the visual tower, PDLR the text tower
        if self.backbone.kind == "resnet":
            # MVLR reads the dense tokens only: the attention pool's query / key projections shape the
            # pooled feature alone, which MVLR does not use. Frozen, so that no optimizer (or weight
            # decay) moves what cannot affect the output.
            pool = self.backbone.visual.attnpool
            pool.q_proj.requires_grad_(False)
            pool.k_proj.requires_grad_(False)
        d = self.backbone.out_dim
        if self.pdlr.out_dim != d:  # pragma: no cover - one CLIP model gives one joint width
            raise ValueError(f"text width {self.pdlr.out_dim} != visual width {d} for backbone {config.backbone!r}")
        self.ifm = IFM(d, heads=config.ifm_heads, mlp_ratio=config.ifm_mlp_ratio, alpha_init=config.alpha_init,
                       backend=config.backend)
        self.qmvl = QMVL(d, d_state=config.d_state, d_conv=config.d_conv, expand=config.expand,
                         fused=config.fused, backend=config.backend)
        # g of T = T^soft + tanh(g) T^ifm (module docstring); None: T = T^ifm (Eq. 10)
        self.ifm_gate = nn.Parameter(torch.zeros(())) if config.ifm_gate else None

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        x = self.backbone(images, pooled=False).tokens       # (B, M, d)
        t_hard, t_soft = self.pdlr()                         # (C, d) each
        t_hard, t_soft = t_hard.to(x.dtype), t_soft.to(x.dtype)
        ifm = self.ifm(x, t_hard, t_soft)                    # labels (B, C, d), kcr_loss ()
        labels = ifm.labels
        if self.ifm_gate is not None:
            labels = t_soft + torch.tanh(self.ifm_gate).to(labels.dtype) * labels
        x_rf, t_rf = self.qmvl(x, labels)                    # (B, M, d), (B, C, d)
        logits = _cosine_logits(x_rf.mean(dim=1), t_rf, self.logit_scale)
        if targets is None:
            return logits
        return self._output(logits, targets, ifm.kcr_loss)


class MVLRBaseline(_CLIPClassifier):
    """The paper's Baseline: the CLIP image encoder and fixed label embeddings of the bare class
    names (``baseline_template``), logits ``s * cos(pooled image feature, T^name_j)``, ASL only.

    The label embeddings are computed once at construction by the frozen text encoder and kept
    as the buffer ``label_embeddings`` (C, d); the text encoder is then dropped.
    """

    def __init__(self, classnames, config: MVLRConfig) -> None:
        super().__init__(classnames, config)
        pdlr = PDLR(self.classnames, config.backbone, n_ctx=1, hard_template=config.baseline_template,
                    ctx_init=None, clip_model=self.clip)
        self.register_buffer("label_embeddings", pdlr.t_hard.detach().clone())
        del self.clip, pdlr

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        pooled = self.backbone(images, tokens=False).pooled  # (B, d)
        logits = _cosine_logits(pooled, self.label_embeddings.to(pooled.dtype), self.logit_scale)
        if targets is None:
            return logits
        return self._output(logits, targets)


@register_model("mvlr", MVLRConfig, "MVLR: CLIP + PDLR + IFM + QMVL, ASL + 4 L_KCR")
def mvlr(classnames, config: MVLRConfig) -> MVLR:
    return MVLR(classnames, config)


@register_model("mvlr_baseline", MVLRConfig, "MVLR's Baseline: CLIP image encoder, fixed class-name embeddings")
def mvlr_baseline(classnames, config: MVLRConfig) -> MVLRBaseline:
    return MVLRBaseline(classnames, config)
