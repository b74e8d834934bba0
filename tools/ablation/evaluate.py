"""The record's metrics of one exported model on the synthetic benchmark: zero-shot AUC (global, local and
combined similarity), pointing accuracy, linear probes, and the integrity mode's diagnostics
(:func:`mlip_fast.eval.integrity.integrity_diagnostics`: how well its per-patch score and its target single out the
finding patches, how many of them its masking keeps, how unequal its view weights are); and, as a reference that
needs no training, how well the patches' pixel brightness singles them out.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval.common import eval_transform
from mlip_fast.eval.fewshot import few_shot_classify
from mlip_fast.eval.integrity import finding_patches, integrity_diagnostics, per_image_auc
from mlip_fast.eval.localisation import evaluate_localisation, mask_to_input_frame
from mlip_fast.eval.zeroshot import zero_shot_classify
from mlip_fast.models import from_pretrained
from tools.ablation.plan import PROBE_FRACTIONS, SPEC_MASK_RATIO

# integrity_diagnostics' names -> the record's (the two AUCs keep the names of the earlier records)
RECORD_NAMES = {"estimator_auc": "sie_mask_auc", "target_auc": "target_mask_auc", "n_images": "n_images_with_findings",
                "mask_ratio": "integrity_mask_ratio", "draws": "integrity_draws"}


def integrity_record(model, root: Path, split: str = "test", draws: int = 4) -> dict:
    """:func:`integrity_diagnostics` of ``model`` on every image with findings of ``split``, at the model's mask
    ratio (the method's r = 0.5 for an unmasked run, whose estimator and masking are untrained), under the record's
    names (``RECORD_NAMES``; ``sie_mask_auc`` None: a constant or no per-patch score)."""
    ratio = model.config.mask_ratio or SPEC_MASK_RATIO
    diag = integrity_diagnostics(model, root, split, mask_ratio=ratio, draws=draws, max_images=0)
    return {RECORD_NAMES.get(k, k): v for k, v in diag.items() if k != "split"}


@torch.no_grad()
def brightness_auc(model, root: Path, split: str = "test") -> float:
    """Mean per-image AUC of the patches' mean pixel value (the input ``model`` sees) at singling out the finding
    patches (most findings are opacities, brighter than the lung around them), on the images with findings of
    ``split``: a reference that needs no training."""
    data = SyntheticBenchmark(root, split=split, with_findings=True)
    transform = eval_transform(model)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    scores, positives = [], []
    for i in range(len(data)):
        row = data[i]
        masks = [mask_to_input_frame(f["mask"], size) for f in row["findings"] if f.get("mask") is not None]
        if masks:
            image = transform(row["image"]).float().mean(0, keepdim=True)
            scores.append(torch.nn.functional.avg_pool2d(image, patch).flatten())
            positives.append(torch.from_numpy(finding_patches(masks, size, patch)))
    auc = per_image_auc(torch.stack(scores), torch.stack(positives))
    return float(auc[~auc.isnan()].mean())


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
    out.update(integrity_record(model, root, "test"))
    return out
