"""RSNA Pneumonia Detection: pneumonia labels per patient and, optionally, the union of its boxes as a mask."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mlip_fast.data.labels import RSNA_LABELS
from mlip_fast.data.readers import (DatasetError, RobustDataset, SampleError, apply_transform, index_images, label_value, read_table,
                                    require_columns)
from mlip_fast.preprocess.images import load_image

__all__ = ["RSNAPneumoniaDataset"]


class RSNAPneumoniaDataset(RobustDataset):
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (patientId, x, y, width, height, Target;
    one row per box, boxes in original pixels) plus the images (``<patientId>.dcm`` or a PNG/JPEG
    export, anywhere under ``image_dir``).

    Yields ``labels`` [1] ("Pneumonia") and, with ``boxes=True``, a ``mask`` of the union of boxes.

    Args:
        patient_ids: keep only these patients (e.g. a split file), in the given order.
    """

    label_names = RSNA_LABELS

    def __init__(self, labels_csv, image_dir, transform=None, boxes: bool = False,
                 patient_ids: Sequence[str] | None = None, max_bad_fraction: float = 0.01):
        labels_csv = Path(labels_csv)
        rows = read_table(labels_csv)
        require_columns(labels_csv, rows, ["patientId", "Target"] + (["x", "y", "width", "height"] if boxes else []))
        by_patient: dict[str, dict] = {}
        for r in rows:
            entry = by_patient.setdefault(r["patientId"], {"target": 0, "boxes": []})
            if label_value(r["Target"]) == 1.0:
                entry["target"] = 1
                if boxes and r.get("x"):
                    entry["boxes"].append(tuple(float(r[k]) for k in ("x", "y", "width", "height")))
        if patient_ids is not None:
            unknown = [p for p in patient_ids if p not in by_patient]
            if unknown:
                raise DatasetError(f"{labels_csv}: {len(unknown)} patient id(s) not in the labels, e.g. {unknown[:3]}")
            self.patients = list(patient_ids)
        else:
            self.patients = list(by_patient)
        self.entries = by_patient
        self.files = index_images(Path(image_dir))
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.boxes = boxes
        super().__init__(len(self.patients), max_bad_fraction, name="RSNAPneumonia")

    def _source(self, i: int) -> str:
        pid = self.patients[i]
        return str(self.files.get(pid, self.image_dir / f"{pid}.dcm"))

    def _load(self, i: int) -> dict:
        pid = self.patients[i]
        if pid not in self.files:
            raise SampleError(self._source(i), "image file not found")
        entry = self.entries[pid]
        item = {"labels": torch.tensor([float(entry["target"])])}
        if not self.boxes:
            item["image"] = self._image(self.files[pid], self.transform)
            return item
        image = load_image(self.files[pid])
        mask = np.zeros(image.shape, dtype=bool)
        for x, y, w, h in entry["boxes"]:
            x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
            mask[y0 : int(round(y + h)), x0 : int(round(x + w))] = True
        item["image"], item["mask"] = apply_transform(self.transform, image, mask)
        return item
