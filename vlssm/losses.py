"""Training objectives of the three model families, as plain ``nn.Module`` losses.

- :class:`AsymmetricLoss` — ASL (Ridnik et al., ICCV 2021), MVLR's L_CLS (its Eq. 13).
- :class:`DistributionBalancedFocalLoss` — DB-Focal (Wu et al., ECCV 2020), CAPNET's loss.
- :class:`CompensatingLogitAdjustedLoss` — Candle's logit-adjusted cross-entropy with a
  +1-compensated class prior (single-label and multi-label modes).
- :class:`KCRLoss` — MVLR's knowledge-to-context regularisation L_KCR (Eq. 9), a thin
  module over :func:`vlssm.ops.kcr_loss`.

Every loss states its published formula, where it comes from (paper and official code)
and the shapes it takes; where a paper is silent the choice made is written down as an
assumption (docs/design.md section 6).

Conventions shared by the multi-label losses:

- ``forward(logits, targets)``: ``targets`` has exactly ``logits``' shape (no broadcast)
  and holds 0/1 (bool, integer or floating dtype), or ``ignore_index`` where set.
- Computation is in float32 for float16 / bfloat16 logits (float64 for float64); the loss
  is returned in that dtype (like :func:`vlssm.ops.kcr_loss`: rounding a loss to 8 bits
  buys nothing). Gradients flow back to the logits in their own dtype.
- ``reduction``: ``"none"`` (elementwise, ignored entries 0), ``"sum"``, ``"mean"`` (over
  the non-ignored elements; 0 when every element is ignored).
- ``ignore_index`` (default None: off): target entries equal to it (e.g. -1 for VOC's
  "difficult" labels, the convention of DB's ``partial_cross_entropy``) contribute no
  loss and no gradient, and are not counted by ``"mean"``. It may not be 0 or 1.
- Invalid arguments raise TypeError (wrong type / dtype) or ValueError (wrong shape,
  value, device), naming the argument. The check that targets are in {0, 1} reads the
  tensor's values (one device sync); it is skipped while ``torch.compile`` traces.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from ._backend import check_backend
from ._dtypes import acc_dtype

__all__ = ["AsymmetricLoss", "DistributionBalancedFocalLoss", "CompensatingLogitAdjustedLoss", "KCRLoss"]

REDUCTIONS = ("none", "mean", "sum")
FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

Counts = Union[torch.Tensor, Sequence[float]]


# --------------------------------------------------------------------------
# Argument checks

def _shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _number(name: str, v, *, min_value: Optional[float] = None, min_open: bool = False,
            max_value: Optional[float] = None, max_open: bool = False) -> float:
    """A finite real hyperparameter within [min, max] (open ends where asked); returns it as float."""
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if min_value is not None and (v <= min_value if min_open else v < min_value):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {min_value}, got {v}")
    if max_value is not None and (v >= max_value if max_open else v > max_value):
        raise ValueError(f"{name} must be {'<' if max_open else '<='} {max_value}, got {v}")
    return v


def _reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return v


def _ignore_index(v, binary: bool = True) -> Optional[int]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"ignore_index must be an int or None, got {type(v).__name__}")
    if binary and v in (0, 1):
        raise ValueError(f"ignore_index must not be 0 or 1 (those are target values), got {v}")
    return v


def _counts(name: str, counts: Counts, *, allow_zero: bool) -> torch.Tensor:
    """Per-class counts as an int64 (C,) tensor on the CPU: integers, > 0 (>= 0 with allow_zero).

    Integer storage keeps them exact when the module is cast (``.half()``, ``.to(dtype)``);
    the quantities derived from them are computed per call in the compute dtype.
    """
    if isinstance(counts, torch.Tensor):
        if counts.dtype == torch.bool or counts.is_complex():
            raise TypeError(f"{name} must hold real numbers, got dtype {counts.dtype}")
        t = counts.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(counts, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D tensor or sequence of per-class counts, "
                            f"got {type(counts).__name__}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence (one count per class), got shape "
                         f"{_shape_str(t.shape)}")
    if not torch.isfinite(t).all() or not (t == t.round()).all():
        raise ValueError(f"{name} must hold integer counts (numbers of training samples), got {t.tolist()}")
    bad = (t < 0) if allow_zero else (t <= 0)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        need = ">= 0" if allow_zero else "> 0 (a class without positives has no frequency: 1/n and log fail)"
        raise ValueError(f"{name} must be {need}; class {i} has {t[i].item():g}")
    return t.to(torch.int64)


def _logits(logits, ndim: Optional[int] = None, layout: str = "(..., C)") -> torch.Tensor:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape {layout}, got {type(logits).__name__}")
    if logits.dtype not in FLOATING:
        raise TypeError(f"logits must be a floating tensor (float16, bfloat16, float32, float64), got {logits.dtype}")
    if ndim is not None and logits.dim() != ndim:
        raise ValueError(f"logits must have shape {layout} ({ndim} dims), got {_shape_str(logits.shape)}")
    if logits.dim() == 0 or logits.numel() == 0:
        raise ValueError(f"logits must have shape {layout} and not be empty, got {_shape_str(logits.shape)}")
    return logits


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _binary_targets(targets, logits: torch.Tensor, ignore_index: Optional[int]) -> Tuple[torch.Tensor,
                                                                                         Optional[torch.Tensor]]:
    """Multi-hot targets of logits' shape -> (positive mask (bool), valid mask (bool) or None)."""
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of logits' shape {_shape_str(logits.shape)}, "
                        f"got {type(targets).__name__}")
    if targets.is_complex():
        raise TypeError(f"targets must be a bool, integer or floating tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValueError(f"targets must have logits' shape {_shape_str(logits.shape)} (no broadcasting), "
                         f"got {_shape_str(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets must be on {logits.device} like logits, got {targets.device}")
    if targets.dtype == torch.bool:
        return targets, None
    pos = targets == 1
    valid = None if ignore_index is None else targets != ignore_index
    if not _tracing():
        ok = pos | (targets == 0)
        if valid is not None:
            ok = ok | ~valid
        if not bool(ok.all()):
            bad = targets[~ok][0].item()
            allowed = "{0, 1}" if ignore_index is None else f"{{0, 1}} or ignore_index={ignore_index}"
            hint = "" if ignore_index is not None else " (set ignore_index to mark entries to ignore)"
            raise ValueError(f"targets must hold values in {allowed}, got {bad}{hint}")
    return pos, valid   # ignore_index is never 1: ignored entries are not in pos


def _reduce(loss: torch.Tensor, valid: Optional[torch.Tensor], reduction: str) -> torch.Tensor:
    """Zero the ignored entries of an elementwise loss and reduce it."""
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros((), dtype=loss.dtype, device=loss.device))
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    count = loss.numel() if valid is None else valid.sum().clamp_min(1).to(loss.dtype)
    return total / count


# --------------------------------------------------------------------------
# ASL

class AsymmetricLoss(nn.Module):
    r"""Asymmetric Loss (ASL) for multi-label classification.

    Source: T. Ridnik et al., "Asymmetric Loss For Multi-Label Classification", ICCV 2021
    (asymmetric focusing and probability shifting); official code Alibaba-MIIL/ASL ``src/loss_functions/losses.py``
    ``AsymmetricLoss``, whose arithmetic this follows. With ``p = sigmoid(z)`` and the
    probability-shifted negative ``p_m = max(p - m, 0)`` (m = ``clip``)::

        L+ = (1 - p)^gamma_pos   * log(max(p, eps))
        L- = p_m^gamma_neg       * log(max(1 - p_m, eps))       (1 - p_m = min(1 - p + m, 1))
        loss = -(y L+ + (1 - y) L-)  per element; reduction "sum" is ASL's -loss.sum()

    i.e. the code's ``xs_neg = (1 - p + clip).clamp(max=1)``, logs clamped at ``eps``,
    focusing weight ``(1 - pt)^(gamma_pos y + gamma_neg (1 - y))`` with
    ``pt = p y + xs_neg (1 - y)``. ``clip`` None or 0 turns the shift off.
    ``disable_torch_grad_focal_loss=True`` computes the focusing weight without gradient,
    as ASL's own code does when that flag is set (its ``AsymmetricLoss`` defaults to True,
    its ``AsymmetricLossOptimized`` to False; here False, the exact gradient of the formula).

    Numerics: the same function as the reference code, evaluated stably. The logs are
    ``max(logsigmoid(z), log eps)`` (= log(max(p, eps)) exactly: same value and same zero
    gradient where the clamp binds) and, without shift, ``max(logsigmoid(-z), log eps)``;
    with a shift ``log(max(min(sigmoid(-z) + m, 1), eps))``. The focusing weights are
    ``exp(gamma_pos * logsigmoid(-z))`` and ``max(sigmoid(z) - m, 0)^gamma_neg`` (or
    ``exp(gamma_neg * logsigmoid(z))`` without shift), with a zero (not NaN) gradient where
    the shifted probability is 0. Half / bfloat16 logits are computed in float32. Logits of
    any magnitude (e.g. +-100) give a finite loss and finite gradients (ASL's code gives a
    NaN gradient where 1 - pt is exactly 0 with a fractional gamma; elsewhere the two agree).

    MVLR (mvlr.md Eq. 13, section 4.2) uses ASL with gamma+ = 0, gamma- = 2 and the
    per-image mean over the C classes (Eq. 13 as printed lacks the leading minus sign of a
    loss); it does not state clip or eps, which are assumed to be ASL's defaults (0.05, 1e-8).
    :meth:`for_mvlr` builds that configuration, with reduction "mean" (Eq. 13's 1/C,
    averaged over the batch).

    Args:
        gamma_neg, gamma_pos: focusing exponents (>= 0) of negatives / positives.
        clip: probability margin m in [0, 1), or None (= 0).
        eps: clamp of the probabilities inside the logs, in (0, 1).
        disable_torch_grad_focal_loss: no gradient through the focusing weight.
        reduction: "sum" (ASL's), "mean" (over non-ignored elements) or "none".
        ignore_index: target value that marks an entry to ignore (e.g. -1), or None.

    Shapes: ``forward(logits (..., C), targets (..., C)) ->`` a 0-dim tensor, or
    (..., C) for reduction "none"; float32 for half / bfloat16 logits.
    """

    def __init__(self, gamma_neg: float = 4, gamma_pos: float = 1, clip: Optional[float] = 0.05,
                 eps: float = 1e-8, disable_torch_grad_focal_loss: bool = False, reduction: str = "sum",
                 ignore_index: Optional[int] = None):
        super().__init__()
        self.gamma_neg = _number("gamma_neg", gamma_neg, min_value=0.0)
        self.gamma_pos = _number("gamma_pos", gamma_pos, min_value=0.0)
        self.clip = 0.0 if clip is None else _number("clip", clip, min_value=0.0, max_value=1.0, max_open=True)
        self.eps = _number("eps", eps, min_value=0.0, min_open=True, max_value=1.0, max_open=True)
        self.disable_torch_grad_focal_loss = _flag("disable_torch_grad_focal_loss", disable_torch_grad_focal_loss)
        self.reduction = _reduction(reduction)
        self.ignore_index = _ignore_index(ignore_index)

    @classmethod
    def for_mvlr(cls, **overrides) -> "AsymmetricLoss":
        """MVLR's L_CLS (mvlr.md Eq. 13 and section 4.2): gamma_pos=0, gamma_neg=2, reduction
        "mean"; clip=0.05 and eps=1e-8 are ASL's defaults (the paper does not state them)."""
        cfg = dict(gamma_neg=2, gamma_pos=0, clip=0.05, eps=1e-8, reduction="mean")
        cfg.update(overrides)
        return cls(**cfg)

    def extra_repr(self) -> str:
        return (f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, eps={self.eps}, "
                f"disable_torch_grad_focal_loss={self.disable_torch_grad_focal_loss}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")

    def _focusing(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(1 - p)^gamma_pos and p_m^gamma_neg."""
        w_pos = torch.exp(self.gamma_pos * F.logsigmoid(-z)) if self.gamma_pos > 0 else torch.ones_like(z)
        if self.gamma_neg == 0:
            w_neg = torch.ones_like(z)
        elif self.clip > 0:
            p_m = torch.sigmoid(z) - self.clip
            live = p_m > 0
            safe = torch.where(live, p_m, torch.ones((), dtype=z.dtype, device=z.device))
            w_neg = torch.where(live, safe.pow(self.gamma_neg), torch.zeros((), dtype=z.dtype, device=z.device))
        else:
            w_neg = torch.exp(self.gamma_neg * F.logsigmoid(z))
        return w_pos, w_neg

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _logits(logits)
        pos, valid = _binary_targets(targets, logits, self.ignore_index)
        z = logits.to(acc_dtype(logits.dtype))
        log_eps = math.log(self.eps)
        log_pos = F.logsigmoid(z).clamp(min=log_eps)
        if self.clip > 0:
            log_neg = torch.log((torch.sigmoid(-z) + self.clip).clamp(max=1.0).clamp(min=self.eps))
        else:
            log_neg = F.logsigmoid(-z).clamp(min=log_eps)
        if self.disable_torch_grad_focal_loss:
            with torch.no_grad():
                w_pos, w_neg = self._focusing(z)
        else:
            w_pos, w_neg = self._focusing(z)
        loss = -torch.where(pos, w_pos * log_pos, w_neg * log_neg)
        return _reduce(loss, valid, self.reduction)


# --------------------------------------------------------------------------
# Distribution-Balanced loss

class DistributionBalancedFocalLoss(nn.Module):
    r"""Distribution-Balanced loss with focal term (DB-Focal) for long-tailed multi-label data.

    Source: T. Wu, Q. Huang, Z. Liu, Y. Wang, D. Lin, "Distribution-Balanced Loss for
    Multi-Label Classification in Long-Tailed Datasets", ECCV 2020; official code
    wutong16/DistributionBalancedLoss ``mllt/models/losses/resample_loss.py`` ``ResampleLoss``
    with ``use_sigmoid=True, reweight_func='rebalance', focal=dict(focal=True, ...),
    logit_reg=dict(neg_scale, init_bias), map_param=dict(alpha, beta, gamma)`` — the
    configuration of its DB configs (copied by prompt-tuning long-tail work, e.g.
    richard-peng-xia/LMPT ``lmpt/dbl.py``). The arithmetic is the official code's,
    including where it may differ from the paper's notation (the logit shift below).

    With n_i the positive count of class i in the training set, N the number of training
    images, C classes, logits z (B, C), targets y (B, C)::

        re-balanced weighting (per image k, class i; code ``rebalance_weight``)
            P^C_i   = (1/C) (1/n_i),   P^I_k = (1/C) sum_{j: y_kj = 1} 1/n_j
            r_ki    = P^C_i / P^I_k
            w_ki    = alpha + sigmoid(beta (r_ki - mu))          (code: map_param gamma = mu)
        negative-tolerant regularisation (code ``logit_reg_functions``)
            b_i     = -log(N / n_i - 1)                          (prior log-odds of class i)
            q_ki    = z_ki + kappa b_i / lambda                   (code: logits += init_bias)
            pos:    s = q,          weight w           -> bce = log(1 + exp(-s))
            neg:    s = lambda q,   weight w / lambda  -> bce = log(1 + exp(s))
        focal term (code: pt = exp(-bce), (1 - pt)^gamma, not detached)
            loss_ki = balance_param * weight * (1 - exp(-bce))^gamma * bce

    So a negative costs ``(w/lambda) sigmoid(s)^gamma log(1 + exp(lambda z + kappa b_i))``
    and a positive ``w (1 - sigmoid(q))^gamma log(1 + exp(-(z + kappa b_i / lambda)))``.
    In the paper's notation z - nu_i with a class-specific bias nu_i = kappa b_hat_i, the
    official code's bias is nu_i = -kappa b_i / lambda (it adds ``init_bias = kappa b_i /
    lambda`` to the logits before scaling the negatives by lambda); the code is implemented.
    An image with no positive label has P^I = 0, r = inf: its weight is alpha + 1 (the
    code's limit, computed without an inf). Entries equal to ``ignore_index`` count as
    neither positive (in P^I) nor negative and carry no loss.

    Defaults: the official COCO-LT config ``configs/coco/LT_resnet50_pfc_DB.py``
    (alpha=0.1, beta=10, mu=0.2, neg_scale lambda=2, init_bias kappa=0.05, gamma=2,
    balance_param=2). Its VOC-LT config differs in mu=0.3, lambda=5: use
    ``from_preset("voc-lt", ...)``. ResampleLoss's own constructor defaults
    (map_param alpha=10, beta=0.2, gamma=0.1; init_bias 0.1, neg_scale 5) are not used by
    any of its configs. Reduction "mean" (over elements) is what the official training
    loop applies to the elementwise loss (``parse_losses``: ``loss.mean()``).

    Numerics: bce and the focal factor are ``-logsigmoid(m)`` and ``exp(gamma logsigmoid(-m))``
    with m = s (positives) or -s (negatives): the same values, finite for any logits and
    gamma >= 0. Computed in float32 for half / bfloat16 logits.

    Args:
        class_freq: (C,) positive counts n_i from the training labels (integers, all > 0).
        train_num: N (int), the number of training images (> every n_i).
        alpha, beta, mu: smoothing function of the re-balancing weight.
        neg_scale: lambda > 0. init_bias: kappa >= 0. gamma: focal exponent >= 0.
        balance_param: constant factor of the focal loss (> 0).
        reduction: "mean" (default), "sum" or "none". ignore_index: see module docstring.

    Shapes: ``forward(logits (B, C), targets (B, C))``; a 0-dim tensor or (B, C).
    """

    PRESETS = {
        "coco-lt": dict(alpha=0.1, beta=10.0, mu=0.2, neg_scale=2.0, init_bias=0.05, gamma=2.0, balance_param=2.0),
        "voc-lt": dict(alpha=0.1, beta=10.0, mu=0.3, neg_scale=5.0, init_bias=0.05, gamma=2.0, balance_param=2.0),
    }

    def __init__(self, class_freq: Counts, train_num: int, *, alpha: float = 0.1, beta: float = 10.0,
                 mu: float = 0.2, neg_scale: float = 2.0, init_bias: float = 0.05, gamma: float = 2.0,
                 balance_param: float = 2.0, reduction: str = "mean", ignore_index: Optional[int] = None):
        super().__init__()
        freq = _counts("class_freq", class_freq, allow_zero=False)
        if isinstance(train_num, bool) or not isinstance(train_num, Integral):
            raise TypeError(f"train_num must be an int (the number of training images), got {type(train_num).__name__}")
        if not train_num > int(freq.max()):
            raise ValueError(f"train_num must be > every class frequency (the prior n_i / train_num must be < 1 "
                             f"for log(train_num / n_i - 1)), got train_num={train_num} and max(class_freq)="
                             f"{int(freq.max())}")
        self.train_num = int(train_num)
        self.alpha = _number("alpha", alpha, min_value=0.0)
        self.beta = _number("beta", beta, min_value=0.0)
        self.mu = _number("mu", mu)
        self.neg_scale = _number("neg_scale", neg_scale, min_value=0.0, min_open=True)
        self.init_bias = _number("init_bias", init_bias, min_value=0.0)
        self.gamma = _number("gamma", gamma, min_value=0.0)
        self.balance_param = _number("balance_param", balance_param, min_value=0.0, min_open=True)
        self.reduction = _reduction(reduction)
        self.ignore_index = _ignore_index(ignore_index)
        self.num_classes = int(freq.numel())
        self.register_buffer("class_freq", freq, persistent=False)   # int64 (C,): exact under module casts

    @classmethod
    def from_preset(cls, name: str, class_freq: Counts, train_num: int, **overrides):
        """The official config of a benchmark: "coco-lt" (the defaults) or "voc-lt"."""
        if name not in cls.PRESETS:
            raise ValueError(f"name must be one of {tuple(cls.PRESETS)}, got {name!r}")
        cfg = dict(cls.PRESETS[name])
        cfg.update(overrides)
        return cls(class_freq, train_num, **cfg)

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, train_num={self.train_num}, alpha={self.alpha}, "
                f"beta={self.beta}, mu={self.mu}, neg_scale={self.neg_scale}, init_bias={self.init_bias}, "
                f"gamma={self.gamma}, balance_param={self.balance_param}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}")

    def logit_shift(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """kappa b_i / lambda (C,), b_i = -log(N / n_i - 1): what the official code adds to the logits."""
        freq = self.class_freq.to(device=device, dtype=dtype)
        return -torch.log(self.train_num / freq - 1.0) * (self.init_bias / self.neg_scale)

    def rebalance_weight(self, pos: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """r_hat (B, C) from the positive mask (B, C) (bool): alpha + sigmoid(beta (r - mu))."""
        freq_inv = 1.0 / self.class_freq.to(device=pos.device, dtype=dtype)
        repeat = (pos.to(dtype) * freq_inv).sum(-1, keepdim=True)                 # C P^I, (B, 1)
        has_pos = repeat > 0
        r = freq_inv / torch.where(has_pos, repeat, torch.ones((), dtype=dtype, device=pos.device))
        w = self.alpha + torch.sigmoid(self.beta * (r - self.mu))
        return torch.where(has_pos, w, torch.full((), self.alpha + 1.0, dtype=dtype, device=pos.device))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _logits(logits, 2, "(B, C)")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, C) with C = {self.num_classes} (len(class_freq)), "
                             f"got {_shape_str(logits.shape)}")
        pos, valid = _binary_targets(targets, logits, self.ignore_index)
        cd = acc_dtype(logits.dtype)
        z = logits.to(cd)
        with torch.no_grad():
            w = self.rebalance_weight(pos, cd)
        q = z + self.logit_shift(cd, z.device)
        lam = self.neg_scale
        s = torch.where(pos, q, lam * q)
        weight = torch.where(pos, w, w / lam)
        m = torch.where(pos, s, -s)                   # margin: bce = log(1 + exp(-m))
        bce = -F.logsigmoid(m)
        focal = torch.exp(self.gamma * F.logsigmoid(-m)) if self.gamma > 0 else torch.ones_like(m)
        loss = self.balance_param * weight * focal * bce
        return _reduce(loss, valid, self.reduction)


# --------------------------------------------------------------------------
# Candle

class CompensatingLogitAdjustedLoss(nn.Module):
    r"""Candle's compensating logit-adjusted loss.

    Source: J. Shi et al., "Efficient and Long-Tailed Generalization for Pre-trained
    Vision-Language Model" (Candle), KDD 2024, arXiv 2406.12638 (candle-summary.md); built on
    logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021).
    The logits are adjusted by the log class prior, with the prior compensated so that
    classes without training samples (Candle's new classes, n_c = 0) get a finite one::

        pi_c  = (n_c + 1) / sum_j (n_j + 1)
        l'_c  = l_c + tau log(pi_c)
        single-label:  loss = -log softmax(l')_y = logsumexp_j l'_j - l'_y
        multi-label:   loss_c = -[y_c log sigmoid(l'_c) + (1 - y_c) log(1 - sigmoid(l'_c))]

    Single-label (``multi_label=False``, Candle's setting): softmax cross-entropy,
    ``targets`` (B,) integer class indices; "mean" averages over the (non-ignored) images.
    Multi-label (``multi_label=True``, this library's extension for multi-label use):
    sigmoid BCE of every adjusted logit, ``targets`` (B, C) multi-hot; "mean" averages over
    the (non-ignored) elements. Assumption: the same normalised prior is used in both
    modes, so in multi-label mode every logit is shifted by tau log(pi_c) <= 0 (about
    -tau log C for balanced counts); the loss is invariant to that constant only in
    single-label mode.

    Numerics: logsumexp and logsigmoid in float32 (float64 for float64 logits): finite for
    any logits.

    Args:
        class_counts: (C,) training samples per class, integers >= 0 (0 for new classes).
        tau: adjustment strength >= 0 (Candle: 1; 0 is plain cross-entropy).
        multi_label: sigmoid BCE on multi-hot targets instead of softmax CE.
        reduction: "mean", "sum" or "none".
        ignore_index: a target index (single-label) or value (multi-label, not 0/1) to skip.

    Shapes: ``forward(logits (B, C), targets (B,) int64 | (B, C) multi-hot)`` -> 0-dim,
    or (B,) / (B, C) for reduction "none".
    """

    def __init__(self, class_counts: Counts, tau: float = 1.0, multi_label: bool = False, reduction: str = "mean",
                 ignore_index: Optional[int] = None):
        super().__init__()
        counts = _counts("class_counts", class_counts, allow_zero=True)
        self.tau = _number("tau", tau, min_value=0.0)
        self.multi_label = _flag("multi_label", multi_label)
        self.reduction = _reduction(reduction)
        self.ignore_index = _ignore_index(ignore_index, binary=multi_label)
        if not multi_label and ignore_index is not None and 0 <= ignore_index < counts.numel():
            raise ValueError(f"ignore_index must not be a class index in [0, {counts.numel()}), got {ignore_index}")
        self.num_classes = int(counts.numel())
        self.register_buffer("class_counts", counts, persistent=False)   # int64 (C,): exact under module casts

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, tau={self.tau}, multi_label={self.multi_label}, "
                f"reduction={self.reduction!r}, ignore_index={self.ignore_index}")

    def log_prior(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """log pi (C,), pi_c = (n_c + 1) / sum_j (n_j + 1)."""
        n1 = self.class_counts.to(device=device, dtype=dtype) + 1.0
        return torch.log(n1 / n1.sum())

    def adjusted_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """l + tau log(pi), in the compute dtype (float32 for half / bfloat16 logits)."""
        cd = acc_dtype(logits.dtype)
        return logits.to(cd) + self.tau * self.log_prior(cd, logits.device)

    def _class_targets(self, targets, logits: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        B, C = logits.shape
        if not isinstance(targets, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor of class indices, shape ({B},), "
                            f"got {type(targets).__name__}")
        if targets.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
            raise TypeError(f"targets must be an integer tensor of class indices (multi_label=False), "
                            f"got {targets.dtype}")
        if tuple(targets.shape) != (B,):
            raise ValueError(f"targets must have shape (B,) = ({B},) like logits' batch, got "
                             f"{_shape_str(targets.shape)}")
        if targets.device != logits.device:
            raise ValueError(f"targets must be on {logits.device} like logits, got {targets.device}")
        targets = targets.long()
        valid = None if self.ignore_index is None else targets != self.ignore_index
        if not _tracing():
            ok = (targets >= 0) & (targets < C)
            if valid is not None:
                ok = ok | ~valid
            if not bool(ok.all()):
                raise ValueError(f"targets must be class indices in [0, {C})"
                                 + ("" if valid is None else f" or ignore_index={self.ignore_index}")
                                 + f", got {targets[~ok][0].item()}")
        if valid is not None:
            targets = torch.where(valid, targets, torch.zeros_like(targets))
        return targets, valid

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        _logits(logits, 2, "(B, C)")
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, C) with C = {self.num_classes} (len(class_counts)), "
                             f"got {_shape_str(logits.shape)}")
        adj = self.adjusted_logits(logits)
        if self.multi_label:
            pos, valid = _binary_targets(targets, logits, self.ignore_index)
            loss = -F.logsigmoid(torch.where(pos, adj, -adj))
        else:
            idx, valid = self._class_targets(targets, logits)
            loss = torch.logsumexp(adj, dim=1) - adj.gather(1, idx[:, None]).squeeze(1)
        return _reduce(loss, valid, self.reduction)


# --------------------------------------------------------------------------
# KCR

class KCRLoss(nn.Module):
    r"""MVLR's knowledge-to-context regularisation loss (mvlr.md Eq. 9), a thin module over
    :func:`vlssm.ops.kcr_loss`::

        L_KCR = (1/C) sum_j (1 - t^ka_j . t^ca_j / (|t^ka_j| |t^ca_j|))

    with norms clamped at ``eps`` (``torch.nn.functional.cosine_similarity``'s convention);
    the mean runs over every label row of the broadcast leading dims (e.g. (C, d) against
    (B, C, d): over B x C rows). :class:`vlssm.IFM` already returns this term
    (``IFMOutput.kcr_loss``); this module is for standalone use. MVLR weights it by
    lambda = 4 in L = L_CLS + lambda L_KCR (Eq. 14) — the weight is the model's, not here.

    Args:
        eps: >= 0, the norm clamp. backend: None or a vlssm backend name ("auto", "cpu",
            "triton", "reference"), passed to the op.

    Shapes: ``forward(t_ka (..., C, d), t_ca (..., C, d)) ->`` 0-dim; float32 for
    half / bfloat16 inputs (see :func:`vlssm.ops.kcr_loss`).
    """

    def __init__(self, eps: float = 1e-8, backend: Optional[str] = None):
        super().__init__()
        self.eps = _number("eps", eps, min_value=0.0)
        self.backend = check_backend(backend)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, backend={self.backend!r}"

    def forward(self, t_ka: torch.Tensor, t_ca: torch.Tensor) -> torch.Tensor:
        return ops.kcr_loss(t_ka, t_ca, self.eps, backend=self.backend)
