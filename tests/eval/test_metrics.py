"""Metric functions against independent, deliberately naive computations."""
import math

import numpy as np
import pytest
import torch

from mlip_fast.eval import metrics as M


def auc_by_pairs(y, s):
    """Mann-Whitney statistic by an explicit loop over every (positive, negative) pair, ties 1/2."""
    pos = [si for yi, si in zip(y, s) if yi]
    neg = [si for yi, si in zip(y, s) if not yi]
    total = 0.0
    for p in pos:
        for n in neg:
            total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("n,levels,seed", [(2, None, 0), (7, None, 1), (97, None, 2), (60, 3, 3), (33, 1, 4)])
def test_auc_matches_pair_loop(n, levels, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    y[0], y[-1] = 0, 1
    s = rng.normal(size=n) if levels is None else rng.integers(0, levels, n).astype(float)
    assert M.roc_auc(y, s) == pytest.approx(auc_by_pairs(y, s), abs=1e-12)
    # Trapezoid area under the returned ROC curve is the same number (ties give diagonal segments).
    fpr, tpr, thr = M.roc_curve(y, s)
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc_by_pairs(y, s), abs=1e-12)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1 and np.isinf(thr[0])


def test_auc_extremes_and_inputs():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert M.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert M.roc_auc(torch.tensor([0, 1, 1]), torch.tensor([0.5, 0.5, 0.5], dtype=torch.bfloat16)) == 0.5
    with pytest.raises(ValueError, match="0 positive"):
        M.roc_auc([0, 0], [1.0, 2.0])
    with pytest.raises(ValueError, match="binary"):
        M.roc_auc([0, 2], [1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        M.roc_auc([0, 1], [1.0, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        M.roc_auc([0, 1, 1], [1.0, 2.0])


def test_roc_curve_points_by_hand():
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.8, 0.1]
    fpr, tpr, thr = M.roc_curve(y, s)
    # thresholds: inf, 0.9 (1 TP), 0.8 (2 TP, 1 FP), 0.1 (2 TP, 2 FP)
    np.testing.assert_allclose(thr[1:], [0.9, 0.8, 0.1])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])


def test_accuracy_f1_precision_recall_by_hand():
    y = [1, 1, 1, 0, 0, 0, 0, 1]
    p = [1, 0, 1, 1, 0, 0, 0, 0]
    # TP=2, FN=2, FP=1, TN=3
    assert M.accuracy(y, p) == pytest.approx(5 / 8)
    assert M.precision(y, p) == pytest.approx(2 / 3)
    assert M.recall(y, p) == pytest.approx(2 / 4)
    prec, rec = 2 / 3, 2 / 4
    assert M.f1_score(y, p) == pytest.approx(2 * prec * rec / (prec + rec))
    assert M.f1_score([0, 0], [0, 0]) == 0.0
    rep = M.binary_report(y, [0.9, -0.1, 0.3, 0.2, -1, -2, -3, -0.5], threshold=0.0)
    assert rep["accuracy"] == pytest.approx(5 / 8) and rep["f1"] == pytest.approx(M.f1_score(y, p))
    assert rep["chance"]["accuracy"] == 0.5 and rep["chance"]["f1"] == pytest.approx(2 * 0.5 / 1.5)
    assert rep["n"] == 8 and rep["n_positive"] == 4


def test_dice_iou_hand_made_masks():
    a = np.zeros((4, 5), bool)
    b = np.zeros((4, 5), bool)
    a[0:2, 0:3] = True  # 6 pixels
    b[1:3, 1:4] = True  # 6 pixels, overlap rows 1, cols 1-2 -> 2 pixels
    assert M.dice(a, b) == pytest.approx(2 * 2 / 12)
    assert M.iou(a, b) == pytest.approx(2 / 10)
    assert M.dice(a, a) == 1.0 and M.iou(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0 and M.iou(a, ~a) == 0.0
    empty = np.zeros((4, 5), bool)
    assert M.dice(empty, empty) == 1.0 and M.iou(empty, empty) == 1.0
    assert M.dice(empty, a) == 0.0
    batch = M.dice(np.stack([a, a, empty]), np.stack([b, a, a]))
    np.testing.assert_allclose(batch, [4 / 12, 1.0, 0.0])
    # Dice and IoU are tied by D = 2J / (1 + J) on any pair.
    rng = np.random.default_rng(0)
    for _ in range(20):
        p, t = rng.random((2, 9, 7)) > 0.6
        j = M.iou(p, t)
        assert M.dice(p, t) == pytest.approx(2 * j / (1 + j))
    with pytest.raises(ValueError, match="shape"):
        M.dice(a, b[:, :4])


def test_retrieval_ranks_constructed_matrix():
    sim = np.array(
        [
            [0.9, 0.1, 0.2, 0.0],  # correct 0 is top -> rank 1
            [0.5, 0.4, 0.3, 0.6],  # correct 1: 0.5, 0.6 above -> rank 3
            [0.2, 0.2, 0.2, 0.2],  # all tied -> rank 4 (ties count against)
            [0.1, 0.7, 0.3, 0.5],  # correct 3: 0.7 above -> rank 2
        ]
    )
    ranks = M.retrieval_ranks(sim)
    np.testing.assert_array_equal(ranks, [1, 3, 4, 2])
    # Naive loop: sort items by score descending, stable ties placing the correct item last.
    for q in range(4):
        order = sorted(range(4), key=lambda n: (-sim[q, n], n == q))
        assert order.index(q) + 1 == ranks[q]
    assert M.recall_at_k(ranks, 1) == 0.25
    assert M.recall_at_k(ranks, 2) == 0.5
    assert M.recall_at_k(ranks, 3) == 0.75
    assert M.recall_at_k(ranks, 10) == 1.0
    assert M.median_rank(ranks) == 2.5
    rep = M.retrieval_report(sim, ks=(1, 5))
    assert rep["recall@1"] == 0.25 and rep["recall@5"] == 1.0 and rep["chance"]["recall@1"] == 0.25
    # Explicit targets (several queries sharing one item).
    np.testing.assert_array_equal(M.retrieval_ranks(sim[:2], targets=[3, 3]), [4, 1])
    with pytest.raises(ValueError, match="targets"):
        M.retrieval_ranks(sim, targets=[0, 1, 2, 9])


def test_pointing_and_heatmap_iou():
    mask = np.zeros((8, 8), bool)
    mask[4:8, 4:8] = True  # bottom-right quadrant
    heat = np.zeros((2, 2))
    heat[1, 1] = 1.0
    assert M.pointing_hit(heat, mask)
    heat2 = np.zeros((2, 2))
    heat2[0, 1] = 1.0
    assert not M.pointing_hit(heat2, mask)
    # A 4x4 grid over 8x8 pixels: cell (2, 2) has its centre at pixel (5, 5).
    g = np.zeros((4, 4))
    g[2, 2] = 3.0
    assert M.pointing_hit(g, mask)
    # IoU: a heat map equal to the mask's pattern on a matching grid reproduces it after bilinear upsampling
    # and thresholding at 0.5 (symmetric interpolation across the boundary).
    grid = np.zeros((8, 8))
    grid[4:, 4:] = 1.0
    assert M.heatmap_iou(grid, mask) == pytest.approx(1.0)
    assert M.heatmap_iou(np.ones((2, 2)), mask) == pytest.approx(mask.mean())  # constant map = everything
    assert 0.0 <= M.heatmap_iou(np.random.default_rng(0).random((3, 3)), mask) <= 1.0
    assert math.isclose(M.iou(np.ones_like(mask), mask), 16 / 64)
