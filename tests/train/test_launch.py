"""Runs through the launchers in subprocesses: stop signals, exit codes, and two gloo processes under
ZeRO-2 and ZeRO-3 matching one process on the same global batch (the integrity modes with their own parameters
too)."""
import json
import signal
import subprocess
import sys
import time

import pytest

from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train.main import train
from tests.train.conftest import (DETERMINISTIC, REPO, TRAIN_PY, base_args, clean_env, seed_run_dir, train_records,
                                  write_ds)
from tests.process_group import free_port

pytestmark = pytest.mark.slow


def test_bad_ds_config_exit_code_and_message(tmp_path, synthetic_cache):
    ds = write_ds(tmp_path / "ds.json", zero_optimisation={"stage": 2})
    proc = subprocess.run([sys.executable, str(TRAIN_PY), *base_args(ds, tmp_path / "run", synthetic_cache)],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: " in proc.stderr and "unknown top-level key 'zero_optimisation'" in proc.stderr
    assert "did you mean 'zero_optimization'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, synthetic_cache):
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(TRAIN_PY),
                             *base_args(ds, run_dir, synthetic_cache, "--steps", "100000", "--no-final-eval",
                                        "--num-workers", "1")],
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file() and '"kind": "train"' in metrics.read_text():
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended before it could be signalled"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "training stopped by SIGTERM" in err and "--resume latest" in err
    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    state = ckpt.verify_checkpoint(root, tag, world_size=1, zero_stage=2)
    step = state["step"]
    assert step >= 1 and max(train_records(run_dir)) == step
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "stopped" and e["signal"] == signal.SIGTERM for e in events)
    summary = train(base_args(ds, run_dir, synthetic_cache, "--steps", str(step + 1), "--no-final-eval",
                              "--resume", "latest"))
    assert summary["resumed_from_step"] == step and summary["steps"] == step + 1


@pytest.mark.parametrize("stage", [2, 3])
def test_two_processes_match_one_process(tmp_path, synthetic_cache, shared_tokenizer, one_process_reference, stage):
    """``deepspeed --num_gpus 2`` (two CPU processes, gloo): each rank holds half of the global batch of 8,
    the losses gather negatives across ranks, and DeepSpeed averages gradients. Per-step losses equal the
    one-process run up to fp32 reduction order: the tolerance 1e-5 relative is ~100 ulp, far below any
    real difference (a wrong gather or gradient scale changes the loss at the 1e-2 level)."""
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    summary = _two_processes(tmp_path, run_dir, synthetic_cache, stage, "--eval-every", "2")
    assert summary["world_size"] == 2 and summary["zero_stage"] == stage and summary["micro_batch"] == 4
    two = train_records(run_dir)
    assert sorted(two) == sorted(one_process_reference) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_global", "loss_local", "loss_sie"):
            assert two[step][key] == pytest.approx(one_process_reference[step][key], rel=1e-5, abs=1e-6), (step, key)
    # both ranks saved their optimizer shard and the export consolidates them
    assert len(list((run_dir / "checkpoints" / "step00000003").glob("*optim_states.pt"))) == 2
    assert (run_dir / "export" / "model.safetensors").is_file()


@pytest.mark.parametrize("mode", ["maco", "predictor"])
def test_two_processes_zero3_integrity_modes_match_one_process(tmp_path, synthetic_cache, shared_tokenizer, mode):
    """The modes with their own parameters (maco's layout weight, the predictor head) under ZeRO-3 with two
    processes: the parameters are partitioned, gathered for the forward and their gradients reduced; the per-step
    losses (the integrity term included) equal one process's on the same global batch up to reduction order
    (tolerance as above). Mask ratio 0 keeps the masking out of it (its seeds depend on the rank), so the
    predictor's target is 1 and maco's layout is all kept, but both heads still train and are gathered."""
    mode_args = ("--sie-mode", mode, "--lambda-sie", "1")
    one_dir = seed_run_dir(tmp_path / "one", shared_tokenizer)
    train(base_args(write_ds(tmp_path / "ds1.json"), one_dir, synthetic_cache, *DETERMINISTIC, *mode_args))
    one = train_records(one_dir)
    run_dir = seed_run_dir(tmp_path / "run", shared_tokenizer)
    summary = _two_processes(tmp_path, run_dir, synthetic_cache, 3, *mode_args)
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3 and summary["model"]["sie_mode"] == mode
    two = train_records(run_dir)
    assert sorted(two) == sorted(one) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("loss", "loss_global", "loss_local", "loss_sie"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert any(one[step]["loss_sie"] != 0.0 for step in (1, 2, 3))  # the mode's term is in the comparison
    assert (run_dir / "export" / "model.safetensors").is_file()


def _two_processes(tmp_path, run_dir, synthetic_cache, stage: int, *extra: str) -> dict:
    """``deepspeed --num_gpus 2`` of ``DETERMINISTIC`` + ``extra`` under ZeRO ``stage``; its summary.json."""
    ds = write_ds(tmp_path / "ds.json", zero_optimization={"stage": stage})
    cmd = [str(REPO / ".venv" / "bin" / "deepspeed") if (REPO / ".venv" / "bin" / "deepspeed").exists() else "deepspeed",
           "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN_PY),
           *base_args(ds, run_dir, synthetic_cache, *DETERMINISTIC, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    return json.loads((run_dir / "summary.json").read_text())
