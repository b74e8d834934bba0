"""Ablation of MLIP's parts on the built-in synthetic benchmark: does each part help, in this implementation?

Arms (same towers, data, steps, optimizer and schedule; only the loss terms and the masking differ):

========== ================================================================ ======================================
arm        what trains                                                      flags of ``train.py``
========== ================================================================ ======================================
clip       global image-report InfoNCE, whole image                         --mask-ratio 0 --lambda-local 0 --lambda-sie 0
flip       global InfoNCE on a uniformly random r-masked view               --mask-ratio r --lambda-local 0 --lambda-sie 0
flip+local flip + the patch-sentence loss                                   --mask-ratio r --lambda-local L --lambda-sie 0
mlip       flip+local + integrity estimator, integrity-scored masking and   --mask-ratio r --lambda-local L --lambda-sie 0.1
           integrity weights
flip+local flip+local with optimal-transport patch-sentence matching        ... --local-matching ot --ot-eps E
-ot                                                                         --ot-iters N
mlip-ot    mlip with optimal-transport patch-sentence matching              ... --local-matching ot --ot-eps E
                                                                            --ot-iters N
========== ================================================================ ======================================

An ``-ot`` arm trains, and is evaluated (local zero-shot scores, localisation maps), with the OT matching; its
record also holds the other reading (``*_max``: the same model scored with token-wise max; a max arm's record
holds ``*_ot``), which tells a difference the training makes from one the reading makes. ``--ot-eps`` and
``--ot-iters`` take several values: the OT arms then run on their grid (the sweep that chose the defaults, on the
validation split: ``benchmarks/results/ot_sweep_cpu.json``).

With ``--lambda-sie 0`` the estimator gets no gradient and keeps its zero-initialised output layer, so every
patch has logit 0: Gumbel-top-k over equal logits keeps a uniformly random K-subset (FLIP's masking) and every
image has the same kept integrity mass, which the mean-1 normalisation turns into weight 1 (no weighting).
Each record checks this (``estimator_constant``). Every masked arm runs at r = 0.5 (the method's default) and at
the synthetic preset's r = 0.25, with the method's patch-sentence weight 1; ``mlip`` also runs with the preset's
weight 4 at its ratio, the exact default run (``DEPARTURES``: the preset's departures from the method, measured
one at a time and together). Each configuration runs for every seed. ``--steps 1000 --arms mlip --ratios 0.5``
into another ``--out`` compares the preset with the method at the default run's length
(``ablation_preset_1000_cpu.json``).

Per run (records of ``benchmarks/results/ablation_cpu.json``, one per run), on the test split: zero-shot macro AUC
over the CheXpert-5 classes scored by global, local (patch-sentence) and combined similarity; localisation
pointing accuracy with its chance rate; linear-probe macro AUC with 1% and 10% of the training labels (the
probe's stopping step chosen on the validation split); training samples/s; how well the integrity estimator's
logits and its training target (each patch's best similarity to its own report's sentences) single out the
patches inside the findings (per-image AUC against the union of the finding masks, chance 0.5). The same
zero-shot and localisation numbers on the validation split (``valid_*``) are what any choice is made on.

One command, resumable: a finished run's record is kept and never redone; an interrupted run is started again.
The step-time ratio of MLIP at r = 0.5 against CLIP at r = 0 is measured in one process (interleaved rounds,
min and median) into ``ablation_step_time_cpu.json``. Then the PNG and the README tables are regenerated
(``harness.write_readme_table``; ``--readme`` does only that).

    python benchmarks/ablation.py [--steps 300] [--seeds 0 1 2] [--work-dir .cache/ablation]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [p for p in (str(ROOT), str(HERE)) if p not in sys.path]

import harness  # noqa: E402
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS  # noqa: E402
from mlip_fast.data.labels import CHEXPERT5  # noqa: E402
from mlip_fast.train.args import SPEC_LAMBDA_LOCAL, SYNTHETIC_PRESET  # noqa: E402

ARMS = ("clip", "flip", "flip+local", "mlip", "flip+local-ot", "mlip-ot")
DEFAULT_ARMS = ARMS[:4]  # the method's parts; the -ot arms are run on request
LOCAL_ARMS = ("flip+local", "mlip", "flip+local-ot", "mlip-ot")  # arms with the patch-sentence loss
# About 60 minutes for the whole default benchmark on a 2-core CPU with nothing else running (two runs at a
# time, one thread each; measured in the records' train_s / wall_s).
DEFAULT_STEPS = 400
SPEC_MASK_RATIO = 0.5
# The synthetic preset's departures from the method (mask ratio, patch-sentence weight), measured one at a time
# and together against the method's values.
DEPARTURES = {"mask_ratio": SYNTHETIC_PRESET["mask_ratio"], "lambda_local": SYNTHETIC_PRESET["lambda_local"]}
LAMBDA_SIE = 0.1
PROBE_FRACTIONS = (0.01, 0.1)
RESULTS = harness.RESULTS / "ablation_cpu.json"
PNG = harness.RESULTS / "ablation_cpu.png"
STEP_TIME_RESULTS = harness.RESULTS / "ablation_step_time_cpu.json"
MASKING_RESULTS = harness.RESULTS / "ablation_masking_cpu.json"
# What must agree between a kept record and this invocation for the record to count as this benchmark's.
SCHEDULE_KEYS = ("steps", "synthetic_n", "image_size", "ds_config", "model")
RECORD_FILE = "record.json"
METRICS = ("zs_auc_combined", "zs_auc_global", "zs_auc_local", "pointing_accuracy", "probe_auc_1pct",
           "probe_auc_10pct", "samples_per_s")
# test metrics, then the validation metrics that choices are made on
DIFFERENCE_METRICS = ("zs_auc_combined", "zs_auc_global", "zs_auc_local", "pointing_accuracy", "probe_auc_1pct",
                      "probe_auc_10pct", "valid_zs_auc_combined", "valid_pointing_accuracy")
# (A, B, label): paired differences A - B by seed at the same mask ratio
COMPARISONS = (("mlip", "flip+local", "MLIP - FLIP+local"), ("flip+local", "flip", "FLIP+local - FLIP"),
               ("flip", "clip", "FLIP - CLIP"), ("mlip-ot", "mlip", "MLIP-OT - MLIP"),
               ("flip+local-ot", "flip+local", "FLIP+local-OT - FLIP+local"))
# two-sided 95% Student t quantiles by degrees of freedom (a paired CI over n seeds has n - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


# ------------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class RunSpec:
    """One training run of the ablation."""

    arm: str
    mask_ratio: float
    lambda_local: float
    seed: int
    ot_eps: Optional[float] = None  # the OT arms' matching settings (None for the max arms)
    ot_iters: Optional[int] = None

    @property
    def lambda_sie(self) -> float:
        return LAMBDA_SIE if self.arm in ("mlip", "mlip-ot") else 0.0

    @property
    def matching(self) -> str:
        return "ot" if self.arm.endswith("-ot") else "max"

    @property
    def key(self) -> str:
        ot = f"_eps{self.ot_eps:g}_it{self.ot_iters}" if self.matching == "ot" else ""
        return f"{self.arm}_r{self.mask_ratio:g}_ll{self.lambda_local:g}{ot}_s{self.seed}"

    def train_flags(self) -> list:
        flags = ["--mask-ratio", f"{self.mask_ratio:g}", "--lambda-local", f"{self.lambda_local:g}",
                 "--lambda-sie", f"{self.lambda_sie:g}", "--seed", str(self.seed)]
        if self.matching == "ot":
            flags += ["--local-matching", "ot", "--ot-eps", f"{self.ot_eps:g}", "--ot-iters", str(self.ot_iters)]
        return flags


def plan(seeds: Sequence[int], ratios: Sequence[float], arms: Sequence[str] = DEFAULT_ARMS,
         preset_row: bool = True, ot_eps: Sequence[float] = (DEFAULT_OT_EPS,),
         ot_iters: Sequence[int] = (DEFAULT_OT_ITERS,)) -> list:
    """Every run of the benchmark, seed-major (the first seeds of every arm finish first); the OT arms once per
    (eps, iterations) of the grid."""
    configs = []
    for arm in arms:
        if arm == "clip":
            configs.append(("clip", 0.0, 0.0, None, None))
        elif arm == "flip":
            configs += [("flip", r, 0.0, None, None) for r in ratios]
        elif arm.endswith("-ot"):
            configs += [(arm, r, SPEC_LAMBDA_LOCAL, e, n) for r in ratios for e in ot_eps for n in ot_iters]
        else:
            configs += [(arm, r, SPEC_LAMBDA_LOCAL, None, None) for r in ratios]
    departed = (DEPARTURES["mask_ratio"], DEPARTURES["lambda_local"])
    if preset_row and "mlip" in arms and departed[1] != SPEC_LAMBDA_LOCAL:
        configs.append(("mlip", *departed, None, None))
    return [RunSpec(arm, r, lam, s, e, n) for s in seeds for arm, r, lam, e, n in configs]


# ------------------------------------------------------------------------------------------------ records
def load_records(path: Path) -> list:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise SystemExit(f"{path} is not a list of ablation records; pass --out to write elsewhere")
    return data


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def check_schedule(records: list, schedule: dict, path: Path) -> None:
    """Refuses to mix runs of another schedule into ``path`` (it would silently compare unlike runs)."""
    for r in records:
        other = {k: r.get(k) for k in SCHEDULE_KEYS}
        if other != schedule:
            raise SystemExit(f"{path} holds runs of another schedule ({other}, this one is {schedule}); pass "
                             f"--out to write elsewhere, or the same settings to continue it")


# ------------------------------------------------------------------------------------------------ evaluation
def _patch_coverage(masks: list, size: int, patch: int) -> np.ndarray:
    """Share of each patch (row-major grid) inside the union of ``masks`` (bool [size, size] each)."""
    union = np.zeros((size, size), bool)
    for m in masks:
        union |= m
    g = size // patch
    return union.reshape(g, patch, g, patch).mean(axis=(1, 3)).reshape(-1)


def _auc(positive: np.ndarray, scores: np.ndarray) -> Optional[float]:
    from mlip_fast.eval.metrics import roc_auc

    if positive.all() or not positive.any():
        return None
    return float(roc_auc(positive, scores))


@torch.no_grad()
def integrity_alignment(model, root: Path, split: str = "test", batch_size: int = 64) -> dict:
    """How well the integrity estimator's logits, and its training target, point at the findings.

    For every image with at least one finding mask: the patches whose area is at least half inside the union
    of the finding masks are positives; the AUC of a per-patch score at separating them from the other
    patches is taken per image and averaged (chance 0.5). Scores: the estimator's logits a[b, p] (from the
    patch embeddings, before the blocks) and the target it is trained towards, max over the image's own
    report sentences of cos(patch, sentence) on the unmasked image; and, as a reference that needs no
    training, the patch's mean pixel value (most findings are opacities: brighter than the lung around them).
    ``estimator_constant`` is True when every logit of every image is equal (an untrained estimator: uniform
    masking, no weighting).
    """
    from mlip_fast.eval.common import eval_transform, l2_normalise
    from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
    from mlip_fast.eval.localisation import mask_to_input_frame

    data = SyntheticBenchmark(root, split=split, with_findings=True)
    transform = eval_transform(model)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    est_auc, tgt_auc, bright_auc, constant = [], [], [], True
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(len(data), start + batch_size))]
        images = torch.stack([transform(r["image"]) for r in rows])
        _, tokens = model.visual.embeddings(images)
        logits = model.visual.estimator(tokens).float()
        constant &= bool((logits == logits[:, :1]).all())
        image = model.encode_image_local(images, mask_ratio=0.0)
        text = model.encode_text_local([r["report"] for r in rows])
        sim = torch.einsum("bpd,bsd->bps", l2_normalise(image["patches"]), l2_normalise(text["sentences"]))
        target = sim.masked_fill(~text["sentence_mask"][:, None, :], -math.inf).max(dim=-1).values
        brightness = torch.nn.functional.avg_pool2d(images.float().mean(1, keepdim=True), patch).flatten(1)
        for b, r in enumerate(rows):
            masks = [mask_to_input_frame(f["mask"], size) for f in r["findings"] if f.get("mask") is not None]
            if not masks:
                continue
            positive = _patch_coverage(masks, size, patch) >= 0.5
            for out, score in ((est_auc, logits[b]), (tgt_auc, target[b]), (bright_auc, brightness[b])):
                value = _auc(positive, score.numpy())
                if value is not None:
                    out.append(value)
    return {"sie_mask_auc": None if constant or not est_auc else float(np.mean(est_auc)),
            "target_mask_auc": float(np.mean(tgt_auc)) if tgt_auc else None,
            "brightness_mask_auc": float(np.mean(bright_auc)) if bright_auc else None,
            "estimator_constant": constant, "n_images_with_findings": len(tgt_auc)}


@torch.no_grad()
def masking_diagnostics(model, root: Path, mask_ratio: float, temperatures: Sequence[float], draws: int = 32,
                        split: str = "test", batch_size: int = 100) -> dict:
    """What integrity-scored masking does with a trained estimator's logits, on the images with findings.

    For each masking temperature t: the share of the finding patches (at least half inside the union of the
    finding masks) that Gumbel-top-k over logits / t keeps, averaged over ``draws`` seeded draws, against
    K / P for uniform masking (FLIP); and the coefficient of variation over images of the kept integrity
    mass, the weight MLIP gives each image (0 for uniform masking: every image is weighted alike). Also the
    mean over images of the standard deviation of the logits over the patches (how far from uniform the
    estimator is at all).
    """
    from mlip_fast.eval.common import eval_transform
    from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
    from mlip_fast.eval.localisation import mask_to_input_frame
    from mlip_fast.models.vision import num_kept
    from mlip_fast.ops.integrity_mask import integrity_mask

    data = SyntheticBenchmark(root, split=split, with_findings=True)
    transform = eval_transform(model)
    size, patch = model.config.vision.image_size, model.config.vision.patch_size
    logits, findings = [], []
    for start in range(0, len(data), batch_size):
        rows = [data[i] for i in range(start, min(len(data), start + batch_size))]
        keep = [i for i, r in enumerate(rows) if any(f.get("mask") is not None for f in r["findings"])]
        if not keep:
            continue
        images = torch.stack([transform(rows[i]["image"]) for i in keep])
        logits.append(model.visual.estimator(model.visual.embeddings(images)[1]).float())
        findings += [torch.from_numpy(_patch_coverage([mask_to_input_frame(f["mask"], size) for f in rows[i]["findings"]
                                                       if f.get("mask") is not None], size, patch) >= 0.5)
                     for i in keep]
    a = torch.cat(logits)
    positive = torch.stack(findings)
    p = a.shape[1]
    k = num_kept(p, mask_ratio)
    out = {"mask_ratio": mask_ratio, "kept_share_uniform": k / p, "logit_std": float(a.std(dim=1).mean()),
           "n_images": int(a.shape[0])}
    for t in temperatures:
        kept = torch.zeros_like(a)
        weights = []
        for d in range(draws):
            result = integrity_mask(a[..., None], a, k, temperature=t, seed=d, impl="reference")
            kept.scatter_add_(1, result.index, torch.ones_like(a[:, :k]))
            weights.append(result.integrity)
        w = torch.stack(weights)
        out[f"finding_kept_share_t{t:g}"] = float((kept / draws)[positive].mean())
        out[f"weight_cv_t{t:g}"] = float((w.std(dim=1) / w.mean(dim=1)).mean())
    return out


def _or_none(fn: Callable, *args, **kwargs):
    """``fn(...)``, or None when the evaluation data cannot serve it (a toy split without both outcomes)."""
    from mlip_fast.data.readers import EvalDataError

    try:
        return fn(*args, **kwargs)
    except EvalDataError:
        return None


def evaluate(export: Path, root: Path) -> dict:
    """The record's metrics of the exported model of one run (module docstring)."""
    from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
    from mlip_fast.eval.fewshot import few_shot_classify
    from mlip_fast.eval.localisation import evaluate_localisation
    from mlip_fast.eval.zeroshot import zero_shot_classify
    from mlip_fast.models import from_pretrained

    model = from_pretrained(export)
    split = {s: SyntheticBenchmark(root, split=s) for s in ("train", "valid", "test")}
    out = {}
    other = "max" if model.config.local_matching == "ot" else "ot"
    # the model's own matching on both splits, then the other reading on the test split (suffix _max / _ot)
    for name, matching in (("test", None), ("valid", None), ("test", other)):
        zs = _or_none(zero_shot_classify, model, split[name], "synthetic", mode="all", classes=list(CHEXPERT5),
                      skip_empty=True, progress=False, batch_size=64, local_matching=matching)
        loc = _or_none(evaluate_localisation, model, root, split=name, progress=False, batch_size=64,
                       local_matching=matching)
        prefix = "valid_" if name == "valid" else ""
        suffix = "" if matching is None else f"_{matching}"
        modes = ("global", "local", "combined") if name == "test" and matching is None else ("combined", "local")
        for mode in modes:
            out[f"{prefix}zs_auc_{mode}{suffix}"] = zs[mode]["macro"]["auc"] if zs else None
        out[f"{prefix}pointing_accuracy{suffix}"] = loc["pointing_accuracy"] if loc else None
        if matching is None:
            out[f"{prefix}pointing_chance"] = loc["chance"] if loc else None
    probe = _or_none(few_shot_classify, model, split["train"], split["test"], valid_data=split["valid"],
                     fractions=PROBE_FRACTIONS, methods=("linear",), seed=0, classes=list(CHEXPERT5), progress=False,
                     batch_size=64)
    for fraction in PROBE_FRACTIONS:
        key = f"{fraction * 100:g}%"
        entry = probe["linear"].get(key) if probe else None
        out[f"probe_auc_{fraction * 100:g}pct"] = entry["macro_auc"] if entry else None
    out.update(integrity_alignment(model, root, "test"))
    return out


# ------------------------------------------------------------------------------------------------ runs
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
    from mlip_fast.train.main import train

    run_dir = work_dir / "runs" / spec.key
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted earlier attempt: start it again
    start = time.perf_counter()
    argv = ["--deepspeed_config", schedule["ds_config"], "--model", schedule["model"],
            "--steps", str(schedule["steps"]), "--synthetic-n", str(schedule["synthetic_n"]),
            "--image-size", str(schedule["image_size"]), "--cache-dir", str(cache_dir), "--output-dir", str(run_dir),
            "--num-workers", str(schedule.get("num_workers", 1)), "--eval-every", "0", "--save-every", "0",
            "--keep-checkpoints", "1", "--no-final-eval", "--no-progress", *spec.train_flags()]
    summary = train(argv)
    metrics = evaluate(Path(summary["export"]), synthetic_root)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the export holds the weights
    record = {
        "arm": spec.arm, "mask_ratio": spec.mask_ratio, "lambda_local": spec.lambda_local,
        "lambda_sie": spec.lambda_sie, "seed": spec.seed, "key": spec.key, "local_matching": spec.matching,
        "ot_eps": spec.ot_eps, "ot_iters": spec.ot_iters,
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
    return record if {k: record.get(k) for k in SCHEDULE_KEYS} == schedule else None


def run_all(todo: list, schedule: dict, args, synthetic_root: Path, on_record: Callable[[dict], None]) -> int:
    """Runs ``todo``: in this process one after the other (``--jobs 0``), or in ``--jobs`` worker processes
    of ``cores // jobs`` threads each (small CPU ops scale badly across threads, and a busy machine starves a
    multi-threaded process, so several single-threaded runs use the cores best). Returns the failures."""
    run_schedule = {**schedule, "ds_config": str(Path(args.ds_config).resolve()), "num_workers": args.num_workers}
    if args.jobs == 0:
        for i, spec in enumerate(todo, 1):
            print(f"[{i}/{len(todo)}] {spec.key}", flush=True)
            on_record(run_one(spec, run_schedule, args.work_dir, args.cache_dir, synthetic_root))
        return 0
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    logs = args.work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    queue, running, failures = list(todo), {}, 0
    while queue or running:
        while queue and len(running) < args.jobs:
            spec = queue.pop(0)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(asdict(spec)),
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
    from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
    from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
    from mlip_fast.models import create_model, get_model_config, get_tokenizer
    from mlip_fast.preprocess.tokenization import tokenize_reports
    from mlip_fast.preprocess.transforms import ImageTransform

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
    """:func:`masking_diagnostics` and :func:`integrity_alignment` of every masked run's exported model (its
    folder under ``work_dir``), at the run's mask ratio; one table row per configuration (mean over its
    seeds)."""
    from mlip_fast.models import from_pretrained

    per_run = []
    for r in records:
        export = work_dir / "runs" / r["key"] / "export"
        if r["mask_ratio"] == 0.0 or not export.is_dir():
            continue
        model = from_pretrained(export)
        diag = masking_diagnostics(model, synthetic_root, r["mask_ratio"], temperatures, draws)
        per_run.append({"key": r["key"], "arm": r["arm"], "mask_ratio": r["mask_ratio"],
                        "lambda_local": r["lambda_local"], "seed": r["seed"], **diag,
                        **integrity_alignment(model, synthetic_root)})
    table = []
    for runs in _groups(per_run).values():
        row = {"configuration": _config_label(runs[0]), "seeds": len(runs),
               "kept share, uniform (K/P)": f"{runs[0]['kept_share_uniform']:.3f}",
               "estimator logit std": _mean_std([x["logit_std"] for x in runs])}
        for key, label in (("sie_mask_auc", "finding-patch AUC: estimator"), ("target_mask_auc", "its target"),
                           ("brightness_mask_auc", "pixel brightness")):
            row[label] = _mean_std([x[key] for x in runs])
        for t in temperatures:
            row[f"finding patches kept, t={t:g}"] = _mean_std([x[f"finding_kept_share_t{t:g}"] for x in runs])
        for t in temperatures:
            row[f"weight CV, t={t:g}"] = _mean_std([x[f"weight_cv_t{t:g}"] for x in runs])
        table.append(row)
    return {"environment": harness.environment("cpu"), "temperatures": list(temperatures), "draws": draws,
            "runs": per_run, "table": table}


# ------------------------------------------------------------------------------------------------ summaries
def _config_label(r: dict) -> str:
    if r["arm"] == "clip":
        return "clip (r=0)"
    lam = "" if r["arm"] == "flip" else f", λl={r['lambda_local']:g}"
    ot = f", ε={r['ot_eps']:g}, {r['ot_iters']} it" if r.get("ot_eps") is not None else ""
    return f"{r['arm']} (r={r['mask_ratio']:g}{lam}{ot})"


def _mean_std(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def paired_difference(a: dict, b: dict) -> Optional[dict]:
    """Mean of a[seed] - b[seed] over the seeds both have, with a two-sided 95% t interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if a[s] is not None and b[s] is not None]
    if not diffs:
        return None
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return {"mean": mean, "low": None, "high": None, "n": len(diffs)}
    df = len(diffs) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]
    half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(diffs)}


def _groups(records: list) -> dict:
    """{(arm, mask ratio, lambda_local, ot_eps, ot_iters): its runs} in table order (OT settings None for max)."""
    groups: dict = {}
    for r in records:
        key = (r["arm"], r["mask_ratio"], r["lambda_local"], r.get("ot_eps"), r.get("ot_iters"))
        groups.setdefault(key, []).append(r)
    order = {a: i for i, a in enumerate(ARMS)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1] != 0, -kv[0][1], order[kv[0][0]], kv[0][2],
                                                       kv[0][3] or 0, kv[0][4] or 0)))


def readme_tables(records: list) -> list:
    """[(caption, rows)] for the README: mean ± std over seeds per configuration, then paired differences."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']}, {first['synthetic_n']} synthetic pairs; "
             f"test split, mean ± std over seeds")
    rows = []
    for runs in _groups(records).values():
        row = {"configuration": _config_label(runs[0]), "seeds": len(runs)}
        for m in METRICS:
            row[m] = _mean_std([x.get(m) for x in runs], 1 if m == "samples_per_s" else 3)
        row["pointing_chance"] = _mean_std([x.get("pointing_chance") for x in runs])
        row["sie_mask_auc"] = _mean_std([x.get("sie_mask_auc") for x in runs])
        row["target_mask_auc"] = _mean_std([x.get("target_mask_auc") for x in runs])
        rows.append(row)
    diffs = []
    # keyed without the OT settings when each arm has one (the ablation); a sweep's grid has no pairs
    groups = _groups(records)
    short = {k[:3] for k in groups}
    by = ({key[:3]: {x["seed"]: x for x in runs} for key, runs in groups.items()} if len(short) == len(groups)
          else {})
    ratios = sorted({r["mask_ratio"] for r in records if r["mask_ratio"] > 0}, reverse=True)
    pairs = []
    for r in ratios:
        for a, b, label in COMPARISONS:
            ka = (a, r, SPEC_LAMBDA_LOCAL if a in LOCAL_ARMS else 0.0)
            kb = (b, 0.0 if b == "clip" else r, SPEC_LAMBDA_LOCAL if b in LOCAL_ARMS else 0.0)
            pairs.append((f"{label}, r={r:g}" + (" vs r=0" if b == "clip" else ""), ka, kb))
    preset = ("mlip", DEPARTURES["mask_ratio"], DEPARTURES["lambda_local"])
    spec = ("mlip", SPEC_MASK_RATIO, SPEC_LAMBDA_LOCAL)
    # the preset's departures from the method, one at a time and together
    pairs.append((f"MLIP r={preset[1]:g} - r={spec[1]:g} (λl={spec[2]:g})", ("mlip", preset[1], spec[2]), spec))
    pairs.append((f"MLIP λl={preset[2]:g} - λl={spec[2]:g} (r={preset[1]:g})", preset, ("mlip", preset[1], spec[2])))
    pairs.append((f"MLIP preset (r={preset[1]:g}, λl={preset[2]:g}) - method (r={spec[1]:g}, λl={spec[2]:g})",
                  preset, spec))
    for label, ka, kb in pairs:
        if ka not in by or kb not in by:
            continue
        row = {"difference (paired by seed)": label}
        for m in DIFFERENCE_METRICS:
            d = paired_difference({s: x.get(m) for s, x in by[ka].items()}, {s: x.get(m) for s, x in by[kb].items()})
            row[m] = "" if d is None else (f"{d['mean']:+.3f}" if d["low"] is None else
                                           f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        row["seeds"] = min(len(by[ka]), len(by[kb]))
        diffs.append(row)
    tables = [(where, rows)]
    if diffs:
        tables.append(("paired differences, mean [95% t interval] over seeds (an interval excluding 0 is a "
                       "difference at the 5% level); test split, then the validation split that choices are made on",
                       diffs))
    return tables


SWEEP_METRICS = ("valid_zs_auc_combined", "valid_zs_auc_local", "valid_pointing_accuracy", "zs_auc_combined",
                 "zs_auc_local", "pointing_accuracy", "samples_per_s")


def sweep_tables(records: list) -> list:
    """[(caption, rows)] of a grid of OT settings (``--ot-eps`` / ``--ot-iters`` with several values): the
    validation metrics the choice is made on first, then the test split's, mean over seeds per configuration."""
    if not records:
        return []
    first = records[0]
    where = (f"{first['environment'].get('cpu')}, torch {first['environment'].get('torch')}; {first['model']}, "
             f"{first['steps']} steps of batch {first['global_batch']}; OT settings chosen on the validation split "
             f"(valid_*), test split beside; pointing chance {_mean_std([x.get('valid_pointing_chance') for x in records])}"
             f" (validation)")
    rows = []
    for runs in _groups(records).values():
        row = {"configuration": _config_label(runs[0]), "seeds": len(runs)}
        for m in SWEEP_METRICS:
            row[m] = _mean_std([x.get(m) for x in runs], 1 if m == "samples_per_s" else 3)
        rows.append(row)
    return [(where, rows)]


def plot(records: list, path: Path) -> Path:
    """One panel per metric: every run as a dot, the mean of each configuration as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(records)
    labels = [_config_label(runs[0]) for runs in groups.values()]
    panels = (("zs_auc_combined", "zero-shot AUC, combined"), ("zs_auc_global", "zero-shot AUC, global"),
              ("zs_auc_local", "zero-shot AUC, local"), ("pointing_accuracy", "pointing accuracy"),
              ("probe_auc_1pct", "linear probe AUC, 1% labels"), ("probe_auc_10pct", "linear probe AUC, 10% labels"))
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    colours = {"clip": "tab:gray", "flip": "tab:blue", "flip+local": "tab:orange", "mlip": "tab:green",
               "flip+local-ot": "tab:red", "mlip-ot": "tab:purple"}
    for ax, (metric, title) in zip(axes.flat, panels):
        for i, runs in enumerate(groups.values()):
            values = [x[metric] for x in runs if x.get(metric) is not None]
            if not values:
                continue
            ax.bar(i, statistics.mean(values), color=colours[runs[0]["arm"]], alpha=0.45, width=0.7)
            ax.scatter([i] * len(values), values, color="k", s=12, zorder=3)
        if metric == "pointing_accuracy":
            chance = [x["pointing_chance"] for x in records if x.get("pointing_chance") is not None]
            if chance:
                ax.axhline(statistics.mean(chance), color="r", linestyle="--", linewidth=1, label="chance")
                ax.legend(loc="lower right")
        elif metric.startswith(("zs_", "probe_")):
            ax.axhline(0.5, color="r", linestyle="--", linewidth=1)
        values = [x[metric] for x in records if x.get(metric) is not None]
        if values:
            lo, hi = min(values), max(values)
            pad = max(0.02, 0.15 * (hi - lo))
            ax.set_ylim(max(0.0, lo - pad) if metric != "pointing_accuracy" else 0.0, min(1.0, hi + pad))
        ax.set_title(title)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    first = records[0]
    fig.suptitle(f"MLIP ablation on the synthetic benchmark ({first['model']}, {first['steps']} steps, "
                 f"{len({r['seed'] for r in records})} seeds; dots: runs, bars: means)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="optimizer steps of every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--ratios", type=float, nargs="+",
                        default=sorted({SPEC_MASK_RATIO, DEPARTURES["mask_ratio"]}, reverse=True),
                        help="mask ratios of the masked arms (default: the method's and the synthetic preset's)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(DEFAULT_ARMS),
                        help="the arms to run (default: the four max arms; the -ot arms are the OT matching's)")
    parser.add_argument("--ot-eps", type=float, nargs="+", default=[DEFAULT_OT_EPS],
                        help="OT regularisation of the -ot arms (several: a grid with --ot-iters)")
    parser.add_argument("--ot-iters", type=int, nargs="+", default=[DEFAULT_OT_ITERS],
                        help="Sinkhorn iterations of the -ot arms (several: a grid with --ot-eps)")
    parser.add_argument("--no-preset-row", action="store_true",
                        help="skip the run of MLIP with the preset's patch-sentence weight")
    parser.add_argument("--model", default="mlip-tiny")
    parser.add_argument("--synthetic-n", type=int, default=SYNTHETIC_PRESET["synthetic_n"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--ds-config", default=str(ROOT / "ds.json"), help="DeepSpeed config of every run")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each in its own process with cores / jobs threads; 0: one after "
                             "the other in this process")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="DataLoader workers of each run (the data order does not depend on it)")
    parser.add_argument("--work-dir", type=Path, default=Path(".cache/ablation"), help="run folders and logs")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"), help="synthetic benchmark cache")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the records (JSON list)")
    parser.add_argument("--png", type=Path, default=PNG)
    parser.add_argument("--step-time-out", type=Path, default=STEP_TIME_RESULTS)
    parser.add_argument("--step-time-rounds", type=int, default=20, help="0 skips the step-time measurement")
    parser.add_argument("--masking-out", type=Path, default=MASKING_RESULTS)
    parser.add_argument("--diagnose", action="store_true",
                        help="only measure what integrity-scored masking does with the kept runs' trained estimators "
                             "(their exports under --work-dir) and regenerate the PNG and README tables")
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
    if args.steps <= 0 or not args.seeds or args.jobs < 0:
        parser.error("--steps must be positive, --seeds non-empty and --jobs >= 0")
    if any(not 0.0 < r < 1.0 for r in args.ratios):
        parser.error("--ratios must be in (0, 1)")

    records = load_records(args.out)
    failures = 0
    if args.diagnose:
        from mlip_fast.train.data import synthetic_cache_dir

        root = synthetic_cache_dir(args.cache_dir, records[0]["image_size"], records[0]["synthetic_n"], 0)
        write_json_atomic(args.masking_out, diagnose(records, args.work_dir, root))
        print(f"wrote {args.masking_out}")
    elif not args.readme:
        ds_config = Path(args.ds_config)
        if not ds_config.is_file():
            parser.error(f"--ds-config {ds_config} does not exist")
        schedule = {"steps": args.steps, "synthetic_n": args.synthetic_n, "image_size": args.image_size,
                    "ds_config": ds_config.name, "model": args.model}
        check_schedule(records, schedule, args.out)
        from mlip_fast.train.data import prepare_synthetic

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
        for spec in plan(args.seeds, args.ratios, args.arms, not args.no_preset_row, args.ot_eps, args.ot_iters):
            if spec.key in done:
                continue
            left = finished_record(spec, schedule, args.work_dir)
            if left is not None:
                keep(left)
            else:
                todo.append(spec)
        print(f"ablation: {len(records)} runs kept in {args.out}, {len(todo)} to run", flush=True)
        failures = run_all(todo, schedule, args, master.parent, keep)
        if args.step_time_rounds > 0:
            # the threads of one training run, measured after every run has finished
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, args.jobs)))
            configs = step_time_configs(args.arms, args.ot_eps[0], args.ot_iters[0])
            result = measure_step_times(master.parent, args.model, args.step_time_rounds, configs=configs)
            write_json_atomic(args.step_time_out, result)
            print(f"step time {configs[-1].key} / {configs[0].key}: {result['ratio_min']:.3f} (min), "
                  f"{result['ratio_median']:.3f} (median) -> {args.step_time_out}")
    if records:
        print(f"wrote {plot(records, args.png)}")
    if not args.no_readme:
        print(f"wrote {harness.write_readme_table()}")
    if failures:
        print(f"{failures} run(s) failed; run the same command again to retry them", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
