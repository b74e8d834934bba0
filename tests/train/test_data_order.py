"""The resumable data order: a function of the step alone, split across ranks, seeded per sample."""
import itertools
import os

import numpy as np
import pytest
import torch

from mlip_fast.models import get_tokenizer
from mlip_fast.preprocess.tokenization import tokenize_reports
from mlip_fast.train.data import (DataConfigError, GlobalBatchSampler, MemoryPairs, SeededSamples, make_collator,
                                  make_train_loader, memory_batches, prepare_synthetic, sample_seed, sample_seeds,
                                  step_seed, synthetic_cache_dir)


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def indices(batch):
    return [i for i, _ in batch]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    n, micro = 23, 5  # 4 steps per epoch, 3 samples dropped each epoch
    s = GlobalBatchSampler(n, micro, 1, 0, 1, seed=7)
    assert s.steps_per_epoch == 4
    epochs = [sum((indices(b) for b in take(GlobalBatchSampler(n, micro, 1, 0, 1, 7, start_step=4 * e), 4)), [])
              for e in range(3)]
    for e in epochs:
        assert len(e) == len(set(e)) == 20 and set(e) <= set(range(n))
    assert epochs[0] != epochs[1] != epochs[2]
    assert take(s, 12) == take(GlobalBatchSampler(n, micro, 1, 0, 1, 7), 12)  # deterministic
    assert take(s, 4) != take(GlobalBatchSampler(n, micro, 1, 0, 1, 8), 4)  # seed matters


def test_resuming_at_a_step_replays_the_same_batches():
    full = take(GlobalBatchSampler(50, 4, 2, 0, 1, seed=3), 2 * 30)  # 2 micro-batches per step
    for start in (0, 1, 5, 6, 13):
        resumed = take(GlobalBatchSampler(50, 4, 2, 0, 1, seed=3, start_step=start), 2 * 4)
        assert resumed == full[2 * start:2 * start + 8]


@pytest.mark.parametrize("world, accumulation", [(2, 1), (3, 2), (4, 1)])
def test_ranks_split_the_one_process_global_batch(world, accumulation):
    n, micro = 97, 3
    global_batch = micro * accumulation * world
    one = take(GlobalBatchSampler(n, global_batch, 1, 0, 1, seed=1), 6)
    per_rank = [take(GlobalBatchSampler(n, micro, accumulation, r, world, seed=1), 6 * accumulation)
                for r in range(world)]
    for step in range(6):
        # micro-batch m of every rank, in rank order, concatenated over m = the one-process batch
        rows = [per_rank[r][step * accumulation + m] for m in range(accumulation) for r in range(world)]
        assert sum(rows, []) == one[step]


def test_sample_seeds_depend_on_sample_and_epoch_only():
    a = GlobalBatchSampler(40, 4, 1, 0, 1, seed=0)
    seeds = {i: s for b in take(a, 10) for i, s in b}
    assert all(s == sample_seed(0, 0, i) for i, s in seeds.items())
    assert sample_seed(0, 0, 5) != sample_seed(0, 1, 5) != sample_seed(1, 0, 5)
    assert step_seed(0, 3, 0, 0) != step_seed(0, 3, 0, 1) != step_seed(0, 4, 0, 0)
    assert 0 <= sample_seed(2**40, 3, 7) < 2**63


@pytest.mark.parametrize("seed", [0, 1, 2**40 + 5, 2**63 - 1])
@pytest.mark.parametrize("epoch", [0, 3, 2**31, 2**32])
def test_vectorised_sample_seeds_are_numpys_seed_sequence(seed, epoch):
    # the array form re-implements SeedSequence's uint32 hash: every value against numpy's own, index extremes in
    indices = np.concatenate([[0, 1, 2**32 - 1, 2**31], np.random.default_rng(seed % 1000).integers(0, 2**32, 200)])
    expected = [sample_seed(seed, epoch, int(i)) for i in indices]
    assert sample_seeds(seed, epoch, indices).tolist() == expected
    assert sample_seeds(seed, epoch, np.array([2**32, 5])).tolist() == [sample_seed(seed, epoch, 2**32),
                                                                       sample_seed(seed, epoch, 5)]
    assert sample_seeds(seed, epoch, np.array([], dtype=np.int64)).tolist() == []


def test_sampler_seeds_follow_the_epoch_across_its_boundary():
    sampler = GlobalBatchSampler(10, 3, 1, 0, 1, seed=7)  # 3 steps per epoch: 7 steps span three epochs
    for step, batch in enumerate(take(sampler, 7)):
        epoch = step // 3
        assert [s for _, s in batch] == [sample_seed(7, epoch, i) for i, _ in batch]


def test_too_little_data_for_one_global_batch():
    with pytest.raises(DataConfigError, match="fewer than one global batch"):
        GlobalBatchSampler(7, 4, 1, 0, 2, seed=0)


def test_seeded_samples_make_augmentation_reproducible(synthetic_cache):
    from mlip_fast.data.pretrain import PretrainDataset
    from mlip_fast.preprocess.transforms import ImageTransform

    master = synthetic_cache_dir(synthetic_cache, 32, 48, 0) / "master.csv"
    ds = SeededSamples(PretrainDataset(master, split="train", transform=ImageTransform(32, train=True)))
    first = ds[(3, 1234)]["image"]
    torch.rand(100)  # whatever ran in between
    assert torch.equal(ds[(3, 1234)]["image"], first)
    assert not torch.equal(ds[(3, 999)]["image"], first)


def test_synthetic_cache_is_generated_once_and_atomically(tmp_path):
    logs = []
    master = prepare_synthetic(tmp_path, 16, 12, seed=1, workers=1, log=logs.append)
    assert master == synthetic_cache_dir(tmp_path, 16, 12, 1) / "master.csv" and master.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    stamp = os.stat(master).st_mtime_ns
    prepare_synthetic(tmp_path, 16, 12, seed=1, workers=1, log=logs.append)
    assert os.stat(master).st_mtime_ns == stamp
    assert "using the cache" in logs[-1]


def test_training_batches_keep_their_own_sentence_count():
    """The app does not pad S to max_sentences: the losses pad ragged S across ranks and the accumulation across
    micro-batches (tests/test_distributed.py, tests/train/test_accum.py), so a batch is what the tokenizer gives."""
    tok = get_tokenizer("mlip-tiny")
    reports = ["Heart size is normal.", "No effusion. Lungs clear."]
    batch = make_collator(tok, 64, 7)([{"report": r} for r in reports])
    assert batch["sentence_mask"].shape == (2, 2) and batch["sentence_mask"].sum(1).tolist() == [1, 2]
    expected = tokenize_reports(tok, reports, 64, 7)
    for key in ("input_ids", "attention_mask", "sentence_spans", "sentence_mask"):
        assert torch.equal(batch[key], expected[key]), key


def _pairs_setup(synthetic_cache, tmp_path=None, break_image=None):
    import shutil

    from mlip_fast.data.pretrain import PretrainDataset
    from mlip_fast.preprocess.transforms import ImageTransform

    root = synthetic_cache_dir(synthetic_cache, 32, 48, 0)
    if break_image is not None:
        shutil.copytree(root, tmp_path / "data")
        root = tmp_path / "data"
    dataset = PretrainDataset(root / "master.csv", split="train", transform=ImageTransform(32, train=True))
    if break_image is not None:
        (root / dataset.records[break_image]["image_path"]).write_bytes(b"not an image")
    tok = get_tokenizer("mlip-tiny", corpus=[r["report"] for r in dataset.records])
    return dataset, tok, make_collator(tok, 48, 5)  # small limits: truncated reports and dropped sentences too


@pytest.mark.parametrize("micro, accumulation, rank, world", [(4, 1, 0, 1), (3, 2, 1, 2)])
def test_in_memory_batches_equal_the_loaders_bitwise(synthetic_cache, micro, accumulation, rank, world):
    """``--in-memory`` changes where a batch is built, not what it holds: every model input of every batch (the
    augmented images, token ids, masks and sentence spans) is the DataLoader's, bitwise, over two epochs."""
    dataset, tok, collate = _pairs_setup(synthetic_cache)
    pairs = MemoryPairs(dataset, tok, collate.max_length, collate.max_sentences, chunk=7)  # ragged chunks
    sampler = GlobalBatchSampler(len(dataset), micro, accumulation, rank, world, seed=5)
    loaded = iter(make_train_loader(dataset, sampler, collate, 0))
    built = memory_batches(pairs, sampler)
    for _ in range(2 * sampler.steps_per_epoch * accumulation):
        a, b = next(loaded), next(built)
        for key in ("images", "input_ids", "attention_mask", "sentence_spans", "sentence_mask", "index"):
            assert torch.equal(a[key], b[key]), key


def test_in_memory_batches_replace_an_unreadable_image_as_the_dataset_does(synthetic_cache, tmp_path):
    dataset, tok, collate = _pairs_setup(synthetic_cache, tmp_path, break_image=2)
    dataset.max_bad_fraction = 0.1
    pairs = MemoryPairs(dataset, tok, collate.max_length, collate.max_sentences)
    assert dataset.bad_items() == [2]
    keys = [(2, 11), (5, 12)]
    batch = pairs.batch(keys)
    expected = collate([SeededSamples(dataset)[k] for k in keys])
    assert batch["index"].tolist() == [3, 5] == expected["index"].tolist()
    assert torch.equal(batch["images"], expected["images"]) and torch.equal(batch["input_ids"], expected["input_ids"])


def test_in_memory_refuses_too_many_unreadable_images(synthetic_cache, tmp_path):
    from mlip_fast.data.readers import DatasetError

    dataset, tok, collate = _pairs_setup(synthetic_cache, tmp_path, break_image=0)
    dataset.max_bad_fraction = 0.0
    with pytest.raises(DatasetError, match="items are bad"):
        MemoryPairs(dataset, tok, collate.max_length, collate.max_sentences)


def test_synthetic_cache_from_another_generator_is_generated_again(tmp_path):
    """The cache is kept by content: a folder whose recorded generator fingerprint differs (an older generator, or
    none recorded) is replaced, never trained on."""
    import json

    from mlip_fast.data.synth import generator_fingerprint

    master = prepare_synthetic(tmp_path, 16, 12, seed=1, workers=1, log=lambda _: None)
    summary = master.parent / "summary.json"
    record = json.loads(summary.read_text())
    assert record["fingerprint"] == generator_fingerprint(12, 1, 16) != generator_fingerprint(12, 2, 16)
    rows = master.read_bytes()
    summary.write_text(json.dumps({**record, "fingerprint": "from-an-older-generator"}))
    (master.parent / "images" / "s0000000.png").write_bytes(b"stale")
    logs = []
    assert prepare_synthetic(tmp_path, 16, 12, seed=1, workers=1, log=logs.append) == master
    assert "written by another generator" in logs[0]
    assert json.loads(summary.read_text())["fingerprint"] == record["fingerprint"]
    assert master.read_bytes() == rows and (master.parent / "images" / "s0000000.png").read_bytes() != b"stale"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
