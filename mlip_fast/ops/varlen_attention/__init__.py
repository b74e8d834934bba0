"""Variable-length multi-head self-attention with dropout on the attention probabilities, for packed tokens: the
report tower's attention in training on CPU (``mlip_fast.models.text``).

``varlen_attention(qkv, offsets, heads, scale, p, seed)`` -> out [N, C]: the N tokens of B rows packed row after
row (row b: tokens offsets[b]:offsets[b+1]), qkv [N, 3C] the fused q / k / v projection; per row and head
softmax(q k^T * scale), dropout p with the counter-based mask of ``seed`` (``mlip_fast.reference.varlen_attention``
defines it), times v. No padding is formed anywhere.

Backends: the C kernel (``kernels/varlen_attention``, fp32 on CPU) as custom ops ``mlip_fast::varlen_attention_fwd``
/ ``_bwd`` with fake impls and a registered autograd formula (the backward recomputes the probabilities from the
saved log-sum-exp and the mask from the seed); else the reference (one row and head at a time, the same mask),
differentiable through autograd. :func:`kernel_runs` says which a call takes; ``status()`` is for run records.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast.kernels.varlen_attention import cpu as cpu_kernel
from mlip_fast.reference.varlen_attention import drop_threshold
from mlip_fast.reference.varlen_attention import varlen_attention as reference_attention

__all__ = ["varlen_attention", "draw_seed", "kernel_runs", "status", "checked_threshold"]

status = cpu_kernel.status


@torch.library.custom_op("mlip_fast::varlen_attention_fwd", mutates_args=())
def attention_fwd(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, p: float, seed: int
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out [N, C], lse [N, H]) from the C kernel."""
    return cpu_kernel.forward(qkv.contiguous(), offsets.contiguous(), heads, scale, drop_threshold(p), seed)


@attention_fwd.register_fake
def _(qkv, offsets, heads, scale, p, seed):
    n, c3 = qkv.shape
    return qkv.new_empty(n, c3 // 3), qkv.new_empty(n, heads)


@torch.library.custom_op("mlip_fast::varlen_attention_bwd", mutates_args=())
def attention_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, offsets: torch.Tensor, heads: int,
                  scale: float, p: float, seed: int) -> torch.Tensor:
    """grad w.r.t. qkv [N, 3C] from the C kernel."""
    return cpu_kernel.backward(grad_out.contiguous(), qkv.contiguous(), lse, offsets.contiguous(), heads, scale,
                               drop_threshold(p), seed)


@attention_bwd.register_fake
def _(grad_out, qkv, lse, offsets, heads, scale, p, seed):
    return torch.empty_like(qkv)


def _setup_context(ctx, inputs, output):
    qkv, offsets, heads, scale, p, seed = inputs
    ctx.save_for_backward(qkv, offsets, output[1])
    ctx.heads, ctx.scale, ctx.p, ctx.seed = heads, scale, p, seed
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse):
    qkv, offsets, lse = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 6
    return attention_bwd(grad_out, qkv, lse, offsets, ctx.heads, ctx.scale, ctx.p, ctx.seed), None, None, None, \
        None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def kernel_runs(qkv: torch.Tensor) -> bool:
    """Whether :func:`varlen_attention` runs the C kernel on ``qkv`` (fp32 on CPU, kernel built)."""
    return cpu_kernel.runs(qkv)


def checked_threshold(p: float) -> int:
    """:func:`~mlip_fast.reference.varlen_attention.drop_threshold` of ``p``, refusing p outside [0, 1) or rounding
    to 1 at the masks' 16-bit resolution (the one check of both CPU dropout ops)."""
    k = drop_threshold(p)
    if not 0.0 <= p < 1.0 or k >= 65536:
        raise ValueError(f"dropout p must be in [0, 1) (at 16-bit resolution), got {p}")
    return k


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """One mask seed from ``generator`` (default: the global CPU generator): a seed's run draws the same masks."""
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator))


def varlen_attention(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, p: float = 0.0,
                     seed: int = 0) -> torch.Tensor:
    """Packed self-attention with dropout (module docstring).

    Args:
        qkv: [N, 3C] float; offsets: [B + 1] int64, non-decreasing from 0 to N; heads: H dividing C.
        scale: multiplies q k^T; p: dropout probability in [0, 1) on the probabilities (resolution 2^-16);
        seed: the mask's seed (:func:`draw_seed`); the same seed gives the same mask.
    Returns:
        out [N, C] in ``qkv``'s dtype.
    """
    if qkv.ndim != 2 or qkv.shape[1] % 3 or (qkv.shape[1] // 3) % heads:
        raise ValueError(f"qkv must be [N, 3C] with C divisible by heads={heads}, got {tuple(qkv.shape)}")
    if offsets.ndim != 1 or offsets.dtype != torch.int64 or offsets.numel() < 1:
        raise ValueError(f"offsets must be int64 [B + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != qkv.shape[0] or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"offsets must rise from 0 to N={qkv.shape[0]}, got {offsets.tolist()[:8]}...")
    checked_threshold(p)
    if kernel_runs(qkv):
        return attention_fwd(qkv, offsets, heads, float(scale), float(p), int(seed))[0]
    return reference_attention(qkv, offsets, heads, scale, p, seed)
