"""Evaluation views of datasets that the generic readers do not cover.

- ``SyntheticBenchmark(root, split, ...)``: the built-in synthetic benchmark (``master.csv`` written by
  ``mlip_fast.data.synth``) with what evaluation needs beyond image-report pairs: the label vector
  (CheXpert's uncertain value -1 mapped by ``uncertain``, see ``mlip_fast.eval.protocols``), the
  per-finding sentences and masks (localisation) and one segmentation target per image.
- ``CovidChestXray(root, ...)``: the real COVID-19 image data collection subset in
  ``../shared/data/covid_chestxray`` (``staged_images.csv`` + ``metadata.csv``): labels ``Pneumonia``
  (any infection / ARDS finding = 1, "No Finding" = 0, "todo" = unknown) and ``COVID-19`` (1 / 0 among
  labelled findings), clinical notes as the report, lung masks (V7 Labs manual or lungVAE) as ``mask``.
- ``group_split(groups, test_fraction, seed)``: a seeded split that keeps each group (patient) on one side
  (``protocols.split_units(method="grouped")`` without a validation part).
- ``foreground_flags(dataset)``: per item, whether its segmentation mask has any foreground pixel.
- ``CheXpertLabels(csv, ...)``: CheXpert's label table (``train.csv`` / ``valid.csv``): frontal images with
  the five competition labels, blanks read as 0 and the uncertain -1 mapped by ``uncertain``.
- ``MaskedImageFolder(images, masks, ...)``: image + binary mask pairs matched by file name, e.g. the
  lung masks of ``../shared/data/covid_chestxray`` (``masks_v7labs_lungs/`` or
  ``annotations/lungVAE-masks/``), for few-shot segmentation.

Samples are dicts as in ``mlip_fast.eval.common``: ``image`` (transformed ``[C, S, S]`` when a transform
is given, else the raw ``[H, W]`` float array), ``report``, ``labels``, ``mask``, ``findings``, ``index``.
"""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, Subset

from mlip_fast.data.labels import CHEXPERT5, COVID_LABELS, SYNTHETIC_LABELS
from mlip_fast.data.synth import FINDINGS
from mlip_fast.eval.common import EvalDataError
from mlip_fast.eval.protocols import UNCERTAIN_POLICIES, chexpert_value, map_uncertain, split_units
from mlip_fast.preprocess.images import load_image

__all__ = ["SyntheticBenchmark", "MaskedImageFolder", "CovidChestXray", "CheXpertLabels", "group_split",
           "foreground_flags", "patient_of"]


def _load_mask_file(path: Path) -> np.ndarray:
    return load_image(path) >= 0.5


def _resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (masks made at another resolution)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) >= 128


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
            sample["findings"] = [{**e, "mask": _load_mask_file(self.root / e["mask"])} for e in entries]
        if self.segmentation_target is not None:
            mask = np.zeros(raw.shape, bool)
            for e in entries:
                if self.segmentation_target in ("any", e["name"]):
                    mask |= _load_mask_file(self.root / e["mask"])
            sample["mask"] = mask
        return sample


class MaskedImageFolder(Dataset):
    """Images with binary masks matched by file name (a mask named like its image, any extension).

    Args:
        images: image folder.
        masks: mask folder (0/255 or 0/1 images, content-sniffed; named like the image, or
            ``<image stem>_mask.<ext>``; a mask of another size is resized to its image, nearest).
        transform: maps the raw image to the model input.
        names: restrict to these image file names (e.g. one split); default every image with a mask.
    """

    def __init__(self, images: str | os.PathLike, masks: str | os.PathLike, transform: Optional[Callable] = None,
                 names: Optional[Sequence[str]] = None):
        self.images, self.masks = Path(images), Path(masks)
        for p in (self.images, self.masks):
            if not p.is_dir():
                raise EvalDataError(f"folder {p} does not exist")
        mask_of = {}
        for m in sorted(self.masks.iterdir()):
            if m.is_file():
                mask_of.setdefault(m.name, m)
                mask_of.setdefault(m.stem, m)
                if m.stem.endswith("_mask"):  # lungVAE naming: <image stem>_mask.png
                    mask_of.setdefault(m.stem[: -len("_mask")], m)
        pairs = []
        for img in sorted(self.images.iterdir()):
            if not img.is_file() or (names is not None and img.name not in names):
                continue
            m = mask_of.get(img.name) or mask_of.get(img.stem)
            if m is not None:
                pairs.append((img, m))
        if not pairs:
            raise EvalDataError(f"no image in {self.images} has a mask of the same name in {self.masks}")
        self.pairs = pairs
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict:
        return {"kind": "masked_image_folder", "images": str(self.images), "masks": str(self.masks), "n": len(self)}

    def __getitem__(self, i: int) -> dict:
        img, m = self.pairs[i]
        raw = load_image(img)
        mask = _load_mask_file(m)
        if mask.shape != raw.shape:
            mask = _resize_mask(mask, raw.shape)
        return {"image": self.transform(raw) if self.transform is not None else raw, "mask": mask, "index": i,
                "name": img.name}


def group_split(groups: Sequence, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test) with every group entirely on one side; about ``test_fraction`` of the groups
    (at least one, and at least one left for training) go to test, chosen by a seeded permutation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    lists = split_units([str(i) for i in range(len(groups))], (1.0 - test_fraction, 0.0, test_fraction), seed,
                        "grouped", groups)
    return [int(i) for i in lists["train"]], [int(i) for i in lists["test"]]


def foreground_flags(dataset) -> list[bool]:
    """Per item of ``dataset`` (possibly a ``Subset``), whether its segmentation ``mask`` has foreground.

    Uses the dataset's ``has_foreground(i)`` when it has one (the synthetic benchmark reads its
    findings, SIIM its run-length codes: no image is decoded), else reads each item's mask."""
    indices = list(range(len(dataset)))
    base = dataset
    while isinstance(base, Subset):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    probe = getattr(base, "has_foreground", None)
    if probe is not None:
        return [bool(probe(i)) for i in indices]
    flags = []
    for i in indices:
        mask = base[i].get("mask")
        if mask is None:
            raise EvalDataError(f"item {i} of {type(base).__name__} has no 'mask'")
        flags.append(bool(np.asarray(mask).any()))
    return flags


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
            mask = _load_mask_file(self.root / row[self._MASK_COLUMNS[self.masks]])
            sample["mask"] = mask if mask.shape == raw.shape else _resize_mask(mask, raw.shape)
        return sample


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
