"""The record's metrics of one exported model on the synthetic benchmark: zero-shot AUC (global, local and
combined similarity), pointing accuracy, linear probes, and how well the integrity estimator and its target single
out the finding patches; and what integrity-scored masking does with a trained estimator's logits.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval.common import eval_transform, l2_normalise
from mlip_fast.eval.fewshot import few_shot_classify
from mlip_fast.eval.localisation import evaluate_localisation, mask_to_input_frame
from mlip_fast.eval.metrics import roc_auc
from mlip_fast.eval.zeroshot import zero_shot_classify
from mlip_fast.models import from_pretrained
from mlip_fast.models.vision import num_kept
from mlip_fast.ops.integrity_mask import integrity_mask
from tools.ablation.plan import PROBE_FRACTIONS


def _patch_coverage(masks: list, size: int, patch: int) -> np.ndarray:
    """Share of each patch (row-major grid) inside the union of ``masks`` (bool [size, size] each)."""
    union = np.zeros((size, size), bool)
    for m in masks:
        union |= m
    g = size // patch
    return union.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)


def _auc(positive: np.ndarray, scores: np.ndarray) -> Optional[float]:
    if positive.all() or not positive.any():
        return None
    return float(roc_auc(positive, scores))


@torch.no_grad()
def integrity_alignment(model, root: Path, split: str = "test", batch_size: int = 64) -> dict:
    """How well the integrity estimator's logits, and its training target, point at the findings.

    For every image with at least one finding mask: the patches whose area is at least half inside the union
    of the finding masks are positives; the AUC of a per-patch score at separating them from the other
    patches is taken per image and averaged (chance 0.5). Scores: the estimator's logits a[b, p] (from the
    patch embeddings, before the blocks) and the target it is trained towards, max over the image's own
    report sentences of cos(patch, sentence) on the unmasked image; and, as a reference that needs no
    training, the patch's mean pixel value (most findings are opacities: brighter than the lung around them).
    ``estimator_constant`` is True when every logit of every image is equal (an untrained estimator: uniform
    masking, no weighting).
    """
    data = SyntheticBenchmark(root, split=split, with_findings=True)
    transform = eval_transform(model)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    est_auc, tgt_auc, bright_auc, constant = [], [], [], True
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(len(data), start + batch_size))]
        images = torch.stack([transform(r["image"]) for r in rows])
        _, tokens = model.visual.embeddings(images)
        logits = model.visual.estimator(tokens).float()
        constant &= bool((logits == logits[:, :1]).all())
        image = model.encode_image_local(images, mask_ratio=0.0)
        text = model.encode_text_local([r["report"] for r in rows])
        sim = torch.einsum("bpd,bsd->bps", l2_normalise(image["patches"]), l2_normalise(text["sentences"]))
        target = sim.masked_fill(~text["sentence_mask"][:, None, :], -math.inf).max(dim=-1).values
        brightness = torch.nn.functional.avg_pool2d(images.float().mean(1, keepdim=True), patch).flatten(1)
        for b, r in enumerate(rows):
            masks = [mask_to_input_frame(f["mask"], size) for f in r["findings"] if f.get("mask") is not None]
            if not masks:
                continue
            positive = _patch_coverage(masks, size, patch) >= 0.5
            for out, score in ((est_auc, logits[b]), (tgt_auc, target[b]), (bright_auc, brightness[b])):
                value = _auc(positive, score.numpy())
                if value is not None:
                    out.append(value)
    return {"sie_mask_auc": None if constant or not est_auc else float(np.mean(est_auc)),
            "target_mask_auc": float(np.mean(tgt_auc)) if tgt_auc else None,
            "brightness_mask_auc": float(np.mean(bright_auc)) if bright_auc else None,
            "estimator_constant": constant, "n_images_with_findings": len(tgt_auc)}


@torch.no_grad()
def masking_diagnostics(model, root: Path, mask_ratio: float, temperatures: Sequence[float], draws: int = 32,
                        split: str = "test", batch_size: int = 100) -> dict:
    """What integrity-scored masking does with a trained estimator's logits, on the images with findings.

    For each masking temperature t: the share of the finding patches (at least half inside the union of the
    finding masks) that Gumbel-top-k over logits / t keeps, averaged over ``draws`` seeded draws, against
    K / P for uniform masking (FLIP); and the coefficient of variation over images of the kept integrity
    mass, the weight MLIP gives each image (0 for uniform masking: every image is weighted alike). Also the
    mean over images of the standard deviation of the logits over the patches (how far from uniform the
    estimator is at all).
    """
    data = SyntheticBenchmark(root, split=split, with_findings=True)
    transform = eval_transform(model)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    logits, findings = [], []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(len(data), start + batch_size))]
        keep = [i for i, r in enumerate(rows) if any(f.get("mask") is not None for f in r["findings"])]
        if not keep:
            continue
        images = torch.stack([transform(rows[i]["image"]) for i in keep])
        logits.append(model.visual.estimator(model.visual.embeddings(images)[1]).float())
        findings += [torch.from_numpy(_patch_coverage([mask_to_input_frame(f["mask"], size) for f in rows[i]["findings"]
                                                       if f.get("mask") is not None], size, patch) >= 0.5)
                     for i in keep]
    a = torch.cat(logits)
    positive = torch.stack(findings)
    p = a.shape[1]
    k = num_kept(p, mask_ratio)
    out = {"mask_ratio": mask_ratio, "kept_share_uniform": k / p, "logit_std": float(a.std(dim=1).mean()),
           "n_images": int(a.shape[0])}
    for t in temperatures:
        kept = torch.zeros_like(a)
        weights = []
        for d in range(draws):
            result = integrity_mask(a[..., None], a, k, temperature=t, seed=d, impl="reference")
            kept.scatter_add_(1, result.index, torch.ones_like(a[:, :k]))
            weights.append(result.integrity)
        w = torch.stack(weights)
        out[f"finding_kept_share_t{t:g}"] = float((kept / draws)[positive].mean())
        out[f"weight_cv_t{t:g}"] = float((w.std(dim=1) / w.mean(dim=1)).mean())
    return out


def _or_none(fn: Callable, *args, **kwargs):
    """``fn(...)``, or None when the evaluation data cannot serve it (a toy split without both outcomes)."""
    try:
        return fn(*args, **kwargs)
    except EvalDataError:
        return None


def evaluate(export: Path, root: Path) -> dict:
    """The record's metrics of the exported model of one run (module docstring)."""
    model = from_pretrained(export)
    split = {s: SyntheticBenchmark(root, split=s) for s in ("train", "valid", "test")}
    out = {}
    other = "max" if model.config.local_matching == "ot" else "ot"
    # the model's own matching on both splits, then the other reading on the test split (suffix _max / _ot)
    for name, matching in (("test", None), ("valid", None), ("test", other)):
        zs = _or_none(zero_shot_classify, model, split[name], "synthetic", mode="all", classes=list(CHEXPERT5),
                      skip_empty=True, progress=False, batch_size=64, local_matching=matching)
        loc = _or_none(evaluate_localisation, model, root, split=name, progress=False, batch_size=64,
                       local_matching=matching)
        prefix = "valid_" if name == "valid" else ""
        suffix = "" if matching is None else f"_{matching}"
        modes = ("global", "local", "combined") if name == "test" and matching is None else ("combined", "local")
        for mode in modes:
            out[f"{prefix}zs_auc_{mode}{suffix}"] = zs[mode]["macro"]["auc"] if zs else None
        out[f"{prefix}pointing_accuracy{suffix}"] = loc["pointing_accuracy"] if loc else None
        if matching is None:
            out[f"{prefix}pointing_chance"] = loc["chance"] if loc else None
    probe = _or_none(few_shot_classify, model, split["train"], split["test"], valid_data=split["valid"],
                     fractions=PROBE_FRACTIONS, methods=("linear",), seed=0, classes=list(CHEXPERT5), progress=False,
                     batch_size=64)
    for fraction in PROBE_FRACTIONS:
        key = f"{fraction * 100:g}%"
        entry = probe["linear"].get(key) if probe else None
        out[f"probe_auc_{fraction * 100:g}pct"] = entry["macro_auc"] if entry else None
    out.update(integrity_alignment(model, root, "test"))
    return out
