"""A master.csv written by MGCA's MIMIC-CXR preprocessing (mgca/preprocess/mimic_cxr.py: columns Path, dicom_id,
subject_id, study_id, ViewPosition, impression, findings, split; Path = "<MIMIC-CXR-JPG folder>/files/pXX/.../<dicom
id>.jpg"; splits train and valid) is read as MGCA reads it, through what the training app calls: real X-rays and
real report texts, laid out in a temporary MIMIC-like folder."""
import csv
import os

import pytest
import torch

from mlip_fast.data.pretrain import PretrainDataset
from mlip_fast.data.sources import build_pretrain_dataset
from mlip_fast.preprocess.transforms import ImageTransform
from tests.paths import COVID_CXR, IU_REPORTS

MGCA_COLUMNS = ["Path", "dicom_id", "subject_id", "study_id", "ViewPosition", "impression", "findings", "split"]


@pytest.fixture
def mgca_folder(tmp_path):
    images = sorted((COVID_CXR / "images").glob("*.png"), key=lambda p: (p.stat().st_size, p.name))[:5]
    if len(images) < 5 or not (IU_REPORTS / "reports.csv").is_file():
        pytest.skip("the real covid images or IU reports are not under ../shared/data")
    with open(IU_REPORTS / "reports.csv", newline="") as f:
        reports = [r for r in csv.DictReader(f) if r["findings"].strip() and r["impression"].strip()][:5]
    root = tmp_path / "2.0.0"  # MGCA writes the MIMIC-CXR-JPG folder's name first
    rows = []
    for k, (image, report, view, split) in enumerate(zip(images, reports, ("PA", "AP", "LATERAL", "PA", "AP"),
                                                          ("train", "train", "train", "valid", "valid"))):
        relative = f"files/p10/p1000000{k}/s5000000{k}/dicom{k}.jpg"
        (root / relative).parent.mkdir(parents=True)
        os.symlink(image, root / relative)  # a PNG named .jpg, as some files of the covid set are
        rows.append({"Path": f"2.0.0/{relative}", "dicom_id": f"dicom{k}", "subject_id": f"1000000{k}",
                     "study_id": f"s5000000{k}", "ViewPosition": view, "impression": report["impression"],
                     "findings": report["findings"], "split": split})
    with open(root / "master.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MGCA_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return root, rows


def test_mgca_master_csv_is_read_as_mgca_reads_it(mgca_folder):
    root, rows = mgca_folder
    train = build_pretrain_dataset(str(root), "train", ImageTransform(32))  # the folder, as --data names it
    assert isinstance(train, PretrainDataset) and train.excluded_views == 1  # the lateral view, as MGCA drops it
    assert [r["image_path"] for r in train.records] == [root / rows[k]["Path"].split("/", 1)[1] for k in (0, 1)]
    item = train[0]
    assert item["image"].shape == (1, 32, 32) and torch.isfinite(item["image"]).all()
    assert rows[0]["findings"].split(".")[0] in item["report"] and rows[0]["impression"].split(".")[0] in item["report"]
    valid = build_pretrain_dataset(str(root / "master.csv"), "valid", ImageTransform(32))
    assert len(valid) == 2
    assert build_pretrain_dataset(str(root), "test", ImageTransform(32)) is None  # MGCA merged test into valid
