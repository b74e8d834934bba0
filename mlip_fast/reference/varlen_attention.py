"""Readable PyTorch version of the variable-length self-attention with dropout (``mlip_fast.ops.varlen_attention``):
one (row, head) at a time, the dropout mask rebuilt from its definition with numpy's wrapping uint64 arithmetic.

Mask (the definition ``kernels/varlen_attention/attention_cpu.c`` implements): for query token n (packed index),
head h and key j of its row, the word w = SplitMix64-mix(seed + (((n H + h) << 30) + (j >> 2) + 1) * GAMMA) mod
2^64 gives the 16-bit piece u = (w >> (16 (j & 3))) & 0xFFFF; the element is kept when u >= k = round(p 65536),
and kept elements are scaled by 65536 / (65536 - k).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["drop_threshold", "keep_scale", "keep_mask", "varlen_attention", "flat_keep"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def drop_threshold(p: float) -> int:
    """k = round(p 65536): an element is dropped when its 16-bit piece is below k (P(drop) = k / 65536)."""
    return round(float(p) * 65536)


def keep_scale(p: float) -> float:
    """The kept elements' scale 65536 / (65536 - k), k = :func:`drop_threshold` (p): E[mask * scale] = 1."""
    return 65536.0 / (65536 - drop_threshold(p))


def _mix64(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def keep_mask(seed: int, first_token: int, length: int, heads: int, p: float) -> torch.Tensor:
    """bool [H, L, L]: keep[h, i, j] for the row whose tokens are packed from index ``first_token``, ``length`` L."""
    k = drop_threshold(p)
    n = np.arange(first_token, first_token + length, dtype=np.uint64)[None, :, None]
    h = np.arange(heads, dtype=np.uint64)[:, None, None]
    j = np.arange(length, dtype=np.uint64)[None, None, :]
    with np.errstate(over="ignore"):
        counter = ((n * np.uint64(heads) + h) << np.uint64(30)) + (j >> np.uint64(2)) + np.uint64(1)
        words = _mix64(np.uint64(seed % (1 << 64)) + counter * _GAMMA)
    u = (words >> (np.uint64(16) * (j & np.uint64(3)))) & np.uint64(0xFFFF)
    return torch.from_numpy(u >= k)


def varlen_attention(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, p: float = 0.0,
                     seed: int = 0) -> torch.Tensor:
    """qkv [N, 3C] (q, k, v side by side, head h in columns [h C / H, (h + 1) C / H) of each), offsets [B + 1]
    int64 -> out [N, C]: per row b (tokens offsets[b]:offsets[b+1]) and head, softmax(q k^T * scale) with the
    dropout of :func:`keep_mask` (kept elements scaled by 1 / (1 - p')), times v. In ``qkv``'s dtype."""
    n, c3 = qkv.shape
    c = c3 // 3
    dh = c // heads
    scale_keep = keep_scale(p)
    out = qkv.new_zeros(n, c)
    for b in range(offsets.numel() - 1):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        if hi == lo:
            continue
        rows = qkv[lo:hi].view(hi - lo, 3, heads, dh).permute(1, 2, 0, 3)  # [3, H, L, dh]
        q, k, v = rows[0], rows[1], rows[2]
        probs = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1)
        if p > 0:
            probs = probs * keep_mask(seed, lo, hi - lo, heads, p).to(probs.dtype) * scale_keep
        out[lo:hi] = (probs @ v).transpose(0, 1).reshape(hi - lo, c)
    return out


def flat_keep(seed: int, numel: int, p: float) -> torch.Tensor:
    """bool [numel]: the flat dropout mask of ``mlip_fast.ops.hash_dropout`` (element e: the 16-bit piece (e & 3)
    of the word at counter (e >> 2) + 1, kept when >= round(p 65536))."""
    e = np.arange(numel, dtype=np.uint64)
    with np.errstate(over="ignore"):
        words = _mix64(np.uint64(seed % (1 << 64)) + ((e >> np.uint64(2)) + np.uint64(1)) * _GAMMA)
    u = (words >> (np.uint64(16) * (e & np.uint64(3)))) & np.uint64(0xFFFF)
    return torch.from_numpy(u >= drop_threshold(p))
