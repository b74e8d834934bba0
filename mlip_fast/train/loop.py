"""The DeepSpeed training loop.

One optimizer step = ``gradient_accumulation_steps`` (N) micro-steps:

1. every micro-step m seeds torch from ``step_seed(seed, step, m, rank)`` and passes the same seed to the
   model's integrity-scored masking, so the randomness of step ``s`` does not depend on what ran before
   it (exact resume); the steps before ``integrity_warmup`` (the model config's ``sie_warmup``) ask the model for
   uniform masking and unit weights (``integrity=False``);
2. the engine's forward, outputs cast to fp32 except the local embeddings (:func:`loss_inputs`: a bf16 run
   scores patches against sentences in bf16), and ``MLIPLoss`` (the contrastive terms gather their
   negatives from every rank, with gradient). With N > 1 the loss is contrastive-correct
   (``mlip_fast.train.accum``): the N micro-batches are run without gradient, the loss is computed once
   over all their outputs, so the negatives are the whole accumulated batch (N x micro x world), and each
   micro-batch is re-run with gradient (same batch, same seed) to back-propagate its share;
3. the loss terms are all-reduced together with a stop flag, so every rank takes the same decision: a
   non-finite loss on any rank stops the run before any ``backward`` and without saving anything (``latest``
   keeps naming the last checkpoint saved, nothing is pruned), and a SIGTERM / SIGINT on any rank stops it
   after the current optimizer step with a checkpoint;
4. ``engine.backward`` and ``engine.step`` per micro-step (DeepSpeed applies clipping, accumulation and
   the schedule; the accumulated micro-step gradients already sum to the step's gradient, so they are not
   divided by N again). DeepSpeed skips an optimizer step whose gradients are not finite; the skipped steps
   are counted (``skipped_steps`` in metrics.jsonl and summary.json), and more than ``max_skipped_in_a_row``
   in a row (fp32 and bf16 have no loss scale to lower, so the next step would be skipped too) stop the run
   as a non-finite loss does;
5. after the optimizer step, the logit scales' parameters are clamped at their bound (open_clip), in the
   model and in the optimizer's fp32 copy (:func:`clamp_engine_logit_scales`).

Bad data. A :class:`~mlip_fast.data.readers.DatasetError` from the batches (too many unreadable samples, a
corrupt shard) on any rank is voted on before the forward (the losses gather across ranks, so no rank may
skip it alone): every rank saves the steps trained so far and stops with :class:`DataStopped`.
"""
from __future__ import annotations

import math
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from mlip_fast import _checks
from mlip_fast.data.readers import DatasetError
from mlip_fast.losses import LogitScale
from mlip_fast.train.accum import CachedLoss, cache_outputs
from mlip_fast.train.data import step_seed
from mlip_fast.train.signals import StopRequest
from mlip_fast.train.timing import PhaseTimes

__all__ = ["LOSS_KEYS", "NonFiniteLossError", "TrainingStopped", "DataStopped", "LoopContext", "LoopResult",
           "train_loop", "model_inputs", "loss_inputs", "clamp_engine_logit_scales", "state_is_finite",
           "MAX_SKIPPED_IN_A_ROW"]

LOSS_KEYS = ("loss", "loss_global", "loss_local", "loss_sie")
# terms logged when the criterion returns them (``loss_within`` with ``--lambda-within`` > 0)
OPTIONAL_LOSS_KEYS = ("loss_within",)
_MODEL_KEYS = ("images", "input_ids", "attention_mask", "sentence_spans", "sentence_mask")
# Optimizer steps DeepSpeed may skip in a row (non-finite gradients) before the run stops: fp32 and bf16 have
# no loss scale to lower, so a step skipped for non-finite gradients is followed by more; an fp16 loss scale
# of 2^32 takes 32 halvings to reach 1.
MAX_SKIPPED_IN_A_ROW = 3
MAX_SKIPPED_IN_A_ROW_FP16 = 32


class NonFiniteLossError(RuntimeError):
    """The run produced NaN / Inf (the loss, the gradients or the weights; ``what`` says which) and stopped
    without saving that state. ``step`` is the last completed optimizer step and ``checkpoint`` the newest
    checkpoint, which still names the last good state saved."""

    def __init__(self, step: int, terms: dict, checkpoint=None, what: Optional[str] = None):
        self.step, self.terms, self.checkpoint = step, terms, checkpoint
        shown = ", ".join(f"{k}={v}" for k, v in terms.items())
        what = what or f"non-finite loss at step {step + 1} ({shown})"
        super().__init__(f"{what}; the run stopped without saving this state, and the newest checkpoint "
                         f"({checkpoint or 'none yet'}) is the last good one. Lower the learning rate, check the "
                         f"data, or use fp32, then continue with --resume latest")


class TrainingStopped(Exception):
    """A stop was requested (``reason``: a signal's name, or the launcher that ended) in ``phase``: during
    "training" a checkpoint of ``step`` was saved; during "start-up" (``step``, ``checkpoint``: what the run was
    resuming from, if anything) and "finish" (after the final checkpoint) the run ended at once. The process
    exits with 128 + ``signum``."""

    def __init__(self, signum: int, step: Optional[int], checkpoint, reason: Optional[str] = None,
                 phase: str = "training"):
        self.signum, self.step, self.checkpoint, self.phase = signum, step, checkpoint, phase
        self.reason = reason or signal.Signals(signum).name
        super().__init__(f"stopped ({self.reason}) during {phase} after step {step}; checkpoint at {checkpoint}")


class DataStopped(DatasetError):
    """The batches failed (``cause``: this rank's :class:`DatasetError`, None when another rank's failed) after
    ``step`` optimizer steps; ``checkpoint`` holds them (None when this run trained none)."""

    def __init__(self, cause: Optional[DatasetError], step: int, checkpoint):
        self.cause, self.step, self.checkpoint = cause, step, checkpoint
        super().__init__(str(cause) if cause is not None else "the data of another rank failed")


def model_inputs(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    """The model's keys of a collated batch on ``device``; images in the engine's dtype."""
    out = {}
    for key in _MODEL_KEYS:
        value = batch[key].to(device, non_blocking=True)
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


# The model outputs that stay in the engine's precision: the local embeddings go to the patch-sentence scores
# op as they are, so a bf16 / fp16 run scores them with the half-precision (tensor-core) kernels; the op
# normalises them with fp32 norms, accumulates in fp32 and returns fp32 scores.
LOCAL_EMBEDDINGS = ("patches", "sentences")


def loss_inputs(outputs: dict) -> dict:
    """The precision policy of the losses: every floating output in fp32 (logsumexp over a batch in bf16 is too
    coarse) except the local embeddings (:data:`LOCAL_EMBEDDINGS`), which keep the engine's dtype."""
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() and k not in LOCAL_EMBEDDINGS else v)
            for k, v in outputs.items()}


def state_is_finite(engine) -> bool:
    """Collective: whether every rank's parameters (its partitions under ZeRO-3) are finite, so that a state
    the last update made non-finite is never saved."""
    finite = all(bool(torch.isfinite(getattr(p, "ds_tensor", p)).all()) for p in engine.module.parameters())
    flag = torch.tensor([0.0 if finite else 1.0], dtype=torch.float64)
    return float(_reduce(flag, _engine_device(engine))) == 0.0


def clamp_engine_logit_scales(model: torch.nn.Module) -> None:
    """Clamps every :class:`~mlip_fast.losses.LogitScale` of ``model`` (the engine's module) at its bound after
    an optimizer step. A DeepSpeed optimizer updates its own fp32 copy of each parameter (ZeRO 1/2/3, bf16)
    and writes it back into the model at the next step, so that copy is clamped as well as the model's parameter.
    The clamp is elementwise, so each rank clamps the pieces it holds, in place, without a collective: under ZeRO-3
    its partitions (the fp32 one and the model's ``ds_tensor``; a 1-element parameter's padded partition on the
    other ranks stays harmless); under ZeRO-1/2 the fragment of the fp32 partition that holds the parameter, on the
    rank that owns it, and the model's full parameter on every rank, which after the step holds that copy (in the
    model's precision). DeepSpeed's full-parameter accessors would cost two all-reduces per scale and step.
    Every rank calls it after every step."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    for scale in (m for m in model.modules() if isinstance(m, LogitScale)):
        param = scale.log_scale
        bound = scale.max_log_scale
        if hasattr(param, "ds_id"):  # ZeRO-3: partitioned
            if param.requires_grad:
                local = safe_get_local_fp32_param(param)
                if local is not None:
                    safe_set_local_fp32_param(param, local.clamp(max=bound))
            with torch.no_grad():
                param.ds_tensor.data.clamp_(max=bound)
            continue
        mapping = getattr(param, "_hp_mapping", None) if param.requires_grad else None
        if mapping is not None:  # ZeRO-1/2: this rank's fp32 partition holds (a fragment of) the parameter
            with torch.no_grad():
                mapping.get_hp_fragment().clamp_(max=bound)
        scale.clamp_()  # the model's parameter (the master itself without a DeepSpeed optimizer)


@dataclass
class LoopContext:
    engine: object
    criterion: torch.nn.Module
    batches: Iterator[dict]
    reporter: object
    stop: StopRequest
    seed: int
    rank: int
    world_size: int
    accumulation: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    dtype: torch.dtype
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    evaluate: Optional[Callable[[int], Optional[dict]]] = None
    save: Optional[Callable[[int], object]] = None
    latest: Optional[Callable[[], object]] = None
    on_first_step: Optional[Callable[[], None]] = None
    monitor: Optional[Callable[[list], None]] = None
    max_skipped_in_a_row: int = MAX_SKIPPED_IN_A_ROW
    integrity_warmup: int = 0  # steps of uniform masking and unit weights before the integrity mode acts
    skipped_steps: int = 0  # skipped before this run (a resumed engine's count)
    last_terms: dict = field(default_factory=dict)  # the loss terms of the last step (saved with its state)
    times: PhaseTimes = field(default_factory=PhaseTimes)  # where the steps' time goes (mlip_fast.train.timing)
    profiler: Optional[object] = None  # --profile-steps: told after every step (mlip_fast.train.timing.StepProfiler)


@dataclass
class LoopResult:
    steps: int
    samples: int
    wall_s: float
    last_terms: dict
    mean_terms: dict
    skipped_steps: int = 0
    step_s: list = field(default_factory=list)  # each step's seconds, in order (the first holds any compile time)


def _engine_device(engine) -> torch.device:
    return engine.device if isinstance(engine.device, torch.device) else torch.device(engine.device)


def _reduce(values: torch.Tensor, device: Optional[torch.device] = None) -> torch.Tensor:
    """The sum of ``values`` over ranks, on the CPU. The collective runs on ``device`` (the engine's: NCCL reduces
    CUDA tensors only; gloo, CPU ones)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.to(device) if device is not None else values
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.cpu()


def _fetch(ctx: LoopContext, step: int) -> list:
    """The step's micro-batches, or :class:`DataStopped` on every rank when any rank's data failed (voted before
    the forward: the losses gather across ranks, so no rank may leave it out alone)."""
    failed = None
    try:
        batches = [next(ctx.batches) for _ in range(ctx.accumulation)]
    except DatasetError as e:
        batches, failed = [], e
    flag = torch.tensor([0.0 if failed is None else 1.0], dtype=torch.float64)
    if float(_reduce(flag, _engine_device(ctx.engine))) == 0.0:
        return batches
    ctx.reporter.close_progress()
    checkpoint = ctx.save(step) if ctx.save is not None and step > ctx.start_step else None
    ctx.reporter.record("event", event="data_stop", step=step, checkpoint=checkpoint,
                        error=str(failed).splitlines()[-1] if failed is not None else "another rank's data failed")
    raise DataStopped(failed, step, checkpoint)


def _latest(ctx: LoopContext):
    return ctx.latest() if ctx.latest is not None else None


def train_loop(ctx: LoopContext) -> LoopResult:
    engine = ctx.engine
    device = _engine_device(engine)
    window = deque(maxlen=max(1, min(50, ctx.total_steps // 10 or 1)))
    last_terms: dict = {}
    step = ctx.start_step
    skipped, in_a_row = ctx.skipped_steps, 0
    timer_start = time.perf_counter()
    rate_window = deque(maxlen=20)
    step_s: list = []
    ctx.reporter.start_progress(ctx.total_steps, ctx.start_step)
    engine.train()
    times = ctx.times
    while step < ctx.total_steps:
        t0 = time.perf_counter()
        with times.phase("train/bookkeeping"):
            lr = float(engine.get_lr()[0]) if engine.get_lr() else math.nan  # the rate this step uses
        with times.phase("train/data"):
            batches = _fetch(ctx, step)
        seeds = [step_seed(ctx.seed, step, micro, ctx.rank) for micro in range(ctx.accumulation)]
        integrity = step >= ctx.integrity_warmup

        def forward(micro: int) -> dict:
            torch.manual_seed(seeds[micro])
            inputs = model_inputs(batches[micro], device, ctx.dtype)
            times.watching = True  # the towers' forward hooks count this forward (not an evaluation's)
            try:
                with times.phase("train/forward"):
                    # the config's mask ratio (training mode)
                    return loss_inputs(engine(inputs, seed=seeds[micro], integrity=integrity))
            finally:
                times.watching = False

        # N = 1 needs no cache: the one forward keeps its graph
        outputs = [forward(0)] if ctx.accumulation == 1 else cache_outputs(forward, ctx.accumulation)
        loss = total = None
        # The losses' value checks (a host synchronisation per checked tensor) are off here: a non-finite model
        # output makes the loss non-finite, which the one reduction below sees on every rank.
        with _checks.value_checks_disabled(), times.phase("train/loss"):
            if ctx.accumulation == 1:
                total, terms = ctx.criterion(**outputs[0])
            else:
                loss = CachedLoss(outputs, ctx.criterion)
                terms = loss.terms
        with times.phase("train/sync"):
            stop_flag = torch.ones(()) if ctx.stop.signum is not None else torch.zeros(())
            keys = LOSS_KEYS + tuple(k for k in OPTIONAL_LOSS_KEYS if k in terms)
            stats = torch.stack([terms[k].detach().reshape(()).to(torch.float64) for k in keys]
                                + [stop_flag.to(device=terms["loss"].device, dtype=torch.float64)])
            stats = _reduce(stats, device)  # the step's one host synchronisation (the reduced values come to the CPU)
            terms_now = stats[:-1] / ctx.world_size
            stop_votes = float(stats[-1])
            finite = bool(torch.isfinite(terms_now).all())
        if not finite:
            values = {k: float(v) for k, v in zip(keys, terms_now)}
            ctx.reporter.close_progress()
            # nothing is saved: the state after this step's update would be the one that produced the NaN
            ctx.reporter.record("event", event="non_finite_loss", step=step, terms=values, checkpoint=_latest(ctx))
            raise NonFiniteLossError(step, values, _latest(ctx))
        if loss is None:
            with times.phase("train/backward"):
                engine.backward(total)
            with times.phase("train/engine_step"):
                engine.step()
        else:
            with times.phase("train/backward"):
                loss.backward()
            for micro in range(ctx.accumulation):
                surrogate = loss.surrogate(micro, forward(micro))
                with times.phase("train/backward"):
                    engine.backward(surrogate, scale_wrt_gas=False)
                with times.phase("train/engine_step"):
                    engine.step()
        with times.phase("train/bookkeeping"):
            applied = engine.was_step_applied()  # False: DeepSpeed skipped the update (non-finite gradients)
            skipped, in_a_row = (skipped, 0) if applied else (skipped + 1, in_a_row + 1)
            clamp_engine_logit_scales(engine.module)  # the step above was the optimizer's
        step += 1
        if step == ctx.start_step + 1 and ctx.on_first_step is not None:
            with times.phase("train/logging"):
                ctx.on_first_step()
        dt = time.perf_counter() - t0
        step_s.append(dt)
        t_log = time.perf_counter()
        rate_window.append((ctx.global_batch, dt))
        samples_per_s = sum(b for b, _ in rate_window) / max(1e-9, sum(t for _, t in rate_window))
        terms_mean = {k: float(v) for k, v in zip(keys, terms_now)}
        last_terms = ctx.last_terms = terms_mean
        window.append(terms_mean)
        epoch = (step - 1) // ctx.steps_per_epoch
        if step % ctx.log_every == 0 or step == ctx.total_steps or not applied:
            ctx.reporter.record("train", step=step, epoch=epoch, lr=lr, samples_per_s=samples_per_s,
                                step_s=dt, elapsed_s=time.perf_counter() - timer_start, skipped_steps=skipped,
                                **terms_mean)
            if ctx.monitor is not None:
                ctx.monitor([(f"Train/{k}", v, step) for k, v in terms_mean.items()]
                            + [("Train/lr", lr, step), ("Train/samples_per_s", samples_per_s, step)])
        if not applied:
            ctx.reporter.warning("step %d: the optimizer skipped its update (non-finite gradients; %d in a row, %d in "
                                 "all)", step, in_a_row, skipped)
        if in_a_row > ctx.max_skipped_in_a_row:
            ctx.reporter.close_progress()
            ctx.reporter.record("event", event="non_finite_gradients", step=step, skipped_in_a_row=in_a_row,
                                checkpoint=_latest(ctx))
            raise NonFiniteLossError(step - in_a_row, {}, _latest(ctx), what=(
                f"non-finite gradients under a finite loss: the optimizer skipped steps {step - in_a_row + 1} to "
                f"{step} ({in_a_row} in a row, more than {ctx.max_skipped_in_a_row})"))
        ctx.reporter.update_progress(terms_mean["loss"], lr, samples_per_s)
        times.add("train/logging", time.perf_counter() - t_log)
        if ctx.profiler is not None:
            with times.phase("train/profiler"):
                ctx.profiler.step()
        if stop_votes > 0:
            if ctx.stop.signum is None:
                ctx.stop.poll()  # another rank's request: this rank's own watcher may not have looked yet
            ctx.reporter.close_progress()
            path = ctx.save(step) if ctx.save is not None else None
            # another rank's request: this rank stops as if it had received SIGTERM
            signum = ctx.stop.signum if ctx.stop.signum is not None else signal.SIGTERM
            reason = ctx.stop.reason or "another rank was asked to stop"
            ctx.reporter.record("event", event="stopped", signal=signum, reason=reason, step=step, checkpoint=path)
            raise TrainingStopped(signum, step, path, reason)
        if ctx.eval_every and step % ctx.eval_every == 0 and step < ctx.total_steps and ctx.evaluate is not None:
            ctx.evaluate(step)
        if ctx.save_every and step % ctx.save_every == 0 and step < ctx.total_steps and ctx.save is not None:
            ctx.save(step)
    ctx.reporter.close_progress()
    wall = time.perf_counter() - timer_start
    mean_terms = {k: sum(t[k] for t in window) / len(window) for k in window[-1]} if window else {}
    return LoopResult(steps=step, samples=(step - ctx.start_step) * ctx.global_batch, wall_s=wall,
                      last_terms=last_terms, mean_terms=mean_terms, skipped_steps=skipped, step_s=step_s)
