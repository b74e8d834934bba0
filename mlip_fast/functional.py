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

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_SIE_TEMPERATURE, INIT_LOGIT_SCALE
from mlip_fast.distributed import all_to_all_blocks, gather, max_size, rank_and_world
from mlip_fast.ops.patch_sentence import ScoresOptions, check_inputs, scores_unchecked


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def _check_scale(name: str, scale) -> torch.Tensor:
    """The logit scale as a 0-dim tensor; it must be finite and > 0 (a value check: one host sync)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a scalar (float or 1-element tensor), got {scale!r}")
    if isinstance(scale, (int, float)):
        scale = torch.tensor(float(scale))
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"{name} must be a floating scalar (float or 1-element tensor), got {scale!r}")
    scale = scale.reshape(())
    if _checks.value_checks():
        value = float(scale.detach())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    return scale


def _check_batch(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"empty input: {name} has batch size 0 {tuple(x.shape)} (every loss needs B >= 1)")


def _row_weights(weights: Optional[torch.Tensor], rows: int, device, group, *, gathered: bool) -> Optional[torch.Tensor]:
    """Detached per-row weights normalised to mean 1 over the global batch; None when not weighted."""
    if weights is None:
        return None
    _checks.check_tensor("weights", weights, 1, dims=("B",))
    if weights.shape[0] != rows:
        raise ValueError(f"weights must have shape [B={rows}], got {tuple(weights.shape)}")
    if _checks.value_checks() and bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    if _checks.value_checks() and not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contains NaN or Inf")
    w = weights.detach().to(device=device, dtype=torch.float32)
    w_all = gather(w, with_grad=False, group=group)
    mean = w_all.mean()
    if _checks.value_checks() and not bool(mean > 0):
        raise ValueError("weights are all zero over the batch: no row would contribute to the loss")
    return (w_all if gathered else w) / mean.clamp_min(torch.finfo(torch.float32).tiny)


def _weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")
    return ce.mean() if weights is None else (ce * weights).mean()


def _labels(rows: int, offset: int, device) -> torch.Tensor:
    return torch.arange(rows, device=device) + offset


def _symmetric_ce(sim_i: torch.Tensor, sim_t: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                  weights: Optional[torch.Tensor]) -> torch.Tensor:
    """1/2 [CE(scale * sim_i) + CE(scale * sim_t)]; similarities are widened to fp32 (fp64 stays) before
    scaling, so a large scale cannot overflow half-precision logits."""
    dtype = torch.promote_types(sim_i.dtype, torch.float32)
    scale = scale.to(device=sim_i.device, dtype=dtype)
    return 0.5 * (_weighted_ce(scale * sim_i.to(dtype), labels, weights)
                  + _weighted_ce(scale * sim_t.to(dtype), labels, weights))


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
    _check_batch("image", image)
    scale = _check_scale("logit_scale", logit_scale)
    image, text = _normalize(image), _normalize(text)
    rank, _ = rank_and_world(group)
    B = image.shape[0]
    image_all = gather(image, with_grad=gather_with_grad, group=group)
    text_all = gather(text, with_grad=gather_with_grad, group=group)
    if local_loss:
        sim_i = image @ text_all.T  # [B, G]
        sim_t = text @ image_all.T  # [B, G]
        labels = _labels(B, rank * B, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=False)
    else:
        sim_i = image_all @ text_all.T  # [G, G]
        sim_t = sim_i.T
        labels = _labels(image_all.shape[0], 0, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=True)
    return _symmetric_ce(sim_i, sim_t, scale, labels, w)


def _check_local_inputs(patches, sentences, sentence_mask, patch_mask):
    """The local losses' one validation boundary: the scores op's tensor checks (with the report batch named
    B), one report per image, every row non-empty. Returns the masks as bool."""
    # shapes first (check_inputs below reads the values, once)
    _checks.check_tensor("patches", patches, 3, dims=("B", "K", "D"), finite=False)
    _check_batch("patches", patches)
    _checks.check_tensor("sentences", sentences, 3, dims=("B", "S", "D"), finite=False)
    if sentences.shape[0] != patches.shape[0]:
        raise ValueError(f"patches has batch {patches.shape[0]} but sentences has batch {sentences.shape[0]} "
                         "(one report per image)")
    sentence_mask, patch_mask = check_inputs(patches, sentences, sentence_mask, patch_mask,
                                             sentence_dims=("B", "S", "D"))
    if _checks.value_checks():
        _checks.check_rows_nonempty("sentence_mask", sentence_mask, "sentence")
        _checks.check_rows_nonempty("patch_mask", patch_mask, "patch")
    return sentence_mask, patch_mask


def patch_sentence_loss(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    logit_scale=INIT_LOGIT_SCALE,
    weights: Optional[torch.Tensor] = None,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    impl: str = "auto",
    deterministic: bool = False,
    precision: str = "ieee",
    group=None,
) -> torch.Tensor:
    """MLIP's patch-sentence local loss with token-wise max aggregation in both directions.

    Args:
        patches: [B, K, D] kept patch vectors of each image; sentences: [B, S, D] sentence vectors of each
            image's report (padded; S may differ between ranks); sentence_mask: [B, S] bool (True = valid,
            every report needs one); patch_mask: [B, K] bool or None.
        logit_scale: scalar multiplier (1 / tau_l). weights: optional [B] row weights as in
            :func:`global_contrastive_loss`.
        impl: implementation of the scores op ("auto", "reference", "chunked", "triton").
        precision: "ieee" or "tf32" for fp32 embeddings on a GPU (see :func:`mlip_fast.ops.patch_sentence_scores`).

    Precision: the embeddings go to the scores op in their own dtype, normalised inside the op (fp32 norms, no
    normalised copies held): a bf16 / fp16 model hands it half-precision tensors, which it scores on the tensor
    cores with fp32 accumulation; the scores, logits and cross-entropies are fp32.

    Returns:
        0-dim float32 loss = 1/2 [CE_rows(s * S_I2T) + CE_cols(s * S_T2I)] with
        S_I2T[i, j] = mean_p max_q <v_ip, u_jq> and S_T2I[i, j] = mean_q max_p <v_ip, u_jq>; the
        diagonal pairs are positives. The column CE of S_T2I is the row CE of its transpose: for
        report j, a softmax over images.

    Work: one scores call computes both directions from one pass over the similarities. In the default
    distributed mode (``local_loss`` and ``gather_with_grad``) each rank scores its B images against all G
    gathered reports in both directions; the T2I scores of its own reports against the other ranks' images
    are the [B, B] blocks those ranks computed, exchanged with one all-to-all (and the gradients with the
    reverse one), so no rank gathers patches and no similarity is computed twice. Without
    ``gather_with_grad`` the gradient may only reach local tensors, so the T2I rows are computed locally
    against the gathered images (a second call).
    """
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    scale = _check_scale("logit_scale", logit_scale)
    options = ScoresOptions(normalize=True, precision=precision, deterministic=bool(deterministic)).checked()
    return _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale, weights, options,
                                local_loss=local_loss, gather_with_grad=gather_with_grad, impl=impl, group=group)


def _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale, weights, options: ScoresOptions, *,
                         local_loss, gather_with_grad, impl, group) -> torch.Tensor:
    """:func:`patch_sentence_loss` on checked inputs (bool masks, a checked scale)."""
    rank, world = rank_and_world(group)
    B = patches.shape[0]
    both, i2t_only, t2i_only = (options, replace(options, directions="i2t"), replace(options, directions="t2i"))
    if world == 1:
        i2t, t2i = scores_unchecked(patches, sentences, sentence_mask, patch_mask, both, impl=impl)
        logits_i, logits_t = i2t, t2i.T
        labels = _labels(B, 0, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
        return _symmetric_ce(logits_i, logits_t, scale, labels, w)
    if sentence_mask is None:
        sentence_mask = torch.ones(sentences.shape[:2], dtype=torch.bool, device=sentences.device)
    s_max = max_size(sentences.shape[1], group, sentences.device)
    sentences_all = gather(sentences, with_grad=gather_with_grad, group=group, pad_dim=1, pad_size=s_max)
    smask_all = gather(sentence_mask, with_grad=False, group=group, pad_dim=1, pad_size=s_max)
    if local_loss and gather_with_grad:
        i2t, t2i = scores_unchecked(patches, sentences_all, smask_all, patch_mask, both, impl=impl)
        logits_i = i2t  # [B, G]: local images vs all reports
        logits_t = all_to_all_blocks(t2i, group).T  # [B, G]: local reports vs all images
        labels = _labels(B, rank * B, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
    elif local_loss:
        patches_all = gather(patches, with_grad=False, group=group)
        pmask_all = gather(patch_mask, with_grad=False, group=group)
        logits_i, _ = scores_unchecked(patches, sentences_all, smask_all, patch_mask, i2t_only, impl=impl)
        local_s = sentences_all[rank * B : (rank + 1) * B]
        local_m = smask_all[rank * B : (rank + 1) * B]
        _, t2i = scores_unchecked(patches_all, local_s, local_m, pmask_all, t2i_only, impl=impl)
        logits_t = t2i.T
        labels = _labels(B, rank * B, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
    else:
        patches_all = gather(patches, with_grad=gather_with_grad, group=group)
        pmask_all = gather(patch_mask, with_grad=False, group=group)
        i2t, t2i = scores_unchecked(patches_all, sentences_all, smask_all, pmask_all, both, impl=impl)
        logits_i, logits_t = i2t, t2i.T
        labels = _labels(patches_all.shape[0], 0, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=True)
    return _symmetric_ce(logits_i, logits_t, scale, labels, w)


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
    weight_global, weight_local: weight the rows of the global / local contrastive terms by the kept integrity
        mass (``integrity_weights``, normalised to mean 1).
    sie_temperature: tau_sie of the integrity estimator's target distribution.
    local_loss, gather_with_grad: the distributed mode (open_clip's ``ClipLoss`` arguments).
    impl, deterministic, precision: the patch-sentence scores op's (see :func:`patch_sentence_loss`).
    """

    lambda_local: float = 1.0
    lambda_sie: float = 0.1
    weight_global: bool = True
    weight_local: bool = False
    sie_temperature: float = DEFAULT_SIE_TEMPERATURE
    local_loss: bool = True
    gather_with_grad: bool = True
    impl: str = "auto"
    deterministic: bool = False
    precision: str = "ieee"

    def checked(self) -> "LossConfig":
        check_loss_weights(lambda_local=self.lambda_local, lambda_sie=self.lambda_sie)
        if not (isinstance(self.sie_temperature, (int, float)) and math.isfinite(self.sie_temperature)
                and self.sie_temperature > 0):
            raise ValueError(f"sie_temperature must be finite and > 0, got {self.sie_temperature}")
        self.scores_options()  # the op's options, checked
        return self

    def scores_options(self) -> ScoresOptions:
        """What the local term hands the scores op: normalised inside it, in the embeddings' own dtype."""
        return ScoresOptions(normalize=True, precision=self.precision, deterministic=bool(self.deterministic)).checked()


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
    config: Optional[LossConfig] = None,
    group=None,
    **options,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """MLIP's total loss L = L_g + lambda_local * L_l + lambda_sie * L_sie.

    The inputs are the model's outputs (see docs/architecture.md). ``config`` holds the options
    (:class:`LossConfig`); keyword ``options`` override its fields (``mlip_loss(..., lambda_sie=0.0)``).
    ``integrity_weights`` [B] weight the global rows (``weight_global``) and optionally the local rows
    (``weight_local``). A term whose lambda is 0 is not computed. The local inputs are checked once for both
    local terms.

    Returns:
        (total, terms) where terms has detached "loss_global", "loss_local", "loss_sie" and "loss".
    """
    cfg = replace(config or LossConfig(), **options).checked()
    lambda_local, lambda_sie = cfg.lambda_local, cfg.lambda_sie
    weight_global, weight_local = cfg.weight_global, cfg.weight_local
    weights = integrity_weights
    dist_kw = dict(local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, group=group)
    loss_g = global_contrastive_loss(
        image_global, text_global, logit_scale_global, weights if weight_global else None, **dist_kw
    )
    zero = loss_g.new_zeros(())
    loss_l = loss_s = zero
    if lambda_sie and integrity_logits is None:
        raise ValueError("lambda_sie > 0 needs integrity_logits [B, K] (or set lambda_sie=0)")
    if lambda_local or lambda_sie:
        sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    if lambda_local:
        scale = _check_scale("logit_scale_local", logit_scale_local)
        loss_l = _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale,
                                      weights if weight_local else None, cfg.scores_options(), impl=cfg.impl,
                                      **dist_kw)
    if lambda_sie:
        _check_integrity_inputs(integrity_logits, patches, cfg.sie_temperature)
        loss_s = _semantic_integrity_loss(integrity_logits, patches, sentences, sentence_mask, patch_mask,
                                          cfg.sie_temperature)
    total = loss_g + lambda_local * loss_l + lambda_sie * loss_s
    terms = {
        "loss_global": loss_g.detach(),
        "loss_local": loss_l.detach(),
        "loss_sie": loss_s.detach(),
        "loss": total.detach(),
    }
    return total, terms
