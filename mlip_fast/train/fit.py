"""The training phase of a run (:func:`fit`): the loop of :mod:`mlip_fast.train.loop` with its checkpoints
(every ``--save-every`` steps, on a stop signal, on a data failure and at the end) and validation (every
``--eval-every`` steps), between :mod:`mlip_fast.train.run` (data, engine) and :mod:`mlip_fast.train.finish`.

What a save guarantees: the weights are finite on every rank (a state the last update made NaN / Inf is never
saved; the run stops as on a non-finite loss), the files are complete and listed with their SHA-256 in the
checkpoint's manifest before ``latest`` names it, and a full disk is a one-line error that leaves the previous
checkpoint in place. Every way out of the loop shuts the DataLoader workers down before the process can exit.

What the loop records per step is completed here (:class:`StepProbe`): the seconds each step waited for its
batches (``data_s``) and the logit scales its forward used, in metrics.jsonl, on the console and in the monitors.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from mlip_fast.data.readers import DatasetError
from mlip_fast.models.attention import selected_backend
from mlip_fast.ops.dispatch import describe_selected
from mlip_fast.ops.varlen_attention import status as packed_attention_status
from mlip_fast.train import checkpoint as ckpt
from mlip_fast.train import data as tdata
from mlip_fast.train.checkpoint_save import Checkpointer
from mlip_fast.train.evaluation import integrity, integrity_line, precision_context, zero_shot
from mlip_fast.train.loop import (MAX_SKIPPED_IN_A_ROW, MAX_SKIPPED_IN_A_ROW_FP16, DataStopped, LoopContext,
                                  LoopResult, NonFiniteLossError, state_is_finite, train_loop)
from mlip_fast.train.process import barrier
from mlip_fast.train.run import Engine, RunData, or_skip
from mlip_fast.train.setup import RunState
from mlip_fast.train.timing import PhaseTimes, StepProfiler

__all__ = ["Fit", "fit", "merge_bad_items", "worker_message", "StepProbe", "watch_step"]


@dataclass
class Fit:
    """What the training phase leaves: the loop's result, the final checkpoint, the validation history, the
    backends the first step selected and the set-up time."""

    result: LoopResult
    checkpoint: str
    eval_history: list = field(default_factory=list)
    backends: dict = field(default_factory=dict)
    setup_s: float = 0.0


class StepProbe:
    """Watches a training step from outside the loop: wraps the batch iterator (the time ``next`` waits, summed
    over a step's ``per_step`` micro-batches) and the criterion (the logit scales among its inputs, kept as
    tensors so that reading them costs a device sync only when a record is written)."""

    def __init__(self, batches: Iterator[dict], criterion: Callable, per_step: int):
        self._batches, self._criterion, self.per_step = batches, criterion, per_step
        self._waited, self._calls, self.data_s = 0.0, 0, None
        self._scales: dict = {}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self._waited += time.perf_counter() - start
            self._calls += 1
            if self._calls % self.per_step == 0:  # the step's last micro-batch
                self.data_s, self._waited = self._waited, 0.0

    def criterion(self, **outputs):
        self._scales = {k: outputs[k].detach() for k in ("logit_scale_global", "logit_scale_local") if k in outputs}
        return self._criterion(**outputs)

    def extras(self) -> dict:
        """The fields a "train" record and the progress display add: data_s, logit_scale_global / _local."""
        out = {} if self.data_s is None else {"data_s": self.data_s}
        out.update({k: float(v) for k, v in self._scales.items()})
        return out


def worker_message(error: BaseException) -> str:
    """The message of an error raised in a DataLoader worker (the loader re-raises it in the training process
    with the worker's traceback prepended): its last line, without the exception's name."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(error).__name__
    last = lines[-1]
    name = f"{type(error).__name__}: "
    return last[last.index(name) + len(name):] if name in last else last


def _data_stop_message(stop: DataStopped, dataset) -> str:
    """One line: what failed in the data, and what happened to the steps trained."""
    if stop.cause is not None and hasattr(dataset, "bad_summary"):
        # raised in a loader worker, which knows only its own bad items: name every one from here
        detail = dataset.bad_summary(reprobe=True)
    elif stop.cause is not None:
        detail = worker_message(stop.cause)
    else:
        detail = str(stop)
    if stop.checkpoint is None:
        return f"{detail}; the run stopped before training a step (nothing to save)"
    return (f"{detail}; the {stop.step} step(s) trained are saved in {stop.checkpoint}: fix the data (or raise "
            f"--max-bad-fraction), then continue with --resume latest")


def _impl_line(op: str, call: dict) -> str:
    """"op impl (device, dtype, detail ...)" for the run log: any detail the impl adds (e.g. which runs the OT op's
    Sinkhorn iterations) follows its device and dtype."""
    detail = [f"{k} {v}" for k, v in call.items() if k not in ("impl", "device", "dtype")]
    return f"{op} {call['impl']} ({', '.join([call['device'], call['dtype'], *detail])})"


def fit(run: RunState, data: RunData, e: Engine) -> Fit:
    """The training loop with its checkpoints and validation; returns after the final checkpoint, on every rank."""
    args, reporter, rank, engine = run.args, run.reporter, run.rank, e.engine
    out = Fit(result=None, checkpoint="")

    def on_first_step():
        text_cfg = e.model_cfg.text
        text_attention = text_cfg.attn_implementation
        attn_drop = text_cfg.dropout if text_cfg.attention_dropout is None else text_cfg.attention_dropout
        if run.device_type == "cpu" and attn_drop > 0:  # training with attention dropout: the C kernel or PyTorch
            how = packed_attention_status() if e.dtype == torch.float32 else "pytorch (the C kernel is fp32)"
            text_attention = f"{text_attention}; training with dropout: {how}"
        out.backends.update(vit_attention=selected_backend(), text_attention=text_attention,
                            ops=describe_selected(detail=True))
        ops = ", ".join(_impl_line(op, c) for op, c in out.backends["ops"].items() if c)
        reporter.log("attention backend: ViT %s, text %s; fused op impls: %s", out.backends["vit_attention"],
                     out.backends["text_attention"], ops)
        reporter.record("event", event="backends", **out.backends)

    checkpointer = Checkpointer(run.run_dir / ckpt.CHECKPOINT_DIR, keep=args.keep_checkpoints,
                                resumed=(Path(run.resume.root), run.resume.tag) if run.resume is not None else None)
    saved_steps = {}

    def latest() -> Optional[str]:
        path = checkpointer.latest()
        return None if path is None else str(path)

    def save(step: int) -> str:
        if step in saved_steps:
            return saved_steps[step]
        with run.times.phase("checkpoints"):
            return _save(step)

    def _save(step: int) -> str:
        if not state_is_finite(engine):  # collective: every rank checks its own parameters
            reporter.record("event", event="non_finite_weights", step=step, checkpoint=latest())
            raise NonFiniteLossError(step, {}, latest(), what=f"non-finite weights after step {step} (its update made "
                                                              f"them NaN or infinite)")
        epoch, in_epoch = data.sampler.position(step)
        client = dict(step=step, epoch=epoch, step_in_epoch=in_epoch, samples_seen=step * run.global_batch,
                      world_size=run.ranks.world, zero_stage=run.zero_stage, global_batch=run.global_batch,
                      num_train=len(data.train_set), data_order=data.sampler.signature(),
                      data_fingerprint=data.fingerprint, seed=args.seed, loss=ctx.last_terms, args=vars(args))
        path = checkpointer.save(engine, step, client)
        saved_steps[step] = str(path)
        reporter.record("event", event="checkpoint", step=step, path=str(path))
        return str(path)

    def evaluate(step: int, split: str = "valid") -> Optional[dict]:
        with run.times.phase("evaluations"):
            return _evaluate(step, split)

    def _evaluate(step: int, split: str) -> Optional[dict]:
        dataset = data.eval_sets.zero_shot_set(split)
        if dataset is None:
            return None
        result = loc = diag = None
        root = data.eval_sets.synthetic_root
        if run.zero_stage == 3 or rank == 0:  # ZeRO-3: every rank takes part in the gathers of the forward
            with precision_context(e.dtype, run.device_type):
                result = or_skip(reporter, f"step {step}: {split} zero-shot evaluation", zero_shot, engine.module,
                                 dataset, data.eval_sets.prompts, max_samples=args.eval_max_samples)
                if root is not None:  # the synthetic benchmark has a mask per finding sentence
                    loc = or_skip(reporter, f"step {step}: {split} localisation", data.eval_sets.localisation,
                                  engine.module, split, max_samples=args.eval_max_samples)
                if root is not None and args.diagnose:
                    diag = or_skip(reporter, f"step {step}: {split} integrity diagnostics", integrity, engine.module,
                                   root, split, max_samples=args.eval_max_samples)
        barrier()
        if result is not None and rank == 0:
            pointing = {} if loc is None else {"localisation": loc["pointing_accuracy"], "localisation_chance": loc["chance"]}
            diagnosed = {} if diag is None else {"integrity": diag}
            out.eval_history.append({"step": step, "split": split, "auc_macro": result["auc_macro"], **pointing,
                                     **diagnosed})
            reporter.log("step %d: %s zero-shot macro AUC %.3f (chance 0.5); %s%s", step, split, result["auc_macro"],
                         ", ".join(f"{k} {v:.3f}" for k, v in result["auc"].items() if v is not None),
                         "" if loc is None else f"; pointing accuracy {loc['pointing_accuracy']:.3f} (chance "
                                                f"{loc['chance']:.3f})")
            reporter.record("eval", step=step, split=split, auc_macro=result["auc_macro"], auc=result["auc"],
                            accuracy_macro=result["accuracy_macro"], f1_macro=result["f1_macro"],
                            n_images=result["n_images"], **pointing, **diagnosed)
            if diag is not None:
                reporter.log("step %d: %s", step, integrity_line(diag))
            if engine.monitor.enabled:
                engine.monitor.write_events([(f"Eval/{split}_auc_macro", result["auc_macro"], step)]
                                            + [(f"Eval/{split}_{k}", v, step) for k, v in pointing.items()])
        return result

    with run.times.phase("batch_source"):
        if args.in_memory:
            pairs = tdata.MemoryPairs(data.train_set, e.collate.tokenizer, e.collate.max_length,
                                      e.collate.max_sentences)
            batches = tdata.memory_batches(pairs, data.sampler)
            reporter.log("training data in memory: %d images decoded and reports tokenized once; batches built in "
                         "the training process", len(data.train_set))
        else:
            batches = iter(tdata.make_train_loader(data.train_set, data.sampler, e.collate, args.num_workers))
    hooks = watch_step(run.times, engine)
    probe = StepProbe(batches, e.criterion, run.accum)
    reporter.step_extras = probe.extras
    monitor = None
    if engine.monitor.enabled:
        def monitor(events: list) -> None:  # the loop's events plus the probe's, at the same step
            step = events[0][2] if events else None
            extra = [(f"Train/{k}", v, step) for k, v in probe.extras().items()] if step is not None else []
            engine.monitor.write_events(events + extra)
    ctx = LoopContext(engine=engine, criterion=probe.criterion, batches=probe, reporter=reporter, stop=run.stop,
                      seed=args.seed, rank=rank, world_size=run.ranks.world, accumulation=run.accum,
                      global_batch=run.global_batch, steps_per_epoch=data.sampler.steps_per_epoch,
                      total_steps=data.total_steps, start_step=e.start_step, dtype=e.dtype, log_every=args.log_every,
                      eval_every=args.eval_every, save_every=args.save_every, evaluate=evaluate, save=save,
                      latest=latest, on_first_step=on_first_step, monitor=monitor,
                      max_skipped_in_a_row=MAX_SKIPPED_IN_A_ROW_FP16 if e.config.get("fp16", {}).get("enabled")
                      else MAX_SKIPPED_IN_A_ROW, integrity_warmup=e.model_cfg.sie_warmup,
                      skipped_steps=int(engine.skipped_steps), times=run.times)
    out.setup_s = run.elapsed()
    run.phase, run.stop.immediate = "training", False  # a stop now finishes the step and checkpoints it
    in_loop = {k: run.times.seconds.get(k, 0.0) for k in ("evaluations", "checkpoints")}
    if args.profile_steps and rank == 0:
        ctx.profiler = StepProfiler(run.run_dir / "profile", args.profile_steps, run.device_type, reporter.log)
    try:
        out.result = train_loop(ctx)
    except DataStopped as stop:
        raise DatasetError(_data_stop_message(stop, data.train_set)) from None
    finally:
        # an error's traceback keeps the iterator alive: its workers are shut down here, not by its finaliser
        reporter.step_extras = None
        tdata.close_loader(batches)
        del batches, probe
        for hook in hooks:
            hook.remove()
        if ctx.profiler is not None:
            ctx.profiler.close()
    # the loop's own time: its wall less the evaluations and checkpoints it called
    run.times.add("training", out.result.wall_s - sum(run.times.seconds.get(k, 0.0) - v for k, v in in_loop.items()))
    reporter.log("training: %d steps in %.1f s (%.1f samples/s)", out.result.steps - e.start_step, out.result.wall_s,
                 out.result.samples / max(out.result.wall_s, 1e-9))
    if out.result.skipped_steps:
        reporter.warning("the optimizer skipped %d step(s) of this run's %d (non-finite gradients)",
                         out.result.skipped_steps, out.result.steps)
    merge_bad_items(data.train_set)
    out.checkpoint = save(out.result.steps)
    barrier()
    # the export and evaluation after the final checkpoint are redone by --resume latest: a stop ends them at once
    run.phase, run.step, run.checkpoint = "finish", out.result.steps, out.checkpoint
    run.stop.immediate = True
    run.stop.raise_if_requested()
    return out


def watch_step(times: PhaseTimes, engine) -> list:
    """Times the phases of a step that happen inside the engine: each tower's forward (hooks on the model's
    ``visual`` and ``text`` modules, removed with the returned handles) and the optimizer's own update inside
    DeepSpeed's step (its wrapped torch optimizer, ZeRO's flat partitions), so that the rest of ``engine.step``
    is DeepSpeed's bookkeeping (gradient norm and clipping, copying the partitions back, the schedule)."""
    model = engine.module
    hooks = []
    for attr, name in (("visual", "train/forward_image"), ("text", "train/forward_text")):
        if isinstance(getattr(model, attr, None), torch.nn.Module):
            hooks += times.watch(getattr(model, attr), name)
    inner = getattr(engine.optimizer, "optimizer", None)
    if inner is not None and callable(getattr(inner, "step", None)):
        times.wrap(inner, "step", "train/optimizer")
    return hooks


def merge_bad_items(dataset) -> None:
    """Collective: every rank learns the items the other ranks (and their loader workers) found bad."""
    if not hasattr(dataset, "bad_items") or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, dataset.bad_items())
    dataset.mark_bad(sorted({i for items in found for i in items}))
