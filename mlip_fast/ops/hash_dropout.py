"""Dropout whose CPU mask is a counter-based hash of (seed, element): ``hash_dropout(x, p, seed)`` = x * keep /
(1 - p') with keep[e] from the 16-bit piece (e & 3) of SplitMix64's output at counter (e >> 2) + 1 (kept when it is
>= k = round(p 65536), so P(drop) = p' = k / 65536 and the expectation is x exactly). One pass over x in C
(``mlip_dropout`` in ``kernels/varlen_attention/attention_cpu.c``), no mask stored: the backward is the same call on
the gradient. A custom op ``mlip_fast::hash_dropout`` with a fake impl and its autograd formula; where the kernel is
not built (or not fp32 on CPU) the mask is rebuilt in numpy by ``mlip_fast.reference.varlen_attention.flat_keep``.
"""
from __future__ import annotations

import torch

from mlip_fast.kernels.varlen_attention import cpu as cpu_kernel
from mlip_fast.ops.varlen_attention import checked_threshold
from mlip_fast.reference.varlen_attention import drop_threshold, flat_keep, keep_scale

__all__ = ["hash_dropout", "kernel_runs"]


@torch.library.custom_op("mlip_fast::hash_dropout", mutates_args=())
def _hash_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return cpu_kernel.dropout(x, drop_threshold(p), seed)


@_hash_dropout.register_fake
def _(x, p, seed):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.p, ctx.seed = inputs[1], inputs[2]


def _backward(ctx, grad):
    return _hash_dropout(grad, ctx.p, ctx.seed), None, None


_hash_dropout.register_autograd(_backward, setup_context=_setup_context)


def kernel_runs(x: torch.Tensor) -> bool:
    """Whether :func:`hash_dropout` runs the C kernel on ``x`` (fp32 on CPU, kernel built)."""
    return cpu_kernel.runs(x)


def hash_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p') with the mask of ``seed`` (module docstring); p in [0, 1) at 16-bit resolution."""
    if checked_threshold(p) == 0:
        return x
    if kernel_runs(x):
        return _hash_dropout(x, float(p), int(seed))
    keep = flat_keep(seed, x.numel(), p).to(x.device).view(x.shape)
    return x * keep.to(x.dtype) * keep_scale(p)
