"""The one writer of run records (summary.json of training, evaluation and the synthetic benchmark)."""
import json
import math
import pathlib

import numpy as np
import pytest
import torch

from mlip_fast._records import SUMMARY_FILE, write_run_record


def test_record_is_plain_json_written_atomically(tmp_path):
    out = tmp_path / "run" / "nested"
    path = write_run_record(out, {"auc": float("nan"), "loss": torch.tensor(0.5), "steps": np.int64(3),
                                  "where": out, "curve": [1.0, math.inf]})
    assert path == out / SUMMARY_FILE
    assert json.loads(path.read_text()) == {"auc": None, "loss": 0.5, "steps": 3, "where": str(out),
                                            "curve": [1.0, None]}
    write_run_record(out, {"second": True})  # replaces the record as a whole
    assert json.loads(path.read_text()) == {"second": True}
    assert sorted(p.name for p in out.iterdir()) == [SUMMARY_FILE]  # no temporary file left


def test_a_write_cut_short_leaves_the_previous_record(tmp_path, monkeypatch):
    write_run_record(tmp_path, {"good": 1}, "prep_summary.json")
    real_write = pathlib.Path.write_text

    def disk_full(self, text, *args, **kwargs):
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_run_record(tmp_path, {"newer": list(range(100))}, "prep_summary.json")
    monkeypatch.undo()
    assert json.loads((tmp_path / "prep_summary.json").read_text()) == {"good": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["prep_summary.json"]  # the half-written file is removed
