"""Where pre-training pairs come from: ``build_pretrain_dataset(data, split, transform)`` resolves what
``--data`` names (training, the shard writer and the loader benchmark all go through it):

- a shard folder or its ``index.json`` (``python -m mlip_fast.data.shards``): a ``ShardSplit``;
- a folder holding ``master.csv`` (prepared MIMIC-CXR, the synthetic benchmark) or that file itself:
  a ``PretrainDataset``;
- an Open-I folder (XML reports or ``reports.csv``, PNG images): an ``OpenIDataset``;
- a CSV / JSONL manifest (``image``, ``report`` columns): a ``ManifestDataset``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from mlip_fast.data.pretrain import ManifestDataset, OpenIDataset, PretrainDataset
from mlip_fast.data.readers import TABLE_ENCODING, DatasetError

from .shard_reader import ShardSplit, find_index

__all__ = ["DataConfigError", "build_pretrain_dataset", "check_data_exists"]


class DataConfigError(ValueError):
    """``--data`` does not name a usable dataset."""


def check_data_exists(data: str) -> Path:
    """``--data`` as a path that exists; :class:`DataConfigError` saying what it may name otherwise."""
    path = Path(data)
    if not path.exists():
        raise DataConfigError(f"--data {data}: no such file or folder (use 'synthetic', a shard folder, a master.csv, "
                              f"an Open-I folder or a CSV/JSONL manifest)")
    return path


def build_pretrain_dataset(data: str, split: Optional[str], transform, *, image_root: Optional[str] = None,
                           max_bad_fraction: float = 0.01) -> Dataset:
    """The image-report pairs named by ``--data`` (a shard folder or its index, a resolved synthetic
    ``master.csv`` path, a prepared MIMIC-CXR ``master.csv``, an Open-I folder, or a CSV / JSONL manifest).

    ``split`` selects rows of a master.csv (``train`` / ``valid`` / ``test``) or a split of a shard
    folder; manifests and Open-I have no split column and serve every row for ``train`` (evaluation splits
    are then unavailable: None, as is a split that a shard folder lacks).
    """
    path = check_data_exists(data)
    index = find_index(path)
    if index is not None:
        with open(index, encoding="utf-8") as f:
            splits = json.load(f).get("splits", {})
        if split is None or split not in splits:
            if split == "train":
                raise DataConfigError(f"--data {data}: the shard folder has no train split (splits: {sorted(splits)})")
            return None
        return ShardSplit(index, split, transform=transform, max_bad_fraction=max_bad_fraction)
    if path.is_dir():
        if (path / "master.csv").is_file():
            path = path / "master.csv"
        else:
            if split not in ("train", None):
                return None
            reports, images = _openi_layout(path, image_root)
            return OpenIDataset(reports, image_dir=images, transform=transform, max_bad_fraction=max_bad_fraction)
    header = path.open(encoding=TABLE_ENCODING, errors="replace").readline() if path.suffix.lower() == ".csv" else ""
    if path.suffix.lower() == ".csv" and "findings" in header and "impression" in header:
        columns = [c.strip() for c in header.strip().split(",")]
        if "split" not in columns:
            if split not in ("train", None):
                return None
            split = None
        try:
            return PretrainDataset(path, root=image_root, split=split, transform=transform,
                                     max_bad_fraction=max_bad_fraction)
        except DatasetError:
            if split in ("valid", "test"):
                return None
            raise
    if path.suffix.lower() in (".csv", ".jsonl", ".json"):
        if split not in ("train", None):
            return None
        return ManifestDataset(path, root=image_root, transform=transform, max_bad_fraction=max_bad_fraction)
    raise DataConfigError(f"--data {data}: expected a .csv / .jsonl file or a folder, got {path.suffix or 'a file'}")


def _openi_layout(folder: Path, image_root: Optional[str]) -> tuple:
    """(reports, image folder) of an Open-I folder: the reports are ``NLMCXR_reports.tgz``,
    ``reports.csv``, a ``reports/`` (or ``ecgen-radiology/``) folder of XML files, or XML files in the folder
    itself; images are ``--image-root``, else ``images/``, ``NLMCXR_png/`` or the folder itself."""
    reports = next((c for c in (folder / "NLMCXR_reports.tgz", folder / "reports.csv", folder / "reports",
                                folder / "ecgen-radiology") if c.exists()), None)
    if reports is None:
        if not any(folder.glob("*.xml")):
            raise DataConfigError(f"--data {folder}: a folder must hold master.csv (prepared MIMIC-CXR or the synthetic "
                                  f"benchmark) or Open-I reports (NLMCXR_reports.tgz, reports.csv, reports/*.xml)")
        reports = folder
    if image_root is not None:
        images = Path(image_root)
    else:
        images = next((c for c in (folder / "images", folder / "NLMCXR_png") if c.is_dir()), folder)
    if not any(images.glob("*.png")):
        raise DataConfigError(f"--data {folder}: no PNG images in {images} (pass --image-root)")
    return reports, images


