"""Training order over shards: once per epoch across ranks and lanes, worker-count independent, exact resume,
per-sample augmentation seeds, local reads."""
import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mlip_fast.data import shard_order
from mlip_fast.data.shard_order import ShardBatchStream, ShardOrder
from mlip_fast.data.shard_reader import ShardSplit, decode_image, read_samples, to_unit_float
from mlip_fast.data.shards import ShardConfig, write_shards
from mlip_fast.data.sources import DataConfigError
from mlip_fast.data.synth import generate
from mlip_fast.preprocess.transforms import ImageTransform


def seed_of(epoch, index):
    return 1000 * epoch + index


def ids(items):
    return [it["index"] for it in items]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """50 training samples in shards of 7 (the last one holds 1)."""
    root = tmp_path_factory.mktemp("order")
    master = generate(root / "synth", n=62, seed=1, size=24, workers=1, splits=(0.81, 0.1, 0.09))
    write_shards(str(master), root / "shards", ShardConfig(size=24, image_format="png", shard_size=7), progress=False)
    split = ShardSplit(root / "shards", "train")
    assert len(split) == 50 and [s["samples"] for s in split.shards][-1] == 1
    return root / "shards"


def stream(path, n, transform=None, **order_kw):
    split = ShardSplit(path, "train", transform=transform)
    order = ShardOrder([s["samples"] for s in split.shards], **order_kw)
    return list(itertools.islice(iter(ShardBatchStream(split, order, ids, seed_of)), n)), order


def test_every_sample_once_per_epoch_across_ranks_and_lanes(shards):
    micro, accum, world = 3, 2, 2  # G = 12: 4 steps per epoch, 2 of 50 samples dropped per epoch
    per_rank = [stream(shards, 3 * 4 * accum, micro_batch=micro, accumulation=accum, rank=r, world_size=world,
                       seed=5, lanes=3, shuffle_buffer=10)[0] for r in range(world)]
    epochs = []
    for e in range(3):
        batches = [b for r in range(world) for b in per_rank[r][e * 8:(e + 1) * 8]]
        assert all(len(b) == micro for b in batches)
        seen = sum(batches, [])
        assert len(seen) == len(set(seen)) == 48 and set(seen) <= set(range(50))
        epochs.append(seen)
    assert epochs[0] != epochs[1] != epochs[2]
    again, _ = stream(shards, 8, micro_batch=micro, accumulation=accum, rank=0, world_size=world, seed=5, lanes=3,
                      shuffle_buffer=10)
    other, _ = stream(shards, 8, micro_batch=micro, accumulation=accum, rank=0, world_size=world, seed=6, lanes=3,
                      shuffle_buffer=10)
    assert again == per_rank[0][:8] != other


def test_ranks_read_contiguous_runs_of_the_shard_stream(shards):
    split = ShardSplit(shards, "train")
    sizes = [s["samples"] for s in split.shards]
    orders = [ShardOrder(sizes, 2, 1, r, 4, seed=0, lanes=2) for r in range(4)]  # 6 steps of 8
    stream_ids = []
    for shard in orders[0].shard_permutation(1):
        stream_ids += [int(s["__key__"][1:]) for s in read_samples(split.shards[shard]["file"])]
    for order in orders:
        segments = [seg for lane in range(2) for seg in order.lane_segments(1, lane)]
        assert len({shard for shard, _, _ in segments}) <= 48 // 4 // 7 + 2  # its own shards, not all 8
        read = [i for shard, first, count in segments
                for i in [int(s["__key__"][1:]) for s in read_samples(split.shards[shard]["file"])][first:first + count]]
        assert read == stream_ids[order.rank * 12:(order.rank + 1) * 12]


def test_order_does_not_depend_on_the_worker_count(shards, monkeypatch):
    kw = dict(micro_batch=2, accumulation=1, rank=0, world_size=1, seed=3, lanes=2, shuffle_buffer=6)
    in_process, order = stream(shards, 40, **kw)  # 40 batches: 1.6 epochs
    split = ShardSplit(shards, "train")
    for workers in (1, 2):
        loader = torch.utils.data.DataLoader(ShardBatchStream(split, order, ids, seed_of), batch_size=None,
                                             num_workers=workers)
        assert list(itertools.islice(iter(loader), 40)) == in_process
    monkeypatch.setattr(shard_order, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=3))
    with pytest.raises(ValueError, match="3 loader workers"):
        next(iter(ShardBatchStream(split, order, ids, seed_of)))


@pytest.mark.parametrize("start", [1, 4, 6, 11, 13])
def test_resume_replays_what_an_uninterrupted_run_reads(shards, start):
    kw = dict(micro_batch=2, accumulation=3, rank=1, world_size=2, seed=9, lanes=4, shuffle_buffer=5)  # 4 steps/epoch
    full, _ = stream(shards, 3 * 18, **kw)
    resumed, _ = stream(shards, 3 * 5, start_step=start, **kw)
    assert resumed == full[3 * start:3 * start + 15]


def test_resume_through_two_loader_workers(shards):
    kw = dict(micro_batch=2, accumulation=1, rank=0, world_size=1, seed=2, lanes=2, shuffle_buffer=4)
    full, order = stream(shards, 40, **kw)
    split = ShardSplit(shards, "train")
    resumed = ShardOrder(order.shard_sizes, start_step=27, **kw)  # mid-epoch 1, odd position
    loader = torch.utils.data.DataLoader(ShardBatchStream(split, resumed, ids, seed_of), batch_size=None, num_workers=2)
    assert list(itertools.islice(iter(loader), 13)) == full[27:40]


def test_augmentation_is_seeded_per_sample_and_epoch(shards):
    tf = ImageTransform(24, train=True)
    split = ShardSplit(shards, "train", transform=tf)
    order = ShardOrder([s["samples"] for s in split.shards], 5, 1, 0, 1, seed=0, lanes=1, start_step=10)  # epoch 1
    batch = next(iter(ShardBatchStream(split, order, list, seed_of)))
    raw = {int(s["__key__"][1:]): s for shard in split.shards for s in read_samples(shard["file"])}
    for item in batch:
        torch.manual_seed(seed_of(1, item["index"]))  # what the folder reader's SeededSamples does
        expected = tf(to_unit_float(decode_image(raw[item["index"]]["png"])))
        torch.testing.assert_close(item["image"], expected, rtol=0, atol=0)


def test_shuffle_buffer_of_one_keeps_the_stream_order(shards):
    out, order = stream(shards, 24, micro_batch=2, accumulation=1, rank=0, world_size=1, seed=4, lanes=1,
                        shuffle_buffer=1)
    split = ShardSplit(shards, "train")
    expected = [int(s["__key__"][1:]) for shard in order.shard_permutation(0)
                for s in read_samples(split.shards[shard]["file"])][:48]
    assert sum(out, []) == expected
    assert np.mean(np.diff(expected) > 0) > 0.2  # the stored training order is itself shuffled


def test_too_few_samples_and_bad_settings():
    with pytest.raises(DataConfigError, match="fewer than one global batch"):
        ShardOrder([3, 2], 4, 1, 0, 2, seed=0)
    with pytest.raises(ValueError, match="lanes"):
        ShardOrder([10], 1, 1, 0, 1, seed=0, lanes=0)
    sig = ShardOrder([10, 10], 2, 1, 0, 1, seed=0, lanes=2, shard_ids=("a", "b")).signature()
    assert sig != ShardOrder([10, 10], 2, 1, 0, 1, seed=0, lanes=1, shard_ids=("a", "b")).signature()
    assert sig != ShardOrder([10, 10], 2, 1, 0, 1, seed=0, lanes=2, shard_ids=("a", "c")).signature()
