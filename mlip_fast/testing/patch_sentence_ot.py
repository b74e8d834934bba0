"""Input cases and measuring helpers for the optimal-transport scores op (its tests and the GPU check)."""
from __future__ import annotations

import torch

from mlip_fast.testing.patch_sentence import rel_err

__all__ = ["make_case", "run", "rel_err", "live_pairs"]


def make_case(B, G, K, S, D, *, masked, seed, dtype=torch.float32, negative=False):
    """L2-normalised patches [B, K, D] and sentences [G, S, D] (rounded to ``dtype``) and ragged masks (or None).

    With ``masked``: random padding, every row keeps a valid entry except report 1 (all padded, next to a full
    report 2) and image 1 (all padded) when there are more than two of them. ``negative``: every similarity < 0.
    """
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    s = torch.randn(G, S, D, generator=gen, dtype=torch.float64)
    if negative:
        p, s = p.abs() + 0.1, -(s.abs() + 0.1)
    p = torch.nn.functional.normalize(p, dim=-1)
    s = torch.nn.functional.normalize(s, dim=-1)
    smask = pmask = None
    if masked:
        smask = torch.rand(G, S, generator=gen) > 0.35
        smask[:, 0] |= ~smask.any(1)
        pmask = torch.rand(B, K, generator=gen) > 0.25
        pmask[:, 0] |= ~pmask.any(1)
        if G > 2:
            smask[1] = False
            smask[2] = True
        if B > 2:
            pmask[1] = False
    return p.to(dtype), s.to(dtype), smask, pmask


def run(fn, p, s, smask, pmask, grad):
    """(scores, d patches, d sentences) of ``fn(p, s, smask, pmask)`` for the upstream gradient ``grad`` [B, G]."""
    p = p.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    out = fn(p, s, smask, pmask)
    dp, ds = torch.autograd.grad((out.double() * grad).sum(), (p, s))
    return out, dp, ds


def live_pairs(B, G, smask, pmask):
    """[B, G] bool: pairs with a valid patch and a valid sentence."""
    has_p = torch.ones(B, dtype=torch.bool) if pmask is None else pmask.any(1)
    has_s = torch.ones(G, dtype=torch.bool) if smask is None else smask.any(1)
    return has_p[:, None] & has_s[None, :]
