"""MLIP's total loss L = L_g + lambda_local * L_l + lambda_sie * L_sie (+ lambda_within * L_within, an addition to
the method, off by default) and its options (:class:`LossConfig`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch

from mlip_fast.constants import (DEFAULT_OT_EPS, DEFAULT_OT_ITERS, DEFAULT_SIE_TEMPERATURE, ESTIMATOR_MODES,
                                 INIT_LOGIT_SCALE, SIE_MODES)
from mlip_fast.functional._common import _check_scale
from mlip_fast.functional.contrastive import global_contrastive_loss
from mlip_fast.functional.integrity import (DEFAULT_OTHER_TEMPERATURE, SIE_TARGETS, _check_integrity_inputs,
                                           _semantic_integrity_loss)
from mlip_fast.functional.integrity_modes import integrity_prediction_loss, mask_layout_loss
from mlip_fast.functional.local import LocalMatching, _check_local_inputs, _patch_sentence_loss, _within_report_loss
from mlip_fast.ops.patch_sentence import ScoresOptions


def check_loss_weights(**lambdas: float) -> None:
    """Each loss weight must be a finite number >= 0 (a NaN or Inf weight would silently poison the total)."""
    for name, value in lambdas.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")


@dataclass(frozen=True)
class LossConfig:
    """The options of :func:`mlip_loss` / :class:`mlip_fast.losses.MLIPLoss`, in one value.

    lambda_local, lambda_sie: weights of the local and the integrity terms (finite, >= 0; a 0 skips the term).
    lambda_within: weight of the within-report sentence term (:func:`~mlip_fast.functional.local.within_report_loss`,
        an addition to the method, scaled by the local logit scale); 0, the default, leaves the method's loss.
    weight_global, weight_local: weight the rows of the global / local contrastive terms by the kept integrity
        mass (``integrity_weights``, normalised to mean 1).
    sie_mode: the reading of semantic integrity (``mlip_fast.constants.SIE_MODES``), i.e. what the ``lambda_sie``
        term trains: ``"guided"`` / ``"discriminative"`` the patch estimator toward that target (see
        :func:`~mlip_fast.functional.semantic_integrity_loss`), ``"maco"`` the mask-layout weight
        (:func:`~mlip_fast.functional.integrity_modes.mask_layout_loss`), ``"predictor"`` the integrity predictor
        (:func:`~mlip_fast.functional.integrity_modes.integrity_prediction_loss`). None means "guided".
    sie_target: the older spelling of ``sie_mode`` for the two estimator modes ("guided" / "discriminative");
        :meth:`checked` folds it into ``sie_mode`` and refuses a ``sie_mode`` that says otherwise.
    sie_temperature: tau_sie of the integrity estimator's target distribution; sie_other_temperature: the soft
        maximum's temperature of the discriminative target.
    local_loss, gather_with_grad: the distributed mode (open_clip's ``ClipLoss`` arguments).
    impl, deterministic, precision: the patch-sentence scores op's (see :func:`patch_sentence_loss`).
    local_matching, ot_eps, ot_iters: how the local term scores a pair, ``"max"`` (the method as specified) or
        ``"ot"`` (optimal transport; see :class:`~mlip_fast.functional.local.LocalMatching`). The integrity
        estimator's target stays each patch's best similarity to its report (the method's) either way.
    """

    lambda_local: float = 1.0
    lambda_sie: float = 0.1
    lambda_within: float = 0.0
    weight_global: bool = True
    weight_local: bool = False
    sie_temperature: float = DEFAULT_SIE_TEMPERATURE
    sie_mode: Optional[str] = None
    sie_target: Optional[str] = None
    sie_other_temperature: float = DEFAULT_OTHER_TEMPERATURE
    local_loss: bool = True
    gather_with_grad: bool = True
    impl: str = "auto"
    deterministic: bool = False
    precision: str = "ieee"
    local_matching: str = "max"
    ot_eps: float = DEFAULT_OT_EPS
    ot_iters: int = DEFAULT_OT_ITERS

    def checked(self) -> "LossConfig":
        """The config with its values checked and ``sie_target`` folded into ``sie_mode`` (a copy)."""
        check_loss_weights(lambda_local=self.lambda_local, lambda_sie=self.lambda_sie,
                           lambda_within=self.lambda_within)
        if not (isinstance(self.sie_temperature, (int, float)) and math.isfinite(self.sie_temperature)
                and self.sie_temperature > 0):
            raise ValueError(f"sie_temperature must be finite and > 0, got {self.sie_temperature}")
        if self.sie_target is not None and self.sie_target not in SIE_TARGETS:
            raise ValueError(f"sie_target must be one of {SIE_TARGETS} (or None), got {self.sie_target!r}")
        if self.sie_mode is not None and self.sie_mode not in SIE_MODES:
            raise ValueError(f"sie_mode must be one of {SIE_MODES} (or None: guided), got {self.sie_mode!r}")
        if self.sie_mode is not None and self.sie_target is not None and self.sie_mode != self.sie_target:
            raise ValueError(f"sie_target={self.sie_target!r} contradicts sie_mode={self.sie_mode!r}: sie_target is the "
                             f"older spelling of sie_mode, give sie_mode only")
        if not (isinstance(self.sie_other_temperature, (int, float)) and math.isfinite(self.sie_other_temperature)
                and self.sie_other_temperature > 0):
            raise ValueError(f"sie_other_temperature must be finite and > 0, got {self.sie_other_temperature}")
        self.scores_options()  # the op's options, checked
        self.matching()
        return replace(self, sie_mode=self.sie_mode or self.sie_target or "guided", sie_target=None)

    def scores_options(self) -> ScoresOptions:
        """What the local term hands the scores op: normalised inside it, in the embeddings' own dtype."""
        return ScoresOptions(normalize=True, precision=self.precision, deterministic=bool(self.deterministic)).checked()

    def matching(self) -> LocalMatching:
        """The local term's matching, checked."""
        return LocalMatching(self.local_matching, self.ot_eps, self.ot_iters).checked()


def mlip_loss(
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    integrity_logits: Optional[torch.Tensor] = None,
    integrity_weights: Optional[torch.Tensor] = None,
    logit_scale_global=INIT_LOGIT_SCALE,
    logit_scale_local=INIT_LOGIT_SCALE,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    integrity_score: Optional[torch.Tensor] = None,
    integrity_target: Optional[torch.Tensor] = None,
    config: Optional[LossConfig] = None,
    group=None,
    **options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """MLIP's total loss L = L_g + lambda_local * L_l + lambda_sie * L_sie.

    The inputs are the model's outputs (see docs/architecture.md). ``config`` holds the options
    (:class:`LossConfig`); keyword ``options`` override its fields (``mlip_loss(..., lambda_sie=0.0)``).
    ``integrity_weights`` [B] weight the global rows (``weight_global``) and optionally the local rows
    (``weight_local``), normalised to mean 1 over the batch. The ``lambda_sie`` term is the mode's
    (``sie_mode``): the estimator's KL from ``integrity_logits`` [B, K] (guided, discriminative), the mask-layout
    term from ``integrity_score`` [B] = w (maco) or the prediction loss of ``integrity_score`` [B] = q against
    ``integrity_target`` [B] (predictor). A term whose lambda is 0 is not computed. The local inputs are checked
    once for both local terms. ``lambda_within`` > 0 adds the within-report sentence term
    (:func:`~mlip_fast.functional.local.within_report_loss`, with ``logit_scale_local``).

    Returns:
        (total, terms) where terms has detached "loss_global", "loss_local", "loss_sie" and "loss", and
        "loss_within" when ``lambda_within`` > 0.
    """
    cfg = replace(config or LossConfig(), **options).checked()
    lambda_local, lambda_sie, lambda_within = cfg.lambda_local, cfg.lambda_sie, cfg.lambda_within
    weight_global, weight_local = cfg.weight_global, cfg.weight_local
    weights = integrity_weights
    dist_kw = dict(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, group=group)
    loss_g = global_contrastive_loss(
        image_global, text_global, logit_scale_global, weights if weight_global else None, **dist_kw
    )
    zero = loss_g.new_zeros(())
    loss_l = loss_s = zero
    mode = cfg.sie_mode
    estimator = mode in ESTIMATOR_MODES
    if lambda_sie and estimator and integrity_logits is None:
        raise ValueError(f"lambda_sie > 0 in sie_mode {mode!r} needs integrity_logits [B, K] (or set lambda_sie=0)")
    if lambda_sie and not estimator and integrity_score is None:
        raise ValueError(f"lambda_sie > 0 in sie_mode {mode!r} needs integrity_score [B] (the model of that mode gives "
                         f"it; or set lambda_sie=0)")
    if lambda_sie and mode == "predictor" and integrity_target is None:
        raise ValueError("lambda_sie > 0 in sie_mode 'predictor' needs integrity_target [B] (or set lambda_sie=0)")
    if lambda_local or lambda_within or (lambda_sie and estimator):
        sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    if lambda_local or lambda_within:
        scale = _check_scale("logit_scale_local", logit_scale_local)
    if lambda_local:
        loss_l = _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale,
                                      weights if weight_local else None, cfg.scores_options(), cfg.matching(),
                                      impl=cfg.impl, **dist_kw)
    if lambda_sie and estimator:
        _check_integrity_inputs(integrity_logits, patches, cfg.sie_temperature, mode, cfg.sie_other_temperature)
        loss_s = _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask,
                                          cfg.sie_temperature, mode, cfg.sie_other_temperature)
    elif lambda_sie and mode == "maco":
        loss_s = mask_layout_loss(integrity_score, image_global, text_global, logit_scale_global, group=group)
    elif lambda_sie:
        loss_s = integrity_prediction_loss(integrity_score, integrity_target)
    total = loss_g + lambda_local * loss_l + lambda_sie * loss_s
    terms = {
        "loss_global": loss_g.detach(),
        "loss_local": loss_l.detach(),
        "loss_sie": loss_s.detach(),
    }
    if lambda_within:
        loss_w = _within_report_loss(patches, sentences, sentence_mask, patch_mask, scale)
        total = total + lambda_within * loss_w
        terms["loss_within"] = loss_w.detach()
    terms["loss"] = total.detach()
    return total, terms
