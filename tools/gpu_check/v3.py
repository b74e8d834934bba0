"""GPU check, the persistent sm_90 forward (``kernels/patch_sentence/forward_v3.py``) against the kernel it replaces
(``forward.py``, "v2"), in one process on one card: what only a GPU can tell about v3.

- which forward the dispatch runs on this card for the training path, and why (``last_forward``);
- NaN / Inf as in the grid on the device (v3 relies on the GPU's fp32 arithmetic returning the canonical
  positive NaN; the interpreter tests canonicalise explicitly), for both kernels, bf16;
- exact ties to the lowest index on the device (integer inputs: exact products);
- v3 against v2 at PERF.md's shapes: the largest score difference relative to the scale (bounded by the packed
  keys' 2^(L - 23), L = log2(16) + log2(BN)), the share of argmax indices that differ (near-ties only), and the
  forward's call and kernel-only times of both kernels on the training path and raw (the peers section times
  both through the op too, beside the peers).
"""
from __future__ import annotations

import torch

from benchmarks.bench_patch_sentence import make_inputs
from mlip_fast import _checks
from mlip_fast.kernels.patch_sentence import last_forward, patch_sentence_fwd
from mlip_fast.testing.patch_sentence import POISON, grid_scores, poison_case

SHAPES = [(128, 128, 98, 16, 512), (128, 1024, 98, 16, 512), (128, 128, 196, 16, 512), (128, 1024, 196, 16, 512)]
DRY_SHAPES = [(4, 6, 5, 3, 32)]


def _non_finite(dev, kernels) -> list:
    rows = []
    for kind in POISON:
        p, s, smask, pmask = poison_case(kind)
        p, s = p.to(torch.bfloat16), s.to(torch.bfloat16)
        ref = grid_scores(p.double(), s.double(), smask, pmask)
        for kernel in kernels:
            out = patch_sentence_fwd(p.to(dev), s.to(dev), smask.to(dev), pmask.to(dev), kernel=kernel)[:2]
            same = all(torch.equal(f(o.cpu().double()), f(r)) for o, r in zip(out, ref)
                       for f in (torch.isnan, torch.isposinf, torch.isneginf))
            rows.append(dict(kind=kind, kernel=kernel, ran=last_forward()["kernel"], same_pattern_as_grid=same))
    return rows


def _ties(dev, kernels) -> list:
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(-3, 4, (4, 150, 64), generator=gen).float()
    s = torch.randint(-3, 4, (20, 16, 64), generator=gen).float()
    s[:, 9] = s[:, 2]
    p[:, 130] = p[:, 5]  # tied patches in different tiles
    p, s = p.to(torch.bfloat16), s.to(torch.bfloat16)
    sim = torch.einsum("bkd,gsd->bgks", p.double(), s.double())
    rows = []
    for kernel in kernels:
        _, _, a_i, a_t, _, _ = patch_sentence_fwd(p.to(dev), s.to(dev), None, None, kernel=kernel)
        rows.append(dict(kernel=kernel, i2t_first_index=bool(torch.equal(a_i.cpu().long(), sim.argmax(-1))),
                         t2i_first_index=bool(torch.equal(a_t.cpu().long(), sim.argmax(-2)))))
    return rows


def section_forward_v3(ctx) -> dict:
    """v3 against v2 on this card (see the module docstring)."""
    dev = ctx.device
    dtype = "float32" if ctx.dry_run else "bfloat16"
    kernels = ("v2",) if ctx.dry_run else ("v3", "v2")  # the interpreter plans for no GPU: v2 only
    checks_were = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False
    try:
        p, s, m, _, _ = make_inputs(*(DRY_SHAPES if ctx.dry_run else SHAPES)[0], dtype, str(dev), seed=0)
        patch_sentence_fwd(p.detach(), s.detach(), m, None, normalize=True)  # the training path's dispatch
        out = {"dispatch": last_forward(), "non_finite": _non_finite(dev, kernels), "ties": _ties(dev, kernels)}
        rows = []
        for B, G, K, S, D in DRY_SHAPES if ctx.dry_run else SHAPES:
            p, s, m, _, _ = make_inputs(B, G, K, S, D, dtype, str(dev), seed=1)
            p, s = p.detach(), s.detach()
            for normalize in (True, False):
                res = {k: patch_sentence_fwd(p, s, m, None, normalize=normalize, kernel=k) for k in kernels}
                row = dict(B=B, G=G, K=K, S=S, D=D, normalize=normalize)
                if len(kernels) == 2:
                    new, old = res["v3"], res["v2"]
                    scale = max(float(old[0].abs().max()), float(old[1].abs().max()), 1e-12)
                    row["max_score_diff_over_scale"] = max(float((a - b).abs().max()) for a, b in zip(new[:2], old[:2])) / scale
                    row["argmax_differ_share"] = [float((a != b).float().mean()) for a, b in zip(new[2:4], old[2:4])]
                for k in kernels:
                    if ctx.out_of_time():
                        row[f"{k}_skipped"] = "time budget spent"
                        continue
                    fn = lambda k=k: patch_sentence_fwd(p, s, m, None, normalize=normalize, kernel=k)  # noqa: E731
                    row[f"{k}_fwd_ms"], row[f"{k}_fwd_kernel_ms"] = ctx.time_ms(fn), ctx.kernel_ms(fn)
                rows.append(row)
            del p, s, m
        out["v3_vs_v2"] = rows
    finally:
        _checks.VALUE_CHECKS = checks_were
    return out
