"""CLIP backbone adapter: an open_clip visual tower as dense visual tokens ``X`` (B, M, d).

For a batch of images (B, 3, S, S), :class:`CLIPBackbone` returns

    tokens  X  (B, M, d)   one token per spatial position, in CLIP's joint embedding width d
    pooled     (B, d)      open_clip's own image feature (``CLIP.encode_image(images)``)

where ``d`` is the width of the image-text joint space (the text projection
width: 1024 for RN50, 512 for RN101 and ViT-B-16) and

* ModifiedResNet towers (RN50, RN101, RN50x4, ...): ``M = (S / 32) ** 2``
  (196 at S = 448). The final feature map F (B, C, S/32, S/32) of ``layer4``
  is mapped token by token along the *value path* of CLIP's attention pool::

      X[:, m] = c_proj(v_proj(F[:, :, m] + P[1 + m]))        m = 0 .. M-1

  with ``P`` the attention pool's positional embedding (1 + M, C) (row 0 is
  the mean token's), ``v_proj`` and ``c_proj`` its value and output
  projections. There is no attention mixing between tokens.
  ``pooled = visual.attnpool(F)``, the attention pool's normal output.
* VisionTransformer towers (ViT-B-16, ViT-B-32, ViT-L-14, ...):
  ``M = (S / patch) ** 2``. The transformer's outputs at the patch positions
  (the class token excluded) through ``ln_post`` and ``proj``; ``pooled`` is
  open_clip's pooled output (class token through ``ln_post`` and ``proj``).

Assumptions, and where they come from:

* Dense ResNet tokens along the attention pool's value path (v_proj then
  c_proj, no query/key attention): DualCoOp's public code (Sun et al., 2022,
  github.com/sunxm2357/DualCoOp: ``clip.build_model_conv_proj`` builds
  ``ModifiedResNet_conv_proj``, whose ``AttentionConv.forward`` in
  ``clip/model.py`` computes ``F.linear(F.linear(x, v_proj), c_proj)`` per
  position), the same value path MaskCLIP (Zhou et al., 2022) uses as 1x1
  convolutions. DenseCLIP (Rao et al., 2022) instead keeps the full attention
  output per position (with attention mixing); that is *not* done here.
* The positional embedding is added to each token before v_proj (rows
  ``1 ..`` of ``attnpool.positional_embedding``, spatial order row-major as in
  open_clip's ``NCHW -> (HW)NC`` reshape), as in DualCoOp's
  ``AttentionConv.forward`` (``x = x + positional_embedding``).
  ``dense_pos_embed=False`` leaves it out (MaskCLIP's convention).
  DualCoOp also keeps the mean token's value-path output as an extra token;
  here it is dropped, so ``M`` counts spatial positions only.
* Positional embeddings at another image size: the spatial grid (all rows
  but the first, the class/mean token's, which is kept as is) is resized by
  ``F.interpolate(mode="bicubic", align_corners=False, antialias=True)``,
  exactly open_clip's ``resize_pos_embed`` (``open_clip/model.py``), used by
  open_clip for ViTs only; here also for the ResNet attention pool
  ((1 + (S0/32)^2, C) -> (1 + (S/32)^2, C)). DualCoOp interpolates the
  attention-pool embedding bicubically too, but without ``antialias``; the
  values differ even when enlarging (224 -> 448), as PyTorch's antialiased
  bicubic uses the cubic coefficient a = -0.5 and the plain one a = -0.75.
  open_clip's choice is followed. The resize is done once, on the
  parameter, not at every forward.
* Input images are cast to the tower's parameter dtype (as OpenAI CLIP's
  ``encode_image`` does); normalisation (``mean``/``std``) is the caller's job.

open_clip (``pip install open_clip_torch``) is an optional dependency of vlssm:
it is imported when a model is built, never by ``import vlssm``.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.pdlr import _import_open_clip as _import_open_clip_for

__all__ = ["BackboneOutput", "CLIPBackbone", "build_clip", "resize_visual_", "interpolate_pos_embed"]

_EXAMPLES = ("RN50", "RN101", "ViT-B-16", "ViT-B-32")
_RESNET_STRIDE = 32  # ModifiedResNet: stem /4, layer2..4 /2 each


def _import_open_clip():
    return _import_open_clip_for("vlssm's CLIP backbone")


class BackboneOutput(NamedTuple):
    """Output of :class:`CLIPBackbone`: ``tokens`` (B, M, d) and ``pooled`` (B, d)."""

    tokens: torch.Tensor
    pooled: torch.Tensor


# ----------------------------------------------------------------------------
# Tower kinds and image sizes

def _tower_kind(visual: nn.Module) -> str:
    """``"resnet"`` or ``"vit"`` for the open_clip towers this adapter supports; errors otherwise."""
    _import_open_clip()
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, ModifiedResNet):
        if getattr(visual, "attnpool", None) is None:
            raise ValueError("CLIPBackbone: this ModifiedResNet has no attention pool (attnpool)")
        return "resnet"
    if isinstance(visual, VisionTransformer):
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError(
                "CLIPBackbone: open_clip ViTs with an attentional pooler (CoCa-style) are not supported"
            )
        if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
            raise ValueError(f"CLIPBackbone: unsupported ViT pool_type {visual.pool_type!r} (need 'tok' or 'avg')")
        ph, pw = visual.patch_size
        if ph != pw:
            raise ValueError(f"CLIPBackbone: non-square ViT patches {visual.patch_size} are not supported")
        return "vit"
    raise TypeError(
        "CLIPBackbone needs an open_clip CLIP visual tower (open_clip.modified_resnet.ModifiedResNet or "
        f"open_clip.transformer.VisionTransformer), got {type(visual).__module__}.{type(visual).__name__}; "
        "timm and Hugging Face towers (TimmModel, ...) have no CLIP attention pool / class-token layout to "
        "take dense tokens from"
    )


def _stride(visual: nn.Module, kind: str) -> int:
    return _RESNET_STRIDE if kind == "resnet" else int(visual.patch_size[0])


def _tower_image_size(visual: nn.Module) -> int:
    size = visual.image_size
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"CLIPBackbone: non-square tower image_size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def _check_image_size(image_size, stride: int, what: str) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise ValueError(
            f"image_size must be a positive int multiple of {stride} for {what}, got {image_size!r} "
            f"({type(image_size).__name__})"
        )
    if image_size <= 0 or image_size % stride:
        raise ValueError(f"image_size must be a positive multiple of {stride} for {what}, got {image_size}")
    return image_size


def interpolate_pos_embed(pos: torch.Tensor, grid: int, num_prefix: int = 1) -> torch.Tensor:
    """A (num_prefix + g0*g0, C) positional embedding on a (grid, grid) grid: (num_prefix + grid*grid, C).

    The first ``num_prefix`` rows (class / mean token) are kept; the square
    spatial grid is resized with ``F.interpolate(mode="bicubic",
    align_corners=False, antialias=True)``, as open_clip's
    ``resize_pos_embed``. Computed in float32 for half-precision inputs, and
    returned in ``pos.dtype``. Returns ``pos`` itself when the grid is unchanged.
    """
    n, C = pos.shape
    g0 = math.isqrt(n - num_prefix)
    if g0 * g0 != n - num_prefix:
        raise ValueError(f"positional embedding with {n - num_prefix} grid rows is not a square grid")
    if g0 == grid:
        return pos
    prefix, img = pos[:num_prefix], pos[num_prefix:]
    work = img if img.dtype in (torch.float32, torch.float64) else img.float()
    work = work.reshape(1, g0, g0, C).permute(0, 3, 1, 2)
    work = F.interpolate(work, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    img = work.permute(0, 2, 3, 1).reshape(grid * grid, C).to(pos.dtype)
    return torch.cat([prefix, img], 0)


def _pos_param(visual: nn.Module, kind: str) -> nn.Parameter:
    return visual.attnpool.positional_embedding if kind == "resnet" else visual.positional_embedding


@torch.no_grad()
def resize_visual_(visual: nn.Module, image_size: int) -> nn.Module:
    """Set an open_clip ModifiedResNet / VisionTransformer tower to ``image_size``, in place.

    The positional embedding (``attnpool.positional_embedding`` for ResNets,
    ``positional_embedding`` for ViTs) is replaced by a new ``nn.Parameter``
    interpolated to the new grid (:func:`interpolate_pos_embed`; same
    ``requires_grad``; an optimizer built before holds the old one), and the
    tower's ``image_size`` (``grid_size`` for ViTs, ``preprocess_cfg['size']``
    when present) is updated. A no-op at the tower's current size.

    Raises:
        ValueError: ``image_size`` not a positive int multiple of 32 (ResNets) or
            of the patch size (ViTs).
    """
    kind = _tower_kind(visual)
    stride = _stride(visual, kind)
    image_size = _check_image_size(image_size, stride, type(visual).__name__)
    grid = image_size // stride
    old = _pos_param(visual, kind)
    if old.shape[0] != 1 + grid * grid:
        new = interpolate_pos_embed(old.detach(), grid)
        param = nn.Parameter(new, requires_grad=old.requires_grad)
        if kind == "resnet":
            visual.attnpool.positional_embedding = param
        else:
            visual.positional_embedding = param
    if kind == "resnet":
        visual.image_size = image_size
    else:
        visual.image_size = (image_size, image_size)
        visual.grid_size = (grid, grid)
    cfg = getattr(visual, "preprocess_cfg", None)
    if isinstance(cfg, dict) and "size" in cfg:
        cfg["size"] = (image_size, image_size) if isinstance(cfg["size"], (tuple, list)) else image_size
    return visual


# ----------------------------------------------------------------------------
# Building open_clip models

def _config_kind(open_clip, backbone: str) -> Tuple[str, int, int]:
    """(kind, stride, native image size) from open_clip's own config for ``backbone``."""
    cfg = open_clip.get_model_config(backbone)
    vcfg = dict(cfg.get("vision_cfg", {}))
    if vcfg.get("timm_model_name") or vcfg.get("hf_model_name"):
        raise ValueError(
            f"backbone {backbone!r} has a timm/Hugging Face vision tower "
            f"({vcfg.get('timm_model_name') or vcfg.get('hf_model_name')!r}); the CLIP backbone adapter supports "
            f"open_clip's ModifiedResNet and VisionTransformer towers only, e.g. {', '.join(_EXAMPLES)}"
        )
    size = vcfg.get("image_size", 224)
    if isinstance(size, (tuple, list)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"backbone {backbone!r}: non-square image_size {tuple(size)} is not supported")
        size = size[0]
    if isinstance(vcfg.get("layers"), (tuple, list)):
        return "resnet", _RESNET_STRIDE, int(size)
    patch = vcfg.get("patch_size", 16)
    if isinstance(patch, (tuple, list)):
        if len(patch) != 2 or patch[0] != patch[1]:
            raise ValueError(f"backbone {backbone!r}: non-square patch_size {tuple(patch)} is not supported")
        patch = patch[0]
    return "vit", int(patch), int(size)


def _checkpoint_image_size(state_dict: dict, kind: str, stride: int) -> Optional[int]:
    """The image size a CLIP state_dict's visual positional embedding was made for (None if not found)."""
    key = "visual.attnpool.positional_embedding" if kind == "resnet" else "visual.positional_embedding"
    pos = state_dict.get(key)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2:
        return None
    g0 = math.isqrt(pos.shape[0] - 1)
    if g0 * g0 != pos.shape[0] - 1:
        raise ValueError(f"checkpoint {key} has {pos.shape[0] - 1} grid rows, not a square grid")
    return g0 * stride


def _check_backbone(open_clip, backbone) -> None:
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a str (see open_clip.list_models()), got {type(backbone).__name__}")
    known = open_clip.list_models()
    if backbone not in known:
        raise ValueError(
            f"unknown open_clip backbone {backbone!r}; choose one of open_clip.list_models(), "
            f"e.g. {', '.join(n for n in _EXAMPLES if n in known)}"
        )


def build_clip(
    backbone: str,
    image_size: Optional[int] = None,
    pretrained: Optional[str] = None,
    device=None,
    dtype=None,
) -> nn.Module:
    """The whole open_clip CLIP model (visual + text towers) with its visual tower at ``image_size``.

    Args:
        backbone: an open_clip architecture name (``open_clip.list_models()``)
            with a ModifiedResNet or VisionTransformer visual tower, e.g.
            ``"RN50"``, ``"RN101"``, ``"ViT-B-16"``. Its settings come from
            open_clip's own config (nothing copied here).
        image_size: input side ``S`` of the visual tower: a positive int
            multiple of 32 (ResNets) or of the patch size (ViTs); ``None`` for
            the config's own size (224 for the OpenAI configs).
        pretrained: ``None`` for random weights (nothing is downloaded), or a
            LOCAL checkpoint file of the full CLIP model (an open_clip/OpenAI
            checkpoint or a ``torch.save``-d ``state_dict``), loaded strictly by
            open_clip (``create_model(backbone, pretrained=path)``, with its
            format conversions). A checkpoint made at another image size S0
            (read from its visual positional embedding) is loaded into a tower
            built at S0, whose positional embedding is then interpolated to
            ``image_size`` (:func:`resize_visual_`: bicubic, as open_clip's
            ``resize_pos_embed``; for ResNets the attention pool's). The file
            is read twice (once to find S0, once by open_clip).
        device, dtype: where and in what dtype the model lives (default: CPU, float32).

    Returns:
        the open_clip model (``open_clip.CLIP`` or ``CustomTextCLIP``), in eval
        mode; ``model.visual.image_size`` is ``image_size``.

    Raises:
        TypeError: ``backbone`` not a str.
        ValueError: unknown ``backbone``; a timm/HF vision tower; a bad
            ``image_size``; ``pretrained`` not an existing local file.
    """
    open_clip = _import_open_clip()
    _check_backbone(open_clip, backbone)
    kind, stride, native = _config_kind(open_clip, backbone)
    if image_size is None:
        image_size = native
    image_size = _check_image_size(image_size, stride, f"backbone {backbone!r}")
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise TypeError(f"pretrained must be a local file path or None, got {type(pretrained).__name__}")
        if not os.path.isfile(pretrained):
            raise ValueError(
                f"pretrained checkpoint file not found: {os.fspath(pretrained)!r} (only local files are "
                "loaded; pretrained tags such as 'openai' would need a download)"
            )
        pretrained = os.fspath(pretrained)
        from open_clip.factory import load_state_dict

        build_size = _checkpoint_image_size(load_state_dict(pretrained), kind, stride) or image_size
        model = open_clip.create_model(backbone, pretrained=pretrained, force_image_size=build_size)
    else:
        model = open_clip.create_model(backbone, pretrained=None, force_image_size=image_size)
    resize_visual_(model.visual, image_size)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval()


# ----------------------------------------------------------------------------
# The backbone

class CLIPBackbone(nn.Module):
    """Dense visual tokens from an open_clip CLIP visual tower (see the module docstring for the maths).

    ``forward(images (B, 3, S, S)) -> BackboneOutput(tokens (B, M, d), pooled (B, d))``
    with ``S = image_size``, ``d = out_dim`` (CLIP's joint embedding width,
    e.g. 1024 for RN50, 512 for RN101 / ViT-B-16) and ``M = num_tokens``:
    ``(S/32)^2`` for ModifiedResNets (196 at 448), ``(S/patch)^2`` for ViTs.
    ``pooled`` equals open_clip's ``clip_model.encode_image(images)``.

    Only the visual tower is kept (``self.visual`` is ``clip_model.visual``
    itself, shared, not copied); pass the same CLIP model to
    ``vlssm.PDLR(clip_model=...)`` for the text side.

    Args:
        clip_model_or_visual: an open_clip CLIP / CustomTextCLIP model (its
            ``.visual`` is taken) or the visual tower itself: an open_clip
            ``ModifiedResNet`` or ``VisionTransformer`` (class-token or average
            pooling, no attentional pooler). Anything else (timm/HF towers,
            other modules) raises.
        image_size: input side ``S``; ``None`` for the tower's current size. At
            another size the tower's positional embedding is interpolated IN
            PLACE (:func:`resize_visual_`), so the shared CLIP model's
            ``encode_image`` runs at ``S`` too.
        frozen: ``True`` (default): the tower is frozen in place
            (``requires_grad_(False)``) and kept in eval mode whatever
            :meth:`train` is given (BatchNorm running statistics fixed), as
            PDLR's text encoder. ``False``: every tower parameter is set
            trainable (``requires_grad_(True)``, including fixed sin-cos
            embeddings of non-CLIP ViT configs) and follows :meth:`train`.
        dense_pos_embed: ModifiedResNets only: add the attention pool's
            positional embedding to each token before ``v_proj`` (DualCoOp's
            convention, default) or not (MaskCLIP's). Ignored for ViTs, whose
            patch tokens carry it from the input.

    Attributes:
        out_dim (int): ``d``. num_tokens (int): ``M``. image_size (int): ``S``.
        grid_size (int): ``S / stride``. stride (int): 32 or the patch size.
        kind (str): ``"resnet"`` or ``"vit"``. frozen (bool).
        mean, std (tuple of 3 floats): the image normalisation the tower expects
            (the tower's open_clip ``preprocess_cfg``; CLIP's
            ``open_clip.OPENAI_DATASET_MEAN`` / ``OPENAI_DATASET_STD`` for
            random weights and local checkpoints), for the data transforms.

    Raises:
        TypeError: not an open_clip CLIP model / supported visual tower; ``frozen`` not a bool.
        ValueError: unsupported tower options; bad ``image_size``; a trainable
            ViT with patch dropout (dense tokens need every patch).
    """

    def __init__(
        self,
        clip_model_or_visual: nn.Module,
        image_size: Optional[int] = None,
        frozen: bool = True,
        dense_pos_embed: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(clip_model_or_visual, nn.Module):
            raise TypeError(
                "clip_model_or_visual must be an open_clip CLIP model or visual tower (nn.Module), "
                f"got {type(clip_model_or_visual).__name__}"
            )
        if not isinstance(frozen, bool):
            raise TypeError(f"frozen must be a bool, got {type(frozen).__name__}")
        visual = getattr(clip_model_or_visual, "visual", None)
        if not isinstance(visual, nn.Module):
            visual = clip_model_or_visual
        kind = _tower_kind(visual)
        stride = _stride(visual, kind)
        if image_size is None:
            image_size = _tower_image_size(visual)
        image_size = _check_image_size(image_size, stride, type(visual).__name__)
        if not frozen and kind == "vit" and not isinstance(visual.patch_dropout, nn.Identity):
            raise ValueError("CLIPBackbone: a trainable ViT with patch dropout would drop tokens; "
                             "build it without patch_dropout")
        resize_visual_(visual, image_size)

        self.visual = visual
        self.kind = kind
        self.stride = stride
        self.image_size = image_size
        self.grid_size = image_size // stride
        self.num_tokens = self.grid_size ** 2
        self.frozen = frozen
        self.dense_pos_embed = bool(dense_pos_embed)
        if kind == "resnet":
            self.out_dim = int(visual.attnpool.c_proj.out_features)
        elif visual.proj is not None:
            self.out_dim = int(visual.proj.shape[1])
        else:  # a pruned head: tokens stay in the ViT width
            self.out_dim = int(visual.ln_post.normalized_shape[0])

        open_clip = _import_open_clip()
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN))
        self.std = tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD))

        if frozen:
            visual.requires_grad_(False)
            visual.eval()
        else:
            visual.requires_grad_(True)
            visual.train(self.training)

    @classmethod
    def from_name(
        cls,
        backbone: str,
        image_size: Optional[int] = None,
        pretrained: Optional[str] = None,
        frozen: bool = True,
        device=None,
        dtype=None,
        dense_pos_embed: bool = True,
    ) -> "CLIPBackbone":
        """A backbone on a new model: ``CLIPBackbone(build_clip(backbone, image_size, pretrained, device, dtype))``.

        The text tower of the built model is not kept (freed on return); to
        share one model with PDLR, call :func:`build_clip` and pass the model to both.
        """
        model = build_clip(backbone, image_size=image_size, pretrained=pretrained, device=device, dtype=dtype)
        return cls(model.visual, image_size=image_size, frozen=frozen, dense_pos_embed=dense_pos_embed)

    # ------------------------------------------------------------------
    def train(self, mode: bool = True) -> "CLIPBackbone":
        """Set train/eval mode; a frozen tower always stays in eval mode."""
        super().train(mode)
        if self.frozen:
            self.visual.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, image_size={self.image_size}, num_tokens={self.num_tokens}, "
            f"out_dim={self.out_dim}, frozen={self.frozen}"
            + (f", dense_pos_embed={self.dense_pos_embed}" if self.kind == "resnet" else "")
        )

    def _check_images(self, images) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor (B, 3, S, S), got {type(images).__name__}")
        S = self.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != S or images.shape[3] != S:
            raise ValueError(f"images must have shape (B, 3, {S}, {S}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")

    # ------------------------------------------------------------------
    def forward(self, images: torch.Tensor, tokens: bool = True, pooled: bool = True) -> BackboneOutput:
        """Dense tokens and pooled feature.

        Args:
            images: (B, 3, S, S) normalised images (``S = image_size``), any
                floating dtype (cast to the tower's).
            tokens, pooled: which outputs to compute; the other is None. On the
                ResNets each costs its own projections (RN101 at 448: the dense
                tokens' v / c projections 1.0 GMAC, the attention pool's k / v
                projections 1.7 GMAC), so a model that reads one output skips the other.
        Returns:
            ``BackboneOutput(tokens (B, M, d), pooled (B, d))``.
        """
        if not (tokens or pooled):
            raise ValueError("CLIPBackbone.forward: ask for tokens, pooled or both")
        self._check_images(images)
        x = images.to(self.dtype)
        if self.kind == "resnet":
            return self._forward_resnet(x, tokens, pooled)
        out = self._forward_vit(x)
        return BackboneOutput(out.tokens if tokens else None, out.pooled if pooled else None)

    def _forward_resnet(self, x: torch.Tensor, tokens: bool = True, pooled: bool = True) -> BackboneOutput:
        v = self.visual
        x = v.stem(x)
        x = v.layer4(v.layer3(v.layer2(v.layer1(x))))  # (B, C, S/32, S/32)
        pool = v.attnpool
        p = pool(x) if pooled else None  # (B, d): open_clip's attention pool
        if not tokens:
            return BackboneOutput(None, p)
        t = x.flatten(2).transpose(1, 2)  # (B, M, C), row-major as open_clip's NCHW -> (HW)NC
        if self.dense_pos_embed:
            t = t + pool.positional_embedding[1:].to(t.dtype)
        t = pool.c_proj(pool.v_proj(t))  # (B, M, d)
        return BackboneOutput(t, p)

    def _vit_embeds(self, x: torch.Tensor) -> torch.Tensor:
        v = self.visual
        embeds = getattr(v, "_embeds", None)
        if embeds is not None:  # open_clip >= 2.24
            return embeds(x)
        x = v.conv1(x)  # pragma: no cover - older open_clip: its forward, inlined
        x = x.flatten(2).transpose(1, 2)  # (B, M, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], 1) + v.positional_embedding.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def _forward_vit(self, x: torch.Tensor) -> BackboneOutput:
        v = self.visual
        x = self._vit_embeds(x)  # conv1, class token, positional embedding, patch dropout, ln_pre
        if getattr(v.transformer, "batch_first", True):
            x = v.transformer(x)
        else:  # pragma: no cover - older open_clip
            x = v.transformer(x.transpose(0, 1)).transpose(0, 1)
        if getattr(v, "final_ln_after_pool", False):
            pooled = x[:, 1:].mean(1) if v.pool_type == "avg" else x[:, 0]
            pooled = v.ln_post(pooled)
            tokens = v.ln_post(x[:, 1:])
        else:
            x = v.ln_post(x)
            pooled = x[:, 1:].mean(1) if v.pool_type == "avg" else x[:, 0]
            tokens = x[:, 1:]
        if v.proj is not None:
            pooled = pooled @ v.proj
            tokens = tokens @ v.proj
        return BackboneOutput(tokens, pooled)
