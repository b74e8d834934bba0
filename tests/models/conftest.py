"""Fixtures for the model tests: small models and real IU X-ray report texts."""
import csv

import pytest
import torch

from tests.paths import IU_REPORTS as IU_REPORTS_DIR

IU_REPORTS = IU_REPORTS_DIR / "reports.csv"

# Multi-sentence findings + impression with "Dr." and decimals ("4.5 x 6.8 cm", "1.4 cm") inside sentences.
REPORT_UIDS = ("CXR249", "CXR2837", "CXR1", "CXR60")


@pytest.fixture(scope="session")
def iu_reports():
    """{uid: findings + impression text} for a few real reports (skips when the data is absent)."""
    if not IU_REPORTS.exists():
        pytest.skip(f"real IU reports not found at {IU_REPORTS}")
    from mlip_fast.preprocess.reports import report_text

    with open(IU_REPORTS, newline="") as f:
        rows = {row["uid"]: row for row in csv.DictReader(f) if row["uid"] in REPORT_UIDS}
    return {uid: report_text(rows[uid]["findings"], rows[uid]["impression"]) for uid in REPORT_UIDS}


def tiny_overrides(**extra):
    """mlip-tiny without dropout, so that training-mode forwards are deterministic given the mask seed."""
    text = {"dropout": 0.0, **extra.pop("text", {})}
    return {"text": text, **extra}


@pytest.fixture
def tiny_model():
    from mlip_fast.models import create_model

    return create_model("mlip-tiny", **tiny_overrides())


def make_batch(model, texts, generator_seed=0):
    v = model.config.vision
    g = torch.Generator().manual_seed(generator_seed)
    images = torch.randn(len(texts), v.in_chans, v.image_size, v.image_size, generator=g)
    return {"images": images, **model.tokenize(texts)}
