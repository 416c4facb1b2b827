"""Candle: efficient and long-tailed generalization of a frozen CLIP (imbalanced base-to-new).

Source: J. Shi et al., "Efficient and Long-Tailed Generalization for Pre-trained
Vision-Language Model", KDD 2024, arXiv 2406.12638, and the authors' public code,
github.com/shijxcs/Candle (``trainers/candle.py``: ``Fusion``, ``Head``, ``Candle.build_model`` /
``forward_backward`` / ``model_inference``; ``trainers/losses.py``; ``train.py``; ``run_example.sh``), which
this module follows where the paper is silent.

For C class names, the first ``num_base`` of them base classes (with training images) and the
rest new classes (none), CLIP's frozen encoders give, with d the joint width::

    v  = E_img(images)                         (B, d)  frozen image features (unnormalised
                                                       ``encode_image``; may be precomputed)
    t  = E_txt(template.format(name_c))        (C, d)  frozen text features, computed once (buffer)
    p_c = mean_{i: y_i = c} v_i   c < num_base         frozen base visual prototypes (buffer)
    p_c = learnable, init t_c     c >= num_base        virtual prototypes of the new classes
    P  = [p_base; p_virtual]                   (C, d)

    W_I, W_T                                   (d, d)  learnable, identity-initialised
    X  = [v W_I; P W_I; t W_T]                 (B + 2C, d)  one sequence
    Y  = LN(X);  Z = Y + rho * MHA(Y, Y, Y)    8 heads, attention dropout 0.1, rho learnable (0.1)
    v', p', t' = Z[:B], Z[B:B+C], Z[B+C:]

    l0   = s     cos(v W_I, t W_T)             (B, C)  before the attention
    l_vt = s     cos(v', t')
    l_vv = s k   cos(v', p')
    score = l_vt + l_vv                        inference, over all / base / new classes

    L = CLA(l0) + CLA(l_vt) + CLA(l_vv),  CLA(l) = CE(l + tau log pi),  pi_c = (n_c + 1) / sum_j (n_j + 1)

``CLA`` is :class:`vlssm.losses.CompensatingLogitAdjustedLoss` (n_c from ``class_counts``, 0 for
new classes, tau = 1). In training each loss term is taken over B + C rows: the batch's images
and every prototype, prototype c labelled c (see the assumptions).

Two modes (``multi_label``): single-label (the paper's): softmax cross-entropy, ``targets`` (B,)
class indices; multi-label (this library's extension): sigmoid BCE on the same adjusted logits
(``CompensatingLogitAdjustedLoss(multi_label=True)``), ``targets`` (B, C) multi-hot, prototype
rows labelled by the one-hot e_c. The architecture and the score are the same in both modes.

Assumptions, each with its source:

* Residual form of the cross-modal attention: the residual is taken on the *normalised*
  sequence, ``Z = LN(X) + rho * MHA(LN(X))`` (not ``X + rho * MHA(LN(X))``): the authors'
  ``Fusion.forward`` (``features = self.norm(features); x = self.attn(features, ...);
  features = self.ratio * x + features``). ``nn.MultiheadAttention(d, 8, dropout=0.1)`` with
  its default biases, full attention over the one sequence (``run_example.sh`` sets
  ``MASK=none``; the code's masks are an ablation and are not implemented here). rho is a
  learnable scalar initialised to 0.1 (``self.ratio = nn.Parameter(torch.tensor([0.1]))``).
* The batch's images share one attention sequence (authors' ``Head.forward``, in training and
  at test time): an image's score depends on the other images of its batch. Feed the same
  batches to compare runs. The dropout of the attention weights is active in ``train()`` mode
  only.
* Logit scale s: fixed, not learnable; the authors take the loaded CLIP's
  ``logit_scale.exp()``, which is 100 for every OpenAI CLIP checkpoint (CLIP clamps it at
  100). Default ``logit_scale=100.0``; ``None`` reads the built CLIP model's own
  ``exp(logit_scale)`` (1 / 0.07 for random weights). Kept as the buffer ``logit_scale``.
  Cosines are bounded, so ``|l0|, |l_vt| <= s`` and ``|l_vv| <= s k``: finite for finite s.
* The visual-visual scale k (``visual_scale``): the authors' ``TRAINER.SCALE``
  (``logit_scale_visual = logit_scale.exp() * scale_factor``); 1.0 as in their
  ``run_example.sh`` for base-to-new (``train.py``'s default is 0.5).
* Base prototypes are the plain mean of the *unnormalised* image features of each base class's
  training images (authors' ``get_prototypes`` over ``encode_image`` outputs of the training
  set under the test transform); no L2 normalisation before or after the mean. Set by
  :meth:`Candle.set_base_prototypes` (frozen afterwards: a buffer); every base class needs at
  least one image. Before they are set, any forward raises a RuntimeError.
* Virtual prototypes are initialised from the new classes' unnormalised text features
  (authors' default ``VIR_INIT="text"``: ``text_features[num_base:]``). The ``"visual"``
  initialisation (mean base prototype plus noise) is not implemented.
* Training rows: the authors append the C prototypes (``[p_base; p_virtual] W_I``, through the
  attention as p') to the batch as extra samples labelled ``0..C-1`` (``parse_batch_train``:
  ``label = concat(label, arange(C))``; ``Head.forward``: ``batch_x = cat(image, prototypes)``),
  so each CLA term is a mean over B + C rows; this is what trains the virtual prototypes on
  their own class. ``prototype_rows=False`` takes the B image rows only.
* The base/new split is a count: the first ``num_base`` classes are base (authors' B2N order:
  base class names, then new; ``cls_num_list`` extended by zeros for the new ones). Base classes
  need ``class_counts > 0`` and new classes have ``class_counts == 0``. ``num_base=None`` takes
  the classes with positive counts (they must come first), or all C classes without counts.
* Text prompts: one hard template per class, ``"a photo of a {}."`` by default (the authors'
  template for ImageNet, Caltech101, SUN397, StanfordCars; per-dataset templates in
  ``CUSTOM_TEMPLATES``), ``_`` read as a space; text features unnormalised ``encode_text``.
* Backbone ViT-B-16 at 224 (the authors' ``configs/trainers/Candle/vit_b16_*.yaml``). The
  authors run CLIP in fp16 (CoOp's default ``PREC``); here the model is float32 unless cast.
* Cosines use ``F.normalize`` (norm clamped at 1e-12): a zero vector gives cosine 0 where the
  authors' ``x / x.norm()`` gives NaN.

Frozen parts: the image encoder (``backbone``, frozen and kept in eval mode by
:class:`CLIPBackbone`, run under ``torch.no_grad`` by :meth:`Candle.encode_images`), the text
encoder (used once at construction for the ``text_features`` buffer, then dropped), the base
prototypes and the logit scale (buffers). Trainable: ``virtual_prototypes``, ``proj_image``
(W_I), ``proj_text`` (W_T), ``fusion.norm``, ``fusion.attn`` and ``fusion.rho``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import CompensatingLogitAdjustedLoss
from ..modules import PDLR
from ._clip import CLIPBackbone, build_clip
from ._registry import ModelOutput, register_model
from .mvlr import check_targets

__all__ = ["CandleConfig", "Candle", "CandleLogits", "SUBSETS"]

#: the class subsets of :meth:`Candle.predict`
SUBSETS = ("all", "base", "new")

_OPENAI_CLIP_LOGIT_SCALE = 100.0  # exp(logit_scale) of every OpenAI CLIP checkpoint (clamped at 100 by CLIP)


def _plain_counts(counts) -> Optional[List[int]]:
    """``class_counts`` as a list of Python ints >= 0 (plain data for checkpoints); None stays None."""
    if counts is None:
        return None
    if isinstance(counts, torch.Tensor):
        if counts.dtype == torch.bool or counts.is_complex() or counts.dim() != 1:
            raise TypeError(f"class_counts must be a 1-D sequence of ints, got a {counts.dtype} tensor of shape "
                            f"{tuple(counts.shape)}")
        counts = counts.tolist()
    if isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__"):
        raise TypeError(f"class_counts must be a sequence of ints (training images per class), "
                        f"got {type(counts).__name__}")
    out = []
    for i, c in enumerate(counts):
        if isinstance(c, bool) or not isinstance(c, Real):
            raise TypeError(f"class_counts[{i}] must be an int, got {type(c).__name__}")
        if not isinstance(c, Integral):
            if not (math.isfinite(float(c)) and float(c) == int(c)):
                raise ValueError(f"class_counts[{i}] must be an integer count, got {c}")
        if c < 0:
            raise ValueError(f"class_counts must be >= 0; class {i} has {c}")
        out.append(int(c))
    return out


@dataclass
class CandleConfig:
    """Candle's settings; defaults are the authors' (github.com/shijxcs/Candle) or documented assumptions.

    Fields (plain data: saved with ``dataclasses.asdict`` in checkpoints):
        backbone: open_clip model name (ViT-B-16, the authors' main backbone).
        image_size: input side S (224).
        clip_checkpoint: a local open_clip / OpenAI CLIP file for both encoders, or None (random).
        template: the hard prompt, one ``{}`` for the class name ("a photo of a {}.").
        class_counts: C training-image counts per class (list of ints; 0 for new classes) for the
            loss' prior; None: no loss (inference only). Tensors / tuples are turned into a list.
        num_base: the first ``num_base`` classes are base classes, in [1, C]; None: the classes with
            positive ``class_counts`` (a prefix), or all C classes without counts.
        multi_label: False (paper): softmax CLA, targets (B,) class indices; True: sigmoid
            logit-adjusted BCE, targets (B, C) multi-hot.
        heads: attention heads (8). dropout: attention-weight dropout (0.1). rho_init: initial
            residual ratio rho (0.1, learnable).
        tau: logit-adjustment strength (1.0).
        logit_scale: the fixed scale s (100.0, OpenAI CLIP's exp(logit_scale)); None: the built
            CLIP model's own exp(logit_scale).
        visual_scale: k, l_vv's scale relative to s (1.0, the authors' ``run_example.sh``).
        prototype_rows: train on the C prototypes as extra labelled rows (True, the authors' code).
    """

    backbone: str = "ViT-B-16"
    image_size: int = 224
    clip_checkpoint: Optional[str] = None
    template: str = "a photo of a {}."
    class_counts: Optional[List[int]] = None
    num_base: Optional[int] = None
    multi_label: bool = False
    heads: int = 8
    dropout: float = 0.1
    rho_init: float = 0.1
    tau: float = 1.0
    logit_scale: Optional[float] = _OPENAI_CLIP_LOGIT_SCALE
    visual_scale: float = 1.0
    prototype_rows: bool = True

    def __post_init__(self) -> None:
        self.class_counts = _plain_counts(self.class_counts)


class CandleLogits(NamedTuple):
    """The three logits of Candle's head, each (R, C): R = B, or B + C with the prototype rows."""

    l0: torch.Tensor
    vt: torch.Tensor
    vv: torch.Tensor


def _real(name: str, v, *, positive: bool = False, nonneg: bool = False, below_one: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    if below_one and v >= 1:
        raise ValueError(f"{name} must be < 1, got {v}")
    return v


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _check_config(config: CandleConfig, classnames: List[str]) -> int:
    """Validate what does not need the CLIP model; returns num_base."""
    if not isinstance(config, CandleConfig):
        raise TypeError(f"config must be a CandleConfig, got {type(config).__name__}")
    C = len(classnames)
    if not isinstance(config.template, str):
        raise TypeError(f"template must be a str with one '{{}}', got {type(config.template).__name__}")
    if config.template.count("{}") != 1:
        raise ValueError(f"template must contain exactly one '{{}}' for the class name, got {config.template!r}")
    if isinstance(config.heads, bool) or not isinstance(config.heads, int) or config.heads < 1:
        raise ValueError(f"heads must be an int >= 1, got {config.heads!r}")
    _real("dropout", config.dropout, nonneg=True, below_one=True)
    _real("rho_init", config.rho_init)
    _real("tau", config.tau, nonneg=True)
    if config.logit_scale is not None:
        _real("logit_scale", config.logit_scale, positive=True)
    _real("visual_scale", config.visual_scale, positive=True)
    _flag("multi_label", config.multi_label)
    _flag("prototype_rows", config.prototype_rows)
    counts = _plain_counts(config.class_counts)
    if counts is not None and len(counts) != C:
        raise ValueError(f"class_counts must have one count per class: {C} (len(classnames)), got {len(counts)}")
    nb = config.num_base
    if nb is None:
        if counts is None:
            nb = C
        else:
            nb = next((i for i, n in enumerate(counts) if n == 0), C)
            if nb == 0:
                raise ValueError("class_counts: class 0 has no training images; base classes (with images) "
                                 "must come first")
            if any(counts[nb:]):
                j = nb + next(i for i, n in enumerate(counts[nb:]) if n > 0)
                raise ValueError(f"class_counts: base classes (count > 0) must come first, but class {j} "
                                 f"({classnames[j]!r}) has {counts[j]} after class {nb} with 0; "
                                 "reorder the classes or set num_base")
    else:
        if isinstance(nb, bool) or not isinstance(nb, int):
            raise TypeError(f"num_base must be an int in [1, {C}] or None, got {type(nb).__name__}")
        if not 1 <= nb <= C:
            raise ValueError(f"num_base must be in [1, {C}] (the first num_base classes are base), got {nb}")
        if counts is not None:
            for c in range(C):
                if c < nb and counts[c] == 0:
                    raise ValueError(f"class_counts: base class {c} ({classnames[c]!r}) has no training images "
                                     "(a base class needs images for its prototype)")
                if c >= nb and counts[c] != 0:
                    raise ValueError(f"class_counts: new class {c} ({classnames[c]!r}) has {counts[c]} training "
                                     "images; new classes have none (count 0)")
    return nb


class _Fusion(nn.Module):
    """Candle's cross-modal attention over one sequence X (L, d): ``LN(X) + rho * MHA(LN(X))``."""

    def __init__(self, dim: int, heads: int, dropout: float, rho_init: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.rho = nn.Parameter(torch.tensor(float(rho_init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).unsqueeze(0)                        # (1, L, d): one sequence
        a, _ = self.attn(y, y, y, need_weights=False)
        return (y + self.rho.to(y.dtype) * a).squeeze(0)


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()


class Candle(nn.Module):
    """Candle on frozen CLIP features (see the module docstring for the formulas and assumptions).

    ``forward(images (B, 3, S, S) | features (B, d), targets=None)``:
      * without targets: the score ``l_vt + l_vv`` (B, C) over all classes;
      * with targets ((B,) int64 class indices, or (B, C) multi-hot with ``multi_label``):
        ``ModelOutput(logits=score (B, C), loss, aux={"l0", "vt", "vv"})``, the aux entries the
        three (detached) CLA terms, ``loss`` their sum.

    Image features may be precomputed (:meth:`encode_images`, e.g. for a feature cache): pass them
    as ``features=`` or as a 2-D first argument. :meth:`predict` restricts the score to the base,
    new or all classes; :meth:`compute_logits` returns the three logits. Call
    :meth:`set_base_prototypes` (with the base classes' training features and labels) before any
    forward.

    Buffers: ``text_features`` (C, d), ``base_prototypes`` (num_base, d), ``prototype_counts``
    (num_base,) images per base prototype (0 until set), ``logit_scale`` (). Parameters
    (trainable): ``virtual_prototypes`` (C - num_base, d), ``proj_image`` W_I and ``proj_text``
    W_T (d, d), ``fusion.norm``, ``fusion.attn``, ``fusion.rho``. Frozen: ``backbone`` (the
    image encoder).
    """

    def __init__(self, classnames, config: CandleConfig) -> None:
        super().__init__()
        self.classnames = list(classnames)
        self.num_base = _check_config(config, self.classnames)
        self.config = config
        C = self.num_classes

        clip = build_clip(config.backbone, config.image_size, config.clip_checkpoint)
        # Frozen, all in one place: the image encoder (CLIPBackbone(frozen=True): requires_grad False and
        # eval mode whatever train() says; encode_images runs it under no_grad) and the text encoder, run
        # once here for the hard-prompt text features and then dropped. Only the head below trains.
        self.backbone = CLIPBackbone(clip.visual, config.image_size, frozen=True)
        if config.logit_scale is None:
            scale = float(clip.logit_scale.detach().float().exp())
        else:
            scale = float(config.logit_scale)
        pdlr = PDLR(self.classnames, config.backbone, n_ctx=1, hard_template=config.template, ctx_init=None,
                    clip_model=clip)
        text = pdlr.t_hard.detach().clone().float()
        del clip, pdlr
        d = self.backbone.out_dim
        if text.shape != (C, d):  # pragma: no cover - one CLIP model gives one joint width
            raise ValueError(f"text features {tuple(text.shape)} != ({C}, {d}) for backbone {config.backbone!r}")
        if d % config.heads:
            raise ValueError(f"heads must divide the feature width d = {d} of backbone {config.backbone!r}, "
                             f"got heads={config.heads}")

        self.register_buffer("text_features", text)
        self.register_buffer("base_prototypes", torch.zeros(self.num_base, d))
        self.register_buffer("prototype_counts", torch.zeros(self.num_base, dtype=torch.int64))
        self.register_buffer("logit_scale", torch.tensor(scale))
        self._prototypes_ready = False
        self.register_load_state_dict_post_hook(Candle._sync_prototypes_ready)

        self.virtual_prototypes = nn.Parameter(text[self.num_base:].clone())
        self.proj_image = nn.Parameter(torch.eye(d))
        self.proj_text = nn.Parameter(torch.eye(d))
        self.fusion = _Fusion(d, config.heads, config.dropout, config.rho_init)

        self.loss_fn: Optional[CompensatingLogitAdjustedLoss] = None
        if config.class_counts is not None:
            self.loss_fn = CompensatingLogitAdjustedLoss(config.class_counts, tau=config.tau,
                                                         multi_label=config.multi_label)

    # ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def num_new(self) -> int:
        return self.num_classes - self.num_base

    @property
    def feature_dim(self) -> int:
        """d, the width of image / text features and prototypes."""
        return self.text_features.shape[1]

    @property
    def prototypes_ready(self) -> bool:
        """Whether :meth:`set_base_prototypes` has been called (or a checkpoint with them loaded)."""
        return self._prototypes_ready

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, num_base={self.num_base}, d={self.feature_dim}, "
                f"multi_label={self.config.multi_label}, logit_scale={float(self.logit_scale):g}, "
                f"visual_scale={self.config.visual_scale}")

    @staticmethod
    def _sync_prototypes_ready(module: "Candle", incompatible_keys) -> None:
        module._prototypes_ready = bool((module.prototype_counts > 0).all())

    def class_slice(self, subset: str) -> slice:
        """The columns of ``subset``: "all" (0..C-1), "base" (0..num_base-1) or "new" (num_base..C-1)."""
        if not isinstance(subset, str) or subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        if subset == "base":
            return slice(0, self.num_base)
        if subset == "new":
            if self.num_new == 0:
                raise ValueError("subset 'new': this model has no new classes (num_base == num_classes)")
            return slice(self.num_base, self.num_classes)
        return slice(0, self.num_classes)

    # ------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Frozen CLIP image features (B, d) of images (B, 3, S, S): open_clip's ``encode_image``
        (unnormalised), without autograd; for building a feature cache."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a (B, 3, S, S) tensor, got {type(images).__name__}")
        with torch.no_grad():
            return self.backbone(images, tokens=False).pooled

    def _features(self, images, features) -> torch.Tensor:
        if images is not None and features is not None:
            raise ValueError("give images (B, 3, S, S) or features (B, d), not both")
        if images is None and features is None:
            raise ValueError("give images (B, 3, S, S) or precomputed features (B, d)")
        if features is None:
            if not isinstance(images, torch.Tensor):
                raise TypeError(f"images must be a (B, 3, S, S) tensor or (B, d) features, got "
                                f"{type(images).__name__}")
            if images.dim() != 2:
                features = self.encode_images(images)
            else:
                features = images
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a (B, d) tensor, got {type(features).__name__}")
        d = self.feature_dim
        if features.dim() != 2 or features.shape[1] != d or features.shape[0] == 0:
            raise ValueError(f"features must have shape (B, {d}) with B >= 1, got {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
        return features.to(self.proj_image.dtype)

    def _require_prototypes(self) -> None:
        if not self._prototypes_ready:
            raise RuntimeError("Candle's base prototypes are not set: call model.set_base_prototypes(features, "
                               "labels) with the base classes' training image features (model.encode_images) "
                               "and labels first")

    @torch.no_grad()
    def set_base_prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Set the frozen base prototypes to the class means of ``features``; returns them (num_base, d).

        Args:
            features: (N, d) image features (:meth:`encode_images`, unnormalised), or images
                (N, 3, S, S), encoded here.
            labels: (N,) integer class indices in [0, num_base), or (N, C) / (N, num_base) multi-hot
                0 / 1 (multi-label data: an image counts toward every class it contains). New classes
                have no training images: a label of a new class raises.

        ``p_c = mean of features[i] over the images i of base class c`` (no normalisation; computed in
        float64), every base class needing at least one image. ``prototype_counts`` records the counts.
        """
        x = self._features(features, None)  # 2-D: features; 4-D: images, encoded
        N, C, nb = x.shape[0], self.num_classes, self.num_base
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor of class indices (N,) or multi-hot (N, C), "
                            f"got {type(labels).__name__}")
        if labels.dim() == 1:
            if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
                raise TypeError(f"labels (N,) must be integer class indices, got {labels.dtype}")
            if labels.shape[0] != N:
                raise ValueError(f"labels must have shape ({N},) like features' N, got {tuple(labels.shape)}")
            lab = labels.to(device=x.device, dtype=torch.int64)
            if bool(((lab < 0) | (lab >= C)).any()):
                raise ValueError(f"labels must be class indices in [0, {C}), got {int(lab[(lab < 0) | (lab >= C)][0])}")
            if bool((lab >= nb).any()):
                j = int(lab[lab >= nb][0])
                raise ValueError(f"labels include new class {j} ({self.classnames[j]!r}); new classes "
                                 f"(index >= num_base = {nb}) have no training images")
            y = F.one_hot(lab, nb).to(torch.float64)
        elif labels.dim() == 2:
            if labels.shape[0] != N or labels.shape[1] not in (C, nb):
                raise ValueError(f"multi-hot labels must have shape ({N}, {C}) or ({N}, {nb}), "
                                 f"got {tuple(labels.shape)}")
            if labels.is_complex() or not bool(((labels == 0) | (labels == 1)).all()):
                raise ValueError("multi-hot labels must hold only 0 and 1")
            y = labels.to(device=x.device, dtype=torch.float64)
            if bool((y[:, nb:] != 0).any()):
                j = nb + int((y[:, nb:] != 0).any(0).nonzero()[0, 0])
                raise ValueError(f"labels include new class {j} ({self.classnames[j]!r}); new classes "
                                 f"(index >= num_base = {nb}) have no training images")
            y = y[:, :nb]
        else:
            raise ValueError(f"labels must have shape ({N},) or ({N}, {C}), got {tuple(labels.shape)}")
        counts = y.sum(0)
        if bool((counts == 0).any()):
            c = int((counts == 0).nonzero()[0, 0])
            raise ValueError(f"base class {c} ({self.classnames[c]!r}) has no image in labels: "
                             "every base class needs one for its prototype")
        protos = (y.t() @ x.to(torch.float64)) / counts[:, None]
        self.base_prototypes.copy_(protos.to(self.base_prototypes.dtype))
        self.prototype_counts.copy_(counts.round().to(torch.int64))
        self._prototypes_ready = True
        return self.base_prototypes

    # ------------------------------------------------------------------
    def prototypes(self) -> torch.Tensor:
        """P = [base prototypes; virtual prototypes] (C, d)."""
        self._require_prototypes()
        return torch.cat([self.base_prototypes.to(self.virtual_prototypes.dtype), self.virtual_prototypes], 0)

    def compute_logits(self, features: torch.Tensor, with_prototypes: bool = False) -> CandleLogits:
        """The three logits for image features (B, d) (precomputed; see :meth:`encode_images`).

        Rows: the B images, then (``with_prototypes``) the C prototypes: each logit (B [+ C], C).
        ``l0 = s cos(v W_I, t W_T)``, ``vt = s cos(v', t')``, ``vv = s k cos(v', p')``.
        """
        v = self._features(None, features)
        B, C = v.shape[0], self.num_classes
        P = self.prototypes()
        W_I, W_T = self.proj_image, self.proj_text
        vi, pi, ti = v @ W_I, P.to(v.dtype) @ W_I, self.text_features.to(v.dtype) @ W_T
        s = self.logit_scale.to(v.dtype)
        sv = s * self.config.visual_scale
        rows = torch.cat([vi, pi], 0) if with_prototypes else vi
        l0 = s * _cos(rows, ti)
        z = self.fusion(torch.cat([vi, pi, ti], 0))                  # (B + 2C, d)
        v2, p2, t2 = z[:B], z[B:B + C], z[B + C:]
        rows = torch.cat([v2, p2], 0) if with_prototypes else v2
        return CandleLogits(l0, s * _cos(rows, t2), sv * _cos(rows, p2))

    def _loss_targets(self, targets, B: int, device, dtype, rows: bool) -> torch.Tensor:
        C = self.num_classes
        if self.config.multi_label:
            y = check_targets(targets, torch.empty(B, C, device=device, dtype=dtype))
            if rows:
                y = torch.cat([y, torch.eye(C, device=device, dtype=y.dtype)], 0)
            return y
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a ({B},) tensor of class indices, got {type(targets).__name__}")
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
            raise TypeError(f"targets must be an integer tensor of class indices (B,) (multi_label=False), "
                            f"got {targets.dtype}")
        if tuple(targets.shape) != (B,):
            raise ValueError(f"targets must have shape (B,) = ({B},) (class indices; multi_label=False), "
                             f"got {tuple(targets.shape)}")
        y = targets.to(device=device, dtype=torch.int64)
        if not torch.compiler.is_compiling() and bool(((y < 0) | (y >= C)).any()):
            raise ValueError(f"targets must be class indices in [0, {C}), got {int(y[(y < 0) | (y >= C)][0])}")
        if rows:
            y = torch.cat([y, torch.arange(C, device=device)], 0)
        return y

    def forward(self, images: Optional[torch.Tensor] = None, targets: Optional[torch.Tensor] = None, *,
                features: Optional[torch.Tensor] = None):
        """Score (B, C), or ``ModelOutput(score, loss, aux)`` with targets (see the class docstring).

        Args:
            images: (B, 3, S, S) images, or (B, d) precomputed features (2-D input is read as features).
            targets: (B,) int class indices (single-label) or (B, C) multi-hot (``multi_label``).
            features: (B, d) precomputed image features (instead of ``images``).
        """
        v = self._features(images, features)
        B = v.shape[0]
        if targets is None:
            out = self.compute_logits(v, with_prototypes=False)
            return out.vt + out.vv
        if self.loss_fn is None:
            raise ValueError("the loss needs class_counts: build the model with class_counts=[n_0, ..., n_C-1] "
                             "(training images per class, 0 for new classes)")
        rows = self.config.prototype_rows
        y = self._loss_targets(targets, B, v.device, v.dtype, rows)
        out = self.compute_logits(v, with_prototypes=rows)
        terms = {name: self.loss_fn(logits, y) for name, logits in zip(("l0", "vt", "vv"), out)}
        loss = terms["l0"] + terms["vt"] + terms["vv"]
        score = (out.vt + out.vv)[:B]
        return ModelOutput(score, loss, {k: t.detach() for k, t in terms.items()})

    def predict(self, images: Optional[torch.Tensor] = None, *, features: Optional[torch.Tensor] = None,
                subset: str = "all") -> torch.Tensor:
        """The score ``l_vt + l_vv`` over ``subset``'s classes: "all" (B, C), "base" (B, num_base) or
        "new" (B, C - num_base), columns in class order (the columns of the full score; the authors'
        ``model_inference``)."""
        cols = self.class_slice(subset)
        return self(images, features=features)[:, cols]


@register_model("candle", CandleConfig, "Candle: frozen CLIP features, prototypes, cross-modal attention, 3 x CLA")
def candle(classnames, config: CandleConfig) -> Candle:
    """Candle (Shi et al., KDD 2024) on a frozen open_clip model."""
    return Candle(classnames, config)
