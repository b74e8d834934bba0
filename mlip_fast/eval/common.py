"""Shared evaluation plumbing: checkpoints, devices, batches, embeddings, run summaries.

Evaluation data is anything that yields samples as dicts (the dataset readers of ``mlip_fast.data``):
``image`` (a transformed tensor ``[C, S, S]``, or a raw ``[H, W]`` array that the model's eval transform
maps), optional ``report`` (str), ``labels`` (``[L]`` tensor / array / list, NaN = unknown, or a dict
label -> value), ``mask`` (``[H, W]``), ``index``. A map-style dataset or a ``DataLoader`` whose
batches are dicts with ``images`` (or ``image``) ``[B, C, S, S]`` both work. Label names come from the
dataset's ``label_names`` (or ``classes`` / ``class_names``) attribute unless given.
"""
from __future__ import annotations

import functools
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset
from tqdm.auto import tqdm

from mlip_fast._cli import no_bar
from mlip_fast._records import SUMMARY_FILE, versions, write_run_record
from mlip_fast.data.readers import EvalDataError, SampleError
from mlip_fast.functional import LocalMatching
from mlip_fast.models.factory import CheckpointError, from_pretrained
from mlip_fast.preprocess.images import ImageLoadError
from mlip_fast.preprocess.transforms import ImageTransform

__all__ = [
    "no_bar",
    "CheckpointError",
    "load_checkpoint",
    "model_device",
    "eval_transform",
    "label_names_of",
    "iter_batches",
    "collate_samples",
    "l2_normalise",
    "versions",
    "write_summary",
    "seed_everything",
    "evaluating",
    "screen_samples",
]


def load_checkpoint(path: str | os.PathLike, device: str | torch.device | None = None):
    """Load an exported model (``save_pretrained`` directory) in eval mode on ``device`` (default CPU).

    Raises ``CheckpointError`` (``mlip_fast.models.CheckpointError``) naming what was found when ``path``
    is missing, a file, a DeepSpeed engine checkpoint (export it first) or another kind of directory.
    """
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file():
        names = sorted(q.name for q in p.iterdir())
        if "latest" in names or any(n.startswith("global_step") for n in names):
            raise CheckpointError(
                f"{p} is a DeepSpeed engine checkpoint ({', '.join(names[:6])}), not an exported model: evaluate the "
                "training run's export directory (written by save_pretrained) instead"
            )
    if p.is_file() and p.name != "model.safetensors":
        raise CheckpointError(f"checkpoint {p} is a file; expected a model directory written by save_pretrained")
    return from_pretrained(p, device=device or "cpu").eval()


def model_device(model: torch.nn.Module, device: str | torch.device | None = None) -> torch.device:
    """The device of the model's first parameter; ``device``, when given, must be that device."""
    try:
        actual = next(model.parameters()).device
    except StopIteration:
        actual = torch.device("cpu")
    if device is None:
        return actual
    wanted = torch.device(device)
    if wanted.type != actual.type or (wanted.index is not None and actual.index is not None and wanted.index != actual.index):
        raise ValueError(f"the model is on {actual} but device={wanted} was asked for; move the model "
                         f"(model.to({str(wanted)!r})) or leave device=None")
    return actual


class evaluating:
    """Context manager: model in eval mode with gradients off; restores the previous training mode
    (the training loop calls evaluation in the middle of a run)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.grad = torch.is_grad_enabled()
        self.model.eval()
        torch.set_grad_enabled(False)
        return self.model

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad)
        self.model.train(self.was_training)
        return False


def eval_transform(model: torch.nn.Module):
    """The deterministic image transform of ``model``: the preprocessing stored with it
    (``model.preprocess_cfg``, restored from its checkpoint), else the default of its input size and channels."""
    preprocess = getattr(model, "preprocess_cfg", None)
    if preprocess is not None:
        return ImageTransform.from_config(preprocess, train=False)
    vision = model.config.vision
    return ImageTransform(vision.image_size, train=False, in_chans=vision.in_chans)


def _underlying_dataset(data):
    while isinstance(data, (DataLoader, Subset)):
        data = data.dataset
    return data


def label_names_of(data, label_names: Optional[Sequence[str]] = None) -> Optional[list[str]]:
    """Label names of ``data`` (explicit ``label_names`` first, then the dataset's own attribute)."""
    if label_names is not None:
        return list(label_names)
    base = _underlying_dataset(data)
    for attr in ("label_names", "class_names", "classes"):
        names = getattr(base, attr, None)
        if names is not None and not callable(names):
            return [str(n) for n in names]
    return None


def _as_image_tensor(image, transform) -> torch.Tensor:
    if isinstance(image, torch.Tensor) and image.dim() == 3:
        return image.to(torch.float32)
    if transform is None:
        raise EvalDataError(
            f"sample image has shape {tuple(np.shape(image))}; expected a transformed tensor [C, S, S] "
            "(give the dataset the model's eval transform)"
        )
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    return transform(arr)


def _labels_vector(labels, names: Optional[Sequence[str]]) -> torch.Tensor:
    if isinstance(labels, Mapping):
        if names is None:
            names = list(labels)
        return torch.tensor([float(labels.get(n, math.nan)) for n in names], dtype=torch.float32)
    t = torch.as_tensor(np.asarray(labels, dtype=np.float32)).reshape(-1)
    return t


def collate_samples(samples: Sequence[dict], transform=None, label_names: Optional[Sequence[str]] = None) -> dict:
    """Batch sample dicts: ``images [B, C, S, S]``, ``labels [B, L]`` (when every sample has labels),
    ``reports`` (list[str]), ``masks`` (list of ``[H, W]`` arrays or None), ``index [B]``."""
    if not samples:
        raise EvalDataError("empty batch")
    batch: dict[str, Any] = {"images": torch.stack([_as_image_tensor(s["image"], transform) for s in samples])}
    if all(s.get("labels") is not None for s in samples):
        batch["labels"] = torch.stack([_labels_vector(s["labels"], label_names) for s in samples])
    batch["reports"] = [s.get("report") for s in samples]
    batch["masks"] = [s.get("mask") for s in samples]
    batch["index"] = torch.tensor([int(s.get("index", -1)) for s in samples], dtype=torch.int64)
    for key in ("findings", "finding_sentences", "finding_masks"):
        if any(key in s for s in samples):
            batch[key] = [s.get(key) for s in samples]
    return batch


def iter_batches(
    data,
    *,
    batch_size: int = 32,
    transform=None,
    label_names: Optional[Sequence[str]] = None,
    max_samples: Optional[int] = None,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "eval",
) -> Iterator[dict]:
    """Iterate ``data`` (map-style dataset, iterable dataset, list of sample dicts, or DataLoader) as eval
    batches with a tqdm bar. A DataLoader's batches pass through (``image`` renamed ``images``); anything else is
    batched with ``collate_samples``. ``max_samples`` stops after that many samples."""
    if isinstance(data, DataLoader):
        loader: Iterable = data
        total = len(data.dataset) if hasattr(data.dataset, "__len__") else None
    elif isinstance(data, IterableDataset):  # e.g. a ShardSplit: streamed in its own order, batched here
        loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                            collate_fn=functools.partial(collate_samples, transform=transform, label_names=label_names))
        total = len(data) if hasattr(data, "__len__") else None
    else:
        if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
            raise EvalDataError(f"evaluation data must be a dataset, a list of samples or a DataLoader, got {type(data).__name__}")
        n = len(data)
        if n == 0:
            raise EvalDataError("the evaluation dataset is empty")
        if max_samples is not None:
            data = Subset(data, range(min(n, max_samples))) if isinstance(data, Dataset) else list(data)[:max_samples]
        loader = DataLoader(
            data, batch_size=batch_size, shuffle=False, num_workers=num_workers,
            collate_fn=functools.partial(collate_samples, transform=transform, label_names=label_names),
        )
        total = len(data)
    if max_samples is not None and total is not None:
        total = min(total, max_samples)
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=no_bar(progress), leave=False, dynamic_ncols=True) as bar:
        for batch in loader:
            if "images" not in batch and "image" in batch:
                batch = {**batch, "images": batch["image"]}
            if "images" not in batch:
                raise EvalDataError(f"batch has no 'images'; keys: {sorted(batch)}")
            b = batch["images"].shape[0]
            if max_samples is not None and seen + b > max_samples:
                keep = max_samples - seen
                batch = {k: (v[:keep] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}
                b = keep
            seen += b
            bar.update(b)
            yield batch
            if max_samples is not None and seen >= max_samples:
                break


def _base_item(data, i: int) -> tuple:
    """(dataset, index) under any ``Subset`` wrappers."""
    while isinstance(data, Subset):
        i, data = int(data.indices[i]), data.dataset
    return data, i


def screen_samples(data, max_bad_fraction: float, name: str = "evaluation data", progress: bool = True) -> tuple:
    """Reads every sample of ``data`` once and leaves out those that cannot be read (a missing, empty,
    corrupt or unsupported image file), so that no metric counts a substitute or stops half-way.

    Returns ``(data, skipped)``: ``data`` itself, or a ``Subset`` of its readable samples, and
    ``[{"index", "source", "reason"}]``. A dataset of ``mlip_fast.data`` (a ``RobustDataset``) is probed item by item
    (its reads would otherwise deliver the next good item in place of a bad one). An iterable dataset (a
    shard split, which skips its own bad samples) is returned unchanged.

    Raises:
        EvalDataError: more than ``max_bad_fraction`` of the samples are bad (every one is named, with the
            ``--max-bad-fraction`` that would accept them), or none is readable.
    """
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        return data, []
    n = len(data)
    good, skipped = [], []
    for i in tqdm(range(n), desc=f"reading {name}", unit="img", disable=no_bar(progress), leave=False):
        base, j = _base_item(data, i)
        if hasattr(base, "probe"):
            reason, source = base.probe(j), base.source_of(j)
        else:
            try:
                data[i]
                reason = None
            except (ImageLoadError, SampleError) as err:
                reason, source = err.reason, getattr(err, "path", None) or getattr(err, "source", f"sample {i}")
        if reason is None:
            good.append(i)
        else:
            skipped.append({"index": i, "source": str(source), "reason": reason})
    if skipped and len(skipped) > max_bad_fraction * n:
        needed = math.ceil(100 * len(skipped) / n) / 100
        raise EvalDataError(
            f"{name}: {len(skipped)} of {n} samples cannot be read ({100 * len(skipped) / n:.2f}% > --max-bad-fraction "
            f"{max_bad_fraction:g}): " + "; ".join(f"{s['source']}: {s['reason']}" for s in skipped)
            + f". Fix or remove them, or pass --max-bad-fraction {needed:g} to evaluate without them")
    if not good:
        raise EvalDataError(f"{name}: no sample can be read")
    return (Subset(data, good) if skipped else data), skipped


def local_matching_of(model, local_matching: Optional[str] = None) -> LocalMatching:
    """How evaluation matches patches and sentences: ``local_matching`` ("max" / "ot"), or with None the model
    config's (the matching it was trained with); the OT settings are always the model config's (the defaults for
    a stand-in model whose config has none)."""
    cfg, default = model.config, LocalMatching()
    mode = getattr(cfg, "local_matching", default.mode) if local_matching is None else local_matching
    return LocalMatching(mode, getattr(cfg, "ot_eps", default.ot_eps), getattr(cfg, "ot_iters", default.ot_iters)).checked()


def l2_normalise(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / ||x|| in float32 (zero vectors stay zero)."""
    return torch.nn.functional.normalize(x.float(), dim=dim, eps=1e-12)


def write_summary(
    out_dir: str | os.PathLike,
    task: str,
    metrics: Mapping,
    *,
    checkpoint: Any = None,
    data: Any = None,
    seed: Optional[int] = None,
    wall_time_s: Optional[float] = None,
    settings: Optional[Mapping] = None,
    plots: Sequence[str | os.PathLike] = (),
    filename: str = SUMMARY_FILE,
) -> Path:
    """Write ``out_dir/summary.json`` (task, metrics, checkpoint, data, seed, settings, versions, wall
    time, plot files relative to ``out_dir``); non-finite numbers become null. Returns the path."""
    out = Path(out_dir)
    record = {
        "task": task,
        "metrics": metrics,
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "data": data,
        "seed": seed,
        "settings": dict(settings or {}),
        "plots": [os.path.relpath(p, out) for p in plots],
        "versions": versions(),
        "wall_time_s": wall_time_s,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }
    return write_run_record(out, record, filename)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a CPU generator seeded with ``seed`` for explicit draws."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
