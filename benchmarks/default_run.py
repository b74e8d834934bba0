"""Records a finished default training run (``deepspeed train.py --deepspeed_config ds.json``) as
``benchmarks/results/default_run_cpu.json`` (+ its loss-curve PNG) and regenerates the README tables.

    python benchmarks/default_run.py --run runs/<name> [--localisation eval/loc/summary.json]

Every number comes from the run's ``summary.json`` (``--localisation`` takes the pointing accuracy from a
later ``python -m mlip_fast.eval localisation`` summary of the same export instead).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE)]

import harness  # noqa: E402


def _localisation(summary: dict, override: Path | None) -> dict:
    if override is None:
        return summary["localisation_test"]
    data = json.loads(override.read_text())
    return data.get("metrics", data)


def record(run: Path, localisation: Path | None = None) -> Path:
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("status") != "completed":
        raise SystemExit(f"{run} did not finish (status {summary.get('status')!r})")
    zs = summary["zero_shot_test"]
    loc = _localisation(summary, localisation)
    rows = [
        {"metric": f"zero-shot AUC, {name}", "value": auc, "chance": zs.get("chance_auc", 0.5)}
        for name, auc in zs["auc"].items()
    ]
    rows.append({"metric": "zero-shot AUC, macro (CheXpert-5)", "value": zs["auc_macro"], "chance": zs.get("chance_auc", 0.5)})
    rows.append({"metric": "localisation pointing accuracy", "value": loc["pointing_accuracy"], "chance": loc["chance"]})
    rows.append({"metric": "wall time (s), generation + training + evaluation", "value": summary["wall_time_s"], "chance": ""})
    rows.append({"metric": "training samples/s", "value": summary["samples_per_s"], "chance": ""})
    env = {
        "device": summary.get("device", "cpu"),
        "cpu": harness.environment().get("cpu"),
        "torch": summary["versions"].get("torch"),
        "triton": summary["versions"].get("triton"),
        "date": datetime.datetime.fromtimestamp((run / "summary.json").stat().st_mtime, datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = {
        "benchmark": "default training run: deepspeed train.py --deepspeed_config ds.json",
        "environment": env,
        "run": {k: summary.get(k) for k in ("steps", "global_batch", "world_size", "zero_stage", "dtype", "model", "data", "args", "seed")},
        "zero_shot_test": zs,
        "localisation_test": loc,
        "table": rows,
    }
    target = harness.RESULTS / "default_run_cpu.json"
    target.write_text(json.dumps(out, indent=1, default=str) + "\n")
    curves = run / "training_curves.png"
    if curves.exists():
        shutil.copyfile(curves, harness.RESULTS / "default_run_curves.png")
    harness.write_readme_table()
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the finished run folder (holds summary.json)")
    parser.add_argument("--localisation", type=Path, default=None, help="summary.json of a later localisation eval")
    args = parser.parse_args(argv)
    print(f"wrote {record(args.run, args.localisation)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
