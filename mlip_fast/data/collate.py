"""Batch assembly and the DataLoader factory.

``Collator(tokenizer)`` turns a list of dataset items into the batch of docs/architecture.md:
```
images          [B, C, H, W] float32          (items with "image")
input_ids       [B, T] int64                  (items with "report", via tokenize_reports)
attention_mask  [B, T] int64
sentence_spans  [B, S, 2] int64 token [start, end), zero for padding
sentence_mask   [B, S] bool
labels          [B, L] float32, NaN = unknown (items with "labels")
masks           [B, H, W] bool                (segmentation items with "mask")
index           [B] int64
reports         list[str]                     (the raw texts, for logging and retrieval)
```
Any other key is passed through as a list.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mlip_fast.preprocess.tokenization import tokenize_reports

__all__ = ["Collator", "make_loader"]

_TENSOR_KEYS = {"image": "images", "labels": "labels", "mask": "masks"}


class Collator:
    """Collate dataset items into a model batch.

    Args:
        tokenizer: a transformers fast tokenizer (None for image-only batches).
        max_length: T upper bound for the reports.
        max_sentences: S upper bound.
        tokenize_fn: ``fn(tokenizer, texts, max_length, max_sentences) -> dict`` producing the text part;
            default ``mlip_fast.preprocess.tokenization.tokenize_reports``.
    """

    def __init__(self, tokenizer=None, max_length: int = 128, max_sentences: int = 16,
                 tokenize_fn: Callable | None = None):
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.max_sentences = int(max_sentences)
        self.tokenize_fn = tokenize_reports if tokenize_fn is None else tokenize_fn

    def __call__(self, items: Sequence[dict]) -> dict:
        if not items:
            raise ValueError("Collator: empty batch")
        keys = set(items[0])
        for k, item in enumerate(items[1:], 1):
            if set(item) != keys:
                raise ValueError(f"Collator: item {k} has keys {sorted(item)}, item 0 has {sorted(keys)}")
        batch: dict = {}
        for key, out in _TENSOR_KEYS.items():
            if key in keys:
                values = [item[key] for item in items]
                shapes = {tuple(v.shape) for v in values}
                if len(shapes) != 1:
                    raise ValueError(f"Collator: {key!r} tensors differ in shape {sorted(shapes)}; "
                                     "use a transform with a fixed image_size")
                batch[out] = torch.stack(values)
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(torch.float32)
        if "report" in keys:
            texts = [item["report"] for item in items]
            if self.tokenizer is None:
                raise ValueError("Collator: items have reports but no tokenizer was given")
            batch.update(self.tokenize_fn(self.tokenizer, texts, self.max_length, self.max_sentences))
            batch["reports"] = texts
        if "index" in keys:
            batch["index"] = torch.as_tensor([int(item["index"]) for item in items], dtype=torch.int64)
        for key in sorted(keys - set(_TENSOR_KEYS) - {"report", "index"}):
            batch[key] = [item[key] for item in items]
        return batch


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds torch per worker; numpy and random follow from it so any library draw differs too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, collator: Callable, batch_size: int, shuffle: bool = True, num_workers: int = 0,
                seed: int = 0, drop_last: bool = False, world_size: int | None = None, rank: int | None = None,
                pin_memory: bool | None = None, prefetch_factor: int | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader with reproducible shuffling, seeded workers and, for ``world_size > 1``, a
    ``DistributedSampler`` (call ``loader.sampler.set_epoch(epoch)`` every epoch).

    Args:
        world_size, rank: default from ``torch.distributed`` when it is initialised, else 1 and 0.
        pin_memory: default True when CUDA is available.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size is None or rank is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
    generator = torch.Generator().manual_seed(int(seed))
    sampler = None
    if world_size > 1:
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                                      seed=int(seed), drop_last=drop_last)
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, worker_init_fn=_seed_worker)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        generator=generator,
        **kwargs,
    )
