"""MLIP's losses as drop-in nn.Modules (formulas and shapes in :mod:`mlip_fast.functional`).

Each module that uses a temperature owns a learnable :class:`LogitScale` (init 1 / 0.07, bounded at 100,
see :mod:`mlip_fast.constants`) that is used when ``forward`` gets no ``logit_scale``; pass the model's own
scale to use that instead. As in open_clip, the bound is kept by clamping the parameter after each
optimizer step, not inside ``forward``: call :func:`clamp_logit_scales_` on the model (and on the loss
modules whose own scale you train) after ``optimizer.step()``. ``impl`` picks the patch-sentence scores
implementation: "auto", "reference", "chunked" or "triton" (see :func:`mlip_fast.ops.patch_sentence_scores`, and
:func:`mlip_fast.ops.patch_sentence_ot_scores` with ``local_matching="ot"``).

Example::

    from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
    criterion = MLIPLoss()
    total, terms = criterion(**model(batch))
    total.backward()
    optimizer.step()
    clamp_logit_scales_(model)
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import nn

from mlip_fast import functional as MF
from mlip_fast.constants import (DEFAULT_OT_EPS, DEFAULT_OT_ITERS, DEFAULT_SIE_TEMPERATURE, ESTIMATOR_MODES,
                                 INIT_TEMPERATURE)
from mlip_fast.functional.integrity import DEFAULT_OTHER_TEMPERATURE
from mlip_fast.logit_scale import LogitScale, clamp_logit_scales_

__all__ = ["LogitScale", "clamp_logit_scales_", "GlobalContrastiveLoss", "PatchSentenceLoss",
           "SemanticIntegrityLoss", "MLIPLoss"]


def _loss_scale(init_temperature: float, learnable: bool = True) -> LogitScale:
    if not init_temperature > 0:
        raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
    return LogitScale(1.0 / init_temperature, learnable=learnable)


class GlobalContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between global image and report vectors [B, D]; see
    :func:`mlip_fast.functional.global_contrastive_loss`.

    Args:
        local_loss: score the local rows against all-gathered columns (open_clip's ``local_loss``).
        gather_with_grad: the gathered columns carry gradient back to their ranks.
        init_temperature: initial temperature of this module's own logit scale (0.07).
        learn_temperature: the scale is a parameter (else a buffer).
    """

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
        """Symmetric InfoNCE of the global vectors.

        Args:
            image: [B, D] image vectors (of the masked view); text: [B, D] report vectors; row b of each is a pair.
            logit_scale: 0-dim multiplier of the cosines (1 / temperature); None uses this module's own.
            weights: optional [B] per-row weights (detached, normalised to mean 1 over the global batch).

        Returns:
            0-dim float32 loss = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)], a (weighted) mean over rows.
        """
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return MF.global_contrastive_loss(
            image, text, scale, weights, local_loss=self.local_loss, gather_with_grad=self.gather_with_grad
        )


class PatchSentenceLoss(nn.Module):
    """MLIP's patch-sentence local loss (token-wise max in both directions, or optimal transport; one fused scores
    call); see :func:`mlip_fast.functional.patch_sentence_loss`.

    Args:
        local_loss, gather_with_grad: the distributed mode, as :class:`GlobalContrastiveLoss`.
        impl: scores op implementation: "auto" (Triton on CUDA, chunked elsewhere), "reference", "chunked", "triton".
        deterministic: the fused backward without atomics (bitwise reproducible gradients).
        init_temperature, learn_temperature: this module's own logit scale.
        precision: "ieee" (default) or "tf32" (fp32 embeddings on the TF32 tensor cores, Triton on a GPU).
        local_matching: "max" (the method's token-wise max, the default) or "ot" (entropic optimal transport:
            one [B, G] score matrix s = sum_pq P*_pq cos(v_p, u_q) for both directions, see
            :func:`mlip_fast.ops.patch_sentence_ot_scores`); ot_eps, ot_iters: its regularisation and Sinkhorn
            iterations.
    """

    def __init__(
        self,
        local_loss: bool = True,
        gather_with_grad: bool = True,
        impl: str = "auto",
        deterministic: bool = False,
        init_temperature: float = INIT_TEMPERATURE,
        learn_temperature: bool = True,
        precision: str = "ieee",
        local_matching: str = "max",
        ot_eps: float = DEFAULT_OT_EPS,
        ot_iters: int = DEFAULT_OT_ITERS,
    ):
        super().__init__()
        MF.LossConfig(local_matching=local_matching, ot_eps=ot_eps, ot_iters=ot_iters).matching()
        self.local_matching, self.ot_eps, self.ot_iters = local_matching, ot_eps, ot_iters
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.impl = impl
        self.deterministic = deterministic
        self.precision = precision
        self.logit_scale = _loss_scale(init_temperature, learn_temperature)

    def forward(self, patches, sentences, sentence_mask=None, patch_mask=None, logit_scale=None, weights=None):
        """The local loss of B images against their B reports (and the other ranks' under torch.distributed).

        Args:
            patches: [B, K, D] kept patch vectors; sentences: [B, S, D] sentence vectors of each image's report,
                any float dtype (normalised inside the scores op, which runs in that dtype).
            sentence_mask: [B, S] bool or uint8, True = valid (every report needs one); patch_mask: [B, K] or None.
            logit_scale: 0-dim multiplier (1 / tau_l); None uses this module's own. weights: optional [B].

        Returns:
            0-dim float32 loss = 1/2 [CE_rows(s * S_I2T) + CE_cols(s * S_T2I)], S_I2T[i, j] = mean_p max_q
            cos(v_ip, u_jq), S_T2I[i, j] = mean_q max_p cos(v_ip, u_jq) ("max"; with "ot" both are the OT
            score), positives on the diagonal.
        """
        scale = self.logit_scale() if logit_scale is None else logit_scale
        return MF.patch_sentence_loss(
            patches, sentences, sentence_mask, patch_mask, scale, weights,
            local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
            impl=self.impl, deterministic=self.deterministic, precision=self.precision,
            local_matching=self.local_matching, ot_eps=self.ot_eps, ot_iters=self.ot_iters,
        )


class SemanticIntegrityLoss(nn.Module):
    """KL loss of the semantic integrity estimator; see :func:`mlip_fast.functional.semantic_integrity_loss`.

    Args:
        temperature: tau_sie of the target distribution (0.1).
        target: "guided" (a patch's best cosine to its own report, MLIP as specified) or "discriminative" (that
            minus a soft maximum over the other reports of the batch).
        other_temperature: tau_o of the discriminative target's soft maximum (0.05).
    """

    def __init__(self, temperature: float = DEFAULT_SIE_TEMPERATURE, target: str = "guided",
                 other_temperature: float = DEFAULT_OTHER_TEMPERATURE):
        super().__init__()
        MF.LossConfig(sie_temperature=temperature, sie_target=target, sie_other_temperature=other_temperature).checked()
        self.temperature, self.target, self.other_temperature = temperature, target, other_temperature

    def forward(self, integrity_logits, patches, sentences, sentence_mask=None, patch_mask=None):
        """KL(target_b || softmax_p(a_b)) averaged over images.

        Args:
            integrity_logits: [B, K] estimator logits at the kept patches; patches: [B, K, D]; sentences: [B, S, D];
                masks as in :class:`PatchSentenceLoss`.

        Returns:
            0-dim float32 loss; the target (from ``target``) is detached, so only the estimator learns from it.
        """
        return MF.semantic_integrity_loss(
            integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature=self.temperature,
            target=self.target, other_temperature=self.other_temperature,
        )


class MLIPLoss(nn.Module):
    """L = L_g + lambda_local * L_l + lambda_sie * L_sie, returning ``(total, terms)``.

    Composed of the three loss modules (``global_loss``, ``patch_sentence_loss``, ``integrity_loss``), with the
    options in one :class:`~mlip_fast.functional.LossConfig` (``config``): the constructor takes its fields
    (lambda_local, lambda_sie, lambda_within, weight_global, weight_local, sie_temperature, sie_mode, sie_target,
    sie_other_temperature, local_loss, gather_with_grad, impl, deterministic, precision, local_matching, ot_eps,
    ot_iters) and ``init_temperature`` / ``learn_temperature`` of the two contrastive terms' own logit scales, which ``forward``
    uses when it gets none (a model passes its own).

    ``forward`` takes the model's output dict as keyword arguments (``criterion(**outputs)``): image_global
    [B, D], text_global [B, D], patches [B, K, D], sentences [B, S, D], sentence_mask [B, S],
    integrity_logits [B, K], integrity_weights [B], logit_scale_global, logit_scale_local, and optionally
    patch_mask [B, K], patch_index [B, K] (ignored), integrity_score [B] and integrity_target [B] (the per-view
    heads' outputs of the ``maco`` and ``predictor`` modes, ``sie_mode``). The local inputs are checked once for
    both local terms.
    """

    def __init__(self, init_temperature: float = INIT_TEMPERATURE, learn_temperature: bool = True, **options):
        super().__init__()
        self.config = MF.LossConfig(**options).checked()
        cfg = self.config
        self.global_loss = GlobalContrastiveLoss(cfg.local_loss, cfg.gather_with_grad, init_temperature,
                                                 learn_temperature)
        self.patch_sentence_loss = PatchSentenceLoss(cfg.local_loss, cfg.gather_with_grad, cfg.impl, cfg.deterministic,
                                                     init_temperature, learn_temperature, cfg.precision,
                                                     cfg.local_matching, cfg.ot_eps, cfg.ot_iters)
        target = cfg.sie_mode if cfg.sie_mode in ESTIMATOR_MODES else "guided"  # unused in the other modes
        self.integrity_loss = SemanticIntegrityLoss(cfg.sie_temperature, target, cfg.sie_other_temperature)

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
        integrity_score: Optional[torch.Tensor] = None,
        integrity_target: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        del patch_index  # part of the model outputs; positions do not enter the loss
        return MF.mlip_loss(
            image_global, text_global, patches, sentences, sentence_mask, integrity_logits, integrity_weights,
            self.global_loss.logit_scale() if logit_scale_global is None else logit_scale_global,
            self.patch_sentence_loss.logit_scale() if logit_scale_local is None else logit_scale_local,
            patch_mask, integrity_score=integrity_score, integrity_target=integrity_target, config=self.config,
        )
