"""Localisation: does a finding sentence's patch-score heat map land on that finding's region?

API (what the training loop and the CLI call)::

    evaluate_localisation(model, data, *, split="test", threshold=0.5, batch_size=16, device=None,
                          max_samples=None, progress=True, transform=None, examples=0,
                          local_matching=None) -> dict
    sentence_heatmaps(model, images [B, C, S, S], sentences: list[str], owner: list[int]) -> [N, h, w]
    plan_heatmaps(model, images, sentences, owner, context: list[list[str]], matching) -> [N, h, w]

``data``: a synthetic benchmark folder (``master.csv`` from ``mlip_fast.data.synth``; ``split`` picks
the rows), or a dataset / list of records, each a dict with ``image`` (a transformed tensor
``[C, S, S]`` or a raw ``[H, W]`` array) and ``findings``: a list of ``{"name", "sentence", "mask"}``
with the finding's mask ``[H, W]`` in the raw image's frame (an array, or a path to a mask image).

For every (image, finding sentence) pair: the sentence is encoded on its own (``encode_text_local``), its
heat map is ``cos(patch_p, sentence)`` over the patch grid of the unmasked image (token-wise max matching), or,
with optimal-transport matching (the model config's ``local_matching="ot"``, or ``local_matching="ot"`` here),
the sentence's column of the transport plan between the image's patches and the sentences of its report: the
image's finding sentences and the other sentences of the record's ``report`` when it has one, each encoded on its
own (``plan[:, q] * m``, the share of the sentence's mass each patch takes, m sentences). OT needs the sentences
to compete for the patches: a sentence alone with an image is spread over every patch (uniform marginals), so
records without a report and with one finding give flat maps. The mask is put in the model's input frame with
the same aspect-preserving resize + pad as ``ImageTransform``. Then:
- pointing hit: the centre of the top-scoring patch lies inside the mask; chance = the mask's area
  fraction of the input image (where a uniformly random point lands inside), reported beside it;
- mask IoU: the heat map, upsampled bilinearly and min-max scaled, thresholded at ``threshold``,
  against the mask; its baseline ``iou_chance`` is the IoU of selecting the whole image (= area fraction).

Returned metrics::

    {"pointing_accuracy", "chance", "mask_iou", "iou_chance", "threshold", "n_sentences", "n_images",
     "per_finding": {name: {"pointing_accuracy", "chance", "mask_iou", "iou_chance", "n"}},
     "local_matching", and with "ot" "plan_sentences_per_image" (mean sentences in an image's plan)}

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
from mlip_fast.eval.common import evaluating, eval_transform, l2_normalise, local_matching_of, model_device, no_bar
from mlip_fast.functional import LocalMatching
from mlip_fast.ops.patch_sentence_ot import paired_transport_plan
from mlip_fast.preprocess.images import load_image
from mlip_fast.preprocess.reports import split_sentences
from mlip_fast.preprocess.transforms import resize_pad

__all__ = ["evaluate_localisation", "sentence_heatmaps", "plan_heatmaps", "report_sentences", "mask_to_input_frame",
           "load_records"]


def _unit_patches(model, images: torch.Tensor) -> torch.Tensor:
    """[B, P, D] unit patch vectors of the unmasked images, P in row-major grid order."""
    return l2_normalise(model.encode_image_local(images, mask_ratio=0.0)["patches"])


def _sentence_vectors(model, sentences: Sequence[str], token_cache: Optional[dict] = None) -> torch.Tensor:
    """[N, D] unit vectors, each sentence encoded as a one-sentence report: its first sentence vector (the global
    vector when the text tower found no sentence in it). ``token_cache``: tokenized lists kept across calls."""
    if token_cache is None:
        text = model.encode_text_local(list(sentences))
    else:
        key = tuple(sentences)
        if key not in token_cache:
            token_cache[key] = model.tokenize(list(sentences))
        device = model_device(model)
        text = model.encode_text_local({k: v.to(device) for k, v in token_cache[key].items()})
    return l2_normalise(torch.where(text["sentence_mask"][:, :1], text["sentences"][:, 0], text["text_global"]))


def sentence_heatmaps(model, images: torch.Tensor, sentences: Sequence[str], owner: Sequence[int], *,
                      token_cache: Optional[dict] = None) -> torch.Tensor:
    """Cosine heat maps ``[N, h, w]`` of ``sentences[n]`` over the patches of ``images[owner[n]]``."""
    vision = model.config.vision
    grid = vision.image_size // vision.patch_size
    patches = _unit_patches(model, images)
    sent = _sentence_vectors(model, sentences, token_cache)
    idx = torch.as_tensor(list(owner), device=patches.device)
    heat = torch.einsum("npd,nd->np", patches[idx], sent.to(patches.device))
    return heat.view(len(sentences), grid, grid)


def _sentence_key(text: str) -> str:
    return " ".join(text.lower().split())


def report_sentences(report: Optional[str]) -> list[str]:
    """The sentences of a report text, split as the text tower splits them ([] for None)."""
    return [report[s:e] for s, e in split_sentences(report)] if report else []


def _sentence_sets(sentences: Sequence[str], owner: Sequence[int], context: Sequence[Sequence[str]],
                   n_images: int) -> tuple[list[list[str]], list[int]]:
    """Each image's sentence set (its ``sentences``, then those of its ``context`` not among them, compared
    ignoring case and spacing) and the column of each of ``sentences`` in its image's set."""
    sets: list[list[str]] = [[] for _ in range(n_images)]
    keys: list[list[str]] = [[] for _ in range(n_images)]

    def add(b: int, text: str) -> int:
        key = _sentence_key(text)
        if key not in keys[b]:
            keys[b].append(key)
            sets[b].append(text)
        return keys[b].index(key)

    column = [add(b, text) for text, b in zip(sentences, owner)]
    for b, extra in enumerate(context):
        for text in extra:
            add(b, text)
    return sets, column


def plan_heatmaps(model, images: torch.Tensor, sentences: Sequence[str], owner: Sequence[int],
                  context: Sequence[Sequence[str]], matching: LocalMatching, *, token_cache: Optional[dict] = None
                  ) -> torch.Tensor:
    """Transport-plan heat maps ``[N, h, w]``: for ``sentences[n]``, its column of the optimal-transport plan
    between the patches of ``images[owner[n]]`` and that image's sentence set, times the set's size (the share of
    the sentence's mass each patch takes; each map sums to 1).

    An image's set is its sentences in ``sentences`` and then those of ``context[b]`` (e.g. its report's) that are
    not among them (compared ignoring case and spacing), each encoded on its own; ``matching`` gives eps and the
    iterations.
    """
    vision = model.config.vision
    grid = vision.image_size // vision.patch_size
    patches = _unit_patches(model, images)
    sets, column = _sentence_sets(sentences, owner, context, images.shape[0])
    flat = [s for group in sets for s in group]
    width = max(1, max(len(group) for group in sets))
    vectors = (_sentence_vectors(model, flat, token_cache).to(patches.device) if flat
               else patches.new_zeros(0, patches.shape[-1]))
    packed = patches.new_zeros(len(sets), width, patches.shape[-1])
    mask = torch.zeros(len(sets), width, dtype=torch.bool, device=patches.device)
    start = 0
    for b, group in enumerate(sets):
        packed[b, : len(group)] = vectors[start : start + len(group)].to(packed.dtype)
        mask[b, : len(group)] = True
        start += len(group)
    plan = paired_transport_plan(patches, packed, mask, eps=matching.ot_eps, n_iter=matching.ot_iters)
    idx = torch.as_tensor(list(owner), device=patches.device)
    cols = torch.as_tensor(column, device=patches.device)
    counts = mask.sum(1).to(plan.dtype)
    heat = plan[idx, :, cols] * counts[idx, None]
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


def _input_image(rec: dict, transform) -> torch.Tensor:
    """A record's image as the model's input [C, S, S]: as stored when it is one already, else transformed."""
    image = rec["image"]
    return image if isinstance(image, torch.Tensor) and image.dim() == 3 else transform(np.asarray(image))


def load_records(model, root: Path, split: Optional[str] = "test", transform=None) -> list[dict]:
    """The synthetic benchmark's records of ``split`` decoded for ``model`` once: each image through the eval
    transform ([C, S, S]), each finding's mask in the input frame (bool [S, S]). :func:`evaluate_localisation` on
    them gives exactly what it gives on ``root`` (what it would decode on every call; a training run's periodic
    validation keeps them)."""
    root = Path(root)
    transform = transform if transform is not None else eval_transform(model)
    size = model.config.vision.image_size
    out = []
    for rec in _synthetic_records(root, split):
        findings = [f if f.get("mask") is None else
                    {**f, "mask": mask_to_input_frame(_load_mask(f["mask"], root), size)}
                    for f in rec.get("findings") or ()]
        out.append({**rec, "image": _input_image(rec, transform), "findings": findings})
    return out


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
    local_matching: Optional[str] = None,
    token_cache: Optional[dict] = None,
) -> dict:
    """Pointing accuracy and mask IoU of finding-sentence heat maps, with chance rates (module doc).
    ``token_cache``: a dict that keeps the tokenized sentence lists across calls on the same data (a training run's
    periodic validation passes one: the same records give the same lists; only the encoding is redone)."""
    matching = local_matching_of(model, local_matching)
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
    hits, ious, chances, names, plan_sizes = [], [], [], [], []
    kept: list[dict] = []
    n_images = 0
    with evaluating(model), tqdm(total=n, desc="localisation", unit="img", disable=no_bar(progress), leave=False) as bar:
        for start in range(0, n, batch_size):
            records = [data[i] for i in range(start, min(n, start + batch_size))]
            images, sentences, owner, masks, fnames, context = [], [], [], [], [], []
            for rec in records:
                if "findings" not in rec:
                    raise EvalDataError("localisation needs records with 'findings' (sentence + mask per finding); "
                                        f"got keys {sorted(rec)}")
                image = _input_image(rec, transform)
                for f in rec["findings"] or ():
                    if f.get("mask") is None or not f.get("sentence"):
                        continue
                    owner.append(len(images))
                    sentences.append(f["sentence"])
                    masks.append(mask_to_input_frame(_load_mask(f["mask"], root), size))
                    fnames.append(str(f.get("name", "finding")))
                images.append(image)
                context.append(report_sentences(rec.get("report")))
            n_images += len(records)
            bar.update(len(records))
            if not sentences:
                continue
            batch = torch.stack(images).to(dev)
            if matching.mode == "ot":
                heat = plan_heatmaps(model, batch, sentences, owner, context, matching, token_cache=token_cache)
                sets, _ = _sentence_sets(sentences, owner, context, len(images))
                plan_sizes += [len(sets[b]) for b in sorted(set(owner))]
            else:
                heat = sentence_heatmaps(model, batch, sentences, owner, token_cache=token_cache)
            heat = heat.float().cpu().numpy()
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
        "local_matching": matching.mode,
    }
    if plan_sizes:
        result["plan_sentences_per_image"] = float(np.mean(plan_sizes))
    if examples:
        result["examples"] = kept
    return result
