"""One split of the built-in synthetic benchmark (``master.csv`` written by ``mlip_fast.data.synth``) with
what evaluation needs beyond image-report pairs: the label vector (CheXpert's uncertain value -1 mapped by
``uncertain``, see :mod:`mlip_fast.data.evaluation.chexpert`), the per-finding sentences and masks
(localisation) and one segmentation target per image."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from torch.utils.data import Dataset

from mlip_fast.data.evaluation.chexpert import UNCERTAIN_POLICIES, map_uncertain
from mlip_fast.data.labels import SYNTHETIC_LABELS
from mlip_fast.data.readers import EvalDataError, load_mask_file
from mlip_fast.data.synth.findings import FINDINGS
from mlip_fast.preprocess.images import load_image

__all__ = ["SyntheticBenchmark"]


class SyntheticBenchmark(Dataset):
    """One split of the synthetic benchmark.

    Args:
        root: folder holding ``master.csv`` (``python -m mlip_fast.data.synth --out root``).
        split: "train", "valid", "test", or None for every row.
        transform: maps the raw ``[H, W]`` image to the model input (e.g. the model's eval transform).
        with_findings: add ``findings``: list of {name, side, zone, extent, sentence, mask (bool [H, W])}.
        segmentation_target: adds ``mask`` (bool [H, W]): the union of every finding's mask ("any"),
            one finding's mask (e.g. "pleural_effusion"; empty when absent), or None for no mask.
        uncertain: how a label of -1 (CheXpert's uncertain, as a labeller writes it into a master.csv) is
            read: "ignore" (NaN, left out of the metrics), "ones", "zeros" or "gloria" (per class).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: Optional[str] = "test",
        transform: Optional[Callable] = None,
        with_findings: bool = False,
        segmentation_target: Optional[str] = None,
        uncertain: str = "ignore",
    ):
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        if segmentation_target is not None and segmentation_target != "any" and segmentation_target not in FINDINGS:
            raise EvalDataError(f"unknown segmentation target {segmentation_target!r}; use 'any' or one of {list(FINDINGS)}")
        self.root = Path(root)
        master = self.root / "master.csv"
        if not master.is_file():
            raise EvalDataError(f"{self.root} is not a synthetic benchmark folder: {master} is missing "
                                "(generate one with python -m mlip_fast.data.synth --out DIR)")
        with open(master, newline="") as f:
            rows = list(csv.DictReader(f))
        need = {"image_path", "findings", "impression", "split", "findings_json", *SYNTHETIC_LABELS}
        missing = sorted(need - set(rows[0] if rows else need))
        if missing:
            raise EvalDataError(f"{master} lacks the columns {missing}")
        if split is not None:
            splits = sorted({r["split"] for r in rows})
            rows = [r for r in rows if r["split"] == split]
            if not rows:
                raise EvalDataError(f"{master} has no row in split {split!r}; its splits are {splits}")
        self.rows = rows
        self.split = split
        self.transform = transform
        self.with_findings = with_findings
        self.segmentation_target = segmentation_target
        self.uncertain = uncertain
        self.label_names = list(SYNTHETIC_LABELS)
        try:
            raw = np.array([[float(r[n]) for n in SYNTHETIC_LABELS] for r in rows], dtype=np.float32)
        except ValueError as err:
            raise EvalDataError(f"{master}: a label value is not a number ({err})") from None
        self.n_uncertain = {n: int(c) for n, c in zip(SYNTHETIC_LABELS, (raw == -1.0).sum(0))}
        self.labels = map_uncertain(raw, SYNTHETIC_LABELS, uncertain)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict:
        return {"kind": "synthetic", "root": str(self.root), "split": self.split, "n": len(self),
                "uncertain": self.uncertain, "n_uncertain": self.n_uncertain}

    def has_foreground(self, i: int) -> bool:
        """Whether item ``i``'s segmentation mask is non-empty (read from ``findings_json``, no image)."""
        if self.segmentation_target is None:
            raise EvalDataError("this view has no segmentation target")
        entries = json.loads(self.rows[i]["findings_json"] or "[]")
        return any(self.segmentation_target in ("any", e["name"]) for e in entries)

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        raw = load_image(self.root / row["image_path"])
        entries = json.loads(row["findings_json"] or "[]")
        sample = {
            "image": self.transform(raw) if self.transform is not None else raw,
            "report": " ".join(t for t in (row["findings"], row["impression"]) if t),
            "labels": self.labels[i].copy(),
            "index": i,
        }
        if self.with_findings:
            sample["findings"] = [{**e, "mask": load_mask_file(self.root / e["mask"])} for e in entries]
        if self.segmentation_target is not None:
            mask = np.zeros(raw.shape, bool)
            for e in entries:
                if self.segmentation_target in ("any", e["name"]):
                    mask |= load_mask_file(self.root / e["mask"])
            sample["mask"] = mask
        return sample
