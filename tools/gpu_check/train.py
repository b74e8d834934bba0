"""GPU check, the op inside training: the patch-sentence loss alone, the op's share of one MLIP training step,
and the largest batch per GPU.

- :func:`section_loss_local`: the loss (local mode, one process) forward + backward at B=128, K=98 / 196,
  S=16, D=512, bf16: one both-directions call per loss against two one-direction calls (what training did
  before) and the reference impl.
- :func:`section_train_step`: one step of ViT-B/16 + BERT-base under bf16 autocast (``bench_train_step``'s
  GPU case: batch 64, 224 px) for the reference and Triton impls. One step runs with the op's entry point
  (``functional.scores_unchecked``) observed, which gives the shapes, dtype and options training hands the op.
  G = 1024 gathered reports is emulated in one process: the step's measured time, less the op standalone at
  the step's own shapes (G = B), plus the op standalone at G = 1024 with everything else equal; the op's share
  is its time at G = 1024 over that emulated step. Beside it, the kernel-only share of the real step (G = B)
  from ``torch.profiler`` (kernels named ``_patch_sentence_*``), and what bounds a host-bound step: its kernel
  launches (CUDA) and the Python functions with the most own time per step. Dry run: ``mlip-tiny``, batch 4,
  G = 16, chunked.
- :func:`section_train_step_max_batch`: the largest per-GPU batch before out-of-memory per impl (doubling, then
  bisection; each probe a full step) and the peak memory at batch 64; CUDA only, stopped by the time budget.
"""
from __future__ import annotations

import time

import torch

from benchmarks import bench_train_step
from benchmarks.bench_patch_sentence import make_inputs
from mlip_fast import _checks
from mlip_fast import functional as MF
from mlip_fast.functional import local as local_loss
from mlip_fast.constants import INIT_LOGIT_SCALE
from mlip_fast.ops import patch_sentence_scores
from tools.gpu_check import host as gpu_host

G_EMULATED = 1024
DRY_CASE = dict(config="mlip-tiny", batch=4, image_size=64, dtype="float32", device="cpu")


def section_loss_local(ctx) -> dict:
    """The patch-sentence loss: one call vs two one-direction calls vs the reference, fwd + bwd."""
    dtype = "float32" if ctx.dry_run else "bfloat16"
    fused = "triton" if ctx.device.type == "cuda" else "chunked"
    shapes = [(4, 3, 5, 16)] if ctx.dry_run else [(128, 98, 16, 512), (128, 196, 16, 512)]
    rows = []
    for B, K, S, D in shapes:
        p, s, m, _, _ = make_inputs(B, B, K, S, D, dtype, str(ctx.device), seed=1)

        def one_call(impl):
            def step():
                loss = MF.patch_sentence_loss(p, s, m, impl=impl)
                return torch.autograd.grad(loss, (p, s))
            return step

        def two_calls():
            pn, sn = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(s, dim=-1)
            i2t, _ = patch_sentence_scores(pn, sn, m, directions="i2t", impl=fused)
            _, t2i = patch_sentence_scores(pn, sn, m, directions="t2i", impl=fused)
            labels = torch.arange(B, device=p.device)
            loss = 0.5 * (torch.nn.functional.cross_entropy(INIT_LOGIT_SCALE * i2t, labels)
                          + torch.nn.functional.cross_entropy(INIT_LOGIT_SCALE * t2i.T, labels))
            return torch.autograd.grad(loss, (p, s))

        for name, fn in (("one_call_" + fused, one_call(fused)), ("two_calls_" + fused, two_calls),
                         ("reference", one_call("reference"))):
            row = dict(B=B, K=K, S=S, D=D, dtype=dtype, provider=name)
            if ctx.out_of_time():
                rows.append(dict(row, skipped="time budget spent"))
                continue
            try:
                rows.append(dict(row, ms=ctx.time_ms(fn), kernel_ms=ctx.kernel_ms(fn), peak_bytes=ctx.peak_bytes(fn)))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(row, error=f"{type(err).__name__}: {err}"[:300]))
    return {"rows": rows}


def op_calls(step) -> list:
    """Runs ``step()`` once with the op's entry point observed: one dict per scores call (shapes, dtype, options,
    impl)."""
    seen = []
    original = local_loss.scores_unchecked  # where the local loss looks the op up

    def observed(patches, sentences, sentence_mask, patch_mask, options, *, impl="auto"):
        (B, K, D), (G, S, _) = patches.shape, sentences.shape
        seen.append(dict(B=B, K=K, G=G, S=S, D=D, dtype=str(patches.dtype).replace("torch.", ""),
                         normalize=options.normalize, directions=options.directions, impl=impl))
        return original(patches, sentences, sentence_mask, patch_mask, options, impl=impl)

    local_loss.scores_unchecked = observed
    try:
        step()
    finally:
        local_loss.scores_unchecked = original
    return seen


def _step_ms(step, rounds: int) -> float:
    """Median wall milliseconds of ``step()`` (which synchronises the device itself)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def _op_ms(ctx, call: dict, G: int) -> dict:
    """fwd + bwd of the op alone as the step calls it, with G reports."""
    p, s, m, gi, gt = make_inputs(call["B"], G, call["K"], call["S"], call["D"], call["dtype"], str(ctx.device), seed=5)

    def full():
        i2t, t2i = patch_sentence_scores(p, s, m, directions=call["directions"], normalize=call["normalize"],
                                         impl=call["impl"])
        return torch.autograd.grad((i2t * gi).sum() + (t2i * gt).sum(), (p, s))

    return {"ms": ctx.time_ms(full), "kernel_ms": ctx.kernel_ms(full)}


def section_train_step(ctx) -> dict:
    """The op's share of one training step, G = 1024 emulated (see the module docstring)."""
    cuda = ctx.device.type == "cuda"
    case = bench_train_step.GPU_CASE if cuda else DRY_CASE
    impls = ("reference", "triton") if cuda else ("reference", "chunked")
    G = G_EMULATED if cuda else 16
    rows = []
    checks_were = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False
    try:
        for impl in impls:
            row = dict(impl=impl, **case, G_emulated=G)
            if ctx.out_of_time():
                rows.append(dict(row, skipped="time budget spent"))
                continue
            try:
                step = bench_train_step.make_train_step(impl, **case)
                calls = op_calls(step)
                step_ms = _step_ms(step, 1 if ctx.dry_run else 5)
                kernels = ctx.kernel_profile(step, match="_patch_sentence_")
                # what bounds a host-bound step: its kernel launches (above) and the Python that issues them
                python_top = gpu_host.python_top(step, 1 if ctx.dry_run else 3)
                in_step = kernels["matched_ms"] if impl == "triton" else None  # only our kernels carry the name
                local = [_op_ms(ctx, c, c["G"]) for c in calls]
                wide = [_op_ms(ctx, c, G) for c in calls]
                del step
                op_local, op_wide = sum(x["ms"] for x in local), sum(x["ms"] for x in wide)
                emulated = step_ms - op_local + op_wide
                rows.append(dict(row, op_calls=calls, step_ms=step_ms, step_kernel_ms=kernels["total_ms"],
                                 op_kernel_ms_in_step=in_step,
                                 op_kernel_share_in_step=in_step / kernels["total_ms"] if in_step and kernels["total_ms"] else None,
                                 op_local_ms=op_local, op_local_kernel_ms=_sum(local), op_ms_at_G=op_wide,
                                 op_kernel_ms_at_G=_sum(wide), emulated_step_ms=emulated, op_share_at_G=op_wide / emulated,
                                 step_launches=kernels["launches"], step_python_top=python_top))
            except Exception as err:  # noqa: BLE001 - e.g. the reference's grid out of memory at G = 1024
                rows.append(dict(row, error=f"{type(err).__name__}: {err}"[:500]))
            finally:
                if cuda:
                    torch.cuda.empty_cache()
    finally:
        _checks.VALUE_CHECKS = checks_were
    return {"rows": rows}


def _sum(parts: list):
    vals = [x["kernel_ms"] for x in parts]
    return None if any(v is None for v in vals) else sum(vals)


class BudgetSpent(Exception):
    pass


def section_train_step_max_batch(ctx) -> dict:
    """Largest per-GPU batch before out-of-memory and peak memory at batch 64, reference vs Triton."""
    if ctx.device.type != "cuda":
        return {"skipped": "CUDA only (the CPU step is measured by bench_train_step.py)"}
    rows = []
    for impl in ("reference", "triton"):
        row = dict(impl=impl, **bench_train_step.GPU_CASE)
        step = bench_train_step.make_train_step(impl, **bench_train_step.GPU_CASE)
        step()
        row["peak_mb"] = round(ctx.peak_bytes(step) / 2**20, 1)
        del step
        torch.cuda.empty_cache()
        probes = []

        def fits(batch, impl=impl, probes=probes):
            if ctx.out_of_time():
                raise BudgetSpent
            probes.append(batch)
            return bench_train_step._cuda_fits(impl, batch)

        try:
            row["max_batch"] = bench_train_step.largest_batch(fits)
        except BudgetSpent:
            row["stopped"] = f"time budget spent after probing batches {probes}"
        row["probes"] = probes
        rows.append(row)
    return {"rows": rows}
