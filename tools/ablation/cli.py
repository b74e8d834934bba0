"""The ablation's command (see the package docstring): plan, resume, run, measure the step time, then the PNG and
the README tables; ``--diagnose`` and ``--readme`` do only their part; ``--data-efficiency`` runs the arms on shares
of the training pairs instead (:mod:`tools.ablation.efficiency`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.train.args import SYNTHETIC_PRESET
from mlip_fast.train.data import prepare_synthetic, synthetic_cache_dir
from benchmarks import harness
from tools import readme_table
from mlip_fast.train.args import SPEC_LAMBDA_LOCAL
from tools.ablation import efficiency
from tools.ablation.plan import (ARMS, DATA_EFFICIENCY_ARMS, DATA_EFFICIENCY_FRACTIONS, DATA_EFFICIENCY_PNG,
                                 DATA_EFFICIENCY_RESULTS, DEFAULT_ARMS, DEFAULT_STEPS, DEPARTURES, MASKING_RESULTS,
                                 MODE_ARMS, PNG, RESULTS, SPEC_MASK_RATIO, STEP_TIME_RESULTS, Grid, RunSpec,
                                 check_schedule, load_records, model_text_dropout, plan, write_json_atomic)
from tools.ablation.runs import (diagnose, finished_record, measure_step_times, run_all, run_one, run_threads,
                                 step_time_configs)
from tools.ablation.tables import best_mode, format_interval, plot

ROOT = harness.ROOT
DESCRIPTION = "Ablation of MLIP's parts on the built-in synthetic benchmark: does each part help, in this implementation?"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.ablation", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+",
                        default=sorted({SPEC_MASK_RATIO, DEPARTURES["mask_ratio"]}, reverse=True),
                        help="mask ratios of the masked arms (default: the method's and the synthetic preset's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=None,
                        help=f"the arms to run (default: {' '.join(DEFAULT_ARMS)}; with --data-efficiency "
                             f"{' '.join(DATA_EFFICIENCY_ARMS)}); mlip-<mode> trains with --sie-mode <mode> (mlip: "
                             f"guided), the -ot arms with the OT matching")
    parser.add_argument("--lambda-local", type=float, default=SPEC_LAMBDA_LOCAL,
                        help="patch-sentence weight of the arms with the local loss (default: the method's)")
    parser.add_argument("--sie-warmup", type=int, nargs="+", default=[0],
                        help="integrity warm-ups (optimizer steps) of the arms with an integrity mode, each a "
                             "configuration of its own (0: none; e.g. 0 100 runs each mode with and without)")
    parser.add_argument("--data-efficiency", action="store_true",
                        help="the data-efficiency curve: every arm on each --fractions share of the training pairs, "
                             f"same steps, into {DATA_EFFICIENCY_RESULTS.name} and {DATA_EFFICIENCY_PNG.name} (no "
                             f"preset row, no step time)")
    parser.add_argument("--fractions", type=float, nargs="+", default=list(DATA_EFFICIENCY_FRACTIONS),
                        help="shares of the training pairs of --data-efficiency, each in (0, 1]")
    parser.add_argument("--ot-eps", type=float, nargs="+", default=[DEFAULT_OT_EPS],
                        help="OT regularisation of the -ot arms (several: a grid with --ot-iters)")
    parser.add_argument("--ot-iters", type=int, nargs="+", default=[DEFAULT_OT_ITERS],
                        help="Sinkhorn iterations of the -ot arms (several: a grid with --ot-eps)")
    parser.add_argument("--no-preset-row", action="store_true",
                        help="skip the run of MLIP with the preset's patch-sentence weight")
    parser.add_argument("--model", default="mlip-tiny")
    parser.add_argument("--synthetic-n", type=int, default=SYNTHETIC_PRESET["synthetic_n"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--text-dropout", type=float, default=None,
                        help="report encoder dropout of every run (default: the model config's, whatever the "
                             "training app's synthetic preset says; part of the schedule)")
    parser.add_argument("--ds-config", default=str(ROOT / "ds.json"), help="DeepSpeed config of every run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each in its own process with cores / jobs threads; 0: one after "
                             "the other in this process")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads of each worker process (default: cores / jobs; 1 leaves a core free for "
                             "other work with --jobs 1)")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader workers of each run (the data order does not depend on it)")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/ablation"), help="run folders and logs")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="synthetic benchmark cache")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the records (JSON list; default {RESULTS.name}, {DATA_EFFICIENCY_RESULTS.name} with "
                             f"--data-efficiency, under benchmarks/results)")
    parser.add_argument("--png", type=Path, default=None,
                        help=f"default {PNG.name}, {DATA_EFFICIENCY_PNG.name} with --data-efficiency")
    parser.add_argument("--step-time-out", type=Path, default=STEP_TIME_RESULTS)
    parser.add_argument("--step-time-rounds", type=int, default=20, help="0 skips the step-time measurement")
    parser.add_argument("--masking-out", type=Path, default=MASKING_RESULTS)
    parser.add_argument("--diagnose", action="store_true",
                        help="only measure what integrity-scored masking does with the kept runs' trained estimators "
                             "(their exports under --work-dir) and regenerate the PNG and README tables")
    parser.add_argument("--diagnose-draws", type=int, default=32, help="seeded masks per image of --diagnose")
    parser.add_argument("--readme", action="store_true", help="only regenerate the PNG and the README tables")
    parser.add_argument("--no-readme", action="store_true", help="do not touch the README tables")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # worker: one RunSpec as JSON
    parser.add_argument("--schedule", help=argparse.SUPPRESS)
    parser.add_argument("--synthetic-root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        run_one(RunSpec(**json.loads(args.run_one)), json.loads(args.schedule), args.work_dir, args.cache_dir,
                args.synthetic_root)
        return 0
    if args.steps <= 0 or not args.seeds or args.jobs < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--steps must be positive, --seeds non-empty, --jobs >= 0 and --threads >= 1")
    if args.text_dropout is not None and not 0.0 <= args.text_dropout < 1.0:
        parser.error("--text-dropout must be in [0, 1)")
    if any(not 0.0 < r < 1.0 for r in args.ratios):
        parser.error("--ratios must be in (0, 1)")
    if any(not 0 <= w < args.steps for w in args.sie_warmup) or args.lambda_local < 0:
        parser.error("--sie-warmup must be in [0, --steps) and --lambda-local >= 0")
    if any(not 0.0 < f <= 1.0 for f in args.fractions):
        parser.error("--fractions must be in (0, 1]")
    curve = args.data_efficiency
    args.arms = args.arms or list(DATA_EFFICIENCY_ARMS if curve else DEFAULT_ARMS)
    args.out = args.out or (DATA_EFFICIENCY_RESULTS if curve else RESULTS)
    args.png = args.png or (DATA_EFFICIENCY_PNG if curve else PNG)
    grid = Grid(arms=args.arms, ratios=args.ratios, lambda_local=args.lambda_local,
                preset_row=not (args.no_preset_row or curve), ot_eps=args.ot_eps, ot_iters=args.ot_iters,
                warmups=sorted(set(args.sie_warmup)), fractions=sorted(set(args.fractions), reverse=True) if curve
                else (1.0,))

    records = load_records(args.out)
    failures = 0
    if args.diagnose:
        root = synthetic_cache_dir(args.cache_dir, records[0]["image_size"], records[0]["synthetic_n"], 0)
        write_json_atomic(args.masking_out, diagnose(records, args.work_dir, root, draws=args.diagnose_draws))
        print(f"wrote {args.masking_out}")
    elif not args.readme:
        ds_config = Path(args.ds_config)
        if not ds_config.is_file():
            parser.error(f"--ds-config {ds_config} does not exist")
        schedule = {"steps": args.steps, "synthetic_n": args.synthetic_n, "image_size": args.image_size,
                    "ds_config": ds_config.name, "model": args.model,
                    "text_dropout": model_text_dropout(args.model) if args.text_dropout is None else args.text_dropout}
        check_schedule(records, schedule, args.out)
        master = prepare_synthetic(args.cache_dir, args.image_size, args.synthetic_n, 0, log=print)
        done = {r["key"] for r in records}

        def keep(record: dict) -> None:
            nonlocal records
            records = load_records(args.out) + [record]
            write_json_atomic(args.out, records)
            print(f"  {record['key']}: zero-shot AUC {record['zs_auc_combined']}, pointing "
                  f"{record['pointing_accuracy']}, {record['samples_per_s']} samples/s, {record['wall_s']} s",
                  flush=True)

        todo = []
        for spec in plan(args.seeds, grid):
            if spec.key in done:
                continue
            left = finished_record(spec, schedule, args.work_dir)
            if left is not None:
                keep(left)
            else:
                todo.append(spec)
        print(f"ablation: {len(records)} runs kept in {args.out}, {len(todo)} to run", flush=True)
        failures = run_all(todo, schedule, args, master.parent, keep)
        if args.step_time_rounds > 0 and not curve:
            # the threads of one training run, measured after every run has finished
            torch.set_num_threads(run_threads(args))
            configs = step_time_configs(args.arms, args.ot_eps[0], args.ot_iters[0])
            result = measure_step_times(master.parent, args.model, args.step_time_rounds, configs=configs)
            write_json_atomic(args.step_time_out, result)
            print(f"step time {configs[-1].key} / {configs[0].key}: {result['ratio_min']:.3f} (min), "
                  f"{result['ratio_median']:.3f} (median) -> {args.step_time_out}")
    if records:
        print(f"wrote {(efficiency.plot if curve else plot)(records, args.png)}")
        lines = efficiency.summary_sentences(records) if curve else []
        best = best_mode(records) if any(a in MODE_ARMS for a in args.arms) and not curve else None
        if best is not None:
            lines.append(f"best integrity mode on validation zero-shot AUC: {best['configuration']} (- FLIP+local: "
                         f"{format_interval(best['valid_zs_auc_combined'])}, pointing "
                         f"{format_interval(best['valid_pointing_accuracy'])})")
        print("\n".join(lines))
    if not args.no_readme:
        print(f"wrote {readme_table.write_readme_table()}")
    if failures:
        print(f"{failures} run(s) failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failures else 0
