"""Training order over shards: every sample once per epoch, shards split across ranks and loader
workers, a shuffle buffer, deterministic from the seed, exact resume.

Epoch ``e`` (``N`` samples, global batch ``G = b x A x R``: micro-batch, accumulation, ranks):

1. The split's shards are put in a permutation drawn from ``(seed, e)`` and concatenated into one
   stream of ``N`` positions; its first ``N_e = (N // G) x G`` positions are the epoch (the last
   incomplete global batch is dropped, as in the folder reader; which samples fall there changes with
   the permutation).
2. Rank ``r`` takes the contiguous positions ``[r x N_e / R, (r + 1) x N_e / R)``: it reads only its
   own shards (at most two of them partly, starting at a recorded byte offset).
3. The rank's ``M = (N // G) x A`` micro-batches are dealt to ``L`` lanes: micro-batch ``m`` comes from
   lane ``m % L``; lane ``l`` owns the next contiguous run of the rank's positions (as many as its
   micro-batches need). A lane streams its positions through webdataset's shuffle buffer (``B``
   samples, seeded by ``(seed, e, r, l)``, filled before the first draw) and cuts the result into
   micro-batches in order.
4. Each sample's augmentation is seeded by ``item_seed(epoch, index)`` (its source index), as in the
   folder reader, so a sample gets the same augmentation in an epoch whichever way it is read.

DataLoader workers run the lanes (``L = max(1, num_workers)`` in the training app; with ``W`` workers,
``W`` must divide ``L``; with no worker the main process runs all lanes). The loader's round-robin over
workers then yields micro-batches in the order ``m = 0, 1, 2, ...`` whatever ``W`` is, so the order
is a function of (shards, seed, R, b, A, L, B) alone.

Resume: ``start_step = s`` continues with exactly the micro-batches an uninterrupted run reads from step
``s`` on (same samples, order and augmentation) when the shards, seed, ranks, micro-batch,
accumulation, lanes and buffer are unchanged (``signature()`` records them). Each lane of the resumed
epoch re-reads, without decoding, the samples it had delivered earlier in that epoch, to rebuild its
shuffle buffer: at most one epoch of reading, no decoding.
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from .shard_reader import ShardSplit, make_item, read_samples, sample_index, webdataset
from .sources import DataConfigError

__all__ = ["ShardOrder", "ShardBatchStream", "DEFAULT_SHUFFLE_BUFFER"]

DEFAULT_SHUFFLE_BUFFER = 2000  # samples per lane; about 40 MB of 256 px JPEG bytes


def _seed(*words: int) -> int:
    return int(np.random.SeedSequence([w & 0xFFFFFFFF for w in words]).generate_state(1)[0])


@dataclass
class ShardOrder:
    """The plan of the module doc for one rank.

    Args:
        shard_sizes: samples per shard, in index order.
        micro_batch, accumulation, rank, world_size: the DeepSpeed batch layout.
        seed: data-order seed.
        lanes: L (>= 1).
        shuffle_buffer: B (1 = no shuffling within a lane).
        start_step: first optimizer step to deliver (resume).
        shard_ids: the shards' checksums (part of ``signature()``).
    """

    shard_sizes: list
    micro_batch: int
    accumulation: int
    rank: int
    world_size: int
    seed: int
    lanes: int = 1
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER
    start_step: int = 0
    shard_ids: tuple = ()

    def __post_init__(self):
        if self.lanes < 1 or self.shuffle_buffer < 1:
            raise ValueError(f"lanes and shuffle_buffer must be >= 1, got {self.lanes} and {self.shuffle_buffer}")
        self.shard_sizes = [int(n) for n in self.shard_sizes]
        self.num_samples = sum(self.shard_sizes)
        self.global_batch = self.micro_batch * self.accumulation * self.world_size
        if self.num_samples < self.global_batch:
            raise DataConfigError(f"the training split has {self.num_samples} samples, fewer than one global batch "
                                  f"({self.global_batch}); use more data or a smaller train_batch_size")
        self.steps_per_epoch = self.num_samples // self.global_batch
        self.micro_per_epoch = self.steps_per_epoch * self.accumulation  # M, per rank

    def position(self, step: int) -> tuple:
        """(epoch, step_in_epoch) of optimizer step ``step``."""
        return divmod(int(step), self.steps_per_epoch)

    def signature(self) -> dict:
        """What the order depends on beyond the batch layout (stored in checkpoints, compared on resume)."""
        ids = hashlib.sha256("".join(self.shard_ids).encode()).hexdigest()[:16] if self.shard_ids else None
        return {"kind": "shards", "num_samples": self.num_samples, "lanes": self.lanes,
                "shuffle_buffer": self.shuffle_buffer, "shards": ids}

    def shard_permutation(self, epoch: int) -> list:
        rng = np.random.default_rng(_seed(self.seed, 3, epoch))
        return rng.permutation(len(self.shard_sizes)).tolist()

    def lane_micro_batches(self, lane: int) -> int:
        """Micro-batches lane ``lane`` delivers per epoch: ``|{m < M : m % L == lane}|``."""
        return len(range(lane, self.micro_per_epoch, self.lanes))

    def lane_segments(self, epoch: int, lane: int) -> list:
        """``[(shard, first sample, count)]`` of the positions lane ``lane`` of this rank reads in ``epoch``."""
        per_rank = self.micro_per_epoch * self.micro_batch
        start = self.rank * per_rank + self.micro_batch * sum(self.lane_micro_batches(k) for k in range(lane))
        end = start + self.lane_micro_batches(lane) * self.micro_batch
        segments, pos = [], 0
        for shard in self.shard_permutation(epoch):
            size = self.shard_sizes[shard]
            lo, hi = max(start, pos), min(end, pos + size)
            if lo < hi:
                segments.append((shard, lo - pos, hi - lo))
            pos += size
            if pos >= end:
                break
        return segments

    def lane_seed(self, epoch: int, lane: int) -> int:
        return _seed(self.seed, 4, epoch, self.rank, lane)


class ShardBatchStream(IterableDataset):
    """Collated micro-batches of one rank in the order of ``ShardOrder``, without end (the training loop
    decides when to stop). Use with ``DataLoader(stream, batch_size=None, num_workers=W)``, ``W`` a divisor
    of ``order.lanes`` (or 0).

    Args:
        split: the training ``ShardSplit`` (its transform is applied to each image).
        order: the plan.
        collate: list of items -> batch (e.g. the training ``Collator``).
        item_seed: ``(epoch, index) -> int`` seed of one sample's augmentation (python, numpy and torch
            are seeded with it before the transform runs).
    """

    def __init__(self, split: ShardSplit, order: ShardOrder, collate: Callable, item_seed: Callable[[int, int], int]):
        if [s["samples"] for s in split.shards] != order.shard_sizes:
            raise ValueError("the order was planned for other shards than this split's")
        self.split, self.order, self.collate, self.item_seed = split, order, collate, item_seed

    def _lane(self, epoch: int, lane: int, skip: int) -> Iterator[list]:
        """Micro-batches (lists of items) of one lane in ``epoch`` after the first ``skip``."""
        order, shards = self.order, self.split.shards
        raw = (sample for shard, first, count in order.lane_segments(epoch, lane)
               for sample in read_samples(shards[shard]["file"], shards[shard]["offsets"][first], count))
        shuffle = webdataset().shuffle(order.shuffle_buffer, order.shuffle_buffer,
                                       rng=random.Random(order.lane_seed(epoch, lane)))
        shuffled = shuffle(raw)
        samples = islice(shuffled, skip * order.micro_batch, None)
        while True:
            chunk = list(islice(samples, order.micro_batch))
            if not chunk:
                return
            yield [self._item(sample, epoch) for sample in chunk]

    def _item(self, sample: dict, epoch: int) -> dict:
        seed = self.item_seed(epoch, sample_index(sample))
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        return make_item(sample, self.split.transform, bool(self.split.label_names), self.split.decoder)

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = self.order
        if order.lanes % workers:
            raise ValueError(f"{workers} loader workers cannot share {order.lanes} lanes evenly")
        first = order.start_step * order.accumulation  # micro-batches this rank has already consumed
        M, L = order.micro_per_epoch, order.lanes
        epoch = first // M
        while True:
            m0 = first - epoch * M if epoch == first // M else 0
            # loader position k is served by worker k % W and carries micro-batch first + k
            mine = [m for m in range(m0, M) if (m - (first + worker - epoch * M)) % workers == 0]
            lanes = {}
            for lane in sorted({m % L for m in mine}):
                skip = len(range(lane, m0, L))  # micro-batches of this lane before m0
                lanes[lane] = self._lane(epoch, lane, skip)
            for m in mine:
                yield self.collate(next(lanes[m % L]))
            epoch += 1
