"""The real COVID-19 image data collection subset in ``../shared/data/covid_chestxray``
(``staged_images.csv`` + ``metadata.csv``): labels ``Pneumonia`` (any infection / ARDS finding = 1, "No
Finding" = 0, "todo" = unknown) and ``COVID-19`` (1 / 0 among labelled findings), clinical notes as the
report, lung masks (V7 Labs manual or lungVAE) as ``mask``."""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from mlip_fast.data.labels import COVID_LABELS
from mlip_fast.data.readers import EvalDataError, load_mask_file, resize_mask
from mlip_fast.preprocess.images import load_image

__all__ = ["CovidChestXray"]


class CovidChestXray(Dataset):
    """The staged COVID-19 image data collection (see the module doc).

    Args:
        root: the dataset folder (``staged_images.csv``, ``metadata.csv``, ``images/``, mask folders).
        transform: maps the raw image to the model input.
        masks: None, "v7labs" (manual lung masks) or "lungvae" (model-generated); with a mask source
            only images that have such a mask are kept.
        labelled_only: keep only images whose ``Pneumonia`` label is known (drops "todo").
        views: keep only these views (e.g. ("PA", "AP", "AP Supine")); None keeps all.
        names: keep only these image file names.
    """

    label_names = COVID_LABELS
    _MASK_COLUMNS = {"v7labs": "v7labs_lung_mask", "lungvae": "lungVAE_mask"}

    def __init__(self, root: str | os.PathLike, transform: Optional[Callable] = None, masks: Optional[str] = None,
                 labelled_only: bool = False, views: Optional[Sequence[str]] = None,
                 names: Optional[Sequence[str]] = None):
        self.root = Path(root)
        staged = self.root / "staged_images.csv"
        if not staged.is_file():
            raise EvalDataError(f"{self.root} is not the covid_chestxray folder: {staged} is missing")
        if masks is not None and masks not in self._MASK_COLUMNS:
            raise ValueError(f"masks must be None or one of {sorted(self._MASK_COLUMNS)}, got {masks!r}")
        with open(staged, newline="") as f:
            rows = list(csv.DictReader(f))
        notes = {}
        meta = self.root / "metadata.csv"
        if meta.is_file():
            with open(meta, newline="") as f:
                for r in csv.DictReader(f):
                    notes[r["filename"]] = (r.get("clinical_notes") or "").strip()
        keep = []
        for r in rows:
            if masks is not None and not r.get(self._MASK_COLUMNS[masks]):
                continue
            if labelled_only and r["finding"].strip().lower() == "todo":
                continue
            if views is not None and r["view"] not in views:
                continue
            if names is not None and r["filename"] not in names:
                continue
            keep.append({**r, "report": notes.get(r["filename"], "")})
        if not keep:
            raise EvalDataError(f"no image of {self.root} matches masks={masks!r}, labelled_only={labelled_only}, views={views}")
        self.rows = keep
        self.transform = transform
        self.masks = masks
        self.groups = [r["patientid"] for r in keep]

    @staticmethod
    def labels_of(finding: str) -> np.ndarray:
        """(Pneumonia, COVID-19) for a ``finding`` string; NaN where unknown ("todo")."""
        f = finding.strip().lower()
        if f in ("todo", ""):
            return np.array([np.nan, np.nan], dtype=np.float32)
        if f == "no finding":
            return np.array([0.0, 0.0], dtype=np.float32)
        return np.array([1.0, float(f.startswith("covid-19"))], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict:
        return {"kind": "covid_chestxray", "root": str(self.root), "masks": self.masks, "n": len(self)}

    def __getitem__(self, i: int) -> dict:
        row = self.rows[i]
        raw = load_image(self.root / "images" / row["filename"], max_side=1024)
        sample = {
            "image": self.transform(raw) if self.transform is not None else raw,
            "report": row["report"],
            "labels": self.labels_of(row["finding"]),
            "index": i,
            "name": row["filename"],
        }
        if self.masks is not None:
            mask = load_mask_file(self.root / row[self._MASK_COLUMNS[self.masks]])
            sample["mask"] = mask if mask.shape == raw.shape else resize_mask(mask, raw.shape)
        return sample
