"""Does the integrity mode do its job? Diagnostics on the synthetic benchmark, whose findings have masks.

For every image with at least one finding mask, the patches at least half inside the union of its finding masks
are the finding patches. :func:`integrity_diagnostics` reports, for the model's mode (``config.sie_mode``):

- ``estimator_auc``: the per-image AUC (mean over images; chance 0.5) of the mode's per-patch score at telling the
  finding patches from the others: the estimator's logits (``guided``, ``discriminative``) or the mask-layout
  weight's theta_p, the weight a view gains by keeping patch p (``maco``); None for ``predictor`` (no per-patch
  score) and for a constant score (an untrained estimator or layout weight);
- ``target_auc``: the same AUC of the estimator's training target on the unmasked image (each patch's best cosine
  to its own report; minus the soft maximum over the batch's other reports for ``discriminative``); estimator
  modes only;
- ``finding_kept_share``: the share of finding patches that the mode's masking keeps (over ``draws`` seeded
  masks), against ``kept_share_uniform`` = K / P for uniform masking;
- ``weight_cv``: the coefficient of variation over the images of the mode's view weights (0: every view weighted
  alike), averaged over the draws; ``weight_finding_corr``: the Pearson correlation over all masked views between
  a view's weight and the share of its finding patches it kept (does the weight reward views that kept the
  findings?);
- ``predictor``: ``prediction_target_corr`` and ``prediction_mae`` of the predicted integrity against its target.

The training app records them at every validation point and at the end with ``--diagnose`` (a curve through
training in metrics.jsonl, the last values in summary.json).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mlip_fast.constants import ESTIMATOR_MODES
from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.eval.common import eval_transform, evaluating
from mlip_fast.eval.localisation import mask_to_input_frame
from mlip_fast.functional.integrity import integrity_target_scores
from mlip_fast.models.vision import num_kept

__all__ = ["integrity_diagnostics", "finding_patches", "per_image_auc"]


def finding_patches(masks: list, size: int, patch: int) -> np.ndarray:
    """bool [P] (row-major grid): the patches at least half inside the union of ``masks`` (bool [size, size])."""
    union = np.zeros((size, size), bool)
    for m in masks:
        union |= m
    g = size // patch
    return union.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1) >= 0.5


def per_image_auc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """AUC of each row of scores [N, P] at separating its positive patches (bool [N, P]) from the others: the
    probability a positive outscores a negative, ties 1/2. NaN for a row without both kinds."""
    diff = scores[:, :, None].double() - scores[:, None, :].double()
    pairs = (positive[:, :, None] & ~positive[:, None, :]).double()
    wins = (diff > 0).double() + 0.5 * (diff == 0).double()
    count = pairs.sum(dim=(1, 2))
    return torch.where(count > 0, (wins * pairs).sum(dim=(1, 2)) / count.clamp_min(1), torch.nan)


def _mean_auc(aucs: list, constant: bool) -> Optional[float]:
    values = torch.cat(aucs) if aucs else torch.zeros(0)
    values = values[~values.isnan()]
    return None if constant or values.numel() == 0 else float(values.mean())


def _pearson(x: torch.Tensor, y: torch.Tensor) -> Optional[float]:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return None if denominator == 0 else float((x * y).sum()) / denominator


def _rows(root: Path, split: str, max_images: int, size: int, patch: int) -> tuple:
    """The split's images with at least one finding mask (up to ``max_images``) and their finding patches."""
    data = SyntheticBenchmark(root, split=split, with_findings=True)
    rows, positives = [], []
    for i in range(len(data)):
        row = data[i]
        masks = [mask_to_input_frame(f["mask"], size) for f in row["findings"] if f.get("mask") is not None]
        if masks:
            rows.append(row)
            positives.append(torch.from_numpy(finding_patches(masks, size, patch)))
        if max_images and len(rows) >= max_images:
            break
    return rows, positives


def integrity_diagnostics(model, root: Path, split: str = "valid", *, mask_ratio: Optional[float] = None,
                          draws: int = 4, max_images: int = 128, batch_size: int = 32) -> dict:
    """The integrity diagnostics of ``model`` (module docstring) on ``split`` of the synthetic benchmark at
    ``root``: the first ``max_images`` images with findings (0: all), ``draws`` seeded masks each at ``mask_ratio``
    (default: the model config's), in batches of ``batch_size`` (the discriminative target's other reports are
    the batch's). The model runs in eval mode without gradient and is left in its previous mode."""
    cfg = model.config
    mode = cfg.sie_mode
    ratio = cfg.mask_ratio if mask_ratio is None else mask_ratio
    size, patch = cfg.vision.image_size, cfg.vision.patch_size
    if ratio == 0.0:
        raise ValueError("integrity diagnostics need a mask ratio > 0 (nothing is masked or weighted at 0)")
    rows, positives = _rows(Path(root), split, max_images, size, patch)
    with evaluating(model):
        return _diagnostics(model, rows, positives, ratio, draws, batch_size, split)


def _diagnostics(model, rows: list, positives: list, ratio: float, draws: int, batch_size: int, split: str) -> dict:
    cfg = model.config
    mode = cfg.sie_mode
    transform = eval_transform(model)
    device = next(model.parameters()).device
    theta = None
    if mode == "maco":  # softplus(theta_p + c), monotone in theta_p; through the head's forward (ZeRO-3 gathers it)
        theta = model.layout_weight(torch.eye(cfg.vision.num_patches, device=device)).float().cpu()
    est_auc, tgt_auc, kept, weights, shares, predicted, targets = [], [], [], [], [], [], []
    est_constant = True
    for start in range(0, len(rows), batch_size):
        batch, positive = rows[start:start + batch_size], torch.stack(positives[start:start + batch_size])
        images = torch.stack([transform(r["image"]) for r in batch]).to(device)
        if mode in ESTIMATOR_MODES:
            whole = model.encode_image_local(images, mask_ratio=0.0)
            text = model.encode_text_local([r["report"] for r in batch])
            logits = whole["integrity_logits_all"].float().cpu()
            est_constant &= bool((logits == logits[:, :1]).all())
            est_auc.append(per_image_auc(logits, positive))
            target = integrity_target_scores(whole["patches"], text["sentences"], text["sentence_mask"],
                                             target=mode)
            tgt_auc.append(per_image_auc(target.float().cpu(), positive))
        elif theta is not None:
            est_constant &= bool((theta == theta[0]).all())
            est_auc.append(per_image_auc(theta.expand(positive.shape), positive))
        for d in range(draws):
            out = model.encode_image_local(images, mask_ratio=ratio, seed=start * draws + d)
            keep = out["patch_index"].cpu()
            kept_positive = positive.gather(1, keep)
            kept.append(kept_positive.sum(dim=1))
            shares.append(kept_positive.sum(dim=1) / positive.sum(dim=1).clamp_min(1))
            weights.append((d, out["integrity_weights"].float().cpu()))
            if out["integrity_target"] is not None:
                predicted.append(out["integrity_score"].float().cpu())
                targets.append(out["integrity_target"].float().cpu())
    n_positive = int(torch.stack(positives).sum()) if positives else 0
    per_draw = [torch.cat([w for d, w in weights if d == draw]) for draw in range(draws)] if weights else []
    out = {
        "sie_mode": mode,
        "split": split,
        "mask_ratio": ratio,
        "n_images": len(rows),
        "draws": draws,
        "estimator_auc": _mean_auc(est_auc, est_constant),
        "target_auc": _mean_auc(tgt_auc, False) if mode in ESTIMATOR_MODES else None,
        "finding_kept_share": float(torch.cat(kept).sum()) / (n_positive * draws) if n_positive else None,
        "kept_share_uniform": num_kept(cfg.vision.num_patches, ratio) / cfg.vision.num_patches,
        "weight_cv": float(np.mean([float(w.std(unbiased=False) / w.mean()) for w in per_draw])) if per_draw else None,
        "weight_finding_corr": _pearson(torch.cat([w for _, w in weights]), torch.cat(shares)) if weights else None,
    }
    if mode == "predictor" and predicted:
        q, t = torch.cat(predicted), torch.cat(targets)
        out["prediction_target_corr"] = _pearson(q, t)
        out["prediction_mae"] = float((q - t).abs().mean())
    return out
