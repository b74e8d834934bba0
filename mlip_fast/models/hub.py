"""MLIP checkpoint folders, laid out as a Hugging Face Hub model repository.

A checkpoint is one folder (a local directory, or the snapshot of a Hub repo at a revision)::

  config.json              the resolved :class:`MLIPConfig` plus ``"format": "mlip_fast"``, the version and
                           ``"model_type": "mlip"`` (what transformers' ``AutoConfig`` / ``AutoModel`` read:
                           :mod:`mlip_fast.models.hf`; folders written before it still load here)
  model.safetensors        every parameter and buffer
  preprocess_config.json   the image preprocessing (:class:`~mlip_fast.preprocess.transforms.PreprocessConfig`)
  text/config.json         the transformers config of the report encoder (rebuilt without any download)
  tokenizer/               the tokenizer files
  README.md                the model card (:mod:`mlip_fast.models.model_card`)

:func:`resolve_checkpoint` turns what a user wrote (a folder, ``local-dir:<folder>``, ``hf-hub:org/name``,
``org/name``) into a local folder, through ``huggingface_hub.snapshot_download`` for Hub ids (the local cache first; nothing is
downloaded with ``local_files_only=True`` or ``HF_HUB_OFFLINE=1``). Reading checks the state dict strictly:
missing, unexpected and wrong-shape keys are all named. Checkpoints written before the preprocessing was
stored get the default preprocessing of their image size (what they were trained with).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch
from huggingface_hub import snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mlip_fast._version import __version__
from mlip_fast.models._state import state_mismatch
from mlip_fast.models.config import MLIPConfig
from mlip_fast.models.text import encoder_from_config
from mlip_fast.models.vit_weights import resize_pos_embed
from mlip_fast.preprocess.tokenization import load_tokenizer
from mlip_fast.preprocess.transforms import PreprocessConfig

__all__ = [
    "CheckpointError",
    "HUB_PREFIX",
    "LOCAL_PREFIX",
    "CHECKPOINT_FORMAT",
    "MODEL_TYPE",
    "resolve_checkpoint",
    "is_checkpoint",
    "checkpoint_dir",
    "read_config",
    "read_preprocess",
    "read_text_tower",
    "load_weights",
    "write_checkpoint",
    "default_preprocess",
]

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"  # open_clip's name for a local checkpoint folder
CHECKPOINT_FORMAT = "mlip_fast"
MODEL_TYPE = "mlip"  # transformers' model_type of the checkpoint's config.json
# keys of config.json that describe the file, not the model: the format marker, the versions that wrote it, and
# what transformers adds when the config goes through its PretrainedConfig
_FILE_KEYS = ("format", "mlip_fast_version", "model_type", "architectures", "transformers_version")
CONFIG_FILE, WEIGHTS_FILE, PREPROCESS_FILE = "config.json", "model.safetensors", "preprocess_config.json"
TEXT_DIR, TOKENIZER_DIR, CARD_FILE = "text", "tokenizer", "README.md"
# what a checkpoint download fetches from a Hub repo (a repo may hold other files: logs, plots)
_HUB_PATTERNS = [CONFIG_FILE, WEIGHTS_FILE, PREPROCESS_FILE, f"{TEXT_DIR}/*", f"{TOKENIZER_DIR}/*", CARD_FILE]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class CheckpointError(ValueError):
    """A folder or Hub id is not an MLIP checkpoint, or its weights do not fit the model."""


def default_preprocess(config: MLIPConfig) -> PreprocessConfig:
    """The default preprocessing of a model config: its image size and channels, the default normalisation."""
    return PreprocessConfig(image_size=config.vision.image_size, in_chans=config.vision.in_chans)


def _looks_local(name: str) -> bool:
    return (os.path.exists(name) or os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
            or not _REPO_ID.match(name))


def resolve_checkpoint(
    name: Union[str, Path],
    *,
    revision: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
    local_files_only: bool = False,
    token: Union[str, bool, None] = None,
    force_download: bool = False,
) -> Path:
    """The local folder of checkpoint ``name``: a directory (or its ``model.safetensors``), ``hf-hub:org/name``
    or ``org/name`` (a Hub repo, at ``revision``: a branch, tag or commit; the local cache is used when it
    holds the revision). Raises :class:`CheckpointError` naming what was looked for and why it failed."""
    text = str(name)
    if text.startswith(LOCAL_PREFIX):
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub repos; {text!r} is a local folder")
        return checkpoint_dir(text[len(LOCAL_PREFIX):])
    hub = text.startswith(HUB_PREFIX)
    repo_id = text[len(HUB_PREFIX):] if hub else text
    if not hub and _looks_local(text):
        if revision is not None:
            raise CheckpointError(f"revision={revision!r} applies to Hub repos; {text!r} is a local path")
        return checkpoint_dir(text)
    if not _REPO_ID.match(repo_id):
        raise CheckpointError(f"{text!r} is not a Hub repo id (expected hf-hub:<org>/<name>)")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                                   token=token, force_download=force_download, allow_patterns=_HUB_PATTERNS)
    except (HFValidationError, LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError, OSError) as e:
        where = f"{repo_id}" + (f" at revision {revision!r}" if revision else "")
        local = "" if hub else f"; there is no local folder {text!r} either"
        raise CheckpointError(f"cannot get the MLIP checkpoint {where} from the Hugging Face Hub or its local cache"
                              f"{local} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return checkpoint_dir(folder, shown=f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else ""))


def is_checkpoint(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder holding an MLIP ``config.json`` (with the format marker)."""
    config = Path(path) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == CHECKPOINT_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def checkpoint_dir(path: Union[str, Path], shown: Optional[str] = None) -> Path:
    """``path`` (a checkpoint folder or its ``model.safetensors``) checked to be a complete checkpoint."""
    path = Path(path).expanduser()
    shown = shown or str(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"MLIP checkpoint directory {shown!r} does not exist")
    if not is_checkpoint(path):
        present = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{shown!r} is not an MLIP checkpoint: expected {CONFIG_FILE} with \"format\": \"{CHECKPOINT_FORMAT}\", "
            f"{WEIGHTS_FILE}, {TEXT_DIR}/ and {TOKENIZER_DIR}/ (written by save_pretrained); found {present}"
        )
    missing = [n for n in (WEIGHTS_FILE, TEXT_DIR, TOKENIZER_DIR) if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"MLIP checkpoint {shown!r} is incomplete: missing {missing}")
    return path


def read_config(directory: Path) -> MLIPConfig:
    try:
        data = json.loads((directory / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE} cannot be read ({e})") from None
    for key in _FILE_KEYS:
        data.pop(key, None)
    return MLIPConfig.from_dict(data)


def read_preprocess(directory: Path, config: MLIPConfig) -> PreprocessConfig:
    path = directory / PREPROCESS_FILE
    if not path.is_file():
        logger.info("%s has no %s (written before the preprocessing was stored): using the default preprocessing "
                    "of its config", directory, PREPROCESS_FILE)
        return default_preprocess(config)
    try:
        return PreprocessConfig.from_json(path)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid preprocessing config ({e})") from None


def read_text_tower(directory: Path, config: MLIPConfig) -> tuple:
    """(report encoder built from ``text/config.json`` with random weights, tokenizer)."""
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(directory / TEXT_DIR), local_files_only=True)
        tokenizer = load_tokenizer(directory / TOKENIZER_DIR)
    except (OSError, ValueError) as e:  # a damaged text/config.json or tokenizer file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"MLIP checkpoint {directory}: its text tower config or tokenizer cannot be read "
                              f"({type(e).__name__}: {first})") from None
    return encoder_from_config(hf_config, config.text.attn_implementation), tokenizer


POS_EMBED_KEY = "visual.embeddings.pos_embed"


def load_weights(model: torch.nn.Module, file: Path, resize_positions: bool = False) -> None:
    """Loads ``file`` into ``model`` strictly; :class:`CheckpointError` names every key that does not fit, or the
    file when it is not a readable safetensors file (truncated, overwritten, another format). With
    ``resize_positions`` (``force_image_size=``), the ViT's position embeddings are resampled bicubically to the
    model's patch grid first (timm's and open_clip's rule for another input size)."""
    try:
        state = load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({type(e).__name__}: {e}); the checkpoint "
                              f"is corrupted: export or download it again") from None
    if resize_positions and POS_EMBED_KEY in state:
        expected = model.state_dict()[POS_EMBED_KEY]
        if state[POS_EMBED_KEY].shape != expected.shape:
            grid = int(round((expected.shape[1] - 1) ** 0.5))
            logger.info("resampling %s from %s to %s for the forced image size", POS_EMBED_KEY,
                        tuple(state[POS_EMBED_KEY].shape), tuple(expected.shape))
            state[POS_EMBED_KEY] = resize_pos_embed(state[POS_EMBED_KEY], grid)
    problem = state_mismatch(f"{file} does not fit the model:", state, model.state_dict())
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state, strict=True)


def write_checkpoint(model, directory: Path) -> None:
    """Writes config.json, model.safetensors, preprocess_config.json, text/ and tokenizer/ of ``model`` (an
    ``MLIP``) into ``directory`` (which exists). The model card is written by the caller."""
    if model.tokenizer is None:
        raise ValueError("save_pretrained needs model.tokenizer (the ids in the weights depend on it)")
    data = {"format": CHECKPOINT_FORMAT, "mlip_fast_version": __version__, "model_type": MODEL_TYPE,
            **model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    # contiguous CPU copies: safetensors refuses views and shared storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.preprocess_cfg.to_json(directory / PREPROCESS_FILE)
    model.text.encoder.config.save_pretrained(str(directory / TEXT_DIR))
    model.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
