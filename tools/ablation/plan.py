"""The ablation's arms and run plan (one :class:`RunSpec` per training run, seed-major), its record files and
the schedule every kept record must share (see the package docstring).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import harness
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.models import get_model_config
from mlip_fast.train.args import MAX_PRESET_MASK_RATIO, SPEC_LAMBDA_LOCAL, SYNTHETIC_PRESET

ARMS = ("clip", "flip", "flip+local", "mlip", "mlip-discriminative", "mlip-maco", "mlip-predictor", "flip+local-ot",
        "mlip-ot")
DEFAULT_ARMS = ARMS[:4]  # the method's parts; the other integrity modes and the -ot arms are run on request
# the arms with an integrity mode (``--sie-mode``; ``mlip`` is the method's guided reading) and their mode
MODE_ARMS = {"mlip": "guided", "mlip-discriminative": "discriminative", "mlip-maco": "maco",
             "mlip-predictor": "predictor", "mlip-ot": "guided"}
LOCAL_ARMS = ("flip+local", *MODE_ARMS, "flip+local-ot")  # arms with the patch-sentence loss
# About 60 minutes for the whole default benchmark on a 2-core CPU with nothing else running (two runs at a
# time, one thread each; measured in the records' train_s / wall_s).
DEFAULT_STEPS = 400
SPEC_MASK_RATIO = 0.5
# The synthetic preset's departures from the method (mask ratio, patch-sentence weight), measured one at a time
# and together against the method's values. The mask ratio is the preset's of the max-matching default run (0.25,
# until 2026-12-06), which every ablation record measured; the OT default run is back at the method's 0.5.
DEPARTURES = {"mask_ratio": MAX_PRESET_MASK_RATIO, "lambda_local": SYNTHETIC_PRESET["lambda_local"]}
LAMBDA_SIE = 0.1
PROBE_FRACTIONS = (0.01, 0.1)
RESULTS = harness.RESULTS / "ablation_cpu.json"
PNG = harness.RESULTS / "ablation_cpu.png"
DATA_EFFICIENCY_RESULTS = harness.RESULTS / "data_efficiency_cpu.json"
DATA_EFFICIENCY_PNG = harness.RESULTS / "data_efficiency_cpu.png"
DATA_EFFICIENCY_FRACTIONS = (0.1, 0.3, 1.0)
DATA_EFFICIENCY_ARMS = ("clip", "flip+local", "mlip")
STEP_TIME_RESULTS = harness.RESULTS / "ablation_step_time_cpu.json"
MASKING_RESULTS = harness.RESULTS / "ablation_masking_cpu.json"
# What must agree between a kept record and this invocation for the record to count as this benchmark's.
SCHEDULE_KEYS = ("steps", "synthetic_n", "image_size", "ds_config", "model", "text_dropout")
RECORD_FILE = "record.json"
METRICS = ("zs_auc_combined", "zs_auc_global", "zs_auc_local", "pointing_accuracy", "probe_auc_1pct",
           "probe_auc_10pct", "samples_per_s")
# test metrics, then the validation metrics that choices are made on
DIFFERENCE_METRICS = ("zs_auc_combined", "zs_auc_global", "zs_auc_local", "pointing_accuracy", "probe_auc_1pct",
                      "probe_auc_10pct", "valid_zs_auc_combined", "valid_pointing_accuracy")
# (A, B, label): paired differences A - B by seed at the same mask ratio and patch-sentence weight (B without
# warm-up)
COMPARISONS = (("mlip", "flip+local", "MLIP - FLIP+local"),
               ("mlip-discriminative", "flip+local", "MLIP-discriminative - FLIP+local"),
               ("mlip-maco", "flip+local", "MLIP-maco - FLIP+local"),
               ("mlip-predictor", "flip+local", "MLIP-predictor - FLIP+local"),
               ("flip+local", "flip", "FLIP+local - FLIP"),
               ("flip", "clip", "FLIP - CLIP"), ("mlip-ot", "mlip", "MLIP-OT - MLIP"),
               ("flip+local-ot", "flip+local", "FLIP+local-OT - FLIP+local"))
# two-sided 95% Student t quantiles by degrees of freedom (a paired CI over n seeds has n - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the ablation."""

    arm: str
    mask_ratio: float
    lambda_local: float
    seed: int
    ot_eps: Optional[float] = None  # the OT arms' matching settings (None for the max arms)
    ot_iters: Optional[int] = None
    sie_warmup: int = 0  # --sie-warmup of an arm with an integrity mode
    train_fraction: float = 1.0  # --train-fraction (the data-efficiency curve)

    @property
    def sie_mode(self) -> Optional[str]:
        return MODE_ARMS.get(self.arm)

    @property
    def lambda_sie(self) -> float:
        return LAMBDA_SIE if self.arm in MODE_ARMS else 0.0

    @property
    def matching(self) -> str:
        return "ot" if self.arm.endswith("-ot") else "max"

    @property
    def key(self) -> str:
        ot = f"_eps{self.ot_eps:g}_it{self.ot_iters}" if self.matching == "ot" else ""
        warmup = f"_wu{self.sie_warmup}" if self.sie_warmup else ""
        fraction = f"_f{self.train_fraction:g}" if self.train_fraction < 1.0 else ""
        return f"{self.arm}_r{self.mask_ratio:g}_ll{self.lambda_local:g}{ot}{warmup}{fraction}_s{self.seed}"

    def train_flags(self) -> list:
        flags = ["--mask-ratio", f"{self.mask_ratio:g}", "--lambda-local", f"{self.lambda_local:g}",
                 "--lambda-sie", f"{self.lambda_sie:g}", "--seed", str(self.seed)]
        if self.matching == "ot":
            flags += ["--local-matching", "ot", "--ot-eps", f"{self.ot_eps:g}", "--ot-iters", str(self.ot_iters)]
        else:  # named: the synthetic preset's own matching is ot since 2026-12-06
            flags += ["--local-matching", "max"]
        if self.sie_mode is not None:
            flags += ["--sie-mode", self.sie_mode]
        if self.sie_warmup:
            flags += ["--sie-warmup", str(self.sie_warmup)]
        if self.train_fraction < 1.0:
            flags += ["--train-fraction", f"{self.train_fraction:g}"]
        return flags


@dataclass(frozen=True)
class Grid:
    """What multiplies the runs besides the seeds: the arms, the mask ratios of the masked arms, the patch-sentence
    weight of the arms with the local loss, the preset's extra MLIP row, the OT arms' settings, the integrity warm-ups
    of the arms with an integrity mode (0: none) and the shares of the training pairs."""

    arms: Sequence[str] = DEFAULT_ARMS
    ratios: Sequence[float] = (SPEC_MASK_RATIO, DEPARTURES["mask_ratio"])
    lambda_local: float = SPEC_LAMBDA_LOCAL
    preset_row: bool = True
    ot_eps: Sequence[float] = (DEFAULT_OT_EPS,)
    ot_iters: Sequence[int] = (DEFAULT_OT_ITERS,)
    warmups: Sequence[int] = (0,)
    fractions: Sequence[float] = (1.0,)


def plan(seeds: Sequence[int], grid: Grid = Grid()) -> list:
    """Every run of the benchmark, seed-major (the first seeds of every arm finish first), then by share of the
    training pairs; the OT arms once per (eps, iterations) of the grid, the arms with an integrity mode once per
    warm-up."""
    configs = []
    for arm in grid.arms:
        warmups = grid.warmups if arm in MODE_ARMS else (0,)
        if arm == "clip":
            configs.append(("clip", 0.0, 0.0, None, None, 0))
        elif arm == "flip":
            configs += [("flip", r, 0.0, None, None, 0) for r in grid.ratios]
        elif arm.endswith("-ot"):
            configs += [(arm, r, grid.lambda_local, e, n, w) for r in grid.ratios for e in grid.ot_eps
                        for n in grid.ot_iters for w in warmups]
        else:
            configs += [(arm, r, grid.lambda_local, None, None, w) for r in grid.ratios for w in warmups]
    departed = ("mlip", DEPARTURES["mask_ratio"], DEPARTURES["lambda_local"], None, None, 0)
    if grid.preset_row and "mlip" in grid.arms and departed not in configs:
        configs.append(departed)
    return [RunSpec(arm, r, lam, s, e, n, w, f) for s in seeds for f in grid.fractions
            for arm, r, lam, e, n, w in configs]


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


def model_text_dropout(model: str) -> float:
    """The report encoder's dropout in ``model``'s config: what every run used before the schedule named it."""
    return get_model_config(model).text.dropout


def schedule_of(record: dict) -> dict:
    """The schedule a record ran under (records written before ``text_dropout`` joined the schedule ran at the
    model config's dropout: the training app had no preset for it then)."""
    schedule = {k: record.get(k) for k in SCHEDULE_KEYS}
    if schedule["text_dropout"] is None and schedule["model"] is not None:
        schedule["text_dropout"] = model_text_dropout(schedule["model"])
    return schedule


def check_schedule(records: list, schedule: dict, path: Path) -> None:
    """Refuses to mix runs of another schedule into ``path`` (it would silently compare unlike runs)."""
    for r in records:
        other = schedule_of(r)
        if other != schedule:
            raise SystemExit(f"{path} holds runs of another schedule ({other}, this one is {schedule}); pass "
                             f"--out to write elsewhere, or the same settings to continue it")
