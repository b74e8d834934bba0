"""--train-fraction: a share of the training pairs, drawn by the seed (deterministic, nested, sized
max(1, round(F x N)), disjoint from the validation and test splits), refused outside (0, 1] and for a streamed shard
folder. A run on the subset and its summary.json: the data-efficiency curve's toy command
(tests/test_ablation_benchmark.py)."""
import pytest

from mlip_fast.data.pretrain import PretrainDataset
from mlip_fast.train.args import parse_args
from mlip_fast.train.data import DataConfigError, synthetic_cache_dir, train_subset
from tests.train.conftest import SYNTH_N, SYNTH_SIZE

BASE = ["--deepspeed_config", "ds.json"]


def _split(cache, split):
    return PretrainDataset(synthetic_cache_dir(cache, SYNTH_SIZE, SYNTH_N, 0) / "master.csv", split=split)


def _images(dataset) -> list:
    return [str(r["image_path"]) for r in dataset.records]


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_fraction_outside_zero_one_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + ["--train-fraction", value])
    assert exit_info.value.code == 2 and "must be a share of the training pairs in (0, 1]" in capsys.readouterr().err


def test_flag_default_and_value():
    assert parse_args(BASE).train_fraction == 1.0
    assert parse_args(BASE + ["--train-fraction", "0.3"]).train_fraction == 0.3


def test_subset_is_deterministic_nested_sized_and_disjoint_from_evaluation(synthetic_cache):
    train_set = _split(synthetic_cache, "train")
    n = len(train_set)
    assert train_subset(train_set, 1.0, 0) is train_set
    subsets = {f: train_subset(train_set, f, 0) for f in (0.01, 0.1, 0.3, 0.5)}
    for f, subset in subsets.items():
        assert len(subset) == max(1, round(f * n))
        assert _images(subset) == _images(train_subset(train_set, f, 0))  # the same pairs every time
        full = _images(train_set)
        assert [full.index(p) for p in _images(subset)] == sorted(full.index(p) for p in _images(subset))
    assert set(_images(subsets[0.1])) <= set(_images(subsets[0.3])) <= set(_images(subsets[0.5]))
    assert _images(train_subset(train_set, 0.5, 1)) != _images(subsets[0.5])  # another seed, other pairs
    evaluation = set(_images(_split(synthetic_cache, "valid"))) | set(_images(_split(synthetic_cache, "test")))
    assert not set(_images(subsets[0.5])) & evaluation
    item = subsets[0.3][0]
    assert set(item) >= {"image", "report"} and subsets[0.3].transform is train_set.transform
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        train_subset(train_set, 0.0, 0)
    with pytest.raises(DataConfigError, match="shard folder"):
        train_subset(list(range(10)), 0.5, 0)

