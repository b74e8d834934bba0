"""The integrity estimator's targets against an fp64 loop, and what the discriminative target is for: a sentence
every report shares stops attracting it, a finding only one report describes does not."""
import math

import pytest
import torch

import mlip_fast.functional as MF
from mlip_fast.losses import MLIPLoss, SemanticIntegrityLoss


def _loop_target(p, s, smask, target, tau_o):
    """t [B, K] by explicit loops in fp64."""
    B, K, _ = p.shape
    v = p / p.norm(dim=-1, keepdim=True)
    u = s / s.norm(dim=-1, keepdim=True)
    t = torch.empty(B, K, dtype=torch.float64)
    for b in range(B):
        for k in range(K):
            best = [max(float(v[b, k] @ u[j, q]) for q in range(s.shape[1]) if smask[j, q]) for j in range(B)]
            own = best[b]
            if target == "discriminative" and B > 1:
                others = [x / tau_o for j, x in enumerate(best) if j != b]
                own = own - tau_o * math.log(sum(math.exp(x) for x in others))
            t[b, k] = own
    return t


def _kl(logits, t, tau):
    target = torch.softmax(t / tau, dim=-1)
    return (target * (target.log() - torch.log_softmax(logits, dim=-1))).sum(-1).mean()


@pytest.mark.parametrize("target", ["guided", "discriminative"])
def test_target_and_loss_match_fp64_loops(target, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    B, K, S, D = 4, 5, 3, 8
    p = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    s = torch.randn(B, S, D, generator=gen, dtype=torch.float64)
    smask = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    logits = torch.randn(B, K, generator=gen, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr("mlip_fast.functional.integrity.TARGET_BLOCK_ELEMENTS", 1)  # one image per block
    got = MF.semantic_integrity_loss(logits, p, s, smask, temperature=0.2, target=target, other_temperature=0.07)
    want = _kl(logits, _loop_target(p, s, smask, target, 0.07), 0.2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got, logits)
    (w,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_discriminative_target_prefers_the_finding_over_the_shared_sentence():
    # Every report says the same normal sentence n and one finding f_b of its own. Patch 0 of each image
    # looks like n (exactly), patch 1 like its finding (slightly less exactly), patch 2 like nothing.
    D, B = 16, 3
    basis = torch.eye(D, dtype=torch.float64)
    n = basis[0]
    findings = basis[1 : 1 + B]
    s = torch.stack([torch.stack([n, findings[b]]) for b in range(B)])  # [B, 2, D]
    p = torch.stack([torch.stack([n, 0.9 * findings[b] + 0.1 * basis[10], basis[12]]) for b in range(B)])
    logits = torch.zeros(B, 3, dtype=torch.float64)

    def target_of(target):
        from mlip_fast.functional.integrity import _target_scores

        return _target_scores(p, s, None, target, 0.05, torch.float64)

    guided, disc = target_of("guided"), target_of("discriminative")
    assert (guided[:, 0] > guided[:, 1]).all()  # the shared sentence wins the specified target
    assert (disc[:, 1] > disc[:, 0]).all()  # the finding wins the discriminative one
    assert torch.isfinite(MF.semantic_integrity_loss(logits, p, s, target="discriminative"))


def test_one_image_discriminative_is_guided_and_bad_options_are_refused():
    gen = torch.Generator().manual_seed(1)
    p, s = torch.randn(1, 4, 6, generator=gen), torch.randn(1, 2, 6, generator=gen)
    logits = torch.randn(1, 4, generator=gen)
    torch.testing.assert_close(MF.semantic_integrity_loss(logits, p, s, target="discriminative"),
                               MF.semantic_integrity_loss(logits, p, s, target="guided"))
    with pytest.raises(ValueError, match="target"):
        SemanticIntegrityLoss(target="oracle")
    with pytest.raises(ValueError, match="other_temperature"):
        MF.semantic_integrity_loss(logits, p, s, target="discriminative", other_temperature=0.0)
    with pytest.raises(ValueError, match="sie_target"):
        MLIPLoss(sie_target="oracle")


def test_mlip_loss_uses_the_configured_target():
    gen = torch.Generator().manual_seed(2)
    B, K, S, D = 3, 4, 2, 8
    x = dict(image_global=torch.randn(B, D, generator=gen), text_global=torch.randn(B, D, generator=gen),
             patches=torch.randn(B, K, D, generator=gen), sentences=torch.randn(B, S, D, generator=gen),
             integrity_logits=torch.randn(B, K, generator=gen))
    _, terms = MLIPLoss(sie_target="discriminative", impl="reference")(**x)
    want = MF.semantic_integrity_loss(x["integrity_logits"], x["patches"], x["sentences"], target="discriminative")
    torch.testing.assert_close(terms["loss_sie"], want)
