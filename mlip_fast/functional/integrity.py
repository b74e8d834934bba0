"""The semantic integrity estimator's loss: KL from a detached patch-importance target to the estimator."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_SIE_TEMPERATURE
from mlip_fast.functional._common import _normalize
from mlip_fast.functional.local import _check_local_inputs


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
    _check_integrity_inputs(integrity_logits, patches, temperature)
    return _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature)


def _check_integrity_inputs(integrity_logits, patches, temperature) -> None:
    _checks.check_tensor("integrity_logits", integrity_logits, 2, dims=("B", "K"))
    if integrity_logits.shape != patches.shape[:2]:
        raise ValueError(
            f"integrity_logits must be [B, K] = {tuple(patches.shape[:2])} (one logit per kept patch), "
            f"got {tuple(integrity_logits.shape)}"
        )
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature):
    """:func:`semantic_integrity_loss` on checked inputs."""
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
