"""One-process training runs in this pytest process: outputs, export, exact resume, bad configs and
checkpoints, non-finite loss."""
import json
import math
import shutil

import pytest
import torch

from mlip_fast.ops.varlen_attention import status as packed_attention_status
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train.ds_config import DSConfigError
from mlip_fast.train.args import SYNTHETIC_PRESET
from mlip_fast.train.main import train
from mlip_fast.train.run import param_groups
from tests.train.conftest import base_args, seed_run_dir, train_records, write_ds


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, synthetic_cache):
    """4 steps of ZeRO-2 fp32 with a validation pass at step 2, checkpoints at steps 2 and 4, the final
    export and evaluation."""
    tmp = tmp_path_factory.mktemp("run")
    ds = write_ds(tmp / "ds.json")
    run_dir = tmp / "run"
    summary = train(base_args(ds, run_dir, synthetic_cache, "--steps", "4", "--eval-every", "2", "--save-every", "2",
                              "--keep-checkpoints", "0"))
    return summary, run_dir, ds


def test_run_writes_its_outputs(finished_run):
    summary, run_dir, _ = finished_run
    assert summary["status"] == "completed" and summary["steps"] == 4
    assert (summary["world_size"], summary["zero_stage"], summary["dtype"]) == (1, 2, "float32")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 4

    records = train_records(run_dir)
    assert sorted(records) == [1, 2, 3, 4]
    # The synthetic preset's loss weights: L = L_g + lambda_local L_l + lambda_sie L_sie
    lam_l, lam_s = SYNTHETIC_PRESET["lambda_local"], 0.1
    assert (summary["args"]["lambda_local"], summary["args"]["lambda_sie"]) == (lam_l, lam_s)
    for r in records.values():
        terms = [r[k] for k in ("loss", "loss_global", "loss_local", "loss_sie")]
        assert all(math.isfinite(t) for t in terms)
        assert r["loss"] == pytest.approx(r["loss_global"] + lam_l * r["loss_local"] + lam_s * r["loss_sie"], rel=1e-5)
        assert r["samples_per_s"] > 0 and 0 <= r["lr"] <= 1e-3
    assert records[1]["lr"] == 0.0 and records[4]["lr"] > 0  # DeepSpeed's linear warm-up starts at 0
    assert summary["final_loss"] == pytest.approx({k: records[4][k] for k in summary["final_loss"]})

    root = run_dir / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000004"
    assert (root / "step00000002").is_dir() and (root / "step00000004").is_dir()
    assert summary["checkpoint"] == str(root / "step00000004")
    assert {"config.json", "model.safetensors"} <= {p.name for p in (run_dir / "export").iterdir()}
    assert (run_dir / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    log = (run_dir / "run.log").read_text()
    assert "attention backend: ViT sdpa" in log and "patch_sentence_scores chunked (cpu, float32)" in log
    assert summary["backends"]["ops"]["patch_sentence_scores"] == {"impl": "chunked", "device": "cpu", "dtype": "float32"}
    zs = summary["zero_shot_test"]
    if zs is not None:  # the 5-image test split may lack positives of every class
        assert 0.0 <= zs["auc_macro"] <= 1.0
    loc = summary["localisation_test"]
    assert 0.0 <= loc["pointing_accuracy"] <= 1.0 and 0.0 < loc["chance"] < 1.0


def test_export_matches_the_engine_model(finished_run):
    """The exported folder, loaded without DeepSpeed, embeds exactly as the engine restored from the final
    checkpoint."""
    import deepspeed

    from mlip_fast.models import MLIPConfig, create_model, from_pretrained
    from mlip_fast.preprocess.tokenization import load_tokenizer

    summary, run_dir, _ = finished_run
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    model = create_model(MLIPConfig.from_dict(summary["model"]), tokenizer=tokenizer)
    config = dict(summary["ds_config"])
    weight_decay = config["optimizer"]["params"]["weight_decay"]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model, weight_decay),
                                           config=config)
    path, _ = engine.load_checkpoint(str(run_dir / "checkpoints"), tag="step00000004")
    assert path is not None
    exported = from_pretrained(run_dir / "export")
    engine.module.eval()
    images = torch.randn(3, 1, 32, 32)
    texts = ["Heart size is normal. No pleural effusion.", "Small left pleural effusion.", "Lungs are clear."]
    with torch.no_grad():
        a_img, b_img = engine.module.encode_image_local(images), exported.encode_image_local(images)
        a_txt, b_txt = engine.module.encode_text_local(texts), exported.encode_text_local(texts)
    for key in ("image_global", "patches"):
        torch.testing.assert_close(b_img[key], a_img[key], rtol=0, atol=0)
    for key in ("text_global", "sentences"):
        torch.testing.assert_close(b_txt[key], a_txt[key], rtol=0, atol=0)
    # and the weights really are the trained ones, not a fresh initialisation
    fresh = create_model(MLIPConfig.from_dict(summary["model"]), tokenizer=tokenizer)
    assert not torch.equal(fresh.image_projection.net.weight, exported.image_projection.net.weight)


def test_resume_continues_exactly(tmp_path, synthetic_cache, shared_tokenizer):
    """Steps 4-6 after resuming from the step-3 checkpoint have the losses of steps 4-6 of the uninterrupted
    run, bitwise (fp32; masking, dropout, augmentation and gradient accumulation all active)."""
    ds = write_ds(tmp_path / "ds.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                  gradient_accumulation_steps=2)
    common = ["--steps", "6", "--no-final-eval", "--num-workers", "1"]
    full = seed_run_dir(tmp_path / "full", shared_tokenizer)
    train(base_args(ds, full, synthetic_cache, *common, "--save-every", "3", "--keep-checkpoints", "0"))
    resumed = tmp_path / "resumed"
    summary = train(base_args(ds, resumed, synthetic_cache, *common,
                              "--resume", str(full / "checkpoints" / "step00000003")))
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
    a, b = train_records(full), train_records(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in (4, 5, 6):
        for key in ("loss", "loss_global", "loss_local", "loss_sie", "lr"):
            assert b[step][key] == a[step][key], (step, key)
    assert a[4]["loss"] != a[5]["loss"]


@pytest.mark.parametrize("changes, match", [
    ({"train_batch_sise": 8}, "unknown top-level key 'train_batch_sise'"),
    ({"fp16": {"enabled": True}}, "fp16 is enabled but this run is on cpu"),
    ({"zero_optimization": {"stage": 0}}, "stage must be 1, 2 or 3"),
    ({"train_batch_size": 9, "train_micro_batch_size_per_gpu": 2}, r"train_batch_size \(9\) != train_micro"),
])
def test_bad_ds_config_fails_before_training(tmp_path, synthetic_cache, changes, match):
    ds = write_ds(tmp_path / "ds.json", **changes)
    with pytest.raises(DSConfigError, match=match):
        train(base_args(ds, tmp_path / "run", synthetic_cache, "--steps", "2"))
    assert not (tmp_path / "run").exists()  # nothing was started


def test_tensorboard_without_the_package_is_refused_up_front(tmp_path, synthetic_cache):
    try:
        import tensorboard  # noqa: F401
        pytest.skip("tensorboard is installed here")
    except ImportError:
        pass
    ds = write_ds(tmp_path / "ds.json")
    with pytest.raises(DSConfigError, match="tensorboard is not installed"):
        train(base_args(ds, tmp_path / "run", synthetic_cache, "--steps", "2", "--tensorboard"))
    assert not (tmp_path / "run").exists()


def _copy_checkpoints(finished_run, tmp_path):
    _, run_dir, ds = finished_run
    root = tmp_path / "copy" / "checkpoints"
    shutil.copytree(run_dir / "checkpoints", root)
    return root, ds


@pytest.mark.parametrize("damage, match", [
    ("absent", "does not exist"),
    ("no_latest", "no 'latest' file"),
    ("truncated_model_states", r"has \d+ bytes, .*manifest.json says \d+: it was truncated"),
    ("missing_optimizer_shard", r"optim_states.pt is missing \(listed in"),
    ("empty_latest", "is empty"),
])
def test_bad_checkpoint_gives_a_clear_error(finished_run, tmp_path, synthetic_cache, damage, match):
    """A checkpoint named by its own folder must pass every check (no fallback to another one)."""
    root, ds = _copy_checkpoints(finished_run, tmp_path)
    target = root / "step00000004"
    if damage == "absent":
        target = tmp_path / "nowhere"
    elif damage == "no_latest":
        (root / "latest").unlink()
        shutil.rmtree(root / "step00000002")
        shutil.rmtree(root / "step00000004")
        target = root
    elif damage == "truncated_model_states":
        f = root / "step00000004" / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[:100])
    elif damage == "missing_optimizer_shard":
        for f in (root / "step00000004").glob("*optim_states.pt"):
            f.unlink()
    elif damage == "empty_latest":
        (root / "latest").write_text("")
        target = root
    with pytest.raises(ckpt.CheckpointError, match=match):
        train(base_args(ds, tmp_path / "resumed", synthetic_cache, "--steps", "6", "--resume", str(target)))


def _flip_bytes(path, at: float = 0.6, n: int = 4) -> None:
    """Inverts ``n`` bytes at fraction ``at`` of the file (inside the tensor data of a torch zip file)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + n] = bytes(b ^ 0xFF for b in data[start:start + n])
    path.write_bytes(bytes(data))


def test_flipped_tensor_bytes_are_named_and_latest_falls_back_loudly(finished_run, tmp_path, synthetic_cache):
    """Flipped bytes in the optimizer moments of the newest checkpoint used to load silently (weights up to 2e28
    saved as the next ``latest``): the SHA-256 manifest names the file, ``--resume latest`` continues from the
    previous checkpoint with a warning (the rejected one set aside), and the checkpoint named by its folder is
    refused."""
    _, src, ds = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    root = run_dir / "checkpoints"
    optim = next((root / "step00000004").glob("*optim_states.pt"))
    _flip_bytes(optim)
    with pytest.raises(ckpt.CheckpointError, match=rf"{optim} does not match its SHA-256"):
        train(base_args(ds, tmp_path / "other", synthetic_cache, "--steps", "5", "--resume", str(optim.parent)))
    summary = train(base_args(ds, run_dir, synthetic_cache, "--steps", "5", "--no-final-eval", "--resume", "latest"))
    assert summary["resumed_from_step"] == 2 and summary["steps"] == 5
    log = (run_dir / "run.log").read_text()
    assert f"checkpoint rejected: checkpoint file {optim} does not match its SHA-256" in log
    assert "resuming from the newest checkpoint that verifies instead" in log
    assert [p.name.split(".")[0] for p in root.iterdir() if ".superseded-" in p.name] == ["step00000004"]
    assert (root / "latest").read_text() == "step00000005"
    assert ckpt.verify_checkpoint(root, "step00000005", world_size=1, zero_stage=2)["step"] == 5


def test_ot_matching_run_records_it_and_evaluates_with_it(tmp_path, synthetic_cache):
    from mlip_fast.models import from_pretrained

    summary = train(base_args(write_ds(tmp_path / "ds.json"), tmp_path / "run", synthetic_cache, "--steps", "2",
                              "--local-matching", "ot", "--ot-eps", "0.1", "--ot-iters", "10"))
    assert summary["loss"]["local_matching"] == "ot" and (summary["loss"]["ot_eps"], summary["loss"]["ot_iters"]) == (0.1, 10)
    assert summary["model"]["local_matching"] == "ot"
    assert summary["backends"]["ops"]["patch_sentence_ot_scores"]["impl"] == "chunked"
    # the report tower's attention with dropout in training on CPU: the packed C kernel where it builds
    assert summary["backends"]["text_attention"] == f"sdpa; training with dropout: {packed_attention_status()}"
    records = train_records(tmp_path / "run")
    assert all(math.isfinite(r["loss_local"]) and r["loss_local"] > 0 for r in records.values())
    assert summary["localisation_test"]["local_matching"] == "ot"
    assert from_pretrained(summary["export"]).config.local_matching == "ot"
    assert "entropic optimal transport, eps 0.1, 10 Sinkhorn iterations" in (tmp_path / "run" / "export" / "README.md").read_text()
