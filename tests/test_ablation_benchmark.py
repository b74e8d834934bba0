"""tools/ablation (``python -m tools.ablation``): the run plan (the integrity modes' screen included), the paired
statistics, and the whole command at a toy size (records schema with the integrity diagnostics, PNG, step-time file,
masking diagnostics, resume without redoing finished runs, refusal to mix schedules, then the data-efficiency curve
on the same run folders)."""
import json
import math
import statistics

import pytest
import torch

from mlip_fast.models import get_model_config
from tools.ablation import efficiency
from tools.ablation.cli import main
from tools.ablation.plan import ARMS, DEPARTURES, LAMBDA_SIE, Grid, plan, schedule_of
from tools.ablation.runs import step_time_configs
from tools.ablation.tables import best_mode, paired_difference, readme_tables, sweep_tables

TOY_DS = {
    "train_batch_size": 8,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.05,
                                              "torch_adam": True}},
    "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": "auto", "warmup_num_steps": 1}},
    "gradient_clipping": 1.0,
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 2},
    "steps_per_print": 1000000,
}
RECORD_KEYS = {"arm", "mask_ratio", "lambda_local", "lambda_sie", "seed", "steps", "zs_auc_global", "zs_auc_local",
               "zs_auc_combined", "pointing_accuracy", "pointing_chance", "probe_auc_1pct", "probe_auc_10pct",
               "samples_per_s", "valid_zs_auc_combined", "valid_pointing_accuracy", "sie_mask_auc",
               "target_mask_auc", "sie_mode", "sie_warmup", "finding_kept_share", "kept_share_uniform", "weight_cv",
               "weight_finding_corr", "train_fraction", "num_train", "train_s", "final_loss", "torch_threads"}


def test_plan_covers_every_arm_at_both_ratios_and_the_preset():
    runs = plan([0, 1, 2], Grid(ratios=[0.5, DEPARTURES["mask_ratio"]]))
    configs = {(r.arm, r.mask_ratio, r.lambda_local, r.lambda_sie) for r in runs}
    assert configs == {("clip", 0.0, 0.0, 0.0), ("flip", 0.5, 0.0, 0.0), ("flip", 0.25, 0.0, 0.0),
                       ("flip+local", 0.5, 1.0, 0.0), ("flip+local", 0.25, 1.0, 0.0), ("mlip", 0.5, 1.0, 0.1),
                       ("mlip", 0.25, 1.0, 0.1), ("mlip", 0.25, DEPARTURES["lambda_local"], 0.1)}
    assert len(runs) == 3 * len(configs) and len({r.key for r in runs}) == len(runs)
    assert [r.seed for r in runs[:len(configs)]] == [0] * len(configs)  # every arm's first seed first


def test_paired_difference_against_hand_computation():
    a, b = {0: 0.80, 1: 0.75, 2: 0.90, 3: 0.70}, {0: 0.78, 1: 0.70, 2: 0.86, 3: 0.71}
    d = [0.02, 0.05, 0.04, -0.01]
    mean, sd = sum(d) / 4, math.sqrt(sum((x - sum(d) / 4) ** 2 for x in d) / 3)
    got = paired_difference(a, b)
    assert got["n"] == 4 and got["mean"] == pytest.approx(mean)
    assert got["high"] - mean == pytest.approx(3.182 * sd / 2) and mean - got["low"] == pytest.approx(3.182 * sd / 2)
    assert paired_difference({0: 0.5, 1: 0.6}, {1: 0.4, 2: 0.3}) == {"mean": pytest.approx(0.2), "low": None,
                                                                            "high": None, "n": 1}
    assert paired_difference({0: None}, {0: 0.4}) is None


def _toy_args(tmp_path, *extra):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(TOY_DS))
    # --num-workers 0: no fork of this process, which holds the process group's threads after the first run
    return ["--steps", "3", "--synthetic-n", "60", "--image-size", "32", "--ds-config", str(ds), "--jobs", "0",
            "--num-workers", "0",
            "--work-dir", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "ablation.json"), "--png", str(tmp_path / "ablation.png"),
            "--step-time-out", str(tmp_path / "step_time.json"), "--no-readme", *extra]


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny CPU ops run faster on one thread (and the training app keeps an OMP_NUM_THREADS it finds)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_toy_benchmark_records_and_resume(tmp_path, one_thread, capsys):
    out = tmp_path / "ablation.json"
    args = _toy_args(tmp_path, "--ratios", "0.5", "--no-preset-row")
    assert main(args + ["--seeds", "0", "--arms", "clip", "flip", "mlip", "--step-time-rounds", "1"]) == 0
    records = json.loads(out.read_text())
    assert [r["key"] for r in records] == ["clip_r0_ll0_s0", "flip_r0.5_ll0_s0", "mlip_r0.5_ll1_s0"]
    for r in records:
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert r["arm"] in ARMS and r["steps"] == 3 and r["seed"] == 0
        for key in ("zs_auc_global", "zs_auc_local", "zs_auc_combined", "pointing_accuracy", "probe_auc_1pct",
                    "target_mask_auc"):
            assert r[key] is None or 0.0 <= r[key] <= 1.0, key
        assert 0.0 < r["pointing_chance"] < 1.0 and r["samples_per_s"] > 0
    clip, flip, mlip = records
    assert clip["final_loss"]["loss_local"] == 0.0 and flip["final_loss"]["loss_sie"] == 0.0
    # without the estimator loss its logits stay exactly equal: no per-patch score, uniform (FLIP) masking, no
    # weighting (the unmasked CLIP run diagnosed at the method's r = 0.5)
    for r in (clip, flip):
        assert r["sie_mask_auc"] is None and r["weight_cv"] == 0.0 and r["sie_mode"] == "guided"
    assert clip["integrity_mask_ratio"] == 0.5 and clip["kept_share_uniform"] == 0.5
    assert 0.0 <= mlip["sie_mask_auc"] <= 1.0 and 0.0 <= mlip["finding_kept_share"] <= 1.0 and mlip["weight_cv"] > 0
    assert {(r["sie_warmup"], r["train_fraction"]) for r in records} == {(0, 1.0)}
    assert (tmp_path / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    step_time = json.loads((tmp_path / "step_time.json").read_text())
    assert step_time["ratio_min"] > 0 and {row["config"] for row in step_time["table"]} == {"clip_r0_ll0",
                                                                                          "mlip_r0.5_ll1"}

    # What the masking does with each masked run's estimator: FLIP's is constant, so uniform and unweighted.
    assert main(args + ["--diagnose", "--diagnose-draws", "2", "--masking-out", str(tmp_path / "masking.json")]) == 0
    masking = json.loads((tmp_path / "masking.json").read_text())
    assert [row["configuration"] for row in masking["table"]] == ["flip (r=0.5)", "mlip (r=0.5, λl=1)"]
    flip_diag = next(r for r in masking["runs"] if r["arm"] == "flip")
    assert flip_diag["sie_mask_auc"] is None and flip_diag["weight_cv_t1"] == 0.0
    assert 0.0 < flip_diag["finding_kept_share_t1"] < 1.0 and flip_diag["kept_share_uniform"] == 0.5

    # Resume: the kept records stay as they are; only the new run trains.
    trained = tmp_path / "work" / "runs" / "clip_r0_ll0_s0" / "metrics.jsonl"
    stamp = trained.stat().st_mtime_ns
    assert main(args + ["--seeds", "0", "1", "--arms", "clip", "--step-time-rounds", "0"]) == 0
    after = json.loads(out.read_text())
    assert after[:3] == records and [r["key"] for r in after[3:]] == ["clip_r0_ll0_s1"]
    assert trained.stat().st_mtime_ns == stamp
    # A run that finished but was not collected (the collecting process stopped) is taken from its folder.
    out.write_text(json.dumps(after[:3]))
    rerun = tmp_path / "work" / "runs" / "clip_r0_ll0_s1" / "metrics.jsonl"
    stamp = rerun.stat().st_mtime_ns
    assert main(args + ["--seeds", "0", "1", "--arms", "clip", "--step-time-rounds", "0"]) == 0
    assert json.loads(out.read_text()) == after and rerun.stat().st_mtime_ns == stamp
    # Another schedule is refused rather than mixed into the same records: other steps, or another report encoder
    # dropout (the runs default to the model config's, named in the schedule and given to the training app).
    with pytest.raises(SystemExit, match="another schedule"):
        main(_toy_args(tmp_path, "--steps", "4", "--seeds", "0", "--arms", "clip"))
    with pytest.raises(SystemExit, match="another schedule"):
        main(_toy_args(tmp_path, "--text-dropout", "0", "--seeds", "0", "--arms", "clip"))
    assert {r["text_dropout"] for r in after} == {get_model_config("mlip-tiny").text.dropout} == {0.1}
    run_summary = json.loads((tmp_path / "work" / "runs" / "clip_r0_ll0_s0" / "summary.json").read_text())
    assert run_summary["model"]["text"]["dropout"] == 0.1
    # Records written before the schedule named the dropout ran at the model config's: they continue this one.
    old = [{k: v for k, v in r.items() if k != "text_dropout"} for r in after]
    assert [schedule_of(r) for r in old] == [schedule_of(r) for r in after]
    with pytest.raises(SystemExit):
        main(_toy_args(tmp_path, "--text-dropout", "1"))
    assert "--text-dropout must be in [0, 1)" in capsys.readouterr().err

    # The data-efficiency curve on the same run folders: the runs on all the pairs are the ablation's (not redone).
    curve = _toy_args(tmp_path, "--data-efficiency", "--fractions", "0.5", "1", "--arms", "clip", "mlip", "--ratios",
                      "0.5", "--seeds", "0", "--out", str(tmp_path / "curve.json"), "--png", str(tmp_path / "curve.png"))
    stamp = trained.stat().st_mtime_ns
    assert main(curve) == 0
    points = {r["key"]: r for r in json.loads((tmp_path / "curve.json").read_text())}
    assert set(points) == {"clip_r0_ll0_s0", "clip_r0_ll0_f0.5_s0", "mlip_r0.5_ll1_s0", "mlip_r0.5_ll1_f0.5_s0"}
    assert trained.stat().st_mtime_ns == stamp and points["mlip_r0.5_ll1_s0"] == records[2]
    n_train = points["clip_r0_ll0_s0"]["num_train"]
    for key, r in points.items():
        assert RECORD_KEYS <= set(r), RECORD_KEYS - set(r)
        assert (r["train_fraction"], r["num_train"]) == ((0.5, round(0.5 * n_train)) if "_f0.5" in key else (1.0, n_train))
    summary = json.loads((tmp_path / "work" / "runs" / "clip_r0_ll0_f0.5_s0" / "summary.json").read_text())
    assert summary["data"]["train_fraction"] == 0.5 and summary["data"]["n_train"] == round(0.5 * n_train)
    assert summary["data"]["n_valid"] + summary["data"]["n_test"] == 60 - n_train  # the evaluation splits whole
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    [sentence, _] = efficiency.summary_sentences(list(points.values()))
    assert sentence.startswith("mlip (r=0.5, λl=1) - clip (r=0), zero-shot AUC (combined, test): ")
    assert "at 100% of the training pairs" in sentence and "one seed: no interval" in sentence


def test_readme_tables_from_records():
    base = {"model": "mlip-tiny", "steps": 400, "global_batch": 64, "synthetic_n": 6000, "lambda_sie": 0.0,
            "environment": {"cpu": "cpu", "torch": "2"}}
    records = []
    for seed, (f, fl, m) in enumerate([(0.70, 0.72, 0.75), (0.71, 0.74, 0.74), (0.69, 0.73, 0.78)]):
        for arm, lam, auc in (("flip", 0.0, f), ("flip+local", 1.0, fl), ("mlip", 1.0, m)):
            records.append({**base, "arm": arm, "mask_ratio": 0.5, "lambda_local": lam, "seed": seed,
                            "zs_auc_combined": auc})
    (caption, rows), (_, diffs) = readme_tables(records)
    assert "400 steps" in caption and [r["configuration"] for r in rows] == [
        "flip (r=0.5)", "flip+local (r=0.5, λl=1)", "mlip (r=0.5, λl=1)"]
    assert rows[2]["zs_auc_combined"] == f"{statistics.mean([0.75, 0.74, 0.78]):.3f} ± {statistics.stdev([0.75, 0.74, 0.78]):.3f}"
    assert diffs[0]["difference (paired by seed)"] == "MLIP - FLIP+local, r=0.5"
    assert diffs[0]["zs_auc_combined"].startswith(f"{statistics.mean([0.03, 0.0, 0.05]):+.3f} [")


def test_ot_arms_plan_record_and_compare(tmp_path, one_thread):
    runs = plan([0], Grid(arms=["mlip", "mlip-ot"], ratios=[0.5], preset_row=False, ot_eps=[0.02, 0.1], ot_iters=[20]))
    assert [r.key for r in runs] == ["mlip_r0.5_ll1_s0", "mlip-ot_r0.5_ll1_eps0.02_it20_s0",
                                     "mlip-ot_r0.5_ll1_eps0.1_it20_s0"]
    assert runs[2].train_flags()[-8:] == ["--local-matching", "ot", "--ot-eps", "0.1", "--ot-iters", "20", "--sie-mode",
                                          "guided"]
    assert runs[2].lambda_sie == LAMBDA_SIE and _flag(runs[0].train_flags(), "--local-matching") == "max"
    assert [c.key for c in step_time_configs(["mlip", "mlip-ot"], 0.05, 50)] == [
        "mlip_r0.5_ll1_s0", "mlip-ot_r0.5_ll1_eps0.05_it50_s0"]
    out = tmp_path / "ablation.json"
    args = _toy_args(tmp_path, "--ratios", "0.5", "--no-preset-row", "--seeds", "0", "--arms", "flip+local-ot",
                     "--ot-iters", "5", "--step-time-rounds", "0")
    assert main(args) == 0
    [ot] = json.loads(out.read_text())
    assert (ot["local_matching"], ot["ot_eps"], ot["ot_iters"]) == ("ot", 0.05, 5) and ot["final_loss"]["loss_local"] > 0
    for key in ("zs_auc_local_max", "pointing_accuracy_max", "valid_zs_auc_local"):  # the other reading too
        assert key in ot and (ot[key] is None or 0.0 <= ot[key] <= 1.0), key
    base = {**ot, "arm": "flip+local", "local_matching": "max", "ot_eps": None, "ot_iters": None}
    (_, rows), (_, diffs) = readme_tables([base, ot])
    assert [r["configuration"] for r in rows] == ["flip+local (r=0.5, λl=1)", "flip+local-ot (r=0.5, λl=1, ε=0.05, 5 it)"]
    assert diffs[0]["difference (paired by seed)"] == "FLIP+local-OT - FLIP+local, r=0.5"


def test_sweep_tables_lead_with_the_validation_metrics():
    base = {"model": "mlip-tiny", "steps": 200, "global_batch": 64, "environment": {"cpu": "cpu", "torch": "2"},
            "arm": "mlip-ot", "mask_ratio": 0.5, "lambda_local": 1.0, "seed": 0, "valid_pointing_chance": 0.05}
    records = [{**base, "ot_eps": e, "ot_iters": n, "valid_zs_auc_combined": v} for e, n, v in
               ((0.1, 50, 0.71), (0.02, 20, 0.70))]
    [(caption, rows)] = sweep_tables(records)
    assert "validation" in caption and "200 steps" in caption
    assert [r["configuration"] for r in rows] == ["mlip-ot (r=0.5, λl=1, ε=0.02, 20 it)",
                                                  "mlip-ot (r=0.5, λl=1, ε=0.1, 50 it)"]
    assert list(rows[0])[2] == "valid_zs_auc_combined" and rows[1]["valid_zs_auc_combined"] == "0.710"


def test_screen_plan_runs_every_mode_with_and_without_warmup():
    modes = ["mlip", "mlip-discriminative", "mlip-maco", "mlip-predictor"]
    runs = plan([0, 1, 2], Grid(arms=["flip+local", *modes], ratios=[0.25], lambda_local=4.0, preset_row=True,
                                warmups=[0, 100]))
    assert len(runs) == 3 * (1 + 4 * 2) and len({r.key for r in runs}) == len(runs)  # the preset row is already in
    first = {r.key: r for r in runs if r.seed == 0}
    assert sorted(first) == sorted(["flip+local_r0.25_ll4_s0"] + [f"{m}_r0.25_ll4{w}_s0" for m in modes
                                                                   for w in ("", "_wu100")])
    maco = first["mlip-maco_r0.25_ll4_wu100_s0"]
    assert (maco.sie_mode, maco.sie_warmup, maco.lambda_sie) == ("maco", 100, LAMBDA_SIE)
    assert maco.train_flags()[-4:] == ["--sie-mode", "maco", "--sie-warmup", "100"]
    assert first["mlip_r0.25_ll4_s0"].train_flags()[-2:] == ["--sie-mode", "guided"]
    base = first["flip+local_r0.25_ll4_s0"]
    assert base.sie_mode is None and "--sie-mode" not in base.train_flags() and base.lambda_sie == 0.0
    curve = plan([0], Grid(arms=["clip", "mlip"], ratios=[0.25], preset_row=False, fractions=[1.0, 0.1]))
    assert [r.key for r in curve] == ["clip_r0_ll0_s0", "mlip_r0.25_ll1_s0", "clip_r0_ll0_f0.1_s0",
                                      "mlip_r0.25_ll1_f0.1_s0"]
    assert curve[2].train_flags()[-2:] == ["--train-fraction", "0.1"]


def _flag(flags: list, name: str) -> str:
    """The value given to ``name`` in a flag list."""
    return flags[flags.index(name) + 1]


def _t_interval(d):
    mean = sum(d) / len(d)
    half = {2: 4.303, 3: 3.182}[len(d) - 1] * math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1)) / math.sqrt(len(d))
    return mean, mean - half, mean + half


def test_mode_rows_and_best_mode_paired_against_flip_local():
    base = {"model": "mlip-tiny", "steps": 400, "global_batch": 64, "synthetic_n": 6000,
            "environment": {"cpu": "cpu", "torch": "2"}, "mask_ratio": 0.25, "lambda_local": 4.0}
    values = {("flip+local", 0): (0.70, 0.72, 0.71), ("mlip-maco", 0): (0.71, 0.75, 0.72),
              ("mlip-maco", 100): (0.74, 0.76, 0.75), ("mlip", 0): (0.69, 0.73, 0.70)}
    records = [{**base, "arm": arm, "sie_warmup": w, "seed": s, "valid_zs_auc_combined": v[s], "zs_auc_combined": v[s],
                "valid_pointing_accuracy": 0.1, "weight_cv": 0.2}
               for (arm, w), v in values.items() for s in range(3)]
    (_, rows), (_, diffs) = readme_tables(records)
    assert [r["configuration"] for r in rows] == ["flip+local (r=0.25, λl=4)", "mlip (r=0.25, λl=4)",
                                                  "mlip-maco (r=0.25, λl=4)", "mlip-maco (r=0.25, λl=4, warm-up 100)"]
    assert rows[1]["weight_cv"] == "0.200 ± 0.000"
    assert [d["difference (paired by seed)"] for d in diffs] == [
        "MLIP - FLIP+local, r=0.25, λl=4", "MLIP-maco - FLIP+local, r=0.25, λl=4",
        "MLIP-maco (warm-up 100) - FLIP+local, r=0.25, λl=4"]
    mean, low, high = _t_interval([0.04, 0.04, 0.04 + 1e-12])
    assert diffs[2]["valid_zs_auc_combined"].startswith(f"{mean:+.3f} [")
    mean, low, high = _t_interval([0.01, 0.03, 0.01])
    assert diffs[1]["zs_auc_combined"] == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    best = best_mode(records)
    assert best["configuration"] == "mlip-maco (r=0.25, λl=4, warm-up 100)" and (best["arm"], best["sie_warmup"]) == (
        "mlip-maco", 100)
    assert best["valid_zs_auc_combined"]["mean"] == pytest.approx(0.04)


def test_data_efficiency_statistics_against_hand_computation():
    base = {"model": "mlip-tiny", "steps": 400, "global_batch": 64, "synthetic_n": 6000, "mask_ratio": 0.25,
            "lambda_local": 4.0, "environment": {"cpu": "cpu", "torch": "2"}, "pointing_chance": 0.05}
    auc = {("clip", 1.0): (0.70, 0.72, 0.71), ("clip", 0.1): (0.60, 0.61, 0.59),
           ("mlip", 1.0): (0.72, 0.73, 0.73), ("mlip", 0.1): (0.65, 0.66, 0.64)}
    records = [{**base, "arm": arm, "mask_ratio": 0.0 if arm == "clip" else 0.25,
                "lambda_local": 0.0 if arm == "clip" else 4.0, "seed": s, "train_fraction": f,
                "num_train": round(4800 * f), "zs_auc_combined": v[s], "pointing_accuracy": 0.1}
               for (arm, f), v in auc.items() for s in range(3)]
    at_full = [m - c for m, c in zip(auc[("mlip", 1.0)], auc[("clip", 1.0)])]
    at_tenth = [m - c for m, c in zip(auc[("mlip", 0.1)], auc[("clip", 0.1)])]
    change = [a - b for a, b in zip(at_tenth, at_full)]
    tables = efficiency.efficiency_tables(records)
    (_, rows), (_, diffs), (caption, trend) = tables
    assert [(r["configuration"], r["share"], r["pairs"]) for r in rows] == [
        ("clip (r=0)", "1", "4800"), ("clip (r=0)", "0.1", "480"), ("mlip (r=0.25, λl=4)", "1", "4800"),
        ("mlip (r=0.25, λl=4)", "0.1", "480")]
    assert [d["share"] for d in diffs] == ["1", "0.1"]
    for row, d in zip(diffs, (at_full, at_tenth)):
        mean, low, high = _t_interval(d)
        assert row["zs_auc_combined"] == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    mean, low, high = _t_interval(change)
    got = efficiency.change_as_data_shrinks(*efficiency.comparisons(records)[0][1:], "zs_auc_combined")
    assert (got["mean"], got["low"], got["high"]) == pytest.approx((mean, low, high))
    assert trend[0]["zs_auc_combined: smallest - largest share"] == f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
    [auc_sentence, pointing_sentence] = efficiency.summary_sentences(records)
    assert auc_sentence in caption and "at 10% of the training pairs (480)" in auc_sentence
    assert f"changes by {mean:+.3f} [{low:+.3f}, {high:+.3f}]: the advantage grows as data shrinks (the interval " \
           f"excludes 0" in auc_sentence
    assert pointing_sentence.endswith("changes by +0.000 [+0.000, +0.000]: the advantage does not change as data "
                                      "shrinks.")


def test_worker_processes_get_the_thread_count(tmp_path, monkeypatch):
    """--threads sets each worker's OMP_NUM_THREADS (default cores // jobs); a worker that dies is a failure."""
    import argparse

    from tools.ablation import runs

    seen = []

    class DeadWorker:
        returncode = 3

        def __init__(self, cmd, env, **kwargs):
            seen.append((cmd, env["OMP_NUM_THREADS"]))

        def poll(self):
            return self.returncode

    monkeypatch.setattr(runs.subprocess, "Popen", DeadWorker)
    monkeypatch.setattr(runs.time, "sleep", lambda s: None)
    monkeypatch.setattr(runs.os, "cpu_count", lambda: 4)
    todo = plan((0, 1), Grid(arms=("clip",), ratios=(0.5,), preset_row=False))
    for threads, jobs, want in ((1, 1, "1"), (None, 2, "2"), (None, 1, "4")):
        seen.clear()
        args = argparse.Namespace(ds_config=str(tmp_path / "ds.json"), num_workers=0, jobs=jobs, threads=threads,
                                  work_dir=tmp_path / "work", cache_dir=tmp_path / "cache")
        assert runs.run_all(todo, {"steps": 3}, args, tmp_path, lambda r: None) == len(todo)
        assert [t for _, t in seen] == [want] * len(todo)
        assert all("--run-one" in cmd for cmd, _ in seen)
    with pytest.raises(SystemExit):
        main(_toy_args(tmp_path, "--threads", "0"))
