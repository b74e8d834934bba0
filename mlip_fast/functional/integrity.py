"""The semantic integrity estimator's loss: KL from a detached patch-importance target to the estimator."""
from __future__ import annotations

import math
from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_SIE_TEMPERATURE
from mlip_fast.functional._common import _normalize
from mlip_fast.functional.local import _check_local_inputs


SIE_TARGETS = ("guided", "discriminative")
# tau of the soft maximum over the other reports in the discriminative target: at cosine scale, 0.05 weighs the
# best-matching other report by e^(0.1 / 0.05) ~ 7x one matching 0.1 worse, close to a max but differentiable in
# spirit and stable when two reports tie.
DEFAULT_OTHER_TEMPERATURE = 0.05
# image block of the discriminative target's [block, K, B, S] similarity (bounds its memory at large batches)
TARGET_BLOCK_ELEMENTS = 2**22


def semantic_integrity_loss(
    integrity_logits: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    temperature: float = DEFAULT_SIE_TEMPERATURE,
    target: str = "guided",
    other_temperature: float = DEFAULT_OTHER_TEMPERATURE,
) -> torch.Tensor:
    """KL loss that trains the semantic integrity estimator.

    Args:
        integrity_logits: [B, K] estimator logits a_{b,p} at the kept patches.
        patches: [B, K, D], sentences: [B, S, D] (each image with its own report), masks as usual.
        temperature: tau_sie of the target distribution (spec leaves it open; 0.1 by default).
        target: what marks a patch as important (both detached):
            - "guided" (MLIP as specified): t_bp = max_{valid q} cos(v_bp, u_bq), the patch's best match in its
              own report;
            - "discriminative": t_bp = own_bp - tau_o * logsumexp_{j != b} (max_{valid q} cos(v_bp, u_jq) / tau_o),
              its best match in its own report minus a soft maximum of its best matches in the other reports of
              the (local) batch: a sentence every report shares (a normal heart) stops attracting the target,
              a finding only this report describes does not. With one image it is the guided target.
        other_temperature: tau_o of that soft maximum (0.05 by default).

    Returns:
        0-dim float32 mean over images of KL(target_b || softmax_p(a_b)), where target_b = softmax_p(t_b / tau_sie)
        over valid p.
    """
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    _check_integrity_inputs(integrity_logits, patches, temperature, target, other_temperature)
    return _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature,
                                    target, other_temperature)


def integrity_target_scores(patches: torch.Tensor, sentences: torch.Tensor, sentence_mask: Optional[torch.Tensor] = None,
                            *, target: str = "guided",
                            other_temperature: float = DEFAULT_OTHER_TEMPERATURE) -> torch.Tensor:
    """The estimator's per-patch target scores t [B, K] of :func:`semantic_integrity_loss` (before the softmax over
    patches), without gradient: patches [B, K, D] against sentences [B, S, D] (each image with its own report, the
    batch's other reports as the discriminative target's others). For diagnostics (does the target single out
    the finding patches?)."""
    sentence_mask, _ = _check_local_inputs(patches, sentences, sentence_mask, None)
    if target not in SIE_TARGETS:
        raise ValueError(f"target must be one of {SIE_TARGETS}, got {target!r}")
    with torch.no_grad():
        return _target_scores(patches, sentences, sentence_mask, target, other_temperature,
                              torch.promote_types(patches.dtype, torch.float32))


def _check_integrity_inputs(integrity_logits, patches, temperature, target="guided",
                            other_temperature=DEFAULT_OTHER_TEMPERATURE) -> None:
    _checks.check_tensor("integrity_logits", integrity_logits, 2, dims=("B", "K"))
    if integrity_logits.shape != patches.shape[:2]:
        raise ValueError(
            f"integrity_logits must be [B, K] = {tuple(patches.shape[:2])} (one logit per kept patch), "
            f"got {tuple(integrity_logits.shape)}"
        )
    for name, value in (("temperature", temperature), ("other_temperature", other_temperature)):
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    if target not in SIE_TARGETS:
        raise ValueError(f"target must be one of {SIE_TARGETS}, got {target!r}")


def _best_matches(v: torch.Tensor, u: torch.Tensor, sentence_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """[B, K, J]: for each patch, its best cosine to each report j (v [B, K, D], u [J, S, D] unit vectors); -inf
    for a report without a valid sentence. Computed in image blocks of bounded size."""
    B, K, _ = v.shape
    J, S, _ = u.shape
    out = v.new_empty(B, K, J)
    block = max(1, TARGET_BLOCK_ELEMENTS // max(1, K * J * S))
    for b0 in range(0, B, block):
        sim = torch.einsum("bkd,jsd->bkjs", v[b0 : b0 + block], u)
        if sentence_mask is not None:
            sim = sim.masked_fill(~sentence_mask[None, None], float("-inf"))
        out[b0 : b0 + block] = sim.amax(dim=-1)
    return out


def _target_scores(patches, sentences, sentence_mask, target, other_temperature, dtype) -> torch.Tensor:
    """t [B, K] of :func:`semantic_integrity_loss`'s ``target`` (no gradient)."""
    v, u = _normalize(patches.to(dtype)), _normalize(sentences.to(dtype))
    B = v.shape[0]
    if target == "guided" or B == 1:
        sim = torch.einsum("bkd,bsd->bks", v, u)
        if sentence_mask is not None:
            sim = sim.masked_fill(~sentence_mask[:, None, :], float("-inf"))
        return sim.amax(dim=-1)
    best = _best_matches(v, u, sentence_mask)  # [B, K, B]
    own = torch.diagonal(best, dim1=0, dim2=2).T  # [B, K]: best[b, :, b]
    eye = torch.eye(B, dtype=torch.bool, device=v.device)[:, None, :]
    others = best.masked_fill(eye, float("-inf")) / other_temperature
    return own - other_temperature * torch.logsumexp(others, dim=-1)


def _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask, temperature,
                             target="guided", other_temperature=DEFAULT_OTHER_TEMPERATURE):
    """:func:`semantic_integrity_loss` on checked inputs."""
    dtype = torch.promote_types(integrity_logits.dtype, torch.float32)
    with torch.no_grad():
        target_logits = _target_scores(patches, sentences, sentence_mask, target, other_temperature, dtype)
        target_logits = target_logits / temperature  # [B, K]
        if patch_mask is not None:
            target_logits = target_logits.masked_fill(~patch_mask, float("-inf"))
        target_dist = torch.softmax(target_logits, dim=-1)
    logits = integrity_logits.to(dtype)
    if patch_mask is not None:
        logits = logits.masked_fill(~patch_mask, float("-inf"))
    log_q = torch.log_softmax(logits, dim=-1)
    # xlogy keeps 0 * log 0 = 0 at padded patches; the target there is 0 so log_q's -inf never enters.
    kl = (torch.xlogy(target_dist, target_dist)
          - torch.where(target_dist > 0, target_dist * log_q, torch.zeros_like(target_dist)))
    return kl.sum(dim=-1).mean()
