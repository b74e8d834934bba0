"""Integrity-scored masking in plain vectorised PyTorch: the specification of the op.

Per image b, keep K of the P patch tokens by Gumbel-top-k sampling over the integrity logits:

    key[b, p]   = scores[b, p] / temperature + g[b, p],    g ~ Gumbel(0, 1) i.i.d.
    index[b]    = the K positions with the largest keys, sorted ascending
    kept[b, k]  = tokens[b, index[b, k]]
    integrity_b = sum_k softmax_p(scores[b])[index[b, k]]            (in (0, 1])

Taking the top K of Gumbel-perturbed logits draws K positions without replacement with Plackett-Luce
probabilities (Kool et al., "Stochastic Beams and Where to Find Them", 2019): the first kept position is
p with probability softmax(scores / temperature)[p], the next one among the rest likewise, and so on.
temperature -> infinity makes every K-subset equally likely (FLIP's uniform random masking);
temperature -> 0 keeps the top K scores.

Gradients flow to ``tokens`` only (the gather's backward: a scatter into zeros); ``index`` and
``integrity`` carry none.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

# Smallest uniform draw used for the Gumbel transform: keeps -log(-log(u)) finite when u == 0.
_U_MIN = 1e-20


class MaskResult(NamedTuple):
    """Output of integrity-scored masking.

    kept: [B, K, C] kept tokens, in ascending patch order, dtype of ``tokens``.
    index: [B, K] int64 kept patch positions, strictly ascending per row.
    integrity: [B] kept softmax mass of the scores, float32 (float64 for float64 scores), no gradient.
    """

    kept: torch.Tensor
    index: torch.Tensor
    integrity: torch.Tensor


def accumulation_dtype(scores_dtype: torch.dtype) -> torch.dtype:
    """Dtype of the keys and of ``integrity``: float32, or float64 for float64 scores."""
    return torch.float64 if scores_dtype == torch.float64 else torch.float32


def gumbel_noise(shape, *, device: torch.device, dtype: torch.dtype, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise ``-log(-log(u))`` with u ~ U[0, 1) drawn from ``generator``."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return -torch.log(-torch.log(u.clamp_min(_U_MIN)))


def integrity_of(scores: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """[B] sum over the kept positions ``index`` [B, K] of softmax_p(scores [B, P]), without gradient."""
    probs = torch.softmax(scores.detach().to(accumulation_dtype(scores.dtype)), dim=-1)
    return probs.gather(1, index).sum(dim=1)


def integrity_mask(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    temperature: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> MaskResult:
    """Gumbel-top-k masking of ``tokens`` [B, P, C] by ``scores`` [B, P] keeping ``keep`` = K positions.

    Inputs are assumed valid (the public op ``mlip_fast.ops.integrity_mask`` checks them). The noise comes
    from ``generator``, or from a fresh generator seeded with ``seed`` on the scores' device, or from
    torch's default generator when both are None; the same seed gives the same mask on the same device.
    Ties between equal keys (only possible when scores / temperature exceed float resolution) are broken
    by ``torch.topk``, deterministically.

    Returns:
        MaskResult(kept [B, K, C], index [B, K] int64 ascending, integrity [B]).
    """
    if seed is not None:
        generator = torch.Generator(device=scores.device).manual_seed(seed)
    acc = accumulation_dtype(scores.dtype)
    keys = scores.detach().to(acc) / temperature
    keys = keys + gumbel_noise(keys.shape, device=keys.device, dtype=acc, generator=generator)
    index = keys.topk(keep, dim=1, sorted=False).indices.sort(dim=1).values
    kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return MaskResult(kept, index, integrity_of(scores, index))
