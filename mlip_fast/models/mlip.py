"""The MLIP model: masked ViT image tower, BERT report tower, projection heads into the joint space of
width D, the semantic integrity estimator (inside the image tower) and two learnable logit scales.

``MLIP.forward(batch)`` returns exactly the keys ``MLIPLoss`` takes (see docs/architecture.md), so a
training step is ``loss, terms = criterion(**model(batch))``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from mlip_fast.models.config import MLIPConfig
from mlip_fast.models.text import TextTower
from mlip_fast.models.vision import VisionTransformer

__all__ = ["MLIP", "Projection", "LogitScale"]

_TEXT_KEYS = ("input_ids", "attention_mask", "sentence_spans", "sentence_mask")


class Projection(nn.Module):
    """Linear (``kind="linear"``) or Linear -> GELU -> Linear (``kind="mlp"``, hidden width = input
    width) map from a tower's width C to the joint width D; [..., C] -> [..., D]."""

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
        else:
            raise ValueError(f"projection kind must be 'linear' or 'mlp', got {kind!r}")
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=in_dim**-0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogitScale(nn.Module):
    """Learnable log logit scale; ``forward()`` gives exp(log_scale) clamped at ``max_scale`` (0-dim).

    A module of its own so that DeepSpeed ZeRO-3 gathers the parameter around the call that reads it.
    The parameter has shape [1], not [], because DeepSpeed's start-up broadcast views every parameter as
    bytes, which fails for 0-dim tensors.
    """

    def __init__(self, init: float, max_scale: float):
        super().__init__()
        self.max_scale = max_scale
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init)))

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=self.max_scale).squeeze(0)


class MLIP(nn.Module):
    """MLIP image-report model.

    Args:
        config: the model configuration (``config.text.source`` already resolved, i.e. not ``"auto"``).
        text_encoder: the transformers encoder of the report tower (see ``text.build_text_encoder``).
        tokenizer: the fast tokenizer matching ``text_encoder`` (used by ``encode_text(list[str])`` and
            saved with the checkpoint).

    Submodules: ``visual`` (ViT with ``visual.estimator``), ``text`` (report tower), ``image_projection``,
    ``text_projection``, ``patch_projection``, ``sentence_projection``, ``logit_scale_global``,
    ``logit_scale_local``.
    """

    def __init__(self, config: MLIPConfig, text_encoder: nn.Module, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual = VisionTransformer(config.vision, sie_hidden=config.sie_hidden)
        self.text = TextTower(text_encoder)
        d, kind = config.embed_dim, config.projection
        self.image_projection = Projection(self.visual.width, d, kind)
        self.patch_projection = Projection(self.visual.width, d, kind)
        self.text_projection = Projection(self.text.width, d, kind)
        self.sentence_projection = Projection(self.text.width, d, kind)
        self.logit_scale_global = LogitScale(config.init_logit_scale, config.max_logit_scale)
        self.logit_scale_local = LogitScale(config.init_logit_scale, config.max_logit_scale)
        self._locked_image = False
        self._locked_text = False

    # encoders ------------------------------------------------------------------------------------
    def encode_image(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> dict:
        """images [B, C_in, H, W] -> dict of unnormalised joint-space outputs:

        image_global [B, D], patches [B, K, D], patch_index [B, K] int64 (ascending kept positions),
        integrity_logits_all [B, P], integrity_logits [B, K], integrity_weights [B] (detached; 1 at r = 0).
        K = round((1 - mask_ratio) P); ``mask_ratio=0`` encodes the whole image without sampling.
        """
        out = self.visual(images, mask_ratio, temperature=self.config.mask_temperature, seed=seed,
                          generator=generator)
        return {
            "image_global": self.image_projection(out.global_features),
            "patches": self.patch_projection(out.patch_features),
            "patch_index": out.patch_index,
            "integrity_logits_all": out.integrity_logits_all,
            "integrity_logits": out.integrity_logits,
            "integrity_weights": out.integrity_weights,
        }

    def tokenize(self, texts: Sequence[str]) -> dict:
        """Report texts -> the text part of a batch (see ``tokenization.tokenize_reports``)."""
        from mlip_fast.models.tokenization import tokenize_reports

        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; pass tokenized batches or set model.tokenizer")
        return tokenize_reports(self.tokenizer, texts, self.config.text.max_length, self.config.text.max_sentences)

    def encode_text(self, batch_or_texts: Union[dict, Sequence[str]]) -> dict:
        """A batch dict (input_ids, attention_mask, sentence_spans, sentence_mask) or a list of report
        texts (tokenized with ``self.tokenizer`` on the model's device) -> dict of unnormalised outputs:

        text_global [B, D], sentences [B, S, D] (zero at padded sentences), sentence_mask [B, S] bool.
        """
        if isinstance(batch_or_texts, dict):
            batch = batch_or_texts
        else:
            # a parameter's device attribute is valid even when ZeRO-3 has partitioned its data
            device = next(self.parameters()).device
            batch = {k: v.to(device) for k, v in self.tokenize(batch_or_texts).items()}
        missing = [k for k in _TEXT_KEYS if k not in batch]
        if missing:
            raise KeyError(f"text batch is missing {missing} (produce it with tokenize_reports)")
        cls, sentences = self.text(*(batch[k] for k in _TEXT_KEYS))
        mask = batch["sentence_mask"]
        return {
            "text_global": self.text_projection(cls),
            # padded sentences are exact zeros rather than the projection's bias
            "sentences": self.sentence_projection(sentences) * mask[..., None].to(sentences.dtype),
            "sentence_mask": mask,
        }

    def forward(self, batch: dict, mask_ratio: Optional[float] = None, seed: Optional[int] = None) -> dict:
        """One image-report batch -> the model outputs consumed by ``MLIPLoss(**outputs)``:

        image_global [B, D], text_global [B, D], patches [B, K, D], patch_index [B, K],
        sentences [B, S, D], sentence_mask [B, S], integrity_logits [B, K], integrity_weights [B],
        logit_scale_global, logit_scale_local (0-dim, exp'd and clamped).

        ``mask_ratio=None`` means ``config.mask_ratio`` in training mode and 0 (the whole image) in eval
        mode; pass a number to override either.
        """
        if mask_ratio is None:
            mask_ratio = self.config.mask_ratio if self.training else 0.0
        if "images" not in batch:
            raise KeyError("batch is missing 'images' [B, C, H, W]")
        image = self.encode_image(batch["images"], mask_ratio=mask_ratio, seed=seed)
        text = self.encode_text(batch)
        if image["image_global"].shape[0] != text["text_global"].shape[0]:
            raise ValueError(f"batch has {image['image_global'].shape[0]} images but "
                             f"{text['text_global'].shape[0]} reports")
        return {
            "image_global": image["image_global"],
            "text_global": text["text_global"],
            "patches": image["patches"],
            "patch_index": image["patch_index"],
            "sentences": text["sentences"],
            "sentence_mask": text["sentence_mask"],
            "integrity_logits": image["integrity_logits"],
            "integrity_weights": image["integrity_weights"],
            "logit_scale_global": self.logit_scale_global(),
            "logit_scale_local": self.logit_scale_local(),
        }

    # training switches ---------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing of every ViT block and BERT layer (recompute in backward)."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def lock_image_tower(self, freeze_estimator: bool = False) -> None:
        """Freezes the ViT (embeddings, blocks, final norm) and keeps it in eval mode; the estimator stays
        trainable unless ``freeze_estimator`` (it is trained by its own loss); projections stay trainable."""
        for name, module in self.visual.named_children():
            if name == "estimator" and not freeze_estimator:
                continue
            for p in module.parameters():
                p.requires_grad_(False)
        self._locked_image = True
        self.train(self.training)

    def lock_text_tower(self) -> None:
        """Freezes the report encoder (projections stay trainable) and keeps it in eval mode."""
        for p in self.text.parameters():
            p.requires_grad_(False)
        self._locked_text = True
        self.train(self.training)

    def train(self, mode: bool = True) -> "MLIP":
        super().train(mode)
        # locked towers keep dropout off even in training mode
        if mode and self._locked_text:
            self.text.eval()
        if mode and self._locked_image:
            for name, module in self.visual.named_children():
                if name != "estimator":
                    module.eval()
        return self

    # checkpoints ---------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """Writes config.json, model.safetensors, the text encoder's config and the tokenizer files."""
        from mlip_fast.models.factory import save_pretrained

        save_pretrained(self, directory)
