"""MLIP's losses against slow float64 loop implementations, gradcheck, and bad input."""
import math

import pytest
import torch

from mlip_fast import functional as MF
from mlip_fast.losses import (
    GlobalContrastiveLoss,
    LogitScale,
    MLIPLoss,
    PatchSentenceLoss,
    SemanticIntegrityLoss,
    clamp_logit_scales_,
)
from tests.slow_reference import normalize_rows, slow_infonce, slow_scores


def _inputs(B=4, K=5, S=3, D=7, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    smask = torch.rand(B, S, generator=gen) > 0.4
    smask[:, 0] = True
    return dict(
        image_global=torch.randn(B, D, generator=gen, dtype=dtype),
        text_global=torch.randn(B, D, generator=gen, dtype=dtype),
        patches=torch.randn(B, K, D, generator=gen, dtype=dtype),
        sentences=torch.randn(B, S, D, generator=gen, dtype=dtype),
        sentence_mask=smask,
        integrity_logits=torch.randn(B, K, generator=gen, dtype=dtype),
        integrity_weights=torch.rand(B, generator=gen, dtype=dtype) + 0.1,
    )


@pytest.mark.parametrize("weighted", [False, True])
def test_global_loss_matches_loops(weighted):
    x = _inputs()
    w = x["integrity_weights"] if weighted else None
    loss = MF.global_contrastive_loss(x["image_global"], x["text_global"], 10.0, w)
    i, t = normalize_rows(x["image_global"]), normalize_rows(x["text_global"])
    sim = (i @ t.T).tolist()
    expected = slow_infonce(sim, [list(col) for col in zip(*sim)], 10.0, w)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("weighted", [False, True])
def test_local_loss_matches_loops(impl, weighted):
    from mlip_fast.ops.patch_sentence import REGISTRY

    if impl not in REGISTRY.impls:
        pytest.skip(f"impl {impl} not registered")
    x = _inputs(seed=1)
    w = x["integrity_weights"] if weighted else None
    loss = MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"], None, 5.0, w, impl=impl)
    i2t, t2i = slow_scores(normalize_rows(x["patches"]), normalize_rows(x["sentences"]), x["sentence_mask"])
    rows = i2t.tolist()
    cols_t = t2i.T.tolist()  # for report j: its t2i scores against every image
    expected = slow_infonce(rows, cols_t, 5.0, w)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_local_loss_local_and_full_modes_agree_in_one_process():
    x = _inputs(seed=2)
    a = MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"], impl="reference", local_loss=True)
    b = MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"], impl="reference", local_loss=False)
    torch.testing.assert_close(a, b)


def test_sie_loss_matches_explicit_kl():
    x = _inputs(seed=3)
    tau = 0.2
    loss = MF.semantic_integrity_loss(
        x["integrity_logits"], x["patches"], x["sentences"], x["sentence_mask"], temperature=tau
    )
    p, s = normalize_rows(x["patches"]), normalize_rows(x["sentences"])
    total = 0.0
    B, K = x["integrity_logits"].shape
    for b in range(B):
        m = [max(float(p[b, k] @ s[b, q]) for q in range(s.shape[1]) if x["sentence_mask"][b, q]) / tau for k in range(K)]
        zt = sum(math.exp(v) for v in m)
        target = [math.exp(v) / zt for v in m]
        a = x["integrity_logits"][b].tolist()
        za = sum(math.exp(v) for v in a)
        q = [math.exp(v) / za for v in a]
        total += sum(t * math.log(t / qq) for t, qq in zip(target, q))
    assert loss.item() == pytest.approx(total / B, rel=1e-6)


def test_sie_loss_ignores_padded_patches_and_is_zero_at_target():
    x = _inputs(seed=4)
    pmask = torch.ones(4, 5, dtype=torch.bool)
    pmask[:, -2:] = False
    with torch.no_grad():
        sim = torch.einsum("bkd,bsd->bks", normalize_rows(x["patches"]), normalize_rows(x["sentences"]))
        sim = sim.masked_fill(~x["sentence_mask"][:, None], -math.inf).max(-1).values / 0.1
    logits = sim.clone()
    logits[:, -2:] = 123.0  # padded patches: must not matter
    loss = MF.semantic_integrity_loss(logits, x["patches"], x["sentences"], x["sentence_mask"], pmask)
    assert abs(loss.item()) < 1e-10


def test_gradcheck_every_loss():
    x = _inputs(B=3, K=3, S=2, D=4, seed=5)
    for k in ("image_global", "text_global", "patches", "sentences", "integrity_logits"):
        x[k].requires_grad_(True)
    pmask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    w = x["integrity_weights"]
    assert torch.autograd.gradcheck(lambda i, t: MF.global_contrastive_loss(i, t, 7.0, w), (x["image_global"], x["text_global"]))
    assert torch.autograd.gradcheck(
        lambda p, s: MF.patch_sentence_loss(p, s, x["sentence_mask"], pmask, 7.0, w, impl="reference"),
        (x["patches"], x["sentences"]),
    )
    assert torch.autograd.gradcheck(
        lambda a: MF.semantic_integrity_loss(a, x["patches"].detach(), x["sentences"].detach(), x["sentence_mask"], pmask),
        (x["integrity_logits"],),
    )
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    p0, s0 = x["patches"].detach(), x["sentences"].detach()

    # The SIE target is detached by design, so patches/sentences are checked with lambda_sie=0 and the
    # estimator logits with fixed patches/sentences.
    def total_local(i, t, p, s, sc):
        return MF.mlip_loss(i, t, p, s, x["sentence_mask"], None, w, sc, sc, pmask, lambda_sie=0.0, impl="reference")[0]

    def total_sie(i, t, a, sc):
        return MF.mlip_loss(i, t, p0, s0, x["sentence_mask"], a, w, sc, sc, pmask, impl="reference")[0]

    assert torch.autograd.gradcheck(
        total_local, (x["image_global"], x["text_global"], x["patches"], x["sentences"], scale)
    )
    assert torch.autograd.gradcheck(total_sie, (x["image_global"], x["text_global"], x["integrity_logits"], scale))


def test_mlip_loss_is_weighted_sum_of_terms_and_weights_are_detached():
    x = _inputs(seed=6, dtype=torch.float32)
    x["integrity_weights"].requires_grad_(True)
    crit = MLIPLoss(lambda_local=0.5, lambda_sie=0.3, impl="reference")
    total, terms = crit(**x)
    expected = terms["loss_global"] + 0.5 * terms["loss_local"] + 0.3 * terms["loss_sie"]
    torch.testing.assert_close(total.detach(), expected)
    total.backward()
    assert x["integrity_weights"].grad is None
    assert crit.global_loss.logit_scale.log_scale.grad is not None


def test_modules_use_own_scale_and_match_functional():
    x = _inputs(seed=7, dtype=torch.float32)
    g = GlobalContrastiveLoss()
    torch.testing.assert_close(
        g(x["image_global"], x["text_global"]),
        MF.global_contrastive_loss(x["image_global"], x["text_global"], 1 / 0.07),
    )
    ps = PatchSentenceLoss(impl="reference")
    torch.testing.assert_close(
        ps(x["patches"], x["sentences"], x["sentence_mask"], logit_scale=3.0),
        MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"], logit_scale=3.0, impl="reference"),
    )
    sie = SemanticIntegrityLoss(temperature=0.5)
    torch.testing.assert_close(
        sie(x["integrity_logits"], x["patches"], x["sentences"], x["sentence_mask"]),
        MF.semantic_integrity_loss(x["integrity_logits"], x["patches"], x["sentences"], x["sentence_mask"], temperature=0.5),
    )


def test_scale_starts_at_most_at_100():
    g = GlobalContrastiveLoss(init_temperature=0.001)
    assert g.logit_scale().item() == pytest.approx(100.0)


def test_logit_scale_gradient_is_not_zero_above_the_bound():
    """A clamp inside forward has zero gradient once the parameter passes log(max); the scale is bounded
    by clamping the parameter after the step instead, so forward keeps d exp(t) / dt = exp(t) everywhere."""
    scale = LogitScale(10.0, max_scale=100.0).double()
    for value in (math.log(10.0), math.log(1000.0)):  # below and above the bound
        with torch.no_grad():
            scale.log_scale.fill_(value)
        scale.log_scale.grad = None
        out = scale()
        assert out.shape == ()
        out.backward()
        assert out.item() == pytest.approx(math.exp(value), rel=1e-12)
        assert scale.log_scale.grad.item() == pytest.approx(math.exp(value), rel=1e-12)


def test_clamp_after_step_bounds_the_parameter():
    scale = LogitScale(10.0, max_scale=100.0)
    with torch.no_grad():
        scale.log_scale.fill_(math.log(1000.0))
    assert scale().item() == pytest.approx(1000.0, rel=1e-6)  # forward itself does not bound it
    scale.clamp_()
    assert scale.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-7)  # fp32 rounding of log(100)
    below = LogitScale(10.0, max_scale=100.0)
    before = below.log_scale.detach().clone()
    below.clamp_()
    assert torch.equal(below.log_scale.detach(), before)  # inside the bound: untouched


def test_clamp_logit_scales_reaches_every_scale_of_a_module():
    crit = MLIPLoss()
    fixed = GlobalContrastiveLoss(learn_temperature=False)
    with torch.no_grad():
        for s in (crit.global_loss.logit_scale, crit.patch_sentence_loss.logit_scale, fixed.logit_scale):
            s.log_scale.fill_(7.0)
    clamp_logit_scales_(torch.nn.ModuleList([crit, fixed]))
    for s in (crit.global_loss.logit_scale, crit.patch_sentence_loss.logit_scale, fixed.logit_scale):
        assert s.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-7)
    assert "logit_scale.log_scale" in dict(fixed.named_buffers())  # not learnable: a buffer, clamped all the same


def test_logit_scale_rejects_bad_values():
    with pytest.raises(ValueError, match="initial logit scale"):
        LogitScale(0.0)
    with pytest.raises(ValueError, match="max_scale"):
        LogitScale(10.0, max_scale=float("inf"))
    with pytest.raises(ValueError, match="init_temperature"):
        PatchSentenceLoss(init_temperature=0.0)


def test_bad_input_errors():
    x = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="image"):
        MF.global_contrastive_loss(x["image_global"][:3], x["text_global"], 1.0)
    with pytest.raises(ValueError, match="image"):
        MF.global_contrastive_loss(x["image_global"][0], x["text_global"], 1.0)
    with pytest.raises(TypeError, match="text"):
        MF.global_contrastive_loss(x["image_global"], x["text_global"].long(), 1.0)
    bad = x["image_global"].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        MF.global_contrastive_loss(bad, x["text_global"], 1.0)
    with pytest.raises(ValueError, match="batch"):
        MF.patch_sentence_loss(x["patches"], x["sentences"][:2], x["sentence_mask"][:2])
    empty = x["sentence_mask"].clone()
    empty[2] = False
    with pytest.raises(ValueError, match="no valid sentence"):
        MF.patch_sentence_loss(x["patches"], x["sentences"], empty)
    with pytest.raises(ValueError, match="no valid sentence"):
        MF.semantic_integrity_loss(x["integrity_logits"], x["patches"], x["sentences"], empty)
    with pytest.raises(ValueError, match="integrity_logits"):
        MF.semantic_integrity_loss(x["integrity_logits"][:, :2], x["patches"], x["sentences"], x["sentence_mask"])
    with pytest.raises(ValueError, match="weights"):
        MF.global_contrastive_loss(x["image_global"], x["text_global"], 1.0, torch.ones(3))
    with pytest.raises(ValueError, match="integrity_logits"):
        MLIPLoss()(**{**x, "integrity_logits": None})
    with pytest.raises(ValueError, match="logit_scale"):
        MF.global_contrastive_loss(x["image_global"], x["text_global"], torch.ones(2))


@pytest.mark.parametrize("which", ["global", "local", "sie", "mlip"])
def test_empty_batch_raises_in_every_loss(which):
    x = _inputs(B=0)
    with pytest.raises(ValueError, match="batch size 0|empty input"):
        if which == "global":
            MF.global_contrastive_loss(x["image_global"], x["text_global"], 10.0)
        elif which == "local":
            MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"])
        elif which == "sie":
            MF.semantic_integrity_loss(x["integrity_logits"], x["patches"], x["sentences"], x["sentence_mask"])
        else:
            MF.mlip_loss(**x)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -3.0, torch.tensor(float("nan"))])
@pytest.mark.parametrize("which", ["global", "local"])
def test_bad_logit_scale_raises(scale, which):
    x = _inputs()
    with pytest.raises(ValueError, match="logit_scale must be finite and > 0"):
        if which == "global":
            MF.global_contrastive_loss(x["image_global"], x["text_global"], scale)
        else:
            MF.patch_sentence_loss(x["patches"], x["sentences"], x["sentence_mask"], None, scale)


@pytest.mark.parametrize("which", ["global", "local"])
def test_half_features_are_scaled_in_fp32(which):
    # cosine logits times 1e6 overflow fp16 (max 65504); the loss must widen before scaling, like fp64.
    x = _inputs(seed=5)
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in x.items()}
    ref_in = {k: (v.double() if v.is_floating_point() else v) for k, v in half.items()}  # same rounded inputs

    def run(t):
        if which == "global":
            return MF.global_contrastive_loss(t["image_global"], t["text_global"], 1e6)
        return MF.patch_sentence_loss(t["patches"], t["sentences"], t["sentence_mask"], None, 1e6, impl="reference")

    got, want = run(half), run(ref_in)
    assert torch.isfinite(got) and got.dtype == torch.float32
    # fp16 cosines carry ~5e-4 relative error; times 1e6 that is an absolute logit error of ~500 per entry
    # against gaps of the same order, so only agreement to a loose relative tolerance is meaningful.
    assert got.item() == pytest.approx(want.item(), rel=0.05, abs=50.0)


def test_all_zero_integrity_weights_raise():
    x = _inputs()
    zeros = torch.zeros_like(x["integrity_weights"])
    with pytest.raises(ValueError, match="weights are all zero"):
        MF.global_contrastive_loss(x["image_global"], x["text_global"], 10.0, zeros)
    with pytest.raises(ValueError, match="weights contains NaN"):
        MF.global_contrastive_loss(x["image_global"], x["text_global"], 10.0, zeros + float("nan"))
