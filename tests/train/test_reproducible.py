"""Same seed, same run: two fresh training runs (separate processes, output folders and synthetic caches,
different PYTHONHASHSEED) with the same flags log identical losses at every step and end with identical
metrics. CPU, one process, fp32, the app's default thread count, the synthetic benchmark's in-memory batches,
masking, text dropout and augmentation all active; each run trains its own WordPiece vocabulary on the training
reports. (The in-memory batches equal the DataLoader's bitwise: tests/train/test_data_order.py.)
Also the --deterministic switches (GPU attention choices, no effect on CPU numbers) and --sie-temperature."""
import json
import subprocess
import sys

import pytest
import torch

from mlip_fast.train.main import train
from mlip_fast.train.setup import model_config
from tests.train.conftest import REPO, SYNTH_N, SYNTH_SIZE, TRAIN_PY, base_args, clean_env, train_records, write_ds

STEPS = 20
TIMING_KEYS = {"time", "samples_per_s", "step_s", "elapsed_s", "data_s"}


def _run(tmp_path, name: str, hash_seed: str) -> tuple:
    out, cache = tmp_path / name, tmp_path / f"cache-{name}"
    env = clean_env(PYTHONHASHSEED=hash_seed)
    env.pop("OMP_NUM_THREADS")  # the app's own choice (all cores), as a user runs it
    cmd = [sys.executable, str(TRAIN_PY), "--deepspeed_config", str(write_ds(tmp_path / "ds.json")),
           "--output-dir", str(out), "--cache-dir", str(cache), "--synthetic-n", str(SYNTH_N),
           "--image-size", str(SYNTH_SIZE), "--text-dropout", "0.1", "--no-progress", "--steps", str(STEPS),
           "--eval-every", "10", "--save-every", "0", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if r["kind"] in ("train", "eval")]
    return out, logged, json.loads((out / "summary.json").read_text())


def _in_process(run_dir, ds, cache, extra):
    train(base_args(ds, run_dir, cache, *extra))
    return run_dir


def test_same_seed_same_flags_give_the_same_run(tmp_path):
    a_dir, a, a_summary = _run(tmp_path, "a", "1")
    b_dir, b, b_summary = _run(tmp_path, "b", "2")

    train = [r for r in a if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert len({r["loss"] for r in train}) > STEPS // 2  # the losses do move
    assert any(r["kind"] == "eval" and r["split"] == "test" for r in a)
    assert a == b  # every logged loss term, lr and evaluation metric, bitwise

    for key in ("final_loss", "final_loss_mean_last_steps", "zero_shot_test", "localisation_test",
                "validation_history"):
        assert a_summary[key] == b_summary[key], key
    assert a_summary["localisation_test"] is not None
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (a_dir / "tokenizer" / name).read_bytes() == (b_dir / "tokenizer" / name).read_bytes()
    assert (a_dir / "export" / "model.safetensors").read_bytes() == (b_dir / "export" / "model.safetensors").read_bytes()


def test_deterministic_switches_on_cuda():
    from mlip_fast.models.config import ConfigError
    from mlip_fast.train.args import parse_args

    base = ["--deepspeed_config", "ds.json"]
    cfg = model_config(parse_args(base + ["--deterministic"]), "cuda")
    assert (cfg.vision.attn_backend, cfg.text.attn_implementation) == ("math", "eager")
    cfg = model_config(parse_args(base + ["--deterministic", "--model-overrides", '{"text": {"attn_implementation": "sdpa"}}']), "cuda")
    assert cfg.text.attn_implementation == "sdpa"  # an explicit choice stands
    for attn in ("flash", "xformers", "sdpa"):
        with pytest.raises(ConfigError, match=f"--attn {attn} has a nondeterministic backward"):
            model_config(parse_args(base + ["--deterministic", "--attn", attn]), "cuda")
    assert model_config(parse_args(base + ["--attn", "flash"]), "cuda").vision.attn_backend == "flash"
    cpu = model_config(parse_args(base + ["--deterministic"]), "cpu")  # CPU kernels are deterministic already
    assert (cpu.vision.attn_backend, cpu.text.attn_implementation) == ("auto", "sdpa")


def test_deterministic_and_sie_temperature_flags(tmp_path, synthetic_cache):
    """On CPU --deterministic changes no number (every kernel there already is) and is switched off after the
    run; --sie-temperature and --sie-target reach the estimator's loss and nothing else."""
    ds = write_ds(tmp_path / "ds.json")
    common = ["--steps", "2", "--no-final-eval", "--seed", "5"]
    plain = train_records(_in_process(tmp_path / "plain", ds, synthetic_cache, common))
    det_dir = _in_process(tmp_path / "det", ds, synthetic_cache, common + ["--deterministic"])
    assert not torch.are_deterministic_algorithms_enabled()
    assert "deterministic: torch deterministic algorithms" in (det_dir / "run.log").read_text()
    assert json.loads((det_dir / "summary.json").read_text())["args"]["deterministic"] is True
    det = train_records(det_dir)
    for step in (1, 2):
        for key in ("loss", "loss_global", "loss_local", "loss_sie", "lr"):
            assert det[step][key] == plain[step][key], (step, key)
    warm = train_records(_in_process(tmp_path / "warm", ds, synthetic_cache, common + ["--sie-temperature", "0.5"]))
    assert warm[1]["loss_global"] == plain[1]["loss_global"] and warm[1]["loss_local"] == plain[1]["loss_local"]
    assert warm[1]["loss_sie"] != plain[1]["loss_sie"]
    other = train_records(_in_process(tmp_path / "other", ds, synthetic_cache, common + ["--sie-target", "discriminative"]))
    assert other[1]["loss_global"] == plain[1]["loss_global"] and other[1]["loss_local"] == plain[1]["loss_local"]
    assert other[1]["loss_sie"] != plain[1]["loss_sie"]
