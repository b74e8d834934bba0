"""Collator and loader: the batch contract of docs/architecture.md."""
import pytest
import torch

from mlip_fast.data.collate import Collator, make_loader
from mlip_fast.data.pretrain import PretrainDataset
from mlip_fast.data.synth import generate
from mlip_fast.preprocess.reports import split_sentences
from mlip_fast.preprocess.transforms import ImageTransform

from .test_datasets import _stand_in_tokenize


def _items(n=3, labels=True):
    out = []
    for i in range(n):
        item = {"image": torch.full((1, 8, 8), float(i)), "report": f"Heart normal {i}. No effusion.", "index": 10 + i}
        if labels:
            item["labels"] = torch.tensor([1.0, float("nan")])
        out.append(item)
    return out


def test_collate_with_stand_in_tokenizer():
    batch = Collator(tokenizer=object(), max_length=12, tokenize_fn=_stand_in_tokenize)(_items())
    assert batch["images"].shape == (3, 1, 8, 8) and batch["images"][2, 0, 0, 0] == 2
    assert batch["input_ids"].shape == (3, 12) and batch["input_ids"].dtype == torch.int64
    assert batch["sentence_spans"].shape == (3, 1, 2) and batch["sentence_mask"].dtype == torch.bool
    assert batch["labels"].dtype == torch.float32 and torch.isnan(batch["labels"][:, 1]).all()
    assert batch["index"].tolist() == [10, 11, 12]
    assert batch["reports"][1] == "Heart normal 1. No effusion."


def test_collate_image_only_masks_and_passthrough():
    items = [{"image": torch.zeros(1, 4, 4), "mask": torch.ones(4, 4, dtype=torch.bool), "index": i, "uid": f"u{i}"}
             for i in range(2)]
    batch = Collator()(items)
    assert batch["masks"].shape == (2, 4, 4) and batch["masks"].dtype == torch.bool
    assert batch["uid"] == ["u0", "u1"] and "input_ids" not in batch


def test_collate_errors():
    col = Collator(tokenizer=object(), tokenize_fn=_stand_in_tokenize)
    with pytest.raises(ValueError, match="empty batch"):
        col([])
    items = _items(2)
    items[1]["image"] = torch.zeros(1, 9, 9)
    with pytest.raises(ValueError, match="differ in shape"):
        col(items)
    items = _items(2)
    del items[1]["labels"]
    with pytest.raises(ValueError, match="keys"):
        col(items)
    with pytest.raises(ValueError, match="no tokenizer"):
        Collator()(_items(1))


def test_collate_with_the_real_tokenizer():
    from mlip_fast.preprocess.tokenization import default_tokenizer

    tok = default_tokenizer()
    items = _items(2)
    items[1]["report"] = "1. Small left pleural effusion measuring 1.5 cm. 2. Dr. Smith notified. No pneumothorax."
    batch = Collator(tok, max_length=64, max_sentences=16)(items)
    assert batch["sentence_mask"].sum(1).tolist() == [2, 3]
    assert batch["sentence_mask"].sum(1).tolist() == [len(split_sentences(x["report"])) for x in items]
    ends = batch["sentence_spans"][1, :3, 1]
    assert (ends <= batch["attention_mask"][1].sum()).all() and (batch["sentence_spans"][1, :3, 0] >= 1).all()


def test_loader_is_reproducible_and_shards(tmp_path):
    generate(tmp_path, n=24, seed=0, size=16, workers=1, splits=(1.0, 0.0, 0.0))
    ds = PretrainDataset(tmp_path / "master.csv", transform=ImageTransform(16, train=True))
    col = Collator(tokenizer=object(), tokenize_fn=_stand_in_tokenize)

    def order(**kw):
        return torch.cat([b["index"] for b in make_loader(ds, col, batch_size=5, **kw)]).tolist()

    a, b, c = order(seed=3), order(seed=3), order(seed=4)
    assert a == b and a != c and sorted(a) == list(range(24))
    batches = list(make_loader(ds, col, batch_size=5, seed=3, drop_last=True))
    assert len(batches) == 4
    images_a = torch.cat([x["images"] for x in make_loader(ds, col, batch_size=8, seed=1, num_workers=2)])
    images_b = torch.cat([x["images"] for x in make_loader(ds, col, batch_size=8, seed=1, num_workers=2)])
    assert torch.equal(images_a, images_b)  # augmentation is seeded per worker from the loader seed
    shards = [order(seed=3, world_size=2, rank=r, shuffle=True) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 12 and sorted(shards[0] + shards[1]) == list(range(24))
    loader = make_loader(ds, col, batch_size=4, world_size=2, rank=0)
    assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
    assert loader.pin_memory == torch.cuda.is_available()
