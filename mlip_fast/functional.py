"""MLIP's losses as functions (the ``mlip_fast.losses`` modules wrap these).

Conventions: embeddings are L2-normalised inside (normalising twice changes nothing); masks are bool with
True = valid; ``logit_scale`` is the multiplicative scale (exp of the learnable log-scale); reductions are
means over the local rows. Under torch.distributed every loss scores the B local rows against the
G = B x world_size gathered columns (open_clip's ``local_loss``) and, with ``gather_with_grad``, the
gathered columns carry gradient to their owners, so the sum of the per-rank losses has the gradient of
one process on the concatenated batch. The patch-sentence scores go through
:func:`mlip_fast.ops.patch_sentence_scores`, whose ``impl`` picks reference / chunked / triton.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast.distributed import gather, rank_and_world
from mlip_fast.ops.patch_sentence import patch_sentence_scores

DEFAULT_SIE_TEMPERATURE = 0.1


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def _check_scale(name: str, scale) -> torch.Tensor:
    if isinstance(scale, (int, float)):
        scale = torch.tensor(float(scale))
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1:
        raise ValueError(f"{name} must be a scalar (float or 1-element tensor), got {scale!r}")
    return scale.reshape(())


def _row_weights(weights: Optional[torch.Tensor], rows: int, device, group, *, gathered: bool) -> Optional[torch.Tensor]:
    """Detached per-row weights normalised to mean 1 over the global batch; None when not weighted."""
    if weights is None:
        return None
    _checks.check_tensor("weights", weights, 1, dims=("B",))
    if weights.shape[0] != rows:
        raise ValueError(f"weights must have shape [B={rows}], got {tuple(weights.shape)}")
    if _checks.VALUE_CHECKS and bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    w = weights.detach().to(device=device, dtype=torch.float32)
    w_all = gather(w, with_grad=False, group=group)
    mean = w_all.mean().clamp_min(torch.finfo(torch.float32).tiny)
    return (w_all if gathered else w) / mean


def _weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")
    return ce.mean() if weights is None else (ce * weights).mean()


def _labels(rows: int, offset: int, device) -> torch.Tensor:
    return torch.arange(rows, device=device) + offset


def global_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    weights: Optional[torch.Tensor] = None,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    group=None,
) -> torch.Tensor:
    """Symmetric InfoNCE between global image and text vectors.

    Args:
        image: [B, D] image vectors (of the masked view); text: [B, D] report vectors; pair b is positive.
        logit_scale: scalar multiplier of the cosine similarities (1 / temperature).
        weights: optional [B] per-sample weights (MLIP's kept integrity mass); detached and normalised to
            mean 1 over the global batch; row b of both directions is weighted by weights[b].
        local_loss: score local rows against gathered columns (else every rank computes the full G x G).
        gather_with_grad: gathered columns carry gradient back to their ranks.

    Returns:
        0-dim float32 loss = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)] (weighted mean over rows).
    """
    _checks.check_tensor("image", image, 2, dims=("B", "D"))
    _checks.check_tensor("text", text, 2, dims=("B", "D"))
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be [B, D] with equal B and D")
    scale = _check_scale("logit_scale", logit_scale)
    image, text = _normalize(image), _normalize(text)
    rank, _ = rank_and_world(group)
    B = image.shape[0]
    image_all = gather(image, with_grad=gather_with_grad, group=group)
    text_all = gather(text, with_grad=gather_with_grad, group=group)
    if local_loss:
        logits_i = scale * image @ text_all.T  # [B, G]
        logits_t = scale * text @ image_all.T  # [B, G]
        labels = _labels(B, rank * B, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=False)
    else:
        logits_i = scale * image_all @ text_all.T  # [G, G]
        logits_t = logits_i.T
        labels = _labels(image_all.shape[0], 0, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=True)
    return 0.5 * (_weighted_ce(logits_i, labels, w) + _weighted_ce(logits_t, labels, w))


def _check_local_inputs(patches, sentences, sentence_mask, patch_mask):
    _checks.check_tensor("patches", patches, 3, dims=("B", "K", "D"))
    _checks.check_tensor("sentences", sentences, 3, dims=("B", "S", "D"))
    B, K, D = patches.shape
    if sentences.shape[0] != B:
        raise ValueError(f"patches has batch {B} but sentences has batch {sentences.shape[0]} (one report per image)")
    if sentences.shape[-1] != D:
        raise ValueError(f"embedding widths differ: patches D={D}, sentences D={sentences.shape[-1]}")
    sentence_mask = _checks.check_mask("sentence_mask", sentence_mask, sentences.shape[:2], device=sentences.device)
    patch_mask = _checks.check_mask("patch_mask", patch_mask, patches.shape[:2], device=patches.device)
    if _checks.VALUE_CHECKS:
        _checks.check_rows_nonempty("sentence_mask", sentence_mask, "sentence")
        _checks.check_rows_nonempty("patch_mask", patch_mask, "patch")
    return sentence_mask, patch_mask


def patch_sentence_loss(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    logit_scale=1.0 / 0.07,
    weights: Optional[torch.Tensor] = None,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    impl: str = "auto",
    deterministic: bool = False,
    group=None,
) -> torch.Tensor:
    """MLIP's patch-sentence local loss with token-wise max aggregation in both directions.

    Args:
        patches: [B, K, D] kept patch vectors of each image; sentences: [B, S, D] sentence vectors of each
            image's report (padded); sentence_mask: [B, S] bool (True = valid, every report needs one);
            patch_mask: [B, K] bool or None.
        logit_scale: scalar multiplier (1 / tau_l). weights: optional [B] row weights as in
            :func:`global_contrastive_loss`.
        impl: implementation of the scores op ("auto", "reference", "chunked", "triton").

    Returns:
        0-dim float32 loss = 1/2 [CE_rows(s * S_I2T) + CE_cols(s * S_T2I)] with
        S_I2T[i, j] = mean_p max_q <v_ip, u_jq> and S_T2I[i, j] = mean_q max_p <v_ip, u_jq>; the
        diagonal pairs are positives. The column CE of S_T2I is the row CE of its transpose: for
        report j, a softmax over images.
    """
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    scale = _check_scale("logit_scale", logit_scale)
    patches, sentences = _normalize(patches), _normalize(sentences)
    rank, _ = rank_and_world(group)
    B = patches.shape[0]
    patches_all = gather(patches, with_grad=gather_with_grad, group=group)
    sentences_all = gather(sentences, with_grad=gather_with_grad, group=group)
    smask_all = gather(sentence_mask, with_grad=False, group=group)
    pmask_all = gather(patch_mask, with_grad=False, group=group)
    kw = dict(impl=impl, deterministic=deterministic)
    if local_loss:
        # images of this rank vs all reports; all images vs reports of this rank (transposed to rows).
        i2t, _ = patch_sentence_scores(patches, sentences_all, smask_all, patch_mask, directions="i2t", **kw)
        _, t2i = patch_sentence_scores(patches_all, sentences, sentence_mask, pmask_all, directions="t2i", **kw)
        logits_i, logits_t = scale * i2t, scale * t2i.T  # [B, G] each
        labels = _labels(B, rank * B, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
    else:
        i2t, t2i = patch_sentence_scores(patches_all, sentences_all, smask_all, pmask_all, **kw)
        logits_i, logits_t = scale * i2t, scale * t2i.T
        labels = _labels(patches_all.shape[0], 0, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=True)
    return 0.5 * (_weighted_ce(logits_i, labels, w) + _weighted_ce(logits_t, labels, w))


def semantic_integrity_loss(
    integrity_logits: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = DEFAULT_SIE_TEMPERATURE,
) -> torch.Tensor:
    """KL loss that trains the semantic integrity estimator.

    Args:
        integrity_logits: [B, K] estimator logits a_{b,p} at the kept patches.
        patches: [B, K, D], sentences: [B, S, D] (each image with its own report), masks as usual.
        temperature: tau_sie of the target distribution (spec leaves it open; 0.1 by default).

    Returns:
        0-dim float32 mean over images of KL(target_b || softmax_p(a_b)), where
        target_b = softmax_p(max_{valid q} cos(v_bp, u_bq) / tau_sie) over valid p, detached.
    """
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    _checks.check_tensor("integrity_logits", integrity_logits, 2, dims=("B", "K"))
    if integrity_logits.shape != patches.shape[:2]:
        raise ValueError(
            f"integrity_logits must be [B, K] = {tuple(patches.shape[:2])} (one logit per kept patch), "
            f"got {tuple(integrity_logits.shape)}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(integrity_logits.dtype, torch.float32)
    with torch.no_grad():
        sim = torch.einsum("bkd,bsd->bks", _normalize(patches.to(dtype)), _normalize(sentences.to(dtype)))
        if sentence_mask is not None:
            sim = sim.masked_fill(~sentence_mask[:, None, :], float("-inf"))
        target_logits = sim.max(dim=-1).values / temperature  # [B, K]
        if patch_mask is not None:
            target_logits = target_logits.masked_fill(~patch_mask, float("-inf"))
        target = torch.softmax(target_logits, dim=-1)
    logits = integrity_logits.to(dtype)
    if patch_mask is not None:
        logits = logits.masked_fill(~patch_mask, float("-inf"))
    log_q = torch.log_softmax(logits, dim=-1)
    # xlogy keeps 0 * log 0 = 0 at padded patches; the target there is 0 so log_q's -inf never enters.
    kl = torch.xlogy(target, target) - torch.where(target > 0, target * log_q, torch.zeros_like(target))
    return kl.sum(dim=-1).mean()


def mlip_loss(
    image_global: torch.Tensor,
    text_global: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    integrity_logits: Optional[torch.Tensor] = None,
    integrity_weights: Optional[torch.Tensor] = None,
    logit_scale_global=1.0 / 0.07,
    logit_scale_local=1.0 / 0.07,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    lambda_local: float = 1.0,
    lambda_sie: float = 0.1,
    weight_global: bool = True,
    weight_local: bool = False,
    sie_temperature: float = DEFAULT_SIE_TEMPERATURE,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    impl: str = "auto",
    deterministic: bool = False,
    group=None,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """MLIP's total loss L = L_g + lambda_local * L_l + lambda_sie * L_sie.

    The inputs are the model's outputs (see docs/architecture.md). ``integrity_weights`` [B] weight the
    global rows (``weight_global``) and optionally the local rows (``weight_local``). A term whose lambda
    is 0 is not computed.

    Returns:
        (total, terms) where terms has detached "loss_global", "loss_local", "loss_sie" and "loss".
    """
    weights = integrity_weights
    dist_kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, group=group)
    loss_g = global_contrastive_loss(
        image_global, text_global, logit_scale_global, weights if weight_global else None, **dist_kw
    )
    zero = loss_g.new_zeros(())
    loss_l = zero
    if lambda_local:
        loss_l = patch_sentence_loss(
            patches, sentences, sentence_mask, patch_mask, logit_scale_local, weights if weight_local else None,
            impl=impl, deterministic=deterministic, **dist_kw,
        )
    loss_s = zero
    if lambda_sie:
        if integrity_logits is None:
            raise ValueError("lambda_sie > 0 needs integrity_logits [B, K] (or set lambda_sie=0)")
        loss_s = semantic_integrity_loss(
            integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature=sie_temperature
        )
    total = loss_g + lambda_local * loss_l + lambda_sie * loss_s
    terms = {
        "loss_global": loss_g.detach(),
        "loss_local": loss_l.detach(),
        "loss_sie": loss_s.detach(),
        "loss": total.detach(),
    }
    return total, terms
