"""The integrity modes in the training app: --sie-mode (with --sie-target as its older spelling) and --sie-warmup
reach the model config, the loss and the run record; every mode trains end to end (one run each, 2-3 steps; the
predictor's with gradient accumulation, the maco one with --diagnose at a validation point and at the end); the
warm-up gives exactly unit weights and uniform masking before its step and the mode's after."""
import json

import pytest
import torch

from mlip_fast.losses import MLIPLoss
from mlip_fast.models.vision import num_kept
from mlip_fast.train.args import parse_args
from mlip_fast.train.main import train
from mlip_fast.train.setup import model_config
from tests.train.conftest import base_args, train_records, write_ds

BASE = ["--deepspeed_config", "ds.json"]
DIAGNOSTICS = {"sie_mode", "split", "mask_ratio", "n_images", "draws", "estimator_auc", "target_auc",
               "finding_kept_share", "kept_share_uniform", "weight_cv", "weight_finding_corr"}


def test_flags_reach_the_model_config():
    cfg = model_config(parse_args(BASE + ["--sie-mode", "predictor", "--sie-warmup", "10"]))
    assert (cfg.sie_mode, cfg.sie_warmup) == ("predictor", 10)
    assert model_config(parse_args(BASE)).sie_mode == "guided"
    assert model_config(parse_args(BASE + ["--sie-target", "discriminative"])).sie_mode == "discriminative"
    same = parse_args(BASE + ["--sie-target", "discriminative", "--sie-mode", "discriminative"])
    assert model_config(same).sie_mode == "discriminative"
    overridden = parse_args(BASE + ["--model-overrides", '{"sie_mode": "maco"}'])
    assert model_config(overridden).sie_mode == "maco"


@pytest.mark.parametrize("argv, message", [
    (["--sie-target", "discriminative", "--sie-mode", "maco"], "--sie-target discriminative contradicts --sie-mode maco"),
    (["--sie-mode", "oracle"], "invalid choice: 'oracle'"),
    (["--sie-target", "maco"], "invalid choice: 'maco'"),
    (["--sie-warmup", "-1"], "must be >= 0"),
    (["--sie-warmup", "5", "--steps", "5"], "--sie-warmup 5 must be below --steps 5"),
    (["--diagnose", "--data", "master.csv"], "--diagnose needs --data synthetic"),
])
def test_bad_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(BASE + argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_diagnose_needs_masking():
    from mlip_fast.models.config import ConfigError

    with pytest.raises(ConfigError, match="--diagnose .* needs a mask ratio > 0"):
        model_config(parse_args(BASE + ["--diagnose", "--mask-ratio", "0"]))


def _run(tmp_path, cache, name, *extra, ds_changes=None):
    ds = write_ds(tmp_path / f"ds-{name}.json", **(ds_changes or {}))
    run_dir = tmp_path / name
    train(base_args(ds, run_dir, cache, "--seed", "1", *extra))
    return run_dir, json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("mode, extra, ds_changes", [
    ("discriminative", ["--sie-target", "discriminative", "--no-final-eval"], None),
    ("maco", ["--sie-mode", "maco", "--diagnose", "--eval-every", "1"], None),
    ("predictor", ["--sie-mode", "predictor", "--no-final-eval"], {"gradient_accumulation_steps": 2}),
])
def test_each_mode_trains_end_to_end(tmp_path, synthetic_cache, mode, extra, ds_changes):
    run_dir, summary = _run(tmp_path, synthetic_cache, mode, "--steps", "2", *extra, ds_changes=ds_changes)
    assert summary["model"]["sie_mode"] == mode and summary["loss"]["sie_mode"] == mode
    assert summary["args"]["sie_mode"] == mode
    records = train_records(run_dir)
    assert sorted(records) == [1, 2]
    assert all(torch.isfinite(torch.tensor(r[k])) and r["loss_sie"] > 0 for r in records.values()
               for k in ("loss", "loss_sie"))
    exported = json.loads((run_dir / "export" / "config.json").read_text())
    assert exported["sie_mode"] == mode
    assert f"integrity mode `{mode}`" in (run_dir / "export" / "README.md").read_text()
    if mode == "maco":  # a validation point at step 1 and the end, each with the diagnostics
        assert [h["step"] for h in summary["validation_history"]] == [1]
        assert set(summary["validation_history"][0]["integrity"]) == DIAGNOSTICS
        assert summary["integrity_test"]["sie_mode"] == "maco" and summary["integrity_test"]["split"] == "test"
        assert summary["integrity_test"]["target_auc"] is None
        assert "integrity (maco, test" in (run_dir / "run.log").read_text()
    else:
        assert summary["integrity_test"] is None and "integrity" not in str(summary["validation_history"])


def test_warmup_uniform_and_unweighted_then_the_mode(tmp_path, synthetic_cache, monkeypatch):
    """Guided mode with --sie-warmup 2 over 3 steps: the loss sees weights of exactly 1 in steps 1-2 and the
    kept integrity mass (K / P for the untrained estimator) in step 3. (That the model's masks are uniform with
    ``integrity=False`` and scored without: tests/models/test_integrity_modes.py.)"""
    seen = []
    forward = MLIPLoss.forward

    def recording(self, **outputs):
        seen.append(outputs["integrity_weights"].detach().clone())
        return forward(self, **outputs)

    monkeypatch.setattr(MLIPLoss, "forward", recording)
    run_dir, summary = _run(tmp_path, synthetic_cache, "warm", "--steps", "3", "--sie-warmup", "2", "--no-final-eval")
    assert summary["model"]["sie_warmup"] == 2
    assert len(seen) == 3
    assert torch.equal(seen[0], torch.ones_like(seen[0])) and torch.equal(seen[1], torch.ones_like(seen[1]))
    patches = summary["model"]["vision"]["image_size"] // summary["model"]["vision"]["patch_size"]
    kept_share = num_kept(patches**2, summary["model"]["mask_ratio"]) / patches**2
    assert torch.allclose(seen[2], torch.full_like(seen[2], kept_share))
    assert "warm-up 2 steps" in (run_dir / "run.log").read_text()
