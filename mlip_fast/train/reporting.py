"""What a training run writes besides checkpoints: the run log, metrics.jsonl, the progress display, the
loss / eval PNG and summary.json, and the monitors a run reports to (``--report-to``). Only rank 0 writes; every
function is a no-op elsewhere.

``metrics.jsonl`` has one JSON object per line, flushed as it is written (nothing is lost on a crash):
``{"kind": "train", "step", "epoch", "loss", "loss_global", "loss_local", "loss_sie", "lr",
"samples_per_s", "step_s", "data_s", "logit_scale_global", "logit_scale_local", "elapsed_s"}`` every
``--log-every`` steps (``data_s``: the seconds the step waited for its batches; the logit scales its forward
used; "loss_within" too with ``--lambda-within`` > 0), ``{"kind": "eval", "step", "split", "auc_macro", "auc":
{class: value}, ...}`` after each evaluation and ``{"kind": "event", ...}`` for checkpoints, resumes, stops and
skipped data rows. A resumed run continues the same file after dropping the records of the steps after its
checkpoint (:meth:`RunReporter.rewind`), so every step appears once.

Progress: a bar on a terminal (stderr is a TTY); otherwise (a redirected log) one plain line every twentieth of
the run, so no carriage return lands in a log file. Both show the loss, lr, throughput, data time and logit scale.

Monitors (:func:`check_monitors` before anything starts, :func:`with_monitors` into the DeepSpeed config):
``--report-to tensorboard`` / ``wandb`` enable DeepSpeed's monitor of that name, writing into the run folder
(TensorBoard) or the ``mlip_fast`` project grouped by run name (W&B); a monitor whose package is missing, asked
for by the flag or by the ds config's own section, is a one-line usage error (exit 2) before any process starts.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tqdm.auto import tqdm

from mlip_fast._plotting import optional_plot
from mlip_fast._records import jsonable, write_run_record
from mlip_fast.train.ds_config import DSConfigError

__all__ = ["RunReporter", "read_metrics", "plot_metrics", "REPORT_TO", "check_monitors", "with_monitors"]

LOGGER_NAME = "mlip_fast.train"
REPORT_TO = ("none", "tensorboard", "wandb")
# monitor -> (the module it needs, what to install)
_MONITOR_PACKAGES = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
WANDB_PROJECT = "mlip_fast"
# plain progress lines a run prints when stderr is not a terminal
PLAIN_PROGRESS_LINES = 20


def _monitors(config: dict, report_to: str) -> list:
    """The monitors a run writes to: the ``--report-to`` one and every one the ds config enables itself."""
    enabled = [name for name in _MONITOR_PACKAGES if isinstance(config.get(name), dict) and config[name].get("enabled")]
    return sorted(set(enabled) | ({report_to} - {"none"}))


def check_monitors(config: dict, report_to: str = "none", where: str = "ds config") -> list:
    """The monitors of :func:`_monitors`, each checked to be importable (without importing it): DeepSpeed would
    otherwise fail on every rank once training starts. Raises :class:`DSConfigError` (a usage error) naming the
    package and both ways to drop the monitor."""
    if report_to not in REPORT_TO:
        raise DSConfigError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    monitors = _monitors(config, report_to)
    for name in monitors:
        module, install = _MONITOR_PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            asked = f"--report-to {name}" if name == report_to else f"the {where}'s '{name}' section"
            raise DSConfigError(f"{asked} logs to {name}, but {module} is not installed; {install}, or drop "
                                f"--report-to {name} / the '{name}' section of the ds config")
    return monitors


def with_monitors(config: dict, report_to: str, run_dir: Path) -> dict:
    """``config`` with the monitor sections of the run enabled: TensorBoard events under ``run_dir/tensorboard``,
    W&B runs in the ``mlip_fast`` project (unless the section names one) grouped by the run folder's name."""
    out = dict(config)
    for name in _monitors(config, report_to):
        section = dict(config.get(name, {}))
        section["enabled"] = True
        if name == "tensorboard":
            section.setdefault("output_path", str(run_dir / "tensorboard"))
            section.setdefault("job_name", run_dir.name)
        else:
            section.setdefault("project", WANDB_PROJECT)
            section.setdefault("group", run_dir.name)
        out[name] = section
    return out


class RunReporter:
    """Rank-0 outputs of a run under ``output_dir`` (a no-op object on other ranks)."""

    def __init__(self, output_dir: Path, rank: int, progress: bool = True):
        self.output_dir = Path(output_dir)
        self.active = rank == 0
        self.show_progress = progress and self.active
        self.bar = None
        #: fields added to every "train" record and to the progress display (set by the training phase)
        self.step_extras: Optional[Callable[[], dict]] = None
        self._plain: Optional[dict] = None  # the plain progress lines' state (stderr not a terminal)
        self.logger = logging.getLogger(LOGGER_NAME)
        self._metrics = None
        self._handlers: list = []
        if self.active:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.logger.setLevel(logging.INFO)
            # Records propagate to the root logger, so a user's own logging set-up sees them; the console handler
            # is added only when the root logger has none (no set-up: the messages would otherwise go unseen).
            self.logger.propagate = True
            fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
            self._handlers = [logging.FileHandler(self.output_dir / "run.log")]
            if not logging.getLogger().handlers:
                self._handlers.append(logging.StreamHandler(sys.stdout))
            for handler in self._handlers:
                handler.setFormatter(fmt)
                self.logger.addHandler(handler)
            self._metrics = open(self.output_dir / "metrics.jsonl", "a", buffering=1)

    # run log -------------------------------------------------------------------------------------
    def log(self, message: str, *args) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.clear()
        self.logger.info(message, *args)
        if self.bar is not None:
            self.bar.refresh()

    def warning(self, message: str, *args) -> None:
        if self.active:
            self.logger.warning(message, *args)

    # metrics -------------------------------------------------------------------------------------
    def _extras(self) -> dict:
        return self.step_extras() if self.step_extras is not None else {}

    def record(self, kind: str, **fields) -> None:
        if self._metrics is None:
            return
        if kind == "train":
            fields = {**fields, **self._extras()}
        self._metrics.write(json.dumps(jsonable({"kind": kind, "time": time.time(), **fields})) + "\n")
        self._metrics.flush()

    def rewind(self, step: int) -> int:
        """Drops the records of steps after ``step`` from metrics.jsonl (a resumed run redoes them); records
        without a step are kept. The file is rewritten to a temporary file and renamed over the old one.
        Returns the number of records dropped."""
        if self._metrics is None:
            return 0
        path = self.output_dir / "metrics.jsonl"
        self._metrics.close()
        kept, dropped = [], 0
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash
                    dropped += 1
                    continue
                if isinstance(record.get("step"), int) and record["step"] > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            tmp = path.with_suffix(".jsonl.tmp")
            with open(tmp, "w") as f:
                f.writelines(kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self._metrics = open(path, "a", buffering=1)
        return dropped

    # progress bar --------------------------------------------------------------------------------
    def start_progress(self, total: int, initial: int) -> None:
        if not self.show_progress:
            return
        if not sys.stderr.isatty():  # a redirected log: plain lines, no carriage returns
            self._plain = {"step": initial, "total": total, "every": max(1, (total - initial) // PLAIN_PROGRESS_LINES)}
            return
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)

    def update_progress(self, loss: float, lr: float, samples_per_s: float) -> None:
        if self.bar is None and self._plain is None:
            return
        extras = self._extras()
        shown = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "sps": f"{samples_per_s:.1f}"}
        if extras.get("data_s") is not None:
            shown["data"] = f"{extras['data_s']:.3f}s"
        if extras.get("logit_scale_global") is not None:
            shown["scale"] = f"{extras['logit_scale_global']:.2f}"
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
            return
        plain = self._plain
        plain["step"] += 1
        if plain["step"] % plain["every"] == 0 or plain["step"] == plain["total"]:
            self.logger.info("step %d/%d %s", plain["step"], plain["total"], " ".join(f"{k} {v}" for k, v in shown.items()))

    def close_progress(self) -> None:
        self._plain = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_progress()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        for handler in self._handlers:
            handler.flush()
            handler.close()
            self.logger.removeHandler(handler)
        self._handlers = []
        sys.stdout.flush()
        sys.stderr.flush()

    # end of run ----------------------------------------------------------------------------------
    def write_summary(self, summary: dict) -> Optional[Path]:
        if not self.active:
            return None
        return write_run_record(self.output_dir, summary)


def read_metrics(path: Path) -> list:
    """The records of a metrics.jsonl file (a truncated last line, from a crash, is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@optional_plot
def plot_metrics(metrics_path: Path, out_png: Path, chance_auc: float = 0.5) -> Optional[Path]:
    """Loss terms per step (left) and validation zero-shot macro AUC per evaluation (right) as a PNG (None
    without matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    # a resumed run re-logs the steps after its checkpoint: keep the last value per step
    train = {r["step"]: r for r in records if r.get("kind") == "train"}
    evals: dict = {}
    for r in records:  # one evaluation may be logged as several records (zero-shot, localisation): merge them
        if r.get("kind") == "eval":
            evals.setdefault((r["split"], r["step"]), {}).update(r)
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
    steps = sorted(train)
    for key, label in (("loss", "total"), ("loss_global", "global"), ("loss_local", "local"), ("loss_sie", "SIE"),
                       ("loss_within", "within-report")):
        values = [train[s].get(key) for s in steps]
        if any(isinstance(v, (int, float)) for v in values):
            ax_loss.plot(steps, [v if isinstance(v, (int, float)) else math.nan for v in values], label=label,
                         linewidth=1.2 if key == "loss" else 0.8)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("training loss")
    ax_loss.grid(alpha=0.3)
    if steps:
        ax_loss.legend()
    markers = {"valid": "o", "test": "*"}
    for split in sorted({s for s, _ in evals}):
        points = sorted((step, r.get("auc_macro")) for (sp, step), r in evals.items() if sp == split)
        points = [(s, v) for s, v in points if isinstance(v, (int, float))]
        if points:
            ax_eval.plot(*zip(*points), marker=markers.get(split, "o"), markersize=9 if split == "test" else 6,
                         label=f"{split} zero-shot macro AUC")
        loc = sorted((step, r.get("localisation"), r.get("localisation_chance"))
                     for (sp, step), r in evals.items() if sp == split)
        loc = [(s, v, c) for s, v, c in loc if isinstance(v, (int, float))]
        if loc:
            ax_eval.plot([s for s, _, _ in loc], [v for _, v, _ in loc], marker="s", linestyle="--",
                         label=f"{split} localisation (pointing)")
            if isinstance(loc[-1][2], (int, float)):
                ax_eval.axhline(loc[-1][2], color="tab:red", linestyle=":", linewidth=0.8,
                                label=f"localisation chance ({loc[-1][2]:.2f})")
    ax_eval.axhline(chance_auc, color="grey", linestyle=":", label=f"AUC chance ({chance_auc:.2f})")
    ax_eval.set_ylim(0.0, 1.0)
    ax_eval.set_xlabel("step")
    ax_eval.set_title("evaluation")
    ax_eval.grid(alpha=0.3)
    ax_eval.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
