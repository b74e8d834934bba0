"""The evaluation sets of each dataset kind, split by the field's protocols (what the command line runs).

``build_eval_sets(kind, data, task, transform, options) -> EvalSets(train, valid, test, described)``

Every kind yields train / valid / test views; the task scores ``options.split`` (default test; "all"
scores every item; a class-folder ``image-folder`` is scored whole by the tasks that do not train) and, for
few-shot classification and segmentation, trains on train and makes every choice (epoch, linear-probe step) on
valid. The splits (``mlip_fast.eval.protocols``):

| kind | split | source of the lists |
|---|---|---|
| ``synthetic`` | the ``split`` column of ``master.csv`` (generator's 80/10/10) | the benchmark itself |
| ``covid`` | 70/15/15 by patient | shipped ``splits/covid_chestxray.json`` (lists included) |
| ``rsna`` | 70/15/15 by patient, GLoRIA / MGCA's procedure | ``splits/rsna_pneumonia.json`` on ``--data`` |
| ``siim`` | 70/15/15 by image; balanced negatives in train for segmentation | ``splits/siim_pneumothorax.json`` |
| ``chexpert`` | train / valid 85/15 by patient from ``train.csv`` without the CheXpert 5x200 images; test = CheXpert's ``valid.csv`` beside it (as GLoRIA / MGCA) | computed |
| ``chexpert5x200`` | the 1,000 images are the test set (GLoRIA's criterion, MGCA's draw); few-shot tasks split them 70/15/15 by patient | ``splits/chexpert5x200.json`` |
| ``masks`` / ``image-folder`` (class folders) | 70/15/15 by file, seeded | computed |
| ``image-folder`` (train/ valid/ test/ folders, or ``--train-data`` / ``--test-data``) | the folders | the folders (:mod:`mlip_fast.eval.image_folders`) |
| ``shards`` | the splits the shard writer stored (zeroshot and retrieval only) | the shard index |

``options.fractions`` / ``method`` / ``split_seed`` override a definition's procedure (the lists are then
recomputed from the data); ``options.split_file`` replaces the shipped definition (e.g. a list file
written by ``python -m mlip_fast.eval.protocols``). The lists actually used are written to
``options.out_dir/<name>.json`` and named in ``described["split_file"]``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from torch.utils.data import Dataset, Subset

from mlip_fast.data.evaluation.chexpert import CheXpert5x200Dataset, CheXpertLabels, patient_of
from mlip_fast.data.evaluation.covid import CovidChestXray
from mlip_fast.data.evaluation.folders import ImageFolderDataset, MaskedImageFolder
from mlip_fast.data.evaluation.rsna import RSNAPneumoniaDataset
from mlip_fast.data.evaluation.siim import SIIMPneumothoraxDataset
from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.readers import EvalDataError
from mlip_fast.data.shard_reader import ShardSplit
from mlip_fast.eval.image_folders import TRAINING_TASKS, FolderRequest, image_folder_sets
from mlip_fast.eval.protocols import (
    DEFAULT_FRACTIONS,
    SPLIT_FORMAT,
    SPLIT_NAMES,
    balanced_negatives,
    chexpert_5x200,
    file_sha256,
    load_split_definition,
    materialise_split,
    source_units,
    split_units,
)

__all__ = ["KINDS", "SHIPPED_SPLITS", "SplitOptions", "EvalSets", "build_eval_sets", "foreground_flags"]

KINDS = ("synthetic", "covid", "masks", "image-folder", "chexpert", "chexpert5x200", "rsna", "siim", "shards")
SHIPPED_SPLITS = {"covid": "covid_chestxray", "rsna": "rsna_pneumonia", "siim": "siim_pneumothorax",
                  "chexpert5x200": "chexpert5x200"}


@dataclass
class SplitOptions:
    """How a dataset kind is split and read (the command line's data options).

    split: the evaluated split ("train", "valid", "test" or "all"; None: test, or "all" for a class-folder
    image-folder scored by a task that does not train). train_data / test_data: the image-folder class folders
    to train on / to score (``--train-data`` / ``--test-data``). train_split / valid_split: the
    synthetic benchmark's training and validation splits (valid default: "valid" unless it is the
    evaluated or the training split). fractions / method / split_seed: override the definition's
    procedure. split_file: a definition or list file replacing the shipped one. uncertain: mapping of
    CheXpert's -1. criterion: CheXpert 5x200 selection. balance_negatives: None = the definition's
    (SIIM segmentation: yes), else forced. target: synthetic segmentation target. masks: covid mask
    source or mask folder. images: image folder of rsna / siim. out_dir: where the lists used go.
    """

    split: Optional[str] = None
    train_data: Optional[str] = None
    test_data: Optional[str] = None
    train_split: str = "train"
    valid_split: Optional[str] = None
    fractions: Optional[Sequence[float]] = None
    method: Optional[str] = None
    split_seed: Optional[int] = None
    split_file: Optional[str] = None
    uncertain: str = "ignore"
    criterion: str = "gloria"
    balance_negatives: Optional[bool] = None
    target: str = "any"
    masks: Optional[str] = None
    images: Optional[str] = None
    out_dir: Optional[Path] = None


@dataclass
class EvalSets:
    """``train`` / ``valid`` are None when the task does not train or there is no validation part."""

    train: Optional[Dataset]
    valid: Optional[Dataset]
    test: Dataset
    described: dict = field(default_factory=dict)


def _definition(kind: str, options: SplitOptions, default: dict) -> dict:
    """The split definition for ``kind`` with the option overrides applied (lists dropped when the
    procedure changes, so they are recomputed)."""
    name = options.split_file or SHIPPED_SPLITS.get(kind)
    record = load_split_definition(name) if name else dict(default)
    proc = dict(record["procedure"])
    overrides = {"fractions": list(options.fractions) if options.fractions is not None else None,
                 "method": options.method, "seed": options.split_seed}
    changed = {k: v for k, v in overrides.items() if v is not None and proc.get(k) != v}
    if changed and proc["method"] != "chexpert_5x200":
        proc.update(changed)
        record = {**record, "procedure": proc, "lists": None}
    elif changed:
        if set(changed) != {"seed"}:
            raise EvalDataError(f"the CheXpert 5x200 selection takes only a seed, not {sorted(set(changed) - {'seed'})}")
        proc.update(changed)
        record = {**record, "procedure": proc, "lists": None}
    return record


def _write(record: dict, options: SplitOptions) -> Optional[str]:
    if options.out_dir is None:
        return None
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{record['name']}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return str(path)


def _views(lists: dict, make: Callable[[Sequence[str], str], Dataset], task: str, options: SplitOptions,
           described: dict) -> EvalSets:
    """Datasets of the evaluated split (and train / valid for training tasks) from id lists."""
    if options.split not in SPLIT_NAMES + ("all",):
        raise EvalDataError(f"unknown split {options.split!r}; use one of {SPLIT_NAMES + ('all',)}")
    evaluated = [u for s in SPLIT_NAMES for u in lists.get(s, [])] if options.split == "all" else lists.get(options.split, [])
    if not evaluated:
        raise EvalDataError(f"the {options.split!r} split of {described['split_name']} is empty")
    test = make(evaluated, options.split)
    train = valid = None
    if task in TRAINING_TASKS:
        if options.split in ("train", "all"):
            raise EvalDataError(f"{task} trains on the train split; evaluate 'valid' or 'test', not {options.split!r}")
        train = make(lists["train"], "train")
        held = "valid" if options.split == "test" else None
        valid = make(lists[held], "valid") if held and lists.get(held) else None
    return EvalSets(train, valid, test, described)


def _synthetic(data: str, task: str, transform, options: SplitOptions) -> EvalSets:
    target = options.target if task == "segmentation" else None
    kw = dict(transform=transform, uncertain=options.uncertain, segmentation_target=target)
    test = SyntheticBenchmark(data, split=None if options.split == "all" else options.split,
                              with_findings=task == "localisation", **kw)
    described = {"split": options.split, "target": target, "uncertain": options.uncertain}
    train = valid = None
    if task in TRAINING_TASKS:
        train = SyntheticBenchmark(data, split=options.train_split, **kw)
        valid_split = options.valid_split
        if valid_split is None and "valid" not in (options.split, options.train_split):
            valid_split = "valid"
        if valid_split is not None and valid_split in (options.split, options.train_split):
            raise EvalDataError(f"the validation split {valid_split!r} is also the evaluated or training split")
        if valid_split is not None:
            valid = SyntheticBenchmark(data, split=valid_split, **kw)
        described.update(train_split=options.train_split, valid_split=valid_split)
    return EvalSets(train, valid, test, described)


def _shards(data: str, task: str, transform, options: SplitOptions) -> EvalSets:
    """A shard folder (``python -m mlip_fast.data.shards``): its ``options.split`` streamed in stored order,
    for the tasks that score one pass over a split (zeroshot, retrieval)."""
    if task not in ("zeroshot", "retrieval"):
        raise EvalDataError(f"--dataset shards serves zeroshot and retrieval; {task} needs the source dataset "
                            f"(named in the shard index)")
    test = ShardSplit(data, options.split, transform=transform)
    return EvalSets(None, None, test, {"split": options.split, "index": test.index["index_path"],
                                       "source": test.index["source"]})


def _balanced(train: Dataset, flags: Sequence[bool], seed: int, described: dict) -> Subset:
    keep = balanced_negatives(flags, seed)
    described["balanced_negatives"] = {"positives": int(sum(flags)), "negatives_kept": len(keep) - int(sum(flags)),
                                       "negatives_total": len(flags) - int(sum(flags)), "seed": seed}
    return Subset(train, keep)


def _default_definition(name: str) -> dict:
    return {"format": SPLIT_FORMAT, "name": name, "source": {"unit": "file"},
            "procedure": {"method": "grouped", "fractions": list(DEFAULT_FRACTIONS), "seed": 0}, "lists": None}


def build_eval_sets(kind: str, data: str, task: str, transform, options: SplitOptions) -> EvalSets:
    """Train / valid / test views of the dataset at ``data`` for ``task`` (see the module doc)."""
    if kind not in KINDS:
        raise EvalDataError(f"unknown dataset kind {kind!r}; kinds: {KINDS}")
    if kind == "image-folder":
        folders = image_folder_sets(FolderRequest(data, options.train_data, options.test_data, task, options.split),
                                    transform)
        if folders is not None:
            return EvalSets(*folders)
        if options.split is None and task not in TRAINING_TASKS:  # a class folder is one set: score all of it
            options = dataclasses.replace(options, split="all")
    if options.split is None:
        options = dataclasses.replace(options, split="test")
    if kind == "shards":
        return _shards(data, task, transform, options)
    if kind == "synthetic":
        sets = _synthetic(data, task, transform, options)
        if task == "segmentation" and options.balance_negatives:
            sets.train = _balanced(sets.train, foreground_flags(sets.train), options.split_seed or 0, sets.described)
        return sets

    described: dict = {"split": options.split}
    if kind == "covid":
        masks = (options.masks or "v7labs") if task == "segmentation" else None
        record = _definition(kind, options, {})
        units, groups, source = source_units("covid_chestxray", data)
        record = materialise_split(record, units, groups=groups, source=source)

        def make(names, _):
            return CovidChestXray(data, transform=transform, masks=masks, names=set(names),
                                  labelled_only=task in ("zeroshot", "fewshot"))
        described["masks"] = masks
    elif kind in ("rsna", "siim"):
        if not options.images:
            raise EvalDataError(f"--dataset {kind} needs --images IMAGE_DIR beside --data (the labels CSV)")
        name = SHIPPED_SPLITS[kind]
        units, groups, source = source_units(name, data)
        record = materialise_split(_definition(kind, options, {}), units, groups=groups, source=source)
        if kind == "rsna":
            def make(ids, _):
                return RSNAPneumoniaDataset(data, options.images, transform=transform, patient_ids=list(ids),
                                              boxes=task == "segmentation")
        else:
            def make(ids, _):
                return SIIMPneumothoraxDataset(data, options.images, transform=transform, image_ids=list(ids))
    elif kind == "chexpert":
        record, make = _chexpert(data, transform, options, described)
    elif kind == "chexpert5x200":
        record, make = _chexpert_5x200(data, task, transform, options, described)
    else:
        if kind == "masks":
            if not options.masks:
                raise EvalDataError("--dataset masks needs --masks MASK_FOLDER")
            full = MaskedImageFolder(data, options.masks, transform=transform)
            units = [p[0].name for p in full.pairs]
        else:
            full = ImageFolderDataset(data, transform=transform)
            units = [str(p.relative_to(full.root)) for p, _ in full.samples]
        record = materialise_split(_definition(kind, options, _default_definition(f"{kind}_split")), units)
        position = {u: i for i, u in enumerate(units)}

        def make(ids, _):
            return Subset(full, [position[u] for u in ids])
    described.update(split_name=record["name"], procedure=record["procedure"], counts=record["counts"],
                     uncertain=options.uncertain)
    if record.get("source_sha256"):
        described["source_sha256"] = record["source_sha256"]
    described["split_file"] = _write(record, options)
    sets = _views(record["lists"], make, task, options, described)
    balance = options.balance_negatives
    if balance is None:
        balance = record["procedure"].get("balanced_negatives") == "train"
    if task == "segmentation" and balance and sets.train is not None:
        if kind == "siim":
            flags = [bool(sets.train.runs[i]) for i in sets.train.image_ids]
        else:
            flags = foreground_flags(sets.train)
        sets.train = _balanced(sets.train, flags, record["procedure"].get("seed", 0), described)
    return sets


def _chexpert(data: str, transform, options: SplitOptions, described: dict):
    """(record, make) for CheXpert classification: ``data`` = ``train.csv``; its frontal images without the
    CheXpert 5x200 selection (the shipped definition, ``options.criterion``) are split by patient into train
    and valid; the test set is the official ``valid.csv`` beside it (GLoRIA and MGCA test there too)."""
    path = Path(data)
    test_csv = path.with_name("valid.csv")
    if not path.is_file() or not test_csv.is_file():
        raise EvalDataError(f"--dataset chexpert needs CheXpert's train.csv as --data and valid.csv beside it; "
                            f"missing: {[str(p) for p in (path, test_csv) if not p.is_file()]}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    proc = load_split_definition("chexpert5x200")["procedure"]
    seed = proc["seed"] if options.split_seed is None else options.split_seed
    held_out = {s["path"] for s in chexpert_5x200(rows, criterion=options.criterion, per_class=proc["per_class"],
                                                   seed=seed, frontal_only=proc["frontal_only"], where=str(path))}
    units = [r["Path"] for r in rows if r.get("Frontal/Lateral") == "Frontal" and r["Path"] not in held_out]
    f_train, f_valid, _ = options.fractions or DEFAULT_FRACTIONS
    share = f_valid / (f_train + f_valid)
    parts = split_units(units, (1.0 - share, 0.0, share), seed, "grouped", [patient_of(u) for u in units])
    root = Path(options.images) if options.images else path.parent.parent
    test = CheXpertLabels(test_csv, root=root, transform=transform, uncertain=options.uncertain)
    lists = {"train": parts["train"], "valid": parts["test"], "test": [r["Path"] for r in test.rows]}
    record = {"format": SPLIT_FORMAT, "name": "chexpert", "source": {"file": "train.csv + valid.csv", "unit": "Path",
                                                                      "group": "patient"},
              "procedure": {"method": "grouped", "valid_share_of_train_csv": share, "seed": seed,
                            "excluded": f"chexpert5x200 ({options.criterion}, seed {seed}): {len(held_out)} images",
                            "test": "valid.csv (frontal)"},
              "lists": lists, "counts": {k: len(v) for k, v in lists.items()}, "source_sha256": file_sha256(path)}
    described.update(criterion=options.criterion, n_uncertain_test=test.n_uncertain)

    def make(ids, split):
        if split == "all":
            raise EvalDataError("--dataset chexpert has its test set in valid.csv; evaluate 'train', 'valid' or 'test'")
        if split == "test":
            return test
        return CheXpertLabels(path, root=root, transform=transform, uncertain=options.uncertain, paths=ids)
    return record, make


def _chexpert_5x200(data: str, task: str, transform, options: SplitOptions, described: dict):
    """(record, make) for CheXpert 5x200 from CheXpert's ``train.csv``, a saved selection CSV (``Path``,
    ``label``) or a materialised list file (``.json``)."""
    path = Path(data)
    record = _definition("chexpert5x200", options, {})
    proc = record["procedure"]
    if options.criterion != proc["criterion"]:
        record = {**record, "procedure": {**proc, "criterion": options.criterion}, "lists": None}
        proc = record["procedure"]
    if path.suffix.lower() == ".json":
        record = load_split_definition(path)
        if record.get("labels") is None or record["lists"] is None:
            raise EvalDataError(f"{path} holds no CheXpert 5x200 lists (write them with python -m "
                                f"mlip_fast.eval.protocols chexpert5x200 --data train.csv --out FILE)")
        if not options.images:
            raise EvalDataError("a CheXpert 5x200 list file needs --images: the folder its paths start from "
                                "(the parent of CheXpert-v1.0/)")
        root = Path(options.images)
    else:
        if not path.is_file():
            raise EvalDataError(f"--data {path} does not exist")
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and "label" in rows[0] and "Path" in rows[0]:
            selection = [{"path": r["Path"], "label": r["label"]} for r in rows]
            record = {**record, "procedure": {**proc, "method": "chexpert_5x200", "saved_selection": str(path)}}
        else:
            selection = chexpert_5x200(rows, criterion=proc["criterion"], per_class=proc["per_class"], seed=proc["seed"],
                                       frontal_only=proc["frontal_only"], where=str(path))
        record = {**record, "lists": {"test": [s["path"] for s in selection]},
                  "labels": {s["path"]: s["label"] for s in selection}, "source_sha256": file_sha256(path)}
        root = Path(options.images) if options.images else path.parent.parent
    labels = record["labels"]
    paths = record["lists"]["test"]
    if task in TRAINING_TASKS:
        patients = [patient_of(p) for p in paths]
        lists = split_units(paths, options.fractions or DEFAULT_FRACTIONS,
                            0 if options.split_seed is None else options.split_seed, "grouped", patients)
        record = {**record, "lists": lists}
    record["counts"] = {s: len(v) for s, v in record["lists"].items()}
    described.update(criterion=record["procedure"]["criterion"])

    def make(items, split):
        # the reader takes a selection file; it reads it once, in its constructor
        with tempfile.TemporaryDirectory() as folder:
            selection_csv = Path(folder) / f"chexpert5x200_{split}.csv"
            with open(selection_csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=["Path", "label"])
                writer.writeheader()
                writer.writerows({"Path": p, "label": labels[p]} for p in items)
            return CheXpert5x200Dataset(selection_csv, root=root, transform=transform)
    return record, make


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
