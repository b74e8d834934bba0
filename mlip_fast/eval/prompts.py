"""Zero-shot class prompts: per class a set of positive and a set of negative report sentences.

Prompt file format (JSON; shipped files live in ``mlip_fast/eval/prompts/``)::

    {"name": "...", "description": "...",
     "classes": {"<class name>": {"positive": ["sentence", ...], "negative": ["sentence", ...]}, ...}}

``load_prompts(name_or_path) -> dict[str, ClassPrompts]`` accepts a shipped name (``chexpert5``,
``rsna_pneumonia``, ``siim_pneumothorax``, ``synthetic``), a path to such a file, or an already
loaded mapping ``{class: {"positive": [...], "negative": [...]}}``. Class names are matched to a
dataset's label names by ``normalise_name`` (case, spaces, underscores and hyphens ignored).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Union

__all__ = ["ClassPrompts", "PromptError", "load_prompts", "list_prompt_files", "normalise_name", "PROMPT_DIR"]

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


def load_prompts(source: Union[str, os.PathLike, Mapping]) -> dict[str, ClassPrompts]:
    """Load and validate class prompts from a shipped name, a JSON path, or a mapping (see module doc)."""
    if isinstance(source, Mapping):
        return parse_prompts(source.get("classes", source) if "classes" in source else source)
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
    try:
        return parse_prompts(data["classes"])
    except PromptError as err:
        raise PromptError(f"{path}: {err}") from None
