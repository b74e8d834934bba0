"""Records a finished default training run (``deepspeed train.py --deepspeed_config ds.json``) as
``benchmarks/results/default_run_cpu.json`` (+ its loss-curve PNG) and regenerates the README tables.

    python -m tools.default_run --run runs/<name> [--localisation eval/loc/summary.json] [--before runs/<old>]
    python -m tools.default_run --measure [--wait-quiet 1200] [--before runs/<old>]

Every number comes from the run's ``summary.json`` (``--localisation`` takes the pointing accuracy from a
later ``python -m mlip_fast.eval localisation`` summary of the same export instead), including where the wall
time went (``time_breakdown``: the run's phases and the training step's). ``--measure`` runs ``make train``'s
command itself (``scripts/train.sh``, into ``runs/default-<date>``) and adds what only the outside sees: the
whole command's wall time (so the launcher, interpreter start and imports are counted too) and the machine's
load average before and after, after waiting (``--wait-quiet S``, at most S seconds) for the 1-minute load to
fall below 0.5, checked every 30 s. ``--before`` adds a run of the previous default settings as the "before"
column (its breakdown, throughput and metrics).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import harness
from tools import readme_table

REPO = harness.ROOT

QUIET_LOAD = 0.5


def _localisation(summary: dict, override: Path | None) -> dict:
    if override is None:
        return summary["localisation_test"]
    data = json.loads(override.read_text())
    return data.get("metrics", data)


def _read(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise SystemExit(f"{run} did not finish (status {summary.get('status')!r})")
    return summary


def _rows(summary: dict, loc: dict, command: dict | None) -> list:
    """(metric, value, chance) of a run: quality, time, throughput, then the time breakdown."""
    zs = summary["zero_shot_test"]
    chance = zs.get("chance_auc", 0.5)
    rows = [(f"zero-shot AUC, {name}", auc, chance) for name, auc in zs["auc"].items()]
    rows.append(("zero-shot AUC, macro (CheXpert-5)", zs["auc_macro"], chance))
    rows.append(("localisation pointing accuracy", loc["pointing_accuracy"], loc["chance"]))
    rows.append(("localisation pointing accuracy / chance", loc["pointing_accuracy"] / loc["chance"], 1.0))
    if command is not None:
        rows.append(("wall time (s), the whole command", command["wall_s"], ""))
    rows.append(("wall time (s), the app: generation + training + evaluation", summary["wall_time_s"], ""))
    rows.append(("training samples/s (steps, evaluations and checkpoints of the loop)", summary["samples_per_s"], ""))
    times = summary.get("time_breakdown")
    if times:
        rows.append(("training samples/s (the steps alone)", times["step_samples_per_s"], ""))
        if command is not None:
            rows.append(("time (s): launcher, interpreter start, imports", command["launcher_s"], ""))
        rows += [(f"time (s): {name.replace('_', ' ')}", value, "") for name, value in times["run_s"].items()]
        rows += [(f"step (ms): {name.replace('_', ' ')}", value["ms_per_step"], "")
                 for name, value in times["training_step"].items()]
    return rows


def record(run: Path, localisation: Path | None = None, before: Path | None = None,
           command: dict | None = None) -> Path:
    summary = _read(run)
    zs = summary["zero_shot_test"]
    loc = _localisation(summary, localisation)
    rows = _rows(summary, loc, command)
    old = None
    if before is not None:
        old_summary = _read(before)
        old = {metric: value for metric, value, _ in _rows(old_summary, old_summary["localisation_test"], None)}
    table = [{"metric": m, "value": v, "chance": c, **({"before": old.get(m, "")} if old is not None else {})}
             for m, v, c in rows]
    env = {
        "device": summary.get("device", "cpu"),
        "cpu": harness.environment().get("cpu"),
        "cpu_count": summary.get("cpu_count"),
        "torch": summary["versions"].get("torch"),
        "triton": summary["versions"].get("triton"),
        "date": datetime.datetime.fromtimestamp((run / "summary.json").stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = {
        "benchmark": "default training run: deepspeed train.py --deepspeed_config ds.json",
        "environment": env,
        "command": command,
        "run": {k: summary.get(k) for k in ("steps", "global_batch", "world_size", "zero_stage", "dtype", "model", "data", "args", "seed")},
        "zero_shot_test": zs,
        "localisation_test": loc,
        "validation_history": summary.get("validation_history"),
        "time_breakdown": summary.get("time_breakdown"),
        "before": None if before is None else {
            "run": {k: old_summary.get(k) for k in ("steps", "global_batch", "args")},
            "wall_time_s": old_summary["wall_time_s"], "samples_per_s": old_summary["samples_per_s"],
            "zero_shot_auc_macro": old_summary["zero_shot_test"]["auc_macro"],
            "localisation_test": {k: old_summary["localisation_test"][k] for k in ("pointing_accuracy", "chance")},
            "time_breakdown": old_summary.get("time_breakdown")},
        "table": table,
    }
    target = harness.RESULTS / "default_run_cpu.json"
    target.write_text(json.dumps(out, indent=1, default=str) + "\n")
    curves = run / "training_curves.png"
    if curves.exists():
        shutil.copyfile(curves, harness.RESULTS / "default_run_curves.png")
    readme_table.write_readme_table()
    return target


def wait_quiet(limit_s: float, every_s: float = 30.0) -> list:
    """Waits until the 1-minute load average is below QUIET_LOAD (at most ``limit_s``); returns the load then."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= QUIET_LOAD and time.monotonic() < deadline:
        time.sleep(every_s)
    return [round(v, 2) for v in os.getloadavg()]


def measure(extra: list, wait_s: float) -> tuple:
    """Runs ``scripts/train.sh`` (what ``make train`` runs) into a new run folder; returns (run folder, command
    record: wall time, launcher time, load averages, whether the machine was quiet when it started)."""
    name = f"default-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    load_before = wait_quiet(wait_s) if wait_s > 0 else [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    proc = subprocess.run(["bash", "scripts/train.sh", "--run-name", name, "--no-progress", *extra], cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the default run failed (exit {proc.returncode})")
    run = REPO / "runs" / name
    app = json.loads((run / "summary.json").read_text())["wall_time_s"]
    return run, {"command": "bash scripts/train.sh (make train)", "wall_s": round(wall, 2),
                 "launcher_s": round(wall - app, 2), "loadavg_before": load_before,
                 "loadavg_after": [round(v, 2) for v in os.getloadavg()], "quiet_at_start": load_before[0] < QUIET_LOAD}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.default_run", description=__doc__.splitlines()[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", type=Path, help="the finished run folder (holds summary.json)")
    what.add_argument("--measure", action="store_true", help="run make train's command now and record it")
    parser.add_argument("--localisation", type=Path, default=None, help="summary.json of a later localisation eval")
    parser.add_argument("--before", type=Path, default=None, help="a finished run of the previous default settings")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                        help=f"with --measure: wait up to S seconds for a 1-minute load below {QUIET_LOAD}")
    args, extra = parser.parse_known_args(argv)
    command = None
    run = args.run
    if args.measure:
        run, command = measure(extra, args.wait_quiet)
    elif extra:
        parser.error(f"unrecognised arguments: {' '.join(extra)}")
    print(f"wrote {record(run, args.localisation, args.before, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
