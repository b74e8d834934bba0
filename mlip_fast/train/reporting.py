"""What a training run writes besides checkpoints: the run log, metrics.jsonl, the progress bar, the
loss / eval PNG and summary.json. Only rank 0 writes; every function is a no-op elsewhere.

``metrics.jsonl`` has one JSON object per line, flushed as it is written (nothing is lost on a crash):
``{"kind": "train", "step", "epoch", "loss", "loss_global", "loss_local", "loss_sie", "lr",
"samples_per_s", "elapsed_s"}`` every ``--log-every`` steps, ``{"kind": "eval", "step", "split",
"auc_macro", "auc": {class: value}, ...}`` after each evaluation and ``{"kind": "event", ...}`` for
checkpoints, resumes, stops and skipped data rows. A resumed run continues the same file after dropping
the records of the steps after its checkpoint (:meth:`RunReporter.rewind`), so every step appears once.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

from mlip_fast._records import jsonable, write_run_record

__all__ = ["RunReporter", "read_metrics", "plot_metrics"]

LOGGER_NAME = "mlip_fast.train"


class RunReporter:
    """Rank-0 outputs of a run under ``output_dir`` (a no-op object on other ranks)."""

    def __init__(self, output_dir: Path, rank: int, progress: bool = True):
        self.output_dir = Path(output_dir)
        self.active = rank == 0
        self.show_progress = progress and self.active
        self.bar = None
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
    def record(self, kind: str, **fields) -> None:
        if self._metrics is None:
            return
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

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                        file=sys.stderr, smoothing=0.1)

    def update_progress(self, loss: float, lr: float, samples_per_s: float) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.1f}", refresh=False)
        self.bar.update(1)

    def close_progress(self) -> None:
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


def plot_metrics(metrics_path: Path, out_png: Path, chance_auc: float = 0.5) -> Path:
    """Loss terms per step (left) and validation zero-shot macro AUC per evaluation (right) as a PNG."""
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
    for key, label in (("loss", "total"), ("loss_global", "global"), ("loss_local", "local"), ("loss_sie", "SIE")):
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
