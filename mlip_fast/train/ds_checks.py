"""Validation of a DeepSpeed JSON config before anything starts (:func:`validate_ds_config`).

DeepSpeed silently ignores unknown top-level keys and only reports some mistakes deep inside
``deepspeed.initialize`` (or on the first step), after data and model are built. These checks raise
:class:`DSConfigError` with a message naming the key and the file:

- top-level keys against the keys DeepSpeed 0.19 reads (with a "did you mean" hint);
- the sections DeepSpeed models with pydantic (``zero_optimization``, ``bf16``, ``fp16``, monitors)
  through DeepSpeed's own models, which forbid unknown keys;
- ``optimizer.params`` against the optimizer's constructor and ``scheduler.params`` against the
  scheduler's constructor (both read by signature, so the check follows the installed versions), and
  every value of both for type, sign and finiteness (``_VALUE_RULES``; a parameter without a rule must
  have the type of its constructor default), like ``gradient_clipping``;
- precision against the device: fp16 needs a GPU; bf16 on CPU needs CPU bf16 support.
"""
from __future__ import annotations

import difflib
import inspect
import json
import math

import torch

__all__ = ["DSConfigError", "validate_ds_config", "cpu_supports_bf16", "KNOWN_TOP_LEVEL_KEYS", "MAX_LR"]


# Top-level keys read by DeepSpeed 0.19 (runtime/config.py and the feature configs it parses).
KNOWN_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
    "scheduler", "fp16", "bf16", "amp", "torch_autocast", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "gradient_clipping", "steps_per_print", "wall_clock_breakdown",
    "memory_breakdown", "dump_state", "prescale_gradients", "gradient_predivide_factor",
    "gradient_allreduce_op", "communication_data_type", "seq_parallel_communication_data_type",
    "disable_allgather", "sparse_gradients", "activation_checkpointing", "flops_profiler", "tensorboard",
    "wandb", "csv_monitor", "comet", "checkpoint", "data_types", "dataloader_drop_last", "data_efficiency",
    "curriculum_learning", "elasticity", "autotuning", "pipeline", "aio", "compression_training",
    "eigenvalue", "progressive_layer_drop", "hybrid_engine", "compile", "weight_quantization",
    "sparse_attention", "nebula", "quantize_training", "use_data_before_expert_parallelism",
    "disable_python_gc", "log_level", "tensor_parallel", "expert_parallel", "managed_gradient_accumulation",
    "graph_harvesting", "timers", "zero_optimization_stage", "seed",
})

_OPTIMIZER_EXTRA_PARAMS = {
    # popped by DeepSpeed before the torch optimizer is built
    "adam": {"torch_adam", "adam_w_mode", "fp32_optimizer_states"},
    "adamw": {"torch_adam", "adam_w_mode", "fp32_optimizer_states"},
}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# The largest learning rate accepted anywhere (optimizer, schedule, --lr): above it no optimizer of this app
# trains (AdamW's step is about lr per weight per step; a rate of 1e9 turned the loss NaN within 4 steps).
MAX_LR = 10.0

# What each optimizer / scheduler value must be, as (description, check): DeepSpeed and torch accept a negative
# or NaN learning rate, a string, ... and fail, or train silently wrong, long after start-up.
_POSITIVE = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
_LR = (f"a learning rate in (0, {MAX_LR:g}]", lambda v: _is_number(v) and 0 < v <= MAX_LR)
_MIN_LR = (f"a learning rate in [0, {MAX_LR:g}]", lambda v: _is_number(v) and 0 <= v <= MAX_LR)
_NON_NEGATIVE = ("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
_UNIT = ("a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_BOOL_OR_NULL = ("true, false or null", lambda v: v is None or isinstance(v, bool))
_INT_POSITIVE = ("an int > 0", lambda v: _is_int(v) and v > 0)
_INT_NON_NEGATIVE = ("an int >= 0", lambda v: _is_int(v) and v >= 0)
_FINITE = ("a finite number", _is_number)
_VALUE_RULES = {
    "lr": _LR, "eps": _POSITIVE, "weight_decay": _NON_NEGATIVE, "momentum": _NON_NEGATIVE,
    "dampening": _NON_NEGATIVE, "lr_decay": _NON_NEGATIVE, "initial_accumulator_value": _NON_NEGATIVE,
    "betas": ("two numbers in [0, 1)",
              lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(b) and 0 <= b < 1 for b in v)),
    "amsgrad": _BOOL, "maximize": _BOOL, "nesterov": _BOOL, "capturable": _BOOL, "differentiable": _BOOL,
    "torch_adam": _BOOL, "adam_w_mode": _BOOL, "foreach": _BOOL_OR_NULL, "fused": _BOOL_OR_NULL,
    "warmup_min_lr": _MIN_LR, "warmup_max_lr": _LR, "warmup_min_ratio": _UNIT, "cos_min_ratio": _UNIT,
    "warmup_type": ("'log' or 'linear'", lambda v: v in ("log", "linear")),
    "last_batch_iteration": ("an int >= -1", lambda v: _is_int(v) and v >= -1),
    "lr_range_test_min_lr": _LR, "lr_range_test_step_size": _INT_POSITIVE,
    "lr_range_test_step_rate": _NON_NEGATIVE, "lr_range_test_staircase": _BOOL,
    "cycle_min_lr": _MIN_LR, "cycle_max_lr": _LR, "decay_lr_rate": _NON_NEGATIVE,
    "cycle_first_step_size": _INT_POSITIVE, "cycle_second_step_size": ("an int > 0 or null", lambda v: v is None or _INT_POSITIVE[1](v)),
    "cycle_first_stair_count": _INT_NON_NEGATIVE,
    "cycle_second_stair_count": ("an int >= 0 or null", lambda v: v is None or _INT_NON_NEGATIVE[1](v)),
    "decay_step_size": _INT_NON_NEGATIVE, "cycle_momentum": _BOOL, "cycle_min_mom": _UNIT, "cycle_max_mom": _UNIT,
    "decay_mom_rate": _NON_NEGATIVE,
}


def _shown(value) -> str:
    return f"{value!r} (a string)" if isinstance(value, str) else json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _defaults(fn) -> dict:
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def _check_values(params: dict, defaults: dict, section: str, where: str) -> None:
    """Every value of ``params`` against ``_VALUE_RULES``, or, for a name without a rule, against the type of
    its constructor default in ``defaults`` (a number must be a finite number, a flag true or false)."""
    for key, value in params.items():
        if value == "auto" and key in ("total_num_steps", "warmup_num_steps"):
            continue
        rule = _VALUE_RULES.get(key)
        if rule is None:
            default = defaults.get(key)
            rule = _BOOL if isinstance(default, bool) else _FINITE if isinstance(default, (int, float)) else None
        if rule is not None and not rule[1](value):
            raise DSConfigError(f"{where}: {section}.params.{key} must be {rule[0]}, got {_shown(value)}")


class DSConfigError(ValueError):
    """The DeepSpeed config is invalid (the message names the key and the file)."""


def _hint(key: str, known) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _pydantic_section(config: dict, key: str, model_cls, where: str) -> None:
    if key not in config:
        return
    section = config[key]
    if not isinstance(section, dict):
        raise DSConfigError(f"{where}: {key!r} must be a JSON object, got {type(section).__name__}")
    from pydantic import ValidationError

    try:
        model_cls(**section)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            name = ".".join(str(p) for p in err.get("loc", ())) or key
            if err.get("type") == "extra_forbidden":
                known = set(model_cls.model_fields) | {f.alias for f in model_cls.model_fields.values() if f.alias}
                problems.append(f"unknown key {name!r}{_hint(name, known)}")
            else:
                problems.append(f"{name}: {err.get('msg')} (got {err.get('input')!r})")
        raise DSConfigError(f"{where}: invalid {key!r} section: " + "; ".join(problems)) from None
    except (TypeError, ValueError) as e:
        raise DSConfigError(f"{where}: invalid {key!r} section: {e}") from None


def _check_params(params: dict, fn, allowed_extra: set, what: str, where: str) -> None:
    sig = inspect.signature(fn)
    accepts_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    known = {n for n in sig.parameters if n not in ("self", "params", "optimizer")} | allowed_extra
    if accepts_kwargs:
        return
    for key in params:
        if key not in known:
            raise DSConfigError(f"{where}: unknown {what} parameter {key!r}{_hint(key, known)}; "
                                f"known: {sorted(known)}")


def _check_optimizer(config: dict, where: str) -> None:
    section = config.get("optimizer")
    if section is None:
        raise DSConfigError(f"{where}: an 'optimizer' section is required (the training app lets DeepSpeed "
                            f"build the optimizer), e.g. {{'type': 'AdamW', 'params': {{'lr': 2.5e-4, "
                            f"'torch_adam': true}}}}")
    unknown = set(section) - {"type", "params", "legacy_fusion"}
    if unknown:
        raise DSConfigError(f"{where}: unknown keys {sorted(unknown)} in 'optimizer' (known: type, params)")
    name = str(section.get("type", "")).lower()
    torch_classes = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                     "adagrad": torch.optim.Adagrad}
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if name not in DEEPSPEED_OPTIMIZERS and name not in torch_classes:
        raise DSConfigError(f"{where}: unknown optimizer type {section.get('type')!r}; "
                            f"DeepSpeed knows {sorted(DEEPSPEED_OPTIMIZERS)}")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise DSConfigError(f"{where}: optimizer.params must be a JSON object")
    if name in torch_classes:
        _check_params(params, torch_classes[name].__init__, _OPTIMIZER_EXTRA_PARAMS.get(name, set()),
                      f"{section['type']} optimizer", where)
    if "lr" not in params:
        raise DSConfigError(f"{where}: optimizer.params.lr is required")
    _check_values(params, _defaults(torch_classes[name].__init__) if name in torch_classes else {}, "optimizer", where)


def _check_scheduler(config: dict, where: str) -> None:
    section = config.get("scheduler")
    if section is None:
        return
    unknown = set(section) - {"type", "params"}
    if unknown:
        raise DSConfigError(f"{where}: unknown keys {sorted(unknown)} in 'scheduler' (known: type, params)")
    from deepspeed.runtime import lr_schedules

    name = section.get("type")
    if name not in lr_schedules.VALID_LR_SCHEDULES:
        raise DSConfigError(f"{where}: unknown scheduler type {name!r}{_hint(str(name), lr_schedules.VALID_LR_SCHEDULES)}; "
                            f"DeepSpeed knows {lr_schedules.VALID_LR_SCHEDULES}")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise DSConfigError(f"{where}: scheduler.params must be a JSON object")
    _check_params(params, getattr(lr_schedules, name).__init__, set(), f"{name} scheduler", where)
    _check_values(params, _defaults(getattr(lr_schedules, name).__init__), "scheduler", where)
    for key in ("total_num_steps", "warmup_num_steps"):
        value = params.get(key)
        if value is not None and value != "auto" and not (isinstance(value, int) and value > 0):
            raise DSConfigError(f"{where}: scheduler.params.{key} must be a positive int or \"auto\", got {value!r}")


def cpu_supports_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _check_precision(config: dict, device_type: str, where: str) -> None:
    fp16 = bool(config.get("fp16", {}).get("enabled", False))
    bf16 = bool(config.get("bf16", {}).get("enabled", False))
    if fp16 and bf16:
        raise DSConfigError(f"{where}: fp16 and bf16 are both enabled; enable at most one")
    if config.get("amp", {}).get("enabled", False):
        raise DSConfigError(f"{where}: 'amp' (NVIDIA apex) is not supported by this training app; use bf16")
    if fp16 and device_type != "cuda":
        raise DSConfigError(
            f"{where}: fp16 is enabled but this run is on {device_type}; fp16 training (loss scaling) needs a "
            f"CUDA GPU. Use bf16 ({{\"bf16\": {{\"enabled\": true}}}}) or fp32 on CPU, or the GPU-only example "
            f"mlip_fast/train/ds_configs/zero2_fp16_gpu.json on a GPU")
    if bf16 and device_type == "cpu" and not cpu_supports_bf16():
        raise DSConfigError(f"{where}: bf16 is enabled but this CPU has no bf16 support (AVX-512 BF16 / AMX); "
                            f"set bf16.enabled to false to train in fp32")


def validate_ds_config(config: dict, *, device_type: str, where: str = "ds config") -> None:
    """Raises :class:`DSConfigError` on the first problem found (see the module docstring)."""
    from deepspeed.monitor.config import CometConfig, CSVConfig, TensorBoardConfig, WandbConfig
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for key in config:
        if key not in KNOWN_TOP_LEVEL_KEYS:
            raise DSConfigError(f"{where}: unknown top-level key {key!r}{_hint(key, KNOWN_TOP_LEVEL_KEYS)} "
                                f"(DeepSpeed would silently ignore it)")
    for key, model in (("zero_optimization", DeepSpeedZeroConfig), ("bf16", DeepSpeedBF16Config),
                       ("fp16", DeepSpeedFP16Config), ("tensorboard", TensorBoardConfig),
                       ("wandb", WandbConfig), ("csv_monitor", CSVConfig), ("comet", CometConfig)):
        _pydantic_section(config, key, model, where)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise DSConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    _check_optimizer(config, where)
    _check_scheduler(config, where)
    _check_precision(config, device_type, where)
    clip = config.get("gradient_clipping", 0.0)
    if not (_is_number(clip) and clip >= 0):
        raise DSConfigError(f"{where}: gradient_clipping must be a finite number >= 0, got {_shown(clip)}")
    if config.get("checkpoint", {}).get("use_node_local_storage", False):
        raise DSConfigError(f"{where}: checkpoint.use_node_local_storage is not supported by this training app "
                            f"(rank 0 renames each complete checkpoint into place on a filesystem all ranks share)")
