"""Monitoring as a user sees it: --report-to checked before anything starts (a missing package is one line and
exit 2, not a crashed rank), data-loading time and logit scales in metrics.jsonl and on the console, progress as
plain lines when the output is not a terminal (no carriage return in a redirected log), and the monitor sections
the ds config gets."""
import importlib.util
import math

import pytest

from mlip_fast.train import launch
from mlip_fast.train.ds_config import DSConfigError
from mlip_fast.train.fit import StepProbe
from mlip_fast.train.main import train
from mlip_fast.train.reporting import RunReporter, check_monitors, with_monitors
from tests.train.conftest import base_args, train_records, write_ds

WANDB_MISSING = importlib.util.find_spec("wandb") is None


@pytest.mark.skipif(not WANDB_MISSING, reason="wandb is installed here")
def test_missing_wandb_is_one_line_and_exit_2_before_anything_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # mlip-train's entry point, before the launcher starts anything
        launch.main(["--deepspeed_config", "zero2_fp32", "--report-to", "wandb", "--output-dir", str(tmp_path / "r")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and lines[-1] == (
        "mlip-train: error: --report-to wandb logs to wandb, but wandb is not installed; pip install wandb, or drop "
        "--report-to wandb / the 'wandb' section of the ds config")
    assert not (tmp_path / "r").exists() and not any("Traceback" in line for line in lines)
    with pytest.raises(DSConfigError, match="the ds.json's 'wandb' section logs to wandb, but wandb is not installed"):
        check_monitors({"wandb": {"enabled": True}}, "none", "ds.json")  # asked for by the config itself


def test_monitor_sections_point_into_the_run_folder(tmp_path):
    config = with_monitors({"wandb": {"enabled": True, "project": "mine"}}, "tensorboard", tmp_path / "run7")
    assert config["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "run7" / "tensorboard"),
                                     "job_name": "run7"}
    assert config["wandb"] == {"enabled": True, "project": "mine", "group": "run7"}
    assert with_monitors({"bf16": {"enabled": False}}, "none", tmp_path) == {"bf16": {"enabled": False}}


def test_step_probe_times_the_batches_and_reads_the_scales():
    import torch

    probe = StepProbe(iter([{"i": k} for k in range(4)]), lambda **outputs: ("loss", outputs), per_step=2)
    assert probe.extras() == {}
    next(probe)
    assert probe.data_s is None  # the step's second micro-batch closes it
    next(probe)
    assert probe.data_s is not None and probe.data_s >= 0
    probe.criterion(logit_scale_global=torch.tensor(14.25, requires_grad=True), logit_scale_local=torch.tensor(3.0))
    assert probe.extras() == {"data_s": probe.data_s, "logit_scale_global": 14.25, "logit_scale_local": 3.0}


def test_a_run_logs_data_time_and_logit_scales_without_carriage_returns(tmp_path, synthetic_cache, capsys):
    ds = write_ds(tmp_path / "ds.json")
    argv = [a for a in base_args(ds, tmp_path / "run", synthetic_cache, "--steps", "2", "--no-final-eval")
            if a != "--no-progress"]  # progress on, with the test's captured (not a terminal) output
    train(argv)
    out = capsys.readouterr()
    records = train_records(tmp_path / "run")
    for record in records.values():
        assert record["data_s"] >= 0 and record["data_s"] <= record["step_s"]
        # the scales the step's forward used: initialised at 1 / 0.07 and moved by at most two small steps
        assert math.isclose(record["logit_scale_global"], 1 / 0.07, rel_tol=0.01)
        assert math.isclose(record["logit_scale_local"], 1 / 0.07, rel_tol=0.01)
    log = (tmp_path / "run" / "run.log").read_text()
    assert "step 2/2 loss " in log and " data " in log and " scale 14." in log
    assert "\r" not in out.out and "\r" not in log
    # the one bar left is DeepSpeed's own, in the fp32 export (zero_to_fp32's "Loading checkpoint shards")
    assert all("Loading checkpoint shards" in line for line in out.err.splitlines() if "\r" in line)


def test_progress_is_a_bar_only_on_a_terminal(tmp_path, monkeypatch, capsys):
    reporter = RunReporter(tmp_path / "tty", rank=0)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    try:
        reporter.start_progress(10, 0)
        assert reporter.bar is not None
    finally:
        reporter.close()
    monkeypatch.undo()
    capsys.readouterr()  # the bar drawn above
    reporter = RunReporter(tmp_path / "log", rank=0)
    reporter.step_extras = lambda: {"data_s": 0.012, "logit_scale_global": 14.3}
    try:
        reporter.start_progress(40, 0)
        assert reporter.bar is None
        for _ in range(40):
            reporter.update_progress(1.5, 1e-3, 8.0)
    finally:
        reporter.close()
    lines = [line for line in (tmp_path / "log" / "run.log").read_text().splitlines() if " step " in line]
    assert len(lines) == 20 and lines[-1].endswith("step 40/40 loss 1.5000 lr 1.00e-03 sps 8.0 data 0.012s scale 14.30")
    assert "\r" not in capsys.readouterr().err


def test_summary_says_where_the_time_went_and_a_profile_is_written(tmp_path, synthetic_cache):
    """summary.json's time_breakdown: every run phase and step phase, the step phases within the loop's time, the
    named run phases within the wall time; --profile-steps writes a trace and the op table; the periodic validation
    of the synthetic benchmark scores localisation too."""
    import json

    from mlip_fast.train.timing import RUN_PHASES, TRAIN_PHASES

    ds = write_ds(tmp_path / "ds.json")
    summary = train(base_args(ds, tmp_path / "run", synthetic_cache, "--steps", "8", "--profile-steps", "2",
                              "--eval-every", "4", "--save-every", "4"))
    times = summary["time_breakdown"]
    assert set(times["run_s"]) == set(RUN_PHASES) | {"other"} and list(times["training_step"]) == list(TRAIN_PHASES)
    assert times["steps"] == 8 and times["step_samples_per_s"] > summary["samples_per_s"] > 0
    for name in ("datasets", "vocabulary", "model_and_engine", "batch_source", "training", "evaluations",
                 "checkpoints", "export", "final_evaluation"):
        assert times["run_s"][name] > 0, name
    assert sum(times["run_s"].values()) == pytest.approx(times["wall_s"], abs=0.05)
    step_total = sum(v["s"] for v in times["training_step"].values())
    assert 0.5 * times["run_s"]["training"] < step_total <= times["run_s"]["training"] + 0.01
    for name in ("forward_image", "forward_text", "loss", "backward", "optimizer", "deepspeed_step"):
        assert times["training_step"][name]["ms_per_step"] > 0, name
    trace = tmp_path / "run" / "profile"
    assert json.loads((trace / "trace.json").read_text())["traceEvents"] and "aten::" in (trace / "ops.txt").read_text()
    evals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line and '"valid"' in line]
    assert [r["step"] for r in evals] == [4] and 0 <= evals[0]["localisation"] <= 1 and evals[0]["localisation_chance"] > 0
