"""The integrity diagnostics (mlip_fast.eval.integrity): the per-image AUC against the metrics module's roc_auc, and
what they report for models whose per-patch score is known: a mask-layout weight whose theta marks exactly the
finding patches (AUC 1, weights that vary with what a view kept) and an untrained guided model (constant estimator:
no AUC, kept share K / P in expectation, weights alike)."""
import math

import pytest
import torch

from mlip_fast.eval.integrity import _rows, integrity_diagnostics, per_image_auc
from mlip_fast.eval.metrics import roc_auc
from mlip_fast.models import create_model


def test_per_image_auc_matches_roc_auc_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (6, 9), generator=g).float()  # many ties
    positive = torch.rand(6, 9, generator=g) < 0.4
    positive[0] = False  # no positive: undefined
    auc = per_image_auc(scores, positive)
    assert math.isnan(auc[0])
    for b in range(1, 6):
        if positive[b].any() and not positive[b].all():
            assert auc[b].item() == pytest.approx(roc_auc(positive[b].numpy(), scores[b].numpy()), abs=1e-12)


def test_layout_weight_that_marks_the_findings(synth_dir):
    torch.manual_seed(0)
    model = create_model("mlip-tiny", sie_mode="maco", mask_ratio=0.5)
    cfg = model.config.vision
    rows, positives = _rows(synth_dir, "test", 0, cfg.image_size, cfg.patch_size)
    assert rows
    with torch.no_grad():
        model.layout_weight.linear.weight.copy_(positives[0].float()[None])  # theta_p = 1 on image 0's findings
    out = integrity_diagnostics(model, synth_dir, "test", draws=2)
    assert out["sie_mode"] == "maco" and out["n_images"] == len(rows) and out["target_auc"] is None
    assert out["kept_share_uniform"] == 0.5 and 0.0 < out["finding_kept_share"] < 1.0
    assert out["weight_cv"] > 0
    single = integrity_diagnostics(model, synth_dir, "test", draws=1, max_images=1)
    assert single["estimator_auc"] == 1.0 and single["weight_finding_corr"] is None  # one view: no correlation
    assert model.training  # left in the mode it came in


def test_untrained_guided_model(synth_dir):
    torch.manual_seed(0)
    model = create_model("mlip-tiny").eval()
    out = integrity_diagnostics(model, synth_dir, "test", draws=8)
    assert out["estimator_auc"] is None and 0.0 <= out["target_auc"] <= 1.0
    assert out["weight_cv"] == pytest.approx(0.0, abs=1e-6) and out["weight_finding_corr"] is None
    assert out["finding_kept_share"] == pytest.approx(out["kept_share_uniform"], abs=0.15)
    assert not model.training
    with pytest.raises(ValueError, match="mask ratio > 0"):
        integrity_diagnostics(model, synth_dir, "test", mask_ratio=0.0)
