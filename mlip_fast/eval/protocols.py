"""The field's evaluation protocols as options: CheXpert 5x200 selection, uncertain-label mapping,
train / valid / test splits, balanced negatives, and the split definitions shipped in ``splits/``.

The published numbers of GLoRIA and MGCA come from data prepared by their public preprocessing code
(GLoRIA ``gloria/datasets/preprocess_datasets.py``, MGCA ``mgca/preprocess/{chexpert,rsna,siim}.py``).
What this module reproduces of it, index for index, and where it deliberately differs:

- ``chexpert_5x200(rows, criterion="gloria", per_class=200, seed=0)``: frontal views of CheXpert's
  ``train.csv`` with blanks read as 0 (their ``fillna(0)``); an image qualifies for class c when c is 1
  and each of the other 12 observations GLoRIA checks (the other four of the five plus Enlarged
  Cardiomediastinum, Lung Lesion, Lung Opacity, Pneumonia, Pneumothorax, Pleural Other, Fracture, Support
  Devices; "No Finding" is not checked) is 0 or blank, so an uncertain (-1) observation excludes it.
  ``criterion="five"`` checks only the other four of the five. The draw per class is pandas'
  ``DataFrame.sample(n=per_class, random_state=seed)`` over the candidates in file order (the first
  ``per_class`` entries of ``RandomState(seed).permutation``), i.e. MGCA's ``chexpert_5x200.csv``
  for seed 0 (GLoRIA's own draw was unseeded).
- CheXpert's label cells and the uncertain-label policies (blank -> 0, U-Ones, U-Zeros, GLoRIA / MGCA's
  per-class mapping): ``mlip_fast.data.evaluation.chexpert`` (``chexpert_value``, ``map_uncertain``).
- ``shuffle_split(n, test_fraction, seed)``: scikit-learn's ``train_test_split(range(n),
  test_size=test_fraction, random_state=seed)`` index for index (the legacy ``RandomState``
  permutation; test = its first ``ceil(test_fraction n)`` entries), without depending on scikit-learn.
- ``split_units(units, fractions, seed, method, groups)``: train / valid / test lists.
  ``method="mgca"``: GLoRIA / MGCA's two-stage split (``train_test_split(test_size=valid+test)``, then
  the held-out part split again, its first part becoming test and its second valid), applied to the
  units as given; for RSNA the units are the sorted unique patient ids, exactly their split.
  ``method="grouped"``: a seeded permutation of the sorted unique groups (patients) so that every group
  lies on one side; the default wherever the data has patient ids (GLoRIA / MGCA split SIIM by rows of
  ``train-rle.csv``, so an image with several regions can straddle their splits: ours does not).
- ``group_split(groups, test_fraction, seed)``: (train, test) indices keeping each group (patient) on one
  side (``split_units(method="grouped")`` without a validation part).
- ``balanced_negatives(positive, seed)``: every positive plus as many negatives drawn without
  replacement (GLoRIA / MGCA's SIIM segmentation training set; their draw uses numpy's global state, so
  the exact images differ).
- ``load_split_definition(name)`` / ``materialise_split(definition, units, ...)``: the shipped JSON
  definitions (procedure, seed, source file, what they reproduce) and the list files they expand to.

Split files (``mlip_fast.split/1``)::

    {"format": "mlip_fast.split/1", "name": "rsna_pneumonia", "description": "...",
     "source": {"file": "stage_2_train_labels.csv", "unit": "patientId", "group": "patient"},
     "procedure": {"method": "mgca", "fractions": [0.7, 0.15, 0.15], "seed": 0},
     "reproduces": "...", "lists": null | {"train": [...], "valid": [...], "test": [...]},
     "labels": {unit: label} (CheXpert 5x200 only), "counts": {...}, "source_sha256": "..."}

A definition ships with ``lists: null`` when the data cannot be redistributed; ``materialise_split``
fills the lists from one's own copy of the data (deterministic: the same file gives the same lists) and
records the source file's SHA-256, so two users can compare their copies.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from mlip_fast.data.evaluation.chexpert import chexpert_value
from mlip_fast.data.labels import CHEXPERT5, GLORIA_5X200_OBSERVATIONS
from mlip_fast.data.readers import EvalDataError

__all__ = [
    "SELECTION_CRITERIA",
    "SPLIT_METHODS",
    "SPLIT_NAMES",
    "SPLIT_DIR",
    "SPLIT_FORMAT",
    "DEFAULT_FRACTIONS",
    "chexpert_5x200",
    "shuffle_split",
    "split_units",
    "group_split",
    "balanced_negatives",
    "load_split_definition",
    "list_split_definitions",
    "materialise_split",
    "source_units",
    "file_sha256",
    "main",
]

SELECTION_CRITERIA = ("gloria", "five")
SPLIT_METHODS = ("grouped", "mgca")
SPLIT_NAMES = ("train", "valid", "test")
DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)
SPLIT_DIR = Path(__file__).resolve().parent / "splits"
SPLIT_FORMAT = "mlip_fast.split/1"
_GROUP_SALT = 0x5B17  # mixes into the grouped split's seed (the draw of ``data.group_split`` before it)


def chexpert_5x200(rows: Sequence[Mapping], *, criterion: str = "gloria", per_class: int = 200, seed: int = 0,
                   frontal_only: bool = True, where: str = "train.csv") -> list[dict]:
    """Select CheXpert 5x200 from the rows of CheXpert's ``train.csv`` (see the module doc).

    Returns ``per_class`` entries ``{"path", "label"}`` per class of ``CHEXPERT5``, in that class order
    and, within a class, in the order pandas' ``sample`` returns them. Raises ``EvalDataError`` for
    missing columns or a class with fewer than ``per_class`` qualifying images (naming the counts)."""
    if criterion not in SELECTION_CRITERIA:
        raise ValueError(f"criterion must be one of {SELECTION_CRITERIA}, got {criterion!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    checked = GLORIA_5X200_OBSERVATIONS if criterion == "gloria" else CHEXPERT5
    need = ["Path", *checked] + (["Frontal/Lateral"] if frontal_only else [])
    missing = [c for c in need if rows and c not in rows[0]]
    if not rows or missing:
        raise EvalDataError(f"{where}: {'no rows' if not rows else f'missing column(s) {missing}'}; "
                            f"the {criterion!r} criterion reads {need}")
    candidates: dict[str, list[str]] = {c: [] for c in CHEXPERT5}
    for line, r in enumerate(rows, 2):
        if frontal_only and r["Frontal/Lateral"] != "Frontal":
            continue
        try:
            values = {c: chexpert_value(r[c]) for c in checked}
        except EvalDataError as err:
            raise EvalDataError(f"{where}: line {line}: {err}") from None
        for c in CHEXPERT5:
            if values[c] == 1.0 and all(values[o] == 0.0 for o in checked if o != c):
                candidates[c].append(r["Path"])
    short = {c: len(v) for c, v in candidates.items() if len(v) < per_class}
    if short:
        raise EvalDataError(f"{where}: too few images qualify under the {criterion!r} criterion "
                            f"(need {per_class} per class): {short}")
    out = []
    for c in CHEXPERT5:
        chosen = np.random.RandomState(seed).permutation(len(candidates[c]))[:per_class]
        out.extend({"path": candidates[c][k], "label": c} for k in chosen.tolist())
    return out


def shuffle_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) index arrays of scikit-learn's ``train_test_split(range(n), test_size=test_fraction,
    random_state=seed)``: test = the first ``ceil(test_fraction n)`` entries of
    ``RandomState(seed).permutation(n)``, train = the rest, both in permutation order."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    n_test = math.ceil(test_fraction * n)
    if n_test == 0 or n_test >= n:
        raise EvalDataError(f"a split of {n} item(s) with test fraction {test_fraction} leaves an empty side")
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def _check_fractions(fractions) -> tuple[float, float, float]:
    f = tuple(float(x) for x in fractions)
    if len(f) != 3 or any(x < 0 for x in f) or f[0] <= 0 or f[2] <= 0 or abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be (train > 0, valid >= 0, test > 0) summing to 1, got {fractions}")
    return f


def split_units(units: Sequence[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                method: str = "grouped", groups: Optional[Sequence] = None) -> dict[str, list[str]]:
    """Train / valid / test lists of ``units`` (see the module doc).

    ``grouped``: the sorted unique ``groups`` (default: each unit its own group) are permuted with
    ``numpy.random.default_rng([seed, 0x5B17])``; the first ``round(f_test G)`` go to test, the next
    ``round(f_valid G)`` to valid (each at least 1 when its fraction is > 0), the rest to train; units
    keep their given order within a split. ``mgca``: ``shuffle_split`` twice on the units as given
    (``groups`` must be None: the units are the split's items); lists in permutation order."""
    f_train, f_valid, f_test = _check_fractions(fractions)
    units = [str(u) for u in units]
    if len(set(units)) != len(units):
        raise EvalDataError("split units must be unique (pass the repeated key as groups)")
    if method == "mgca":
        if groups is not None:
            raise ValueError("method 'mgca' splits the units as given; group them first (e.g. unique patient ids)")
        train, held = shuffle_split(len(units), f_valid + f_test, seed)
        if f_valid == 0:
            test, valid = held, np.zeros(0, dtype=np.int64)
        else:
            test, valid = shuffle_split(len(held), f_valid / (f_valid + f_test), seed)
            test, valid = held[test], held[valid]
        return {"train": [units[i] for i in train], "valid": [units[i] for i in valid],
                "test": [units[i] for i in test]}
    if method != "grouped":
        raise ValueError(f"split method must be one of {SPLIT_METHODS}, got {method!r}")
    keys = [str(g) for g in (units if groups is None else groups)]
    if len(keys) != len(units):
        raise ValueError(f"groups has {len(keys)} entries for {len(units)} units")
    unique = sorted(set(keys))
    parts = 2 + (f_valid > 0)
    if len(unique) < parts:
        raise EvalDataError(f"a train / valid / test split needs at least {parts} groups, got {len(unique)}")
    order = np.random.default_rng([int(seed), _GROUP_SALT]).permutation(len(unique))
    n_test = max(1, int(round(f_test * len(unique))))
    n_valid = max(1, int(round(f_valid * len(unique)))) if f_valid > 0 else 0
    while n_test + n_valid > len(unique) - 1:  # keep one group for training
        if n_valid > 1 and n_valid >= n_test:
            n_valid -= 1
        elif n_test > 1:
            n_test -= 1
        else:
            break
    side = {}
    for rank, k in enumerate(order.tolist()):
        side[unique[k]] = "test" if rank < n_test else "valid" if rank < n_test + n_valid else "train"
    out: dict[str, list[str]] = {s: [] for s in SPLIT_NAMES}
    for u, k in zip(units, keys):
        out[side[k]].append(u)
    return out


def group_split(groups: Sequence, test_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, test) with every group entirely on one side; about ``test_fraction`` of the groups
    (at least one, and at least one left for training) go to test, chosen by a seeded permutation."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    lists = split_units([str(i) for i in range(len(groups))], (1.0 - test_fraction, 0.0, test_fraction), seed,
                        "grouped", groups)
    return [int(i) for i in lists["train"]], [int(i) for i in lists["test"]]


def balanced_negatives(positive: Sequence[bool], seed: int) -> list[int]:
    """Sorted indices of every positive item plus ``min(#positives, #negatives)`` negatives drawn
    without replacement with ``numpy.random.default_rng([seed, 0xBA1])``."""
    flags = np.asarray(positive, dtype=bool)
    pos = np.flatnonzero(flags)
    neg = np.flatnonzero(~flags)
    if pos.size == 0:
        raise EvalDataError(f"balanced negatives need at least one positive item; all {flags.size} are negative")
    take = min(pos.size, neg.size)
    chosen = np.random.default_rng([int(seed), 0xBA1]).choice(neg, size=take, replace=False) if take else neg[:0]
    return sorted(int(i) for i in np.concatenate([pos, chosen]))


def list_split_definitions() -> list[str]:
    """Names of the shipped split definitions (files in ``mlip_fast/eval/splits/``)."""
    return sorted(p.stem for p in SPLIT_DIR.glob("*.json"))


def _check_definition(record: dict, where: str) -> dict:
    if record.get("format") != SPLIT_FORMAT:
        raise EvalDataError(f"{where} is not a split file (format {record.get('format')!r}, expected {SPLIT_FORMAT!r})")
    missing = [k for k in ("name", "source", "procedure", "lists") if k not in record]
    if missing:
        raise EvalDataError(f"{where}: missing key(s) {missing}")
    proc = record["procedure"]
    method = proc.get("method")
    if method not in SPLIT_METHODS + ("chexpert_5x200",):
        raise EvalDataError(f"{where}: unknown procedure.method {method!r}")
    if method != "chexpert_5x200":
        _check_fractions(proc.get("fractions", ()))
    lists = record["lists"]
    if lists is not None:
        if not isinstance(lists, dict) or not set(lists) <= set(SPLIT_NAMES):
            raise EvalDataError(f"{where}: 'lists' must map {SPLIT_NAMES} to lists of ids")
        seen: dict[str, str] = {}
        for split, ids in lists.items():
            for u in ids:
                if u in seen:
                    raise EvalDataError(f"{where}: {u!r} is in both {seen[u]!r} and {split!r}")
                seen[u] = split
    return record


def load_split_definition(name_or_path: str | os.PathLike) -> dict:
    """A split definition or list file: a shipped name (``list_split_definitions()``) or a path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = SPLIT_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise EvalDataError(f"split file {name_or_path!r} not found; shipped: {list_split_definitions()}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise EvalDataError(f"split file {path} is not valid JSON: {err}") from None
    return _check_definition(record, str(path))


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def materialise_split(definition: Mapping, units: Sequence[str], *, groups: Optional[Sequence] = None,
                      source: Optional[str | os.PathLike] = None, labels: Optional[Mapping] = None) -> dict:
    """The definition with its ``lists`` filled from ``units`` by its procedure (``split_units``), the
    counts, and the SHA-256 of ``source`` (the file the units came from). A definition that already
    holds lists is checked instead: its ids must all be among ``units``."""
    record = copy.deepcopy(dict(definition))
    proc = record["procedure"]
    if record.get("lists") is not None:
        known = set(map(str, units))
        absent = [u for ids in record["lists"].values() for u in ids if u not in known]
        if absent:
            raise EvalDataError(f"split {record['name']!r}: {len(absent)} listed id(s) are not in the data, "
                                f"e.g. {absent[:3]} (a different copy or version of the data?)")
    elif proc["method"] == "chexpert_5x200":
        raise ValueError("CheXpert 5x200 lists come from chexpert_5x200(), not from units")
    else:
        record["lists"] = split_units(units, proc["fractions"], proc["seed"], proc["method"], groups)
    if labels is not None:
        record["labels"] = {str(k): v for k, v in labels.items()}
    record["counts"] = {s: len(v) for s, v in record["lists"].items()}
    if source is not None:
        record["source_sha256"] = file_sha256(source)
    return record


def _csv_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise EvalDataError(f"{path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        reader.fieldnames = [n.strip() for n in (reader.fieldnames or [])]  # SIIM's " EncodedPixels"
        return list(reader)


def _column(rows: list[dict], path: Path, name: str) -> list[str]:
    if not rows or name not in rows[0]:
        raise EvalDataError(f"{path}: no column {name!r}" + (f"; found {sorted(rows[0])}" if rows else " (no rows)"))
    return [r[name].strip() for r in rows]


def source_units(name: str, path: str | os.PathLike) -> tuple[list[str], Optional[list[str]], Path]:
    """(units, groups or None, source file) of a shipped definition's data at ``path``:
    ``rsna_pneumonia``: the sorted unique ``patientId`` of ``stage_2_train_labels.csv``;
    ``siim_pneumothorax``: the unique ``ImageId`` of ``train-rle.csv`` in order of appearance;
    ``covid_chestxray``: ``filename`` of the folder's ``staged_images.csv``, grouped by ``patientid``."""
    path = Path(path)
    if name == "rsna_pneumonia":
        return sorted(set(_column(_csv_rows(path), path, "patientId"))), None, path
    if name == "siim_pneumothorax":
        return list(dict.fromkeys(_column(_csv_rows(path), path, "ImageId"))), None, path
    if name == "covid_chestxray":
        source = path / "staged_images.csv" if path.is_dir() else path
        rows = _csv_rows(source)
        return _column(rows, source, "filename"), _column(rows, source, "patientid"), source
    raise EvalDataError(f"no unit reader for split {name!r}; readers: rsna_pneumonia, siim_pneumothorax, "
                        f"covid_chestxray (chexpert5x200 is a selection: pass its train.csv)")


def _materialise_named(definition: dict, data: Path) -> dict:
    proc = definition["procedure"]
    if proc["method"] == "chexpert_5x200":
        selection = chexpert_5x200(_csv_rows(data), criterion=proc["criterion"], per_class=proc["per_class"],
                                   seed=proc["seed"], frontal_only=proc["frontal_only"], where=str(data))
        record = copy.deepcopy(definition)
        record["lists"] = {"test": [s["path"] for s in selection]}
        return materialise_split(record, record["lists"]["test"], source=data,
                                 labels={s["path"]: s["label"] for s in selection})
    units, groups, source = source_units(definition["name"], data)
    return materialise_split(definition, units, groups=groups, source=source)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mlip_fast.eval.protocols NAME --data PATH --out FILE``: expand a shipped split
    definition into its lists from one's own copy of the data (deterministic)."""
    p = argparse.ArgumentParser(prog="python -m mlip_fast.eval.protocols",
                                description="Write the train / valid / test lists of a split definition.")
    p.add_argument("name", help=f"shipped definition ({', '.join(list_split_definitions())}) or a split file path")
    p.add_argument("--data", required=True, help="the definition's source file (e.g. stage_2_train_labels.csv, "
                                                 "train-rle.csv, CheXpert's train.csv) or the covid folder")
    p.add_argument("--out", required=True, help="list file to write (JSON)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    args = p.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not args.force:
            raise EvalDataError(f"{out} exists; pass --force to overwrite it")
        record = _materialise_named(load_split_definition(args.name), Path(args.data))
    except EvalDataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"{record['name']}: " + ", ".join(f"{k} {v}" for k, v in record["counts"].items()) + f" -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
