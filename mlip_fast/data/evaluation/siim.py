"""SIIM-ACR Pneumothorax segmentation: images with the union of their run-length-encoded regions as a mask."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mlip_fast.data.labels import SIIM_LABELS
from mlip_fast.data.readers import (DatasetError, RobustDataset, SampleError, apply_transform, index_images, read_table,
                                    require_columns)
from mlip_fast.data.rle import rle_decode
from mlip_fast.preprocess.images import load_image

__all__ = ["SIIMPneumothoraxDataset"]


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
        rows = read_table(rle_csv)
        require_columns(rle_csv, rows, ["ImageId", "EncodedPixels"])
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
        self.files = index_images(Path(image_dir))
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
        image_t, mask_t = apply_transform(self.transform, image, mask)
        return {"image": image_t, "mask": mask_t, "labels": torch.tensor([float(bool(self.runs[iid]))])}
