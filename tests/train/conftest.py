"""Shared pieces of the training-app tests: a tiny synthetic benchmark generated once, small DeepSpeed
configs, run helpers (in-process and through the launchers) and metric readers.

In-process runs call ``mlip_fast.train.main.train`` in this pytest process as a world of one (the app
sets RANK / WORLD_SIZE / MASTER_* when absent); subprocess runs get an environment without those
variables so that they start their own process group.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TRAIN_PY = REPO / "train.py"
SYNTH_N, SYNTH_SIZE = 48, 32
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")

BASE_DS = {
    "train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.05,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                       "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000000,
}


def write_ds(path: Path, **changes) -> Path:
    """A copy of BASE_DS with top-level ``changes`` (None deletes a key) written to ``path``."""
    config = json.loads(json.dumps(BASE_DS))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    return path


@pytest.fixture(scope="session")
def synthetic_cache(tmp_path_factory) -> Path:
    """Cache folder holding the tiny synthetic benchmark (48 images at 32 px) that every run uses."""
    from mlip_fast.train.data import prepare_synthetic

    cache = tmp_path_factory.mktemp("synthetic-cache")
    prepare_synthetic(cache, SYNTH_SIZE, SYNTH_N, seed=0, workers=1, log=lambda _: None)
    return cache


@pytest.fixture(scope="session")
def shared_tokenizer(tmp_path_factory, synthetic_cache) -> Path:
    """One tokenizer folder copied into runs that are compared with each other (WordPiece training is not
    bitwise reproducible across processes, so compared runs must share their tokenizer)."""
    from mlip_fast.data.pretrain import PretrainDataset
    from mlip_fast.models import get_tokenizer
    from mlip_fast.train.data import synthetic_cache_dir

    master = synthetic_cache_dir(synthetic_cache, SYNTH_SIZE, SYNTH_N, 0) / "master.csv"
    reports = [r["report"] for r in PretrainDataset(master, split="train").records]
    folder = tmp_path_factory.mktemp("shared-tokenizer") / "tokenizer"
    get_tokenizer("mlip-tiny", corpus=reports).save_pretrained(str(folder))
    return folder


# No masking and no dropout: the only model randomness that depends on the rank and the micro-batch layout
# (augmentation is seeded per sample, and each step's global batch does not depend on the layout).
DETERMINISTIC = ("--steps", "3", "--no-final-eval", "--mask-ratio", "0", "--model-overrides",
                 '{"text": {"dropout": 0.0}}')


@pytest.fixture(scope="session")
def one_process_reference(tmp_path_factory, synthetic_cache, shared_tokenizer) -> dict:
    """{step: record} of a one-process run with the global batch of 8 in one micro-batch, ``DETERMINISTIC``,
    fp32, ZeRO-2: what other layouts of the same global batch (more processes, accumulation) must match."""
    from mlip_fast.train.main import train

    tmp = tmp_path_factory.mktemp("one-process")
    run_dir = seed_run_dir(tmp / "run", shared_tokenizer)
    train(base_args(write_ds(tmp / "ds.json"), run_dir, synthetic_cache, *DETERMINISTIC))
    return train_records(run_dir)


def seed_run_dir(run_dir: Path, tokenizer: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copytree(tokenizer, run_dir / "tokenizer")
    return run_dir


def base_args(ds: Path, out: Path, cache: Path, *extra: str) -> list:
    return ["--deepspeed_config", str(ds), "--output-dir", str(out), "--cache-dir", str(cache),
            "--synthetic-n", str(SYNTH_N), "--image-size", str(SYNTH_SIZE), "--num-workers", "0", "--no-progress",
            "--eval-every", "0", *extra]


def train_records(run_dir: Path) -> dict:
    """{step: record} of the "train" lines of a run's metrics.jsonl (the last record per step)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            out[record["step"]] = record
    return out


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run_subprocess(cmd: list, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=timeout, **popen)
