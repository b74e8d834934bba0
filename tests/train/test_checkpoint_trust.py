"""Files as untrusted input, one process in this pytest process: no load path runs code from a file (resume,
DeepSpeed's own loader, the consolidated export, --pretrained, the eval CLI, from_pretrained, a text tower
folder); a NaN never costs a good checkpoint; skipped optimizer steps stop a run; a run folder without a
checkpoint restarts with --resume latest; a full disk during a save is one line; a data failure mid-run
checkpoints what was trained and leaves no DataLoader worker behind."""
import errno
import json
import os
import pickle
import shutil

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from transformers import BertConfig

from mlip_fast.data.readers import DatasetError
from mlip_fast.eval.__main__ import main as eval_main
from mlip_fast.models import create_model, from_pretrained
from mlip_fast.models.config import ConfigError
from mlip_fast.models.hub import CheckpointError as ModelCheckpointError
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import ds_config as dsc
from mlip_fast.train import run as train_run
from mlip_fast.train.checkpoint_files import load_weights_only, write_manifest
from mlip_fast.train.checkpoint_save import export_consolidated
from mlip_fast.train.data import GlobalBatchSampler, synthetic_cache_dir
from mlip_fast.train.loop import NonFiniteLossError
from mlip_fast.train.main import train, usage_errors
from mlip_fast.train.process import init_distributed
from mlip_fast.train.reporting import read_metrics
from tests.train.conftest import SYNTH_N, SYNTH_SIZE, base_args, train_records, write_ds


class Payload:
    """What a hostile file holds: unpickling it creates ``path`` (a shell command in a real attack)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_cache):
    """A finished 4-step run with checkpoints at steps 2 and 4 and its export."""
    tmp = tmp_path_factory.mktemp("trust")
    ds = write_ds(tmp / "ds.json")
    run_dir = tmp / "run"
    train(base_args(ds, run_dir, synthetic_cache, "--steps", "4", "--save-every", "2", "--keep-checkpoints", "0",
                    "--no-final-eval"))
    return run_dir, ds


def _plant(file, marker) -> None:
    """Adds the payload to a checkpoint file and rewrites its folder's manifest, as an attacker who can write
    the folder would (the manifest proves integrity, not authorship)."""
    state = load_weights_only(file)
    state["payload"] = Payload(marker)
    torch.save(state, file)
    write_manifest(file.parent)


def _tiny_engine():
    import deepspeed

    init_distributed()
    model = torch.nn.Linear(2, 2)
    config = {"train_batch_size": 1, "zero_optimization": {"stage": 2}, "steps_per_print": 10 ** 6,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    return deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)[0]


def test_no_load_path_runs_code_from_a_file(finished, tmp_path, synthetic_cache, capsys):
    """The payload planted in each file a user can point the project at; it never runs, and each refusal is one
    line naming the file (the old resume unpickled the model states with weights_only=False, running it)."""
    src, ds = finished
    marker = tmp_path / "payload-ran"
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        root = tmp_path / name / "checkpoints"
        shutil.copytree(src / "checkpoints", root)
        _plant(root / "step00000004" / name, marker)
        with pytest.raises(ckpt.CheckpointError, match=rf"{name} was refused: it asks to run \w+\.open"):
            train(base_args(ds, tmp_path / f"resumed-{name}", synthetic_cache, "--steps", "5",
                            "--resume", str(root / "step00000004")))
        assert not marker.exists()

    # DeepSpeed's own loader and its consolidation script, reached without the verification in front of them
    root = tmp_path / "mp_rank_00_model_states.pt" / "checkpoints"
    with pytest.raises(ckpt.CheckpointError, match="was refused"):
        ckpt.load_checkpoint(_tiny_engine(), root, "step00000004")
    with pytest.raises(ckpt.CheckpointError, match="was refused"):
        export_consolidated(root, "step00000004", torch.nn.Linear(2, 2), tmp_path / "export")
    assert not marker.exists()

    vit = tmp_path / "vit.pth"
    torch.save({"patch_embed.proj.weight": Payload(marker)}, vit)
    with pytest.raises(ConfigError, match=rf"a weights file of the model \(--pretrained {vit}\) was refused: it asks "
                                          rf"to run \w+\.open"):
        train(base_args(ds, tmp_path / "pretrained", synthetic_cache, "--steps", "2", "--pretrained", str(vit)))
    assert not marker.exists()

    export = tmp_path / "export-copy"
    shutil.copytree(src / "export", export)
    torch.save({"w": Payload(marker)}, export / "model.safetensors")
    with pytest.raises(ModelCheckpointError, match="model.safetensors is not a readable safetensors file"):
        from_pretrained(export)
    capsys.readouterr()
    data = synthetic_cache_dir(synthetic_cache, SYNTH_SIZE, SYNTH_N, 0)
    code = eval_main(["zeroshot", "--checkpoint", str(export), "--data", str(data), "--out", str(tmp_path / "eval"),
                      "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.safetensors is not a readable safetensors file" in err[0], err
    assert not marker.exists()

    bert = tmp_path / "text-tower"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               vocab_size=100).save_pretrained(bert)
    torch.save({"embeddings.word_embeddings.weight": Payload(marker)}, bert / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError):
        create_model("mlip-tiny", text={"source": "hf", "name": str(bert)})
    assert not marker.exists()


def test_a_nan_keeps_the_last_good_checkpoint_with_keep_1(tmp_path, synthetic_cache, monkeypatch):
    """The probe's schedule: the rate jumps from 1e-3 to 1e6 at step 9, the loss is NaN at step 10. The run stops
    (exit 3) without saving the state after step 9 and without pruning: with --keep-checkpoints 1, ``latest``
    still names step 8, which verifies (before, step 9 was saved as "the last good state" and pruned step 8)."""
    monkeypatch.setattr(dsc, "MAX_LR", 1e12)  # the range check would refuse this schedule up front
    ds = write_ds(tmp_path / "ds.json", scheduler={"type": "LRRangeTest", "params": {
        "lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 8, "lr_range_test_step_rate": 1e9,
        "lr_range_test_staircase": True}})
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 10 .*the run stopped without saving this "
                                                 r"state, and the newest checkpoint \(.*step00000008\) is the last good"):
        train(base_args(ds, run_dir, synthetic_cache, "--steps", "16", "--save-every", "4", "--keep-checkpoints", "1",
                        "--no-final-eval"))
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step00000008"
    assert sorted(p.name for p in root.iterdir() if ckpt.step_of(p.name) is not None) == ["step00000008"]
    assert ckpt.verify_checkpoint(root, "step00000008", world_size=1, zero_stage=2)["step"] == 8
    manifest = json.loads((root / "step00000008" / "manifest.json").read_text())
    assert all(np.isfinite(v) for v in manifest["loss"].values())
    assert [r["event"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "event"][-1] == "non_finite_loss"


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


def test_non_finite_gradients_stop_the_run_and_a_folder_without_checkpoint_restarts(tmp_path, synthetic_cache,
                                                                                    monkeypatch):
    """A NaN only in the backward from step 3 (the loss stays finite): DeepSpeed skips every update; the skips are
    counted and the fourth in a row stops the run (exit 3) instead of ending "completed" with nothing trained.
    That run stopped before its first checkpoint, so ``--resume latest`` starts it again from scratch, saying so,
    instead of refusing the folder both with and without --resume."""
    forwards = []

    def poisoned(*args, **kwargs):
        model = create_model(*args, **kwargs)

        def hook(module, inputs, output):
            forwards.append(1)
            return _NaNGradient.apply(output) if len(forwards) >= 3 else output

        model.image_projection.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_run, "create_model", poisoned)
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    args = base_args(ds, run_dir, synthetic_cache, "--steps", "8", "--save-every", "0", "--no-final-eval")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradients under a finite loss: the optimizer skipped "
                                                 r"steps 3 to 6 \(4 in a row, more than 3\).*newest checkpoint \(none"):
        train(args)
    records = train_records(run_dir)
    assert [records[s]["skipped_steps"] for s in sorted(records)] == [0, 0, 1, 2, 3, 4]
    assert not (run_dir / "checkpoints" / "latest").exists()

    monkeypatch.undo()
    summary = train(args + ["--resume", "latest"])
    assert summary["steps"] == 8 and summary["resumed_from_step"] is None and summary["skipped_steps"] == 0
    assert sorted(train_records(run_dir)) == list(range(1, 9))
    assert "has no checkpoint (its run stopped before the first one); starting that run again from scratch" in \
        (run_dir / "run.log").read_text()


def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, synthetic_cache,
                                                                             monkeypatch):
    """ENOSPC while the step-4 checkpoint is written: one line naming the folder and the space a checkpoint
    takes, the partial folder removed, ``latest`` still step 2. The resume on the still-full disk (full as long
    as a killed save's leftover holds the space) removes the leftover before it writes anything."""
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "step00000004" in str(f):
            with open(f, "wb") as out:
                out.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    args = base_args(ds, run_dir, synthetic_cache, "--steps", "4", "--save-every", "2", "--no-final-eval")
    with pytest.raises(ckpt.DiskFullError) as info:
        train(args)
    message = str(info.value)
    root = run_dir / "checkpoints"
    assert isinstance(info.value, usage_errors()) and "\n" not in message  # main: "error: <message>", exit 2
    assert message.startswith(f"no space left on the filesystem of {root} while saving checkpoint step00000004: a "
                              f"checkpoint of this run takes about ")
    assert f"the previous checkpoint {root / 'step00000002'} is intact" in message
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step00000002", "zero_to_fp32.py"]
    assert (root / "latest").read_text() == "step00000002"
    monkeypatch.undo()

    leftover = root / ".partial-step00000004" / "step00000004"
    leftover.mkdir(parents=True)
    (leftover / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 4096)
    real_pwrite = os.pwrite

    def pwrite_while_full(fd, data, offset):
        if (root / ".partial-step00000004").exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite_while_full)  # the run lock's record: the first thing a run writes
    summary = train(args + ["--resume", "latest"])
    assert summary["resumed_from_step"] == 2 and (root / "latest").read_text() == "step00000004"


def _manifest_with_missing_images(folder, missing_step: int, seed: int = 0) -> tuple:
    """A CSV manifest of 96 32-px PNGs whose images of the global batch of step ``missing_step`` (1-based, in the
    app's data order for ``seed``) are missing: the third missing image read crosses 2.5% (--max-bad-fraction)."""
    (folder / "img").mkdir(parents=True)
    order = iter(GlobalBatchSampler(96, 8, 1, 0, 1, seed))
    batches = [[i for i, _ in next(order)] for _ in range(missing_step)]
    missing = set(batches[-1][:3])
    lines = ["image,report"]
    for k in range(96):
        if k not in missing:
            pixels = np.random.default_rng(k).integers(0, 256, (32, 32), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "img" / f"{k}.png")
        lines.append(f"img/{k}.png,Heart size normal {k}. No effusion.")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv", sorted(missing)


def test_a_data_failure_mid_run_checkpoints_and_leaves_no_worker(tmp_path):
    """Too many unreadable images at step 3, read by 2 DataLoader workers: the 2 steps trained are checkpointed
    (they were discarded), the error names every bad file in one line, and no worker outlives the run (two used
    to live on under pid 1, ignoring SIGTERM and holding the rendezvous port)."""
    manifest, missing = _manifest_with_missing_images(tmp_path / "data", missing_step=3)
    ds = write_ds(tmp_path / "ds.json")
    run_dir = tmp_path / "run"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(DatasetError) as info:
        train(["--deepspeed_config", str(ds), "--output-dir", str(run_dir), "--data", str(manifest), "--num-workers",
               "2", "--no-progress", "--image-size", "32", "--steps", "10", "--max-bad-fraction", "0.025",
               "--no-final-eval"])
    message = str(info.value)
    assert "\n" not in message and "3 of 96 items are bad" in message
    assert all(str(manifest.parent / "img" / f"{k}.png") in message for k in missing)
    assert message.endswith(f"the 2 step(s) trained are saved in {run_dir / 'checkpoints' / 'step00000002'}: fix the "
                            f"data (or raise --max-bad-fraction), then continue with --resume latest")
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000002"
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
