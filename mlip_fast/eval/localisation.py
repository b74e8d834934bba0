"""Localisation: does a finding sentence's patch-score heat map land on that finding's region?

API (what the training loop and the CLI call)::

    evaluate_localisation(model, data, *, split="test", threshold=0.5, batch_size=16, device=None,
                          max_samples=None, progress=True, transform=None, examples=0) -> dict
    sentence_heatmaps(model, images [B, C, S, S], sentences: list[str], owner: list[int]) -> [N, h, w]

``data``: a synthetic benchmark folder (``master.csv`` from ``mlip_fast.data.synth``; ``split`` picks
the rows), or a dataset / list of records, each a dict with ``image`` (a transformed tensor
``[C, S, S]`` or a raw ``[H, W]`` array) and ``findings``: a list of ``{"name", "sentence", "mask"}``
with the finding's mask ``[H, W]`` in the raw image's frame (an array, or a path to a mask image).

For every (image, finding sentence) pair: the sentence is encoded on its own (``encode_text_local``), its
heat map is ``cos(patch_p, sentence)`` over the patch grid of the unmasked image, and the mask is put in
the model's input frame with the same aspect-preserving resize + pad as ``ImageTransform``. Then:
- pointing hit: the centre of the top-scoring patch lies inside the mask; chance = the mask's area
  fraction of the input image (where a uniformly random point lands inside), reported beside it;
- mask IoU: the heat map, upsampled bilinearly and min-max scaled, thresholded at ``threshold``,
  against the mask; its baseline ``iou_chance`` is the IoU of selecting the whole image (= area fraction).

Returned metrics::

    {"pointing_accuracy", "chance", "mask_iou", "iou_chance", "threshold", "n_sentences", "n_images",
     "per_finding": {name: {"pointing_accuracy", "chance", "mask_iou", "iou_chance", "n"}}}

With ``examples=k`` the result also holds ``"examples"``: k dicts (image [S, S], mask, heatmap,
sentence, name, hit) for overlay plots; drop that key before writing JSON.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import evaluating, eval_transform, l2_normalise, model_device, no_bar
from mlip_fast.preprocess.images import load_image
from mlip_fast.preprocess.transforms import resize_pad

__all__ = ["evaluate_localisation", "sentence_heatmaps", "mask_to_input_frame"]


def sentence_heatmaps(model, images: torch.Tensor, sentences: Sequence[str], owner: Sequence[int]) -> torch.Tensor:
    """Cosine heat maps ``[N, h, w]`` of ``sentences[n]`` over the patches of ``images[owner[n]]``.

    Each sentence is encoded as a one-sentence report; its first sentence vector is used (the global
    vector when the text tower found no sentence in it).
    """
    vision = model.config.vision
    grid = vision.image_size // vision.patch_size
    out = model.encode_image_local(images, mask_ratio=0.0)
    patches = l2_normalise(out["patches"])  # [B, P, D], P in row-major grid order at mask ratio 0
    text = model.encode_text_local(list(sentences))
    sent = torch.where(text["sentence_mask"][:, :1], text["sentences"][:, 0], text["text_global"])
    sent = l2_normalise(sent)
    idx = torch.as_tensor(list(owner), device=patches.device)
    heat = torch.einsum("npd,nd->np", patches[idx], sent.to(patches.device))
    return heat.view(len(sentences), grid, grid)


def mask_to_input_frame(mask, image_size: int) -> np.ndarray:
    """A raw-frame mask ``[H, W]`` (bool / 0-1 / 0-255) -> bool ``[S, S]`` in the model's input frame
    (aspect-preserving resize + centred pad, as ``ImageTransform``; nearest after a 0.5 threshold)."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise EvalDataError(f"a finding mask must be 2-D [H, W], got shape {m.shape}")
    m = m.astype(np.float32)
    if m.max() > 1.0:
        m = m / 255.0
    if m.shape == (image_size, image_size):
        return m >= 0.5
    return resize_pad(torch.from_numpy(m), image_size).numpy() >= 0.5


def _load_mask(value, root: Optional[Path]):
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if root is not None and not path.is_absolute():
            path = root / path
        return load_image(path) >= 0.5
    return value


def _synthetic_records(root: Path, split: Optional[str]) -> list[dict]:
    return SyntheticBenchmark(root, split=split, with_findings=True)


def evaluate_localisation(
    model,
    data,
    *,
    split: Optional[str] = "test",
    threshold: float = 0.5,
    batch_size: int = 16,
    device=None,
    max_samples: Optional[int] = None,
    progress: bool = True,
    transform=None,
    examples: int = 0,
) -> dict:
    """Pointing accuracy and mask IoU of finding-sentence heat maps, with chance rates (module doc)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    root = None
    if isinstance(data, (str, os.PathLike)):
        root = Path(data)
        data = _synthetic_records(root, split)
    n = len(data)
    if max_samples is not None:
        n = min(n, max_samples)
    if n == 0:
        raise EvalDataError("localisation: the dataset is empty")
    dev = model_device(model, device)
    transform = transform if transform is not None else eval_transform(model)
    size = model.config.vision.image_size
    hits, ious, chances, names = [], [], [], []
    kept: list[dict] = []
    n_images = 0
    with evaluating(model), tqdm(total=n, desc="localisation", unit="img", disable=no_bar(progress), leave=False) as bar:
        for start in range(0, n, batch_size):
            records = [data[i] for i in range(start, min(n, start + batch_size))]
            images, sentences, owner, masks, fnames = [], [], [], [], []
            for rec in records:
                if "findings" not in rec:
                    raise EvalDataError("localisation needs records with 'findings' (sentence + mask per finding); "
                                        f"got keys {sorted(rec)}")
                image = rec["image"]
                if not (isinstance(image, torch.Tensor) and image.dim() == 3):
                    image = transform(np.asarray(image))
                for f in rec["findings"] or ():
                    if f.get("mask") is None or not f.get("sentence"):
                        continue
                    owner.append(len(images))
                    sentences.append(f["sentence"])
                    masks.append(mask_to_input_frame(_load_mask(f["mask"], root), size))
                    fnames.append(str(f.get("name", "finding")))
                images.append(image)
            n_images += len(records)
            bar.update(len(records))
            if not sentences:
                continue
            batch = torch.stack(images).to(dev)
            heat = sentence_heatmaps(model, batch, sentences, owner).float().cpu().numpy()
            for k, (h, m) in enumerate(zip(heat, masks)):
                hit = M.pointing_hit(h, m)
                hits.append(hit)
                ious.append(M.heatmap_iou(h, m, threshold))
                chances.append(float(m.mean()))
                names.append(fnames[k])
                if len(kept) < examples:
                    kept.append({"image": batch[owner[k], 0].float().cpu().numpy(), "mask": m, "heatmap": h,
                                 "sentence": sentences[k], "name": fnames[k], "hit": hit})
    if not hits:
        raise EvalDataError(f"localisation: none of the {n_images} images has a finding with a sentence and a mask")
    hits_a, ious_a, chance_a, names_a = np.array(hits, float), np.array(ious), np.array(chances), np.array(names)

    def summary(sel):
        return {"pointing_accuracy": float(hits_a[sel].mean()), "chance": float(chance_a[sel].mean()),
                "mask_iou": float(ious_a[sel].mean()), "iou_chance": float(chance_a[sel].mean()),
                "n": int(sel.sum())}

    everything = np.ones(len(hits_a), bool)
    result = {
        **{k: v for k, v in summary(everything).items() if k != "n"},
        "threshold": float(threshold),
        "n_sentences": int(len(hits_a)),
        "n_images": int(n_images),
        "per_finding": {name: summary(names_a == name) for name in sorted(set(names))},
    }
    if examples:
        result["examples"] = kept
    return result
