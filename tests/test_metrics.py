"""vlssm.metrics: hand-computed cases, scikit-learn / torchmetrics / ML-GCN references, streaming, errors.

Expected numbers of the small cases are derived by hand in the comments next to them.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlssm import metrics as M
from vlssm.metrics import (
    Accuracy,
    MeanAveragePrecision,
    MultilabelScores,
    accuracy,
    average_precision,
    group_mean_average_precision,
    harmonic_mean,
    mean_average_precision,
    multilabel_scores,
    split_by_frequency,
)


def _random(n: int, c: int, seed: int, levels: int = 0, p: float = 0.3):
    """Scores (n, c) in [0, 1] (``levels`` > 0: rounded to that many steps -> many ties), targets 0/1 with every
    class positive at least once."""
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(n, c, generator=g, dtype=torch.float64)
    if levels:
        s = torch.round(s * levels) / levels
    t = (torch.rand(n, c, generator=g) < p).long()
    t[seed % n, :] = 1
    return s, t


# --------------------------------------------------------------------------------------------
# average precision: hand-computed
# --------------------------------------------------------------------------------------------
def test_ap_hand_no_ties():
    # ranking 0.9(+) 0.8(-) 0.7(+) 0.6(-): precision at the positives 1/1 and 2/3 -> AP = (1 + 2/3) / 2 = 5/6
    s = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    t = torch.tensor([[1], [0], [1], [0]])
    assert average_precision(s, t).item() == pytest.approx(5 / 6, abs=1e-12)
    assert mean_average_precision(s, t) == pytest.approx(5 / 6, abs=1e-12)


@pytest.mark.parametrize("perm", [[0, 1, 2, 3], [0, 2, 1, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_ap_ties_are_one_threshold(perm):
    # scores 0.9(+) {0.5(+), 0.5(-)} 0.1(+): thresholds 0.9 -> tp 1 fp 0 (P 1); 0.5 -> tp 2 fp 1 (P 2/3);
    # 0.1 -> tp 3 fp 1 (P 3/4).  AP = (1 + 2/3 + 3/4) / 3 = 29/36, whatever the order of the tied pair.
    # (Ranking + before - would give (1 + 1 + 3/4) / 3 = 11/12, - before + gives 29/36 only by luck.)
    s = torch.tensor([0.9, 0.5, 0.5, 0.1])[perm].unsqueeze(1)
    t = torch.tensor([1, 1, 0, 1])[perm].unsqueeze(1)
    assert average_precision(s, t).item() == pytest.approx(29 / 36, abs=1e-12)


def test_ap_tie_at_top_differs_from_positive_first():
    # {0.7(-), 0.7(+)} 0.2(+): thresholds 0.7 -> tp 1 fp 1 (P 1/2); 0.2 -> tp 2 fp 1 (P 2/3).
    # AP = (1/2 + 2/3) / 2 = 7/12; an order putting the positive first would give (1 + 2/3) / 2 = 5/6.
    s = torch.tensor([[0.7], [0.7], [0.2]])
    for t in ([[1], [0], [1]], [[0], [1], [1]]):
        assert average_precision(s, torch.tensor(t)).item() == pytest.approx(7 / 12, abs=1e-12)


def test_ap_class_without_positive_is_excluded():
    # class 0: ranking 0.8(+) 0.3(-) 0.1(+) -> (1 + 2/3) / 2 = 5/6; class 1 has no positive -> NaN, not in the mean.
    s = torch.tensor([[0.8, 0.9], [0.3, 0.1], [0.1, 0.5]])
    t = torch.tensor([[1, 0], [0, 0], [1, 0]])
    ap = average_precision(s, t)
    assert ap.shape == (2,) and ap.dtype == torch.float64
    assert ap[0].item() == pytest.approx(5 / 6, abs=1e-12)
    assert math.isnan(ap[1].item())
    assert mean_average_precision(s, t) == pytest.approx(5 / 6, abs=1e-12)
    with pytest.raises(ValueError, match="no positive"):
        mean_average_precision(s, torch.zeros(3, 2))


def test_ap_ignore_index_drops_entries():
    # targets [1, -1, 0, 1] scores [0.2, 0.9, 0.8, 0.1]: dropping the -1 (score 0.9) leaves
    # 0.8(-) 0.2(+) 0.1(+) -> (1/2 + 2/3) / 2 = 7/12.
    # Counting the -1 as a negative would give 0.9(-) 0.8(-) 0.2(+) 0.1(+) -> (1/3 + 2/4) / 2 = 5/12.
    s = torch.tensor([[0.2], [0.9], [0.8], [0.1]])
    t = torch.tensor([[1], [-1], [0], [1]])
    assert average_precision(s, t).item() == pytest.approx(7 / 12, abs=1e-12)
    assert average_precision(s, t.clamp_min(0)).item() == pytest.approx(5 / 12, abs=1e-12)
    # another ignore value (e.g. 255), and ignore_index=None rejecting it
    assert average_precision(s, torch.where(t < 0, 255, t), ignore_index=255).item() == pytest.approx(7 / 12)
    with pytest.raises(ValueError, match="targets must be 0 or 1"):
        average_precision(s, t, ignore_index=None)
    # a class whose only positive is ignored has no AP
    ap = average_precision(torch.tensor([[0.5, 0.5], [0.4, 0.6]]), torch.tensor([[-1, 1], [0, 0]]))
    assert math.isnan(ap[0].item()) and ap[1].item() == pytest.approx(1 / 2)


def test_ap_perfect_and_worst():
    # each class has one positive among 4; ranked first -> AP 1, ranked last -> precision 1/4 -> AP 1/4
    t = torch.eye(4)
    assert mean_average_precision(t.clone(), t) == 1.0
    assert mean_average_precision(1 - t, t) == pytest.approx(0.25, abs=1e-12)


def test_ap_dtypes_and_numpy():
    s, t = _random(40, 5, seed=3, levels=8)
    ref = average_precision(s, t)
    # float32/float16 are upcast exactly (the rounded scores are exact in every dtype); bool/float/numpy targets
    assert torch.equal(average_precision(s.float(), t.bool()), ref)
    assert torch.equal(average_precision(s.half(), t.double()), ref)
    assert torch.equal(average_precision(s.numpy(), t.numpy()), ref)
    # any monotone transform of the scores (logits) keeps AP
    assert torch.allclose(average_precision(torch.logit(s.clamp(1e-6, 1 - 1e-6)), t), ref, atol=1e-12)


def test_ap_blocks_over_classes(monkeypatch):
    # the class loop in blocks gives the same numbers as one block
    s, t = _random(50, 9, seed=4, levels=5)
    t[0, 3] = -1
    one = average_precision(s, t)
    monkeypatch.setattr(M, "_AP_BLOCK", 100)  # 2 classes per block of N=50
    assert torch.equal(average_precision(s, t), one)


# --------------------------------------------------------------------------------------------
# average precision: against scikit-learn and torchmetrics on random data with ties
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed,levels", [(0, 0), (1, 4), (2, 10), (5, 1)])
def test_ap_matches_sklearn(seed, levels):
    skm = pytest.importorskip("sklearn.metrics")
    s, t = _random(120, 6, seed=seed, levels=levels)
    ap = average_precision(s, t)
    ref = [skm.average_precision_score(t[:, c].numpy(), s[:, c].numpy()) for c in range(6)]
    np.testing.assert_allclose(ap.numpy(), ref, rtol=0, atol=1e-12)
    assert mean_average_precision(s, t) == pytest.approx(float(np.mean(ref)), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_ap_with_ignore_matches_sklearn_on_kept_entries(seed):
    skm = pytest.importorskip("sklearn.metrics")
    s, t = _random(150, 5, seed=seed, levels=6)
    g = torch.Generator().manual_seed(100 + seed)
    t = torch.where(torch.rand(t.shape, generator=g) < 0.2, -1, t)
    ap = average_precision(s, t)
    for c in range(5):
        kept = t[:, c] != -1
        ref = skm.average_precision_score(t[kept, c].numpy(), s[kept, c].numpy())
        assert ap[c].item() == pytest.approx(ref, abs=1e-12)


def test_ap_matches_torchmetrics_with_ignore():
    tmf = pytest.importorskip("torchmetrics.functional.classification")
    s, t = _random(100, 4, seed=7, levels=5)
    t[torch.arange(0, 100, 7), 1] = -1
    ref_pc = tmf.multilabel_average_precision(s.float(), t, num_labels=4, average="none", ignore_index=-1)
    ref = tmf.multilabel_average_precision(s.float(), t, num_labels=4, average="macro", ignore_index=-1)
    np.testing.assert_allclose(average_precision(s, t).numpy(), ref_pc.double().numpy(), atol=1e-6)
    assert mean_average_precision(s, t) == pytest.approx(ref.item(), abs=1e-6)
    # A class without a positive: torchmetrics gives it AP 0 and keeps it in the macro mean; here it is left out.
    t[:, 3] = 0
    with pytest.warns(UserWarning):
        ref = tmf.multilabel_average_precision(s.float(), t, num_labels=4, average="macro", ignore_index=-1)
    ours = mean_average_precision(s, t)
    assert ours == pytest.approx(average_precision(s, t)[:3].mean().item(), abs=1e-15)
    assert ref.item() == pytest.approx(ours * 3 / 4, abs=1e-6)


# --------------------------------------------------------------------------------------------
# CP CR CF1 OP OR OF1
# --------------------------------------------------------------------------------------------
S4 = torch.tensor([[0.9, 0.2, 0.6],
                   [0.3, 0.8, 0.4],
                   [0.7, 0.6, 0.1],
                   [0.1, 0.4, 0.9]])
T4 = torch.tensor([[1, 0, 1],
                   [0, 1, 0],
                   [0, 1, 0],
                   [1, 0, 0]])


def _approx(d: dict, **want):
    assert set(d) == {"CP", "CR", "CF1", "OP", "OR", "OF1"}
    for k, v in want.items():
        assert d[k] == pytest.approx(v, abs=1e-12), k


def test_scores_hand_threshold():
    # p >= 0.5 -> predictions rows {0,2}, {1}, {0,1}, {2}.
    # class 0: predicted rows 0,2; positives rows 0,3; Nc 1 -> P 1/2, R 1/2
    # class 1: predicted rows 1,2; positives rows 1,2; Nc 2 -> P 1,   R 1
    # class 2: predicted rows 0,3; positives row 0;    Nc 1 -> P 1/2, R 1
    # CP = (1/2 + 1 + 1/2)/3 = 2/3, CR = (1/2 + 1 + 1)/3 = 5/6, CF1 = 2 (2/3)(5/6) / (2/3 + 5/6) = 20/27
    # OP = 4/6 = 2/3, OR = 4/5, OF1 = 2 (2/3)(4/5) / (2/3 + 4/5) = 8/11
    d = multilabel_scores(S4, T4)
    _approx(d, CP=2 / 3, CR=5 / 6, CF1=20 / 27, OP=2 / 3, OR=4 / 5, OF1=8 / 11)
    # CF1 is not the mean of per-class F1 (macro F1 = (1/2 + 1 + 2/3)/3 = 13/18)
    assert abs(d["CF1"] - 13 / 18) > 0.01
    # the same from logits (threshold 0.5 <-> logit 0)
    _approx(multilabel_scores(torch.logit(S4.double()), T4, from_logits=True), CP=2 / 3, CR=5 / 6, OF1=8 / 11)


def test_scores_hand_top_k():
    # top-1 per row: classes 0, 1, 0, 2 (all >= 0.5).
    # class 0: predicted rows 0,2, Nc 1 -> P 1/2, R 1/2; class 1: row 1, Nc 1 -> P 1, R 1/2;
    # class 2: row 3, Nc 0 -> P 0, R 0
    # CP = 1/2, CR = 1/3, CF1 = (1/3)/(5/6) = 2/5; OP = 2/4, OR = 2/5, OF1 = 2 (1/2)(2/5) / (9/10) = 4/9
    _approx(multilabel_scores(S4, T4, top_k=1), CP=1 / 2, CR=1 / 3, CF1=2 / 5, OP=1 / 2, OR=2 / 5, OF1=4 / 9)
    # top-2 AND p >= 0.5 (ML-GCN's overall_topk): rows 1 and 3 lose their 2nd label (0.4) -> same as threshold alone
    _approx(multilabel_scores(S4, T4, top_k=2), CP=2 / 3, CR=5 / 6, OP=2 / 3, OR=4 / 5)
    # top-2 without threshold adds row 1 -> class 2 (FP) and row 3 -> class 1 (FP):
    # class 1: P 2/3 R 1; class 2: P 1/3 R 1; class 0: 1/2, 1/2 -> CP 1/2, CR 5/6, CF1 (5/6)/(4/3) = 5/8
    # OP 4/8, OR 4/5, OF1 0.8/1.3 = 8/13
    d = multilabel_scores(S4, T4, threshold=None, top_k=2)
    _approx(d, CP=1 / 2, CR=5 / 6, CF1=5 / 8, OP=1 / 2, OR=4 / 5, OF1=8 / 13)


def test_scores_top_k_ties_go_to_lower_index():
    # one image, all scores equal: top-1 is class 0 -> class 0 predicted (Nc 0, target 0), class 2 (positive) missed
    s = torch.full((1, 3), 0.7)
    t = torch.tensor([[0, 0, 1]])
    d = multilabel_scores(s, t, top_k=1)
    _approx(d, OP=0.0, OR=0.0, OF1=0.0)
    d = multilabel_scores(s, torch.tensor([[1, 0, 0]]), top_k=1)
    _approx(d, OP=1.0, OR=1.0, CP=1 / 3)  # class 0: P 1; classes 1, 2 never predicted -> P 0
    # 20 classes, 0.9 on classes 0, 3, ..., 18 and 0.7 elsewhere: top-3 is exactly {0, 3, 6} (an unstable sort
    # picks others among the seven tied 0.9s); targets {0, 3, 6} -> OP = OR = 1
    s = torch.full((2, 20), 0.7)
    s[:, ::3] = 0.9
    t = torch.zeros(2, 20, dtype=torch.long)
    t[:, [0, 3, 6]] = 1
    _approx(multilabel_scores(s, t, top_k=3), OP=1.0, OR=1.0)


def test_scores_all_correct_and_all_wrong():
    t = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    _approx(multilabel_scores(t.double(), t), CP=1, CR=1, CF1=1, OP=1, OR=1, OF1=1)
    _approx(multilabel_scores((1 - t).double(), t), CP=0, CR=0, CF1=0, OP=0, OR=0, OF1=0)
    # nothing predicted at all: every precision is 0 (ML-GCN's Np = 1 for Np = 0), no NaN
    _approx(multilabel_scores(torch.zeros(3, 3), t), CP=0, CR=0, CF1=0, OP=0, OR=0, OF1=0)


def test_scores_zero_division_conventions():
    # class 0: positives rows 0,1, predicted row 0 -> P 1, R 1/2
    # class 1: never predicted, positive row 1     -> P 0 (never predicted), R 0
    # class 2: no positive, predicted row 1        -> P 0, R 0 (no positive)
    s = torch.tensor([[0.9, 0.1, 0.2], [0.1, 0.2, 0.8]])
    t = torch.tensor([[1, 0, 0], [1, 1, 0]])
    # CP = 1/3, CR = 1/6, CF1 = 2 (1/3)(1/6) / (1/2) = 2/9; OP = 1/2, OR = 1/3, OF1 = (1/3)/(5/6) = 2/5
    _approx(multilabel_scores(s, t), CP=1 / 3, CR=1 / 6, CF1=2 / 9, OP=1 / 2, OR=1 / 3, OF1=2 / 5)


def test_scores_ignore_index():
    # the ignored entry (row 2, class 0; predicted, target -1) counts nowhere: it is not a false positive.
    # T4 with that entry ignored: class 0 predicted row 0 only -> P 1, R 1/2; classes 1, 2 as before (1, 1; 1/2, 1)
    # CP = (1 + 1 + 1/2)/3 = 5/6, CR = 5/6; OP = 4/5, OR = 4/5
    t = T4.clone()
    t[2, 0] = -1
    _approx(multilabel_scores(S4, t), CP=5 / 6, CR=5 / 6, CF1=5 / 6, OP=4 / 5, OR=4 / 5, OF1=4 / 5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_match_sklearn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    s, t = _random(80, 7, seed=seed, levels=10)
    t[:, 5] = 0  # a class without a positive
    s[:, 6] = 0.2  # a class never predicted
    pred = (s >= 0.5).numpy().astype(int)
    y = t.numpy()
    d = multilabel_scores(s, t)
    kw = dict(zero_division=0)
    assert d["CP"] == pytest.approx(skm.precision_score(y, pred, average="macro", **kw), abs=1e-12)
    assert d["CR"] == pytest.approx(skm.recall_score(y, pred, average="macro", **kw), abs=1e-12)
    assert d["OP"] == pytest.approx(skm.precision_score(y, pred, average="micro", **kw), abs=1e-12)
    assert d["OR"] == pytest.approx(skm.recall_score(y, pred, average="micro", **kw), abs=1e-12)
    assert d["OF1"] == pytest.approx(skm.f1_score(y, pred, average="micro", **kw), abs=1e-12)
    assert d["CF1"] == pytest.approx(2 * d["CP"] * d["CR"] / (d["CP"] + d["CR"]), abs=1e-15)
    assert d["CF1"] != pytest.approx(skm.f1_score(y, pred, average="macro", **kw), abs=1e-6)


def _mlgcn_reference(logits: np.ndarray, targets: np.ndarray, k: int | None):
    """ML-GCN util.py AveragePrecisionMeter.overall / overall_topk + evaluation, restated (targets 0/1, logits)."""
    n, c = logits.shape
    if k is not None:
        scores = np.zeros((n, c)) - 1
        index = np.argsort(-logits, axis=1, kind="stable")[:, :k]
        for i in range(n):
            for ind in index[i]:
                scores[i, ind] = 1 if logits[i, ind] >= 0 else -1
    else:
        scores = logits
    Nc, Np, Ng = np.zeros(c), np.zeros(c), np.zeros(c)
    for j in range(c):
        Ng[j] = np.sum(targets[:, j] == 1)
        Np[j] = np.sum(scores[:, j] >= 0)
        Nc[j] = np.sum(targets[:, j] * (scores[:, j] >= 0))
    Np[Np == 0] = 1
    OP = np.sum(Nc) / np.sum(Np)
    OR = np.sum(Nc) / np.sum(Ng)
    OF1 = (2 * OP * OR) / (OP + OR)
    CP = np.sum(Nc / Np) / c
    CR = np.sum(Nc / Ng) / c
    CF1 = (2 * CP * CR) / (CP + CR)
    return dict(CP=CP, CR=CR, CF1=CF1, OP=OP, OR=OR, OF1=OF1)


@pytest.mark.parametrize("k", [None, 3])
def test_scores_match_mlgcn_code(k):
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(200, 10, generator=g, dtype=torch.float64) - 0.5
    logits[3, 4] = 0.0  # exactly at the threshold: predicted (>= 0)
    _, t = _random(200, 10, seed=11, p=0.25)
    ref = _mlgcn_reference(logits.numpy(), t.numpy(), k)
    got = multilabel_scores(logits, t, top_k=k, from_logits=True)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12), key


# --------------------------------------------------------------------------------------------
# head / medium / tail
# --------------------------------------------------------------------------------------------
def test_split_by_frequency_edges():
    counts = [150, 100, 99, 20, 19, 0]
    sp = split_by_frequency(counts)
    assert sp["head"].tolist() == [0, 1]  # >= 100
    assert sp["medium"].tolist() == [2, 3]  # 20..99
    assert sp["tail"].tolist() == [4, 5]  # < 20
    sp = split_by_frequency(torch.tensor(counts), head_min=101, tail_below=21)
    assert (sp["head"].tolist(), sp["medium"].tolist(), sp["tail"].tolist()) == ([0], [1, 2], [3, 4, 5])


def test_group_map_hand():
    # two images; a class scored (0.9 on +, 0.1 on -) has AP 1, scored (0.1 on +, 0.9 on -) has AP 1/2.
    # APs: class 0: 1, 1: 1/2 (head); 2: 1, 3: 1 (medium); 4: 1/2, 5: no positive (tail)
    # head (1 + 1/2)/2 = 3/4, medium 1, tail 1/2 (class 5 excluded), all (1 + 1/2 + 1 + 1 + 1/2)/5 = 4/5
    s = torch.tensor([[0.9, 0.1, 0.9, 0.9, 0.1, 0.3],
                      [0.1, 0.9, 0.1, 0.1, 0.9, 0.3]])
    t = torch.tensor([[1, 1, 1, 1, 1, 0],
                      [0, 0, 0, 0, 0, 0]])
    counts = [150, 100, 99, 20, 19, 0]
    d = group_mean_average_precision(s, t, counts)
    assert d == pytest.approx({"head": 3 / 4, "medium": 1.0, "tail": 1 / 2, "all": 4 / 5}, abs=1e-12)
    assert d["all"] == pytest.approx(mean_average_precision(s, t), abs=1e-15)
    # a group none of whose classes has a positive is NaN
    d = group_mean_average_precision(s, t, [150, 100, 99, 20, 200, 0])
    assert math.isnan(d["tail"]) and d["head"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)
    with pytest.raises(ValueError, match="train_counts"):
        group_mean_average_precision(s, t, counts[:5])
    with pytest.raises(ValueError, match="train_counts"):
        group_mean_average_precision(s, t, [1, 2, 3, 4, 5, -1])
    with pytest.raises(ValueError, match="train_counts"):
        split_by_frequency([1.5, 2.0])
    with pytest.raises(ValueError, match="tail_below"):
        split_by_frequency(counts, head_min=10, tail_below=20)


# --------------------------------------------------------------------------------------------
# accuracy and harmonic mean
# --------------------------------------------------------------------------------------------
def test_accuracy_hand():
    # argmax rows: 1 (right), 0 (wrong, target 2), 0 (tie 0.5/0.5 -> lowest index 0, right), 2 (right) -> 3/4
    s = torch.tensor([[0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.5, 0.0], [-1.0, -2.0, 3.0]])
    assert accuracy(s, torch.tensor([1, 2, 0, 2])) == 0.75
    assert accuracy(s, torch.tensor([1, 2, 1, 2])) == 0.5  # the tie is not counted for class 1
    assert accuracy(s, np.array([1, 0, 0, 2])) == 1.0


def test_harmonic_mean():
    # 2 * 0.8 * 0.6 / 1.4 = 0.96 / 1.4 = 24/35
    assert harmonic_mean(0.8, 0.6) == pytest.approx(24 / 35, abs=1e-15)
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2400 / 35)  # percent in, percent out
    assert harmonic_mean(0.7, 0.7) == pytest.approx(0.7)
    assert harmonic_mean(1.0, 0.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(torch.tensor(0.5), 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="new"):
        harmonic_mean(0.5, -0.1)
    with pytest.raises(ValueError, match="base"):
        harmonic_mean(float("nan"), 0.5)
    with pytest.raises(TypeError, match="base"):
        harmonic_mean("0.5", 0.5)


# --------------------------------------------------------------------------------------------
# streaming == functional
# --------------------------------------------------------------------------------------------
def _batches(x, sizes):
    out, lo = [], 0
    for n in sizes:
        out.append(x[lo:lo + n])
        lo += n
    return out


def test_streaming_equals_functional():
    s, t = _random(97, 8, seed=21, levels=7)
    t[5:20, 2] = -1
    sizes = [1, 30, 16, 50]
    mp, ml, ml3 = MeanAveragePrecision(), MultilabelScores(), MultilabelScores(top_k=3)
    for _ in range(2):  # second round checks reset()
        for sb, tb in zip(_batches(s, sizes), _batches(t, sizes)):
            mp.update(sb.float().requires_grad_(), tb)  # grads and float32: detached, upcast exactly
            ml.update(sb, tb)
            ml3.update(sb, tb)
        assert mp.num_samples == 97
        assert torch.equal(mp.compute_per_class(), average_precision(s, t))
        assert mp.compute() == mean_average_precision(s, t)
        counts = [300, 120, 50, 20, 19, 5, 0, 1000]
        assert mp.compute_groups(counts) == group_mean_average_precision(s, t, counts)
        assert ml.compute() == multilabel_scores(s, t)
        assert ml3.compute() == multilabel_scores(s, t, top_k=3)
        for m in (mp, ml, ml3):
            m.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        mp.compute()
    with pytest.raises(RuntimeError, match="before any update"):
        ml.compute()


def test_streaming_accuracy_and_class_count_check():
    g = torch.Generator().manual_seed(5)
    s = torch.randn(60, 5, generator=g)
    t = torch.randint(0, 5, (60,), generator=g)
    acc = Accuracy()
    for sb, tb in zip(_batches(s, [7, 40, 13]), _batches(t, [7, 40, 13])):
        acc.update(sb, tb)
    assert acc.compute() == accuracy(s, t)
    assert (acc.correct, acc.total) == (int((s.argmax(1) == t).sum()), 60)
    with pytest.raises(ValueError, match="C=5"):
        acc.update(torch.randn(2, 4), torch.tensor([0, 1]))
    acc.reset()
    with pytest.raises(RuntimeError, match="before any update"):
        acc.compute()
    mp, ml = MeanAveragePrecision(), MultilabelScores()
    for m in (mp, ml):
        m.update(torch.rand(3, 4), torch.ones(3, 4))
        with pytest.raises(ValueError, match="C=4"):
            m.update(torch.rand(3, 5), torch.ones(3, 5))


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
FUNCS = [average_precision, mean_average_precision, multilabel_scores]


@pytest.mark.parametrize("fn", FUNCS)
def test_bad_multilabel_inputs(fn):
    s, t = torch.rand(4, 3), torch.ones(4, 3)
    with pytest.raises(ValueError, match="targets must have the shape of scores"):
        fn(s, torch.ones(1, 3))  # broadcastable, still refused
    with pytest.raises(ValueError, match="targets must have the shape of scores"):
        fn(s, torch.ones(4))
    with pytest.raises(ValueError, match="scores must have shape"):
        fn(torch.rand(4), torch.ones(4))
    with pytest.raises(ValueError, match=r"targets must be 0, 1 or ignore_index=-1, found 2"):
        fn(s, torch.tensor([[1, 0, 2]] * 4))
    with pytest.raises(ValueError, match="targets must be"):
        fn(s, torch.full((4, 3), 0.5))
    with pytest.raises(TypeError, match="scores must have a floating dtype"):
        fn(torch.ones(4, 3, dtype=torch.int64), t)
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        fn([[0.5, 0.5]], [[1, 0]])
    bad = s.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        fn(bad, t)
    with pytest.raises(ValueError, match="scores must not be empty"):
        fn(torch.rand(0, 3), torch.ones(0, 3))
    with pytest.raises(ValueError, match="ignore_index"):
        fn(s, t, ignore_index=1)
    with pytest.raises(TypeError, match="ignore_index"):
        fn(s, t, ignore_index=-1.0)


def test_bad_threshold_and_top_k():
    s, t = torch.rand(4, 3), torch.ones(4, 3)
    for th in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            multilabel_scores(s, t, threshold=th)
    with pytest.raises(TypeError, match="threshold"):
        multilabel_scores(s, t, threshold="0.5")
    with pytest.raises(ValueError, match="threshold may be None only together with top_k"):
        multilabel_scores(s, t, threshold=None)
    for k in (0, 4):
        with pytest.raises(ValueError, match=r"top_k must be in \[1, C=3\]"):
            multilabel_scores(s, t, top_k=k)
    with pytest.raises(TypeError, match="top_k"):
        multilabel_scores(s, t, top_k=2.0)
    with pytest.raises(ValueError, match="top_k"):
        MultilabelScores(top_k=0)
    with pytest.raises(ValueError, match="top_k"):
        MultilabelScores(top_k=4).update(s, t)
    # logits passed as probabilities are refused, not silently thresholded
    with pytest.raises(ValueError, match="from_logits=True"):
        multilabel_scores(s * 4 - 2, t)
    with pytest.raises(TypeError, match="from_logits"):
        multilabel_scores(s, t, from_logits=1)
    # thresholds 0 and 1 are allowed, also on logits: 0 predicts everything, 1 only p == 1
    assert multilabel_scores(s, t, threshold=0.0)["OR"] == 1.0
    assert multilabel_scores(s * 4 - 2, t, threshold=0.0, from_logits=True)["OR"] == 1.0
    assert multilabel_scores(s * 4 - 2, t, threshold=1.0, from_logits=True)["OR"] == 0.0


def test_bad_accuracy_inputs():
    s = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 3\), found 3"):
        accuracy(s, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="targets must be class indices"):
        accuracy(s, torch.tensor([0, -1, 2, 1]))
    with pytest.raises(TypeError, match="targets must be integer class indices"):
        accuracy(s, torch.tensor([0.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
        accuracy(s, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\)"):
        accuracy(s, torch.zeros(4, 3, dtype=torch.long))  # one-hot is not accepted
    with pytest.raises(TypeError, match="scores must have a floating dtype"):
        accuracy(torch.ones(4, 3, dtype=torch.long), torch.tensor([0, 1, 2, 1]))
    with pytest.raises(ValueError, match="scores must not be empty"):
        accuracy(torch.rand(0, 3), torch.zeros(0, dtype=torch.long))
