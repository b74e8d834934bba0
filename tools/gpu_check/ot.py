"""GPU section for the optimal-transport patch-sentence scores op: correctness of the Triton impl on the device
against a float64 reference on the CPU, padding that holds NaN / Inf, and timings of the reference and Triton
impls (forward, forward + backward; kernel-only time and peak memory; the chunked CPU path is timed in the dry
run only) and of the local loss with OT against max matching at the same batch.

``section_patch_sentence_ot(ctx)`` is a section of the one-command GPU check (``tools/gpu_check``); with its dry run
(CPU, Triton interpreter) the shapes are tiny and the interpreter's timings mean nothing. Shapes: the issue's
B = G = 128, K = 98, S = 16, D = 256 (ratio targets on CPU in ``results/ot_cpu.json``), a wider G = 1024 with
K = 196, D = 512, and odd sizes for the correctness checks.
"""
from __future__ import annotations

import torch

from mlip_fast import _checks
from mlip_fast.losses import PatchSentenceLoss
from mlip_fast.ops import patch_sentence_ot_scores
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_scores
from mlip_fast.testing.patch_sentence_ot import make_case, rel_err

CHECKS = [(3, 5, 7, 3, 33), (4, 6, 98, 16, 256), (2, 3, 1, 1, 16), (3, 4, 70, 11, 40)]  # B, G, K, S, D
TIMED = [(128, 128, 98, 16, 256), (128, 1024, 196, 16, 512)]
DRY = [(2, 3, 7, 3, 16)]
N_ITER = 50


def _run(fn, p, s, smask, pmask, grad):
    p, s = p.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
    out = fn(p, s, smask, pmask)
    dp, ds = torch.autograd.grad((out.double() * grad).sum(), (p, s))
    return out, dp, ds


def _correctness(ctx) -> dict:
    """Triton on the device vs the fp64 reference on the CPU (scores, both gradients, random upstream gradient):
    fp32 within 2e-5 of scale, bf16 within 2x of the reference run on the same bf16 inputs (+1e-6); and the same
    outputs with NaN / Inf in every padded row (value checks off)."""
    n_iter = 5 if ctx.dry_run else N_ITER
    results, failures = [], []
    for B, G, K, S, D in (CHECKS[:1] if ctx.dry_run else CHECKS):
        for dtype in (torch.float32, torch.bfloat16):
            p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=K + S, dtype=dtype)
            grad = torch.randn(B, G, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            ref = _run(lambda *a: reference_scores(*(x.double() for x in a[:2]), *a[2:], n_iter=n_iter),
                       p, s, smask, pmask, grad)
            dev = [x.to(ctx.device) for x in (p, s, smask, pmask)]
            got = [x.cpu() for x in _run(lambda *a: patch_sentence_ot_scores(*a, n_iter=n_iter, impl="triton"),
                                         *dev, grad.to(ctx.device))]
            errs = [rel_err(x, r) for x, r in zip(got, ref)]
            if dtype == torch.float32:
                limits = [2e-5] * 3
            else:
                base = _run(lambda *a: reference_scores(*a, n_iter=n_iter), p, s, smask, pmask, grad)
                limits = [2 * rel_err(b, r) + 1e-6 for b, r in zip(base, ref)]
            dirty_p, dirty_s = dev[0].clone(), dev[1].clone()
            dirty_p[~dev[3]] = float("nan")
            dirty_s[~dev[2]] = float("inf")
            with _checks.value_checks_disabled():
                dirty = [x.cpu() for x in _run(lambda *a: patch_sentence_ot_scores(*a, n_iter=n_iter, impl="triton"),
                                               dirty_p, dirty_s, dev[2], dev[3], grad.to(ctx.device))]
            padding_ok = all(bool(torch.equal(x, y)) for x, y in zip(dirty, got))
            row = {"B": B, "G": G, "K": K, "S": S, "D": D, "dtype": str(dtype).replace("torch.", ""),
                   "rel_err": dict(zip(("scores", "d_patches", "d_sentences"), errs)),
                   "limit": dict(zip(("scores", "d_patches", "d_sentences"), limits)), "padding_never_matters": padding_ok}
            results.append(row)
            if not padding_ok or any(e > lim for e, lim in zip(errs, limits)):
                failures.append(row)
    return {"ok": not failures, "checks": len(results), "failures": failures, "results": results}


def _timings(ctx) -> list:
    """Milliseconds per call (median), kernel-only milliseconds and peak memory of each impl at the timed shapes."""
    n_iter = 5 if ctx.dry_run else N_ITER
    rows = []
    for B, G, K, S, D in (DRY if ctx.dry_run else TIMED):
        # bf16 first: the training path (a bf16 model hands the op bf16 embeddings), then fp32
        for dtype in ((torch.float32,) if ctx.dry_run else (torch.bfloat16, torch.float32)):
            p, s, smask, pmask = (x.to(ctx.device) for x in make_case(B, G, K, S, D, masked=True, seed=7, dtype=dtype))
            grad = torch.randn(B, G, device=ctx.device)
            for impl in ("reference", "chunked", "triton"):
                if ctx.device.type == "cuda" and impl == "reference" and B * G * K * S > 2**28:
                    rows.append({"impl": impl, "B": B, "G": G, "K": K, "S": S, "D": D, "skipped": "grid above 2^28 cells"})
                    continue
                if ctx.device.type == "cuda" and impl == "chunked":  # the CPU path, which impl="auto" never picks here
                    rows.append({"impl": impl, "B": B, "G": G, "K": K, "S": S, "D": D, "dtype": str(dtype).replace("torch.", ""),
                                 "skipped": "the CPU path (impl='auto' runs triton on CUDA); its timing took most of the "
                                            "section on the H100 (1.1 s per call, 2026-12-05) and cut the triton bf16 row"})
                    continue
                pg, sg = p.clone().requires_grad_(), s.clone().requires_grad_()

                def fwd(impl=impl):
                    with torch.no_grad(), _checks.value_checks_disabled():
                        return patch_sentence_ot_scores(p, s, smask, pmask, n_iter=n_iter, impl=impl)

                def full(impl=impl, pg=pg, sg=sg):
                    with _checks.value_checks_disabled():
                        out = patch_sentence_ot_scores(pg, sg, smask, pmask, n_iter=n_iter, impl=impl)
                    torch.autograd.grad(out, (pg, sg), grad)

                row = {"impl": impl, "B": B, "G": G, "K": K, "S": S, "D": D, "n_iter": n_iter,
                       "dtype": str(dtype).replace("torch.", "")}
                try:
                    row.update(fwd_ms=ctx.time_ms(fwd), full_ms=ctx.time_ms(full), full_kernel_ms=ctx.kernel_ms(full),
                               full_peak_bytes=ctx.peak_bytes(full))
                except Exception as err:  # an impl that cannot take the shape or dtype: recorded, the others run
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                rows.append(row)
                if ctx.out_of_time(10.0):
                    return rows
    return rows


def _loss_ratio(ctx) -> dict:
    """The local loss (forward + backward) with OT against max matching, the same bf16 batch, auto impl."""
    B, K, S, D = (4, 7, 3, 16) if ctx.dry_run else (128, 98, 16, 256)
    dtype = torch.float32 if ctx.device.type == "cpu" else torch.bfloat16
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    p = torch.randn(B, K, D, device=ctx.device, generator=gen).to(dtype).requires_grad_()
    s = torch.randn(B, S, D, device=ctx.device, generator=gen).to(dtype).requires_grad_()
    smask = torch.ones(B, S, dtype=torch.bool, device=ctx.device)
    smask[:, S // 2:] = torch.rand(B, S - S // 2, device=ctx.device, generator=gen) > 0.5
    out = {}
    for matching in ("max", "ot"):
        loss = PatchSentenceLoss(local_matching=matching, ot_iters=5 if ctx.dry_run else N_ITER).to(ctx.device)

        def step(loss=loss):
            with _checks.value_checks_disabled():
                loss(p, s, smask).backward()

        out[f"{matching}_ms"] = ctx.time_ms(step)
    out["ot_over_max"] = out["ot_ms"] / out["max_ms"]
    out.update(B=B, K=K, S=S, D=D, dtype=str(dtype).replace("torch.", ""))
    return out


def section_patch_sentence_ot(ctx) -> dict:
    """Correctness of the OT op's Triton impl on the device, then its timings and the OT / max loss ratio."""
    correctness = _correctness(ctx)
    return {"ok": correctness["ok"], "correctness": correctness, "rows": _timings(ctx), "loss": _loss_ratio(ctx)}
