"""CheXpert: the 5x200 zero-shot set, the label table as a classification set, and how CheXpert's label
cells are read.

- ``chexpert_value(text)``: a label cell as a float: blank -> 0 (not mentioned, as GLoRIA / MGCA's
  ``fillna(0)``), "1.0" / "0.0" / "-1.0" -> 1 / 0 / -1 (uncertain).
- ``map_uncertain(labels, names, policy)``: CheXpert's uncertain label (-1) as unknown ("ignore", NaN,
  left out of every metric), 1 ("ones", U-Ones), 0 ("zeros", U-Zeros) or GLoRIA / MGCA's per-class
  mapping ("gloria": 1 for Atelectasis, Edema, Pleural Effusion; 0 for Cardiomegaly, Consolidation;
  unknown for other observations).
- ``CheXpert5x200Dataset`` / ``build_chexpert_5x200``: 200 images per CheXpert-5 class, each positive for
  exactly that class among the five (GLoRIA's selection criterion and MGCA's draw are
  ``mlip_fast.eval.protocols.chexpert_5x200``).
- ``CheXpertLabels``: ``train.csv`` / ``valid.csv`` as a classification set over the five labels, with
  patient ids (``patient_of``) for patient-level splits.
"""
from __future__ import annotations

import csv
import math
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.data.readers import (DatasetError, EvalDataError, RobustDataset, label_value, read_table, require_columns,
                                    resolve_path)
from mlip_fast.preprocess.images import load_image

__all__ = ["UNCERTAIN", "UNCERTAIN_POLICIES", "GLORIA_UNCERTAIN", "chexpert_value", "map_uncertain", "build_chexpert_5x200", "CheXpert5x200Dataset", "CheXpertLabels", "patient_of"]


UNCERTAIN = -1.0
UNCERTAIN_POLICIES = ("ignore", "ones", "zeros", "gloria")
# GLoRIA's constants.py (and MGCA's): "based on original chexpert paper".
GLORIA_UNCERTAIN = {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0}


def chexpert_value(text) -> float:
    """A CheXpert label cell as a float: blank -> 0 (not mentioned, as GLoRIA / MGCA's ``fillna(0)``),
    "1.0" / "0.0" / "-1.0" -> 1 / 0 / -1. Raises ``EvalDataError`` for anything else."""
    s = "" if text is None else str(text).strip()
    if s == "":
        return 0.0
    try:
        v = float(s)
    except ValueError:
        raise EvalDataError(f"CheXpert label value {text!r} is not 1, 0, -1 or blank") from None
    if v not in (1.0, 0.0, UNCERTAIN):
        raise EvalDataError(f"CheXpert label value {text!r} is not 1, 0, -1 or blank")
    return v


def map_uncertain(labels, names: Sequence[str], policy: str) -> np.ndarray:
    """``labels [..., L]`` (1 / 0 / -1 uncertain / NaN unknown) with every -1 mapped by ``policy``
    (see the module doc); returns a float32 copy. ``names`` are the L label names."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, got {policy!r}")
    out = np.array(labels, dtype=np.float32, copy=True)
    if out.shape[-1:] != (len(names),):
        raise ValueError(f"labels have {out.shape[-1:]} columns but {len(names)} names were given")
    if policy == "gloria":
        fill = np.array([GLORIA_UNCERTAIN.get(str(n), math.nan) for n in names], dtype=np.float32)
    else:
        fill = np.full(len(names), {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[policy], dtype=np.float32)
    uncertain = out == UNCERTAIN
    return np.where(uncertain, np.broadcast_to(fill, out.shape), out).astype(np.float32)


def build_chexpert_5x200(train_csv, seed: int = 0, per_class: int = 200, frontal_only: bool = True,
                         strict: bool = True) -> list[dict]:
    """Select CheXpert 5x200: ``per_class`` images per CheXpert-5 class, each positive for exactly that
    class among the five.

    Args:
        train_csv: CheXpert's ``train.csv`` (columns Path, Frontal/Lateral, and the label columns).
        seed: the draw is ``numpy.random.default_rng(seed)`` over rows in file order, class by class.
        frontal_only: keep frontal views only (when the CSV has ``Frontal/Lateral``).
        strict: the other four classes must be 0 or blank (not -1, uncertain); False only requires
            them not to be 1.

    Returns:
        list of ``{"path", "label"}`` (label = class name), ``per_class`` per class in ``CHEXPERT5`` order.

    Raises:
        DatasetError: missing columns, or a class with fewer than ``per_class`` candidates.
    """
    train_csv = Path(train_csv)
    rows = read_table(train_csv)
    require_columns(train_csv, rows, ["Path", *CHEXPERT5])
    rng = np.random.default_rng(seed)
    candidates = {c: [] for c in CHEXPERT5}
    for r in rows:
        if frontal_only and r.get("Frontal/Lateral", "Frontal") != "Frontal":
            continue
        values = {c: label_value(r[c]) for c in CHEXPERT5}
        raw = {c: (r[c] or "").strip() for c in CHEXPERT5}
        positives = [c for c in CHEXPERT5 if values[c] == 1.0]
        if len(positives) != 1:
            continue
        others_ok = all(
            (values[c] == 0.0 or raw[c] == "") if strict else values[c] != 1.0
            for c in CHEXPERT5 if c != positives[0]
        )
        if others_ok:
            candidates[positives[0]].append(r["Path"])
    out = []
    for c in CHEXPERT5:
        if len(candidates[c]) < per_class:
            raise DatasetError(f"{train_csv}: only {len(candidates[c])} images qualify for {c!r} "
                               f"(need {per_class}; strict={strict}, frontal_only={frontal_only})")
        chosen = rng.choice(len(candidates[c]), size=per_class, replace=False)
        out.extend({"path": candidates[c][k], "label": c} for k in sorted(chosen))
    return out


class CheXpert5x200Dataset(RobustDataset):
    """CheXpert 5x200 zero-shot set: 1,000 images, one-hot labels over ``CHEXPERT5``.

    Args:
        source: CheXpert's ``train.csv`` (the selection is built with ``build_chexpert_5x200``), or a
            saved selection CSV with columns ``Path`` and ``label`` (see ``save``).
        root: folder the ``Path`` values are relative to; default: the CSV folder's parent (CheXpert
            paths start with the dataset folder, e.g. ``CheXpert-v1.0-small/train/...``).
    """

    label_names = CHEXPERT5

    def __init__(self, source, root=None, transform=None, seed: int = 0, per_class: int = 200,
                 frontal_only: bool = True, strict: bool = True, max_bad_fraction: float = 0.01):
        source = Path(source)
        rows = read_table(source)
        if rows and "label" in rows[0]:
            require_columns(source, rows, ["Path", "label"])
            bad = sorted({r["label"] for r in rows} - set(CHEXPERT5))
            if bad:
                raise DatasetError(f"{source}: unknown label(s) {bad}; expected {list(CHEXPERT5)}")
            self.selection = [{"path": r["Path"], "label": r["label"]} for r in rows]
        else:
            self.selection = build_chexpert_5x200(source, seed, per_class, frontal_only, strict)
        self.root = Path(root) if root is not None else source.parent.parent
        self.transform = transform
        super().__init__(len(self.selection), max_bad_fraction, name="CheXpert5x200")

    def save(self, path) -> Path:
        """Write the selection (``Path``, ``label``) so that later runs use exactly the same images."""
        path = Path(path)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["Path", "label"])
            writer.writeheader()
            writer.writerows({"Path": s["path"], "label": s["label"]} for s in self.selection)
        return path

    def _source(self, i: int) -> str:
        return str(resolve_path(self.root, self.selection[i]["path"]))

    def _load(self, i: int) -> dict:
        sel = self.selection[i]
        labels = torch.zeros(len(CHEXPERT5))
        labels[CHEXPERT5.index(sel["label"])] = 1.0
        return {"image": self._image(resolve_path(self.root, sel["path"]), self.transform), "labels": labels}


class CheXpertLabels(Dataset):
    """CheXpert's label table as a classification set: labels ``[5]`` over ``CHEXPERT5``.

    Blank cells are 0 (the observation was not mentioned; GLoRIA / MGCA's ``fillna(0)``); -1 (uncertain)
    is mapped by ``uncertain`` ("ignore" = NaN, "ones", "zeros", "gloria"); ``groups`` are the patient ids
    (``patientNNNNN`` in the path), for patient-level splits.

    Args:
        csv_path: ``train.csv`` or ``valid.csv`` (columns ``Path``, ``Frontal/Lateral`` and the labels).
        root: the folder the ``Path`` values start from (default: the CSV folder's parent, since CheXpert's
            paths begin with the dataset folder, e.g. ``CheXpert-v1.0-small/train/...``).
        frontal_only: keep frontal views (as GLoRIA / MGCA).
        paths: keep only these ``Path`` values (one split), in file order.
    """

    label_names = CHEXPERT5

    def __init__(self, csv_path: str | os.PathLike, root: Optional[str | os.PathLike] = None,
                 transform: Optional[Callable] = None, uncertain: str = "ignore", frontal_only: bool = True,
                 paths: Optional[Sequence[str]] = None):
        if uncertain not in UNCERTAIN_POLICIES:
            raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise EvalDataError(f"CheXpert label file {self.csv_path} does not exist")
        with open(self.csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        need = ["Path", *CHEXPERT5] + (["Frontal/Lateral"] if frontal_only else [])
        missing = [c for c in need if not rows or c not in rows[0]]
        if missing:
            raise EvalDataError(f"{self.csv_path}: missing column(s) {missing}")
        keep = set(paths) if paths is not None else None
        rows = [r for r in rows if (not frontal_only or r["Frontal/Lateral"] == "Frontal")
                and (keep is None or r["Path"] in keep)]
        if not rows:
            raise EvalDataError(f"{self.csv_path}: no frontal image" + (" of the given paths" if keep else ""))
        try:
            raw = np.array([[chexpert_value(r[c]) for c in CHEXPERT5] for r in rows], dtype=np.float32)
        except EvalDataError as err:
            raise EvalDataError(f"{self.csv_path}: {err}") from None
        self.rows = rows
        self.root = Path(root) if root is not None else self.csv_path.parent.parent
        self.transform = transform
        self.uncertain = uncertain
        self.n_uncertain = {n: int(c) for n, c in zip(CHEXPERT5, (raw == -1.0).sum(0))}
        self.labels = map_uncertain(raw, CHEXPERT5, uncertain)
        self.groups = [patient_of(r["Path"]) for r in rows]

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict:
        return {"kind": "chexpert", "csv": str(self.csv_path), "n": len(self), "uncertain": self.uncertain,
                "n_uncertain": self.n_uncertain}

    def __getitem__(self, i: int) -> dict:
        path = self.rows[i]["Path"]
        raw = load_image(self.root / path, max_side=1024)
        return {"image": self.transform(raw) if self.transform is not None else raw,
                "labels": self.labels[i].copy(), "index": i, "name": path}


_PATIENT = re.compile(r"(patient\d+)")


def patient_of(path: str) -> str:
    """CheXpert's patient id (``patientNNNNN``) of an image path; the path itself when it has none."""
    found = _PATIENT.search(path)
    return found.group(1) if found else path
