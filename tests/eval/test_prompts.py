"""Prompt files: shipped sets load, malformed ones fail clearly, synthetic prompts speak the generator's language."""
import json
import re

import pytest

from mlip_fast.data import synth
from mlip_fast.data.labels import SYNTHETIC_LABELS
from mlip_fast.eval.prompts import PromptError, list_prompt_files, load_prompts, normalise_name


def test_shipped_prompt_files():
    assert set(list_prompt_files()) >= {"chexpert5", "rsna_pneumonia", "siim_pneumothorax", "synthetic"}
    assert [normalise_name(c) for c in load_prompts("chexpert5")] == [
        "atelectasis", "cardiomegaly", "consolidation", "edema", "pleuraleffusion"]
    assert list(load_prompts("rsna_pneumonia")) == ["pneumonia"]
    assert list(load_prompts("siim_pneumothorax")) == ["pneumothorax"]
    assert tuple(load_prompts("synthetic")) == SYNTHETIC_LABELS
    for name in list_prompt_files():
        for cls, sets in load_prompts(name).items():
            assert sets.positive and sets.negative, (name, cls)
            assert not set(sets.positive) & set(sets.negative)


_VARIABLE = r"\b(right|left|bilateral|upper|mid|lower|small|moderate|large|extensive|mild|minimal|severe|marked|" \
            r"mildly|moderately|markedly|lobe|lingula)\b"


def _template(sentence: str) -> str:
    return re.sub(_VARIABLE, "_", sentence.lower())


def test_synthetic_prompts_use_the_generator_wording():
    sentences = set()
    for i in range(500):
        sample = synth.make_sample(11, i, size=8)
        sentences.update(f["sentence"] for f in sample["findings"])
        sentences.update(s.strip() + "." for s in sample["findings_text"].split(".") if s.strip())
    templates = {_template(s) for s in sentences}
    for cls, sets in load_prompts("synthetic").items():
        for text in sets.negative:
            assert text in sentences, f"{cls}: negative prompt {text!r} never appears in a synthetic report"
        for text in sets.positive:
            assert _template(text) in templates, f"{cls}: positive prompt {text!r} matches no generator template"


def test_bad_prompts(tmp_path):
    with pytest.raises(PromptError, match="empty"):
        load_prompts({"a": {"positive": [], "negative": ["no a."]}})
    with pytest.raises(PromptError, match="missing keys"):
        load_prompts({"a": {"positive": ["a."]}})
    with pytest.raises(PromptError, match="non-empty string"):
        load_prompts({"a": {"positive": ["  "], "negative": ["no a."]}})
    with pytest.raises(PromptError, match="same normalised name"):
        load_prompts({"Pleural Effusion": {"positive": ["x."], "negative": ["y."]},
                      "pleural_effusion": {"positive": ["x."], "negative": ["y."]}})
    with pytest.raises(PromptError, match="shipped"):
        load_prompts("no_such_prompts")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompts(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"classes": {"x": {"positive": ["x."], "negative": ["no x."]}}}))
    assert load_prompts(ok)["x"].positive == ("x.",)
