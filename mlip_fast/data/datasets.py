"""Dataset readers: pre-training pairs (prepared MIMIC-CXR, Open-I, CSV/JSONL manifests) and
evaluation sets (CheXpert 5x200, RSNA pneumonia, SIIM-ACR pneumothorax, class-folder images).

Every dataset yields dicts:
```
image   float32 [C, S, S]   after the transform (absent in Open-I report-only mode)
report  str                 findings + impression (pre-training sets)
labels  float32 [L]         1 / 0, NaN = unknown (when the set has labels; names in .label_names)
mask    bool [S, S]         segmentation sets (SIIM; RSNA with boxes=True)
index   int                 the dataset index actually delivered (see "Bad input")
```

Bad input. Index files are read as UTF-8 (a byte-order mark is allowed) with no field-size limit. A row
that cannot be used is dropped when the dataset is built, counted, and named by file and line with the
reason: bytes that are not valid UTF-8, an empty report, or a report with no letter or digit (no sentence
the text tower could pool). An image that is missing, corrupt or unreadable is found when its item is
read: the item is flagged, a ``BadSampleWarning`` names the file, and the next good item is delivered
instead, so an epoch never stops on one bad file. Flags live in shared memory, so DataLoader workers count
together. When more than ``max_bad_fraction`` (default 1%) of a dataset is bad (already at construction
when the dropped rows alone exceed it), a ``DatasetError`` names every bad row and file with its reason.
``skipped()`` lists them all; ``validate()`` checks every item eagerly (with a progress bar) and raises the
same error. Columns missing from a CSV / JSONL fail at construction with their names.
"""
from __future__ import annotations

import csv
import json
import math
import os
import sys
import tarfile
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mlip_fast.preprocess.images import ImageLoadError, load_image
from mlip_fast.preprocess.reports import extract_sections, report_text

from .labels import CHEXPERT5, CHEXPERT_LABELS, RSNA_LABELS, SIIM_LABELS

__all__ = [
    "BadSampleWarning",
    "DatasetError",
    "RobustDataset",
    "PretrainDataset",
    "ManifestDataset",
    "OpenIDataset",
    "CheXpert5x200Dataset",
    "build_chexpert_5x200",
    "RSNAPneumoniaDataset",
    "SIIMPneumothoraxDataset",
    "ImageFolderDataset",
    "rle_decode",
    "rle_encode",
    "IMAGE_EXTENSIONS",
    "TABLE_ENCODING",
    "report_problem",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".gif", ".webp")


class DatasetError(RuntimeError):
    """A dataset cannot be used: too many bad items, or a malformed index file."""


class BadSampleWarning(UserWarning):
    """One item of a dataset was skipped (the message names the file and the reason)."""


class SampleError(Exception):
    """Raised by a dataset's item loader for a bad item; ``source`` names the file."""

    def __init__(self, source: str, reason: str):
        self.source, self.reason = source, reason
        super().__init__(f"{source}: {reason}")


# Index files are text in this encoding (a UTF-8 byte-order mark, as Excel writes, is skipped).
TABLE_ENCODING = "utf-8-sig"
# csv's default field limit (131,072 characters) would stop on one long report; reports have no natural limit.
_CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class _Row(dict):
    """One row of an index file: ``line`` is its first line in the file (1-based); ``problem`` says why its
    bytes are not valid UTF-8 (its text then holds U+FFFD in their place), else None."""

    __slots__ = ("line", "problem")

    def __init__(self, values=(), line: int = 0, problem: str | None = None):
        super().__init__(values)
        self.line, self.problem = line, problem


def _bad_utf8(value: str) -> str | None:
    """Where a string read with ``surrogateescape`` holds a byte that is not UTF-8 (None when it does not)."""
    if not any("\udc80" <= ch <= "\udcff" for ch in value):
        return None
    raw = value.encode("utf-8", "surrogateescape")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8: byte 0x{raw[err.start]:02x} at byte {err.start}"
    return None


def _undecodable(row: dict) -> str | None:
    """Why a row read with ``surrogateescape`` is not UTF-8 text (None when it is); the offending values are
    replaced in place by their U+FFFD-decoded text."""
    problem = None
    for column, value in row.items():
        bad = _bad_utf8(value) if isinstance(value, str) else None
        if bad is not None:
            problem = problem or f"{bad} of column {column!r}"
            row[column] = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return problem


def _read_table(path: Path, keep_undecodable: bool = False) -> list[dict]:
    """Rows of a CSV (any other suffix) or JSONL / JSON-lines (``.jsonl``, ``.json``) file, as ``_Row``
    dicts that know their line.

    A row holding bytes that are not UTF-8 raises ``DatasetError`` naming the file and line, unless
    ``keep_undecodable``: it is then returned with ``problem`` set, for the caller to skip and report.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"index file not found: {path}")
    rows: list[dict] = []

    def keep(row: _Row) -> None:
        if row.problem is not None and not keep_undecodable:
            raise DatasetError(f"{path} line {row.line}: {row.problem}")
        rows.append(row)

    if path.suffix.lower() in (".jsonl", ".json"):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                text = raw.decode(TABLE_ENCODING if line_no == 1 else "utf-8", "surrogateescape")
                problem = _bad_utf8(text)
                text = raw.decode("utf-8", "replace") if problem else text
                if not text.strip():
                    continue
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    raise DatasetError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
                if not isinstance(value, dict):
                    raise DatasetError(f"{path}: line {line_no} is not a JSON object")
                keep(_Row(value, line_no, problem))
        return rows
    old_limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    try:
        with open(path, newline="", encoding=TABLE_ENCODING, errors="surrogateescape") as f:
            reader = csv.DictReader(f)
            # Some public CSVs have padded headers (SIIM's " EncodedPixels").
            names = [name.strip() for name in (reader.fieldnames or [])]
            if _undecodable(dict(enumerate(names))):
                raise DatasetError(f"{path} line 1: the header is not valid UTF-8 text")
            reader.fieldnames = names
            previous = reader.line_num
            for record in reader:
                row = _Row(record, previous + 1)
                row.problem = _undecodable(row)
                previous = reader.line_num
                keep(row)
    finally:
        csv.field_size_limit(old_limit)
    return rows


def _require_columns(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    present = set(rows[0]) if rows else set()
    if not rows and path.suffix.lower() not in (".jsonl", ".json"):
        with open(path, newline="", encoding=TABLE_ENCODING, errors="replace") as f:
            present = {name.strip() for name in (next(csv.reader(f), []) or [])}
    missing = [c for c in columns if c not in present]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {missing}; found {sorted(present)}")


def report_problem(text: str) -> str | None:
    """Why a report cannot train the text tower, or None when it can: empty, or without any letter or digit.
    The second is exactly "no sentence": ``split_sentences`` keeps a span iff it holds a letter or digit."""
    if not text or not text.strip():
        return "empty report"
    if not any(ch.isalnum() for ch in text):
        return f"report has no letter or digit ({text[:40]!r})"
    return None


def _label_value(value) -> float:
    """1 / 0 from CSV-ish values; blank, NaN, -1 (CheXpert's uncertain) and anything else -> NaN."""
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return float(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if v in (0.0, 1.0) else math.nan


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


class RobustDataset(torch.utils.data.Dataset):
    """Base class: bad-item bookkeeping, replacement on read, eager validation.

    Subclasses set ``self._n`` (number of items) and implement ``_load(i) -> dict`` (raising
    ``SampleError`` or ``ImageLoadError`` for a bad item) and ``_source(i) -> str`` (the file that
    item reads, for messages). ``label_names`` lists the label columns of ``labels``.
    """

    label_names: tuple[str, ...] = ()

    def __init__(self, n: int, max_bad_fraction: float = 0.01, dropped: Sequence[tuple[str, str]] = (),
                 name: str = ""):
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        self._n = int(n)
        self.max_bad_fraction = float(max_bad_fraction)
        self.name = name or type(self).__name__
        # Shared memory: DataLoader workers see and update the same flags.
        self._bad = torch.zeros(max(self._n, 1), dtype=torch.uint8).share_memory_()
        # Reasons of the items this process flagged (a worker's reasons stay in the worker; see skipped()).
        self._reasons: dict[int, str] = {}
        #: rows left out at construction (e.g. ``"/data/m.csv line 9 (/data/img/9.png)"``) and why
        self.dropped = [str(where) for where, _ in dropped]
        self.dropped_reasons = [str(reason) for _, reason in dropped]
        if self.dropped:
            shown = "; ".join(f"{w}: {r}" for w, r in zip(self.dropped[:3], self.dropped_reasons))
            shown += " ..." if len(self.dropped) > 3 else ""
            warnings.warn(f"{self.name}: skipped {len(self.dropped)} row(s) that cannot be used ({shown})",
                          BadSampleWarning, stacklevel=3)
        if self._n == 0 and not self.dropped:
            raise DatasetError(f"{self.name}: the dataset is empty")
        self._check_share()

    def __len__(self) -> int:
        return self._n

    # -- subclass interface
    def _load(self, i: int) -> dict:
        raise NotImplementedError

    def _source(self, i: int) -> str:
        raise NotImplementedError

    # -- bookkeeping
    @property
    def bad_count(self) -> int:
        """Items found bad so far (all workers), plus rows dropped at construction."""
        return int(self._bad[: self._n].sum()) + len(self.dropped)

    def bad_items(self) -> list[int]:
        """Indices of items flagged bad so far."""
        return torch.nonzero(self._bad[: self._n]).flatten().tolist()

    def mark_bad(self, indices: Sequence[int]) -> None:
        """Flags items found bad by another process (e.g. another rank) without reading them."""
        for i in indices:
            self._bad[int(i)] = 1

    def source_of(self, i: int) -> str:
        """The file item ``i`` reads (for messages)."""
        return self._source(i)

    def probe(self, i: int) -> str | None:
        """Reads item ``i`` once: None when it loads, else why it cannot be used."""
        try:
            self._load(i)
        except (SampleError, ImageLoadError) as err:
            return err.reason
        return None

    def skipped(self, reprobe: bool = True) -> list[dict]:
        """Every row and item left out so far: ``[{"source", "reason"}]``, construction drops first.

        Items flagged in DataLoader workers have their reason only there: with ``reprobe`` they are read
        again here to name it (only the bad items, so this is cheap)."""
        out = [{"source": w, "reason": r} for w, r in zip(self.dropped, self.dropped_reasons)]
        for i in self.bad_items():
            reason = self._reasons.get(i) or (self.probe(i) if reprobe else None)
            out.append({"source": self._source(i), "reason": reason or "unreadable when it was read (reads now)"})
        return out

    def bad_summary(self, reprobe: bool = False) -> str:
        """One line: the share of bad items and every one of them with its reason."""
        total = self._n + len(self.dropped)
        items = "; ".join(f"{s['source']}: {s['reason']}" for s in self.skipped(reprobe=reprobe))
        return (f"{self.name}: {self.bad_count} of {total} items are bad "
                f"({100.0 * self.bad_count / max(total, 1):.2f}% > max_bad_fraction "
                f"{100.0 * self.max_bad_fraction:.2f}%): {items}")

    def _check_share(self) -> None:
        total = self._n + len(self.dropped)
        if total and self.bad_count > self.max_bad_fraction * total:
            raise DatasetError(self.bad_summary())

    def _flag(self, i: int, err: Exception) -> None:
        if not self._bad[i]:
            self._bad[i] = 1
            reason = err.reason if isinstance(err, (SampleError, ImageLoadError)) else f"{type(err).__name__}: {err}"
            self._reasons[i] = reason
            warnings.warn(f"{self.name}: skipping item {i} ({self._source(i)}): {reason} "
                          f"[{self.bad_count} bad so far]", BadSampleWarning, stacklevel=3)
        self._check_share()

    def __getitem__(self, index: int) -> dict:
        if not -self._n <= index < self._n:
            raise IndexError(f"{self.name}: index {index} out of range for {self._n} items")
        index %= self._n
        for step in range(self._n):
            j = (index + step) % self._n
            if self._bad[j]:
                continue
            try:
                item = self._load(j)
            except (SampleError, ImageLoadError) as err:
                self._flag(j, err)
                continue
            item["index"] = j
            return item
        raise DatasetError(f"{self.name}: no readable item left")

    def validate(self, progress: bool = True, check: Callable[[int], None] | None = None) -> dict:
        """Read every item once (images decoded, reports checked), flag the bad ones and raise
        ``DatasetError`` if more than ``max_bad_fraction`` are bad.

        Returns:
            ``{"n": items, "bad": count, "bad_files": [...]}``.
        """
        probe = check or self._load
        for i in tqdm(range(self._n), desc=f"validating {self.name}", disable=not progress, leave=False):
            if self._bad[i]:
                continue
            try:
                probe(i)
            except (SampleError, ImageLoadError) as err:
                self._flag(i, err)
        return {"n": self._n, "bad": self.bad_count, "bad_files": [s["source"] for s in self.skipped(reprobe=False)]}

    # -- shared helpers
    @staticmethod
    def _image(path: Path, transform) -> torch.Tensor:
        # The size hint lets large JPEGs decode at a reduced scale.
        image = load_image(path, max_side=getattr(transform, "image_size", None))
        return torch.from_numpy(image)[None] if transform is None else transform(image)


class _PairDataset(RobustDataset):
    """Image-report pairs from records ``{image_path, report, labels, source, where}`` (``where``: the file
    and line of the row, for messages). Records whose report cannot be used (``report_problem``) are dropped
    here, after ``dropped`` (rows the reader already left out)."""

    def __init__(self, records, transform, label_names, max_bad_fraction, name, require_image=True, dropped=()):
        kept, dropped = [], list(dropped)
        for rec in records:
            problem = report_problem(rec["report"])
            if problem is None:
                kept.append(rec)
            else:
                where = rec.get("where", rec["source"])
                image = f" ({rec['image_path']})" if rec.get("image_path") is not None else ""
                dropped.append((f"{where}{image}", problem))
        self.records = kept
        self.transform = transform
        self.label_names = tuple(label_names)
        self.require_image = require_image
        super().__init__(len(kept), max_bad_fraction, dropped, name)

    def _source(self, i: int) -> str:
        return str(self.records[i]["source"])

    def _load(self, i: int) -> dict:
        rec = self.records[i]
        item = {"report": rec["report"]}
        if self.require_image:
            item["image"] = self._image(rec["image_path"], self.transform)
        if self.label_names:
            item["labels"] = torch.tensor(rec["labels"], dtype=torch.float32)
        item.update(rec.get("extra", {}))
        return item


class PretrainDataset(_PairDataset):
    """Image-report pairs from a prepared MIMIC-CXR ``master.csv`` (also what ``mlip_fast.data.synth``
    writes).

    Args:
        master_csv: CSV with columns ``image_path`` (relative to ``root``), ``findings``, ``impression``,
            and ``split`` when ``split`` is given.
        root: folder the image paths are relative to (default: the CSV's folder).
        split: keep only rows of this split ("train", "valid", "test"); None keeps all.
        transform: ``ImageTransform`` (or any callable on a [H, W] float array); None gives
            ``[1, H, W]`` tensors of the raw image.
        label_names: label columns to return; "auto" = those of ``CHEXPERT_LABELS`` (CheXpert's 14
            names, which include Pneumonia) present in the CSV; () = no labels.
        max_bad_fraction: share of bad items tolerated.
        extra_columns: CSV columns passed through as strings under their own key (e.g. the synthetic
            benchmark's ``findings_json``, the ground truth for localisation).
    """

    def __init__(self, master_csv, root=None, split: str | None = "train", transform=None,
                 label_names: Sequence[str] | str = "auto", max_bad_fraction: float = 0.01,
                 extra_columns: Sequence[str] = ()):
        master_csv = Path(master_csv)
        rows = _read_table(master_csv, keep_undecodable=True)
        _require_columns(master_csv, rows, ["image_path", "findings", "impression", *extra_columns]
                         + (["split"] if split else []))
        root = Path(root) if root is not None else master_csv.parent
        if label_names == "auto":
            present = set(rows[0]) if rows else set()
            label_names = [c for c in CHEXPERT_LABELS if c in present]
        else:
            _require_columns(master_csv, rows, list(label_names))
        if split:
            splits = {r["split"] for r in rows}
            rows = [r for r in rows if r["split"] == split]
            if not rows:
                raise DatasetError(f"{master_csv}: no rows with split == {split!r}; splits present: {sorted(splits)}")
        undecodable = [(f"{master_csv} line {r.line}", r.problem) for r in rows if r.problem is not None]
        rows = [r for r in rows if r.problem is None]
        records = [
            {
                "image_path": _resolve(root, r["image_path"]),
                "report": report_text(r["findings"], r["impression"]),
                "labels": [_label_value(r.get(c)) for c in label_names],
                "source": str(_resolve(root, r["image_path"])),
                "where": f"{master_csv} line {r.line}",
                "extra": {c: r[c] for c in extra_columns},
            }
            for r in rows
        ]
        self.rows = rows
        super().__init__(records, transform, label_names, max_bad_fraction, f"PretrainDataset({master_csv.name})",
                         dropped=undecodable)


class ManifestDataset(_PairDataset):
    """Image-report pairs from a generic CSV or JSONL manifest.

    Args:
        manifest: ``.csv`` or ``.jsonl`` / ``.json`` (one JSON object per line).
        root: folder image paths are relative to (default: the manifest's folder).
        image_column, text_column: column names of the image path and the report text.
        label_columns: label columns (values 1 / 0; blank, -1 or anything else = unknown).
        parse_sections: the text is a whole report with headers: keep its findings + impression.
        require_image: False reads reports only (no "image" key), e.g. for text-side work.
    """

    def __init__(self, manifest, root=None, transform=None, image_column: str = "image",
                 text_column: str = "report", label_columns: Sequence[str] = (), parse_sections: bool = False,
                 require_image: bool = True, max_bad_fraction: float = 0.01):
        manifest = Path(manifest)
        rows = _read_table(manifest, keep_undecodable=True)
        _require_columns(manifest, rows, ([image_column] if require_image else []) + [text_column, *label_columns])
        root = Path(root) if root is not None else manifest.parent
        undecodable = [(f"{manifest} line {r.line}", r.problem) for r in rows if r.problem is not None]
        rows = [r for r in rows if r.problem is None]
        records = []
        for r in rows:
            text = r[text_column] if isinstance(r[text_column], str) else ""
            if parse_sections:
                text = report_text(**extract_sections(text))
            else:
                text = " ".join(text.split())
            image_path = _resolve(root, str(r[image_column])) if require_image else None
            records.append({
                "image_path": image_path,
                "report": text,
                "labels": [_label_value(r.get(c)) for c in label_columns],
                "source": str(image_path) if image_path else f"{manifest} line {r.line}",
                "where": f"{manifest} line {r.line}",
            })
        self.rows = rows
        super().__init__(records, transform, label_columns, max_bad_fraction, f"ManifestDataset({manifest.name})",
                         require_image=require_image, dropped=undecodable)


# Open-I MeSH major headings that name each label (first part of a "Term/qualifier" heading).
OPENI_MESH = {
    "Atelectasis": ("Pulmonary Atelectasis", "Atelectasis"),
    "Cardiomegaly": ("Cardiomegaly",),
    "Consolidation": ("Consolidation",),
    "Edema": ("Pulmonary Edema", "Edema"),
    "Pleural Effusion": ("Pleural Effusion",),
    "Pneumothorax": ("Pneumothorax",),
    "Pneumonia": ("Pneumonia",),
}


def read_openi_reports(path) -> list[dict]:
    """Open-I reports as dicts (uid, images, findings, impression, mesh_major list, source) from the
    ``NLMCXR_reports.tgz`` archive, a folder of its XML files, or the derived ``reports.csv``."""
    path = Path(path)
    if path.is_file() and path.suffix == ".csv":
        rows = _read_table(path)
        _require_columns(path, rows, ["uid", "images", "findings", "impression"])
        return [{
            "uid": r["uid"], "images": [x for x in r["images"].split(";") if x],
            "findings": r["findings"], "impression": r["impression"],
            "mesh_major": [x for x in r.get("mesh_major", "").split(";") if x],
            "source": r.get("xml_file") or r["uid"],
        } for r in rows]
    out = []
    if path.is_dir():
        for xml in sorted(path.rglob("*.xml"), key=lambda p: (len(p.name), p.name)):
            out.append(_parse_openi_xml(xml.read_bytes(), xml.name))
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")]
            for m in sorted(members, key=lambda m: (len(m.name), m.name)):
                out.append(_parse_openi_xml(tar.extractfile(m).read(), Path(m.name).name))
    else:
        raise FileNotFoundError(f"Open-I reports not found (expected a .tgz, a folder of XML or reports.csv): {path}")
    return out


def _parse_openi_xml(data: bytes, name: str) -> dict:
    try:
        root = ET.fromstring(data)
    except ET.ParseError as err:
        raise DatasetError(f"Open-I report {name} is not valid XML ({err})") from None
    sections = {el.get("Label", "").upper(): (el.text or "") for el in root.iter("AbstractText")}
    uid = root.find("uId")
    return {
        "uid": uid.get("id") if uid is not None else Path(name).stem,
        "images": [el.get("id") for el in root.iter("parentImage") if el.get("id")],
        "findings": sections.get("FINDINGS", ""),
        "impression": sections.get("IMPRESSION", ""),
        "mesh_major": [el.text or "" for el in root.iter("major")],
        "source": name,
    }


class OpenIDataset(_PairDataset):
    """Indiana University / Open-I pairs: the XML reports plus a folder of PNG images.

    One item per (report, image id) with images ``<image_dir>/<image id>.png`` (e.g. ``CXR1_1_IM-0001-
    3001.png``, the NLMCXR_png layout). With ``image_dir=None`` the set is report-only: one item per
    report, no "image" key (text-side tests and tokenizer training). Labels come from the MeSH major
    headings (``OPENI_MESH``); a report indexed "normal" is 0 for every label.

    Args:
        reports: ``NLMCXR_reports.tgz``, a folder of its XML files, or the derived ``reports.csv``.
        image_dir: folder of PNG images, or None for report-only mode.
        label_names: subset of ``OPENI_MESH`` keys; () for no labels.
    """

    def __init__(self, reports, image_dir=None, transform=None, label_names: Sequence[str] = tuple(OPENI_MESH),
                 image_ext: str = ".png", max_bad_fraction: float = 0.01):
        unknown = [n for n in label_names if n not in OPENI_MESH]
        if unknown:
            raise ValueError(f"unknown Open-I label(s) {unknown}; known: {list(OPENI_MESH)}")
        self.reports = read_openi_reports(reports)
        records = []
        for rep in self.reports:
            heads = {m.split("/")[0].strip().lower() for m in rep["mesh_major"]}
            labels = [float(any(t.lower() in heads for t in OPENI_MESH[n])) for n in label_names]
            text = report_text(rep["findings"], rep["impression"])
            if image_dir is None:
                records.append({"image_path": None, "report": text, "labels": labels, "source": rep["source"]})
                continue
            for image_id in rep["images"]:
                path = Path(image_dir) / f"{image_id}{image_ext}"
                records.append({"image_path": path, "report": text, "labels": labels,
                                "source": str(path) if text else rep["source"]})
        super().__init__(records, transform, label_names, max_bad_fraction, "OpenIDataset",
                         require_image=image_dir is not None)


# ------------------------------------------------------------------------------------ evaluation sets


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
    rows = _read_table(train_csv)
    _require_columns(train_csv, rows, ["Path", *CHEXPERT5])
    rng = np.random.default_rng(seed)
    candidates = {c: [] for c in CHEXPERT5}
    for r in rows:
        if frontal_only and r.get("Frontal/Lateral", "Frontal") != "Frontal":
            continue
        values = {c: _label_value(r[c]) for c in CHEXPERT5}
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
        rows = _read_table(source)
        if rows and "label" in rows[0]:
            _require_columns(source, rows, ["Path", "label"])
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
        return str(_resolve(self.root, self.selection[i]["path"]))

    def _load(self, i: int) -> dict:
        sel = self.selection[i]
        labels = torch.zeros(len(CHEXPERT5))
        labels[CHEXPERT5.index(sel["label"])] = 1.0
        return {"image": self._image(_resolve(self.root, sel["path"]), self.transform), "labels": labels}


def _index_images(folder: Path) -> dict[str, Path]:
    """Map file stem -> path for every image file under ``folder`` (one directory walk)."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    found = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                found.setdefault(stem, Path(dirpath) / name)
    return found


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
        rows = _read_table(labels_csv)
        _require_columns(labels_csv, rows, ["patientId", "Target"] + (["x", "y", "width", "height"] if boxes else []))
        by_patient: dict[str, dict] = {}
        for r in rows:
            entry = by_patient.setdefault(r["patientId"], {"target": 0, "boxes": []})
            if _label_value(r["Target"]) == 1.0:
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
        self.files = _index_images(Path(image_dir))
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
        item["image"], item["mask"] = _apply(self.transform, image, mask)
        return item


def _apply(transform, image: np.ndarray, mask: np.ndarray):
    if transform is None:
        return torch.from_numpy(image)[None], torch.from_numpy(mask)
    return transform(image, mask=mask)


def rle_decode(rle: str, height: int, width: int, relative: bool = True) -> np.ndarray:
    """Decode a SIIM-ACR run-length string to a bool mask ``[height, width]``.

    Pixels are numbered column by column (top to bottom, then left to right). ``relative=True`` is
    ``train-rle.csv``'s encoding: each start is the gap after the end of the previous run (the first
    from pixel 0). ``relative=False`` is the standard Kaggle encoding: 1-based absolute starts.
    "-1" or "" is an empty mask.
    """
    flat = np.zeros(height * width, dtype=bool)
    text = (rle or "").strip()
    if text in ("", "-1"):
        return flat.reshape(width, height).T
    values = np.array(text.split(), dtype=np.int64)
    if values.size % 2:
        raise ValueError(f"RLE has an odd number of values ({values.size})")
    starts, lengths = values[0::2], values[1::2]
    if (lengths < 0).any() or (starts < 0).any():
        raise ValueError("RLE has negative values")
    if relative:
        ends_before = np.concatenate([[0], np.cumsum(starts + lengths)[:-1]])
        starts = ends_before + starts
    else:
        starts = starts - 1
    if starts.size and (starts.min() < 0 or (starts + lengths).max() > flat.size):
        raise ValueError(f"RLE runs fall outside a {height}x{width} image")
    for s, n in zip(starts.tolist(), lengths.tolist()):
        flat[s : s + n] = True
    return flat.reshape(width, height).T


def rle_encode(mask: np.ndarray, relative: bool = True) -> str:
    """Inverse of ``rle_decode`` ("-1" for an empty mask)."""
    flat = np.asarray(mask, dtype=bool).T.reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    starts, ends = changes[0::2], changes[1::2]
    if starts.size == 0:
        return "-1"
    lengths = ends - starts
    if relative:
        prev_end = np.concatenate([[0], ends[:-1]])
        starts = starts - prev_end
    else:
        starts = starts + 1
    return " ".join(f"{s} {n}" for s, n in zip(starts.tolist(), lengths.tolist()))


class SIIMPneumothoraxDataset(RobustDataset):
    """SIIM-ACR Pneumothorax segmentation: ``train-rle.csv`` (ImageId, EncodedPixels; several rows per
    image for several regions, "-1" = none) plus the images (``<ImageId>.dcm`` or PNG anywhere under
    ``image_dir``). Yields ``image``, ``mask`` (union of regions) and ``labels`` [1] ("Pneumothorax").

    Args:
        relative_rle: True for ``train-rle.csv``'s relative runs, False for standard absolute runs.
        image_ids: keep only these images (e.g. a split), in the given order.
    """

    label_names = SIIM_LABELS

    def __init__(self, rle_csv, image_dir, transform=None, relative_rle: bool = True,
                 image_ids: Sequence[str] | None = None, max_bad_fraction: float = 0.01):
        rle_csv = Path(rle_csv)
        rows = _read_table(rle_csv)
        _require_columns(rle_csv, rows, ["ImageId", "EncodedPixels"])
        self.runs: dict[str, list[str]] = {}
        for r in rows:
            runs = self.runs.setdefault(r["ImageId"].strip(), [])
            code = (r["EncodedPixels"] or "").strip()
            if code not in ("", "-1"):
                runs.append(code)
        self.image_ids = list(image_ids) if image_ids is not None else list(self.runs)
        unknown = [i for i in self.image_ids if i not in self.runs]
        if unknown:
            raise DatasetError(f"{rle_csv}: {len(unknown)} image id(s) not in the RLE file, e.g. {unknown[:3]}")
        self.files = _index_images(Path(image_dir))
        self.image_dir = Path(image_dir)
        self.transform = transform
        self.relative_rle = relative_rle
        super().__init__(len(self.image_ids), max_bad_fraction, name="SIIMPneumothorax")

    def _source(self, i: int) -> str:
        iid = self.image_ids[i]
        return str(self.files.get(iid, self.image_dir / f"{iid}.dcm"))

    def _load(self, i: int) -> dict:
        iid = self.image_ids[i]
        if iid not in self.files:
            raise SampleError(self._source(i), "image file not found")
        image = load_image(self.files[iid])
        mask = np.zeros(image.shape, dtype=bool)
        try:
            for code in self.runs[iid]:
                mask |= rle_decode(code, *image.shape, relative=self.relative_rle)
        except ValueError as err:
            raise SampleError(self._source(i), f"bad RLE mask ({err})") from None
        image_t, mask_t = _apply(self.transform, image, mask)
        return {"image": image_t, "mask": mask_t, "labels": torch.tensor([float(bool(self.runs[iid]))])}


class ImageFolderDataset(RobustDataset):
    """Labelled images in class subfolders (``root/<class>/<image>``), one-hot ``labels``.

    Args:
        class_names: the classes in label order (default: the sorted subfolder names); each must be a
            subfolder.
    """

    def __init__(self, root, transform=None, class_names: Sequence[str] | None = None,
                 max_bad_fraction: float = 0.01):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder not found: {root}")
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        names = list(class_names) if class_names is not None else folders
        missing = [c for c in names if c not in folders]
        if missing or not names:
            raise DatasetError(f"{root}: class folder(s) {missing or '(none)'} not found; found {folders}")
        self.label_names = tuple(names)
        self.samples = []
        for k, c in enumerate(names):
            for path in sorted((root / c).rglob("*")):
                if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                    self.samples.append((path, k))
        self.root = root
        self.transform = transform
        super().__init__(len(self.samples), max_bad_fraction, name=f"ImageFolder({root.name})")

    def _source(self, i: int) -> str:
        return str(self.samples[i][0])

    def _load(self, i: int) -> dict:
        path, k = self.samples[i]
        labels = torch.zeros(len(self.label_names))
        labels[k] = 1.0
        return {"image": self._image(path, self.transform), "labels": labels}
