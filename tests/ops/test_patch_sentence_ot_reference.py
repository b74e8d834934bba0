"""The optimal-transport reference (``mlip_fast.reference.patch_sentence_ot``) against POT and against calculus, in
float64.

- Plans, potentials and scores against POT's log-domain Sinkhorn run pair by pair (``ot.sinkhorn`` /
  ``ot.sinkhorn2`` with ``method="sinkhorn_log"``, the same iteration order and count, no early stop) on random
  ragged sets: agreement to 1e-12 (both are the same fp64 recursion).
- eps -> 0: the score approaches 1 - the exact OT cost (``ot.emd2``) from below, within eps * log(n m) (the
  entropic bias bound of a converged plan).
- Envelope gradient: equal to finite differences of the fixed-plan objective sum_bg w_bg sum_pq P*_pq sim_pq, and
  to the unrolled gradient of 1 - W_eps = s + eps H(P) at convergence (the envelope theorem the docstring states).
- Unrolled gradient: ``torch.autograd.gradcheck``.
- Tolerance: a pair stops at the first iteration whose sentence-marginal L1 violation is <= tol.
"""
import math

import numpy as np
import ot
import pytest
import torch

from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores, transport_plan
from mlip_fast.testing.patch_sentence_ot import live_pairs, make_case

F64 = torch.float64


def _pot_pair(sim, eps, n_iter):
    """POT's plan, score (1 - transport cost) and log scalings for one pair's valid block."""
    n, m = sim.shape
    a, b, cost = np.full(n, 1.0 / n), np.full(m, 1.0 / m), 1.0 - sim
    kw = dict(method="sinkhorn_log", numItermax=n_iter, stopThr=0.0, warn=False)
    plan, log = ot.sinkhorn(a, b, cost, eps, log=True, **kw)
    value = ot.sinkhorn2(a, b, cost, eps, **kw)
    return plan, 1.0 - float(value), log["log_u"], log["log_v"]


@pytest.mark.parametrize("B,G,K,S,D,eps,n_iter", [
    (3, 4, 7, 5, 16, 0.05, 20),  # ragged, a fully padded report and image
    (2, 3, 9, 3, 8, 0.5, 7),  # large eps, few iterations
    (3, 3, 1, 4, 6, 0.05, 10),  # K = 1
    (3, 3, 6, 1, 6, 0.02, 30),  # S = 1
])
def test_plans_scores_and_potentials_match_pot(B, G, K, S, D, eps, n_iter):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=K * 10 + S, dtype=F64)
    plan, sim, f, g = transport_plan(p, s, smask, pmask, eps, n_iter)
    scores = patch_sentence_ot_scores(p, s, smask, pmask, eps, n_iter)
    pairs = live_pairs(B, G, smask, pmask)
    assert pairs.any() and not pairs.all()
    for b in range(B):
        for j in range(G):
            if not pairs[b, j]:
                assert scores[b, j] == 0 and (plan[b, j] == 0).all()
                assert torch.isneginf(f[b, j]).all() and torch.isneginf(g[b, j]).all()
                continue
            vp, vq = pmask[b].nonzero().flatten(), smask[j].nonzero().flatten()
            ref_plan, ref_score, log_u, log_v = _pot_pair(sim[b, j][vp][:, vq].numpy(), eps, n_iter)
            np.testing.assert_allclose(plan[b, j][vp][:, vq].numpy(), ref_plan, rtol=1e-10, atol=1e-14)
            assert abs(scores[b, j].item() - ref_score) < 1e-12
            # POT's plan is exp((sim - 1) / eps + log_u + log_v): f = log_u, and g = log_v - 1 / eps
            np.testing.assert_allclose(f[b, j][vp].numpy(), log_u, rtol=1e-12, atol=1e-10)
            np.testing.assert_allclose(g[b, j][vq].numpy(), log_v - 1.0 / eps, rtol=1e-12, atol=1e-10)
            padded = torch.ones(K, S, dtype=torch.bool)
            padded[vp[:, None], vq[None, :]] = False
            assert (plan[b, j][padded] == 0).all()  # padding carries no mass


def test_eps_to_zero_approaches_exact_ot():
    B, G, K, S, D = 2, 2, 5, 4, 6
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=False, seed=3, dtype=F64)
    sim = torch.einsum("bkd,gsd->bgks", p, s)
    exact = torch.tensor([[1.0 - ot.emd2(np.full(K, 1 / K), np.full(S, 1 / S), (1 - sim[b, j]).numpy())
                           for j in range(G)] for b in range(B)], dtype=F64)
    gaps = []
    for eps in (0.1, 0.02, 0.004):
        scores = patch_sentence_ot_scores(p, s, eps=eps, n_iter=200_000, tol=1e-13)
        gap = exact - scores  # the entropic plan pays at most eps * log(K * S) more transport cost
        assert (gap > -1e-9).all() and (gap < eps * math.log(K * S) + 1e-9).all(), (eps, gap)
        gaps.append(gap.abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01


def test_envelope_gradient_is_the_fixed_plan_gradient():
    """Central finite differences of F(p, s) = sum_bg w_bg sum_pq P*_pq <p_bp, s_gq> with P* held fixed (F is
    linear in each input, so the differences are exact up to rounding) against the op's gradient."""
    B, G, K, S, D = 3, 4, 5, 3, 7
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=8, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(B, G, generator=gen, dtype=F64)
    plan = transport_plan(p, s, smask, pmask, 0.05, 30)[0]

    def fixed_plan_objective(p_, s_):
        return (w * (plan * torch.einsum("bkd,gsd->bgks", p_, s_)).sum((-2, -1))).sum()

    pg, sg = p.clone().requires_grad_(), s.clone().requires_grad_()
    dp, ds = torch.autograd.grad((w * patch_sentence_ot_scores(pg, sg, smask, pmask, 0.05, 30)).sum(), (pg, sg))
    h = 1e-4
    for _ in range(3):
        vp, vs = torch.randn(p.shape, generator=gen, dtype=F64), torch.randn(s.shape, generator=gen, dtype=F64)
        fd_p = (fixed_plan_objective(p + h * vp, s) - fixed_plan_objective(p - h * vp, s)) / (2 * h)
        fd_s = (fixed_plan_objective(p, s + h * vs) - fixed_plan_objective(p, s - h * vs)) / (2 * h)
        assert abs(fd_p - (dp * vp).sum()) < 1e-9 * max(1.0, abs(fd_p.item()))
        assert abs(fd_s - (ds * vs).sum()) < 1e-9 * max(1.0, abs(fd_s.item()))
    assert (ds[1] == 0).all() and (dp[1] == 0).all()  # the fully padded report and image get no gradient


def test_envelope_gradient_is_the_gradient_of_the_entropic_value_at_convergence():
    """d(1 - W_eps)/dsim = P* (envelope theorem): the unrolled gradient of s + eps H(P) at a converged plan
    equals the default gradient of s."""
    B, G, K, S, D = 2, 3, 4, 3, 5
    eps, n_iter = 0.3, 150
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=2, dtype=F64)
    w = torch.randn(B, G, generator=torch.Generator().manual_seed(4), dtype=F64)
    pe, se = p.clone().requires_grad_(), s.clone().requires_grad_()
    envelope = torch.autograd.grad((w * patch_sentence_ot_scores(pe, se, smask, pmask, eps, n_iter)).sum(), (pe, se))
    pu, su = p.clone().requires_grad_(), s.clone().requires_grad_()
    plan, sim, _, _ = transport_plan(pu, su, smask, pmask, eps, n_iter)
    entropy = -(plan * torch.log(torch.where(plan > 0, plan, torch.ones_like(plan)))).sum((-2, -1))
    value = (plan * sim).sum((-2, -1)) + eps * entropy
    unrolled = torch.autograd.grad((w * value).sum(), (pu, su))
    for a, b in zip(envelope, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_unrolled_gradient_passes_gradcheck():
    B, G, K, S, D = 2, 3, 3, 2, 4
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=5, dtype=F64)
    smask[0, 1] = False  # a ragged report among full ones

    def fn(p_, s_):
        return patch_sentence_ot_scores(p_, s_, smask, pmask, 0.1, 12, gradient="unrolled")

    assert torch.autograd.gradcheck(fn, (p.requires_grad_(), s.requires_grad_()), eps=1e-6, atol=1e-7)


def test_unrolled_and_envelope_differ_off_convergence():
    """The two gradients are different things (the unrolled one sees the entropy term and the iterations)."""
    p, s, smask, pmask = make_case(2, 2, 4, 3, 5, masked=False, seed=6, dtype=F64)
    grads = []
    for gradient in ("envelope", "unrolled"):
        pg = p.clone().requires_grad_()
        scores = patch_sentence_ot_scores(pg, s, eps=0.3, n_iter=5, gradient=gradient)
        grads.append(torch.autograd.grad(scores.sum(), pg)[0])
    assert (grads[0] - grads[1]).abs().max() > 1e-4


def _sentence_marginal_violation(plan, smask):
    b = smask.double() / smask.sum(1, keepdim=True).clamp(min=1)
    return (plan.sum(-2) - b[None]).abs().sum(-1)  # [B, G]


def test_tolerance_stops_each_pair_at_its_first_converged_iteration():
    B, G, K, S, D, eps, n_iter, tol = 3, 4, 6, 4, 8, 0.05, 60, 1e-4
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=9, dtype=F64)
    stopped = patch_sentence_ot_scores(p, s, smask, pmask, eps, n_iter, tol=tol)
    runs = [patch_sentence_ot_scores(p, s, smask, pmask, eps, n) for n in range(1, n_iter + 1)]
    errs = [_sentence_marginal_violation(transport_plan(p, s, smask, pmask, eps, n)[0], smask)
            for n in range(1, n_iter + 1)]
    pairs = live_pairs(B, G, smask, pmask)
    for b in range(B):
        for j in range(G):
            if not pairs[b, j]:
                assert stopped[b, j] == 0
                continue
            # the first n whose plan is within tol; the check runs before iteration n + 1
            n_stop = next((n for n in range(1, n_iter) if errs[n - 1][b, j] <= tol), n_iter)
            assert n_stop < n_iter, "case must converge within n_iter"
            assert stopped[b, j] == runs[n_stop - 1][b, j]
    # tol = 0 never stops early; a violation of at most 2 (L1 of two distributions) stops at the first check
    torch.testing.assert_close(patch_sentence_ot_scores(p, s, smask, pmask, eps, 20, tol=0.0), runs[19], rtol=0, atol=0)
    torch.testing.assert_close(patch_sentence_ot_scores(p, s, smask, pmask, eps, 20, tol=2.0), runs[0], rtol=0, atol=0)


def test_output_dtypes_and_gradient_option():
    p, s, _, _ = make_case(2, 3, 4, 2, 8, masked=False, seed=1, dtype=torch.bfloat16)
    assert patch_sentence_ot_scores(p, s).dtype == torch.float32
    assert patch_sentence_ot_scores(p.double(), s.double()).dtype == F64
    with pytest.raises(ValueError, match="gradient must be one of"):
        patch_sentence_ot_scores(p, s, gradient="implicit")
