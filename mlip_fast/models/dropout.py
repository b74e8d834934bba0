"""Dropout whose CPU mask costs a third of ``F.dropout``'s, for the report tower's training forward.

Why: on CPU, ``F.dropout`` / ``Tensor.bernoulli_`` draw one Mersenne-Twister number per element, about 10 ns each
on the 2-core machine of the default run; the report tower's attention-probability dropout ([B, H, T, T], about
3.5 M elements per layer at batch 64) and its hidden-state dropouts were about 70 ms of a 450 ms training step
(profiled, ``--profile-steps``), and the SDPA fallback that attention dropout forces on CPU adds a fully-masked-row
check over the same [B, H, T, T] (``isneginf`` + ``all``) on top.

Derivation of the mask. ``Tensor.random_(-2**63, None)`` on int64 draws one 64-bit Mersenne-Twister number per
element over the whole int64 range (``random_()`` without bounds keeps it modulo 2^63, losing bit 63), so the 64
bits of each draw are independent fair bits. Each draw gives four 16-bit words, one per element, independent and
uniform; read as int16 each is a v uniform over {-32768, ..., 32767}. With k = round(p * 65536), an element is
kept when v >= k - 32768: P(drop) = k / 65536 =: p', within 2^-17 of p. Kept elements are scaled by
s = 1 / (1 - p'), so E[out] = (1 - p') * x * s = x exactly, as for ``F.dropout``. One draw per four elements
instead of one per element and no float conversion of the draws are the saving; for attention probabilities
(:func:`dropout_matmul`) the bool mask multiplies them (converted on the fly) and the scale goes onto the product,
which is 3-4 times smaller than [.., T, T]. ``benchmarks/bench_text_tower.py`` (results/text_tower_cpu.json)
measures it against ``F.dropout``.

Edge cases: ``p`` such that k == 0 is no dropout (p < 2^-17); k == 65536 drops everything (output x * 0, as
``F.dropout(p=1)``). On CUDA (Philox, fused) and outside training the calls are ``F.dropout``'s own semantics.
The stream comes from the default CPU generator, so ``torch.manual_seed`` makes runs bitwise repeatable.

API::

    keep_bits(shape, p, generator=None) -> (keep bool [shape], scale float)
    keep_mask(shape, p, dtype=float32, generator=None) -> keep * scale as ``dtype``
    dropout(x, p, training=True) -> F.dropout(x, p, training) with the mask above on CPU
    dropout_matmul(a, b, p, training=True) -> F.dropout(a, p, training) @ b: attention probabilities times values
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["keep_bits", "keep_mask", "dropout", "dropout_matmul", "effective_probability"]

_WORD = 1 << 16
_INT64_MIN = -(1 << 63)


def effective_probability(p: float) -> float:
    """The drop probability :func:`keep_bits` realises for ``p``: round(p * 65536) / 65536."""
    return round(float(p) * _WORD) / _WORD


def keep_bits(shape, p: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, float]:
    """(keep, scale): a CPU bool tensor of ``shape``, True where the element is kept, P(drop) = p' =
    :func:`effective_probability` (p), elements independent (module docstring); scale = 1 / (1 - p').

    Args:
        shape: the mask's shape.
        p: drop probability in [0, 1).
        generator: a CPU generator (default: the global one).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"keep_mask: p must be in [0, 1), got {p}")
    threshold = round(float(p) * _WORD)
    if threshold >= _WORD:
        raise ValueError(f"keep_mask: p = {p} rounds to 1 at 16-bit resolution")
    shape = torch.Size(shape)
    n = shape.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64).random_(_INT64_MIN, None, generator=generator)
    keep = draws.view(torch.int16)[:n] >= threshold - _WORD // 2
    return keep.view(shape), 1.0 / (1.0 - threshold / _WORD)


def keep_mask(shape, p: float, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """A CPU tensor of ``shape`` holding 1 / (1 - p') where :func:`keep_bits` keeps the element and 0 where it
    drops it (the same draws)."""
    keep, scale = keep_bits(shape, p, generator)
    return torch.where(keep, torch.tensor(scale, dtype=dtype), torch.zeros((), dtype=dtype))


def _cpu_threshold(x: torch.Tensor, p: float, training: bool):
    """None when ``F.dropout``'s own path applies (not training, p == 0, not a CPU float tensor), else the 16-bit
    threshold k of ``p`` (module docstring)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0 or x.device.type != "cpu" or not x.is_floating_point():
        return None
    return round(float(p) * _WORD)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with :func:`keep_mask` on CPU (module docstring); differentiable in ``x``
    (the gradient is the upstream gradient times the same mask)."""
    threshold = _cpu_threshold(x, p, training)
    if threshold is None:
        return F.dropout(x, p, training=True) if training and p > 0.0 else x
    if threshold >= _WORD:
        return x * 0.0
    if threshold == 0:
        return x
    return x * keep_mask(x.shape, p, dtype=x.dtype)


def dropout_matmul(a: torch.Tensor, b: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(a, p, training) @ b`` (attention probabilities times values): on CPU with the mask of
    :func:`keep_bits`, its scale applied to the product (``(a * keep) @ b * scale``, the smaller tensor when ``a``
    is [.., T, T] and ``b`` [.., T, C / H])."""
    threshold = _cpu_threshold(a, p, training)
    if threshold is None or threshold >= _WORD:
        return torch.matmul(dropout(a, p, training), b)
    if threshold == 0:
        return torch.matmul(a, b)
    keep, scale = keep_bits(a.shape, p)
    return torch.matmul(a * keep, b).mul_(scale)
