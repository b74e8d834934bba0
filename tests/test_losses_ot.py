"""The local loss with optimal-transport matching (``local_matching="ot"``) against an fp64 composition written
here (normalise, the reference OT op, the symmetric cross-entropy of one score matrix), values and gradients, for
every impl; padding that holds NaN / Inf never matters (op and loss, value checks off); the switch is refused
with bad settings and leaves the max path unchanged.

Tolerances: fp64 inputs through the reference / chunked impls are the same recursion as the composition (1e-10);
fp32 inputs (every impl, Triton in the interpreter) 2e-5 of the output's scale, as the op's own tests.
"""
import pytest
import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast import functional as MF
from mlip_fast.losses import MLIPLoss, PatchSentenceLoss
from mlip_fast.ops import patch_sentence_ot_scores
from mlip_fast.ops.patch_sentence_ot import paired_transport_plan
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_scores
from mlip_fast.reference.patch_sentence_ot import transport_plan
from mlip_fast.testing.patch_sentence_ot import make_case, rel_err, run

F64 = torch.float64
EPS, ITERS = 0.05, 12  # few iterations: the interpreter runs each in Python


def _batch(B=4, K=6, S=3, D=9, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    smask = torch.rand(B, S, generator=gen) > 0.4
    smask[:, 0] = True
    pmask = torch.rand(B, K, generator=gen) > 0.3
    pmask[:, 1] = True
    return (torch.randn(B, K, D, generator=gen, dtype=dtype), torch.randn(B, S, D, generator=gen, dtype=dtype),
            smask, pmask, torch.rand(B, generator=gen, dtype=dtype) + 0.2)


def composed_loss(p, s, smask, pmask, scale, weights=None, eps=EPS, n_iter=ITERS):
    """The OT local loss in fp64 from its parts: unit vectors, the reference op's [B, B] scores (plan constant in
    the gradient), 1/2 [CE_rows(scale s) + CE_rows(scale s^T)] with mean-1 row weights (fp32, as the loss's)."""
    pu, su = F.normalize(p.double(), dim=-1), F.normalize(s.double(), dim=-1)
    scores = reference_scores(pu, su, smask, pmask, eps, n_iter)
    labels = torch.arange(p.shape[0])
    w = torch.ones(p.shape[0], dtype=F64) if weights is None else (weights.float() / weights.float().mean()).double()
    rows = F.cross_entropy(scale * scores, labels, reduction="none")
    cols = F.cross_entropy(scale * scores.T, labels, reduction="none")
    return 0.5 * ((rows * w).mean() + (cols * w).mean())


def _grads(fn, p, s):
    p, s = p.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    loss = fn(p, s)
    return (loss.detach(), *torch.autograd.grad(loss, (p, s)))


@pytest.mark.parametrize("impl,dtype", [("reference", F64), ("chunked", F64), ("reference", torch.float32),
                                        ("chunked", torch.float32), ("triton", torch.float32)])
@pytest.mark.parametrize("weighted", [False, True])
def test_ot_loss_matches_the_fp64_composition(impl, dtype, weighted):
    p, s, smask, pmask, w = _batch(seed=3 + weighted)
    weights = w if weighted else None
    want = _grads(lambda p_, s_: composed_loss(p_, s_, smask, pmask, 7.0, weights), p, s)
    got = _grads(lambda p_, s_: MF.patch_sentence_loss(p_, s_, smask, pmask, 7.0, weights, impl=impl,
                                                       local_matching="ot", ot_eps=EPS, ot_iters=ITERS),
                 p.to(dtype), s.to(dtype))
    assert got[0].dtype == torch.promote_types(dtype, torch.float32)
    tol = 1e-10 if dtype == F64 else 2e-5
    for x, r in zip(got, want):
        assert rel_err(x, r) < tol
    assert (got[1][~pmask] == 0).all() and (got[2][~smask] == 0).all()  # padding gets no gradient


def test_module_and_mlip_loss_carry_the_switch():
    p, s, smask, pmask, _ = _batch(seed=5)
    module = PatchSentenceLoss(local_matching="ot", ot_eps=EPS, ot_iters=ITERS, impl="chunked")
    want = composed_loss(p, s, smask, pmask, module.logit_scale().detach().double())
    torch.testing.assert_close(module(p, s, smask, pmask).detach(), want, rtol=1e-10, atol=1e-12)
    criterion = MLIPLoss(local_matching="ot", ot_eps=EPS, ot_iters=ITERS, lambda_sie=0.0, weight_global=False)
    assert criterion.patch_sentence_loss.local_matching == "ot" and criterion.config.ot_iters == ITERS
    _, terms = criterion(p.sum(1), s.sum(1), p, s, smask, patch_mask=pmask, logit_scale_local=7.0)
    torch.testing.assert_close(terms["loss_local"], composed_loss(p, s, smask, pmask, 7.0), rtol=1e-10, atol=1e-12)
    # the max path is the default and untouched
    assert PatchSentenceLoss().local_matching == "max" and MF.LossConfig().local_matching == "max"
    torch.testing.assert_close(MF.patch_sentence_loss(p, s, smask, pmask, 7.0, local_matching="max"),
                               MF.patch_sentence_loss(p, s, smask, pmask, 7.0))


@pytest.mark.parametrize("change,message", [
    (dict(local_matching="sinkhorn"), "local_matching must be one of"),
    (dict(local_matching="ot", ot_eps=0.0), "ot_eps must be a finite number > 0"),
    (dict(local_matching="ot", ot_eps=float("nan")), "ot_eps must be a finite number > 0"),
    (dict(local_matching="ot", ot_iters=0), "ot_iters must be an integer >= 1"),
    (dict(local_matching="ot", ot_iters=2.5), "ot_iters must be an integer >= 1"),
])
def test_bad_matching_settings_are_refused_everywhere(change, message):
    p, s, smask, pmask, _ = _batch()
    with pytest.raises(ValueError, match=message):
        MF.patch_sentence_loss(p, s, smask, pmask, **change)
    with pytest.raises(ValueError, match=message):
        PatchSentenceLoss(**change)
    with pytest.raises(ValueError, match=message):
        MLIPLoss(**change)


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the interpreter's padded rows
@pytest.mark.parametrize("impl", ["reference", "chunked", "triton"])
def test_padding_holding_nan_and_inf_never_matters_in_the_op(impl):
    B, G, K, S, D = 3, 5, 7, 3, 33
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=1)
    grad = torch.randn(B, G, generator=torch.Generator().manual_seed(0), dtype=F64)

    def op(p_, s_, sm, pm):
        return patch_sentence_ot_scores(p_, s_, sm, pm, impl=impl, n_iter=ITERS)

    clean = run(op, p, s, smask, pmask, grad)
    dirty_p, dirty_s = p.clone(), s.clone()
    dirty_p[~pmask] = float("nan")
    dirty_s[~smask] = float("inf")
    dirty_s[~smask, 0] = float("-inf")
    with _checks.value_checks_disabled():
        dirty = run(op, dirty_p, dirty_s, smask, pmask, grad)
    for x, c in zip(dirty, clean):
        assert torch.equal(x, c)
    assert (dirty[1][~pmask] == 0).all() and (dirty[2][~smask] == 0).all()


def test_padding_holding_nan_never_matters_in_the_loss():
    p, s, smask, pmask, _ = _batch(seed=7, dtype=torch.float32)
    fn = lambda p_, s_: MF.patch_sentence_loss(p_, s_, smask, pmask, 7.0, impl="chunked",  # noqa: E731
                                               local_matching="ot", ot_iters=ITERS)
    clean = _grads(fn, p, s)
    p[~pmask], s[~smask] = float("nan"), float("nan")
    with _checks.value_checks_disabled():
        dirty = _grads(fn, p, s)
    for x, c in zip(dirty, clean):
        assert torch.equal(x, c)


def test_paired_plan_is_the_diagonal_of_the_full_plan():
    p, s, smask, pmask = make_case(4, 4, 6, 5, 12, masked=True, seed=2, dtype=F64)
    smask[1] = True  # every report non-empty: paired plans are then the live diagonal pairs
    plan, _, _, _ = transport_plan(p, s, smask, pmask, EPS, ITERS)
    paired = paired_transport_plan(p, s, smask, pmask, eps=EPS, n_iter=ITERS)
    torch.testing.assert_close(paired, plan[torch.arange(4), torch.arange(4)], rtol=1e-12, atol=1e-15)
    live = pmask.any(1)
    torch.testing.assert_close(paired[live].sum((1, 2)), torch.ones(int(live.sum()), dtype=F64))
    assert (paired[~live] == 0).all()
    with pytest.raises(ValueError, match="same N and D"):
        paired_transport_plan(p, s[:3])
