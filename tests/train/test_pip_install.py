"""A pip user's training: the wheel built from the working tree, installed into a fresh virtual environment,
runs ``mlip-train`` (the console script, through the DeepSpeed launcher and ``python -m mlip_fast.train``)
on the synthetic benchmark for a few steps, from a folder that is not the source checkout, with a shipped
ds config named on the command line and the open_clip-style flags.

The environment reuses the test environment's installed packages (torch, deepspeed, ...) through a .pth
file pointing at a folder of links to them, leaving out this repository's own development install, so that
``import mlip_fast`` can only find the wheel; nothing is downloaded."""
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mlip_fast.models import MLIP, create_model
from tests.train.conftest import REPO, SYNTH_N, SYNTH_SIZE, clean_env
from tests.process_group import free_port

pytestmark = pytest.mark.slow

# what a checkout holds besides the sources (environments, caches, run outputs, builds)
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "runs", ".cache", "*.egg-info", "__pycache__",
                                     ".pytest_cache", ".benchmarks")


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the working tree (the build writes nothing into the checkout)."""
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES, symlinks=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return next((tmp / "dist").glob("mlip_fast-*.whl"))


def fresh_venv(tmp: Path, without: tuple = ()) -> Path:
    """A virtual environment (no pip of its own) that sees this environment's packages except mlip_fast and the
    distributions named in ``without`` (their import packages and their metadata)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    shared = tmp / "shared-site-packages"
    shared.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        left_out = ("mlip_fast", "__editable__", "_mlip_fast", *without)
        if not entry.name.lower().startswith(left_out) and entry.suffix != ".pth":
            (shared / entry.name).symlink_to(entry)
    (purelib / "test-environment-packages.pth").write_text(f"{shared}\n")
    return python


def test_wheel_in_a_fresh_venv_trains_with_mlip_train(tmp_path, synthetic_cache):
    wheel = build_wheel(tmp_path)
    python = fresh_venv(tmp_path)
    env = clean_env()
    env.pop("PYTHONPATH", None)
    install = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                             capture_output=True, text=True, env=env, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    work = tmp_path / "elsewhere"  # not the checkout: nothing but the wheel can provide mlip_fast
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import mlip_fast, mlip_fast.kernels; print(mlip_fast.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env, check=True).stdout
    assert where.startswith(str(python.parent.parent)), where
    mlip_train = python.parent / "mlip-train"

    bad = subprocess.run([str(mlip_train), "--deepspeed_config", "zero2_fp32", "--model", "nope"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "unknown model 'nope'" in lines[0], bad.stderr

    run = work / "run"
    proc = subprocess.run(
        [str(mlip_train), "--master_port", str(free_port()), "--deepspeed_config", "zero2_fp32", "--batch-size", "8",
         "--precision", "fp32", "--wd", "0.1", "--warmup", "2", "--lock-text", "--steps", "3",
         "--synthetic-n", str(SYNTH_N), "--image-size", str(SYNTH_SIZE), "--cache-dir", str(synthetic_cache),
         "--output-dir", str(run), "--num-workers", "0", "--eval-every", "0", "--no-progress"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["micro_batch"] == 8
    assert summary["ds_config"]["optimizer"]["params"]["weight_decay"] == 0.1
    assert summary["ds_config"]["scheduler"]["params"]["warmup_num_steps"] == 2
    log = (run / "run.log").read_text()
    assert "train_micro_batch_size_per_gpu: unset -> 8" in log and "locked text tower" in log

    # the export: a Hub-layout checkpoint whose model card holds this run's numbers with their chance rates
    card = (run / "export" / "README.md").read_text()
    loc = summary["localisation_test"]
    assert "| steps | 3 |" in card and "| precision | float32 |" in card
    assert (f"| localisation pointing accuracy ({loc['n_sentences']} finding sentences) | "
            f"{loc['pointing_accuracy']:.3f} | {loc['chance']:.3f} |") in card
    assert f"| zero-shot AUC, macro ({summary['zero_shot_test']['n_images']} images) |" in card
    exported = MLIP.from_pretrained(run / "export")
    # --lock-text: the report encoder is exactly its seeded initialisation; the image tower trained
    torch.manual_seed(summary["seed"])
    initial = create_model(exported.config, tokenizer=exported.tokenizer)
    for (name, a), b in zip(exported.text.state_dict().items(), initial.text.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(exported.visual.blocks[0].attn.qkv.weight, initial.visual.blocks[0].attn.qkv.weight)
