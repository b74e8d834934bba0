"""Pieces every loss shares: normalisation, the logit scale and batch checks, row weights and the symmetric
cross-entropy."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast.distributed import gather


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1, eps=1e-12)


def _check_scale(name: str, scale) -> torch.Tensor:
    """The logit scale as a 0-dim tensor; it must be finite and > 0 (a value check: one host sync)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.Tensor)):
        raise ValueError(f"{name} must be a scalar (float or 1-element tensor), got {scale!r}")
    if isinstance(scale, (int, float)):
        scale = torch.tensor(float(scale))
    if scale.numel() != 1 or not scale.is_floating_point():
        raise ValueError(f"{name} must be a floating scalar (float or 1-element tensor), got {scale!r}")
    scale = scale.reshape(())
    if _checks.value_checks():
        value = float(scale.detach())
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")
    return scale


def _check_batch(name: str, x: torch.Tensor) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"empty input: {name} has batch size 0 {tuple(x.shape)} (every loss needs B >= 1)")


def _row_weights(weights: Optional[torch.Tensor], rows: int, device, group, *, gathered: bool) -> Optional[torch.Tensor]:
    """Detached per-row weights normalised to mean 1 over the global batch; None when not weighted."""
    if weights is None:
        return None
    _checks.check_tensor("weights", weights, 1, dims=("B",))
    if weights.shape[0] != rows:
        raise ValueError(f"weights must have shape [B={rows}], got {tuple(weights.shape)}")
    if _checks.value_checks() and bool((weights < 0).any()):
        raise ValueError("weights must be non-negative")
    if _checks.value_checks() and not bool(torch.isfinite(weights).all()):
        raise ValueError("weights contains NaN or Inf")
    w = weights.detach().to(device=device, dtype=torch.float32)
    w_all = gather(w, with_grad=False, group=group)
    mean = w_all.mean()
    if _checks.value_checks() and not bool(mean > 0):
        raise ValueError("weights are all zero over the batch: no row would contribute to the loss")
    return (w_all if gathered else w) / mean.clamp_min(torch.finfo(torch.float32).tiny)


def _weighted_ce(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, reduction="none")
    return ce.mean() if weights is None else (ce * weights).mean()


def _labels(rows: int, offset: int, device) -> torch.Tensor:
    return torch.arange(rows, device=device) + offset


def _symmetric_ce(sim_i: torch.Tensor, sim_t: torch.Tensor, scale: torch.Tensor, labels: torch.Tensor,
                  weights: Optional[torch.Tensor]) -> torch.Tensor:
    """1/2 [CE(scale * sim_i) + CE(scale * sim_t)]; similarities are widened to fp32 (fp64 stays) before
    scaling, so a large scale cannot overflow half-precision logits."""
    dtype = torch.promote_types(sim_i.dtype, torch.float32)
    scale = scale.to(device=sim_i.device, dtype=dtype)
    return 0.5 * (_weighted_ce(scale * sim_i.to(dtype), labels, weights)
                  + _weighted_ce(scale * sim_t.to(dtype), labels, weights))
