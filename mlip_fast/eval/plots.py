"""PNG plots of evaluation results (matplotlib, Agg backend; every function returns the written path).

- ``plot_roc_curves``: one panel per scoring mode, one ROC curve per class with its AUC, the chance
  diagonal;
- ``plot_retrieval``: Recall@K bars in both directions beside chance, and the similarity matrix;
- ``plot_fewshot``: test AUC against the label fraction, one line per method;
- ``plot_heatmap_overlays``: image, finding mask outline, sentence heat map, top patch marker;
- ``plot_segmentation_overlays``: image with the ground-truth and predicted mask outlines.
"""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mlip_fast._plotting import optional_plot
from mlip_fast.eval import metrics as M

__all__ = ["plot_roc_curves", "plot_retrieval", "plot_fewshot", "plot_heatmap_overlays", "plot_segmentation_overlays"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


@optional_plot
def plot_roc_curves(scores: Mapping[str, np.ndarray], labels: np.ndarray, class_names: Sequence[str],
                    path: str | os.PathLike, title: str = "zero-shot ROC") -> Path:
    """ROC curves of ``scores[mode] [N, C]`` against ``labels [N, C]`` (NaN rows skipped per class)."""
    plt = _pyplot()
    modes = list(scores)
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 4.2), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        s = np.asarray(scores[mode])
        for j, name in enumerate(class_names):
            known = np.isfinite(labels[:, j])
            y = labels[known, j] > 0.5
            if y.all() or not y.any():
                continue
            fpr, tpr, _ = M.roc_curve(y, s[known, j])
            ax.plot(fpr, tpr, lw=1.5, label=f"{name} ({M.roc_auc(y, s[known, j]):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="chance (0.5)")
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
               title=f"{title}: {mode}")
        ax.set_aspect("equal")
        ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


@optional_plot
def plot_retrieval(result: Mapping, path: str | os.PathLike, similarity: np.ndarray | None = None,
                   max_items: int = 64) -> Path:
    """Recall@K bars (image->report, report->image, chance) and, when given, the similarity matrix."""
    plt = _pyplot()
    ncols = 2 if similarity is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 4.2), squeeze=False)
    ax = axes[0, 0]
    i2r, r2i = result["image_to_report"], result["report_to_image"]
    ks = [k for k in i2r if k.startswith("recall@")]
    x = np.arange(len(ks))
    for offset, (name, values) in zip((-0.27, 0.0, 0.27), (("image->report", i2r), ("report->image", r2i),
                                                            ("chance", i2r["chance"]))):
        ax.bar(x + offset, [values[k] for k in ks], width=0.27, label=name)
    ax.set(xticks=x, xticklabels=ks, ylim=(0, 1), ylabel="recall",
           title=f"retrieval ({result['n_pairs']} pairs; median rank {i2r['median_rank']:g} / {r2i['median_rank']:g})")
    ax.legend(fontsize=8)
    if similarity is not None:
        n = min(max_items, similarity.shape[0])
        im = axes[0, 1].imshow(similarity[:n, :n], cmap="viridis")
        axes[0, 1].set(title=f"cosine similarity (first {n})", xlabel="report", ylabel="image")
        fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
    return _save(fig, path)


@optional_plot
def plot_fewshot(result: Mapping, path: str | os.PathLike, metric: str = "macro_auc", title: str = "few-shot") -> Path:
    """``metric`` against the label fraction for each method key of ``result`` ({method: {pct: {...}}})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for method, rows in result.items():
        if not isinstance(rows, Mapping) or not rows or not all(isinstance(v, Mapping) and metric in v for v in rows.values()):
            continue
        fr = [rows[k]["fraction"] * 100 for k in rows]
        ax.plot(fr, [rows[k][metric] for k in rows], "o-", label=method)
    ax.set(xscale="log", xlabel="labelled training data (%)", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _example_grid(n: int, cols: int, row_height: float):
    """A figure with one blank panel per example (at least one), ``cols`` panels a row."""
    rows = (max(1, n) + cols - 1) // cols
    fig, axes = _pyplot().subplots(rows, cols, figsize=(3.2 * cols, row_height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, list(axes.flat)


@optional_plot
def plot_heatmap_overlays(examples: Sequence[Mapping], path: str | os.PathLike, cols: int = 4) -> Path:
    """Per example: the image, the finding mask outline (green), the sentence heat map and the top patch
    (red cross when it misses the mask, green when it hits)."""
    fig, axes = _example_grid(len(examples), cols, row_height=3.6)
    for ax, ex in zip(axes, examples):
        image, mask, heat = np.asarray(ex["image"]), np.asarray(ex["mask"]), np.asarray(ex["heatmap"])
        size = image.shape
        ax.imshow(image, cmap="gray")
        ax.imshow(M.upsample_heatmap(heat, size).numpy(), cmap="jet", alpha=0.4)
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1)
        gh, gw = heat.shape
        r, c = divmod(int(np.argmax(heat)), gw)
        ax.plot((c + 0.5) * size[1] / gw - 0.5, (r + 0.5) * size[0] / gh - 0.5, "x",
                color="lime" if ex.get("hit") else "red", ms=9, mew=2)
        ax.set_title("\n".join(textwrap.wrap(str(ex.get("sentence", "")), 38)[:3]), fontsize=7)
    return _save(fig, path)


@optional_plot
def plot_segmentation_overlays(examples: Sequence[Mapping], path: str | os.PathLike, cols: int = 4) -> Path:
    """Per example: the image with ground truth (green) and prediction (red) outlines, and its Dice."""
    fig, axes = _example_grid(len(examples), cols, row_height=3.4)
    for ax, ex in zip(axes, examples):
        mask, pred = np.asarray(ex["mask"], bool), np.asarray(ex["prediction"], bool)
        ax.imshow(np.asarray(ex["image"]), cmap="gray")
        if mask.any():
            ax.contour(mask.astype(float), levels=[0.5], colors="lime", linewidths=1)
        if pred.any():
            ax.contour(pred.astype(float), levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"Dice {M.dice(pred, mask):.3f} (green truth, red prediction)", fontsize=7)
    return _save(fig, path)
