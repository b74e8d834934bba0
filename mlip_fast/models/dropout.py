"""Dropout whose CPU mask costs half of ``F.dropout``'s, for the report tower's training forward.

Why: on CPU, ``F.dropout`` / ``Tensor.bernoulli_`` draw one Mersenne-Twister number per element, about 10 ns each
on the 2-core machine of the default run; the report tower's attention-probability dropout ([B, H, T, T], about
3.5 M elements per layer at batch 64) and its hidden-state dropouts were about 70 ms of a 450 ms training step
(profiled, ``--profile-steps``), and the SDPA fallback that attention dropout forces on CPU adds a fully-masked-row
check over the same [B, H, T, T] (``isneginf`` + ``all``) on top.

Derivation of the mask. ``Tensor.random_()`` on int64 draws one 64-bit Mersenne-Twister number per element and
keeps it modulo 2^63, so bits 0..47 of each draw are independent fair bits. Each draw gives three 16-bit words,
one per element, independent and uniform; read as int16 each is a v uniform over {-32768, ..., 32767}. With
k = round(p * 65536), an element is dropped when v < k - 32768: P(drop) = k / 65536 =: p', within 2^-17 of p.
Kept elements are scaled by 1 / (1 - p'), so E[out] = (1 - p') * x / (1 - p') = x exactly, as for ``F.dropout``.
(The fourth word holds bit 63, always 0, and is not used.) One draw per three elements
instead of one per element, and no float conversion of the draws, is the saving: ``benchmarks/bench_text_tower.py``
(results/text_tower_cpu.json) measured a mask on [64, 4, 110, 110] at 12.9 ms against ``F.dropout``'s 26.1 ms and
on [3500, 128] at 1.9 against 3.6 ms (2 threads, the default run's machine).

Edge cases: ``p`` such that k == 0 is no dropout (p < 2^-17); k == 65536 drops everything (output x * 0, as
``F.dropout(p=1)``). On CUDA (Philox, fused) and outside training the calls are ``F.dropout``'s own semantics.
The stream comes from the default CPU generator, so ``torch.manual_seed`` makes runs bitwise repeatable.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

__all__ = ["keep_mask", "dropout", "effective_probability"]

_WORD = 1 << 16
# the three low 16-bit words of each int64 draw, in memory order (bit 63 is always 0 after random_()'s modulo)
_LOW_WORDS = slice(0, 3) if sys.byteorder == "little" else slice(1, 4)


def effective_probability(p: float) -> float:
    """The drop probability :func:`keep_mask` realises for ``p``: round(p * 65536) / 65536."""
    return round(float(p) * _WORD) / _WORD


def keep_mask(shape, p: float, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None
              ) -> torch.Tensor:
    """A CPU tensor of ``shape`` holding 1 / (1 - p') where the element is kept and 0 where it is dropped,
    P(drop) = p' = :func:`effective_probability` (p), elements independent (module docstring).

    Args:
        shape: the output shape.
        p: drop probability in [0, 1).
        dtype: floating dtype of the mask.
        generator: a CPU generator (default: the global one).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"keep_mask: p must be in [0, 1), got {p}")
    threshold = round(float(p) * _WORD)
    if threshold >= _WORD:
        raise ValueError(f"keep_mask: p = {p} rounds to 1 at 16-bit resolution")
    shape = torch.Size(shape)
    n = shape.numel()
    draws = torch.empty((n + 2) // 3, dtype=torch.int64).random_(generator=generator)
    # compare all four words (one contiguous pass), then keep the three fair ones: [draws, 3] -> [n]
    keep = (draws.view(torch.int16).view(-1, 4) >= threshold - _WORD // 2)[:, _LOW_WORDS].reshape(-1)[:n]
    scale = torch.tensor(1.0 / (1.0 - threshold / _WORD), dtype=dtype)
    return torch.where(keep.view(shape), scale, torch.zeros((), dtype=dtype))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with :func:`keep_mask` on CPU (module docstring); differentiable in ``x``
    (the gradient is the upstream gradient times the same mask)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point():
        return F.dropout(x, p, training=True)
    threshold = round(float(p) * _WORD)
    if threshold >= _WORD:
        return x * 0.0
    if threshold == 0:
        return x
    return x * keep_mask(x.shape, p, dtype=x.dtype)
