"""The ablation's runs: each trains through the training app and is evaluated from its export, in this process or
in worker processes (``python -m tools.ablation --run-one``); a finished run leaves its record in its folder. Also
the step-time measurement of two configurations in one process and the masking diagnosis of the kept runs.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from benchmarks import harness
from mlip_fast.constants import ESTIMATOR_MODES
from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
from mlip_fast.models import create_model, from_pretrained, get_model_config, get_tokenizer
from mlip_fast.preprocess.tokenization import tokenize_reports
from mlip_fast.preprocess.transforms import ImageTransform
from mlip_fast.train.args import SPEC_LAMBDA_LOCAL
from mlip_fast.train.main import train
from tools.ablation.evaluate import brightness_auc, evaluate, integrity_record
from tools.ablation.plan import (RECORD_FILE, SCHEDULE_KEYS, SPEC_MASK_RATIO, RunSpec, schedule_of,
                                 write_json_atomic)
from tools.ablation.tables import config_label, group_runs, mean_std

ROOT = harness.ROOT


def _git_commit() -> Optional[str]:
    try:
        proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() or None


def run_one(spec: RunSpec, schedule: dict, work_dir: Path, cache_dir: Path, synthetic_root: Path) -> dict:
    """Trains one run in this process through the training app, evaluates its export and writes its record
    to ``<run folder>/record.json`` (atomically: a record file exists only for a finished run)."""
    run_dir = work_dir / "runs" / spec.key
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt: start it again
    start = time.perf_counter()
    argv = ["--deepspeed_config", schedule["ds_config"], "--model", schedule["model"],
            "--steps", str(schedule["steps"]), "--synthetic-n", str(schedule["synthetic_n"]),
            "--image-size", str(schedule["image_size"]), "--cache-dir", str(cache_dir), "--output-dir", str(run_dir),
            "--num-workers", str(schedule.get("num_workers", 1)), "--eval-every", "0", "--save-every", "0",
            "--keep-checkpoints", "1", "--no-final-eval", "--no-progress",
            "--text-dropout", f"{schedule['text_dropout']:g}", *spec.train_flags()]
    summary = train(argv)
    if summary["model"]["local_matching"] != spec.matching:  # the record must say what was trained
        raise RuntimeError(f"{spec.key}: trained with {summary['model']['local_matching']!r} matching, the arm is "
                           f"{spec.matching!r}")
    metrics = evaluate(Path(summary["export"]), synthetic_root)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the export holds the weights
    record = {
        "arm": spec.arm, "mask_ratio": spec.mask_ratio, "lambda_local": spec.lambda_local,
        "lambda_sie": spec.lambda_sie, "seed": spec.seed, "key": spec.key, "local_matching": spec.matching,
        "ot_eps": spec.ot_eps, "ot_iters": spec.ot_iters, "sie_warmup": spec.sie_warmup,
        "train_fraction": spec.train_fraction, "num_train": summary["data"]["n_train"],
        **{k: schedule[k] for k in SCHEDULE_KEYS}, "ds_config": Path(schedule["ds_config"]).name,
        **metrics,
        "samples_per_s": summary["samples_per_s"], "train_s": summary["train_s"],
        "final_loss": summary["final_loss_mean_last_steps"], "global_batch": summary["global_batch"],
        "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - start, 1),
        "commit": _git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": {k: harness.environment("cpu").get(k) for k in ("cpu", "torch", "python", "cpu_count")},
    }
    write_json_atomic(run_dir / RECORD_FILE, record)
    return record


def finished_record(spec: RunSpec, schedule: dict, work_dir: Path) -> Optional[dict]:
    """The record a finished run left in its folder (e.g. when the collecting process was stopped first)."""
    path = work_dir / "runs" / spec.key / RECORD_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if schedule_of(record) == schedule else None


def run_threads(args) -> int:
    """Threads of one training run: ``--threads``, else the cores shared by ``--jobs`` runs (small CPU ops scale
    badly across threads, and a busy machine starves a multi-threaded process, so several single-threaded runs use
    the cores best)."""
    return args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))


def run_all(todo: list, schedule: dict, args, synthetic_root: Path, on_record: Callable[[dict], None]) -> int:
    """Runs ``todo``: in this process one after the other (``--jobs 0``), or in ``--jobs`` worker processes of
    :func:`run_threads` threads each. Returns the failures."""
    run_schedule = {**schedule, "ds_config": str(Path(args.ds_config).resolve()), "num_workers": args.num_workers}
    if args.jobs == 0:
        for i, spec in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {spec.key}", flush=True)
            on_record(run_one(spec, run_schedule, args.work_dir, args.cache_dir, synthetic_root))
        return 0
    threads = run_threads(args)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue, running, failures = list(todo), {}, 0
    while queue or running:
        while queue and len(running) < args.jobs:
            spec = queue.pop(0)
            cmd = [sys.executable, "-m", "tools.ablation", "--run-one", json.dumps(asdict(spec)),
                   "--schedule", json.dumps(run_schedule), "--work-dir", str(args.work_dir.resolve()),
                   "--cache-dir", str(args.cache_dir.resolve()), "--synthetic-root", str(synthetic_root.resolve())]
            log = open(logs / f"{spec.key}.log", "w")
            running[spec] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log)
            print(f"started {spec.key} ({len(todo) - len(queue)}/{len(todo)}, {threads} thread(s))", flush=True)
        time.sleep(2)
        for spec, (proc, log) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[spec]
            record = finished_record(spec, schedule, args.work_dir)
            if proc.returncode != 0 or record is None:
                failures += 1
                tail = (logs / f"{spec.key}.log").read_text()[-3000:]
                print(f"run {spec.key} failed (exit {proc.returncode}); log {logs / spec.key}.log:\n{tail}", flush=True)
                continue
            on_record(record)
    return failures


# ------------------------------------------------------------------------------------------------ step time
def measure_step_times(synthetic_root: Path, model: str, rounds: int, batch: int = 64,
                       configs: Sequence[RunSpec] = (RunSpec("clip", 0.0, 0.0, 0),
                                                    RunSpec("mlip", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL, 0))) -> dict:
    """Training-step time (forward, loss, backward, AdamW) of each config on the same batch of the benchmark's
    training images and reports, in this process, rounds interleaved (alternating order) after a warm-up."""
    cfg = get_model_config(model)
    data = SyntheticBenchmark(synthetic_root, split="train")
    size = int(np.asarray(data[0]["image"]).shape[-1])
    cfg = cfg.replace(vision={"image_size": size})
    tokenizer = get_tokenizer(cfg, corpus=[data.rows[i]["findings"] + " " + data.rows[i]["impression"]
                                           for i in range(len(data))])
    rows = [data[i] for i in range(min(batch, len(data)))]
    transform = ImageTransform(size, train=False, in_chans=cfg.vision.in_chans)
    text = tokenize_reports(tokenizer, [r["report"] for r in rows], cfg.text.max_length, cfg.text.max_sentences)
    inputs = {"images": torch.stack([transform(r["image"]) for r in rows]), **text}
    steps = {}
    for spec in configs:
        torch.manual_seed(0)
        net = create_model(cfg, tokenizer=tokenizer).train()
        ot = dict(ot_eps=spec.ot_eps, ot_iters=spec.ot_iters) if spec.matching == "ot" else {}
        criterion = MLIPLoss(lambda_local=spec.lambda_local, lambda_sie=spec.lambda_sie, local_matching=spec.matching,
                             **ot)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

        def step(net=net, criterion=criterion, opt=opt, r=spec.mask_ratio):
            loss, _ = criterion(**net(inputs, mask_ratio=r, seed=0))
            loss.backward()
            opt.step()
            clamp_logit_scales_(net)
            opt.zero_grad(set_to_none=True)

        steps[spec.key.rsplit("_s", 1)[0]] = step
    for step in steps.values():
        step()
        step()
    times = {k: [] for k in steps}
    names = list(steps)
    for i in range(rounds):
        for k in names if i % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            steps[k]()
            times[k].append(time.perf_counter() - t)
    base, cand = names[0], names[-1]
    table = [{"config": k, "batch": batch, "image_size": size, "step_s_min": min(v),
              "step_s_median": statistics.median(v), f"ratio_to_{base}_min": min(v) / min(times[base]),
              f"ratio_to_{base}_median": statistics.median(v) / statistics.median(times[base])}
             for k, v in times.items()]
    return {"environment": harness.environment("cpu"), "model": model, "rounds": rounds,
            "torch_threads": torch.get_num_threads(), "times_s": times,
            "ratio_min": min(times[cand]) / min(times[base]),
            "ratio_median": statistics.median(times[cand]) / statistics.median(times[base]), "table": table}


def step_time_configs(arms: Sequence[str], ot_eps: float, ot_iters: int) -> tuple:
    """What the step time compares: MLIP with OT matching against MLIP with max matching when an OT arm runs,
    else MLIP r=0.5 against CLIP r=0."""
    mlip = RunSpec("mlip", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL, 0)
    if any(a.endswith("-ot") for a in arms):
        return mlip, RunSpec("mlip-ot", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL, 0, ot_eps, ot_iters)
    return RunSpec("clip", 0.0, 0.0, 0), mlip


def diagnose(records: list, work_dir: Path, synthetic_root: Path, temperatures: Sequence[float] = (1.0, 0.25, 0.1),
             draws: int = 32) -> dict:
    """The integrity diagnostics (:func:`~tools.ablation.evaluate.integrity_record`, ``draws`` masks per image) of
    every masked run's exported model (its folder under ``work_dir``), at the run's mask ratio and each masking
    temperature (the Gumbel-top-k temperature of the estimator modes; the others mask uniformly at any); one table
    row per configuration (mean ± std over its seeds), with the pixel-brightness reference."""
    per_run, brightness = [], None
    for r in records:
        export = work_dir / "runs" / r["key"] / "export"
        if r["mask_ratio"] == 0.0 or not export.is_dir():
            continue
        model = from_pretrained(export)
        if brightness is None:
            brightness = brightness_auc(model, synthetic_root)
        run = {k: r.get(k) for k in ("key", "arm", "mask_ratio", "lambda_local", "ot_eps", "ot_iters", "sie_warmup",
                                     "seed")}
        trained = model.config
        for t in temperatures:
            if trained.sie_mode in ESTIMATOR_MODES or t == temperatures[0]:  # the others mask uniformly at any t
                model.config = trained.replace(mask_temperature=t)  # the model reads it at each forward
                diag = integrity_record(model, synthetic_root, draws=draws)
            run.update({k: diag[k] for k in ("sie_mode", "sie_mask_auc", "target_mask_auc", "kept_share_uniform",
                                             "n_images_with_findings")})
            run.update({f"{k}_t{t:g}": diag[k] for k in ("finding_kept_share", "weight_cv", "weight_finding_corr")})
        per_run.append(run)
    table = []
    for runs in group_runs(per_run).values():
        row = {"configuration": config_label(runs[0]), "seeds": len(runs),
               "kept share, uniform (K/P)": f"{runs[0]['kept_share_uniform']:.3f}"}
        for key, label in (("sie_mask_auc", "finding-patch AUC: per-patch score"), ("target_mask_auc", "its target")):
            row[label] = mean_std([x[key] for x in runs])
        row["pixel brightness"] = f"{brightness:.3f}"
        for t in temperatures:
            row[f"finding patches kept, t={t:g}"] = mean_std([x[f"finding_kept_share_t{t:g}"] for x in runs])
        for t in temperatures:
            row[f"weight CV, t={t:g}"] = mean_std([x[f"weight_cv_t{t:g}"] for x in runs])
        table.append(row)
    return {"environment": harness.environment("cpu"), "temperatures": list(temperatures), "draws": draws,
            "brightness_mask_auc": brightness, "runs": per_run, "table": table}
