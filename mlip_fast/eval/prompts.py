"""Zero-shot class prompts: per class a set of positive and a set of negative report sentences.

Prompt file format (JSON; shipped files live in ``mlip_fast/eval/prompts/``)::

    {"name": "...", "description": "...",
     "classes": {"<class name>": {"positive": ["sentence", ...], "negative": ["sentence", ...]}, ...}}

``load_prompts(name_or_path) -> dict[str, ClassPrompts]`` accepts a shipped name (``chexpert5``,
``chexpert5_gloria``, ``rsna_pneumonia``, ``siim_pneumothorax``, ``synthetic``), a path to such a file, or an
already loaded mapping ``{class: {"positive": [...], "negative": [...]}}``. Class names are matched to a
dataset's label names by ``normalise_name`` (case, spaces, underscores and hyphens ignored).

Generated prompts (GLoRIA's way, ``chexpert5_gloria``): a class gives ``"words"``, lists of phrases (GLoRIA's
severity, subtype and location words) instead of ``"positive"``; its positive prompts are every combination, one
phrase of each list in order, joined by single spaces (empty phrases dropped, duplicates dropped), of which
``per_class`` are sampled (``random.Random(seed)``, one stream over the classes in file order; the file's
``"generate": {"per_class": N}`` is the default, 0 keeps all). ``"negative"`` may name a shipped prompt file
whose negative set of the same class is taken::

    {"generate": {"per_class": 5},
     "classes": {"Edema": {"words": [["", "mild"], ["pulmonary edema"], [""]], "negative": "chexpert5"}}}
"""
from __future__ import annotations

import itertools
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

__all__ = ["ClassPrompts", "PromptError", "load_prompts", "list_prompt_files", "normalise_name", "generate_prompts",
           "PROMPT_DIR"]

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"


class PromptError(ValueError):
    """A prompt file or mapping is malformed (missing class, empty prompt set, non-string prompt)."""


@dataclass(frozen=True)
class ClassPrompts:
    """The prompt sets of one class: ``positive`` sentences state the finding, ``negative`` ones deny it."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]


def normalise_name(name: str) -> str:
    """Label-name key used to match prompt classes to dataset label columns: lower case, no separators."""
    return re.sub(r"[\s_\-]+", "", str(name)).lower()


def list_prompt_files() -> list[str]:
    """Names of the shipped prompt files (without ``.json``)."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.json"))


def _check_set(cls: str, polarity: str, value) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise PromptError(f"class {cls!r}: '{polarity}' must be a list of sentences, got {type(value).__name__}")
    if not value:
        raise PromptError(f"class {cls!r}: the '{polarity}' prompt set is empty; give at least one sentence")
    out = []
    for i, text in enumerate(value):
        if not isinstance(text, str) or not text.strip():
            raise PromptError(f"class {cls!r}: {polarity}[{i}] must be a non-empty string, got {text!r}")
        out.append(text.strip())
    return tuple(out)


def parse_prompts(classes: Mapping) -> dict[str, ClassPrompts]:
    """Validate ``{class: {"positive": [...], "negative": [...]}}`` (or ``ClassPrompts`` values)."""
    if not isinstance(classes, Mapping) or not classes:
        raise PromptError("prompts must be a non-empty mapping of class name -> {'positive': [...], 'negative': [...]}")
    out: dict[str, ClassPrompts] = {}
    seen: dict[str, str] = {}
    for cls, sets in classes.items():
        if isinstance(sets, ClassPrompts):
            sets = {"positive": list(sets.positive), "negative": list(sets.negative)}
        if not isinstance(sets, Mapping):
            raise PromptError(f"class {cls!r}: expected an object with 'positive' and 'negative' lists")
        missing = [k for k in ("positive", "negative") if k not in sets]
        unknown = sorted(set(sets) - {"positive", "negative"})
        if missing or unknown:
            raise PromptError(f"class {cls!r}: missing keys {missing}, unknown keys {unknown}")
        key = normalise_name(cls)
        if key in seen:
            raise PromptError(f"classes {seen[key]!r} and {cls!r} have the same normalised name {key!r}")
        seen[key] = cls
        out[str(cls)] = ClassPrompts(_check_set(cls, "positive", sets["positive"]), _check_set(cls, "negative", sets["negative"]))
    return out


def generate_prompts(words, where: str = "words") -> list[str]:
    """Every combination of one phrase from each list of ``words``, in order, joined by single spaces (empty
    phrases dropped), without duplicates, in the order of ``itertools.product``."""
    if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words:
        raise PromptError(f"{where} must be a non-empty list of phrase lists")
    for i, phrases in enumerate(words):
        if isinstance(phrases, str) or not isinstance(phrases, (list, tuple)) or not phrases \
                or not all(isinstance(x, str) for x in phrases):
            raise PromptError(f"{where}[{i}] must be a non-empty list of strings (\"\" for an optional part)")
    combos = (" ".join(" ".join(combo).split()) for combo in itertools.product(*words))
    return list(dict.fromkeys(c for c in combos if c))


def _expand(classes: Mapping, per_class, seed: int, where: str) -> dict:
    """``classes`` with every ``"words"`` class turned into sampled positive prompts and every named
    ``"negative"`` file resolved (see the module docstring)."""
    rng = random.Random(seed)
    out = {}
    for cls, sets in classes.items():
        if not isinstance(sets, Mapping) or "words" not in sets:
            out[cls] = sets
            continue
        sets = dict(sets)
        combos = generate_prompts(sets.pop("words"), f"{where}: class {cls!r}: 'words'")
        n = len(combos) if not per_class else min(int(per_class), len(combos))
        sets["positive"] = rng.sample(combos, n) if n < len(combos) else combos
        if isinstance(sets.get("negative"), str):
            named = {normalise_name(k): v for k, v in load_prompts(sets["negative"]).items()}
            if normalise_name(cls) not in named:
                raise PromptError(f"{where}: class {cls!r} takes its negatives from {sets['negative']!r}, which has no "
                                  f"such class")
            sets["negative"] = list(named[normalise_name(cls)].negative)
        out[cls] = sets
    return out


def load_prompts(source: Union[str, os.PathLike, Mapping], per_class: Optional[int] = None,
                 seed: int = 0) -> dict[str, ClassPrompts]:
    """Load and validate class prompts from a shipped name, a JSON path, or a mapping (see module doc).
    ``per_class`` / ``seed``: the sample of a generated prompt file (None: the file's ``per_class``; 0: all)."""
    if isinstance(source, Mapping):
        classes = source.get("classes", source) if "classes" in source else source
        if per_class is not None:
            raise PromptError("per_class applies to generated prompt files (a 'generate' section and 'words' classes)")
        return parse_prompts(classes)
    path = Path(source)
    if not path.suffix and not path.exists():
        path = PROMPT_DIR / f"{source}.json"
        if not path.exists():
            raise PromptError(f"no shipped prompt file {str(source)!r}; shipped: {list_prompt_files()} (or give a path)")
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PromptError(f"prompt file {path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "classes" not in data:
        raise PromptError(f"prompt file {path} must be an object with a 'classes' key")
    generate = data.get("generate")
    if per_class is not None and not isinstance(generate, dict):
        raise PromptError(f"--prompts-per-class applies to generated prompt files (such as chexpert5_gloria); "
                          f"{path.name} lists its prompts")
    try:
        classes = data["classes"]
        if isinstance(generate, dict) and isinstance(classes, Mapping):
            chosen = generate.get("per_class", 0) if per_class is None else per_class
            if isinstance(chosen, bool) or not isinstance(chosen, int) or chosen < 0:
                raise PromptError(f"per_class must be an int >= 0 (0: every combination), got {chosen!r}")
            classes = _expand(classes, chosen, seed, str(path))
        return parse_prompts(classes)
    except PromptError as err:
        raise PromptError(f"{path}: {err}") from None
