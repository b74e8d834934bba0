"""``--torchcompile``: the training step's towers and loss through ``torch.compile``.

What is compiled, each in place (the module's method replaced by its compiled version), so that the model stays
the module DeepSpeed's engine wraps, with the same ``state_dict`` keys (no ``_orig_mod.`` prefix, which a
``torch.compile(model)`` wrapper would add): checkpoints and the export are those of an uncompiled run, and each
kind of run resumes the other's checkpoint. The towers' timing hooks (:func:`mlip_fast.train.fit.watch_step`) stay
outside the compiled code.

* the image tower in three parts around its masking: the patch embedding, the integrity estimator and the
  blocks with the final norm. The masking stays eager: its Gumbel-top-k sampling seeds a generator from the
  step's seed, an int that changes every step (compiled: a recompilation per step; a generator cannot be created
  inside a graph);
* the report encoder only where it would not take the padding-free BERT path
  (:func:`mlip_fast.models.text.padding_free`; e.g. under gradient checkpointing or eager attention): that path
  is eager only (a data-dependent token count), and compiled, the encoder runs transformers' padded forward, which
  was slower than the eager padding-free one on the synthetic benchmark (docs/training.md, torch.compile);
* the loss (:class:`~mlip_fast.losses.MLIPLoss`) whole, with ``fullgraph=True`` (its value checks are skipped
  while tracing; tests/test_losses_compile.py); with several processes with graph breaks allowed (its gathers pad
  the sentences to the largest count over the ranks, a size read from a collective, which a whole graph cannot
  branch on).

torch.compile compiles at the first call of each new input signature: the first step, the first step with another
sentence count (after which that size is traced as dynamic), the first evaluation (no gradient, eval mode).
:func:`compile_record` states the seconds dynamo spent compiling (its own account) next to the step times, in
summary.json's ``torchcompile``.
"""
from __future__ import annotations

import os
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from mlip_fast.models.config import ConfigError
from mlip_fast.models.text import padding_free

__all__ = ["COMPILE_BACKENDS", "DEFAULT_BACKEND", "CompileState", "check_compile", "compile_for_training",
           "compile_record"]

# inductor is the one that generates kernels (the speed); aot_eager traces forward and backward as inductor does
# without generating code (seconds to compile: tests), eager runs dynamo's graph capture only.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DEFAULT_BACKEND = "inductor"
# The image tower's parts around its masking (module docstring); the report encoder's forward is added where it
# takes transformers' padded forward anyway.
IMAGE_TARGETS = ("visual.embeddings.forward", "visual.estimator.forward", "visual._run_blocks")
TEXT_TARGET = "text.forward"


@dataclass
class CompileState:
    """What ``--torchcompile`` compiled, with which backend, and dynamo's compile-time account when it started
    (so that a run's record counts its own compilations only)."""

    backend: str
    compiled: list = field(default_factory=list)
    start: dict = field(default_factory=dict)


def check_compile(args, device_type: str) -> None:
    """Refuses ``--torchcompile`` where it cannot work, before anything slow: a backend other than
    :data:`COMPILE_BACKENDS`; inductor on a CPU without a C++ compiler."""
    backend = getattr(args, "torchcompile_backend", DEFAULT_BACKEND)
    if backend not in COMPILE_BACKENDS:
        raise ConfigError(f"--torchcompile-backend {backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}")
    if not args.torchcompile:
        return
    if backend == "inductor" and device_type == "cpu" and not (shutil.which(os.environ.get("CXX", "g++"))
                                                               or shutil.which("c++")):
        raise ConfigError("--torchcompile: inductor builds C++ kernels on a CPU and no C++ compiler was found (g++, "
                          "c++ or $CXX); install one, or pass --torchcompile-backend aot_eager (no generated code)")


def _dynamo_account() -> dict:
    """Dynamo's cumulative compile seconds (forward frames and backward graphs); {} where this torch lacks it."""
    utils = sys.modules.get("torch._dynamo.utils")  # loaded by torch.compile; read without importing it
    if utils is None or not hasattr(utils, "calculate_time_spent") or not hasattr(utils, "counters"):
        return {}
    spent = utils.calculate_time_spent()
    return {"compile_s": float(spent.get("total_wall_time", 0.0)),
            "graphs": int(utils.counters["stats"].get("unique_graphs", 0))}


def compile_for_training(model: torch.nn.Module, criterion: torch.nn.Module, backend: str,
                         world_size: int = 1) -> CompileState:
    """Compiles the image tower's parts, the report encoder where it is not padding-free, and the loss, in place
    (module docstring); the model and the loss keep their parameters, buffers and ``state_dict`` keys."""
    state = CompileState(backend=backend)
    encoder = getattr(model.text, "encoder", None)
    targets = IMAGE_TARGETS + (() if encoder is not None and padding_free(encoder) else (TEXT_TARGET,))
    for path in targets:
        owner_path, attr = path.rsplit(".", 1)
        owner = model
        for name in owner_path.split("."):
            owner = getattr(owner, name, None)
        if owner is None:  # a tower built without it (the ViT without its integrity estimator)
            continue
        setattr(owner, attr, torch.compile(getattr(owner, attr), backend=backend))
        state.compiled.append(f"model.{path}")
    whole = world_size == 1
    criterion.compile(fullgraph=whole, backend=backend)
    state.compiled.append(f"{type(criterion).__name__} ({'fullgraph' if whole else 'graph breaks at the gathers'})")
    state.start = _dynamo_account()  # nothing compiles before the first call
    return state


def compile_record(state: Optional[CompileState], step_s: list) -> dict:
    """summary.json's ``torchcompile``: whether it was on, the backend, what was compiled, the seconds dynamo
    spent compiling in this run (``compile_s``, its own account: forward frames and backward graphs, the
    evaluations' included) and the graphs it built, and the step times: the first step's, a steady step's (the
    median of the second half of the steps) and ``warmup_excess_s``, what the steps took beyond the steady pace
    (the compile time the training steps waited for)."""
    if state is None:
        return {"enabled": False}
    now = _dynamo_account()
    out = {"enabled": True, "backend": state.backend, "compiled": list(state.compiled)}
    if now:
        out["compile_s"] = round(now["compile_s"] - state.start.get("compile_s", 0.0), 2)
        out["graphs"] = now["graphs"] - state.start.get("graphs", 0)
    if step_s:
        steady = statistics.median(step_s[len(step_s) // 2:])
        out.update(first_step_s=round(step_s[0], 3), steady_step_s=round(steady, 4),
                   warmup_excess_s=round(sum(step_s) - steady * len(step_s), 2))
    return out
