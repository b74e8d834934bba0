"""Image folders: labelled images in class subfolders (``ImageFolderDataset``), the layout of such a folder
(:func:`inspect_image_folder`) and images with binary masks matched by file name (``MaskedImageFolder``, e.g. the
lung masks of ``../shared/data/covid_chestxray``: ``masks_v7labs_lungs/`` or ``annotations/lungVAE-masks/``, for
few-shot segmentation).

Layouts of a labelled folder (folder names matched in any case):

- class folders: ``root/<class>/<images>`` (images may sit in deeper folders of their class);
- split folders: ``root/<split>/<class>/<images>`` with ``<split>`` among train, valid (val, validation) and test,
  every split holding the same classes.

Anything else is refused with a one-line :class:`~mlip_fast.data.readers.EvalDataError` naming what was found,
before a folder is read as the wrong thing: split folders beside other folders (``test/`` and ``train_subset/``),
folders that each hold the same subfolders (splits under other names, which would otherwise become the classes),
a class folder without images, a single class, and split folders whose classes differ.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from mlip_fast.data.readers import (IMAGE_EXTENSIONS, DatasetError, EvalDataError, RobustDataset, load_mask_file,
                                    resize_mask)
from mlip_fast.preprocess.images import load_image

__all__ = ["ImageFolderDataset", "MaskedImageFolder", "FolderLayout", "inspect_image_folder", "SPLIT_FOLDERS"]

# folder name (lower case) -> split
SPLIT_FOLDERS = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                 "test": "test", "testing": "test"}


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _names(paths) -> str:
    return ", ".join(p.name for p in paths)


@dataclass
class FolderLayout:
    """What :func:`inspect_image_folder` found: ``kind`` "classes" or "splits"; ``splits`` {split: folder} (for
    "classes": {"all": root}); ``classes`` in label order (sorted folder names); ``counts`` {split: {class: images}}."""

    root: Path
    kind: str
    classes: tuple
    splits: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line: the layout, the classes and the images per class of every split."""
        what = (f"split folders {', '.join(f'{s} ({p.name}/)' for s, p in self.splits.items())}"
                if self.kind == "splits" else "class folders")
        counts = "; ".join(f"{split}: " + ", ".join(f"{c} {n}" for c, n in found.items())
                           for split, found in self.counts.items())
        return f"{self.root}: {what}; {len(self.classes)} classes; images per class: {counts}"


def _class_counts(folder: Path) -> dict:
    """{class folder name: image count} of a class-folder layout; EvalDataError when it is not one."""
    classes = _subfolders(folder)
    loose = [p.name for p in folder.iterdir() if _is_image(p)]
    if not classes:
        raise EvalDataError(f"{folder} has no class subfolders (expected <class>/<images>, or train/ valid/ test/ "
                            f"folders holding them){f'; it holds {len(loose)} images directly' if loose else ''}")
    if loose:
        raise EvalDataError(f"{folder} holds images directly ({', '.join(loose[:3])}...) beside its class folders "
                            f"({_names(classes)}): move each image into the folder of its class")
    inner = [{p.name.lower() for p in _subfolders(c)} for c in classes]
    direct = [any(_is_image(p) for p in c.iterdir()) for c in classes]
    if len(classes) > 1 and not any(direct) and inner[0] and len(inner[0]) > 1 and all(n == inner[0] for n in inner):
        raise EvalDataError(f"the folders of {folder} ({_names(classes)}) each hold the same subfolders "
                            f"({', '.join(sorted(inner[0]))}): they look like splits, not classes; name them train/ "
                            f"valid/ test/, or pass --train-data / --test-data, or point --data at one of them")
    counts = {c.name: sum(1 for p in c.rglob("*") if _is_image(p)) for c in classes}
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise EvalDataError(f"class folder(s) {', '.join(empty)} of {folder} hold no images "
                            f"({', '.join(IMAGE_EXTENSIONS)}); every class needs images")
    if len(counts) < 2:
        raise EvalDataError(f"{folder} has one class folder ({_names(classes)}); classification needs two or more")
    return counts


def inspect_image_folder(root) -> FolderLayout:
    """The layout of a labelled image folder (see the module docstring); :class:`EvalDataError` (one line) when
    it is neither layout. Counts every image file (nothing is decoded)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"image folder {root} does not exist")
    folders = _subfolders(root)
    named = [p for p in folders if p.name.lower() in SPLIT_FOLDERS]
    if not named:
        counts = _class_counts(root)
        return FolderLayout(root, "classes", tuple(counts), {"all": root}, {"all": counts})
    others = [p for p in folders if p not in named]
    if others:
        raise EvalDataError(f"{root} mixes split folders ({_names(named)}) with other folders ({_names(others)}): "
                            f"name every split train/ valid/ test/, or pass --train-data / --test-data")
    splits: dict = {}
    for folder in named:
        split = SPLIT_FOLDERS[folder.name.lower()]
        if split in splits:
            raise EvalDataError(f"{root} has two {split} folders ({splits[split].name}, {folder.name}); keep one")
        splits[split] = folder
    splits = {s: splits[s] for s in ("train", "valid", "test") if s in splits}
    counts = {s: _class_counts(folder) for s, folder in splits.items()}
    classes = sorted({c for found in counts.values() for c in found})
    differ = {s: sorted(set(classes) - set(found)) for s, found in counts.items() if set(found) != set(classes)}
    if differ:
        raise EvalDataError(f"the split folders of {root} hold different classes: "
                            + "; ".join(f"{splits[s].name}/ lacks {', '.join(m)}" for s, m in differ.items()))
    return FolderLayout(root, "splits", tuple(classes), splits, counts)


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
                if _is_image(path):
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
        mask = load_mask_file(m)
        if mask.shape != raw.shape:
            mask = resize_mask(mask, raw.shape)
        return {"image": self.transform(raw) if self.transform is not None else raw, "mask": mask, "index": i,
                "name": img.name}
