"""Reference patch-sentence scores: materialise the [B, G, K, S] similarity grid, then masked max / mean.

This is the specification of the op (and its CPU fallback, test and benchmark baseline). It needs
B*G*K*S elements of memory; the fused impls in ``mlip_fast.ops`` compute the same numbers without it.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores come out in float32 for half inputs and in the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _masked_max_mean(sim: torch.Tensor, valid_inner: torch.Tensor, valid_outer: torch.Tensor) -> torch.Tensor:
    """mean over valid outer positions of max over valid inner positions of ``sim[..., outer, inner]``.

    sim [B, G, O, I]; valid_inner / valid_outer broadcastable to [B, G, 1, I] / [B, G, O].
    Rows with no valid inner (or outer) position give 0 and no gradient.
    """
    neg_inf = torch.finfo(sim.dtype).min
    best = sim.masked_fill(~valid_inner, neg_inf).max(dim=-1).values  # [B, G, O]
    keep = valid_outer & valid_inner.any(dim=-1)  # an empty inner set contributes nothing
    best = torch.where(keep, best, torch.zeros((), dtype=best.dtype, device=best.device))
    count = keep.sum(dim=-1).clamp(min=1).to(best.dtype)
    return best.sum(dim=-1) / count


def patch_sentence_scores(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    directions: str = "both",
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Token-wise max aggregation in both directions over the full similarity grid.

    Args:
        patches: [B, K, D] patch embeddings.
        sentences: [G, S, D] sentence embeddings.
        sentence_mask: [G, S] bool, True = valid sentence (None: all valid).
        patch_mask: [B, K] bool, True = valid patch (None: all valid).
        directions: "both", "i2t" or "t2i".
        deterministic: accepted for interface parity (autograd here is deterministic on CPU).

    Returns:
        (i2t [B, G], t2i [B, G]); a direction not asked for is None.
        i2t[b, g] = mean_{valid p} max_{valid q} <patches[b, p], sentences[g, q]>
        t2i[b, g] = mean_{valid q} max_{valid p} <patches[b, p], sentences[g, q]>
    """
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    out_dtype = score_dtype(patches.dtype)
    device = patches.device
    if sentence_mask is None:
        sentence_mask = torch.ones(G, S, dtype=torch.bool, device=device)
    if patch_mask is None:
        patch_mask = torch.ones(B, K, dtype=torch.bool, device=device)
    # The grid is computed in the input dtype (as a plain matmul would), then widened for the reductions.
    sim = torch.einsum("bkd,gsd->bgks", patches, sentences).to(out_dtype)  # [B, G, K, S]
    smask = sentence_mask[None, :, None, :]  # [1, G, 1, S]
    pmask = patch_mask[:, None, :]  # [B, 1, K]
    i2t = t2i = None
    if directions in ("both", "i2t"):
        i2t = _masked_max_mean(sim, smask, pmask.expand(B, G, K))
    if directions in ("both", "t2i"):
        t2i = _masked_max_mean(
            sim.transpose(-1, -2), patch_mask[:, None, None, :], sentence_mask[None, :, :].expand(B, G, S)
        )
    return i2t, t2i
