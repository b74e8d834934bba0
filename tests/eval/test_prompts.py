"""Prompt files: shipped sets load, malformed ones fail clearly, synthetic prompts speak the generator's language."""
import json
import re

import pytest

from mlip_fast.data import synth
from mlip_fast.data.labels import SYNTHETIC_LABELS
from mlip_fast.eval.prompts import PROMPT_DIR, PromptError, list_prompt_files, load_prompts, normalise_name


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


def test_gloria_style_prompts_are_generated_from_the_word_lists(tiny_checkpoint, synth_dir, tmp_path, capsys):
    """chexpert5_gloria: severity x subtype x location combinations (GLoRIA's word lists), 5 sampled per class by
    default with the run's seed, every combination with per_class=0, negatives from chexpert5; the CLI option."""
    from mlip_fast.eval.__main__ import main

    data = json.loads((PROMPT_DIR / "chexpert5_gloria.json").read_text())
    words = data["classes"]["Atelectasis"]["words"]
    every = load_prompts("chexpert5_gloria", per_class=0)
    assert len(every["Atelectasis"].positive) == len(words[0]) * len(words[1]) * len(words[2]) == 210
    assert "mild linear atelectasis at the left lung base" in every["Atelectasis"].positive
    assert "linear atelectasis at the left lung base" in every["Atelectasis"].positive  # the empty severity
    # GLoRIA's effusion words combine severity x location x subtype; its repeated subtype gives no duplicates
    assert "small left subpulmonic pleural effusion" in every["Pleural Effusion"].positive
    assert len(every["Pleural Effusion"].positive) == len(set(every["Pleural Effusion"].positive)) == 6 * 3 * 2
    sampled = load_prompts("chexpert5_gloria", seed=3)
    assert [len(p.positive) for p in sampled.values()] == [5] * 5
    assert sampled == load_prompts("chexpert5_gloria", seed=3) != load_prompts("chexpert5_gloria", seed=4)
    assert set(sampled["Edema"].positive) <= set(every["Edema"].positive)
    assert sampled["Edema"].negative == load_prompts("chexpert5")["edema"].negative
    with pytest.raises(PromptError, match="applies to generated prompt files"):
        load_prompts("chexpert5", per_class=3)

    out = tmp_path / "zs"
    code = main(["zeroshot", "--checkpoint", str(tiny_checkpoint), "--data", str(synth_dir), "--out", str(out),
                 "--prompts", "chexpert5_gloria", "--prompts-per-class", "3", "--classes", "Cardiomegaly", "Edema",
                 "--skip-empty", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["prompts"] == "chexpert5_gloria" and settings["prompts_per_class"] == 3
    assert settings["positive_prompts"]["Edema"] == list(load_prompts("chexpert5_gloria", 3, seed=0)["Edema"].positive)
