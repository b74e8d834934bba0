"""The end of a training run (rank 0): the consolidated fp32 export that ``from_pretrained`` loads, the final
test evaluation of that export (zero-shot, and localisation on the synthetic benchmark), the curves PNG,
``summary.json`` (the one run record, with versions, backends, skipped optimizer steps and every skipped row)
and the model card; then the summary is shared with every rank.

A resumed run that had nothing left to train (it resumed a finished run) keeps that run's records: its
``summary.json``, export, model card, evaluation and curves are not rewritten.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

from mlip_fast._records import SUMMARY_FILE, versions
from mlip_fast.models import create_model, from_pretrained, write_model_card
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train.checkpoint_save import export_consolidated
from mlip_fast.train.compile import compile_record
from mlip_fast.train.evaluation import integrity, integrity_line, localisation, zero_shot
from mlip_fast.train.fit import Fit
from mlip_fast.train.process import on_rank0
from mlip_fast.train.reporting import plot_metrics
from mlip_fast.train.run import Engine, RunData, or_skip, report_skipped
from mlip_fast.train.setup import RunState

__all__ = ["finish", "format_summary", "time_breakdown"]


def finish(run: RunState, data: RunData, e: Engine, done: Fit) -> dict:
    """Exports, evaluates and writes the summary on rank 0; returns the summary on every rank."""
    summary = None
    if run.rank == 0:
        finished = _finished_record(run, done)
        if finished is not None:
            summary = finished
            run.reporter.log("the run in %s had already finished (step %d): its records are kept as they are",
                             run.run_dir, done.result.steps)
        else:
            summary = _summary(run, data, e, done)
            path = run.reporter.write_summary(summary)
            run.reporter.log("%s", format_summary(summary, path))
    return on_rank0(lambda: summary, run.rank)


def _finished_record(run: RunState, done: Fit):
    """The summary of the run this one resumed when it was already finished at the resumed step (nothing
    trained, its summary.json written by the same folder); None otherwise."""
    path = run.run_dir / SUMMARY_FILE
    if run.resume is None or done.result.steps != run.resume.step or not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("steps") == done.result.steps else None


def _final_evaluation(run: RunState, data: RunData, exported, step: int) -> dict:
    args, reporter, final = run.args, run.reporter, {}
    test = data.eval_sets.zero_shot_set("test")
    zs = None if test is None else or_skip(reporter, "test zero-shot evaluation", zero_shot, exported, test,
                                           data.eval_sets.prompts, max_samples=args.eval_max_samples,
                                           progress=not args.no_progress)
    if zs is not None:
        full = zs.pop("full")
        final["zero_shot"] = zs
        (run.run_dir / "eval_zero_shot.json").write_text(json.dumps(full, indent=2, default=str) + "\n")
        reporter.record("eval", step=step, split="test", auc_macro=zs["auc_macro"], auc=zs["auc"])
    root = data.eval_sets.synthetic_root
    loc = None if root is None else or_skip(reporter, "test localisation", localisation, exported, root, "test",
                                            max_samples=args.eval_max_samples, progress=not args.no_progress)
    if loc is not None:
        final["localisation"] = loc
        reporter.record("eval", step=step, split="test", localisation=loc["pointing_accuracy"],
                        localisation_chance=loc["chance"])
    diag = None if root is None or not args.diagnose else or_skip(
        reporter, "test integrity diagnostics", integrity, exported, root, "test", max_samples=args.eval_max_samples)
    if diag is not None:
        final["integrity"] = diag
        reporter.record("eval", step=step, split="test", integrity=diag)
        reporter.log("%s", integrity_line(diag))
    return final


def _summary(run: RunState, data: RunData, e: Engine, done: Fit) -> dict:
    args, reporter, result = run.args, run.reporter, done.result
    export_dir = run.run_dir / ckpt.EXPORT_DIR
    t_export = time.perf_counter()
    fresh = create_model(e.model_cfg, tokenizer=e.tokenizer)
    export_consolidated(run.run_dir / ckpt.CHECKPOINT_DIR, ckpt.tag_for(result.steps), fresh, export_dir)
    exported = from_pretrained(export_dir)
    run.times.add("export", time.perf_counter() - t_export)
    reporter.log("exported consolidated fp32 weights to %s (%.1f s)", export_dir, time.perf_counter() - t_export)
    t_eval = time.perf_counter()
    final = {} if args.no_final_eval else _final_evaluation(run, data, exported, result.steps)
    eval_s = time.perf_counter() - t_eval
    run.times.add("final_evaluation", eval_s)
    t_records = time.perf_counter()
    png = plot_metrics(run.run_dir / "metrics.jsonl", run.run_dir / "training_curves.png")
    valid, test = data.eval_sets.valid, data.eval_sets.test
    at_start = data.skipped
    train_at_end = report_skipped(reporter, "train", data.train_set, reprobe=True, after=len(at_start["train"]))
    skipped = [{"split": split, **item} for split, found in {**at_start, "train": train_at_end}.items()
               for item in found]
    summary = {
        "status": "completed",
        "steps": result.steps,
        "resumed_from_step": e.start_step if run.resume is not None else None,
        "wall_time_s": round(run.elapsed(), 2),
        "setup_s": round(done.setup_s, 2),
        "train_s": round(result.wall_s, 2),
        "final_eval_s": round(eval_s, 2),
        "samples_per_s": round(result.samples / max(result.wall_s, 1e-9), 2),
        "skipped_steps": result.skipped_steps,
        "final_loss": result.last_terms,
        "final_loss_mean_last_steps": result.mean_terms,
        "zero_shot_test": final.get("zero_shot"),
        "localisation_test": final.get("localisation"),
        "integrity_test": final.get("integrity"),
        "validation_history": done.eval_history,
        "checkpoint": done.checkpoint,
        "export": str(export_dir),
        "curves_png": str(png) if png is not None else None,  # None: matplotlib not installed
        "metrics_jsonl": str(run.run_dir / "metrics.jsonl"),
        "backends": done.backends,
        "torchcompile": compile_record(e.compiled, result.step_s),
        "world_size": run.ranks.world,
        "device": run.device_type,
        "cpu_count": os.cpu_count(),
        "zero_stage": run.zero_stage,
        "dtype": str(e.dtype).replace("torch.", ""),
        "global_batch": run.global_batch,
        "micro_batch": run.micro,
        "gradient_accumulation": run.accum,
        "data": {"source": args.data, "path": data.path, "n_train": len(data.train_set),
                 "train_fraction": args.train_fraction,
                 "n_valid": len(valid) if valid is not None else 0, "n_test": len(test) if test is not None else 0},
        "model": e.model_cfg.to_dict(),
        "loss": dataclasses.asdict(e.criterion.config),
        "parameters": e.n_params,
        "ds_config": e.config,
        "args": vars(args),
        "seed": args.seed,
        "versions": versions(),
        "skipped": {"count": len(skipped), "items": skipped},
    }
    # the export's model card gets the run's data, training and evaluation numbers
    summary["model_card"] = str(write_model_card(export_dir, exported, summary))
    run.times.add("records", time.perf_counter() - t_records)
    summary["time_breakdown"] = time_breakdown(run, result)
    return summary


def time_breakdown(run: RunState, result) -> dict:
    """Where the run's wall time went (:mod:`mlip_fast.train.timing`): the run's phases in seconds (``other``:
    what they leave of the wall time, mostly writing summary.json), and the training loop's phases in seconds and
    milliseconds per step, with the steps' own throughput (samples per second of the steps alone, without the
    periodic evaluations and checkpoints)."""
    wall = run.elapsed()
    steps = result.samples // max(1, run.global_batch)
    loop = run.times.seconds.get("training", 0.0)
    return {
        "wall_s": round(wall, 2),
        "run_s": run.times.run_split(wall),
        "steps": steps,
        "training_step": run.times.training_split(steps),
        "step_samples_per_s": round(steps * run.global_batch / loop, 2) if loop > 0 else None,
    }


def format_summary(summary: dict, path) -> str:
    """The end-of-run report printed to the console."""
    lines = ["", "=" * 72, "MLIP training finished", "=" * 72,
             f"steps {summary['steps']}, wall time {summary['wall_time_s']:.1f} s (setup {summary['setup_s']:.1f} s, "
             f"training {summary['train_s']:.1f} s, final evaluation {summary['final_eval_s']:.1f} s), "
             f"{summary['samples_per_s']:.1f} samples/s"]
    loss = summary["final_loss_mean_last_steps"] or summary["final_loss"]
    if loss:
        lines.append("final loss (mean of the last steps): " + ", ".join(f"{k} {v:.4f}" for k, v in loss.items()))
    zs = summary.get("zero_shot_test")
    if zs:
        lines.append(f"zero-shot AUC on the test split ({zs['n_images']} images), chance 0.500:")
        for name, auc in zs["auc"].items():
            lines.append(f"  {name:<18} {auc:.3f}" if auc is not None else f"  {name:<18} skipped")
        lines.append(f"  {'macro':<18} {zs['auc_macro']:.3f}   (chance 0.500)")
    loc = summary.get("localisation_test")
    if loc:
        lines.append(f"localisation (pointing accuracy of {loc['n_sentences']} finding sentences): "
                     f"{loc['pointing_accuracy']:.3f}   (chance {loc['chance']:.3f})")
    compiled = summary.get("torchcompile") or {}
    if compiled.get("enabled"):
        lines.append(f"torch.compile ({compiled['backend']}): " + ", ".join(
            f"{label} {compiled[k]} s" for k, label in (("compile_s", "compiling"), ("first_step_s", "first step"),
                                                        ("steady_step_s", "steady step")) if k in compiled))
    times = summary.get("time_breakdown")
    if times:
        shown = {k: v for k, v in times["run_s"].items() if v >= 0.05}
        lines.append("wall time by phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in shown.items()))
        lines.append("training step by phase (ms per step): " + ", ".join(
            f"{k} {v['ms_per_step']:.1f}" for k, v in times["training_step"].items()))
    lines += [f"checkpoint: {summary['checkpoint']}", f"export (from_pretrained): {summary['export']}",
              f"curves: {summary['curves_png']}", f"metrics: {summary['metrics_jsonl']}", f"summary: {path}",
              "=" * 72]
    return "\n".join(lines)
