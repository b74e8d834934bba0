"""The command line: every task writes summary.json and its plots; bad input gives a clear error."""
import csv
import json
import shutil

import pytest

from mlip_fast.eval.__main__ import main


def _run(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "task,extra,plots",
    [
        ("zeroshot", ["--classes", "Cardiomegaly", "Pleural Effusion", "--split", "train"], ["roc_curves.png"]),
        ("retrieval", [], ["retrieval.png"]),
        ("localisation", ["--examples", "4"], ["localisation_overlays.png"]),
        ("fewshot", ["--fractions", "0.5", "1.0", "--epochs", "1", "--linear-steps", "20",
                     "--classes", "Cardiomegaly", "Edema", "--split", "valid", "--batch-size", "16"], ["fewshot_auc.png"]),
        ("segmentation", ["--fractions", "0.5", "--epochs", "1", "--examples", "2"],
         ["segmentation_overlays.png", "segmentation_dice.png"]),
    ],
)
def test_cli_tasks(task, extra, plots, tiny_checkpoint, synth_dir, tmp_path, capsys):
    out = tmp_path / task
    code, stdout, stderr = _run(capsys, task, "--checkpoint", tiny_checkpoint, "--data", synth_dir, "--out", out,
                                "--seed", 3, "--device", "cpu", *extra)
    assert code == 0, stderr
    assert f"summary: {out / 'summary.json'}" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == task and summary["seed"] == 3 and summary["data"]["kind"] == "synthetic"
    assert summary["checkpoint"] == str(tiny_checkpoint.resolve()) and summary["wall_time_s"] > 0
    assert {"torch", "numpy", "mlip_fast", "python"} <= set(summary["versions"])
    assert summary["plots"] == plots
    for name in plots:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if task in ("fewshot", "segmentation"):
        assert any((out / "splits").iterdir())


def test_cli_bad_checkpoints(synth_dir, tmp_path, capsys):
    not_a_model = tmp_path / "random_dir"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("hello")
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", not_a_model, "--data", synth_dir, "--out", tmp_path / "o")
    assert code == 2 and "not an MLIP checkpoint" in err and "notes.txt" in err
    engine = tmp_path / "engine"
    (engine / "global_step10").mkdir(parents=True)
    (engine / "latest").write_text("global_step10")
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", engine, "--data", synth_dir, "--out", tmp_path / "o")
    assert code == 2 and "DeepSpeed engine checkpoint" in err and "save_pretrained" in err
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tmp_path / "missing", "--data", synth_dir, "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err


def test_cli_bad_data(tiny_checkpoint, synth_dir, tmp_path, capsys):
    # A dataset without labels for a labelled task: image + mask pairs carry no class labels.
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for p in sorted((synth_dir / "images").iterdir())[:6]:
        (images / p.name).write_bytes(p.read_bytes())
        (masks / p.name).write_bytes(p.read_bytes())
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", images, "--masks", masks,
                        "--dataset", "masks", "--prompts", "synthetic", "--out", tmp_path / "o")
    assert code == 2 and "needs labels" in err
    # An empty class: no positive of that label in the evaluated split.
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", synth_dir, "--out", tmp_path / "o",
                        "--max-samples", "1", "--classes", "Edema")
    assert code == 2 and "'Edema' has" in err and "AUC needs both" in err
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", synth_dir, "--out", tmp_path / "o",
                        "--split", "nope")
    assert code == 2 and "no row in split 'nope'" in err
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", tmp_path / "nothing",
                        "--out", tmp_path / "o")
    assert code == 2 and "does not exist" in err


def test_cli_image_folder(tiny_checkpoint, synth_dir, tmp_path, capsys):
    """Any labelled set in class sub-folders can be scored with a prompt file naming its classes."""
    import csv

    root = tmp_path / "folders"
    with open(synth_dir / "master.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for cls in ("Cardiomegaly", "Pneumothorax"):
        (root / cls).mkdir(parents=True)
        for r in [r for r in rows if r[cls] == "1"][:5]:
            src = synth_dir / r["image_path"]
            (root / cls / src.name).write_bytes(src.read_bytes())
    out = tmp_path / "zs"
    code, stdout, stderr = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", root, "--out", out,
                                "--prompts", "synthetic", "--classes", "Cardiomegaly", "Pneumothorax", "--skip-empty")
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"]["kind"] == "image-folder" and summary["data"]["n_test"] <= 10
    assert set(summary["metrics"]["global"]["classes"]) == {"Cardiomegaly", "Pneumothorax"}
    code, _, err = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", root, "--out", out)
    assert code == 2 and "--prompts is required" in err


def test_cli_max_bad_fraction(tiny_checkpoint, synth_dir, tmp_path, capsys):
    """One corrupt image among the 24 of the train split: over the default 1% the run stops, naming the file
    and the fraction that would accept it (exit 2, no traceback); with --max-bad-fraction the image is left
    out of the metrics and named in summary.json."""
    data = tmp_path / "synth"
    shutil.copytree(synth_dir, data)
    with open(data / "master.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    assert len(rows) == 24
    broken = data / rows[5]["image_path"]
    broken.write_bytes(broken.read_bytes()[:40])
    argv = ["zeroshot", "--checkpoint", tiny_checkpoint, "--data", data, "--split", "train", "--classes", "Cardiomegaly",
            "Pleural Effusion", "--skip-empty"]
    code, _, err = _run(capsys, *argv, "--out", tmp_path / "strict")
    assert code == 2 and "Traceback" not in err
    assert f"evaluated set: 1 of 24 samples cannot be read (4.17% > --max-bad-fraction 0.01): {broken}: corrupt" in err
    assert "pass --max-bad-fraction 0.05 to evaluate without them" in err
    code, _, err = _run(capsys, *argv, "--out", tmp_path / "lenient", "--max-bad-fraction", "0.05")
    assert code == 0, err
    summary = json.loads((tmp_path / "lenient" / "summary.json").read_text())
    assert summary["data"]["n_test"] == 23
    [skipped] = summary["data"]["skipped"]["test"]
    assert skipped["source"] == str(broken) and skipped["reason"].startswith("corrupt or truncated PNG data")
    assert f"left out 1 unreadable sample(s): {broken}" in err
