"""The within-report sentence term (``lambda_within``) against a slow float64 loop: values, gradients (through
the chosen patches and every sentence; the choice itself is constant), masks, ties, one-sentence reports, and its
place in ``mlip_loss`` / ``MLIPLoss`` (off by default: the method's loss and terms unchanged)."""
import math

import pytest
import torch

from mlip_fast import functional as MF
from mlip_fast.losses import MLIPLoss
from tests.slow_reference import slow_ce


def _inputs(B=5, K=6, S=4, D=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    smask = torch.rand(B, S, generator=gen) > 0.3
    smask[:, 0] = True
    smask[1, 1:] = False  # a one-sentence report: no term of its own
    pmask = torch.rand(B, K, generator=gen) > 0.3
    pmask[:, 0] = True
    return (torch.randn(B, K, D, generator=gen, dtype=dtype), torch.randn(B, S, D, generator=gen, dtype=dtype),
            smask, pmask)


def slow_within(patches, sentences, sentence_mask, patch_mask, scale):
    """The term by explicit loops in float64: per report with >= 2 valid sentences, each valid sentence's first
    best valid patch, a cross-entropy over the report's valid sentences; mean over the counted sentences."""
    B, K, _ = patches.shape
    S = sentences.shape[1]
    total, n = 0.0, 0
    for b in range(B):
        vq = [q for q in range(S) if sentence_mask is None or bool(sentence_mask[b, q])]
        vp = [k for k in range(K) if patch_mask is None or bool(patch_mask[b, k])]
        if len(vq) < 2:
            continue
        unit_p = {k: patches[b, k].double() / patches[b, k].double().norm() for k in vp}
        unit_s = {q: sentences[b, q].double() / sentences[b, q].double().norm() for q in vq}
        for q in vq:
            sims = [float(unit_p[k] @ unit_s[q]) for k in vp]
            best = vp[sims.index(max(sims))]  # the first maximum
            logits = [scale * float(unit_p[best] @ unit_s[r]) for r in vq]
            total += slow_ce(logits, vq.index(q))
            n += 1
    return total / max(n, 1)


@pytest.mark.parametrize("masks", [True, False])
def test_within_report_loss_matches_the_loop(masks):
    patches, sentences, smask, pmask = _inputs()
    if not masks:
        smask = pmask = None
    loss = MF.within_report_loss(patches, sentences, smask, pmask, 7.0)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(slow_within(patches, sentences, smask, pmask, 7.0), rel=1e-12, abs=1e-12)


def test_within_report_gradients_match_the_loop_with_the_choice_held():
    """Autograd of the term against autograd of an fp64 formula that takes the loop's patch choices as given (the
    choice is a hard argmax: piecewise constant), for the patches, the sentences and the logit scale."""
    patches, sentences, smask, pmask = _inputs(seed=3)
    p, s, scale = (patches.clone().requires_grad_(), sentences.clone().requires_grad_(),
                   torch.tensor(5.0, dtype=torch.float64, requires_grad=True))
    MF.within_report_loss(p, s, smask, pmask, scale).backward()

    p2, s2, scale2 = (patches.clone().requires_grad_(), sentences.clone().requires_grad_(),
                      torch.tensor(5.0, dtype=torch.float64, requires_grad=True))
    B, K, _ = patches.shape
    S = sentences.shape[1]
    terms = []
    for b in range(B):
        vq = [q for q in range(S) if bool(smask[b, q])]
        vp = [k for k in range(K) if bool(pmask[b, k])]
        if len(vq) < 2:
            continue
        up = p2[b] / p2[b].norm(dim=-1, keepdim=True)
        us = s2[b] / s2[b].norm(dim=-1, keepdim=True)
        for q in vq:
            with torch.no_grad():
                best = vp[int(torch.stack([up[k] @ us[q] for k in vp]).argmax())]
            logits = scale2 * torch.stack([up[best] @ us[r] for r in vq])
            terms.append(torch.logsumexp(logits, 0) - logits[vq.index(q)])
    torch.stack(terms).mean().backward()
    torch.testing.assert_close(p.grad, p2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(scale.grad, scale2.grad, rtol=1e-10, atol=1e-12)
    # a one-sentence report, padded sentences and masked patches get no gradient at all
    assert p.grad[1].abs().sum() == 0 and s.grad[1].abs().sum() == 0
    assert s.grad[~smask].abs().sum() == 0 and p.grad[~pmask].abs().sum() == 0


def test_masked_patches_are_never_chosen_and_ties_take_the_first():
    """A masked patch that would match every sentence best changes nothing; two identical patches tie and the
    first is chosen (the gradient lands on it alone)."""
    sentences = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    patches = torch.tensor([[[1.0, 0.2, 0], [1.0, 0.2, 0], [0.1, 1.0, 0], [1.0, 1.0, 0]]], dtype=torch.float64)
    pmask = torch.tensor([[True, True, True, False]])
    p = patches.clone().requires_grad_()
    loss = MF.within_report_loss(p, sentences, None, pmask, 4.0)
    assert loss.item() == pytest.approx(slow_within(patches, sentences, None, pmask, 4.0), rel=1e-12)
    loss.backward()
    assert p.grad[0, 0].abs().sum() > 0 and p.grad[0, 1].abs().sum() == 0 and p.grad[0, 3].abs().sum() == 0
    # one patch best for both sentences, equally near to both: the two rows share the logits and each is log 2
    same = MF.within_report_loss(torch.tensor([[[1.0, 1.0, 0], [0, 0, 1.0]]], dtype=torch.float64), sentences,
                                 None, None, 1.0)
    assert same.item() == pytest.approx(math.log(2.0), rel=1e-12)


def test_reports_of_one_sentence_give_zero():
    patches, sentences, _, _ = _inputs(B=3, S=3)
    smask = torch.zeros(3, 3, dtype=torch.bool)
    smask[:, 0] = True
    p = patches.clone().requires_grad_()
    loss = MF.within_report_loss(p, sentences, smask, None, 10.0)
    assert loss.item() == 0.0
    loss.backward()
    assert p.grad.abs().sum() == 0


def test_float32_inputs_stay_close_to_float64():
    patches, sentences, smask, pmask = _inputs(seed=5)
    loss32 = MF.within_report_loss(patches.float(), sentences.float(), smask, pmask, 10.0)
    assert loss32.dtype == torch.float32
    # fp32 unit vectors and products: relative error a few ulps of the logits (scale 10, |cos| <= 1)
    assert loss32.item() == pytest.approx(slow_within(patches, sentences, smask, pmask, 10.0), rel=1e-5, abs=1e-6)


def test_bad_inputs_are_clear_errors():
    patches, sentences, smask, _ = _inputs()
    with pytest.raises(ValueError, match="logit_scale"):
        MF.within_report_loss(patches, sentences, smask, None, -1.0)
    with pytest.raises(ValueError, match="batch"):
        MF.within_report_loss(patches, sentences[:3], smask[:3], None, 1.0)
    with pytest.raises(ValueError, match="lambda_within"):
        MF.LossConfig(lambda_within=float("nan")).checked()


def test_mlip_loss_adds_the_term_only_when_asked():
    patches, sentences, smask, pmask = _inputs(seed=7)
    gen = torch.Generator().manual_seed(1)
    kw = dict(image_global=torch.randn(5, 7, generator=gen, dtype=torch.float64),
              text_global=torch.randn(5, 7, generator=gen, dtype=torch.float64), patches=patches, sentences=sentences,
              sentence_mask=smask, patch_mask=pmask, logit_scale_global=10.0, logit_scale_local=6.0, lambda_sie=0.0)
    total0, terms0 = MF.mlip_loss(**kw)
    assert set(terms0) == {"loss_global", "loss_local", "loss_sie", "loss"}
    total, terms = MF.mlip_loss(**kw, lambda_within=0.5)
    within = MF.within_report_loss(patches, sentences, smask, pmask, 6.0)
    assert set(terms) == set(terms0) | {"loss_within"}
    assert terms["loss_within"].item() == pytest.approx(within.item(), rel=1e-12)
    assert total.item() == pytest.approx(total0.item() + 0.5 * within.item(), rel=1e-12)
    module = MLIPLoss(lambda_within=0.5, lambda_sie=0.0)
    assert module.config.lambda_within == 0.5
    m_total, _ = module(**{k: v for k, v in kw.items() if k != "lambda_sie"})
    assert m_total.item() == pytest.approx(total.item(), rel=1e-12)
