"""Image-folder evaluation on the real covid chest X-rays (../shared/data, read in place through links), laid out
as users lay out folders: split folders (train/, TEST/: any case) are recognised and scored as the split asked
for; a class folder is scored whole; --train-data / --test-data name two folders; the classes and counts are
printed before the model loads; and every ambiguous layout (the issue's test/ + train_subset/, splits under other
names, an empty class, classes that differ) is refused in one line with exit 2 before the checkpoint is read."""
import csv
import json
import os
from pathlib import Path

import pytest

from mlip_fast.eval.__main__ import main
from tests.paths import COVID_CXR

NO_CHECKPOINT = "/no/such/checkpoint"  # the layout checks must come before the model is read


def _images(finding: str, n: int) -> list[Path]:
    """The ``n`` smallest frontal X-ray files with ``finding`` (quick to decode)."""
    with open(COVID_CXR / "metadata.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["finding"] == finding and r["modality"] == "X-ray"
                and r["view"] in ("PA", "AP") and (COVID_CXR / "images" / r["filename"]).is_file()]
    paths = sorted({COVID_CXR / "images" / r["filename"] for r in rows}, key=lambda p: (p.stat().st_size, p.name))
    if len(paths) < n:
        pytest.skip(f"fewer than {n} {finding} images under {COVID_CXR}")
    return paths[:n]


def _link(folder: Path, images) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in images:
        os.symlink(path, folder / path.name)


@pytest.fixture(scope="module")
def covid_folders(tmp_path_factory):
    """root/train/{NORMAL,PNEUMONIA} (4 + 4) and root/TEST/{NORMAL,PNEUMONIA} (3 + 3) of real X-rays."""
    normal, pneumonia = _images("No Finding", 7), _images("COVID-19", 7)
    root = tmp_path_factory.mktemp("covid-folders") / "chest_xray"
    for split, part in (("train", slice(0, 4)), ("TEST", slice(4, 7))):
        _link(root / split / "NORMAL", normal[part])
        _link(root / split / "PNEUMONIA", pneumonia[part])
    return root


def _run(capsys, *argv):
    code = main([*map(str, argv), "--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_split_folders_are_recognised_and_scored_as_asked(covid_folders, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "zs"
    code, stdout, stderr = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", covid_folders,
                                "--out", out, "--prompts", "rsna_pneumonia")
    assert code == 0, stderr
    assert stdout.splitlines()[0] == (f"data: {covid_folders}: split folders train (train/), test (TEST/); 2 classes; "
                                      f"images per class: train: NORMAL 4, PNEUMONIA 4; test: NORMAL 3, PNEUMONIA 3; "
                                      f"evaluating test")
    summary = json.loads((out / "summary.json").read_text())
    data = summary["data"]
    assert data["n_test"] == 6 and data["layout"] == "split folders" and data["split"] == "test"
    assert data["classes"] == ["NORMAL", "PNEUMONIA"] and data["counts"]["test"] == {"NORMAL": 3, "PNEUMONIA": 3}
    assert summary["metrics"]["global"]["classes"]["pneumonia"]["n_positive"] == 3  # the prompt class

    out = tmp_path / "fs"  # few-shot: trains on train/, scores TEST/ (no valid/ folder: no held-out choice)
    code, stdout, stderr = _run(capsys, "fewshot", "--checkpoint", tiny_checkpoint, "--data", covid_folders, "--out",
                                out, "--methods", "linear", "--fractions", "1.0", "--linear-steps", "5")
    assert code == 0, stderr
    data = json.loads((out / "summary.json").read_text())["data"]
    assert (data["n_train"], data["n_test"], data["layout"]) == (8, 6, "split folders") and "n_valid" not in data


def test_a_class_folder_is_scored_whole_and_two_folders_can_be_named(covid_folders, tiny_checkpoint, tmp_path,
                                                                      capsys):
    test_dir = covid_folders / "TEST"
    code, stdout, stderr = _run(capsys, "zeroshot", "--checkpoint", tiny_checkpoint, "--data", test_dir,
                                "--out", tmp_path / "whole", "--prompts", "rsna_pneumonia")
    assert code == 0, stderr
    assert "class folders; 2 classes; images per class: all: NORMAL 3, PNEUMONIA 3; evaluating every image" in stdout
    assert json.loads((tmp_path / "whole" / "summary.json").read_text())["data"]["n_test"] == 6  # not a 15% split

    code, stdout, stderr = _run(capsys, "fewshot", "--checkpoint", tiny_checkpoint, "--train-data",
                                covid_folders / "train", "--test-data", test_dir, "--out", tmp_path / "named",
                                "--methods", "linear", "--fractions", "1.0", "--linear-steps", "5")
    assert code == 0, stderr
    assert stdout.splitlines()[:2] == [
        f"data: test: {test_dir}: class folders; 2 classes; images per class: all: NORMAL 3, PNEUMONIA 3",
        f"data: train: {covid_folders / 'train'}: class folders; 2 classes; images per class: all: NORMAL 4, PNEUMONIA 4"]
    data = json.loads((tmp_path / "named" / "summary.json").read_text())["data"]
    assert (data["n_train"], data["n_test"], data["layout"]) == (8, 6, "train/test folders")


def _refused(capsys, *argv) -> str:
    code, stdout, stderr = _run(capsys, *argv)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr
    assert lines[0].startswith("error: ") and not stdout
    return lines[0]


def test_ambiguous_layouts_are_refused_before_the_model_loads(covid_folders, tmp_path, capsys):
    def task(data, *extra):
        return ("zeroshot", "--checkpoint", NO_CHECKPOINT, "--data", data, "--out", tmp_path / "o",
                "--prompts", "rsna_pneumonia", *extra)

    issue = tmp_path / "issue"  # the issue's folder: test/ and train_subset/, each holding NORMAL/ and PNEUMONIA/
    for name, source in (("test", "TEST"), ("train_subset", "train")):
        for cls in ("NORMAL", "PNEUMONIA"):
            _link(issue / name / cls, sorted((covid_folders / source / cls).iterdir()))
    assert _refused(capsys, *task(issue)) == (
        f"error: {issue} mixes split folders (test) with other folders (train_subset): name every split train/ "
        f"valid/ test/, or pass --train-data / --test-data")
    (issue / "test").rename(issue / "holdout")  # splits under names that are not split names
    assert "(holdout, train_subset) each hold the same subfolders (normal, pneumonia): they look like splits, " \
           "not classes" in _refused(capsys, *task(issue))

    empty = tmp_path / "empty"
    _link(empty / "NORMAL", sorted((covid_folders / "TEST" / "NORMAL").iterdir()))
    (empty / "PNEUMONIA").mkdir()
    assert f"class folder(s) PNEUMONIA of {empty} hold no images" in _refused(capsys, *task(empty))

    differ = tmp_path / "differ"
    _link(differ / "train" / "NORMAL", sorted((covid_folders / "train" / "NORMAL").iterdir()))
    _link(differ / "train" / "PNEUMONIA", sorted((covid_folders / "train" / "PNEUMONIA").iterdir()))
    _link(differ / "valid" / "NORMAL", sorted((covid_folders / "TEST" / "NORMAL").iterdir()))
    _link(differ / "valid" / "COVID", sorted((covid_folders / "TEST" / "PNEUMONIA").iterdir()))
    assert _refused(capsys, *task(differ, "--split", "valid")) == (
        f"error: the split folders of {differ} hold different classes: train/ lacks COVID; valid/ lacks PNEUMONIA")

    assert _refused(capsys, *task(covid_folders, "--split", "valid")) == (
        f"error: --split valid: {covid_folders} has no valid folder (it has train, TEST)")
    assert "--test-data" in _refused(capsys, "zeroshot", "--checkpoint", NO_CHECKPOINT, "--test-data", covid_folders,
                                     "--out", tmp_path / "o", "--prompts", "rsna_pneumonia")
    assert "--prompts is required for --dataset image-folder" in _refused(
        capsys, "zeroshot", "--checkpoint", NO_CHECKPOINT, "--data", covid_folders / "TEST", "--out", tmp_path / "o")
