"""MLIP's patch-sentence local loss: token-wise max aggregation in both directions (the method as specified) or
entropic optimal transport (``local_matching="ot"``), one scores call per loss either way."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral, Real
from typing import Optional

import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS, INIT_LOGIT_SCALE, LOCAL_MATCHINGS
from mlip_fast.distributed import all_to_all_blocks, gather, max_size, rank_and_world
from mlip_fast.functional._common import _check_batch, _check_scale, _labels, _row_weights, _symmetric_ce
from mlip_fast.ops import patch_sentence_ot as _ot
from mlip_fast.ops.patch_sentence import ScoresOptions, check_inputs, scores_unchecked, unit_rows


@dataclass(frozen=True)
class LocalMatching:
    """How the local loss turns a pair's patch-sentence similarities into its scores.

    mode: ``"max"``: S_I2T = mean_p max_q sim and S_T2I = mean_q max_p sim (FILIP style, the method as specified;
        the default); ``"ot"``: one score s = sum_pq P*_pq sim_pq from the entropic optimal-transport plan P*
        (:func:`mlip_fast.ops.patch_sentence_ot_scores`), used for both directions.
    ot_eps, ot_iters: the OT regularisation (> 0) and Sinkhorn iterations (>= 1); read in mode "ot" only.
    """

    mode: str = "max"
    ot_eps: float = DEFAULT_OT_EPS
    ot_iters: int = DEFAULT_OT_ITERS

    def checked(self) -> "LocalMatching":
        if self.mode not in LOCAL_MATCHINGS:
            raise ValueError(f"local_matching must be one of {LOCAL_MATCHINGS}, got {self.mode!r}")
        eps = self.ot_eps
        if isinstance(eps, bool) or not isinstance(eps, Real) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"ot_eps must be a finite number > 0, got {eps!r}")
        if isinstance(self.ot_iters, bool) or not isinstance(self.ot_iters, Integral) or self.ot_iters < 1:
            raise ValueError(f"ot_iters must be an integer >= 1, got {self.ot_iters!r}")
        return self


def _pair_scores(patches, sentences, sentence_mask, patch_mask, options: ScoresOptions, matching: LocalMatching,
                 impl: str):
    """(i2t, t2i) [B, G] of one scores call: the max op's directions asked for in ``options``, or the OT op's one
    matrix serving both (normalising its raw inputs itself)."""
    if matching.mode == "ot":
        s = _ot.scores_unchecked(patches, sentences, sentence_mask, patch_mask, eps=matching.ot_eps,
                                 n_iter=matching.ot_iters, normalize=True, impl=impl)
        return s, s
    return scores_unchecked(patches, sentences, sentence_mask, patch_mask, options, impl=impl)


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
    local_matching: str = "max",
    ot_eps: float = DEFAULT_OT_EPS,
    ot_iters: int = DEFAULT_OT_ITERS,
) -> torch.Tensor:
    """MLIP's patch-sentence local loss: token-wise max aggregation in both directions, or optimal transport.

    Args:
        patches: [B, K, D] kept patch vectors of each image; sentences: [B, S, D] sentence vectors of each
            image's report (padded; S may differ between ranks); sentence_mask: [B, S] bool (True = valid,
            every report needs one); patch_mask: [B, K] bool or None.
        logit_scale: scalar multiplier (1 / tau_l). weights: optional [B] row weights as in
            :func:`global_contrastive_loss`.
        impl: implementation of the scores op ("auto", "reference", "chunked", "triton").
        precision: "ieee" or "tf32" for fp32 embeddings on a GPU (see :func:`mlip_fast.ops.patch_sentence_scores`).
        local_matching, ot_eps, ot_iters: ``"max"`` (the default, the formula below) or ``"ot"``: the scores op is
            :func:`mlip_fast.ops.patch_sentence_ot_scores` (regularisation ``ot_eps``, ``ot_iters`` Sinkhorn
            iterations, plan constant in the gradient) and its one [B, G] matrix s serves both cross-entropies,
            S_I2T = S_T2I = s (``deterministic`` and ``precision`` do not apply: its backward has no atomics and
            its fp32 products are IEEE).

    Precision: the embeddings go to the scores op in their own dtype, normalised inside the op (fp32 norms, no
    normalised copies held): a bf16 / fp16 model hands it half-precision tensors, which it scores on the tensor
    cores with fp32 accumulation; the scores, logits and cross-entropies are fp32. With ``"ot"`` the OT op
    normalises the same way (its ``normalize``: padded rows zeroed, norms in fp32; the chunked impl holds no
    normalised copy of the patches, the Triton path normalises first).

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
    against the gathered images (a second call). With ``"ot"`` the same calls and exchange carry the OT matrix
    s in place of both directions.
    """
    matching = LocalMatching(local_matching, ot_eps, ot_iters).checked()
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    scale = _check_scale("logit_scale", logit_scale)
    options = ScoresOptions(normalize=True, precision=precision, deterministic=bool(deterministic)).checked()
    return _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale, weights, options, matching,
                                local_loss=local_loss, gather_with_grad=gather_with_grad, impl=impl, group=group)


def _patch_sentence_loss(patches, sentences, sentence_mask, patch_mask, scale, weights, options: ScoresOptions,
                         matching: LocalMatching, *, local_loss, gather_with_grad, impl, group) -> torch.Tensor:
    """:func:`patch_sentence_loss` on checked inputs (bool masks, a checked scale, checked matching)."""
    rank, world = rank_and_world(group)
    B = patches.shape[0]
    both, i2t_only, t2i_only = (options, replace(options, directions="i2t"), replace(options, directions="t2i"))

    def scores(p, s, smask, pmask, opts):
        return _pair_scores(p, s, smask, pmask, opts, matching, impl)

    if world == 1:
        i2t, t2i = scores(patches, sentences, sentence_mask, patch_mask, both)
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
        i2t, t2i = scores(patches, sentences_all, smask_all, patch_mask, both)
        logits_i = i2t  # [B, G]: local images vs all reports
        logits_t = all_to_all_blocks(t2i, group).T  # [B, G]: local reports vs all images
        labels = _labels(B, rank * B, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
    elif local_loss:
        patches_all = gather(patches, with_grad=False, group=group)
        pmask_all = gather(patch_mask, with_grad=False, group=group)
        logits_i, _ = scores(patches, sentences_all, smask_all, patch_mask, i2t_only)
        local_s = sentences_all[rank * B : (rank + 1) * B]
        local_m = smask_all[rank * B : (rank + 1) * B]
        _, t2i = scores(patches_all, local_s, local_m, pmask_all, t2i_only)
        logits_t = t2i.T
        labels = _labels(B, rank * B, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=False)
    else:
        patches_all = gather(patches, with_grad=gather_with_grad, group=group)
        pmask_all = gather(patch_mask, with_grad=False, group=group)
        i2t, t2i = scores(patches_all, sentences_all, smask_all, pmask_all, both)
        logits_i, logits_t = i2t, t2i.T
        labels = _labels(patches_all.shape[0], 0, patches.device)
        w = _row_weights(weights, B, patches.device, group, gathered=True)
    return _symmetric_ce(logits_i, logits_t, scale, labels, w)


def within_report_loss(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    logit_scale=INIT_LOGIT_SCALE,
) -> torch.Tensor:
    """Sentences told apart by their patches, within each image-report pair (an addition to the method, off by
    default: ``lambda_within`` of :func:`mlip_fast.functional.mlip_loss`).

    The cross-pair local loss is satisfied when every sentence of a report matches the same patch of its image,
    one that carries the whole image's information: nothing in it ties a sentence to a place. Here, for each
    image b and valid sentence q, the patch the max matching picks, p*(b, q) = argmax_p <v_bp, u_bq> (unit
    vectors, valid patches, lowest index on ties), must be nearer to u_bq than to the report's other sentences:

        L = mean over (b, q) in reports with >= 2 valid sentences of CE_q'( s <v_{b p*(b,q)}, u_bq'> , target q)

    over the valid q' of report b. A patch shared by two sentences gives both the same logits, so no two of them
    can both be right: the term pushes different sentences of a report onto different patches, and the one that
    fits each better wins. Gradients reach the chosen patches and every sentence (the choice itself is hard, as
    in the max aggregation). Pairs only: no gather under torch.distributed, each rank's mean over its own rows.

    Args: as :func:`patch_sentence_loss` (``patches`` [B, K, D], ``sentences`` [B, S, D], masks [B, K] / [B, S]
    bool or None, ``logit_scale`` the multiplicative scale). Returns a 0-dim float32 loss (0 when no report of the
    batch has two valid sentences).
    """
    sentence_mask, patch_mask = _check_local_inputs(patches, sentences, sentence_mask, patch_mask)
    scale = _check_scale("logit_scale", logit_scale)
    return _within_report_loss(patches, sentences, sentence_mask, patch_mask, scale)


def _within_report_loss(patches, sentences, sentence_mask, patch_mask, scale) -> torch.Tensor:
    """:func:`within_report_loss` on checked inputs."""
    B, K, D = patches.shape
    S = sentences.shape[1]
    work = torch.promote_types(patches.dtype, torch.float32)
    v = unit_rows(patches, patch_mask).to(work)  # [B, K, D]
    u = unit_rows(sentences, sentence_mask).to(work)  # [B, S, D]
    smask = sentence_mask if sentence_mask is not None else torch.ones(B, S, dtype=torch.bool, device=u.device)
    with torch.no_grad():  # the choice of patch: hard, as in the max aggregation
        sim = u @ v.transpose(1, 2)  # [B, S, K]
        if patch_mask is not None:
            sim = sim.masked_fill(~patch_mask[:, None, :], float("-inf"))
        choice = sim.argmax(dim=2)  # [B, S], the first maximum
    picked = v.gather(1, choice[..., None].expand(B, S, D))  # [B, S, D]
    logits = scale.to(work) * (picked @ u.transpose(1, 2))  # [B, S, S']: row q = sentence q's patch vs every q'
    rows = smask & (smask.sum(1, keepdim=True) >= 2)  # [B, S]: the sentences that count
    # padded columns never win; padded rows are zeroed (finite) and weighted 0
    logits = logits.masked_fill(~smask[:, None, :], float("-inf")).masked_fill(~rows[..., None], 0.0)
    target = torch.arange(S, device=logits.device).expand(B, S)
    ce = F.cross_entropy(logits.reshape(B * S, S), target.reshape(-1), reduction="none").view(B, S)
    n = rows.sum()
    return torch.where(rows, ce, torch.zeros((), dtype=ce.dtype, device=ce.device)).sum() / n.clamp(min=1).to(ce.dtype)
