"""Reference optimal-transport patch-sentence scores: the [B, G, K, S] similarity grid, then a batched
log-domain Sinkhorn on every (image, report) pair at once.

This is the specification of ``mlip_fast.ops.patch_sentence_ot_scores`` (and its CPU fallback, test and
benchmark baseline). It needs several B*G*K*S grids of memory; the chunked and Triton impls compute the same
numbers one tile at a time.

The formulation, for image i (patches v_ip, valid p in P_i, n = |P_i|) and report j (sentences u_jq, valid q
in Q_j, m = |Q_j|):

- similarity sim_pq = <v_ip, u_jq>; cost C_pq = 1 - sim_pq, over valid patches x valid sentences only;
- uniform marginals a_p = 1/n over the valid patches and b_q = 1/m over the valid sentences (padding carries
  no mass and receives none);
- entropic OT: P* = argmin_{P 1 = a, P^T 1 = b} <P, C> - eps H(P), H(P) = -sum P (log P - 1), solved by
  ``n_iter`` log-domain Sinkhorn iterations. In the log scalings f [K], g [S] (natural log) the plan is

      P_pq = exp(f_p + g_q + sim_pq / eps)

  (the constant 1 of the cost is absorbed by g); one iteration is a sentence update then a patch update,
  starting from f = 0 (POT's ``sinkhorn_log`` order, so its plans are reproduced iteration for iteration):

      g_q <- log b_q - logsumexp_p(f_p + sim_pq / eps)
      f_p <- log a_p - logsumexp_q(g_q + sim_pq / eps)

  After an iteration the patch marginal is exact and the sentence marginal approximate. The log domain
  stays finite for any eps (no exp(-C / eps) kernel that could underflow);
- optional tolerance ``tol``: a pair stops (keeps its f, g) at the first iteration where the L1 violation of
  its sentence marginal, sum_q |sum_p P_pq - b_q|, is at most ``tol``. That violation is read off the next
  sentence update (sum_p P_pq = b_q exp(g_q - g_q^new)), so the check costs no extra pass. ``None``: exactly
  ``n_iter`` iterations;
- score s_ij = sum_pq P*_pq sim_pq, one [B, G] matrix for both directions of the symmetric cross-entropy. A
  pair with no valid patch or no valid sentence scores 0 and gets no gradient.

Gradient. ``gradient="envelope"`` (the default, and what every fused impl computes) treats the plan as a
constant: ds_ij / dsim_pq = P*_pq. At the optimum this is the exact gradient of 1 - W_eps (W_eps = <P*, C> -
eps H(P*), by the envelope theorem); it differs from the exact gradient of s by the gradient of the entropy
term eps H(P*), which vanishes as eps -> 0, and by the distance of ``n_iter`` iterations from the optimum.
``gradient="unrolled"`` differentiates through the iterations instead (autograd through every logsumexp:
exact for the computed s, n_iter times the memory); it exists in this reference path only.

Defaults eps = 0.05, n_iter = 50 (``mlip_fast.constants``) were chosen by a sweep on the synthetic benchmark's
validation split (docs/training.md, benchmarks/results/ot_sweep_cpu.json).

Padding never matters: padded patch and sentence rows are zeroed before the grid is computed, so whatever they
hold (NaN / Inf included) the plan there is exactly 0 and their gradient exactly 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.reference.patch_sentence import score_dtype, unit_rows

GRADIENTS = ("envelope", "unrolled")

# Log-domain stand-in for -inf on padded entries and empty pairs: finite, so that no logsumexp or autograd
# step meets inf - inf (the unrolled gradient would turn it into NaN), and so negative that exp() of it, or
# of a sum of three of it, is exactly 0 in fp32 and fp64.
DEAD = -1e30


def live_masks(
    patch_mask: torch.Tensor, sentence_mask: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which potentials take part: (live_p [B, G, K], live_q [B, G, S]), bool.

    A patch is live for pair (b, g) when it is valid and report g has a valid sentence, and the other way
    round, so a pair with an empty side has no live entry at all.
    """
    live_p = patch_mask[:, None, :] & sentence_mask.any(1)[None, :, None]
    live_q = sentence_mask[None, :, :] & patch_mask.any(1)[:, None, None]
    return live_p, live_q


def log_marginals(live: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """log of the uniform marginal over the live entries of the last dim (DEAD where not live)."""
    count = live.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    return torch.where(live, -torch.log(count), torch.full((), DEAD, dtype=dtype, device=live.device))


def sinkhorn_potentials(
    sim: torch.Tensor,
    live_p: torch.Tensor,
    live_q: torch.Tensor,
    eps: float,
    n_iter: int,
    tol: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batched log-domain Sinkhorn.

    Args:
        sim: [..., K, S] similarities (fp32 or fp64; the iterations run in this dtype).
        live_p: [..., K] bool, live_q: [..., S] bool (see :func:`live_masks`).
        eps, n_iter, tol: as in the module docstring.

    Returns:
        (f [..., K], g [..., S]) such that the plan is exp(f_p + g_q + sim_pq / eps); entries that are not live
        hold DEAD (their plan entries are exactly 0). Differentiable (autograd runs through the iterations).
    """
    dead = torch.full((), DEAD, dtype=sim.dtype, device=sim.device)
    z = torch.where(live_p[..., :, None] & live_q[..., None, :], sim / eps, dead)
    log_a, log_b = log_marginals(live_p, sim.dtype), log_marginals(live_q, sim.dtype)
    f = torch.where(live_p, torch.zeros((), dtype=sim.dtype, device=sim.device), dead)
    g = log_b
    active = None if tol is None else torch.ones(live_p.shape[:-1], dtype=torch.bool, device=sim.device)
    for it in range(n_iter):
        g_new = torch.where(live_q, log_b - torch.logsumexp(f[..., :, None] + z, dim=-2), dead)
        if active is not None and it > 0:
            # L1 violation of the sentence marginal by the current plan: sum_q b_q |exp(g_q - g_q^new) - 1|
            err = (log_b.exp() * torch.expm1(g - g_new).abs()).sum(-1)
            active = active & (err > tol)
            if not bool(active.any()):
                break
            g_new = torch.where(active[..., None], g_new, g)
        g = g_new
        f_new = torch.where(live_p, log_a - torch.logsumexp(g[..., None, :] + z, dim=-1), dead)
        f = f_new if active is None else torch.where(active[..., None], f_new, f)
    return f, g


def transport_plan(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The plans and potentials behind :func:`patch_sentence_ot_scores` (for tests, maps and inspection).

    Args:
        patches [B, K, D], sentences [G, S, D], masks [G, S] / [B, K] bool (True = valid, None = all valid).

    Returns:
        (plan [B, G, K, S], sim [B, G, K, S], f [B, G, K], g [B, G, S]) in ``score_dtype``; each live plan sums
        to 1, an empty pair's plan is all 0. Potentials that are not live are -inf.
    """
    sim, live_p, live_q = _grid(patches, sentences, sentence_mask, patch_mask)
    f, g = sinkhorn_potentials(sim, live_p, live_q, eps, n_iter, tol)
    plan = torch.exp(f[..., :, None] + g[..., None, :] + sim / eps)
    neg_inf = torch.full((), float("-inf"), dtype=f.dtype, device=f.device)
    return plan, sim, torch.where(live_p, f, neg_inf), torch.where(live_q, g, neg_inf)


def paired_transport_plan(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
) -> torch.Tensor:
    """The plan of each image with its own report only: row n of ``patches`` against row n of ``sentences``
    (the diagonal pairs of :func:`transport_plan`, without the other B x G pairs). What a localisation map reads.

    Args:
        patches [N, K, D], sentences [N, S, D], masks [N, S] / [N, K] bool (True = valid, None = all valid).

    Returns:
        plan [N, K, S] in ``score_dtype``: each live plan sums to 1 with column q summing to 1 / (valid sentences of
        report n); padding and empty pairs hold 0.
    """
    sim, live_p, live_q = _grid(patches, sentences, sentence_mask, patch_mask, paired=True)
    f, g = sinkhorn_potentials(sim, live_p, live_q, eps, n_iter, tol)
    return torch.exp(f[..., :, None] + g[..., None, :] + sim / eps)


def _grid(patches, sentences, sentence_mask, patch_mask, paired: bool = False):
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    device = patches.device
    if sentence_mask is None:
        sentence_mask = torch.ones(G, S, dtype=torch.bool, device=device)
    if patch_mask is None:
        patch_mask = torch.ones(B, K, dtype=torch.bool, device=device)
    # Padded rows are zeroed first, so whatever they hold (NaN, Inf) the grid is finite there, the plan's exp(-inf)
    # entries are exactly 0 and their gradient is exactly 0. The grid is computed in the input dtype (as a plain
    # matmul would), then widened for the iterations.
    patches = patches.masked_fill(~patch_mask[..., None], 0)
    sentences = sentences.masked_fill(~sentence_mask[..., None], 0)
    if paired:
        sim = torch.einsum("nkd,nsd->nks", patches, sentences).to(score_dtype(patches.dtype))
        return sim, patch_mask & sentence_mask.any(1)[:, None], sentence_mask & patch_mask.any(1)[:, None]
    sim = torch.einsum("bkd,gsd->bgks", patches, sentences).to(score_dtype(patches.dtype))
    live_p, live_q = live_masks(patch_mask, sentence_mask)
    return sim, live_p, live_q


def patch_sentence_ot_scores(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
    gradient: str = "envelope",
    normalize: bool = False,
) -> torch.Tensor:
    """Optimal-transport patch-sentence scores over the full similarity grid.

    Args:
        patches: [B, K, D] patch embeddings, L2-normalised by the caller unless ``normalize``.
        sentences: [G, S, D] sentence embeddings, same dtype and device.
        sentence_mask: [G, S] bool, True = valid sentence (None: all valid).
        patch_mask: [B, K] bool, True = valid patch (None: all valid).
        eps: entropic regularisation (> 0), in units of the cost 1 - sim.
        n_iter: Sinkhorn iterations (>= 1), each a sentence then a patch update.
        tol: optional per-pair stopping tolerance on the L1 sentence-marginal violation (None: n_iter always).
        gradient: "envelope" (plan constant, the default) or "unrolled" (autograd through the iterations).
        normalize: score the unit vectors of the rows instead (:func:`unit_rows`: padded rows zeroed, then
            x / max(||x||, 1e-12), through autograd, so the gradient is the raw rows').

    Returns:
        [B, G] scores s[b, g] = sum_pq P*_pq <patches[b, p], sentences[g, q]>, float32 for half inputs and the
        input dtype otherwise; 0 for a pair with an empty side.
    """
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS}, got {gradient!r}")
    if normalize:
        patches, sentences = unit_rows(patches, patch_mask), unit_rows(sentences, sentence_mask)
    sim, live_p, live_q = _grid(patches, sentences, sentence_mask, patch_mask)
    if gradient == "unrolled":
        f, g = sinkhorn_potentials(sim, live_p, live_q, eps, n_iter, tol)
        plan = torch.exp(f[..., :, None] + g[..., None, :] + sim / eps)
    else:
        with torch.no_grad():
            f, g = sinkhorn_potentials(sim, live_p, live_q, eps, n_iter, tol)
            plan = torch.exp(f[..., :, None] + g[..., None, :] + sim / eps)
    return (plan * sim).sum((-2, -1))
