"""Real data: zero-shot and lung segmentation on ../shared/data/covid_chestxray (read in place).

Images of mixed formats (JPEG, PNG, PNG files named .jpg), modes and sizes (200-4000 px); lung masks
drawn by hand (V7 Labs). A tiny random model must run end to end and give finite metrics.
"""
import csv
import math

import pytest
from torch.utils.data import Subset

from mlip_fast.data.evaluation.covid import CovidChestXray
from mlip_fast.data.evaluation.folders import MaskedImageFolder
from mlip_fast.eval.protocols import group_split
from mlip_fast.eval.segmentation import few_shot_segment
from mlip_fast.eval.zeroshot import zero_shot_classify
from mlip_fast.preprocess.images import sniff_format

from tests.paths import COVID_CXR

ROOT = COVID_CXR
pytestmark = pytest.mark.skipif(not (ROOT / "staged_images.csv").is_file(), reason=f"{ROOT} is not available")


def _rows():
    with open(ROOT / "staged_images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        path = ROOT / "images" / r["filename"]
        with open(path, "rb") as f:
            r["format"] = sniff_format(f.read(132))
        r["suffix"] = path.suffix.lower()
        r["bytes"] = int(r["bytes"])
    return sorted(rows, key=lambda r: r["bytes"])


def test_zero_shot_on_real_images(tiny_model, eval_tf):
    rows = _rows()
    negatives = [r["filename"] for r in rows if r["finding"] == "No Finding"][:8]
    labelled = [r for r in rows if r["finding"] not in ("No Finding", "todo")]
    renamed_png = [r["filename"] for r in labelled if r["format"] == "png" and r["suffix"] in (".jpg", ".jpeg")][:4]
    others = [r["filename"] for r in labelled if r["filename"] not in renamed_png][:8]
    names = set(negatives + renamed_png + others)
    data = CovidChestXray(ROOT, transform=eval_tf, labelled_only=True, names=names)
    assert len(data) == 20 and len(renamed_png) == 4
    result = zero_shot_classify(tiny_model, data, "rsna_pneumonia", mode="all", progress=False, batch_size=8)
    for mode, r in result.items():
        row = r["classes"]["pneumonia"]
        assert row["n"] == 20 and row["n_positive"] == 12
        assert all(math.isfinite(row[k]) for k in ("auc", "accuracy", "f1"))


def test_lung_segmentation_on_real_masks(tiny_model, eval_tf, tmp_path):
    rows = [r for r in _rows() if r["v7labs_lung_mask"]]
    chosen = [r["filename"] for r in rows if r["format"] == "png" and r["suffix"] == ".jpg"][:1]
    chosen += [r["filename"] for r in rows if r["filename"] not in chosen][:15]
    data = CovidChestXray(ROOT, transform=eval_tf, masks="v7labs", names=set(chosen))
    assert len(data) == 16
    sample = data[0]
    assert sample["mask"].dtype == bool and sample["mask"].any() and sample["image"].shape == (1, 64, 64)
    train, test = group_split(data.groups, 0.35, seed=0)
    assert train and test and not {data.groups[i] for i in train} & {data.groups[i] for i in test}
    r = few_shot_segment(tiny_model, Subset(data, train), Subset(data, test), fractions=(0.5, 1.0), epochs=3,
                         batch_size=8, splits_dir=tmp_path, examples=2, progress=False)
    for key in ("50%", "100%"):
        assert math.isfinite(r[key]["dice"]) and 0.0 <= r[key]["dice"] <= 1.0
    assert 0.0 < r["chance"]["dice_all_foreground"] < 1.0  # lungs cover part of the image
    assert (tmp_path / "segmentation_50pct_seed0.json").is_file()


def test_lungvae_masks_pair_by_name():
    folder = MaskedImageFolder(ROOT / "images", ROOT / "annotations" / "lungVAE-masks")
    assert len(folder) == 139
    img, mask = folder.pairs[0]
    assert mask.stem == img.stem + "_mask"
