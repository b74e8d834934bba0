"""MLIP's losses as drop-in nn.Modules (formulas and shapes in :mod:`mlip_fast.functional`).

Each module that uses a temperature owns a learnable :class:`LogitScale` (init 1 / 0.07, bounded at 100,
see :mod:`mlip_fast.constants`) that is used when ``forward`` gets no ``logit_scale``; pass the model's own
scale to use that instead. As in open_clip, the bound is kept by clamping the parameter after each
optimizer step, not inside ``forward``: call :func:`clamp_logit_scales_` on the model (and on the loss
modules whose own scale you train) after ``optimizer.step()``. ``impl`` picks the patch-sentence scores
implementation: "auto", "reference", "chunked" or "triton" (see :func:`mlip_fast.ops.patch_sentence_scores`).

Example::

    from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
    criterion = MLIPLoss()
    total, terms = criterion(**model(batch))
    total.backward()
    optimizer.step()
    clamp_logit_scales_(model)
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from mlip_fast import functional as MF
from mlip_fast.constants import DEFAULT_SIE_TEMPERATURE, INIT_LOGIT_SCALE, INIT_TEMPERATURE, MAX_LOGIT_SCALE
from mlip_fast.functional.integrity import DEFAULT_OTHER_TEMPERATURE

__all__ = ["LogitScale", "clamp_logit_scales_", "GlobalContrastiveLoss", "PatchSentenceLoss",
           "SemanticIntegrityLoss", "MLIPLoss"]


class LogitScale(nn.Module):
    """A learnable logit scale: the parameter ``log_scale`` = log(1 / temperature); ``forward()`` gives
    exp(log_scale) as a 0-dim tensor.

    The scale is bounded at ``max_scale`` by clamping the parameter after each optimizer step
    (:meth:`clamp_`, :func:`clamp_logit_scales_`), as open_clip does, and not inside ``forward``: a clamp
    in ``forward`` has zero gradient once the parameter passes log(max_scale), so it could never come back.
    An initial value above ``max_scale`` starts at ``max_scale``.

    A module of its own so that DeepSpeed ZeRO-3 gathers the parameter around the call that reads it. The
    parameter has shape [1], not [], because DeepSpeed's start-up broadcast views every parameter as bytes,
    which fails for 0-dim tensors. ``learnable=False`` keeps the value in a buffer instead.
    """

    def __init__(self, init: float = INIT_LOGIT_SCALE, max_scale: float = MAX_LOGIT_SCALE, learnable: bool = True):
        super().__init__()
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"the initial logit scale must be finite and > 0, got {init}")
        if not (math.isfinite(max_scale) and max_scale > 0):
            raise ValueError(f"max_scale must be finite and > 0, got {max_scale}")
        self.max_scale = float(max_scale)
        value = torch.full((1,), math.log(min(init, max_scale)))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    @property
    def max_log_scale(self) -> float:
        """The bound of the parameter: log(``max_scale``)."""
        return math.log(self.max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().squeeze(0)

    @torch.no_grad()
    def clamp_(self) -> "LogitScale":
        """Clamps the parameter at log(``max_scale``) in place (after an optimizer step)."""
        self.log_scale.clamp_(max=self.max_log_scale)
        return self


def clamp_logit_scales_(module: nn.Module) -> None:
    """Clamps every :class:`LogitScale` inside ``module`` (the model, a loss module) at its bound; call it
    after each ``optimizer.step()``. (The DeepSpeed training app clamps the optimizer's fp32 copy as well:
    ``mlip_fast.train.loop.clamp_engine_logit_scales``.)"""
    for m in module.modules():
        if isinstance(m, LogitScale):
            m.clamp_()


def _loss_scale(init_temperature: float, learnable: bool = True) -> LogitScale:
    if not init_temperature > 0:
        raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
    return LogitScale(1.0 / init_temperature, learnable=learnable)


class GlobalContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between global image and report vectors [B, D]; see
    :func:`mlip_fast.functional.global_contrastive_loss`."""

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        init_temperature: float = INIT_TEMPERATURE,
        learn_temperature: bool = True,
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.logit_scale = _loss_scale(init_temperature, learn_temperature)

    def forward(self, image, text, logit_scale=None, weights=None) -> torch.Tensor:
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return MF.global_contrastive_loss(
            image, text, scale, weights, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
        )


class PatchSentenceLoss(nn.Module):
    """MLIP's patch-sentence local loss (token-wise max, both directions); see
    :func:`mlip_fast.functional.patch_sentence_loss`."""

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        impl: str = "auto",
        deterministic: bool = False,
        init_temperature: float = INIT_TEMPERATURE,
        learn_temperature: bool = True,
        precision: str = "ieee",
    ):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.impl = impl
        self.deterministic = deterministic
        self.precision = precision
        self.logit_scale = _loss_scale(init_temperature, learn_temperature)

    def forward(self, patches, sentences, sentence_mask=None, patch_mask=None, logit_scale=None, weights=None):
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return MF.patch_sentence_loss(
            patches, sentences, sentence_mask, patch_mask, scale, weights,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            impl=self.impl, deterministic=self.deterministic, precision=self.precision,
        )


class SemanticIntegrityLoss(nn.Module):
    """KL loss of the semantic integrity estimator; see :func:`mlip_fast.functional.semantic_integrity_loss`
    (``target``: "guided" or "discriminative")."""

    def __init__(self, temperature: float = DEFAULT_SIE_TEMPERATURE, target: str = "guided",
                 other_temperature: float = DEFAULT_OTHER_TEMPERATURE):
        super().__init__()
        MF.LossConfig(sie_temperature=temperature, sie_target=target, sie_other_temperature=other_temperature).checked()
        self.temperature, self.target, self.other_temperature = temperature, target, other_temperature

    def forward(self, integrity_logits, patches, sentences, sentence_mask=None, patch_mask=None):
        return MF.semantic_integrity_loss(
            integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature=self.temperature,
            target=self.target, other_temperature=self.other_temperature,
        )


class MLIPLoss(nn.Module):
    """L = L_g + lambda_local * L_l + lambda_sie * L_sie, returning ``(total, terms)``.

    Composed of the three loss modules (``global_loss``, ``patch_sentence_loss``, ``integrity_loss``), with the
    options in one :class:`~mlip_fast.functional.LossConfig` (``config``): the constructor takes its fields
    (lambda_local, lambda_sie, weight_global, weight_local, sie_temperature, sie_target, sie_other_temperature,
    local_loss, gather_with_grad, impl, deterministic, precision) and ``init_temperature`` / ``learn_temperature`` of the two contrastive
    terms' own logit scales, which ``forward`` uses when it gets none (a model passes its own).

    ``forward`` takes the model's output dict as keyword arguments (``criterion(**outputs)``): image_global
    [B, D], text_global [B, D], patches [B, K, D], sentences [B, S, D], sentence_mask [B, S],
    integrity_logits [B, K], integrity_weights [B], logit_scale_global, logit_scale_local, and optionally
    patch_mask [B, K] and patch_index [B, K] (ignored). The local inputs are checked once for both local terms.
    """

    def __init__(self, init_temperature: float = INIT_TEMPERATURE, learn_temperature: bool = True, **options):
        super().__init__()
        self.config = MF.LossConfig(**options).checked()
        cfg = self.config
        self.global_loss = GlobalContrastiveLoss(cfg.local_loss, cfg.gather_with_grad, init_temperature,
                                                 learn_temperature)
        self.patch_sentence_loss = PatchSentenceLoss(cfg.local_loss, cfg.gather_with_grad, cfg.impl, cfg.deterministic,
                                                     init_temperature, learn_temperature, cfg.precision)
        self.integrity_loss = SemanticIntegrityLoss(cfg.sie_temperature, cfg.sie_target, cfg.sie_other_temperature)

    def forward(
        self,
        image_global: torch.Tensor,
        text_global: torch.Tensor,
        patches: torch.Tensor,
        sentences: torch.Tensor,
        sentence_mask: Optional[torch.Tensor] = None,
        integrity_logits: Optional[torch.Tensor] = None,
        integrity_weights: Optional[torch.Tensor] = None,
        logit_scale_global=None,
        logit_scale_local=None,
        patch_mask: Optional[torch.Tensor] = None,
        patch_index: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        del patch_index  # part of the model outputs; positions do not enter the loss
        return MF.mlip_loss(
            image_global, text_global, patches, sentences, sentence_mask, integrity_logits, integrity_weights,
            self.global_loss.logit_scale() if logit_scale_global is None else logit_scale_global,
            self.patch_sentence_loss.logit_scale() if logit_scale_local is None else logit_scale_local,
            patch_mask, config=self.config,
        )
