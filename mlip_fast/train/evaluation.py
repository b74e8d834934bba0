"""Evaluation during and after training, through ``mlip_fast.eval``.

- Periodic validation: zero-shot classification on the validation split (CheXpert-5 classes, global +
  local scores combined), on the engine's model. Under ZeRO-3 every rank runs it (a forward gathers the
  partitioned weights collectively); under ZeRO 1/2 rank 0 runs it while the others wait.
- End of run: zero-shot classification on the test split and, for the synthetic benchmark (which has a
  mask per finding sentence), patch-sentence localisation, on the exported model loaded back with
  ``from_pretrained`` (rank 0; what is evaluated is exactly what was exported).
- ``--diagnose`` (synthetic benchmark): at both, the integrity mode's diagnostics (:func:`integrity`).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.eval.integrity import integrity_diagnostics
from mlip_fast.eval.localisation import evaluate_localisation, load_records
from mlip_fast.eval.zeroshot import zero_shot_classify

__all__ = ["EvalSets", "zero_shot", "localisation", "integrity", "integrity_line", "precision_context"]


class EvalSets:
    """The evaluation data of a run: ``valid`` / ``test`` datasets (or None when the data has no such
    split or no labels), the prompt file name, and the synthetic benchmark root for localisation."""

    def __init__(self, valid, test, prompts: str, synthetic_root: Optional[Path]):
        self.valid, self.test, self.prompts, self.synthetic_root = valid, test, prompts, synthetic_root
        self._loaded: dict = {}

    @staticmethod
    def _labelled(dataset) -> bool:
        if dataset is None:
            return False
        names = {n.lower() for n in getattr(dataset, "label_names", ())}
        return all(c.lower() in names for c in CHEXPERT5)

    def localisation_data(self, model, split: str) -> tuple:
        """(records, token cache): the synthetic benchmark's ``split`` decoded for ``model``'s eval transform once per
        run (:func:`mlip_fast.eval.localisation.load_records`) and a dict for its tokenized sentence lists: periodic
        validations then skip the decoding and the tokenization."""
        key = (split, model.config.vision.image_size, model.config.vision.in_chans)
        if key not in self._loaded:
            self._loaded = {key: (load_records(model, self.synthetic_root, split), {})}  # one split held at a time
        return self._loaded[key]

    def localisation(self, model, split: str, *, max_samples: int = 0) -> dict:
        """:func:`localisation` of ``split`` on the data this run decoded and tokenized once
        (:meth:`localisation_data`)."""
        records, tokens = self.localisation_data(model, split)
        return localisation(model, records, split, max_samples=max_samples, token_cache=tokens)

    def zero_shot_set(self, split: str):
        dataset = getattr(self, split)
        return dataset if self._labelled(dataset) else None


def precision_context(dtype: torch.dtype, device_type: str):
    """Autocast to the engine's low precision for evaluation code that feeds fp32 images to a model whose
    weights DeepSpeed keeps in bf16 / fp16; a no-op in fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type=device_type, dtype=dtype)
    return contextlib.nullcontext()


def zero_shot(model, dataset, prompts: str, *, max_samples: int = 0, progress: bool = False) -> dict:
    """Zero-shot CheXpert-5 metrics (combined global + local scores): ``{"auc_macro", "auc": {class: auc},
    "accuracy_macro", "f1_macro", "chance_auc", "n_images", "full": <mlip_fast.eval result>}``. A class
    without both positive and negative images in ``dataset`` gets AUC None and is left out of the macro."""
    result = zero_shot_classify(model, dataset, prompts, mode="combined", classes=list(CHEXPERT5),
                                max_samples=max_samples or None, progress=progress, batch_size=64, skip_empty=True)
    return {
        "auc_macro": result["macro"]["auc"],
        "auc": {name: c.get("auc") for name, c in result["classes"].items()},
        "accuracy_macro": result["macro"]["accuracy"],
        "f1_macro": result["macro"]["f1"],
        "chance_auc": result["chance"]["auc"],
        "n_images": result["n_images"],
        "full": result,
    }


def localisation(model, synthetic_root, split: str = "test", *, max_samples: int = 0, progress: bool = False,
                 token_cache: Optional[dict] = None) -> dict:
    """Pointing accuracy of finding sentences on the synthetic benchmark with its chance rate (maps by the model
    config's matching, ``local_matching``); ``synthetic_root``: its folder, or records of ``split`` decoded
    already, with ``token_cache`` (:meth:`EvalSets.localisation_data`)."""
    result = evaluate_localisation(model, synthetic_root, split=split, max_samples=max_samples or None,
                                   progress=progress, batch_size=64, token_cache=token_cache)
    return {
        "pointing_accuracy": result["pointing_accuracy"],
        "chance": result["chance"],
        "mask_iou": result["mask_iou"],
        "iou_chance": result["iou_chance"],
        "n_sentences": result["n_sentences"],
        "per_finding": result["per_finding"],
        "local_matching": result["local_matching"],
    }


def integrity(model, synthetic_root: Path, split: str = "test", *, max_samples: int = 0) -> dict:
    """The integrity mode's diagnostics on the synthetic benchmark (finding-patch AUC of the mode's per-patch score
    and of the estimator's target, finding patches kept, weight CV; :mod:`mlip_fast.eval.integrity`), on up to
    ``max_samples`` images with findings (0: 128)."""
    return integrity_diagnostics(model, synthetic_root, split, max_images=max_samples or 128)


def integrity_line(diag: dict) -> str:
    """One log line of :func:`integrity`'s numbers."""
    def show(value):
        return "n/a" if value is None else f"{value:.3f}"

    return (f"integrity ({diag['sie_mode']}, {diag['split']}, {diag['n_images']} images with findings): finding-patch "
            f"AUC of the estimator {show(diag['estimator_auc'])}, of its target {show(diag['target_auc'])} (chance "
            f"0.5); finding patches kept {show(diag['finding_kept_share'])} (uniform "
            f"{show(diag['kept_share_uniform'])}); weight CV {show(diag['weight_cv'])}")
