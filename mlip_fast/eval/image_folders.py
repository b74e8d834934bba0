"""Evaluation sets of labelled image folders (``--dataset image-folder``), in the three ways a user hands them over:

- ``--data ROOT`` with split folders (``ROOT/train``, ``valid`` / ``val``, ``test``, any case, each holding the same
  class folders): the task scores ``--split`` (default test); few-shot tasks train on train/ and make their choices
  on valid/ when there is one.
- ``--train-data DIR`` and / or ``--test-data DIR`` (each a class-folder layout; ``--data`` stands for
  ``--test-data`` when only ``--train-data`` is given): the two folders as given, their classes checked to match.
- ``--data ROOT`` with class folders: scoring tasks (zeroshot, retrieval, localisation) use every image (the
  folder is the test set); few-shot tasks split it 70/15/15 by file, seeded (:mod:`mlip_fast.eval.benchmarks`).

The layout is read once, before the model loads (:func:`describe_image_folders`, which the command line prints:
the classes and the images per class of every part), and anything ambiguous is refused with one line naming what
was found (:func:`mlip_fast.data.evaluation.folders.inspect_image_folder`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlip_fast.data.evaluation.folders import FolderLayout, ImageFolderDataset, inspect_image_folder
from mlip_fast.data.readers import EvalDataError

__all__ = ["FolderRequest", "describe_image_folders", "image_folder_sets", "TRAINING_TASKS"]

TRAINING_TASKS = ("fewshot", "segmentation")


class FolderRequest:
    """What the command line asked for: ``data`` (``--data``), ``train_data`` / ``test_data`` (``--train-data`` /
    ``--test-data``), the task and the evaluated split (None: the layout's default)."""

    def __init__(self, data: Optional[str], train_data: Optional[str], test_data: Optional[str], task: str,
                 split: Optional[str] = None):
        self.task, self.split = task, split
        self.training = task in TRAINING_TASKS
        self.explicit = train_data is not None or test_data is not None
        self.train_data = Path(train_data) if train_data is not None else None
        test = test_data if test_data is not None else data if train_data is not None else None
        self.test_data = Path(test) if test is not None else None
        self.data = Path(data) if data is not None and not self.explicit else None
        if self.explicit and self.test_data is None:
            raise EvalDataError("--train-data needs the folder to evaluate too: --test-data DIR (or --data DIR)")
        if self.explicit and self.training and self.train_data is None:
            raise EvalDataError(f"{task} trains a classifier: pass --train-data DIR beside --test-data")


def _class_layout(path: Path, flag: str) -> FolderLayout:
    layout = inspect_image_folder(path)
    if layout.kind != "classes":
        raise EvalDataError(f"{flag} {path} holds split folders ({', '.join(p.name for p in layout.splits.values())}); "
                            f"pass one of them (e.g. {flag} {layout.splits.get('test', next(iter(layout.splits.values())))})"
                            f" or give the whole folder as --data")
    return layout


def _explicit(request: FolderRequest) -> dict:
    """{part: layout} of --train-data / --test-data, classes checked to match."""
    parts = {"test": _class_layout(request.test_data, "--test-data")}
    if request.training:
        parts["train"] = _class_layout(request.train_data, "--train-data")
        test, train = set(parts["test"].classes), set(parts["train"].classes)
        if test != train:
            raise EvalDataError(f"--train-data {request.train_data} and --test-data {request.test_data} hold different "
                                f"classes: only in train: {sorted(train - test) or 'none'}; only in test: "
                                f"{sorted(test - train) or 'none'}")
    return parts


def _split_of(request: FolderRequest, layout: FolderLayout) -> str:
    """The evaluated split of a split-folder layout, checked against the task."""
    split = request.split or "test"
    if split not in layout.splits:
        raise EvalDataError(f"--split {split}: {layout.root} has no {split} folder (it has "
                            f"{', '.join(p.name for p in layout.splits.values())})")
    if request.training and split == "train":
        raise EvalDataError(f"{request.task} trains on the train folder; evaluate valid or test, not train")
    if request.training and "train" not in layout.splits:
        raise EvalDataError(f"{request.task} trains a classifier but {layout.root} has no train folder")
    return split


def describe_image_folders(request: FolderRequest) -> str:
    """The layout the request names, as one line per folder (what the command line prints before the model
    loads); :class:`EvalDataError` when it is ambiguous or does not fit the task."""
    if request.explicit:
        return "\n".join(f"{part}: {layout.describe()}" for part, layout in _explicit(request).items())
    layout = inspect_image_folder(request.data)
    if layout.kind == "splits":
        split = _split_of(request, layout)
        return f"{layout.describe()}; evaluating {split}"
    if request.training:
        return f"{layout.describe()}; split 70/15/15 by file (seeded) for {request.task}"
    return f"{layout.describe()}; evaluating every image (a class folder is one set; split folders name the parts)"


def image_folder_sets(request: FolderRequest, transform) -> Optional[tuple]:
    """``(train, valid, test, described)`` for explicit folders and split folders; None for a class-folder root,
    which :func:`mlip_fast.eval.benchmarks.build_eval_sets` splits by its protocol (``described["found"]`` is
    then the caller's to fill)."""
    if request.explicit:
        parts = _explicit(request)
        classes = parts["test"].classes
        test = ImageFolderDataset(request.test_data, transform=transform, class_names=classes)
        train = ImageFolderDataset(request.train_data, transform=transform, class_names=classes) if request.training \
            else None
        described = {"layout": "train/test folders", "test_data": str(request.test_data), "classes": list(classes),
                     "counts": {p: layout.counts["all"] for p, layout in parts.items()}, "split": "test"}
        if train is not None:
            described["train_data"] = str(request.train_data)
        return train, None, test, described
    layout = inspect_image_folder(request.data)
    if layout.kind != "splits":
        return None
    split = _split_of(request, layout)

    def make(part: str):
        return ImageFolderDataset(layout.splits[part], transform=transform, class_names=layout.classes)

    train = make("train") if request.training else None
    valid = make("valid") if request.training and split == "test" and "valid" in layout.splits else None
    described = {"layout": "split folders", "split": split, "classes": list(layout.classes), "counts": layout.counts,
                 "folders": {s: str(p) for s, p in layout.splits.items()}}
    return train, valid, make(split), described
