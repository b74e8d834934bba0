"""``impl="triton"`` for integrity-scored masking: the fused kernels as ``torch.library`` custom ops.

``mlip_fast::integrity_mask_fwd`` runs the forward (kept tokens, indices, integrity mass and the slot map its
backward needs) and has a fake (meta) impl and a registered backward (``mlip_fast::integrity_mask_bwd``), so it
runs under ``torch.compile`` and autograd alike.

The kernel module is imported here, at module top, so the path from the op to its kernels is visible; without
triton it is None and the impl's ``unavailable`` says why (the rest of the op still loads).
"""
from __future__ import annotations

from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.ops._template import custom_op_name, kernels_missing, triton_impl
from mlip_fast.reference import integrity_mask as _reference
from mlip_fast.reference.integrity_mask import MaskResult

try:
    from mlip_fast.kernels import integrity_mask as _kernels
except ImportError as err:  # triton absent (a CPU-only install): the impl reports it, nothing else changes
    _kernels, _IMPORT_ERROR = None, kernels_missing(err)
else:
    _IMPORT_ERROR = None

SEED_LIMIT = 2**63


@torch.library.custom_op(custom_op_name("integrity_mask", "fwd"), mutates_args=())
def _triton_forward(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    temperature: float,
    seed: int,
    seed_tensor: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernels.integrity_mask_fwd(tokens, scores, keep, temperature, seed, seed_tensor)


@_triton_forward.register_fake
def _(tokens, scores, keep, temperature, seed, seed_tensor):
    B, P, C = tokens.shape
    return (
        tokens.new_empty((B, keep, C)),
        scores.new_empty((B, keep), dtype=torch.int64),
        scores.new_empty((B,), dtype=_reference.accumulation_dtype(scores.dtype)),
        scores.new_empty((B, P), dtype=torch.int32),
    )


@torch.library.custom_op(custom_op_name("integrity_mask", "bwd"), mutates_args=())
def _triton_backward(grad_kept: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    return _kernels.integrity_mask_bwd(grad_kept, slot)


@_triton_backward.register_fake
def _(grad_kept, slot):
    return grad_kept.new_empty((slot.shape[0], slot.shape[1], grad_kept.shape[-1]))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[3])


def _backward(ctx, grad_kept, grad_index, grad_integrity, grad_slot):
    (slot,) = ctx.saved_tensors
    grad_tokens = _triton_backward(grad_kept, slot) if ctx.needs_input_grad[0] else None
    return grad_tokens, None, None, None, None, None


_triton_forward.register_autograd(_backward, setup_context=_setup_context)


def _triton_impl(tokens, scores, keep, temperature, seed, generator) -> MaskResult:
    seed_tensor = None
    if seed is None:
        # Drawn on the device from the generator (or the device's default one): no host sync.
        seed_tensor = torch.randint(0, SEED_LIMIT - 1, (1,), device=tokens.device, generator=generator)
    kept, index, integrity, _ = _triton_forward(
        tokens, scores, keep, temperature, 0 if seed is None else seed, seed_tensor
    )
    return MaskResult(kept, index, integrity.detach())


def triton_limits(inputs) -> list:
    return _kernels.limits(inputs["B"], inputs["P"])


IMPL = triton_impl(_triton_impl, _kernels, _IMPORT_ERROR, _checks.FLOAT_DTYPES, triton_limits)
