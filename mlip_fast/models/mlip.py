"""The MLIP model: masked ViT image tower, BERT report tower, projection heads into the joint space of
width D, the semantic integrity estimator (inside the image tower) and two learnable logit scales.

open_clip-shaped API: ``encode_image(images, normalize=False)`` and ``encode_text(texts_or_batch,
normalize=False)`` return the global embeddings ``[B, D]``; ``encode_image_local`` / ``encode_text_local``
return the local outputs too (patches, sentences, masks, integrity); ``model(image, text)`` returns
``(image_features, text_features, logit_scale)`` as open_clip's ``CLIP.forward`` (normalised features, the
global scale exp'd) and ``model.logit_scale`` is the global scale's parameter (its ``exp()`` is the scale).
``model(batch)`` with a batch dict returns exactly the keys ``MLIPLoss`` takes (see docs/architecture.md), so a
training step is ``loss, terms = criterion(**model(batch))``.

Checkpoints go through ``huggingface_hub``'s ``PyTorchModelHubMixin``: ``model.save_pretrained(folder)``,
``model.push_to_hub(repo_id)`` and ``MLIP.from_pretrained(folder_or_repo_id, revision=...)`` (layout in
:mod:`mlip_fast.models.hub`, model card in :mod:`mlip_fast.models.model_card`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub import ModelCard, PyTorchModelHubMixin

from mlip_fast.constants import ESTIMATOR_MODES
from mlip_fast.logit_scale import LogitScale
from mlip_fast.models import hub
from mlip_fast.models.config import MLIPConfig
from mlip_fast.models.integrity import IntegrityPredictor, MaskLayoutWeight, keep_layout, view_integrity_target
from mlip_fast.models.model_card import CARD_METADATA, is_generated_card, render_model_card
from mlip_fast.models.text import TextTower
from mlip_fast.models.vision import VisionTransformer
from mlip_fast.preprocess.tokenization import ReportTokenizer, fast_tokenizer
from mlip_fast.preprocess.transforms import PreprocessConfig

__all__ = ["MLIP", "Projection"]

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


class MLIP(nn.Module, PyTorchModelHubMixin, library_name=CARD_METADATA["library_name"],
           tags=list(CARD_METADATA["tags"])):
    """MLIP image-report model.

    Args:
        config: the model configuration (``config.text.source`` already resolved, i.e. not ``"auto"``).
        text_encoder: the transformers encoder of the report tower (see ``text.build_text_encoder``).
        tokenizer: the fast tokenizer matching ``text_encoder`` (used by ``encode_text(list[str])`` and
            saved with the checkpoint); a :class:`ReportTokenizer` is unwrapped.
        preprocess: the image preprocessing the model expects (default: the config's image size and
            channels with the default normalisation); saved with the checkpoint.

    Submodules: ``visual`` (ViT with ``visual.estimator``), ``text`` (report tower), ``image_projection``,
    ``text_projection``, ``patch_projection``, ``sentence_projection``, ``logit_scale_global``,
    ``logit_scale_local``; ``logit_scale`` (open_clip's name) is ``logit_scale_global``'s parameter. The
    integrity mode (``config.sie_mode``) decides the rest: ``visual.estimator`` in the ``guided`` and
    ``discriminative`` modes, ``layout_weight`` (:class:`~mlip_fast.models.integrity.MaskLayoutWeight`) in ``maco``,
    ``integrity_predictor`` (:class:`~mlip_fast.models.integrity.IntegrityPredictor`) in ``predictor``.
    """

    def __init__(self, config: MLIPConfig, text_encoder: nn.Module, tokenizer=None,
                 preprocess: Optional[PreprocessConfig] = None):
        super().__init__()
        preprocess = preprocess if preprocess is not None else hub.default_preprocess(config)
        if (preprocess.image_size, preprocess.in_chans) != (config.vision.image_size, config.vision.in_chans):
            raise ValueError(f"preprocessing for {preprocess.image_size} px, {preprocess.in_chans} channel(s) does not fit "
                             f"the ViT ({config.vision.image_size} px, {config.vision.in_chans} channel(s))")
        self.config = config
        self.tokenizer = fast_tokenizer(tokenizer) if tokenizer is not None else None
        self.preprocess_cfg = preprocess
        self.visual = VisionTransformer(config.vision, sie_hidden=config.sie_hidden,
                                        estimator=config.sie_mode in ESTIMATOR_MODES)
        self.text = TextTower(text_encoder)
        d, kind = config.embed_dim, config.projection
        self.image_projection = Projection(self.visual.width, d, kind)
        self.patch_projection = Projection(self.visual.width, d, kind)
        self.text_projection = Projection(self.text.width, d, kind)
        self.sentence_projection = Projection(self.text.width, d, kind)
        self.logit_scale_global = LogitScale(config.init_logit_scale, config.max_logit_scale)
        self.logit_scale_local = LogitScale(config.init_logit_scale, config.max_logit_scale)
        self.layout_weight = MaskLayoutWeight(self.visual.num_patches) if config.sie_mode == "maco" else None
        self.integrity_predictor = (IntegrityPredictor(d, config.sie_hidden) if config.sie_mode == "predictor"
                                    else None)
        self._locked_image = False
        self._locked_text = False

    @property
    def logit_scale(self) -> nn.Parameter:
        """open_clip's ``model.logit_scale``: the log of the global logit scale, a [1] parameter (``exp()`` is the
        scale that ``model(image, text)`` returns). The same parameter as ``logit_scale_global.log_scale``, so
        checkpoints, its clamp after each optimizer step and ZeRO-3 partitioning are those of the module."""
        return self.logit_scale_global.log_scale

    # encoders ------------------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, C_in, H, W] (the output of the model's transform, stacked) -> global image embeddings
        [B, D] of the whole image (no masking), L2-normalised along D when ``normalize``."""
        features = self.image_projection(self.visual.forward_features(images)[:, 0])
        return F.normalize(features, dim=-1) if normalize else features

    def encode_image_local(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        integrity: bool = True,
    ) -> dict:
        """images [B, C_in, H, W] -> dict of unnormalised joint-space outputs:

        image_global [B, D], patches [B, K, D], patch_index [B, K] int64 (ascending kept positions),
        integrity_logits_all [B, P], integrity_logits [B, K] (None without an estimator), integrity_weights [B]
        (detached, the mode's weight of each view before the losses normalise them to mean 1; 1 at r = 0),
        integrity_score [B] (with gradient to its head: the layout weight w in ``maco``, the predicted integrity
        q in ``predictor``; else None) and integrity_target [B] (``predictor``: q's detached target, 1 at r = 0;
        else None). K = round((1 - mask_ratio) P); ``mask_ratio=0`` encodes the whole image without sampling
        (patches then follow the row-major patch grid). ``integrity=False`` (the training app's warm-up) masks
        uniformly and weights every view 1 in every mode; the heads still give their scores.
        """
        mode = self.config.sie_mode
        out = self.visual(images, mask_ratio, temperature=self.config.mask_temperature, seed=seed,
                          generator=generator, scored=integrity and mode in ESTIMATOR_MODES)
        image_global = self.image_projection(out.global_features)
        weights, score, target = out.integrity_weights, None, None
        if self.layout_weight is not None:
            score = self.layout_weight(keep_layout(out.patch_index, self.visual.num_patches))
        elif self.integrity_predictor is not None:
            score = self.integrity_predictor(image_global.detach())
            target = self._view_target(images, image_global, mask_ratio)
        if score is not None and integrity and mask_ratio > 0:
            weights = score.detach().to(weights.dtype)
        return {
            "image_global": image_global,
            "patches": self.patch_projection(out.patch_features),
            "patch_index": out.patch_index,
            "integrity_logits_all": out.integrity_logits_all,
            "integrity_logits": out.integrity_logits,
            "integrity_weights": weights,
            "integrity_score": score,
            "integrity_target": target,
        }

    def _view_target(self, images: torch.Tensor, masked: torch.Tensor, mask_ratio: float) -> torch.Tensor:
        """The predictor's target: cosine of each masked view's global embedding to the whole image's, from a
        pass without gradient over every patch (1 when nothing is masked)."""
        if mask_ratio == 0.0:
            return torch.ones(masked.shape[0], device=masked.device, dtype=torch.promote_types(masked.dtype,
                                                                                                 torch.float32))
        with torch.no_grad():
            full = self.image_projection(self.visual.forward_features(images)[:, 0])
        return view_integrity_target(masked.detach(), full)

    def get_tokenizer(self) -> ReportTokenizer:
        """The model's tokenizer bound to its text limits: ``tokenizer(texts)`` is what ``encode_text`` takes."""
        if self.tokenizer is None:
            raise RuntimeError("this model has no tokenizer; pass tokenized batches or set model.tokenizer")
        return ReportTokenizer(self.tokenizer, self.config.text.max_length, self.config.text.max_sentences)

    def tokenize(self, texts: Sequence[str]) -> dict:
        """Report texts -> the text part of a batch (see ``tokenization.tokenize_reports``), truncated to the
        config's ``text.max_length`` tokens and ``text.max_sentences`` sentences."""
        return self.get_tokenizer()(texts)

    def _text_batch(self, texts_or_batch: Union[dict, str, Sequence[str], torch.Tensor]) -> dict:
        if isinstance(texts_or_batch, Mapping):
            batch = texts_or_batch
        elif isinstance(texts_or_batch, torch.Tensor):
            batch = self._ids_batch(texts_or_batch)
        else:
            # a parameter's device attribute is valid even when ZeRO-3 has partitioned its data
            device = next(self.parameters()).device
            batch = {k: v.to(device) for k, v in self.tokenize(texts_or_batch).items()}
        missing = [k for k in _TEXT_KEYS if k not in batch]
        if missing:
            raise KeyError(f"text batch is missing {missing} (produce it with mlip_fast.get_tokenizer(...)(texts))")
        return batch

    def _ids_batch(self, input_ids: torch.Tensor) -> dict:
        """Token ids [B, T] (open_clip's text input) -> a text batch: padding = the tokenizer's pad id (0 without
        one), the whole report as one sentence (between [CLS] and the last [SEP])."""
        if input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(f"token ids must be an integer tensor [B, T], got {input_ids.dtype} {tuple(input_ids.shape)}")
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None and self.tokenizer.pad_token_id is not None else 0
        attention_mask = (input_ids != pad).long()
        length = attention_mask.sum(dim=1)
        spans = torch.stack([torch.ones_like(length), (length - 1).clamp(min=1)], dim=-1)[:, None]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "sentence_spans": spans,
                "sentence_mask": (length > 2)[:, None]}

    def encode_text(self, texts_or_batch: Union[dict, str, Sequence[str], torch.Tensor],
                    normalize: bool = False) -> torch.Tensor:
        """Report texts (a list, or one string), a tokenized batch dict (what ``get_tokenizer(name)(texts)``
        returns) or token ids [B, T] -> global report embeddings [B, D] ([CLS] state), L2-normalised along D when
        ``normalize``."""
        batch = self._text_batch(texts_or_batch)
        cls, _ = self.text(*(batch[k] for k in _TEXT_KEYS))
        features = self.text_projection(cls)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_local(self, texts_or_batch: Union[dict, str, Sequence[str]]) -> dict:
        """Report texts or a tokenized batch dict -> dict of unnormalised outputs:

        text_global [B, D], sentences [B, S, D] (zero at padded sentences), sentence_mask [B, S] bool.
        """
        batch = self._text_batch(texts_or_batch)
        cls, sentences = self.text(*(batch[k] for k in _TEXT_KEYS))
        mask = batch["sentence_mask"]
        return {
            "text_global": self.text_projection(cls),
            # padded sentences are exact zeros rather than the projection's bias
            "sentences": self.sentence_projection(sentences) * mask[..., None].to(sentences.dtype),
            "sentence_mask": mask,
        }

    def image_transforms(self) -> tuple:
        """``(train_transform, eval_transform)`` of the model's stored preprocessing."""
        return self.preprocess_cfg.transforms()

    def forward(self, image: Union[dict, torch.Tensor, None] = None, text=None, mask_ratio: Optional[float] = None,
                seed: Optional[int] = None, integrity: bool = True):
        """Two call forms, told apart by the first argument.

        ``model(batch)``, a batch dict (images, input_ids, attention_mask, sentence_spans, sentence_mask) -> the
        outputs ``MLIPLoss(**outputs)`` takes: image_global [B, D], text_global [B, D], patches [B, K, D],
        patch_index [B, K], sentences [B, S, D], sentence_mask [B, S], the mode's integrity outputs
        (integrity_logits [B, K] in the estimator modes, integrity_score [B] in ``maco``, integrity_score and
        integrity_target [B] in ``predictor``; see :meth:`encode_image_local`), integrity_weights [B],
        logit_scale_global, logit_scale_local (0-dim, exp'd; bounded by the clamp after each optimizer step).
        ``mask_ratio=None`` means ``config.mask_ratio`` in training mode and 0 (the whole image) in eval mode; pass
        a number to override either. ``integrity=False``: uniform masking and unit weights (the warm-up).

        ``model(image, text)``, open_clip's: images [B, C_in, H, W] (or None) and texts (a token batch dict, a
        list of reports, or token ids [N, T]; or None) -> ``(image_features [B, D], text_features [N, D],
        logit_scale)``: features L2-normalised along D (None for an input not given), the global logit scale
        0-dim, so ``logit_scale * image_features @ text_features.T`` are the logits per image.
        """
        if not isinstance(image, Mapping):
            image_features = None if image is None else self.encode_image(image, normalize=True)
            text_features = None if text is None else self.encode_text(text, normalize=True)
            return image_features, text_features, self.logit_scale_global()
        batch = image
        if mask_ratio is None:
            mask_ratio = self.config.mask_ratio if self.training else 0.0
        if "images" not in batch:
            raise KeyError("batch is missing 'images' [B, C, H, W]")
        image = self.encode_image_local(batch["images"], mask_ratio=mask_ratio, seed=seed, integrity=integrity)
        text = self.encode_text_local(batch)
        if image["image_global"].shape[0] != text["text_global"].shape[0]:
            raise ValueError(f"batch has {image['image_global'].shape[0]} images but "
                             f"{text['text_global'].shape[0]} reports")
        integrity = {k: image[k] for k in ("integrity_logits", "integrity_score", "integrity_target")
                     if image[k] is not None}
        return {
            "image_global": image["image_global"],
            "text_global": text["text_global"],
            "patches": image["patches"],
            "patch_index": image["patch_index"],
            "sentences": text["sentences"],
            "sentence_mask": text["sentence_mask"],
            **integrity,
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

    # checkpoints (huggingface_hub's PyTorchModelHubMixin) ----------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        """The mixin's ``save_pretrained(folder)`` writes the files of :mod:`mlip_fast.models.hub`, then the model
        card (``model_card_kwargs={"summary": run_summary}`` adds a training run's numbers). A card this
        library wrote earlier is replaced; a README.md a user wrote is kept."""
        hub.write_checkpoint(self, Path(save_directory))
        card = Path(save_directory) / hub.CARD_FILE
        if is_generated_card(card):
            card.unlink()

    def generate_model_card(self, summary: Optional[dict] = None, license: Optional[str] = None,
                            datasets: Optional[Sequence[str]] = None, **_) -> ModelCard:
        """The model card (see :func:`mlip_fast.models.model_card.render_model_card`); ``save_pretrained(folder,
        model_card_kwargs={"summary": ..., "license": ..., "datasets": [...]})`` passes these."""
        return ModelCard(render_model_card(self, summary, license=license, datasets=datasets))

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, Path],
        *,
        revision: Optional[str] = None,
        cache_dir: Union[str, Path, None] = None,
        local_files_only: bool = False,
        token: Union[str, bool, None] = None,
        force_download: bool = False,
        device: Union[str, torch.device, None] = None,
    ) -> "MLIP":
        """Loads a checkpoint in eval mode: a folder written by ``save_pretrained``, or a Hub repo
        (``"org/name"`` or ``"hf-hub:org/name"``) at ``revision`` (branch, tag or commit), taken from the local
        Hugging Face cache when it holds that revision (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``: never
        downloads). Weights are checked strictly; the preprocessing and tokenizer come back with them.

        Raises:
            CheckpointError: not found (locally or on the Hub), not an MLIP checkpoint, incomplete, or weights
                that do not fit (every such key named).
        """
        directory = hub.resolve_checkpoint(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                                           local_files_only=local_files_only, token=token,
                                           force_download=force_download)
        # the mixin reads config.json and hands over to _from_pretrained below
        return super().from_pretrained(str(directory), device=device)

    @classmethod
    def _from_pretrained(cls, *, model_id: str, device: Union[str, torch.device, None] = None, **_) -> "MLIP":
        model = cls.from_checkpoint_folder(Path(model_id))
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def from_checkpoint_folder(cls, directory: Path, config: Optional[MLIPConfig] = None, tokenizer=None,
                               image_size: Optional[int] = None) -> "MLIP":
        """The model of a local checkpoint folder (layout in :mod:`mlip_fast.models.hub`): its weights, checked
        strictly, in ``config``'s architecture (default: the stored config), with the stored text tower,
        preprocessing and tokenizer (unless ``tokenizer`` is given). ``image_size`` (``force_image_size=``)
        changes the input side: the preprocessing follows and the position embeddings are resampled to the new
        patch grid. The one loader behind ``from_pretrained`` and the factory's checkpoint names and
        ``pretrained=``."""
        config = hub.read_config(directory) if config is None else config
        preprocess = hub.read_preprocess(directory, config)
        if image_size is not None:
            config = config.replace(vision={"image_size": image_size})
            preprocess = dataclasses.replace(preprocess, image_size=image_size)
        encoder, stored_tokenizer = hub.read_text_tower(directory, config)
        model = cls(config, encoder, tokenizer if tokenizer is not None else stored_tokenizer, preprocess)
        hub.load_weights(model, directory / hub.WEIGHTS_FILE, resize_positions=image_size is not None)
        return model
