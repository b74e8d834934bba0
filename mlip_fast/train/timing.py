"""Where a run's wall time goes: named phases timed with the host clock, summed over the run.

The run records them in ``summary.json`` (``time_breakdown``): the phases of the whole run (start-up, synthetic
generation, reading the datasets, the vocabulary, the model and DeepSpeed engine, the training loop, the
periodic evaluations and checkpoints, the export, the final evaluation, the records) and, inside the training
loop, the phases of a step (waiting for the batch, the forward of each tower, the losses, the one host
synchronisation, backward, the optimizer's own update, the rest of DeepSpeed's step, the per-step bookkeeping
and logging, and writing the trace of ``--profile-steps``).

The clock costs two ``time.perf_counter`` calls per phase and never synchronises a device. On a CPU every op
runs when it is called, so each phase holds its own work. On a GPU the host runs ahead of the device: a phase
then holds the time to queue its kernels, and the device time lands in the phase that next waits for it (the
step's synchronisation); use the ``torch.profiler`` trace of docs/training.md for device times.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.profiler import ProfilerActivity, profile, schedule

__all__ = ["PhaseTimes", "TRAIN_PHASES", "RUN_PHASES", "StepProfiler", "PROFILE_WARMUP"]

# The phases of a training step, in the order a step runs them (keys of PhaseTimes.seconds under "train/").
TRAIN_PHASES = ("data", "forward_image", "forward_text", "forward_rest", "loss", "sync", "backward", "optimizer",
                "deepspeed_step", "bookkeeping", "logging", "profiler")
# The phases of a run (keys without a prefix), in the order a run goes through them.
RUN_PHASES = ("start_up", "generation", "datasets", "vocabulary", "model_and_engine", "batch_source", "training",
              "evaluations", "checkpoints", "export", "final_evaluation", "records")


class PhaseTimes:
    """Sums of host seconds per phase name. ``phase(name)`` times a block; ``watch(module, name)`` times every
    forward of a module while :attr:`watching` is on (the training step turns it on around its forward, so an
    evaluation's forwards are not counted); ``wrap(obj, attr, name)`` times every call of a bound method."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.watching = False
        self._starts: list[float] = []

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def watch(self, module: torch.nn.Module, name: str) -> list:
        """Hooks that add each forward of ``module`` to ``name`` while watching; returns their handles."""

        def before(_module, _inputs):
            if self.watching:
                self._starts.append(time.perf_counter())

        def after(_module, _inputs, _output):
            if self.watching and self._starts:
                self.add(name, time.perf_counter() - self._starts.pop())

        return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]

    def wrap(self, obj, attr: str, name: str) -> None:
        """Replaces ``obj.attr`` (a method) on this instance by a timed call of it."""
        inner: Callable = getattr(obj, attr)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)

        setattr(obj, attr, timed)

    def training_split(self, steps: int) -> dict:
        """The training phases: ``{phase: {"s": total seconds, "ms_per_step": ...}}`` in step order, with
        ``forward_rest`` (the model's forward outside the two towers: projections, pooling) derived."""
        s = self.seconds
        forward = s.get("train/forward", 0.0)
        towers = s.get("train/forward_image", 0.0) + s.get("train/forward_text", 0.0)
        values = {name: s.get(f"train/{name}", 0.0) for name in TRAIN_PHASES}
        values["forward_rest"] = max(0.0, forward - towers)
        values["deepspeed_step"] = max(0.0, s.get("train/engine_step", 0.0) - values["optimizer"])
        per = max(1, steps)
        return {name: {"s": round(v, 3), "ms_per_step": round(1e3 * v / per, 2)} for name, v in values.items()}

    def run_split(self, wall_s: float) -> dict:
        """The run's phases in seconds, ``other`` = what the named phases leave of ``wall_s``."""
        values = {name: round(self.seconds.get(name, 0.0), 3) for name in RUN_PHASES}
        values["other"] = round(max(0.0, wall_s - sum(values.values())), 3)
        return values


# Steps the profiler lets pass before it records (allocator, first-call dispatch, the first step's selections).
PROFILE_WARMUP = 5


class StepProfiler:
    """``--profile-steps N``: a ``torch.profiler`` trace of N training steps after :data:`PROFILE_WARMUP` steps,
    written when they are done into ``folder``: ``trace.json`` (Chrome trace format: chrome://tracing or
    https://ui.perfetto.dev) and ``ops.txt`` (the ops by their own time, from ``key_averages``). CPU activity, and
    CUDA's on a GPU. The loop calls :meth:`step` after every step; :meth:`close` stops a trace left unfinished."""

    def __init__(self, folder: Path, steps: int, device_type: str = "cpu", log: Callable[..., None] = print):
        self.folder, self.log = Path(folder), log
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device_type == "cuda" else [])
        self._profile = profile(activities=activities, record_shapes=True,
                                schedule=schedule(wait=PROFILE_WARMUP, warmup=1, active=int(steps), repeat=1),
                                on_trace_ready=self._write)
        self._profile.start()
        self._open = True

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / "trace.json"))
        (self.folder / "ops.txt").write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=60)
                                             + "\n")
        self.log("profiler: trace of the profiled steps in %s (trace.json, ops.txt)", self.folder)

    def step(self) -> None:
        if self._open:
            self._profile.step()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._profile.stop()
