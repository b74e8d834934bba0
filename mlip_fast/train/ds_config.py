"""Loading and resolving the DeepSpeed JSON config before anything starts.

The config is a file or a shipped name (``mlip_fast/train/ds_configs/*.json``: ``--deepspeed_config zero2``,
:func:`resolve_ds_config`). The open_clip-style flags ``--batch-size``, ``--precision``, ``--wd`` and
``--warmup`` are mapped onto it by :func:`apply_flag_overrides`, then the config that runs is validated as a
whole (:func:`validate_ds_config`, :mod:`mlip_fast.train.ds_checks`). Batch sizes are resolved against the
world size (``train_batch_size = micro x accumulation x world``, filling the missing one as DeepSpeed would),
and ``"auto"`` for ``scheduler.params.total_num_steps`` and ``warmup_num_steps`` from the run length
(:func:`resolve_schedule`).
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Optional, Union

import torch

from mlip_fast.train.ds_checks import MAX_LR, DSConfigError, validate_ds_config

__all__ = ["DSConfigError", "load_ds_config", "resolve_ds_config", "shipped_ds_configs", "apply_flag_overrides",
           "validate_ds_config", "apply_accum_freq", "resolve_batch_sizes", "resolve_schedule", "precision_dtype",
           "WARMUP_FRACTION", "SHIPPED_DIR"]

# Share of the run spent warming up when the scheduler asks for "auto".
WARMUP_FRACTION = 0.05
SHIPPED_DIR = Path(__file__).resolve().parent / "ds_configs"


def shipped_ds_configs() -> list[str]:
    """Names of the DeepSpeed configs shipped with the package (``--deepspeed_config <name>``)."""
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.json"))


def resolve_ds_config(name: Union[str, Path]) -> Path:
    """The file of ``--deepspeed_config``: an existing file, else a shipped config by name (``zero2`` or
    ``zero2.json``); :class:`DSConfigError` naming both when neither exists."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / f"{path.stem}.json"
    if path.name == str(name) and path.suffix in ("", ".json") and shipped.is_file():
        return shipped
    raise DSConfigError(f"DeepSpeed config {str(name)!r} does not exist: it is neither a file nor the name of a "
                        f"shipped config ({', '.join(shipped_ds_configs())})")


def load_ds_config(path: Union[str, Path]) -> dict:
    """Reads a DeepSpeed JSON config (a file or a shipped name); clear errors for a missing file or invalid
    JSON."""
    path = resolve_ds_config(path)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DSConfigError(f"DeepSpeed config {path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise DSConfigError(f"DeepSpeed config {path} must be a JSON object, got {type(config).__name__}")
    return config


def apply_flag_overrides(config: dict, *, batch_size: Optional[int] = None, precision: Optional[str] = None,
                         weight_decay: Optional[float] = None, warmup: Optional[int] = None,
                         where: str = "ds config") -> tuple[dict, list]:
    """A copy of ``config`` with the open_clip-style flags mapped onto it, and the list of changes made
    (``"key: old -> new"``, for the run log). None leaves a key as the config has it.

    - ``batch_size`` (``--batch-size``, per process): ``train_micro_batch_size_per_gpu``; a configured
      ``train_batch_size`` is dropped, so the global batch is batch size x accumulation x processes;
    - ``precision`` (``--precision fp32|bf16|fp16``): ``bf16.enabled`` and ``fp16.enabled``;
    - ``weight_decay`` (``--wd``): ``optimizer.params.weight_decay``;
    - ``warmup`` (``--warmup``): ``scheduler.params.warmup_num_steps``, which needs a scheduler that warms
      up (:class:`DSConfigError` otherwise).
    """
    config = copy.deepcopy(config)
    changes = []

    def put(section: dict, key: str, value, shown: str) -> None:
        old = section.get(key, "unset")
        if old != value:
            changes.append(f"{shown}: {old} -> {value}")
        section[key] = value

    if batch_size is not None:
        if "train_batch_size" in config:
            changes.append(f"train_batch_size: {config.pop('train_batch_size')} -> derived")
        put(config, "train_micro_batch_size_per_gpu", batch_size, "train_micro_batch_size_per_gpu")
    if precision is not None:
        for kind in ("bf16", "fp16"):
            if precision == kind or kind in config:
                section = config.setdefault(kind, {})
                if not isinstance(section, dict):
                    raise DSConfigError(f"{where}: {kind!r} must be a JSON object, got {type(section).__name__}")
                put(section, "enabled", precision == kind, f"{kind}.enabled")
    if weight_decay is not None:
        optimizer = config.get("optimizer")
        if not isinstance(optimizer, dict):
            raise DSConfigError(f"{where}: --wd sets optimizer.params.weight_decay, but the config has no 'optimizer' "
                                f"section")
        put(optimizer.setdefault("params", {}), "weight_decay", weight_decay, "optimizer.params.weight_decay")
    if warmup is not None:
        scheduler = config.get("scheduler")
        if not isinstance(scheduler, dict):
            raise DSConfigError(f"{where}: --warmup sets scheduler.params.warmup_num_steps, but the config has no "
                                f"'scheduler' section (add one, e.g. WarmupCosineLR)")
        from deepspeed.runtime import lr_schedules

        cls = getattr(lr_schedules, str(scheduler.get("type")), None)
        if cls is None or "warmup_num_steps" not in inspect.signature(cls.__init__).parameters:
            raise DSConfigError(f"{where}: --warmup needs a scheduler with warmup_num_steps (WarmupLR, WarmupDecayLR, "
                                f"WarmupCosineLR); this config's is {scheduler.get('type')!r}")
        put(scheduler.setdefault("params", {}), "warmup_num_steps", warmup, "scheduler.params.warmup_num_steps")
    return config, changes


def apply_accum_freq(config: dict, accum_freq: Optional[int]) -> dict:
    """A copy of ``config`` with ``gradient_accumulation_steps = accum_freq`` (``--accum-freq``; None
    leaves it as it is). A configured ``train_batch_size`` (the global batch, i.e. the contrastive
    batch) is kept and the per-GPU micro-batch is derived from it; without one the micro-batch is kept
    and the global batch grows. :func:`resolve_batch_sizes` then checks divisibility."""
    if accum_freq is None:
        return config
    if not isinstance(accum_freq, int) or accum_freq < 1:
        raise DSConfigError(f"--accum-freq must be a positive int, got {accum_freq!r}")
    config = copy.deepcopy(config)
    if config.get("train_batch_size") is not None:
        config.pop("train_micro_batch_size_per_gpu", None)
    config["gradient_accumulation_steps"] = accum_freq
    return config


def resolve_batch_sizes(config: dict, world_size: int, where: str = "ds config") -> dict:
    """A copy of ``config`` with all three batch keys set consistently for ``world_size``.

    Any two of ``train_batch_size`` (global), ``train_micro_batch_size_per_gpu`` and
    ``gradient_accumulation_steps`` determine the third (accumulation defaults to 1); all three given
    must satisfy global = micro x accumulation x world.
    """
    config = copy.deepcopy(config)
    keys = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    for key in keys:
        value = config.get(key)
        if value is not None and not (isinstance(value, int) and value > 0):
            raise DSConfigError(f"{where}: {key} must be a positive int, got {value!r}")
    total, micro, accum = (config.get(k) for k in keys)
    if total is None and micro is None:
        raise DSConfigError(f"{where}: set train_batch_size or train_micro_batch_size_per_gpu")
    if total is not None and micro is not None and accum is not None:
        if total != micro * accum * world_size:
            raise DSConfigError(
                f"{where}: train_batch_size ({total}) != train_micro_batch_size_per_gpu ({micro}) x "
                f"gradient_accumulation_steps ({accum}) x world size ({world_size}); drop one of the three "
                f"and it is derived")
    elif total is not None and micro is not None:
        if total % (micro * world_size):
            raise DSConfigError(f"{where}: train_batch_size ({total}) is not a multiple of "
                                f"train_micro_batch_size_per_gpu ({micro}) x world size ({world_size})")
        accum = total // (micro * world_size)
    elif total is not None:
        accum = accum or 1
        if total % (accum * world_size):
            raise DSConfigError(f"{where}: train_batch_size ({total}) is not divisible by "
                                f"gradient_accumulation_steps ({accum}) x world size ({world_size}); "
                                f"choose a global batch that is")
        micro = total // (accum * world_size)
    else:
        accum = accum or 1
        total = micro * accum * world_size
    config.update(train_batch_size=total, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    return config


def resolve_schedule(config: dict, total_steps: int) -> dict:
    """A copy of ``config`` whose scheduler's ``"auto"`` (or absent) step counts follow the run length:
    ``total_num_steps`` = the run's optimizer steps, ``warmup_num_steps`` = ``WARMUP_FRACTION`` of them
    (at least 2, DeepSpeed's minimum). A warm-up set in steps must be shorter than the run."""
    config = copy.deepcopy(config)
    section = config.get("scheduler")
    if section is None:
        return config
    params = section.setdefault("params", {})
    if section.get("type") in ("WarmupCosineLR", "WarmupDecayLR") and params.get("total_num_steps", "auto") == "auto":
        params["total_num_steps"] = int(total_steps)
    warmup, total = params.get("warmup_num_steps"), params.get("total_num_steps")
    if warmup == "auto":
        params["warmup_num_steps"] = max(2, int(round(WARMUP_FRACTION * total_steps)))
    elif isinstance(warmup, int) and isinstance(total, int) and warmup >= total:
        raise DSConfigError(f"scheduler.params.warmup_num_steps ({warmup}) must be below the run's {total} steps "
                            f"(--warmup / the ds config)")
    if section.get("type") == "LRRangeTest":
        _check_range_test_reach(params, int(total_steps))
    return config


def _check_range_test_reach(params: dict, total_steps: int) -> None:
    """LRRangeTest raises the rate without bound: the rate it reaches by the run's last step must be a learning
    rate too (DeepSpeed: ``min_lr * (1 + step_rate * x)``, x = steps / step_size, floored with staircase)."""
    min_lr = params.get("lr_range_test_min_lr", 1e-3)
    size, rate = params.get("lr_range_test_step_size", 2000), params.get("lr_range_test_step_rate", 1.0)
    x = (total_steps - 1) / size
    reached = min_lr * (1 + rate * (int(x) if params.get("lr_range_test_staircase", False) else x))
    if reached > MAX_LR:
        raise DSConfigError(f"scheduler LRRangeTest reaches a learning rate of {reached:g} by step {total_steps}; "
                            f"learning rates must be in (0, {MAX_LR:g}]")


def precision_dtype(config: dict):
    """The dtype DeepSpeed keeps the model in for this config."""
    if config.get("bf16", {}).get("enabled", False):
        return torch.bfloat16
    if config.get("fp16", {}).get("enabled", False):
        return torch.float16
    return torch.float32


def lr_of(config: dict) -> Optional[float]:
    return config.get("optimizer", {}).get("params", {}).get("lr")
