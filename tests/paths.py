"""Where the real test data lives: ``../shared/data`` beside the repository (read-only in CI)."""
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IU_REPORTS = SHARED_DATA / "iu_xray_reports"
COVID_CXR = SHARED_DATA / "covid_chestxray"
