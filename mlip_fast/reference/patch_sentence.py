"""Reference patch-sentence scores: materialise the [B, G, K, S] similarity grid, then masked max / mean.

This is the specification of the op (and its CPU fallback, test and benchmark baseline). It needs
B*G*K*S elements of memory; the fused impls in ``mlip_fast.ops`` compute the same numbers without it.

Masking is exact: a padded sentence or patch never wins a max and never enters a mean, whatever it holds
(NaN and Inf included), while NaN / Inf in a valid entry propagate as the plain max / mean would propagate
them (a NaN similarity makes its max NaN). Every impl of the op follows these semantics.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# F.normalize's default: a vector shorter than this is divided by it instead of by its norm.
NORM_EPS = 1e-12
UNNORMALIZE_ROWS = 1024  # row block of unnormalize_grad_ (bounds its temporaries)
UNIT_ROWS_BLOCK = 256  # row block of unit_rows_backward_ (its temporaries: a few [UNIT_ROWS_BLOCK, D])


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores come out in float32 for half inputs and in the input dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, NORM_EPS) along the last dim, the norm taken in float32 (float64 stays), the result in x's
    dtype: what a half-precision run hands the scores GEMM."""
    wide = x.to(score_dtype(x.dtype))
    return (wide / torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(NORM_EPS)).to(x.dtype)


def unit_rows(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    """x / max(||x||, NORM_EPS) along the last dim with the rows of invalid entries zeroed first (their gradient is
    then exactly 0, whatever they hold), through autograd: :func:`l2_normalize` of the zero-filled rows.
    x [..., D], valid [...] bool or None (all valid)."""
    return l2_normalize(x if valid is None else x.masked_fill(~valid[..., None], 0))


def row_norms(x: torch.Tensor, valid: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """||x|| of each row of x [..., D] in dtype ``work`` (the score dtype), 0 for invalid rows (valid [...] bool):
    the norms of the rows :func:`unit_rows` divides."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=work).masked_fill_(~valid, 0)


def unit_rows_from_norms(x: torch.Tensor, valid: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """:func:`unit_rows` from the rows' norms (:func:`row_norms`), outside autograd: invalid rows zeroed, then
    x / max(norm, NORM_EPS) in the norms' dtype, in x's dtype. The same elementary operations, so the same numbers:
    an op can normalise a block at a time and score exactly what a caller normalising first would."""
    return (x.masked_fill(~valid[..., None], 0).to(norm.dtype) / norm[..., None].clamp_min(NORM_EPS)).to(x.dtype)


def unit_rows_backward_(grad: torch.Tensor, x: torch.Tensor, valid: torch.Tensor, norm: torch.Tensor) -> None:
    """In place: ``grad`` [N, D] (score dtype), the gradient w.r.t. ``unit_rows(x, valid)``, becomes the one w.r.t.
    x [N, D] (valid [N], norm [N] from :func:`row_norms`).

    With n = ||x||, d = max(n, NORM_EPS) and x^ = x / d: dx = g / d + x / n * sum_D(-g * x^ / d), the second term
    only where n >= NORM_EPS (the clamp) and 0 where n = 0; invalid rows get 0. These are the elementary steps
    autograd takes backwards through :func:`unit_rows` (division, the broadcast's sum, clamp, norm, masked fill),
    in row blocks of UNIT_ROWS_BLOCK: autograd's result bit for bit (tested), with no temporary larger than a
    block."""
    zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
    for r0 in range(0, x.shape[0], UNIT_ROWS_BLOCK):
        rows = slice(r0, r0 + UNIT_ROWS_BLOCK)
        g, v, n = grad[rows], valid[rows, None], norm[rows, None]
        xm = x[rows].masked_fill(~v, 0).to(grad.dtype)
        d = n.clamp_min(NORM_EPS)
        d_denom = (-g * (xm / d / d)).sum(-1, keepdim=True)
        d_norm = torch.where(n >= NORM_EPS, d_denom, zero)
        dx = (g / d).add_(d_norm * (xm / n).masked_fill_(n == 0, 0))
        g.copy_(dx.masked_fill_(~v, 0))


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, NORM_EPS) over the last dim, in the score dtype: [..., D] -> [...]."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=score_dtype(x.dtype)).clamp_min(NORM_EPS).reciprocal()


def unnormalize_grad_(grad: torch.Tensor, x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """In place: ``grad`` ([N, D], the score dtype), the gradient w.r.t. x^ = x * inv, becomes the gradient
    w.r.t. x ([N, D]; inv [N] from :func:`inverse_norms`):
    dx = inv (g - x^ <x^, g>) where ||x|| >= NORM_EPS (the projection of x / ||x||), inv * g below (x / eps)."""
    inv = inv.to(grad.dtype)
    # <x, g> per row, in row blocks: a whole [N, D] product (or a widened copy of a half x) would be a temporary as
    # large as the gradient itself
    dots = torch.empty_like(inv)
    for r0 in range(0, x.shape[0], UNNORMALIZE_ROWS):
        rows = slice(r0, r0 + UNNORMALIZE_ROWS)
        dots[rows] = torch.linalg.vecdot(x[rows].to(grad.dtype), grad[rows])
    coef = torch.where(inv < 1 / NORM_EPS, inv.pow(3) * dots, torch.zeros_like(inv))
    grad.mul_(inv[:, None])
    for r0 in range(0, x.shape[0], UNNORMALIZE_ROWS):
        rows = slice(r0, r0 + UNNORMALIZE_ROWS)
        grad[rows].addcmul_(x[rows].to(grad.dtype), coef[rows, None], value=-1)
    return grad


def _masked_max_mean(sim: torch.Tensor, valid_inner: torch.Tensor, valid_outer: torch.Tensor) -> torch.Tensor:
    """mean over valid outer positions of max over valid inner positions of ``sim[..., outer, inner]``.

    sim [B, G, O, I]; valid_inner / valid_outer broadcastable to [B, G, 1, I] / [B, G, O].
    Rows with no valid inner (or outer) position give 0 and no gradient.
    """
    # max (not amax): a tie passes its gradient to one entry, as in the fused impls, not split among the tied
    best = sim.masked_fill(~valid_inner, float("-inf")).max(dim=-1).values  # [B, G, O]
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
    *,
    normalize: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Token-wise max aggregation in both directions over the full similarity grid.

    Args:
        patches: [B, K, D] patch embeddings.
        sentences: [G, S, D] sentence embeddings.
        sentence_mask: [G, S] bool, True = valid sentence (None: all valid).
        patch_mask: [B, K] bool, True = valid patch (None: all valid).
        directions: "both", "i2t" or "t2i".
        normalize: score the L2-normalised embeddings (:func:`l2_normalize`) instead of the raw ones.

    Returns:
        (i2t [B, G], t2i [B, G]); a direction not asked for is None.
        i2t[b, g] = mean_{valid p} max_{valid q} <patches[b, p], sentences[g, q]>
        t2i[b, g] = mean_{valid q} max_{valid p} <patches[b, p], sentences[g, q]>
    """
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    device = patches.device
    if sentence_mask is None:
        sentence_mask = torch.ones(G, S, dtype=torch.bool, device=device)
    if patch_mask is None:
        patch_mask = torch.ones(B, K, dtype=torch.bool, device=device)
    if normalize:
        patches, sentences = l2_normalize(patches), l2_normalize(sentences)
    # The grid is computed in the input dtype (as a plain matmul would), then widened for the reductions.
    sim = torch.einsum("bkd,gsd->bgks", patches, sentences).to(score_dtype(patches.dtype))  # [B, G, K, S]
    i2t = t2i = None
    if directions in ("both", "i2t"):
        i2t = _masked_max_mean(sim, sentence_mask[None, :, None, :], patch_mask[:, None, :].expand(B, G, K))
    if directions in ("both", "t2i"):
        t2i = _masked_max_mean(
            sim.transpose(-1, -2), patch_mask[:, None, None, :], sentence_mask[None, :, :].expand(B, G, S)
        )
    return i2t, t2i
