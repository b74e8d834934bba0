"""MLIP exports through transformers' Auto classes: after ``import mlip_fast``, ``AutoConfig.from_pretrained(export)``
and ``AutoModel.from_pretrained(export)`` load a folder written by ``save_pretrained`` (or its Hub repo).

- :class:`MLIPHFConfig`: the ``PretrainedConfig`` of ``model_type: "mlip"`` (written into every export's
  config.json); its attributes are the :class:`~mlip_fast.models.config.MLIPConfig` fields.
- :class:`MLIPHFModel`: what ``AutoModel`` returns, the way transformers' ``CLIPModel`` is used:
  ``model(pixel_values=..., input_ids=..., attention_mask=...)`` returns an :class:`MLIPOutput` (a
  ``ModelOutput``: ``logits_per_image [B, N]``, ``logits_per_text [N, B]``, ``image_embeds [B, D]``,
  ``text_embeds [N, D]``, normalised, ``logit_scale``); ``get_image_features`` / ``get_text_features``;
  ``save_pretrained`` writes the same export. The MLIP model itself is ``model.mlip``.
- :func:`register_config` / :func:`register_model`: the Auto-class registrations. ``mlip_fast/__init__.py``
  runs each right after transformers has imported the Auto module it extends (``configuration_auto``,
  ``modeling_auto``), so ``import mlip_fast`` itself imports neither torch nor transformers.

An export written before ``model_type`` was stored still loads through ``mlip_fast.from_pretrained`` and
``create_model_and_transforms``; for transformers' Auto classes, save it again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from mlip_fast.models.config import MLIPConfig
from mlip_fast.models.hub import MODEL_TYPE
from mlip_fast.models.mlip import MLIP

__all__ = ["MLIPHFConfig", "MLIPHFModel", "MLIPOutput", "register_config", "register_model"]

_FIELDS = tuple(MLIPConfig.__dataclass_fields__)


class MLIPHFConfig(PretrainedConfig):
    """transformers' view of an MLIP export's config.json: the :class:`MLIPConfig` fields as attributes, beside
    the file's ``format`` marker and the version that wrote it."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs):
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k in _FIELDS + ("format", "mlip_fast_version")}
        super().__init__(**kwargs)
        for key, value in fields.items():
            setattr(self, key, value)

    def to_mlip_config(self) -> MLIPConfig:
        """The typed config (checked as every MLIP config is)."""
        return MLIPConfig.from_dict({k: getattr(self, k) for k in _FIELDS if hasattr(self, k)})


@dataclass
class MLIPOutput(ModelOutput):
    """What :class:`MLIPHFModel` returns (transformers' ``CLIPOutput`` names; ``None`` where an input was not
    given): ``logits_per_image [B, N] = logit_scale * image_embeds @ text_embeds.T``, ``logits_per_text`` its
    transpose, the L2-normalised ``image_embeds [B, D]`` / ``text_embeds [N, D]`` and the 0-dim ``logit_scale``."""

    logits_per_image: Optional[torch.Tensor] = None
    logits_per_text: Optional[torch.Tensor] = None
    image_embeds: Optional[torch.Tensor] = None
    text_embeds: Optional[torch.Tensor] = None
    logit_scale: Optional[torch.Tensor] = None


class MLIPHFModel(nn.Module):
    """An MLIP model behind transformers' calling conventions (see the module docstring). Build it with
    ``AutoModel.from_pretrained(export)`` or ``MLIPHFModel(mlip_model)``."""

    config_class = MLIPHFConfig

    def __init__(self, mlip: MLIP, config: Optional[MLIPHFConfig] = None):
        super().__init__()
        self.mlip = mlip
        self.config = config if config is not None else MLIPHFConfig(**mlip.config.to_dict())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, Path], *model_args,
                        config: Optional[MLIPHFConfig] = None, revision: Optional[str] = None,
                        cache_dir: Union[str, Path, None] = None, local_files_only: bool = False,
                        token: Union[str, bool, None] = None, force_download: bool = False,
                        dtype: Optional[torch.dtype] = None, torch_dtype: Optional[torch.dtype] = None,
                        **_) -> "MLIPHFModel":
        """An export folder or Hub repo (at ``revision``) in eval mode, loaded by MLIP's own checked loader;
        ``dtype`` casts the weights (the logit scales stay fp32). Other transformers keywords are accepted and
        have no effect."""
        mlip = MLIP.from_pretrained(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only, token=token, force_download=force_download)
        dtype = dtype if dtype is not None else torch_dtype
        if isinstance(dtype, torch.dtype) and dtype != torch.float32:
            mlip.to(dtype)
            mlip.logit_scale_global.float()
            mlip.logit_scale_local.float()
        return cls(mlip, config).eval()

    def save_pretrained(self, save_directory: Union[str, Path], **kwargs):
        """The export of ``model.mlip`` (``MLIP.save_pretrained``: config.json with ``model_type``, weights,
        preprocessing, tokenizer, model card)."""
        return self.mlip.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        return self.mlip.push_to_hub(repo_id, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.mlip.visual.embeddings.proj.weight.dtype

    def _text(self, input_ids, attention_mask, sentence_spans, sentence_mask):
        if sentence_spans is None or attention_mask is None:
            return input_ids  # token ids: the model pads and spans them itself
        return {"input_ids": input_ids, "attention_mask": attention_mask, "sentence_spans": sentence_spans,
                "sentence_mask": sentence_mask}

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, C_in, H, W] (the model's transform, stacked) -> image embeddings [B, D], unnormalised."""
        return self.mlip.encode_image(pixel_values)

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                          sentence_spans: Optional[torch.Tensor] = None,
                          sentence_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids [N, T] (with the rest of a ``mlip_fast.get_tokenizer(...)(texts)`` batch, or alone) -> report
        embeddings [N, D], unnormalised."""
        return self.mlip.encode_text(self._text(input_ids, attention_mask, sentence_spans, sentence_mask))

    def forward(self, pixel_values: Optional[torch.Tensor] = None, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, sentence_spans: Optional[torch.Tensor] = None,
                sentence_mask: Optional[torch.Tensor] = None, return_dict: bool = True, **_):
        """Images and / or reports -> :class:`MLIPOutput` (a tuple of its non-None fields with ``return_dict=False``).
        Extra transformers keywords (``token_type_ids``, ``output_attentions``, ...) are accepted and ignored."""
        text = None if input_ids is None else self._text(input_ids, attention_mask, sentence_spans, sentence_mask)
        image_embeds, text_embeds, scale = self.mlip(pixel_values, text)
        logits = None if image_embeds is None or text_embeds is None else scale * image_embeds @ text_embeds.T
        out = MLIPOutput(logits_per_image=logits, logits_per_text=None if logits is None else logits.T,
                         image_embeds=image_embeds, text_embeds=text_embeds, logit_scale=scale)
        return out if return_dict else out.to_tuple()


# The Auto modules are imported here, when transformers has finished importing each: transformers imports
# configuration_auto while modeling_auto is still half-executed, so neither may be imported at this module's top.
def register_config() -> None:
    """Registers :class:`MLIPHFConfig` with ``AutoConfig`` under ``model_type`` "mlip" (idempotent)."""
    from transformers.models.auto.configuration_auto import AutoConfig

    AutoConfig.register(MODEL_TYPE, MLIPHFConfig, exist_ok=True)


def register_model() -> None:
    """Registers :class:`MLIPHFModel` with ``AutoModel`` for :class:`MLIPHFConfig` (idempotent)."""
    from transformers.models.auto.modeling_auto import AutoModel

    AutoModel.register(MLIPHFConfig, MLIPHFModel, exist_ok=True)
