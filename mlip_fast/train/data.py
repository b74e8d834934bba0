"""Training data: the synthetic benchmark cache, the dataset readers, and a resumable data order.

Data order. :class:`GlobalBatchSampler` fixes, for every optimizer step ``s``, the global batch as a
slice of a permutation of the training set drawn from ``(seed, epoch)``; each rank takes its rows of
each micro-batch. The order is therefore a function of the step alone: resuming at step ``s`` replays
exactly what an uninterrupted run would have read, and a run on N processes reads the same global batch
as one process with an N times larger micro-batch. Each sample's augmentation is seeded from
``(seed, epoch, index)`` (:class:`SeededSamples`), so it does not depend on workers or ranks either.
A shard folder is read in the order of :class:`~mlip_fast.data.shard_order.ShardOrder` instead (each rank
reads its own shards; exact resume with the same ranks and loader workers; same per-sample seeds).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mlip_fast.data import synth
from mlip_fast.data.collate import Collator
from mlip_fast.data.readers import DatasetError
from mlip_fast.data.shard_order import DEFAULT_SHUFFLE_BUFFER, ShardBatchStream, ShardOrder
from mlip_fast.data.shard_reader import ShardSplit
from mlip_fast.data.sources import DataConfigError, build_pretrain_dataset
from mlip_fast.preprocess.images import ImageLoadError, load_image
from mlip_fast.preprocess.tokenization import fast_tokenizer, tokenize_reports

__all__ = ["synthetic_cache_dir", "prepare_synthetic", "build_pretrain_dataset", "GlobalBatchSampler",
           "SeededSamples", "make_collator", "make_batch_plan", "train_subset", "report_corpus", "data_fingerprint",
           "make_train_loader", "close_loader", "sample_seed", "sample_seeds", "step_seed", "MemoryPairs",
           "memory_batches", "DataConfigError"]


def synthetic_cache_dir(cache_dir: Path, size: int, n: int, seed: int) -> Path:
    return Path(cache_dir) / f"synthetic-{size}-{n}-{seed}"


def _cached_fingerprint(folder: Path):
    try:
        return json.loads((folder / "summary.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def prepare_synthetic(cache_dir: Path, size: int, n: int, seed: int, workers: int = 2,
                      log: Callable[[str], None] = print) -> Path:
    """The synthetic benchmark's ``master.csv``, generated on first use (``workers`` processes).

    The cache is kept by content: it is used when the fingerprint its ``summary.json`` records is the one this
    generator gives for these parameters (:func:`mlip_fast.data.synth.generator_fingerprint`), and generated
    again otherwise (a cache written by an older generator, or one without a fingerprint), so a change of the
    generator never trains on stale data. Generation writes into a temporary sibling folder and renames it into
    place (a stale cache is moved aside first), so an interrupted generation never leaves a half-written cache
    that a later run would trust; concurrent generators (one per node) race harmlessly: the first rename wins,
    the others discard their copy.
    """
    target = synthetic_cache_dir(cache_dir, size, n, seed)
    master = target / "master.csv"
    wanted = synth.generator_fingerprint(n, seed, size)
    if master.is_file() and _cached_fingerprint(target) == wanted:
        log(f"synthetic benchmark: using the cache {target}")
        return master
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    stale = target.exists()
    log(f"synthetic benchmark: generating {n} images at {size} px (seed {seed}) into {target}"
        + (" (the cache there was written by another generator)" if stale else ""))
    synth.generate(tmp, n=n, seed=seed, size=size, workers=workers)
    if stale:
        aside = target.parent / f".{target.name}.stale-{os.getpid()}"
        try:
            os.rename(target, aside)
        except OSError:
            pass  # another generator moved it first
        shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if _cached_fingerprint(target) != wanted:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"synthetic benchmark: generated in {time.perf_counter() - start:.1f} s")
    return master


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation in one epoch (independent of batch layout, workers and ranks)."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, 1, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """``[sample_seed(seed, epoch, i) for i in indices]`` as uint64, for many samples in a few numpy passes: numpy's
    ``SeedSequence`` hash (entropy [seed & 0xFFFFFFFF, 1, epoch, index], pool of 4 words, one uint64 drawn) written
    out over arrays in its uint32 arithmetic. Values of 2^32 and above take ``sample_seed``'s own path."""
    indices = np.asarray(indices, dtype=np.int64)
    if epoch >= 2**32 or (indices.size and (indices.min() < 0 or indices.max() >= 2**32)):
        return np.array([sample_seed(seed, epoch, int(i)) for i in indices], dtype=np.uint64)
    u32 = np.uint32
    words = [np.full(indices.shape, v, dtype=u32) for v in (seed & 0xFFFFFFFF, 1, epoch)] + [indices.astype(u32)]
    with np.errstate(over="ignore"):
        const = u32(0x43B0D7E5)

        def hashmix(value):
            nonlocal const
            value = value ^ const
            const = u32(const * u32(0x931E8875))
            value = value * const
            return value ^ (value >> u32(16))

        pool = [hashmix(w) for w in words]
        for src in range(4):
            for dst in range(4):
                if src != dst:
                    mixed = u32(0xCA01F9DD) * pool[dst] - u32(0x4973F715) * hashmix(pool[src])
                    pool[dst] = mixed ^ (mixed >> u32(16))
        const, out = u32(0x8B51F9DD), []
        for word in pool[:2]:
            value = (word ^ const) * u32(const * u32(0x58F38DED))
            const = u32(const * u32(0x58F38DED))
            out.append(value ^ (value >> u32(16)))
    return (out[0].astype(np.uint64) | (out[1].astype(np.uint64) << np.uint64(32))) >> np.uint64(1)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """Seed of the model's randomness (masking, dropout) at one micro-step on one rank."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, 2, step, micro, rank]).generate_state(1, np.uint64)[0] >> 1)


class SeededSamples(Dataset):
    """Wraps a dataset so that item ``(index, seed)`` is read with python / numpy / torch seeded by
    ``seed``: the random augmentation of a sample is reproducible wherever it is read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return self.dataset[index]


class GlobalBatchSampler:
    """Batch sampler of one rank: for step ``s`` (epoch ``e = s // steps_per_epoch``), the global batch is
    ``perm_e[i * G : (i + 1) * G]`` with ``i = s % steps_per_epoch`` and ``perm_e`` a permutation drawn
    from ``(seed, e)``; micro-batch ``m`` of rank ``r`` is its rows ``[(m * W + r) * b, (m * W + r + 1) * b)``
    (G = b x accumulation x W). Yields lists of ``(index, sample_seed)``, from ``start_step`` on, without end
    (the loop decides when to stop). The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, num_samples: int, micro_batch: int, accumulation: int, rank: int, world_size: int,
                 seed: int, start_step: int = 0):
        self.num_samples = int(num_samples)
        self.micro_batch = int(micro_batch)
        self.accumulation = int(accumulation)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.start_step = int(start_step)
        self.global_batch = self.micro_batch * self.accumulation * self.world_size
        if self.num_samples < self.global_batch:
            raise DataConfigError(f"the training split has {self.num_samples} samples, fewer than one global batch "
                                  f"({self.global_batch}); use more data or a smaller train_batch_size")
        self.steps_per_epoch = self.num_samples // self.global_batch

    def position(self, step: int) -> tuple:
        """(epoch, step_in_epoch) of optimizer step ``step``."""
        return divmod(int(step), self.steps_per_epoch)

    def signature(self) -> dict:
        """What the order depends on beyond the batch layout and seed (compared on resume)."""
        return {"kind": "permutation", "num_samples": self.num_samples}

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed & 0xFFFFFFFF, 0, epoch]).generate_state(1)[0]))
        return torch.randperm(self.num_samples, generator=g)

    def __iter__(self) -> Iterator[list]:
        step, epoch = self.start_step, None
        while True:
            e, i = self.position(step)
            if e != epoch:  # the epoch's order and every index's sample_seed
                epoch, perm = e, self._permutation(e)
                seeds = sample_seeds(self.seed, epoch, np.arange(self.num_samples)).tolist()
            rows = perm[i * self.global_batch:(i + 1) * self.global_batch].tolist()
            for m in range(self.accumulation):
                start = (m * self.world_size + self.rank) * self.micro_batch
                yield [(idx, seeds[idx]) for idx in rows[start:start + self.micro_batch]]
            step += 1


def make_collator(tokenizer, max_length: int, max_sentences: int):
    """The data package's ``Collator``. Each batch keeps its own S (its longest report, at most
    ``max_sentences``): the losses pad ragged S across ranks themselves (``mlip_fast.distributed.gather``) and
    the contrastive accumulation pads it across micro-batches (``mlip_fast.train.accum``)."""
    return Collator(tokenizer, max_length, max_sentences)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this worker when the training process ends, however it ends (an error exit
    through ``os._exit``, kill -9): a worker that ignores SIGTERM and holds the rendezvous port's socket must not
    outlive the run."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # the parent ended before prctl took effect
        os._exit(1)


def _worker_init(_worker_id: int) -> None:
    # Stop signals are handled by the training process, which checkpoints and then shuts the workers down;
    # a worker dying on Ctrl-C / SIGTERM first would turn that into a DataLoader crash.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)


def make_batch_plan(dataset: Dataset, micro_batch: int, accumulation: int, rank: int, world_size: int, seed: int,
                    num_workers: int, shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER):
    """The data order of a run: a :class:`GlobalBatchSampler` for a map-style dataset, a
    :class:`~mlip_fast.data.shard_order.ShardOrder` (one lane per loader worker) for a shard split."""
    if isinstance(dataset, ShardSplit):
        return ShardOrder([s["samples"] for s in dataset.shards], micro_batch, accumulation, rank, world_size, seed,
                          lanes=max(1, num_workers), shuffle_buffer=shuffle_buffer,
                          shard_ids=tuple(s["sha256"] for s in dataset.shards))
    return GlobalBatchSampler(len(dataset), micro_batch, accumulation, rank, world_size, seed)


def train_subset(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The training pairs of a run with ``--train-fraction``: max(1, round(fraction x N)) of the N pairs, the first
    ones of a permutation drawn from ``seed`` (kept in file order). One seed's subsets are nested, a smaller
    fraction's pairs among a larger one's, so a data-efficiency curve changes the amount of data and nothing else;
    ``fraction`` 1 is the dataset itself."""
    if not 0.0 < fraction <= 1.0:  # NaN fails too
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return dataset
    if not hasattr(dataset, "subset"):
        raise DataConfigError(f"--train-fraction needs image-report pairs read from an index file; "
                              f"{type(dataset).__name__} (a shard folder) is streamed")
    n = len(dataset)
    order = np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, 3])).permutation(n)
    return dataset.subset(sorted(order[:max(1, round(fraction * n))].tolist()))


def report_corpus(dataset: Dataset) -> list:
    """Every training report (for the tokenizer of a randomly initialised text tower)."""
    if isinstance(dataset, ShardSplit):
        return dataset.reports()
    return [r["report"] for r in dataset.records]


def data_fingerprint(dataset: Dataset) -> str:
    """A short hash of what the training set holds, recorded in checkpoints and compared on resume: the
    shard hashes of a shard split, else every record's image file name and report (file names, not full
    paths, so that moving the data does not change it)."""
    h = hashlib.sha256()
    if isinstance(dataset, ShardSplit):
        for shard in dataset.shards:
            h.update(f"{shard['sha256']}\n".encode())
    else:
        for rec in dataset.records:
            name = Path(rec["image_path"]).name if rec.get("image_path") is not None else ""
            h.update(f"{name}\t{rec['report']}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def close_loader(batches) -> None:
    """Shuts down the workers of a DataLoader iterator now, on every path out of training (an error's traceback
    keeps the iterator alive, and the process ends with ``os._exit``, so its finaliser would never run). Workers
    ignore SIGTERM (see ``_worker_init``), so one still alive after the orderly shutdown is killed."""
    workers = list(getattr(batches, "_workers", ()))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)


class MemoryPairs:
    """A map-style training split held in memory, ready to batch in the training process: every image decoded
    once (``load_image`` at the transform's size hint, as the dataset reads it) and every report tokenized once
    (``tokenize_reports`` over the whole split, as the collator tokenizes a batch). :meth:`batch` then gives,
    for a sampler's ``[(index, seed), ...]``, exactly the model inputs that ``SeededSamples`` + the collator
    give through a DataLoader (tested bitwise): each image through the same transform with its augmentation
    drawn from a generator seeded with the sample's seed, the token rows cut to the batch's longest report and
    sentence count. What it saves per step: the image decoding, the tokenization, seeding three global RNGs
    per sample and, with no loader workers, processes that compete with the step for the cores.

    An image that cannot be read is handled as the dataset handles it (the next readable item takes its place;
    more than the dataset's ``max_bad_fraction`` bad items is a :class:`DatasetError` naming them)."""

    def __init__(self, dataset, tokenizer, max_length: int, max_sentences: int, chunk: int = 512):
        self.dataset = dataset
        self.transform = dataset.transform
        size = getattr(self.transform, "image_size", None)
        self.images: list = [None] * len(dataset)
        for i, rec in enumerate(dataset.records):
            try:
                self.images[i] = load_image(rec["image_path"], max_side=size)
            except ImageLoadError:
                dataset.mark_bad([i])
        total = len(dataset) + len(dataset.dropped)
        if dataset.bad_count > dataset.max_bad_fraction * total:
            raise DatasetError(dataset.bad_summary(reprobe=True))
        reports = [rec["report"] for rec in dataset.records]
        parts = [tokenize_reports(tokenizer, reports[k:k + chunk], max_length, max_sentences)
                 for k in range(0, len(reports), chunk)]
        self.lengths = torch.cat([p["attention_mask"].sum(1) for p in parts])
        self.sentences = torch.cat([p["sentence_mask"].sum(1) for p in parts])
        t, s = max(p["input_ids"].shape[1] for p in parts), max(p["sentence_spans"].shape[1] for p in parts)
        pad = fast_tokenizer(tokenizer).pad_token_id
        self.input_ids = torch.cat([F.pad(p["input_ids"], (0, t - p["input_ids"].shape[1]), value=pad) for p in parts])
        self.attention_mask = torch.cat([F.pad(p["attention_mask"], (0, t - p["attention_mask"].shape[1])) for p in parts])
        self.sentence_spans = torch.cat([F.pad(p["sentence_spans"], (0, 0, 0, s - p["sentence_spans"].shape[1]))
                                         for p in parts])
        self.sentence_mask = torch.cat([F.pad(p["sentence_mask"], (0, s - p["sentence_mask"].shape[1])) for p in parts])

    def _readable(self, index: int) -> int:
        """``index`` or, when its image is bad, the next readable item (as ``RobustDataset.__getitem__``)."""
        n = len(self.images)
        for step in range(n):
            j = (index + step) % n
            if self.images[j] is not None:
                return j
        raise DatasetError(f"{self.dataset.name}: no readable item left")

    def batch(self, keys: list) -> dict:
        rows = [self._readable(int(index)) for index, _ in keys]
        batched = getattr(self.transform, "batch", None)  # ImageTransform: a few operators for the whole batch
        images = batched([self.images[j] for j in rows], [seed for _, seed in keys]) if batched else torch.stack(
            [self.transform(self.images[j], generator=torch.Generator().manual_seed(int(seed)))
             for j, (_, seed) in zip(rows, keys)])
        index = torch.as_tensor(rows, dtype=torch.int64)
        t, s = int(self.lengths[index].max()), int(self.sentences[index].max())
        return {"images": images, "input_ids": self.input_ids[index, :t], "attention_mask": self.attention_mask[index, :t],
                "sentence_spans": self.sentence_spans[index, :s], "sentence_mask": self.sentence_mask[index, :s],
                "index": index}


def memory_batches(pairs: MemoryPairs, sampler) -> Iterator[dict]:
    """The batches of ``sampler`` (a :class:`GlobalBatchSampler`) from ``pairs``, in the training process."""
    for keys in sampler:
        yield pairs.batch(keys)


def make_train_loader(dataset: Dataset, sampler, collate, num_workers: int) -> DataLoader:
    if isinstance(sampler, ShardOrder):
        return DataLoader(
            ShardBatchStream(dataset, sampler, collate, functools.partial(sample_seed, sampler.seed)),
            batch_size=None,
            num_workers=num_workers,
            worker_init_fn=_worker_init if num_workers > 0 else None,
            persistent_workers=False,
            prefetch_factor=4 if num_workers > 0 else None,
        )
    return DataLoader(
        SeededSamples(dataset),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
    )
