"""Evaluation metrics of the multi-label papers (MVLR, CAPNET) and of Candle's base-to-new setting.

Functional forms take whole arrays; streaming forms (:class:`MeanAveragePrecision`,
:class:`MultilabelScores`, :class:`Accuracy`) take batches with ``update(scores, targets)``,
keep their state on the CPU, and give the same numbers from ``compute()`` as the functional
form on the concatenated batches. ``reset()`` empties them.

Shapes: ``N`` images, ``C`` classes.

=====================================  =========================================================
function                               what
=====================================  =========================================================
:func:`average_precision`              per-class AP, ``(C,)`` float64, NaN for a class without a positive
:func:`mean_average_precision`         mAP over the classes that have a positive
:func:`group_mean_average_precision`   mAP of the head / medium / tail classes (by training counts)
:func:`split_by_frequency`             the head / medium / tail class indices
:func:`multilabel_scores`              CP, CR, CF1, OP, OR, OF1 (threshold and / or top-k)
:func:`accuracy`                       single-label top-1 accuracy
:func:`harmonic_mean`                  HM of base and new accuracy, ``2 b n / (b + n)``
=====================================  =========================================================

Every metric is a fraction in [0, 1] (the papers print percentages: multiply by 100).

Conventions and their sources
-----------------------------
* **AP** is the non-interpolated average precision of scikit-learn's
  ``sklearn.metrics.average_precision_score``: ``AP = sum_n (R_n - R_{n-1}) P_n`` over the
  distinct score values taken as thresholds, i.e. the mean, over the positives, of the
  precision at the threshold equal to that positive's score. **Tied scores form one
  threshold**, so the result does not depend on the order of tied entries (ML-GCN's
  ``AveragePrecisionMeter`` (util.py, reused by much later multi-label code) walks a
  ``torch.sort`` order instead, so its AP with ties depends on that order; without ties the
  two agree). It is not VOC2007's 11-point interpolated AP: ML-GCN's meter, also used for
  its VOC 2007 numbers, is non-interpolated too.
* **mAP** is the mean of AP over the classes with at least one positive (after dropping
  ignored entries); a class without a positive has no AP (NaN in :func:`average_precision`)
  and is excluded from the mean. (scikit-learn 1.9 and torchmetrics 1.9 instead give such a
  class AP 0 and keep it in their macro mean, which lowers the mAP; ML-GCN's meter divides
  by zero there.) If no class has a positive the mAP is undefined and a ValueError is raised.
* **ignore_index** (default -1): an entry whose target equals it is dropped from its class,
  as VOC's "difficult" labels are (ML-GCN's VOC loader marks them 0 and its AP skips them,
  ``difficult_examples=True``). ``None`` allows only 0 / 1 targets.
* **CP, CR, CF1, OP, OR, OF1** follow ML-GCN's ``AveragePrecisionMeter.evaluation`` /
  ``overall_topk`` (util.py; the code later multi-label papers' CF1 / OF1 tables reuse):
  per class ``Nc`` (true positives), ``Np``
  (predicted), ``Ng`` (positives); ``CP = mean_c Nc/Np``, ``CR = mean_c Nc/Ng`` over **all**
  C classes, ``CF1 = 2 CP CR / (CP + CR)`` from the averaged CP and CR (not the mean of
  per-class F1, which torchmetrics' / scikit-learn's macro F1 is); ``OP = sum Nc / sum Np``,
  ``OR = sum Nc / sum Ng``, ``OF1 = 2 OP OR / (OP + OR)``. Zero divisions give 0: a class
  never predicted has precision 0 (ML-GCN sets ``Np[Np == 0] = 1``), a class without a
  positive has recall 0 (ML-GCN gets NaN there; 0 is scikit-learn's
  ``precision_score`` / ``recall_score`` with ``zero_division=0``), and an F1 whose P + R
  is 0 is 0. So CP and CR equal scikit-learn's macro precision and recall with
  ``zero_division=0``, and OP, OR, OF1 its micro ones. Ignored entries count nowhere (ML-GCN
  counted a prediction on a "difficult" label as a false positive).
* **threshold** applies to probabilities: a label is predicted when ``p >= threshold``
  (ML-GCN: ``>= 0.5``, or logit ``>= 0``). Scores must then be probabilities in [0, 1];
  with ``from_logits=True`` they are logits and the test is ``logit >= log(t / (1 - t))``,
  done in logit space so that logit 0 is exactly probability 0.5 (no sigmoid rounding).
* **top_k** (the papers' "top-3" columns): a label is predicted when it is among the k
  highest scores of its image **and** passes the threshold, as ML-GCN's ``overall_topk``
  does; ``threshold=None`` with ``top_k`` keeps the k highest whatever their score. Ties at
  the k-th score go to the lower class index (a stable sort; ML-GCN's ``topk`` leaves it
  unspecified).
* **Head / medium / tail** (CAPNET's VOC-LT / COCO-LT split, from the distribution-balanced
  loss of Wu et al. 2020): by the number of training images of each class, head ``>= 100``,
  medium ``20..99``, tail ``< 20`` (``head_min`` / ``tail_below`` change the edges; the
  text "more than 100" / "20-100" leaves 100 itself ambiguous: here it is head). A group's
  mAP averages the AP of its classes that have a positive; NaN if none has.
* **accuracy**: the top-1 class is ``argmax`` over the scores (ties: the lowest index).
  **HM** (CoOp / CoCoOp / Candle base-to-new): ``2 b n / (b + n)``, 0 when ``b + n = 0``.

Hand-written, not delegated
---------------------------
All of it is written here on torch (no dependency beyond torch and numpy, which vlssm
already needs). scikit-learn and torchmetrics compute the same AP, precision and recall,
and ``tests/test_metrics.py`` checks against them, but: AP is vectorised over the classes
(one sort per class block instead of a Python loop per class), takes the ignore value
(scikit-learn has none), and needs no extra runtime package; CF1 is not a library's macro
F1 (see above); top-k with a threshold is not a library option.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "Accuracy",
    "MeanAveragePrecision",
    "MultilabelScores",
    "accuracy",
    "average_precision",
    "group_mean_average_precision",
    "harmonic_mean",
    "mean_average_precision",
    "multilabel_scores",
    "split_by_frequency",
]

ArrayLike = Union[torch.Tensor, np.ndarray]
GROUPS = ("head", "medium", "tail")
SCORE_KEYS = ("CP", "CR", "CF1", "OP", "OR", "OF1")
# AP sorts (N, chunk) blocks of classes: at most this many elements at once (4M float64 = 32 MiB).
_AP_BLOCK = 1 << 22


# --------------------------------------------------------------------------------------------
# argument checks: TypeError for a wrong type / dtype, ValueError for a wrong shape or value;
# every message names the argument.
# --------------------------------------------------------------------------------------------
def _to_tensor(name: str, x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, np.ndarray):
        try:
            return torch.from_numpy(np.ascontiguousarray(x))
        except TypeError as e:
            raise TypeError(f"{name} has a numpy dtype torch cannot hold: {x.dtype}") from e
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _check_scores(scores, ndim: int = 2, layout: str = "(N, C)") -> torch.Tensor:
    """``scores`` as a float64 CPU tensor of rank ``ndim``: floating, non-empty, NaN-free."""
    t = _to_tensor("scores", scores)
    if not t.is_floating_point():
        raise TypeError(f"scores must have a floating dtype (probabilities or logits), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"scores must have shape {layout}, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"scores must not be empty, got shape {tuple(t.shape)}")
    t = t.to(torch.float64)  # exact for every floating dtype: ties stay ties
    if torch.isnan(t).any():
        raise ValueError("scores must not contain NaN")
    return t


def _check_ignore_index(ignore_index) -> Optional[int]:
    if ignore_index is None:
        return None
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int or None, got {type(ignore_index).__name__}")
    if ignore_index in (0, 1):
        raise ValueError(f"ignore_index must differ from the labels 0 and 1, got {ignore_index}")
    return int(ignore_index)


def _check_multilabel_targets(targets, shape: Sequence[int],
                              ignore_index: Optional[int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``targets`` (N, C) with values in {0, 1, ignore_index} -> (positive, kept) bool masks."""
    t = _to_tensor("targets", targets)
    if t.is_complex():
        raise TypeError(f"targets must be bool, integer or floating, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"targets must have the shape of scores {tuple(shape)} (no broadcasting), "
                         f"got {tuple(t.shape)}")
    pos = t == 1
    keep = pos | (t == 0)
    valid = keep if ignore_index is None else keep | (t == ignore_index)
    if not bool(valid.all()):
        bad = t[~valid][0].item()
        allowed = "0 or 1" if ignore_index is None else f"0, 1 or ignore_index={ignore_index}"
        raise ValueError(f"targets must be {allowed}, found {bad!r}")
    return pos, keep


def _check_threshold(threshold, allow_none: bool) -> Optional[float]:
    if threshold is None:
        if allow_none:
            return None
        raise ValueError("threshold may be None only together with top_k")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real):
        raise TypeError(f"threshold must be a real number in [0, 1], got {type(threshold).__name__}")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    return threshold


def _check_top_k(top_k, num_classes: Optional[int]) -> Optional[int]:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
    if top_k < 1 or (num_classes is not None and top_k > num_classes):
        upper = "C" if num_classes is None else f"C={num_classes}"
        raise ValueError(f"top_k must be in [1, {upper}], got {top_k}")
    return int(top_k)


def _check_train_counts(train_counts, num_classes: Optional[int]) -> torch.Tensor:
    """Per-class training-image counts -> int64 (C,), non-negative integers."""
    if isinstance(train_counts, (torch.Tensor, np.ndarray)):
        t = _to_tensor("train_counts", train_counts)
    elif isinstance(train_counts, Sequence) and not isinstance(train_counts, (str, bytes)):
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in train_counts):
            raise TypeError("train_counts must hold numbers")
        t = torch.tensor([float(v) for v in train_counts], dtype=torch.float64)
    else:
        raise TypeError(f"train_counts must be a sequence, tensor or array, got {type(train_counts).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"train_counts must be integer counts, got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"train_counts must have shape (C,), got {tuple(t.shape)}")
    if num_classes is not None and t.numel() != num_classes:
        raise ValueError(f"train_counts must have one count per class (C={num_classes}), got {t.numel()}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or not bool((t == t.round()).all()):
            raise ValueError("train_counts must be whole numbers")
    if bool((t < 0).any()):
        raise ValueError("train_counts must be non-negative")
    return t.to(torch.int64)


def _check_edges(head_min, tail_below) -> Tuple[int, int]:
    for name, v in (("head_min", head_min), ("tail_below", tail_below)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 0 <= tail_below <= head_min:
        raise ValueError(f"need 0 <= tail_below <= head_min, got tail_below={tail_below}, head_min={head_min}")
    return int(head_min), int(tail_below)


# --------------------------------------------------------------------------------------------
# average precision
# --------------------------------------------------------------------------------------------
def _ap_from_masks(scores: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Per-class AP of float64 ``scores`` (N, C) with bool ``pos`` / ``keep`` (N, C) -> (C,) float64.

    Per class: sort descending, count true / false positives cumulatively (ignored entries
    count 0 in both), find the last entry of each run of equal scores (the threshold's end),
    and average, over the positives, the precision at the end of the positive's run.
    """
    n, c = scores.shape
    out = torch.full((c,), math.nan, dtype=torch.float64)
    block = max(1, _AP_BLOCK // n)
    rows = torch.arange(n).unsqueeze(1)
    for lo in range(0, c, block):
        hi = min(c, lo + block)
        s, order = torch.sort(scores[:, lo:hi], dim=0, descending=True)
        tp = pos[:, lo:hi].gather(0, order).to(torch.float64)  # an ignored entry is never a positive
        fp = (~pos[:, lo:hi] & keep[:, lo:hi]).gather(0, order).to(torch.float64)
        ctp, cfp = tp.cumsum(0), fp.cumsum(0)
        run_end = torch.ones_like(s, dtype=torch.bool)
        run_end[:-1] = s[:-1] != s[1:]
        end = torch.where(run_end, rows, n - 1).flip(0).cummin(0).values.flip(0)
        precision = ctp / (ctp + cfp).clamp_min(1.0)  # 0 / 1 only where no positive reads it
        npos = ctp[-1]
        ap = (tp * precision.gather(0, end)).sum(0) / npos.clamp_min(1.0)
        out[lo:hi] = torch.where(npos > 0, ap, torch.full_like(ap, math.nan))
    return out


def average_precision(scores: ArrayLike, targets: ArrayLike, ignore_index: Optional[int] = -1) -> torch.Tensor:
    """Per-class non-interpolated average precision (scikit-learn's ``average_precision_score``).

    Args:
        scores: (N, C) floating, any monotone score (probabilities or logits); no NaN.
        targets: (N, C) with values 0, 1 or ``ignore_index`` (bool, integer or floating dtype).
        ignore_index: target value whose entries are dropped from their class (VOC "difficult");
            ``None``: none.

    Returns:
        (C,) float64 CPU tensor of AP in [0, 1]; NaN for a class with no positive (after dropping).
        Tied scores are one threshold (the module docstring gives the formula).
    """
    ignore_index = _check_ignore_index(ignore_index)
    s = _check_scores(scores)
    pos, keep = _check_multilabel_targets(targets, s.shape, ignore_index)
    return _ap_from_masks(s, pos, keep)


def _nanmean_or_raise(ap: torch.Tensor) -> float:
    valid = ~torch.isnan(ap)
    if not bool(valid.any()):
        raise ValueError("targets have no positive label in any class (after dropping ignore_index): "
                         "mAP is undefined")
    return ap[valid].mean().item()


def mean_average_precision(scores: ArrayLike, targets: ArrayLike, ignore_index: Optional[int] = -1) -> float:
    """mAP: the mean of :func:`average_precision` over the classes that have a positive.

    Args:
        scores: (N, C) floating (probabilities or logits).
        targets: (N, C) in {0, 1, ignore_index}.
        ignore_index: target value dropped from its class's ranking; ``None``: none.

    Returns:
        mAP in [0, 1]. Classes without a positive are left out of the mean.

    Raises:
        ValueError: if no class has a positive.
    """
    return _nanmean_or_raise(average_precision(scores, targets, ignore_index))


def split_by_frequency(train_counts, head_min: int = 100, tail_below: int = 20) -> Dict[str, torch.Tensor]:
    """Split classes into head / medium / tail by their training-image counts.

    Args:
        train_counts: (C,) non-negative whole numbers: training images containing each class.
        head_min: a class with ``count >= head_min`` is head.
        tail_below: a class with ``count < tail_below`` is tail; the rest are medium.

    Returns:
        ``{"head", "medium", "tail"}`` -> int64 tensors of class indices, ascending (possibly empty).
    """
    head_min, tail_below = _check_edges(head_min, tail_below)
    counts = _check_train_counts(train_counts, None)
    head = counts >= head_min
    tail = counts < tail_below
    medium = ~head & ~tail
    return {name: torch.nonzero(m).flatten() for name, m in zip(GROUPS, (head, medium, tail))}


def _group_means(ap: torch.Tensor, train_counts, head_min: int, tail_below: int) -> Dict[str, float]:
    head_min, tail_below = _check_edges(head_min, tail_below)
    counts = _check_train_counts(train_counts, ap.numel())
    total = _nanmean_or_raise(ap)
    out = {}
    for name, idx in split_by_frequency(counts, head_min, tail_below).items():
        g = ap[idx]
        g = g[~torch.isnan(g)]
        out[name] = g.mean().item() if g.numel() else math.nan
    out["all"] = total
    return out


def group_mean_average_precision(scores: ArrayLike, targets: ArrayLike, train_counts, *,
                                 ignore_index: Optional[int] = -1, head_min: int = 100,
                                 tail_below: int = 20) -> Dict[str, float]:
    """mAP of the head / medium / tail classes (CAPNET's long-tailed tables) and of all classes.

    Args:
        scores: (N, C) floating; targets: (N, C) in {0, 1, ignore_index} (test / evaluation data).
        train_counts: (C,) training-image count of each class (from the training split).
        ignore_index, head_min, tail_below: as in :func:`average_precision` / :func:`split_by_frequency`.

    Returns:
        ``{"head", "medium", "tail", "all"}`` -> mAP; a group none of whose classes has a positive
        in ``targets`` (or that has no class) is NaN.

    Raises:
        ValueError: if no class at all has a positive (as :func:`mean_average_precision`).
    """
    return _group_means(average_precision(scores, targets, ignore_index), train_counts, head_min, tail_below)


# --------------------------------------------------------------------------------------------
# thresholded / top-k scores
# --------------------------------------------------------------------------------------------
def _predictions(s: torch.Tensor, threshold: Optional[float], top_k: Optional[int], from_logits: bool) -> torch.Tensor:
    """Bool (N, C): predicted labels of float64 scores ``s`` (already checked)."""
    if threshold is None:
        pred = torch.ones_like(s, dtype=torch.bool)
    elif from_logits:
        cut = -math.inf if threshold == 0.0 else math.inf if threshold == 1.0 else math.log(threshold / (1 - threshold))
        pred = s >= cut
    else:
        pred = s >= threshold
    if top_k is not None:
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :top_k]
        top = torch.zeros_like(pred).scatter_(1, order, True)
        pred &= top
    return pred


def _multilabel_counts(scores, targets, threshold, top_k, from_logits: bool,
                       ignore_index) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checked inputs -> per-class (Nc, Np, Ng) int64 (C,): true positives, predicted, positives."""
    if not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be a bool, got {type(from_logits).__name__}")
    ignore_index = _check_ignore_index(ignore_index)
    threshold = _check_threshold(threshold, allow_none=top_k is not None)
    s = _check_scores(scores)
    top_k = _check_top_k(top_k, s.shape[1])
    pos, keep = _check_multilabel_targets(targets, s.shape, ignore_index)
    if not from_logits and bool(((s < 0) | (s > 1)).any()):
        raise ValueError("scores must be probabilities in [0, 1] for a threshold; pass from_logits=True for logits")
    pred = _predictions(s, threshold, top_k, from_logits) & keep
    return (pred & pos).sum(0), pred.sum(0), (pos & keep).sum(0)


def _div0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b elementwise in float64, 0 where b == 0."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    return torch.where(b > 0, a / b.clamp_min(1.0), torch.zeros_like(a))


def _f1(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r) if p + r > 0 else 0.0


def _scores_from_counts(nc: torch.Tensor, np_: torch.Tensor, ng: torch.Tensor) -> Dict[str, float]:
    cp = _div0(nc, np_).mean().item()
    cr = _div0(nc, ng).mean().item()
    tc, tp, tg = (int(x.sum()) for x in (nc, np_, ng))
    op = tc / tp if tp else 0.0
    orr = tc / tg if tg else 0.0
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": orr, "OF1": _f1(op, orr)}


def multilabel_scores(scores: ArrayLike, targets: ArrayLike, threshold: Optional[float] = 0.5,
                      top_k: Optional[int] = None, *, from_logits: bool = False,
                      ignore_index: Optional[int] = -1) -> Dict[str, float]:
    """Class-wise and overall precision / recall / F1 of thresholded (or top-k) predictions.

    Args:
        scores: (N, C) floating. Probabilities in [0, 1], or logits with ``from_logits=True``.
        targets: (N, C) in {0, 1, ignore_index}.
        threshold: probability in [0, 1]; predicted when ``p >= threshold``. With
            ``from_logits=True`` the same cut in logit space (0.5 <-> logit 0). ``None``
            only with ``top_k``: no threshold.
        top_k: predict only the ``top_k`` highest-scoring labels of each image (that also
            pass the threshold); 1 <= top_k <= C. ``top_k=3``: the papers' "top-3" columns.
        from_logits: the scores are logits.
        ignore_index: entries with this target are counted nowhere; ``None``: none.

    Returns:
        ``{"CP", "CR", "CF1", "OP", "OR", "OF1"}`` -> float in [0, 1]; CF1 = 2 CP CR / (CP + CR)
        from the class-averaged CP and CR; 0 for a zero division (module docstring).
    """
    return _scores_from_counts(*_multilabel_counts(scores, targets, threshold, top_k, from_logits, ignore_index))


# --------------------------------------------------------------------------------------------
# single-label accuracy and the base-to-new harmonic mean
# --------------------------------------------------------------------------------------------
def _accuracy_counts(scores, targets) -> Tuple[int, int, int]:
    """Checked inputs -> (correct, images, C)."""
    s = _check_scores(scores)
    t = _to_tensor("targets", targets)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"targets must be integer class indices, got {t.dtype}")
    if tuple(t.shape) != (s.shape[0],):
        raise ValueError(f"targets must have shape (N,) = ({s.shape[0]},) like scores' first dim, got {tuple(t.shape)}")
    c = s.shape[1]
    if bool(((t < 0) | (t >= c)).any()):
        bad = t[(t < 0) | (t >= c)][0].item()
        raise ValueError(f"targets must be class indices in [0, {c}), found {bad}")
    correct = int((s.argmax(dim=1) == t.to(torch.int64)).sum())
    return correct, s.shape[0], c


def accuracy(scores: ArrayLike, targets: ArrayLike) -> float:
    """Single-label top-1 accuracy.

    Args:
        scores: (N, C) floating class scores (logits or probabilities); no NaN.
        targets: (N,) integer class indices in [0, C).

    Returns:
        Fraction of images whose highest score (lowest index on ties) is the target class.
    """
    correct, total, _ = _accuracy_counts(scores, targets)
    return correct / total


def harmonic_mean(base: float, new: float) -> float:
    """Harmonic mean of base and new accuracy, ``HM = 2 b n / (b + n)`` (Candle / CoCoOp base-to-new).

    Args:
        base, new: non-negative finite accuracies on the same scale (fractions, or both percent).

    Returns:
        HM on that scale; 0 when ``b + n == 0``.
    """
    vals = []
    for name, v in (("base", base), ("new", new)):
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite non-negative accuracy, got {v}")
        vals.append(v)
    b, n = vals
    return 2.0 * b * n / (b + n) if b + n > 0 else 0.0


# --------------------------------------------------------------------------------------------
# streaming forms
# --------------------------------------------------------------------------------------------
class _Streaming:
    _num_classes: Optional[int]

    def _check_classes(self, c: int) -> None:
        if self._num_classes is None:
            self._num_classes = c
        elif c != self._num_classes:
            raise ValueError(f"scores must have C={self._num_classes} classes like the earlier batches, got {c}")


class MeanAveragePrecision(_Streaming):
    """Streaming :func:`mean_average_precision` / :func:`average_precision`.

    ``update`` keeps a float64 CPU copy of each batch's scores (N_b, C) and two bool masks,
    since AP needs the full ranking (about 10 bytes per entry: COCO's 40k x 80 is ~32 MB).

    Args:
        ignore_index: as in :func:`average_precision`.
    """

    def __init__(self, ignore_index: Optional[int] = -1) -> None:
        self.ignore_index = _check_ignore_index(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Forget every batch."""
        self._scores, self._pos, self._keep = [], [], []
        self._num_classes = None

    def update(self, scores: ArrayLike, targets: ArrayLike) -> None:
        """Add a batch: scores (N_b, C) floating, targets (N_b, C) in {0, 1, ignore_index}."""
        s = _check_scores(scores)
        pos, keep = _check_multilabel_targets(targets, s.shape, self.ignore_index)
        self._check_classes(s.shape[1])
        self._scores.append(s)
        self._pos.append(pos)
        self._keep.append(keep)

    @property
    def num_samples(self) -> int:
        """Images seen since the last reset."""
        return sum(s.shape[0] for s in self._scores)

    def compute_per_class(self) -> torch.Tensor:
        """(C,) float64 AP of everything seen; NaN for a class without a positive."""
        if not self._scores:
            raise RuntimeError("MeanAveragePrecision.compute called before any update")
        return _ap_from_masks(torch.cat(self._scores), torch.cat(self._pos), torch.cat(self._keep))

    def compute(self) -> float:
        """mAP over the classes with a positive (ValueError if none has)."""
        return _nanmean_or_raise(self.compute_per_class())

    def compute_groups(self, train_counts, *, head_min: int = 100, tail_below: int = 20) -> Dict[str, float]:
        """As :func:`group_mean_average_precision` on everything seen."""
        return _group_means(self.compute_per_class(), train_counts, head_min, tail_below)


class MultilabelScores(_Streaming):
    """Streaming :func:`multilabel_scores`: keeps only the per-class counts (Nc, Np, Ng).

    The counts add up over batches (top-k is per image), so ``compute()`` equals the
    functional form on the concatenated batches exactly. Arguments as :func:`multilabel_scores`.
    """

    def __init__(self, threshold: Optional[float] = 0.5, top_k: Optional[int] = None, *,
                 from_logits: bool = False, ignore_index: Optional[int] = -1) -> None:
        if not isinstance(from_logits, bool):
            raise TypeError(f"from_logits must be a bool, got {type(from_logits).__name__}")
        self.threshold = _check_threshold(threshold, allow_none=top_k is not None)
        self.top_k = _check_top_k(top_k, None)
        self.from_logits = from_logits
        self.ignore_index = _check_ignore_index(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self._num_classes = None
        self._counts: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None

    def update(self, scores: ArrayLike, targets: ArrayLike) -> None:
        """Add a batch: scores (N_b, C) floating, targets (N_b, C) in {0, 1, ignore_index}."""
        counts = _multilabel_counts(scores, targets, self.threshold, self.top_k, self.from_logits, self.ignore_index)
        self._check_classes(counts[0].numel())
        self._counts = counts if self._counts is None else tuple(a + b for a, b in zip(self._counts, counts))

    def compute(self) -> Dict[str, float]:
        """``{"CP", "CR", "CF1", "OP", "OR", "OF1"}`` of everything seen."""
        if self._counts is None:
            raise RuntimeError("MultilabelScores.compute called before any update")
        return _scores_from_counts(*self._counts)


class Accuracy(_Streaming):
    """Streaming :func:`accuracy`: counts correct and seen images."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Zero the counts."""
        self._num_classes = None
        self.correct = 0
        self.total = 0

    def update(self, scores: ArrayLike, targets: ArrayLike) -> None:
        """Add a batch: scores (N_b, C) floating, targets (N_b,) integer in [0, C)."""
        correct, total, c = _accuracy_counts(scores, targets)
        self._check_classes(c)
        self.correct += correct
        self.total += total

    def compute(self) -> float:
        """Top-1 accuracy of everything seen."""
        if self.total == 0:
            raise RuntimeError("Accuracy.compute called before any update")
        return self.correct / self.total
