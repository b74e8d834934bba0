"""Same seed, same run: two fresh training runs (separate processes, output folders and synthetic caches,
different PYTHONHASHSEED) with the same flags log identical losses at every step and end with identical
metrics. CPU, one process, fp32, the app's default thread count, a DataLoader worker, masking, dropout
and augmentation all active; each run trains its own WordPiece vocabulary on the training reports."""
import json
import subprocess
import sys

from tests.train.conftest import REPO, SYNTH_N, SYNTH_SIZE, TRAIN_PY, clean_env, write_ds

STEPS = 20
TIMING_KEYS = {"time", "samples_per_s", "step_s", "elapsed_s"}


def _run(tmp_path, name: str, hash_seed: str) -> tuple:
    out, cache = tmp_path / name, tmp_path / f"cache-{name}"
    env = clean_env(PYTHONHASHSEED=hash_seed)
    env.pop("OMP_NUM_THREADS")  # the app's own choice (all cores), as a user runs it
    cmd = [sys.executable, str(TRAIN_PY), "--deepspeed_config", str(write_ds(tmp_path / "ds.json")),
           "--output-dir", str(out), "--cache-dir", str(cache), "--synthetic-n", str(SYNTH_N),
           "--image-size", str(SYNTH_SIZE), "--num-workers", "1", "--no-progress", "--steps", str(STEPS),
           "--eval-every", "10", "--save-every", "0", "--seed", "3"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records if r["kind"] in ("train", "eval")]
    return out, logged, json.loads((out / "summary.json").read_text())


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
