"""Independent fp64 references and input cases for the patch-sentence scores op: what its tests, the GPU check
and the benchmarks compare every impl with.

Fused patch-sentence impls (triton under the interpreter on CPU, chunked) against a float64 grid.

The reference here is written independently of ``mlip_fast.reference``: an explicit einsum grid in
float64 with masked max / mean, differentiated by autograd. Tolerances:
- fp32 inputs: 1e-5 of the output's scale (fp32 rounding over D <= 150 terms is ~1e-6 relative).
- fp16 / bf16 inputs: at most 2x the error of PyTorch's own same-dtype grid computation (flash-attention's
  rule), plus 1e-6 of scale for baselines that happen to be exact.
Half-precision cases use inputs whose top-2 similarities are separated by more than half-precision rounding,
(0.006 of the similarity scale, 3x bf16 rounding), so every implementation picks the same argmax and
gradients are comparable.

The reference here is written independently of ``mlip_fast.reference``: an explicit einsum grid with masked max /
mean, differentiated by autograd.
"""
from __future__ import annotations

import torch

__all__ = ["NEG_INF", "grid_scores", "run", "rel_err", "make_case", "gaps_ok", "CASES", "POISON", "POISON_SHAPE",
           "poison_case"]

NEG_INF = float("-inf")


def grid_scores(p, s, smask, pmask, directions="both", out_dtype=None):
    """Scores through the full [B, G, K, S] grid computed in the inputs' dtype (float64 for the reference,
    half for PyTorch's own same-dtype baseline), reduced in ``out_dtype``."""
    B, K, _ = p.shape
    G, S, _ = s.shape
    out_dtype = out_dtype or torch.promote_types(p.dtype, torch.float32)
    smask = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
    pmask = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
    sim = torch.einsum("bkd,gsd->bgks", p, s).to(out_dtype)
    pair = pmask.any(1)[:, None] & smask.any(1)[None, :]  # [B, G]: both sides non-empty
    i2t = t2i = None
    if directions in ("both", "i2t"):
        best = sim.masked_fill(~smask[None, :, None, :], NEG_INF).amax(-1)  # [B, G, K]
        keep = pmask[:, None, :] & pair[:, :, None]
        i2t = torch.where(keep, best, 0).sum(-1) / pmask.sum(1).clamp(min=1)[:, None]
    if directions in ("both", "t2i"):
        best = sim.masked_fill(~pmask[:, None, :, None], NEG_INF).amax(-2)  # [B, G, S]
        keep = smask[None] & pair[:, :, None]
        t2i = torch.where(keep, best, 0).sum(-1) / smask.sum(1).clamp(min=1)[None, :]
    return i2t, t2i


def run(fn, p, s, smask, pmask, directions, gi, gt):
    """Scores and input gradients for upstream gradients (gi, gt)."""
    p = p.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    i2t, t2i = fn(p, s, smask, pmask, directions)
    outs = [o for o in (i2t, t2i) if o is not None]
    loss = sum((o.double() * g).sum() for o, g in zip((i2t, t2i), (gi, gt)) if o is not None)
    dp, ds = torch.autograd.grad(loss, (p, s))
    return outs, dp, ds


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def make_case(B, G, K, S, D, *, masked, seed, dtype=torch.float32, negative=False, min_gap=0.0):
    """Inputs (rounded to ``dtype``) and masks; with ``min_gap`` > 0, redraws until every max of the grid
    (both directions) beats the runner-up by ``min_gap`` times the similarity scale."""
    for attempt in range(200):
        gen = torch.Generator().manual_seed(seed * 1000 + attempt)
        p = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
        s = torch.randn(G, S, D, generator=gen, dtype=torch.float64)
        if negative:  # every similarity negative
            p, s = p.abs() + 0.1, -(s.abs() + 0.1)
        smask = pmask = None
        if masked:
            smask = torch.rand(G, S, generator=gen) > 0.35
            smask[:, 0] |= ~smask.any(1)
            if G > 2:
                smask[1] = False  # a fully padded report between ...
                smask[2] = True  # ... a full one
            pmask = torch.rand(B, K, generator=gen) > 0.25
            pmask[:, 0] |= ~pmask.any(1)
            s = s.masked_fill(~smask[..., None], 0.0)  # padded sentences at similarity 0 must still lose
        p, s = p.to(dtype), s.to(dtype)
        if min_gap == 0.0 or gaps_ok(p, s, smask, pmask, min_gap):
            return p, s, smask, pmask
    raise AssertionError("could not draw well-separated inputs")


def gaps_ok(p, s, smask, pmask, min_gap):
    sim = torch.einsum("bkd,gsd->bgks", p.double(), s.double())
    B, G, K, S = sim.shape
    sm = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
    pm = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
    scale = sim.abs().max()
    directions = (
        (sim, sm[None, :, None, :], pm[:, None, :]),  # i2t: per valid patch over sentences
        (sim.transpose(-1, -2), pm[:, None, None, :], sm[None, :, :]),  # t2i: per valid sentence over patches
    )
    for grid, inner, outer in directions:
        if grid.shape[-1] < 2:
            continue
        top2 = grid.masked_fill(~inner, NEG_INF).topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1])[outer.expand(top2.shape[:-1])]
        if (gap[torch.isfinite(gap)] < min_gap * scale).any():
            return False
    return True


CASES = [  # B, G, K, S, D, masked, negative
    (3, 5, 7, 3, 33, True, False),  # odd sizes, ragged reports, a fully padded report next to a full one
    (2, 3, 1, 1, 16, False, False),  # K = 1, S = 1
    (2, 4, 1, 5, 33, True, False),  # K = 1 with masks
    (4, 2, 70, 5, 20, True, False),  # K over one patch chunk: t2i running max across chunks, B != G
    (2, 3, 6, 17, 150, True, False),  # S not a power of two, D over one D chunk
    (3, 4, 9, 4, 24, True, True),  # all similarities negative, padding at 0 never wins
    (2, 3, 20, 70, 24, True, False),  # reports longer than one tile: several sentence chunks per report
]


# the shape and cases of the non-finite-value tests
POISON_SHAPE = (3, 4, 5, 6, 8)


def poison_case(kind):
    """(patches, sentences, masks) with one non-finite value placed as ``kind`` says."""
    B, G, K, S, D = POISON_SHAPE
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=5, dtype=torch.float64)
    valid_p = int(pmask[1].nonzero()[0])
    masked_p = int((~pmask).nonzero()[0, 1]) if (~pmask).any() else None
    b_masked = int((~pmask).nonzero()[0, 0]) if (~pmask).any() else None
    valid_q = int(smask[2].nonzero()[0])
    padded = (~smask).nonzero()
    if kind == "nan_valid_patch":
        p[1, valid_p, 3] = float("nan")
    elif kind == "nan_valid_sentence":
        s[2, valid_q, 0] = float("nan")
    elif kind == "inf_valid_patch":
        p[1, valid_p, 2] = float("inf")
    elif kind == "neg_inf_valid_sentence":
        s[2, valid_q, 1] = float("-inf")
    elif kind == "nan_padded_sentence":
        s[int(padded[0, 0]), int(padded[0, 1])] = float("nan")
    elif kind == "inf_masked_patch":
        p[b_masked, masked_p] = float("inf")
    return p, s, smask, pmask


POISON = ["nan_valid_patch", "nan_valid_sentence", "inf_valid_patch", "neg_inf_valid_sentence",
          "nan_padded_sentence", "inf_masked_patch"]
