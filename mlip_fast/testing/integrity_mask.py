"""Exact distributions for testing integrity-scored masking: Plackett-Luce inclusion and subset probabilities
by enumeration, and the z-score of observed inclusion counts against them."""
from __future__ import annotations

import itertools

import torch

__all__ = ["plackett_luce", "max_abs_z"]


def plackett_luce(probs, keep):
    """Exact inclusion probability per position and probability per kept subset, by enumeration."""
    probs = [float(p) for p in probs]
    inclusion = [0.0] * len(probs)
    subsets = {}
    for order in itertools.permutations(range(len(probs)), keep):
        pr, left = 1.0, 1.0
        for p in order:
            pr *= probs[p] / left
            left -= probs[p]
        for p in order:
            inclusion[p] += pr
        key = tuple(sorted(order))
        subsets[key] = subsets.get(key, 0.0) + pr
    return torch.tensor(inclusion, dtype=torch.float64), subsets


def max_abs_z(index, P, expected):
    """Largest binomial z-score of the per-position inclusion counts against ``expected`` [P]."""
    n = index.shape[0]
    counts = torch.zeros(P, dtype=torch.float64).index_add_(0, index.flatten(), torch.ones(index.numel(), dtype=torch.float64))
    sd = torch.sqrt(n * expected * (1 - expected))
    return ((counts - n * expected) / sd).abs().max().item()
