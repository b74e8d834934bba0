"""The integrity modes' losses (``maco``: the mask-layout term, ``predictor``: the prediction loss) against fp64
references written here, their gradients (gradcheck in fp64, gradient to the head's output only), and the one
switch ``sie_mode`` of the loss config (the older ``sie_target`` folded in, contradictions refused)."""
import math

import pytest
import torch
import torch.nn.functional as F

import mlip_fast.functional as MF
from mlip_fast.functional._common import _row_weights
from mlip_fast.losses import MLIPLoss


def _case(B=5, D=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, D, generator=g, dtype=torch.float64)
    text = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = F.softplus(torch.randn(B, generator=g, dtype=torch.float64))
    return image, text, w


def _layout_reference(w, image, text, scale):
    """1/2 [CE(w_b s cos(i_b, t_j)) + CE(w_b s cos(t_b, i_j))] over rows b, by explicit sums in fp64."""
    B = image.shape[0]
    total = 0.0
    for b in range(B):
        for x, ys in ((image[b], text), (text[b], image)):
            logits = [float(w[b]) * scale * float(F.cosine_similarity(x, ys[j], dim=0)) for j in range(B)]
            total += -logits[b] + math.log(sum(math.exp(v) for v in logits))
    return total / (2 * B)


def test_mask_layout_loss_matches_fp64_reference():
    image, text, w = _case()
    got = MF.mask_layout_loss(w, image, text, 7.5)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(_layout_reference(w, image, text, 7.5), rel=1e-12)
    ones = torch.ones_like(w)  # w = 1 (the initial layout weight) is the unweighted global term
    assert MF.mask_layout_loss(ones, image, text, 7.5).item() == pytest.approx(
        MF.global_contrastive_loss(image, text, 7.5).item(), rel=1e-12)


def test_mask_layout_loss_gradient_reaches_the_weights_only():
    image, text, w = _case(B=4, D=3, seed=1)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: MF.mask_layout_loss(x, image, text, 3.0), (w,))
    image.requires_grad_(True)
    text.requires_grad_(True)
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    MF.mask_layout_loss(w, image, text, scale).backward()
    assert w.grad is not None and image.grad is None and text.grad is None and scale.grad is None


def test_prediction_loss_is_mse_with_a_detached_target():
    g = torch.Generator().manual_seed(2)
    q = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.rand(6, generator=g, dtype=torch.float64, requires_grad=True)
    loss = MF.integrity_prediction_loss(q, t)
    assert loss.detach().item() == pytest.approx(float(((q - t) ** 2).mean().detach()), rel=1e-14)
    assert torch.autograd.gradcheck(lambda x: MF.integrity_prediction_loss(x, t), (q,))
    loss.backward()
    assert t.grad is None


def test_bad_inputs_are_named():
    image, text, w = _case()
    with pytest.raises(ValueError, match=r"layout_weights must have shape \[B=5\]"):
        MF.mask_layout_loss(w[:3], image, text, 1.0)
    with pytest.raises(ValueError, match=r"target must have shape \[B=5\]"):
        MF.integrity_prediction_loss(w, w[:2])
    with pytest.raises(ValueError, match="prediction must have shape"):
        MF.integrity_prediction_loss(w[:, None], w)


def test_sie_mode_switch_and_the_older_sie_target():
    assert MF.LossConfig().checked().sie_mode == "guided"
    folded = MF.LossConfig(sie_target="discriminative").checked()
    assert (folded.sie_mode, folded.sie_target) == ("discriminative", None)
    assert MF.LossConfig(sie_mode="discriminative", sie_target="discriminative").checked().sie_mode == "discriminative"
    assert MLIPLoss(sie_mode="maco").config.sie_mode == "maco"
    with pytest.raises(ValueError, match="sie_target='discriminative' contradicts sie_mode='maco'"):
        MF.LossConfig(sie_mode="maco", sie_target="discriminative").checked()
    with pytest.raises(ValueError, match="sie_mode must be one of"):
        MLIPLoss(sie_mode="oracle")
    with pytest.raises(ValueError, match="sie_target must be one of"):
        MLIPLoss(sie_target="maco")  # the older spelling names the estimator's targets only


def _outputs(B=4, K=3, S=2, D=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(image_global=torch.randn(B, D, generator=g), text_global=torch.randn(B, D, generator=g),
                patches=torch.randn(B, K, D, generator=g), sentences=torch.randn(B, S, D, generator=g),
                sentence_mask=torch.ones(B, S, dtype=torch.bool), integrity_logits=None,
                integrity_weights=torch.rand(B, generator=g) + 0.5)


@pytest.mark.parametrize("mode", ["maco", "predictor"])
def test_total_loss_takes_the_modes_term(mode):
    x = _outputs()
    score = torch.rand(4, requires_grad=True)
    target = torch.rand(4) if mode == "predictor" else None
    criterion = MLIPLoss(sie_mode=mode, impl="reference", lambda_sie=0.5)
    with pytest.raises(ValueError, match=f"sie_mode '{mode}' needs integrity_score"):
        criterion(**x)
    total, terms = criterion(**x, integrity_score=score, integrity_target=target)
    if mode == "maco":
        expected = MF.mask_layout_loss(score, x["image_global"], x["text_global"], criterion.global_loss.logit_scale())
    else:
        expected = MF.integrity_prediction_loss(score, target)
    assert terms["loss_sie"].item() == pytest.approx(expected.item(), rel=1e-6)
    unweighted = MLIPLoss(sie_mode=mode, impl="reference", lambda_sie=0.0)(**x)[1]
    assert terms["loss_global"] == unweighted["loss_global"] and terms["loss_local"] == unweighted["loss_local"]
    total.backward()
    assert score.grad is not None and bool(score.grad.abs().sum() > 0)


def test_row_weights_have_mean_one():
    w = torch.tensor([0.2, 3.0, 1.1, 0.7])
    normalised = _row_weights(w, 4, w.device, None, gathered=False)
    assert normalised.mean().item() == pytest.approx(1.0, abs=1e-7)
    assert torch.equal(_row_weights(torch.ones(4), 4, w.device, None, gathered=False), torch.ones(4))
