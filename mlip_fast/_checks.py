"""Input validation shared by ops and losses: clear errors naming the argument."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(
    name: str,
    x,
    ndim: int,
    *,
    dims: Optional[Sequence[str]] = None,
    floating: bool = True,
    finite: bool = True,
) -> torch.Tensor:
    """Checks type, rank, dtype and finiteness of ``x``; returns it unchanged."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = f"[{', '.join(dims)}]" if dims else f"{ndim} dims"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    if finite and floating and value_checks() and not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def check_mask(name: str, mask, shape: Sequence[int], *, device: torch.device) -> Optional[torch.Tensor]:
    """Validates a validity mask (True = valid) of ``shape``: bool, or uint8 read as != 0; returns it as bool
    (any strides). None passes through."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of bool, got {type(mask).__name__}")
    if mask.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"{name} must be a bool (or uint8 0/1) tensor, True = valid; got {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the embeddings are on {device}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_rows_nonempty(name: str, mask: Optional[torch.Tensor], what: str) -> None:
    """Every row of ``mask`` must keep at least one valid entry."""
    if mask is not None and mask.numel() and value_checks() and not mask.any(dim=-1).all():
        bad = (~mask.any(dim=-1)).nonzero().flatten()[:8].tolist()
        raise ValueError(f"{name}: rows {bad} have no valid {what} (every row needs at least one)")


# Value-dependent checks (NaN/Inf, empty rows, negative weights) read tensor contents, which costs a
# host synchronisation on accelerators. MLIP_FAST_VALUE_CHECKS=0 turns them off for production runs.
VALUE_CHECKS = os.environ.get("MLIP_FAST_VALUE_CHECKS", "1") != "0"


@contextlib.contextmanager
def value_checks_disabled():
    """Value checks off inside the block (for a caller that checks the result instead, like the training loop,
    whose one reduction of the loss terms sees any non-finite input)."""
    global VALUE_CHECKS
    saved, VALUE_CHECKS = VALUE_CHECKS, False
    try:
        yield
    finally:
        VALUE_CHECKS = saved


def value_checks() -> bool:
    """Whether value-dependent checks run now: ``VALUE_CHECKS``, and not while torch.compile traces (a check on
    tensor contents would break the graph; a compiled loss checks shapes, dtypes and devices only, so validate
    the inputs of a new data pipeline eagerly once)."""
    return VALUE_CHECKS and not torch.compiler.is_compiling()


def dataclass_from_dict(cls, data, where: str, error: type = ValueError):
    """``cls(**data)`` for a dataclass ``cls``, refusing a non-dict and unknown keys with ``error`` naming
    ``where`` (a config file or section) and the known keys."""
    if not isinstance(data, dict):
        raise error(f"{where} must be a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise error(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
    return cls(**data)
