"""Evaluation metrics: ROC and AUC from scikit-learn, the rest written out in NumPy.

Conventions: inputs are array-likes or tensors (moved to CPU NumPy here); binary labels are 0/1 (or
bool); scores are any real numbers, higher = more positive. Every function checks shapes and raises
``ValueError`` with the reason when a metric is undefined (before scikit-learn would, in words of this package).

Classification
- ``roc_auc(y, s)``: area under the ROC curve (``sklearn.metrics.roc_auc_score``) = the Mann-Whitney
  statistic ``U / (n_pos n_neg)`` with ``U = sum_{i pos, j neg} [s_i > s_j] + 1/2 [s_i = s_j]``.
- ``roc_curve(y, s) -> (fpr, tpr, thresholds)``: one point per distinct score, from (0, 0) to (1, 1)
  (``sklearn.metrics.roc_curve`` keeping every point).
- ``accuracy``, ``precision``, ``recall``, ``f1_score`` on hard 0/1 predictions;
  ``binary_report(y, s, threshold)`` bundles them with the chance rates.

Segmentation (binary masks ``[..., H, W]``, one value per leading index)
- ``dice(pred, target) = 2 |P & T| / (|P| + |T|)``, ``iou(pred, target) = |P & T| / |P | T|``;
  both are 1 when prediction and target are empty (nothing to find, nothing found).

Retrieval (similarity ``[Q, N]``, query q's correct item ``target[q]``, default the diagonal)
- ``retrieval_ranks``: 1-based rank of the correct item = 1 + the number of OTHER items scoring at least
  as high (ties count against the query, so a constant similarity never looks good);
- ``recall_at_k(ranks, k)`` = share of queries with rank <= k; ``median_rank``.

Localisation (heat map ``[h, w]`` over the patch grid, ground-truth mask ``[H, W]``)
- ``pointing_hit``: the centre of the highest-scoring patch lies in the mask; chance = mask area share.
- ``heatmap_iou``: the heat map, upsampled bilinearly to ``[H, W]`` and min-max scaled to [0, 1],
  thresholded at ``threshold``, against the mask.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn import metrics as skm

__all__ = [
    "roc_auc",
    "roc_curve",
    "accuracy",
    "precision",
    "recall",
    "f1_score",
    "binary_report",
    "dice",
    "iou",
    "retrieval_ranks",
    "recall_at_k",
    "median_rank",
    "retrieval_report",
    "pointing_hit",
    "heatmap_iou",
    "upsample_heatmap",
]


def _np(x, name: str, dtype=None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float().numpy() if x.dtype in (torch.bfloat16, torch.float16) else x.numpy()
    arr = np.asarray(x)
    if dtype is not None:
        arr = arr.astype(dtype)
    return arr


def _binary_labels(y, name: str = "y_true") -> np.ndarray:
    y = _np(y, name)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype != bool:
        if not np.isfinite(y.astype(np.float64)).all():
            raise ValueError(f"{name} contains NaN or infinity; drop unknown labels before scoring")
        values = np.unique(y)
        if not np.isin(values, (0, 1)).all():
            raise ValueError(f"{name} must be binary 0/1, got values {values[:10].tolist()}")
    return y.astype(bool)


def _paired(y_true, other, other_name: str) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels(y_true)
    o = _np(other, other_name)
    if o.shape != y.shape:
        raise ValueError(f"{other_name} shape {o.shape} differs from y_true shape {y.shape}")
    if y.size == 0:
        raise ValueError("no samples to score")
    return y, o


def _scored(y_true, scores, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels and float64 scores checked for a ROC metric: finite scores, both classes present."""
    y, s = _paired(y_true, scores, "scores")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinity")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"{what} is undefined with {n_pos} positive and {n_neg} negative samples")
    return y, s


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve (probability a random positive outscores a random negative, ties 1/2).

    Raises ValueError when ``y_true`` has no positive or no negative sample, or a score is not finite.
    """
    y, s = _scored(y_true, scores, "AUC")
    return float(skm.roc_auc_score(y, s))


def roc_curve(y_true, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve: ``(fpr, tpr, thresholds)``; point i classifies ``score >= thresholds[i]`` as positive.

    The first point is (0, 0) with threshold +inf; thresholds are the distinct scores, descending.
    The trapezoid area under the returned curve equals ``roc_auc``.
    """
    y, s = _scored(y_true, scores, "ROC curve")
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def _confusion(y_true, y_pred) -> tuple[int, int, int, int]:
    y, p = _paired(y_true, y_pred, "y_pred")
    p = _binary_labels(p, "y_pred")
    tp = int((y & p).sum())
    fp = int((~y & p).sum())
    fn = int((y & ~p).sum())
    tn = int((~y & ~p).sum())
    return tp, fp, fn, tn


def accuracy(y_true, y_pred) -> float:
    """Share of samples whose 0/1 prediction equals the label."""
    tp, fp, fn, tn = _confusion(y_true, y_pred)
    return (tp + tn) / (tp + fp + fn + tn)


def precision(y_true, y_pred) -> float:
    """TP / (TP + FP); 0 when nothing is predicted positive."""
    tp, fp, _, _ = _confusion(y_true, y_pred)
    return tp / (tp + fp) if tp + fp else 0.0


def recall(y_true, y_pred) -> float:
    """TP / (TP + FN) (sensitivity); 0 when there is no positive sample."""
    tp, _, fn, _ = _confusion(y_true, y_pred)
    return tp / (tp + fn) if tp + fn else 0.0


def f1_score(y_true, y_pred) -> float:
    """F1 = 2 TP / (2 TP + FP + FN) (harmonic mean of precision and recall); 0 when TP = FP = FN = 0."""
    tp, fp, fn, _ = _confusion(y_true, y_pred)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def binary_report(y_true, scores, threshold: float = 0.0) -> dict:
    """AUC, accuracy, F1, precision, recall of ``scores >= threshold``, with sample counts and chance rates.

    Chance rates: AUC 0.5; accuracy of always predicting the majority class; F1 of always predicting
    positive, ``2 p / (1 + p)`` with prevalence p.
    """
    y, s = _paired(y_true, scores, "scores")
    pred = s.astype(np.float64) >= threshold
    prevalence = float(y.mean())
    return {
        "auc": roc_auc(y, s),
        "accuracy": accuracy(y, pred),
        "f1": f1_score(y, pred),
        "precision": precision(y, pred),
        "recall": recall(y, pred),
        "threshold": float(threshold),
        "n": int(y.size),
        "n_positive": int(y.sum()),
        "prevalence": prevalence,
        "chance": {
            "auc": 0.5,
            "accuracy": max(prevalence, 1.0 - prevalence),
            "f1": 2 * prevalence / (1 + prevalence),
        },
    }


def _mask_pair(pred, target) -> tuple[np.ndarray, np.ndarray]:
    p = _np(pred, "pred")
    t = _np(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"pred shape {p.shape} differs from target shape {t.shape}")
    if p.ndim < 2:
        raise ValueError(f"masks must be [..., H, W], got shape {p.shape}")
    return p.astype(bool), t.astype(bool)


def dice(pred, target) -> np.ndarray | float:
    """Dice coefficient of binary masks ``[..., H, W]`` (nonzero = foreground): one value per leading
    index (a float for a single ``[H, W]`` pair). Empty prediction and empty target give 1."""
    p, t = _mask_pair(pred, target)
    inter = (p & t).sum(axis=(-2, -1)).astype(np.float64)
    total = (p.sum(axis=(-2, -1)) + t.sum(axis=(-2, -1))).astype(np.float64)
    out = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    return float(out) if out.ndim == 0 else out


def iou(pred, target) -> np.ndarray | float:
    """Intersection over union (Jaccard) of binary masks ``[..., H, W]``; empty vs empty gives 1."""
    p, t = _mask_pair(pred, target)
    inter = (p & t).sum(axis=(-2, -1)).astype(np.float64)
    union = (p | t).sum(axis=(-2, -1)).astype(np.float64)
    out = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return float(out) if out.ndim == 0 else out


def retrieval_ranks(similarity, targets: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """1-based rank of each query's correct item in ``similarity`` ``[Q, N]`` (higher = more similar).

    ``rank[q] = 1 + #{n != targets[q] : similarity[q, n] >= similarity[q, targets[q]]}``: a tie with the
    correct item counts against it. ``targets`` defaults to the diagonal (requires Q <= N).
    """
    sim = _np(similarity, "similarity").astype(np.float64)
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"similarity must be a non-empty [Q, N] matrix, got shape {sim.shape}")
    q, n = sim.shape
    if targets is None:
        if q > n:
            raise ValueError(f"diagonal targets need Q <= N, got similarity of shape {sim.shape}")
        targets = np.arange(q)
    targets = _np(targets, "targets").astype(np.int64)
    if targets.shape != (q,):
        raise ValueError(f"targets must have shape ({q},), got {targets.shape}")
    if targets.min() < 0 or targets.max() >= n:
        raise ValueError(f"targets must index the {n} items, got range [{targets.min()}, {targets.max()}]")
    if not np.isfinite(sim).all():
        raise ValueError("similarity contains NaN or infinity")
    correct = sim[np.arange(q), targets][:, None]
    return (sim >= correct).sum(axis=1).astype(np.int64)  # the correct item itself supplies the 1


def recall_at_k(ranks, k: int) -> float:
    """Share of queries whose correct item ranks within the top ``k``."""
    r = _np(ranks, "ranks")
    if r.size == 0:
        raise ValueError("no ranks to score")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float((r <= k).mean())


def median_rank(ranks) -> float:
    """Median of the 1-based ranks (mean of the two middle ones for an even count)."""
    r = _np(ranks, "ranks")
    if r.size == 0:
        raise ValueError("no ranks to score")
    return float(np.median(r))


def retrieval_report(similarity, targets=None, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k for each k, median and mean rank, and the chance Recall@k (k / N) for ``similarity``."""
    ranks = retrieval_ranks(similarity, targets)
    n_items = _np(similarity, "similarity").shape[1]
    out = {f"recall@{k}": recall_at_k(ranks, k) for k in ks}
    out.update(
        median_rank=median_rank(ranks),
        mean_rank=float(ranks.mean()),
        n_queries=int(ranks.size),
        n_items=int(n_items),
        chance={f"recall@{k}": min(1.0, k / n_items) for k in ks} | {"median_rank": (n_items + 1) / 2},
    )
    return out


def upsample_heatmap(heatmap, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of a patch-grid heat map ``[h, w]`` to ``size`` = (H, W), float32 CPU."""
    h = torch.as_tensor(_np(heatmap, "heatmap"), dtype=torch.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be [h, w], got shape {tuple(h.shape)}")
    return F.interpolate(h[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]


def _check_heat_mask(heatmap, mask) -> tuple[np.ndarray, np.ndarray]:
    h = _np(heatmap, "heatmap").astype(np.float64)
    m = _np(mask, "mask").astype(bool)
    if h.ndim != 2 or m.ndim != 2:
        raise ValueError(f"heatmap and mask must be 2-D, got {h.shape} and {m.shape}")
    if not np.isfinite(h).all():
        raise ValueError("heatmap contains NaN or infinity")
    return h, m


def pointing_hit(heatmap, mask) -> bool:
    """Whether the centre of the highest-scoring cell of ``heatmap`` ``[h, w]`` lies inside ``mask``
    ``[H, W]`` (the heat map's cells tile the mask's extent; the first maximum wins a tie)."""
    h, m = _check_heat_mask(heatmap, mask)
    gh, gw = h.shape
    row, col = divmod(int(np.argmax(h)), gw)
    y = min(m.shape[0] - 1, int(math.floor((row + 0.5) * m.shape[0] / gh)))
    x = min(m.shape[1] - 1, int(math.floor((col + 0.5) * m.shape[1] / gw)))
    return bool(m[y, x])


def heatmap_iou(heatmap, mask, threshold: float = 0.5) -> float:
    """IoU between the mask and the heat map upsampled to the mask's size, min-max scaled to [0, 1] and
    thresholded (``>= threshold``). A constant heat map selects everything."""
    h, m = _check_heat_mask(heatmap, mask)
    up = upsample_heatmap(h, m.shape).double().numpy()
    lo, hi = up.min(), up.max()
    scaled = (up - lo) / (hi - lo) if hi > lo else np.ones_like(up)
    return iou(scaled >= threshold, m)
