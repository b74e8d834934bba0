"""Image folders: labelled images in class subfolders (``ImageFolderDataset``) and images with binary masks
matched by file name (``MaskedImageFolder``, e.g. the lung masks of ``../shared/data/covid_chestxray``:
``masks_v7labs_lungs/`` or ``annotations/lungVAE-masks/``, for few-shot segmentation)."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from mlip_fast.data.readers import (IMAGE_EXTENSIONS, DatasetError, EvalDataError, RobustDataset, load_mask_file,
                                    resize_mask)
from mlip_fast.preprocess.images import load_image

__all__ = ["ImageFolderDataset", "MaskedImageFolder"]


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
