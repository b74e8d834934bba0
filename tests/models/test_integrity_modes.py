"""The model side of the integrity modes (``MLIPConfig.sie_mode``): the mask-layout weight and the integrity
predictor against fp64 formulas (gradcheck of the layout weight), which modules each mode builds, which masking it
uses (scored or uniform, checked against the masking op with the same seed), its weights (``integrity=False``:
exactly 1), bitwise reproducibility for a seed, and the config and checkpoint round trips."""
import json

import pytest
import torch
import torch.nn.functional as F

from mlip_fast.constants import SIE_MODES
from mlip_fast.functional._common import _row_weights
from mlip_fast.models import MLIP, create_model
from mlip_fast.models.config import ConfigError, MLIPConfig
from mlip_fast.models.integrity import (LAYOUT_BIAS, IntegrityPredictor, MaskLayoutWeight, keep_layout,
                                        view_integrity_target)
from mlip_fast.models.vision import num_kept
from mlip_fast.ops.integrity_mask import integrity_mask
from tests.models.conftest import make_batch, tiny_overrides

TEXTS = ["The heart is normal. Small left effusion.", "No acute finding.", "Right lower lobe opacity.",
         "Lungs are clear. Heart size normal.", "Mild edema."]


def test_keep_layout_marks_the_kept_patches():
    index = torch.tensor([[0, 2, 5], [1, 3, 4]])
    layout = keep_layout(index, 6)
    assert layout.tolist() == [[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 1, 0]]


def test_layout_weight_starts_at_one_and_follows_its_formula():
    head = MaskLayoutWeight(7).double()
    layout = keep_layout(torch.tensor([[0, 3, 6], [1, 2, 4], [0, 1, 2]]), 7, torch.float64)
    # c = log(e - 1), stored in float32: 1 within float32 rounding
    assert torch.allclose(head(layout), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-7)
    assert torch.equal(head.linear.weight, torch.zeros(1, 7, dtype=torch.float64))
    assert head.linear.bias.item() == pytest.approx(LAYOUT_BIAS, rel=1e-7)
    g = torch.Generator().manual_seed(0)
    theta, c = torch.randn(7, generator=g, dtype=torch.float64), 0.3
    with torch.no_grad():
        head.linear.weight.copy_(theta[None])
        head.linear.bias.fill_(c)
    expected = torch.log1p(torch.exp(layout @ theta + c))
    assert torch.allclose(head(layout), expected, rtol=1e-14, atol=0)


def test_layout_weight_gradcheck():
    head = MaskLayoutWeight(5).double()
    layout = keep_layout(torch.tensor([[0, 1], [2, 4], [1, 3]]), 5, torch.float64)
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)

    def weights(theta, c):
        return torch.func.functional_call(head, {"linear.weight": theta, "linear.bias": c}, (layout,))

    assert torch.autograd.gradcheck(weights, (theta, c))


def test_predictor_starts_at_one_half_and_targets_the_cosine():
    head = IntegrityPredictor(8, 4)
    z = torch.randn(5, 8)
    assert torch.equal(head(z), torch.full((5,), 0.5))
    full = torch.randn(5, 8)
    masked = torch.cat([full[:2], -full[2:3], torch.randn(2, 8)])
    t = view_integrity_target(masked, full)
    assert torch.allclose(t[:2], torch.ones(2)) and t[2] == 0.0  # a view opposite to its image: clamped at 0
    assert torch.allclose(t[3:], F.cosine_similarity(masked[3:], full[3:], dim=-1).clamp(0, 1))
    with pytest.raises(ValueError, match=r"features must be \[B, D=8\]"):
        head(torch.randn(5, 7))
    with pytest.raises(ValueError, match="num_patches must be a positive int"):
        MaskLayoutWeight(0)


def _model(mode: str, seed: int = 0, **extra) -> MLIP:
    torch.manual_seed(seed)
    return create_model("mlip-tiny", **tiny_overrides(sie_mode=mode, **extra)).train()


@pytest.fixture(scope="module")
def models():
    return {mode: _model(mode) for mode in SIE_MODES}


def test_each_mode_builds_its_own_heads(models):
    for mode, model in models.items():
        assert (model.visual.estimator is not None) == (mode in ("guided", "discriminative")), mode
        assert (model.layout_weight is not None) == (mode == "maco"), mode
        assert (model.integrity_predictor is not None) == (mode == "predictor"), mode


def _expected_index(model, images, seed, scored: bool):
    """The kept positions the masking op draws with the same seed: over the estimator's logits, or zero scores."""
    _, tokens = model.visual.embeddings(images)
    scores = model.visual.estimator(tokens) if scored else torch.zeros(tokens.shape[:2])
    k = num_kept(tokens.shape[1], model.config.mask_ratio)
    return integrity_mask(tokens, scores, k, temperature=model.config.mask_temperature if scored else 1.0,
                          seed=seed).index


@pytest.mark.parametrize("mode", SIE_MODES)
def test_masking_weights_and_reproducibility(models, mode):
    model = models[mode]
    if model.visual.estimator is not None:  # logits far from uniform, so that scored and uniform masks differ
        torch.nn.init.normal_(model.visual.estimator.fc2.weight, std=3.0)
    if model.layout_weight is not None:
        torch.nn.init.normal_(model.layout_weight.linear.weight, std=0.5)
    batch = make_batch(model, TEXTS)
    with torch.no_grad():
        out = model(batch, seed=11)
        again = model(batch, seed=11)
        warm = model(batch, seed=11, integrity=False)
    assert out.keys() == again.keys() == warm.keys()
    for key, value in out.items():  # same seed: bitwise the same outputs
        assert torch.equal(value, again[key]), key
    scored = mode in ("guided", "discriminative")
    assert torch.equal(out["patch_index"], _expected_index(model, batch["images"], 11, scored))
    assert torch.equal(warm["patch_index"], _expected_index(model, batch["images"], 11, False))
    assert torch.equal(warm["integrity_weights"], torch.ones(len(TEXTS)))
    w = out["integrity_weights"]
    assert w.shape == (len(TEXTS),) and not w.requires_grad and bool((w > 0).all())
    assert len(set(w.tolist())) > 1 or mode == "predictor"  # the untrained predictor gives 1/2 to every view
    assert _row_weights(w, len(TEXTS), w.device, None, gathered=False).mean().item() == pytest.approx(1.0, abs=1e-6)
    if mode in ("maco", "predictor"):
        assert torch.equal(w, out["integrity_score"].float()) and torch.equal(warm["integrity_score"],
                                                                              out["integrity_score"])
        assert "integrity_logits" not in out and ("integrity_target" in out) == (mode == "predictor")
    else:
        assert "integrity_score" not in out and "integrity_target" not in out
        assert out["integrity_logits"].shape == out["patch_index"].shape


def test_predictor_target_is_the_cosine_to_the_whole_image(models):
    model = models["predictor"]
    batch = make_batch(model, TEXTS[:3])
    out = model(batch, seed=4)
    assert out["integrity_score"].requires_grad and not out["integrity_target"].requires_grad
    with torch.no_grad():
        full = model.encode_image(batch["images"])
    expected = F.cosine_similarity(out["image_global"].detach(), full, dim=-1).clamp(0, 1)
    assert torch.allclose(out["integrity_target"], expected, atol=1e-6)
    whole = model(batch, mask_ratio=0.0)
    assert torch.equal(whole["integrity_target"], torch.ones(3)) and torch.equal(whole["integrity_weights"],
                                                                                 torch.ones(3))


def test_config_round_trip_and_bad_values(tmp_path):
    cfg = MLIPConfig(sie_mode="predictor", sie_warmup=25)
    cfg.to_json(tmp_path / "c.json")
    assert MLIPConfig.from_json(tmp_path / "c.json") == cfg
    old = cfg.to_dict()
    del old["sie_mode"], old["sie_warmup"]  # a config written before the switch
    assert (MLIPConfig.from_dict(old).sie_mode, MLIPConfig.from_dict(old).sie_warmup) == ("guided", 0)
    with pytest.raises(ConfigError, match="sie_mode must be one of"):
        MLIPConfig(sie_mode="estimator")
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="sie_warmup must be an int >= 0"):
            MLIPConfig(sie_warmup=bad)


@pytest.mark.parametrize("mode", ["maco", "predictor"])
def test_checkpoint_round_trip_keeps_the_mode_and_its_head(tmp_path, mode):
    model = _model(mode, sie_warmup=3)
    head = model.layout_weight if mode == "maco" else model.integrity_predictor
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["sie_mode"] == mode
    loaded = MLIP.from_pretrained(tmp_path)
    assert (loaded.config.sie_mode, loaded.config.sie_warmup) == (mode, 3)
    state, back = model.state_dict(), loaded.state_dict()
    assert state.keys() == back.keys() and all(torch.equal(state[k], back[k]) for k in state)
    assert f"integrity mode `{mode}`" in (tmp_path / "README.md").read_text()
