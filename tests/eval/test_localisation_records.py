"""load_records: the synthetic benchmark decoded once gives localisation exactly what decoding on every call gives."""
import pytest

from mlip_fast.eval.localisation import evaluate_localisation, load_records
from mlip_fast.train.evaluation import EvalSets


@pytest.mark.parametrize("local_matching", ["max", "ot"])
def test_decoded_records_give_the_same_result_as_the_folder(tiny_model, synth_dir, local_matching):
    records = load_records(tiny_model, synth_dir, "test")
    assert all(r["image"].shape == (1, 64, 64) for r in records)
    masks = [f["mask"] for r in records for f in r["findings"] if f.get("mask") is not None]
    assert masks and all(m.dtype == bool and m.shape == (64, 64) for m in masks)
    kw = dict(batch_size=16, progress=False, local_matching=local_matching, max_samples=10)
    from_folder = evaluate_localisation(tiny_model, synth_dir, split="test", **kw)
    assert evaluate_localisation(tiny_model, records, split="test", **kw) == from_folder


@pytest.mark.parametrize("local_matching", ["max", "ot"])
def test_a_token_cache_tokenizes_each_sentence_list_once_with_the_same_result(tiny_model, synth_dir, local_matching,
                                                                              monkeypatch):
    records = load_records(tiny_model, synth_dir, "test")
    kw = dict(batch_size=4, progress=False, local_matching=local_matching, max_samples=10)
    plain = evaluate_localisation(tiny_model, records, split="test", **kw)
    calls = []
    tokenize = tiny_model.tokenize
    monkeypatch.setattr(tiny_model, "tokenize", lambda texts: (calls.append(tuple(texts)), tokenize(texts))[1])
    cache: dict = {}
    assert evaluate_localisation(tiny_model, records, split="test", token_cache=cache, **kw) == plain
    assert calls and set(cache) == set(calls) and len(calls) == len(set(calls))
    first = len(calls)
    assert evaluate_localisation(tiny_model, records, split="test", token_cache=cache, **kw) == plain
    assert len(calls) == first  # the second call tokenized nothing


def test_eval_sets_keep_one_decoded_split(tiny_model, synth_dir):
    sets = EvalSets(None, None, "synthetic", synth_dir)
    first = sets.localisation_data(tiny_model, "test")
    assert sets.localisation_data(tiny_model, "test") is first  # decoded once
    other = sets.localisation_data(tiny_model, "valid")
    assert other is not first and sets.localisation_data(tiny_model, "valid") is other
    records, tokens = other
    result = sets.localisation(tiny_model, "valid")
    assert tokens and result["pointing_accuracy"] == evaluate_localisation(
        tiny_model, synth_dir, split="valid", batch_size=64, progress=False)["pointing_accuracy"]
