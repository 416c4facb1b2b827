"""CAPNET (correlation adaptation prompt network) for long-tailed multi-label recognition.

Tang, Wang, Zhang, Wei, Zhang, "Unleashing the Power of Vision-Language Models for Long-Tailed
Multi-Label Visual Recognition", arXiv 2511.20641. For images
(B, 3, S, S) and C class names, on one CLIP model (image encoder E_I, text encoder E_T, joint width d)::

    F_t     = E_T([SOS][ctx_c,1 .. ctx_c,L][name_c][.][EOS])_c        (C, d)  class-specific soft prompts,
                                                                               frozen E_T (vlssm.PDLR)
    A_hat   = graph(E_T("a photo of a [CLS]."); tau, p)                 (C, C)  fixed label graph (a buffer)
    H_0     = F_t,  H_l = A_hat H_{l-1} W_l  (LeakyReLU(0.2) between layers),  l = 1 .. 3
    f_hat   = F_t + H_3                                                 (C, d)  residual GCN refinement
    v       = E_I^adapt(images)                                         (B, d)  CLIP's pooled image feature,
                                                                               AdaptFormer adapters inside
    logit_c = s * cos(v, f_hat_c),   s = exp(logit_scale) (learnable)   (B, C)  p_c = sigmoid(logit_c)
    L       = DB-Focal(logits, targets; class_freq, train_num)                  (vlssm.losses)

The label graph (``label_graph``) follows ML-GCN's ``gen_A`` / ``gen_adj`` (Chen et al., CVPR 2019,
github.com/megvii-research/ML-GCN ``util.py``) with the cosine similarity of the CLIP text embeddings
in place of ML-GCN's conditional co-occurrence probabilities::

    S_ij  = cos(e_i, e_j), symmetrised (S + S^T) / 2       e_i = E_T(graph_template.format(name_i))
    B_ij  = [S_ij >= tau] for i != j,  B_ii = 0             (gen_A: _adj[_adj < t] = 0; _adj[_adj >= t] = 1)
    A     = B * p / (colsum(B) + 1e-6) + I                  (gen_A: _adj * 0.25 / (_adj.sum(0, keepdims=True)
                                                             + 1e-6) + np.identity; column sums, as the code)
    A_hat = (A D)^T D,  D = diag(rowsum(A)^-1/2)            (gen_adj, literally; = D A^T D)

AdaptFormer (Chen et al., NeurIPS 2022, github.com/ShoufaChen/AdaptFormer ``models/adapter.py`` and
``models/custom_modules.py``, its image config ``ffn_option="parallel"``, ``ffn_adapter_init_option=
"lora"``, ``ffn_adapter_scalar="0.1"``, ``ffn_num=64``, ``ffn_adapter_layernorm_option="none"``,
``dropout=0.1``)::

    adapter(x) = s * W_up(dropout(ReLU(W_down x + b_down))) + s * b_up,   s = 0.1, bottleneck r = 64
    W_down ~ kaiming_uniform(a = sqrt(5)),  b_down = W_up = b_up = 0    (the code's "lora" init)

    ViT block (open_clip ResidualAttentionBlock), as AdaptFormer's parallel Block.forward:
        x = x + ls_1(attn(ln_1(x)))
        x = x + ls_2(mlp(ln_2(x))) + adapter(x)              (the adapter reads the MLP branch's input
                                                              stream, before ln_2, and adds beside it)
    ResNet block (open_clip ModifiedResNet Bottleneck), the equivalent used here (an assumption):
        out = act3(bn3(conv3(...)) + shortcut(x) + adapter(x))
        adapter(x) = s * Conv1x1_up(dropout(ReLU(Conv1x1_down(AvgPool_stride(x)))))   C_in -> r -> C_out

From the paper (its abstract and public summaries of arXiv 2511.20641):
CLIP ResNet-50 / ViT-B/16 image encoders, class-specific learnable soft prompts through the frozen text
encoder, a label graph from CLIP's text encoder, a three-layer GCN whose output is added to the prompt
features as a residual, cosine similarity with a trainable temperature and a sigmoid, the distribution-
balanced focal loss, AdaptFormer-style parameter-efficient fine-tuning of the image encoder, and
test-time ensembling.

Assumptions where the paper (as summarised) is silent, each also on the config field:

* Backbone and input size: CLIP RN50 at 224 x 224 by default. The paper uses CLIP ResNet-50 and
  ViT-B/16 image encoders; 224 is CLIP's native size and LMPT's (richard-peng-xia/LMPT
  ``lmpt/train.py``: ``clip.load`` preprocessing), the prompt-tuning LTML method it compares to.
* Soft prompts: PDLR with ``class_specific=True`` (one L x w context per class, CoOp's CSC),
  L = 4 initialised from "a photo of a" (CoOp's / LMPT's default ``--n_ctx 4 --ctx_init 'a photo of
  a'``; PDLR repeats the phrase for every class).
* Graph source: the hard prompt "a photo of a {}." (CLIP's standard zero-shot template) through the
  same frozen text encoder; computed once at construction (PDLR's ``t_hard`` buffer) and kept as the
  persistent buffer ``adjacency`` (C, C). tau = 0.4 and p = 0.25 are ML-GCN's values. The diagonal of
  the binarised matrix is zeroed (the cosine of a label with itself is 1): ML-GCN's co-occurrence
  counts pair distinct labels (some derived code zeroes the diagonal explicitly), and its self-loop
  is the identity added after re-weighting. NOTE: CLIP text embeddings of one template tend to be
  highly similar to each other (in the tests' random tiny encoders all pairwise cosines are 0.7-1.0),
  so at tau = 0.4 the graph may be (nearly) complete; check it on the real weights and class list
  (``graph_tau`` sets tau).
* GCN: 3 layers d -> d -> d -> d (hidden width d, ``gcn_hidden``), each ``A_hat @ H @ W`` without
  bias, LeakyReLU(0.2) between layers and none after the last, W ~ uniform(+-1/sqrt(out)) -- ML-GCN's
  ``GraphConvolution`` (bias=False, ``reset_parameters``) and ``GCNResnet.forward``; the GCN reads the
  raw (not L2-normalised) soft-prompt features, and f_hat = F_t + GCN(F_t) (the paper's residual).
* Logit scale: learnable (the paper's "trainable temperature"), initialised to CLIP's 1 / 0.07 and
  stored as its log, as MVLR.
* Image feature: open_clip's pooled image feature (``encode_image``: ResNet attention pool / ViT
  class token through ln_post and proj), through the adapted encoder.
* Adapters on ModifiedResNets: AdaptFormer is defined for transformer blocks (and LIFT, the
  AdaptFormer-on-CLIP code of a co-author, adds none to ResNets). Here each residual Bottleneck gets
  a parallel 1x1-conv bottleneck adapter on the block input (average-pooled by the block's stride, as
  open_clip's own shortcut), added to the residual sum before the block's final ReLU -- the ResNet
  analogue of AdaptFormer's adapter beside the MLP branch of the same residual step: zero at init
  (the pre-trained network is unchanged), and the block output stays a ReLU output as the frozen
  layers after it expect. No adapters on the stem or the attention pool.
* What trains: the adapters, the soft context, the GCN and the logit scale. The image encoder
  (except its adapters) and the text encoder are frozen and kept in eval mode (BatchNorm statistics
  fixed); the adapters follow train / eval (their dropout).
* Loss: DistributionBalancedFocalLoss with the official COCO-LT config by default (``db_preset``;
  "voc-lt" for VOC-LT), per-field overrides ``db_*``; reduction "mean". Its class frequencies
  ``class_freq`` (per-class positive counts of the training labels) and ``train_num`` (number of
  training images) are config fields; without them the model is built for inference only.
* Not implemented: the paper's test-time ensembling (an inference procedure -- LIFT, shijxcs/LIFT, averages
  the predictions over several crops of each image -- that belongs around the forward, not in it).

Inference never runs the text encoder twice: PDLR caches F_t in eval mode while no gradient can reach
the context, and the model caches f_hat the same way (keyed on F_t, the GCN weights and the graph).
Training runs the text encoder once per step (C soft prompts, not per image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import DistributionBalancedFocalLoss
from ..modules import PDLR
from ._clip import CLIPBackbone, build_clip
from ._registry import ModelOutput, register_model
from .mvlr import check_targets

__all__ = ["CAPNetConfig", "CAPNet", "label_graph", "LabelGCN", "Adapter", "ConvAdapter", "insert_adapters"]

_CLIP_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's initial logit scale
_DB_FIELDS = ("alpha", "beta", "mu", "neg_scale", "init_bias", "gamma", "balance_param")


def _plain_counts(v):
    """``class_freq`` as a tuple of Python numbers (a checkpoint stores plain data only), or None."""
    if v is None:
        return None
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):  # a tensor / ndarray
        v = v.tolist()
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"class_freq must be a sequence of per-class positive counts, got {type(v).__name__}")
    out = []
    for x in v:
        x = x.item() if hasattr(x, "item") else x
        if isinstance(x, bool) or not isinstance(x, Real):
            raise TypeError(f"class_freq must hold numbers (per-class positive counts), got {x!r}")
        out.append(int(x) if float(x).is_integer() else float(x))
    return tuple(out)


@dataclass
class CAPNetConfig:
    """CAPNET's settings; the defaults are the paper's or the documented assumptions (module docstring).

    Fields:
        backbone: open_clip model name (RN50 by default; the paper also uses ViT-B-16).
        image_size: input side S (224: CLIP's native size; an assumption).
        clip_checkpoint: a local open_clip / OpenAI CLIP file for both encoders, or None (random).
        n_ctx: learnable soft-prompt tokens L per class (4).
        ctx_init: phrase initialising every class's context (CoOp's "a photo of a" for L = 4), or None
            for normal(0, 0.02).
        graph_template: hard prompt whose text embeddings define the label graph ("a photo of a {}.").
        graph_tau: binarisation threshold tau of the cosine similarities (ML-GCN's 0.4).
        graph_p: re-weighting p of the neighbours (ML-GCN's 0.25).
        gcn_layers: GCN depth (3, the paper's).
        gcn_hidden: hidden width of the GCN (None: d, the joint width).
        gcn_negative_slope: LeakyReLU slope between GCN layers (ML-GCN's 0.2).
        adapter_bottleneck: AdaptFormer bottleneck r (64).
        adapter_scale: AdaptFormer scale s (0.1, fixed).
        adapter_dropout: dropout on the adapters' bottleneck (AdaptFormer's 0.1).
        logit_scale_init: initial log of the logit scale s (CLIP's log(1 / 0.07)).
        learn_logit_scale: train the logit scale (True: the paper's trainable temperature).
        class_freq: per-class positive counts n_i of the training labels (C ints > 0), for the loss.
        train_num: the number of training images N (> every n_i), for the loss.
        db_preset: DistributionBalancedFocalLoss preset ("coco-lt", the default, or "voc-lt").
        db_alpha, db_beta, db_mu, db_neg_scale, db_init_bias, db_gamma, db_balance_param: overrides of
            the preset's values (None: the preset's).
    """

    backbone: str = "RN50"
    image_size: int = 224
    clip_checkpoint: Optional[str] = None
    n_ctx: int = 4
    ctx_init: Optional[str] = "a photo of a"
    graph_template: str = "a photo of a {}."
    graph_tau: float = 0.4
    graph_p: float = 0.25
    gcn_layers: int = 3
    gcn_hidden: Optional[int] = None
    gcn_negative_slope: float = 0.2
    adapter_bottleneck: int = 64
    adapter_scale: float = 0.1
    adapter_dropout: float = 0.1
    logit_scale_init: float = _CLIP_LOGIT_SCALE
    learn_logit_scale: bool = True
    class_freq: Optional[Tuple[int, ...]] = None
    train_num: Optional[int] = None
    db_preset: str = "coco-lt"
    db_alpha: Optional[float] = None
    db_beta: Optional[float] = None
    db_mu: Optional[float] = None
    db_neg_scale: Optional[float] = None
    db_init_bias: Optional[float] = None
    db_gamma: Optional[float] = None
    db_balance_param: Optional[float] = None

    def __post_init__(self) -> None:
        self.class_freq = _plain_counts(self.class_freq)
        if self.train_num is not None:
            n = self.train_num.item() if hasattr(self.train_num, "item") else self.train_num
            if isinstance(n, bool) or not isinstance(n, Integral):
                raise TypeError(f"train_num must be an int (the number of training images), got {self.train_num!r}")
            self.train_num = int(n)
        if (self.class_freq is None) != (self.train_num is None):
            given, missing = ("class_freq", "train_num") if self.train_num is None else ("train_num", "class_freq")
            raise ValueError(f"CAPNet: {given} was given without {missing}; the distribution-balanced loss needs "
                             "both (class_freq: per-class positive counts of the training labels, train_num: the "
                             "number of training images), or neither for an inference-only model")
        for name in ("n_ctx", "gcn_layers", "adapter_bottleneck"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.gcn_hidden is not None and (isinstance(self.gcn_hidden, bool) or not isinstance(self.gcn_hidden, int)
                                            or self.gcn_hidden < 1):
            raise ValueError(f"gcn_hidden must be None or an int >= 1, got {self.gcn_hidden!r}")
        if not isinstance(self.graph_p, Real) or not self.graph_p > 0:
            raise ValueError(f"graph_p must be a number > 0, got {self.graph_p!r}")
        if not isinstance(self.graph_tau, Real) or not -1.0 <= self.graph_tau <= 1.0:
            raise ValueError(f"graph_tau must be a cosine threshold in [-1, 1], got {self.graph_tau!r}")
        if not isinstance(self.adapter_dropout, Real) or not 0.0 <= self.adapter_dropout < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {self.adapter_dropout!r}")
        if self.db_preset not in DistributionBalancedFocalLoss.PRESETS:
            raise ValueError(f"db_preset must be one of {tuple(DistributionBalancedFocalLoss.PRESETS)}, "
                             f"got {self.db_preset!r}")


# ----------------------------------------------------------------------------
# The label graph and the GCN

def label_graph(embeddings: torch.Tensor, tau: float = 0.4, p: float = 0.25) -> torch.Tensor:
    """ML-GCN's normalised adjacency (``gen_A`` then ``gen_adj``) from label embeddings (C, d).

    Cosine similarities (symmetrised), binarised at ``tau`` with a zero diagonal, re-weighted so that
    each column sums to ``p`` (``_adj * p / (_adj.sum(0) + 1e-6)``), plus the identity, then
    ``(A D)^T D`` with ``D = diag(A.sum(1)^-1/2)``; see the module docstring. Computed in float64;
    returns (C, C) float64, no autograd history. Binarisation is ``S >= tau`` for any tau in [-1, 1]
    (ML-GCN's two in-place assignments ``_adj[_adj < t] = 0; _adj[_adj >= t] = 1`` agree for t > 0
    only: at t <= 0 the second would also turn the zeroed entries into 1).
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        raise ValueError("embeddings must be a (C, d) tensor")
    with torch.no_grad():
        e = F.normalize(embeddings.detach().to(torch.float64), dim=-1)
        sim = e @ e.t()
        sim = 0.5 * (sim + sim.t())                       # exactly symmetric (matmul rounding)
        a = (sim >= tau).to(torch.float64)
        a.fill_diagonal_(0.0)
        a = a * p / (a.sum(0, keepdim=True) + 1e-6)
        a = a + torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
        d = torch.diag(a.sum(1).pow(-0.5))
        return (a @ d).t() @ d


class GraphConvolution(nn.Module):
    """ML-GCN's graph convolution without bias: ``adj @ (x @ W)``, W (in, out) ~ U(+-1/sqrt(out))."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.in_features, self.out_features))
        bound = 1.0 / math.sqrt(self.out_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"

    def forward(self, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        return adj @ (x @ self.weight)


class LabelGCN(nn.Module):
    """``layers`` graph convolutions dim -> hidden -> ... -> dim with LeakyReLU between them (none after
    the last): ``forward(h (C, dim), adj (C, C)) -> (C, dim)``."""

    def __init__(self, dim: int, layers: int = 3, hidden: Optional[int] = None, negative_slope: float = 0.2) -> None:
        super().__init__()
        hidden = dim if hidden is None else hidden
        dims = [dim] + [hidden] * (layers - 1) + [dim]
        self.layers = nn.ModuleList(GraphConvolution(i, o) for i, o in zip(dims[:-1], dims[1:]))
        self.negative_slope = float(negative_slope)

    def forward(self, h: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, adj)
            if i < last:
                h = F.leaky_relu(h, self.negative_slope)
        return h


# ----------------------------------------------------------------------------
# AdaptFormer adapters

class _Bottleneck(nn.Module):
    """``scale * up(dropout(relu(down(pool(x)))))`` with AdaptFormer's "lora" init: down
    kaiming_uniform(a=sqrt(5)), up weight and both biases zero (the adapter starts as a no-op)."""

    def __init__(self, down: nn.Module, up: nn.Module, pool: nn.Module, scale: float, dropout: float) -> None:
        super().__init__()
        self.pool, self.down, self.up = pool, down, up
        self.scale = float(scale)
        self.dropout = float(dropout)
        with torch.no_grad():
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)
            nn.init.zeros_(down.bias)
            nn.init.zeros_(up.bias)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, dropout={self.dropout}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.down(self.pool(x))), p=self.dropout, training=self.training)
        return self.up(h) * self.scale


class Adapter(_Bottleneck):
    """AdaptFormer's bottleneck on tokens (..., dim): ``scale * up(dropout(relu(down(x))))``."""

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__(nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim), nn.Identity(), scale, dropout)


class ConvAdapter(_Bottleneck):
    """The ResNet counterpart: average pool by ``stride``, 1x1 conv in -> bottleneck, ReLU, dropout,
    1x1 conv bottleneck -> out, times ``scale``; on (B, in, H, W) -> (B, out, H/stride, W/stride)."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck: int = 64, stride: int = 1,
                 scale: float = 0.1, dropout: float = 0.1) -> None:
        pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        super().__init__(nn.Conv2d(in_channels, bottleneck, 1), nn.Conv2d(bottleneck, out_channels, 1), pool,
                         scale, dropout)


def _adopt_children(dst: nn.Module, src: nn.Module, names: Sequence[str]) -> None:
    """Register ``src``'s submodules ``names`` on ``dst`` under the same names (shared, not copied)."""
    if src._parameters or src._buffers:  # pragma: no cover - open_clip's blocks hold none directly
        raise ValueError(f"CAPNet: {type(src).__name__} holds parameters or buffers directly")
    children = dict(src.named_children())
    unknown = sorted(set(children) - set(names))
    if unknown:
        raise ValueError(f"CAPNet: unsupported {type(src).__name__} with submodules {unknown} (a variant of the "
                         "open_clip block this adapter wrapper reproduces)")
    for n in names:
        setattr(dst, n, children.get(n))


class AdaptedResidualAttentionBlock(nn.Module):
    """An open_clip ``ResidualAttentionBlock`` with an AdaptFormer adapter parallel to its MLP.

    Holds the block's own submodules under their names (``ln_1``, ``attn``, ``ls_1``, ``ln_2``,
    ``mlp``, ``ls_2``: the parameters are the block's, not copies, and keep their state_dict keys)
    plus ``adapter``. ``forward`` is the block's with ``+ adapter(x)`` beside the MLP branch.
    """

    _NAMES = ("ln_1", "attn", "ls_1", "ln_2", "mlp", "ls_2")

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        _adopt_children(self, block, self._NAMES)
        self.adapter = adapter

    def get_weight_dtype(self) -> torch.dtype:  # open_clip's Transformer.get_cast_dtype reads it
        if hasattr(self.mlp.c_fc, "int8_original_dtype"):  # pragma: no cover - open_clip int8 path
            return self.mlp.c_fc.int8_original_dtype
        return self.mlp.c_fc.weight.dtype

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if k_x is not None or v_x is not None:
            raise ValueError("AdaptedResidualAttentionBlock: cross-attention is not supported")
        mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        h = self.ln_1(q_x)
        x = q_x + self.ls_1(self.attn(h, h, h, need_weights=False, attn_mask=mask)[0])
        return x + self.ls_2(self.mlp(self.ln_2(x))) + self.adapter(x)


class AdaptedBottleneck(nn.Module):
    """An open_clip ModifiedResNet ``Bottleneck`` with a parallel :class:`ConvAdapter` on its input,
    added to the residual sum before the final ReLU (the block's submodules are shared, same names)."""

    _NAMES = ("conv1", "bn1", "act1", "conv2", "bn2", "act2", "avgpool", "conv3", "bn3", "act3", "downsample")

    def __init__(self, block: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        _adopt_children(self, block, self._NAMES)
        self.stride = block.stride
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity + self.adapter(x))


def insert_adapters(visual: nn.Module, bottleneck: int = 64, scale: float = 0.1,
                    dropout: float = 0.1) -> List[nn.Module]:
    """Put an adapter into every residual block of an open_clip visual tower, in place.

    ViTs: each ``transformer.resblocks[i]`` (a ``ResidualAttentionBlock``) is replaced by an
    :class:`AdaptedResidualAttentionBlock` around it; ModifiedResNets: each Bottleneck of
    ``layer1..layer4`` by an :class:`AdaptedBottleneck`. The tower's parameters are shared, not
    copied, and keep their names; the adapters (new, trainable, on the tower's device and dtype) are
    returned. Zero-initialised up-projections: the tower computes the same function until they train.
    """
    from open_clip.modified_resnet import Bottleneck, ModifiedResNet
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    p = next(visual.parameters())
    adapters: List[nn.Module] = []
    if isinstance(visual, VisionTransformer):
        blocks = visual.transformer.resblocks
        for i, block in enumerate(blocks):
            if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
                raise ValueError(f"CAPNet: AdaptFormer adapters need open_clip's ResidualAttentionBlock, got "
                                 f"{type(block).__name__} (custom-block configs are not supported)")
            ad = Adapter(block.ln_2.normalized_shape[0], bottleneck, scale, dropout).to(device=p.device, dtype=p.dtype)
            blocks[i] = AdaptedResidualAttentionBlock(block, ad)
            adapters.append(ad)
    elif isinstance(visual, ModifiedResNet):
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for i, block in enumerate(layer):
                if type(block) is not Bottleneck:
                    raise ValueError(f"CAPNet: expected open_clip's Bottleneck blocks, got {type(block).__name__}")
                ad = ConvAdapter(block.conv1.in_channels, block.bn3.num_features, bottleneck, block.stride, scale,
                                 dropout).to(device=p.device, dtype=p.dtype)
                layer[i] = AdaptedBottleneck(block, ad)
                adapters.append(ad)
    else:
        raise TypeError(f"CAPNet: adapters need an open_clip ModifiedResNet or VisionTransformer, "
                        f"got {type(visual).__name__}")
    return adapters


# ----------------------------------------------------------------------------
# The model

class CAPNet(nn.Module):
    """CAPNET: adapted CLIP image encoder, class-specific soft prompts refined by a GCN over a CLIP-text
    label graph, a cosine head and the distribution-balanced focal loss (see the module docstring).

    ``forward(images (B, 3, S, S)) -> logits (B, C)``;
    ``forward(images, targets (B, C) in {0, 1}) -> ModelOutput(logits, loss, aux={"cls"})`` (needs
    ``class_freq`` and ``train_num`` in the config).

    Submodules: ``backbone`` (:class:`CLIPBackbone`, frozen, with adapters inserted in its blocks),
    ``pdlr`` (:class:`vlssm.PDLR`, class-specific, the frozen text encoder and the context), ``gcn``
    (:class:`LabelGCN`); buffer ``adjacency`` (C, C); parameter ``logit_scale``; ``loss_fn`` (or None).
    Trainable: the adapters, ``pdlr.ctx``, the GCN, ``logit_scale``.
    """

    def __init__(self, classnames, config: CAPNetConfig) -> None:
        super().__init__()
        self.config = config
        self.classnames = list(classnames)
        C = len(self.classnames)
        self.loss_fn = self._build_loss(config, C)  # first: bad class_freq fails before any building
        clip = build_clip(config.backbone, config.image_size, config.clip_checkpoint)
        self.backbone = CLIPBackbone(clip.visual, config.image_size, frozen=True)
        insert_adapters(self.backbone.visual, config.adapter_bottleneck, config.adapter_scale, config.adapter_dropout)
        self.pdlr = PDLR(self.classnames, config.backbone, n_ctx=config.n_ctx, hard_template=config.graph_template,
                         ctx_init=config.ctx_init, class_specific=True, clip_model=clip)
        del clip  # the backbone holds the visual tower, PDLR the text tower
        d = self.backbone.out_dim
        if self.pdlr.out_dim != d:  # pragma: no cover - one CLIP model gives one joint width
            raise ValueError(f"text width {self.pdlr.out_dim} != visual width {d} for backbone {config.backbone!r}")
        dtype = self.pdlr.t_hard.dtype
        self.register_buffer("adjacency", label_graph(self.pdlr.t_hard, config.graph_tau, config.graph_p).to(dtype))
        self.gcn = LabelGCN(d, config.gcn_layers, config.gcn_hidden, config.gcn_negative_slope).to(
            device=self.pdlr.t_hard.device, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)),
                                        requires_grad=bool(config.learn_logit_scale))
        self._label_cache = None
        self.train()

    @staticmethod
    def _build_loss(config: CAPNetConfig, C: int) -> Optional[DistributionBalancedFocalLoss]:
        if config.class_freq is None:
            return None
        if len(config.class_freq) != C:
            raise ValueError(f"class_freq has {len(config.class_freq)} entries, classnames has {C} (one positive "
                             "count per class, in label order)")
        overrides = {k: getattr(config, "db_" + k) for k in _DB_FIELDS if getattr(config, "db_" + k) is not None}
        return DistributionBalancedFocalLoss.from_preset(config.db_preset, list(config.class_freq), config.train_num,
                                                         **overrides)

    # ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def adapters(self) -> List[nn.Module]:
        """The adapters in the image encoder, in forward order."""
        return [m for m in self.backbone.visual.modules() if isinstance(m, (Adapter, ConvAdapter))]

    def train(self, mode: bool = True) -> "CAPNet":
        """Set train/eval mode; the frozen encoders stay in eval mode, the adapters follow ``mode``."""
        super().train(mode)  # the backbone and PDLR keep their frozen towers in eval mode
        for a in self.adapters():
            a.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, loss={'DB-Focal' if self.loss_fn is not None else None}"

    # ------------------------------------------------------------------
    def _label_key(self) -> tuple:
        tensors = (self.adjacency, *self.gcn.parameters())
        return tuple((id(t), t._version, t.data_ptr(), t.dtype, t.device) for t in tensors)

    def label_features(self) -> torch.Tensor:
        """f_hat = F_t + GCN(F_t) (C, d). In eval mode, while no gradient can reach the context or the
        GCN, it is cached until F_t (PDLR's own cache), the GCN weights or the graph change."""
        t_soft = self.pdlr.soft()  # (C, d)
        grad = torch.is_grad_enabled() and (t_soft.requires_grad
                                            or any(p.requires_grad for p in self.gcn.parameters()))
        if self.training or grad:
            self._label_cache = None
            return t_soft + self.gcn(t_soft, self.adjacency.to(t_soft.dtype))
        key = self._label_key()
        c = self._label_cache
        if c is not None and c[0] is t_soft and c[1] == key:  # same F_t object (PDLR's cache), same GCN / graph
            return c[2]
        f_hat = (t_soft + self.gcn(t_soft, self.adjacency.to(t_soft.dtype))).detach()
        self._label_cache = (t_soft, key, f_hat)
        return f_hat

    def forward(self, images: torch.Tensor, targets: Optional[torch.Tensor] = None):
        v = self.backbone(images, tokens=False).pooled        # (B, d)
        f_hat = self.label_features().to(v.dtype)             # (C, d)
        logits = F.normalize(v, dim=-1) @ F.normalize(f_hat, dim=-1).t()
        logits = self.logit_scale.exp().to(logits.dtype) * logits
        if targets is None:
            return logits
        if self.loss_fn is None:
            raise ValueError("CAPNet: the loss needs class_freq (per-class positive counts of the training labels) "
                             "and train_num (the number of training images); give both to create_model / "
                             "CAPNetConfig to train")
        y = check_targets(targets, logits)
        cls = self.loss_fn(logits.float(), y.float())
        return ModelOutput(logits, cls, {"cls": cls.detach()})


@register_model("capnet", CAPNetConfig, "CAPNET: adapted CLIP, class-specific prompts + label GCN, DB-Focal loss")
def capnet(classnames, config: CAPNetConfig) -> CAPNet:
    return CAPNet(classnames, config)
