"""What every dataset reader shares: the item contract, reading index files (CSV / JSONL), bad-item
bookkeeping (:class:`RobustDataset`) and the errors. The readers: pre-training pairs in
:mod:`mlip_fast.data.pretrain`, evaluation sets in :mod:`mlip_fast.data.evaluation`.

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
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mlip_fast._cli import no_bar
from mlip_fast.preprocess.images import ImageLoadError, load_image

__all__ = ["BadSampleWarning", "DatasetError", "EvalDataError", "SampleError", "RobustDataset", "IMAGE_EXTENSIONS", "TABLE_ENCODING", "report_problem", "read_table", "require_columns", "label_value", "resolve_path", "resolve_inside", "index_images", "apply_transform", "load_mask_file", "resize_mask"]

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


class EvalDataError(ValueError):
    """The evaluation data cannot serve the task (no labels, empty class, missing masks, no samples)."""


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


def read_table(path: Path, keep_undecodable: bool = False) -> list[dict]:
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


def require_columns(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
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


def label_value(value) -> float:
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


def resolve_path(root: Path, value: str) -> Path:
    """Path policy of index files written by the user (a master.csv, a CSV / JSONL manifest): an image path is
    the user's choice, like ``--data`` itself, so it may be absolute or relative to ``root`` (the file's folder or
    ``--image-root``), ``..`` included. What is read from it is decoded as an image only (never run, never copied
    into text), and nothing is written there. Files that come with a folder of data instead (a shard index) are
    held to the folder: :func:`resolve_inside`."""
    p = Path(value)
    return p if p.is_absolute() else root / p


def resolve_inside(root: Path, value, what: str) -> Path:
    """Path policy of files that belong to a data folder (the shards and reports a shard ``index.json`` lists):
    ``value`` must be a relative path without ``..`` that, symlinks followed, stays inside ``root``. Raises
    :class:`DatasetError` naming ``what`` (e.g. "index.json: shard path") and the path otherwise, so that an
    index copied from elsewhere cannot make a run read (and put in its tokenizer, its records or its uploads)
    a file outside the folder."""
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{what} {value!r} is not a path")
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        raise DatasetError(f"{what} {value!r} leaves the data folder {root} (absolute paths and '..' are refused)")
    real_root = Path(root).resolve()
    target = (Path(root) / relative).resolve()
    if target != real_root and real_root not in target.parents:
        raise DatasetError(f"{what} {value!r} resolves to {target}, outside the data folder {real_root} (a symlink "
                           f"out of the folder is refused)")
    return Path(root) / relative


def index_images(folder: Path) -> dict[str, Path]:
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


def apply_transform(transform, image: np.ndarray, mask: np.ndarray):
    if transform is None:
        return torch.from_numpy(image)[None], torch.from_numpy(mask)
    return transform(image, mask=mask)


def load_mask_file(path: Path) -> np.ndarray:
    return load_image(path) >= 0.5


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to ``shape`` (masks made at another resolution)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(img) >= 128


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
        for i in tqdm(range(self._n), desc=f"validating {self.name}", disable=no_bar(progress), leave=False):
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
