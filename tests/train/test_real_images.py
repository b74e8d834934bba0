"""Real chest X-rays end to end: the COVID-19 image collection in ../shared/data/covid_chestxray (images
with their clinical notes as the text, Pneumonia labels, patient-level split) -> shards (every format of
the set, plus 16-bit, palette and a corrupt copy) -> DeepSpeed training from the shards -> export ->
zero-shot evaluation of the export on the test shards. Also: resuming a shard run continues exactly."""
import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from mlip_fast.data.evaluation.covid import CovidChestXray
from mlip_fast.data.shard_reader import ShardSplit
from mlip_fast.data.shards import ShardConfig, write_shards
from mlip_fast.eval.__main__ import main as eval_main
from mlip_fast.eval.protocols import group_split
from mlip_fast.models import from_pretrained
from mlip_fast.train.main import train
from tests.paths import COVID_CXR
from tests.train.conftest import train_records, write_ds

pytestmark = pytest.mark.skipif(not (COVID_CXR / "staged_images.csv").is_file(),
                                reason="needs ../shared/data/covid_chestxray")

TRAIN_ARGS = ["--image-size", "32", "--no-progress", "--eval-every", "0", "--no-final-eval"]


def _master_csv(root):
    """master.csv of the real set: clinical notes as findings, Pneumonia (1 / 0 / unknown), split by patient;
    plus a 16-bit PNG, a palette PNG and a truncated JPEG made from real images, in the training split."""
    covid = CovidChestXray(COVID_CXR)
    rows = [r for r in covid.rows if r["report"]]
    train_idx, _ = group_split([r["patientid"] for r in rows], 0.3, seed=0)
    train_set = set(train_idx)
    out = []
    for i, r in enumerate(rows):
        label = CovidChestXray.labels_of(r["finding"])[0]
        out.append({"image_path": str(COVID_CXR / "images" / r["filename"]), "findings": r["report"], "impression": "",
                    "split": "train" if i in train_set else "test", "Pneumonia": "" if math.isnan(label) else int(label)})
    derived = root / "derived"
    derived.mkdir()
    grey = np.asarray(Image.open(COVID_CXR / "images" / "00cfd1c1.jpg").convert("L"), dtype=np.uint16)
    Image.fromarray(grey * 257).save(derived / "sixteen_bit.png")
    Image.open(COVID_CXR / "images" / "000001-2.jpg").convert("P", palette=Image.ADAPTIVE).save(derived / "palette.png")
    (derived / "truncated.jpg").write_bytes((COVID_CXR / "images" / "000001-2.jpg").read_bytes()[:3000])
    for name in ("sixteen_bit.png", "palette.png", "truncated.jpg"):
        out.append({"image_path": str(derived / name), "findings": "Bilateral opacities.", "impression": "",
                    "split": "train", "Pneumonia": 1})
    with open(root / "master.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)
    return root / "master.csv", out


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("covid")
    master, rows = _master_csv(root)
    with pytest.warns(UserWarning, match="truncated.jpg"):
        index = write_shards(str(master), root / "shards", ShardConfig(size=64, shard_size=64), workers=2,
                             progress=False)
    return root / "shards", index, rows


def test_every_real_image_goes_through_the_writer(real_shards):
    shards, index, rows = real_shards
    n_train = sum(r["split"] == "train" for r in rows)
    assert index["splits"]["train"]["samples"] == n_train - 1 and index["splits"]["test"]["samples"] == len(rows) - n_train
    assert [b["source"].rsplit("/", 1)[-1] for b in index["bad"]] == ["truncated.jpg"]
    assert index["label_names"] == ["Pneumonia"]
    sizes = set()
    for item in ShardSplit(shards, "train"):
        h, w = item["image"].shape[-2:]
        assert min(h, w) <= 64 and item["report"]
        sizes.add((h, w))
    assert len(sizes) > 20  # aspect ratios kept: many shapes


def test_train_export_and_zero_shot_from_real_shards(real_shards, tmp_path):
    shards, index, rows = real_shards
    test_rows = [r for r in rows if r["split"] == "test"]
    ds = write_ds(tmp_path / "ds.json")
    run = tmp_path / "run"
    summary = train(["--deepspeed_config", str(ds), "--data", str(shards), "--output-dir", str(run), "--steps", "3",
                     "--num-workers", "1", *TRAIN_ARGS])
    assert summary["status"] == "completed" and summary["data"]["n_train"] == index["splits"]["train"]["samples"]
    records = train_records(run)
    assert sorted(records) == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in records.values() for k in ("loss", "loss_global", "loss_local", "loss_sie"))
    model = from_pretrained(run / "export")
    assert model.config.vision.image_size == 32
    out = tmp_path / "zeroshot"
    assert eval_main(["zeroshot", "--checkpoint", str(run / "export"), "--data", str(shards), "--split", "test",
                      "--prompts", "rsna_pneumonia", "--out", str(out), "--no-progress"]) == 0
    result = json.loads((out / "summary.json").read_text())
    assert result["data"]["kind"] == "shards" and result["data"]["n_test"] == len(test_rows)
    for mode in ("global", "local", "combined"):
        auc = result["metrics"][mode]["classes"]["pneumonia"]["auc"]
        assert 0.0 <= auc <= 1.0
        assert result["metrics"][mode]["classes"]["pneumonia"]["n"] == sum(r["Pneumonia"] != "" for r in test_rows)


def test_resuming_a_shard_run_continues_exactly(real_shards, tmp_path):
    """Step 3 after resuming from the step-2 checkpoint equals step 3 of the uninterrupted run, bitwise (two
    micro-batches per step), with the lanes read in the main process in one run and by a loader worker in the
    other."""
    shards, _, _ = real_shards
    ds = write_ds(tmp_path / "ds.json", train_batch_size=8, train_micro_batch_size_per_gpu=4,
                  gradient_accumulation_steps=2)
    full = tmp_path / "full"
    train(["--deepspeed_config", str(ds), "--data", str(shards), "--output-dir", str(full), "--steps", "3",
           "--save-every", "2", "--keep-checkpoints", "0", "--num-workers", "0", "--shuffle-buffer", "50", *TRAIN_ARGS])
    resumed = tmp_path / "resumed"
    summary = train(["--deepspeed_config", str(ds), "--data", str(shards), "--output-dir", str(resumed), "--steps", "3",
                     "--resume", str(full / "checkpoints" / "step00000002"), "--num-workers", "1",
                     "--shuffle-buffer", "50", *TRAIN_ARGS])
    assert summary["resumed_from_step"] == 2
    a, b = train_records(full), train_records(resumed)
    assert sorted(a) == [1, 2, 3] and sorted(b) == [3]
    for key in ("loss", "loss_global", "loss_local", "loss_sie", "lr"):
        assert b[3][key] == a[3][key], key
    assert a[2]["loss"] != a[3]["loss"]
