"""One-command GPU check: correctness on real CUDA and the GPU benchmark, written to one JSON file.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR          # on a CUDA machine, ~3-5 min on an H100
    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR --dry-run  # CPU, Triton interpreter, tiny shapes

Needs only torch and triton (no network, no deepspeed). Writes ``DIR/gpu_<card>.json`` (``cpu_dry_run.json``
for a dry run) after every section, so a crash or a timeout keeps what was measured. Each section is a
function in ``SECTIONS``; a failing section records its traceback and the others still run. To add a
section (for another op), write ``def section_<name>(ctx) -> dict`` and append it to ``SECTIONS``.

Timing follows PERF.md: ``triton.testing.do_bench`` (warm-up first, median), fresh random inputs rotated over
several sets so L2 is not what is measured; memory is the ``torch.cuda.max_memory_allocated`` delta over one
step (inputs allocated before). Every number is recorded with the card, driver, torch and triton versions.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


class Context:
    """What every section gets: device, dry-run flag, timing and memory helpers, shared measurements."""

    def __init__(self, dry_run: bool):
        import torch

        self.torch = torch
        self.dry_run = dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shared: dict = {}

    def time_ms(self, fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
        """Median milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(1 if self.dry_run else 3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def peak_bytes(self, fn):
        """Peak bytes allocated over ``fn()`` beyond what was allocated before (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        import harness

        return harness.cuda_peak_memory(fn, self.device)


# ------------------------------------------------------------------------------------------------ sections


def section_environment(ctx: Context) -> dict:
    import harness

    return harness.environment(ctx.device)


def section_matmul_rate(ctx: Context) -> dict:
    """Measured dense bf16 matmul rate: the denominator of every %-of-peak below."""
    torch = ctx.torch
    n = 256 if ctx.dry_run else 8192
    dtype = torch.float32 if ctx.device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    ms = ctx.time_ms(lambda: a @ b, rep_ms=300)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    ctx.shared["matmul_tflops"] = tflops
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": tflops}


def _to(x, device):
    return None if x is None else x.to(device)


def section_patch_sentence_correctness(ctx: Context) -> dict:
    """triton (and chunked) on the device vs a float64 grid on the CPU: scores and both gradients with a
    random upstream gradient; fp32 to 1e-5 of scale; bf16 within 2x of torch's own bf16 grid (on the
    device); one-direction modes; deterministic backward bitwise equal; atomic backward close to it."""
    torch = ctx.torch
    from tests.test_patch_sentence_fused import CASES, fused, grid_scores, make_case, rel_err, run

    dev = ctx.device
    results, failures = [], []

    def full_masks(B, G, K, S, smask, pmask):
        smask = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
        pmask = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
        return smask, pmask

    def check(name, B, G, K, S, D, dtype, impls, directions="both", masked=True, negative=False, min_gap=0.0,
              grads=True):
        p, s, smask, pmask = make_case(
            B, G, K, S, D, masked=masked, seed=B + 7 * K + S, dtype=dtype, negative=negative, min_gap=min_gap
        )
        smask, pmask = full_masks(B, G, K, S, smask, pmask)
        gen = torch.Generator().manual_seed(B * G)
        gi, gt = torch.randn(B, G, generator=gen, dtype=torch.float64), torch.randn(B, G, generator=gen, dtype=torch.float64)
        ref = run(grid_scores, p.double(), s.double(), smask, pmask, directions, gi, gt)
        base = None
        if dtype != torch.float32:
            base = run(grid_scores, p.to(dev), s.to(dev), smask.to(dev), pmask.to(dev), directions, gi.to(dev), gt.to(dev))
        for impl in impls:
            out = run(fused(impl), p.to(dev), s.to(dev), smask.to(dev), pmask.to(dev), directions, gi.to(dev), gt.to(dev))
            errs, bounds = [], []
            pairs = list(zip([*out[0], out[1], out[2]], [*ref[0], ref[1], ref[2]]))
            for i, (x, r) in enumerate(pairs if grads else pairs[: len(out[0])]):
                errs.append(rel_err(x.cpu(), r))
                if base is None:
                    bounds.append(1e-5)
                else:
                    b = [*base[0], base[1], base[2]][i]
                    bounds.append(2 * rel_err(b.cpu(), r) + 1e-6)
            ok = all(e <= b for e, b in zip(errs, bounds))
            row = dict(case=name, impl=impl, dtype=str(dtype), directions=directions, grads=grads, rel_errors=errs,
                       bounds=bounds, ok=ok)
            results.append(row)
            if not ok:
                failures.append(row)

    impls = ["triton", "chunked"]
    for B, G, K, S, D, masked, negative in CASES:
        check(f"B{B} G{G} K{K} S{S} D{D}", B, G, K, S, D, ctx.torch.float32, impls, masked=masked, negative=negative)
    for directions in ("i2t", "t2i"):
        check(f"one direction {directions}", 3, 4, 6, 3, 20, torch.float32, impls, directions=directions)
    # Half inputs: gradients only where the top-2 similarities are separated beyond half rounding (else
    # the argmax legitimately differs between implementations); at larger shapes such draws do not exist,
    # so those check the scores only.
    for B, G, K, S, D in [(3, 5, 7, 3, 33), (3, 2, 9, 5, 40)]:
        for dtype in (torch.bfloat16, torch.float16):
            check(f"half B{B} G{G} K{K} S{S} D{D}", B, G, K, S, D, dtype, impls, min_gap=0.006)
    if not ctx.dry_run:
        for dtype in (torch.bfloat16, torch.float16):
            check("half scores B8 G12 K196 S16 D512", 8, 12, 196, 16, 512, dtype, impls, grads=False)
        # PERF-like and limit shapes (K=196 and 256, S=64, D=1024: several K and D chunks), fp32; inputs
        # redrawn until no max is within 1e-6 of scale of its runner-up (fp32 dot error is below that).
        for B, G, K, S, D in [(16, 16, 196, 16, 512), (4, 6, 256, 64, 1024), (6, 5, 98, 16, 256)]:
            check(f"large B{B} G{G} K{K} S{S} D{D}", B, G, K, S, D, torch.float32, ["triton"], min_gap=1e-6)

    # Determinism: deterministic=True twice -> bitwise equal; the atomic default agrees to fp32 rounding.
    B, G, K, S, D = (4, 6, 10, 4, 24) if ctx.dry_run else (64, 96, 196, 16, 256)
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=9)
    smask, pmask = full_masks(B, G, K, S, smask, pmask)
    gi, gt = (torch.randn(B, G, dtype=torch.float64, device=dev) for _ in range(2))
    args = (p.to(dev), s.to(dev), smask.to(dev), pmask.to(dev), "both", gi, gt)
    det1 = run(fused("triton", deterministic=True), *args)
    det2 = run(fused("triton", deterministic=True), *args)
    atom = run(fused("triton"), *args)
    bitwise = all(torch.equal(a, b) for a, b in zip([det1[1], det1[2]], [det2[1], det2[2]]))
    atomic_err = max(rel_err(a.cpu(), b.cpu().double()) for a, b in zip([atom[1], atom[2]], [det1[1], det1[2]]))
    determinism = dict(shape=[B, G, K, S, D], bitwise_equal=bitwise, atomic_vs_deterministic_rel_err=atomic_err)
    if not bitwise or atomic_err > 1e-5:
        failures.append(determinism)
    return {"ok": not failures, "checks": len(results), "failures": failures, "determinism": determinism, "results": results}


BENCH_SHAPES = [  # (B, G, K, S, D): PERF.md's named shapes and the performance model's
    (32, 32, 196, 16, 256),
    (128, 128, 98, 16, 256),
    (128, 128, 196, 16, 256),
    (128, 128, 98, 16, 512),
    (128, 128, 196, 16, 512),
    (256, 256, 196, 16, 256),
    (512, 512, 196, 16, 256),
    (128, 1024, 98, 16, 512),
    (128, 1024, 196, 16, 512),
]
DRY_SHAPES = [(4, 6, 5, 3, 33)]
N_INPUT_SETS = 3


def section_patch_sentence_benchmark(ctx: Context) -> dict:
    """naive (reference grid) vs chunked vs triton, fwd / bwd / full, bf16 inputs; TFLOP/s, % of the
    measured bf16 matmul rate, the plain grid matmul, peak memory, and PERF.md's targets."""
    torch = ctx.torch
    from bench_patch_sentence import flops, make_inputs

    from mlip_fast.ops import patch_sentence_scores
    from mlip_fast.ops.patch_sentence import ScoresOptions
    from mlip_fast.ops.patch_sentence.chunked import patch_sentence_scores_chunked

    dev = ctx.device
    dtype = "float32" if ctx.dry_run else "bfloat16"
    rate = ctx.shared.get("matmul_tflops")
    chunked_tile = 2**24  # on a GPU, large tiles: fewer launches, still far below the grid
    providers = {
        "naive": lambda p, s, m: patch_sentence_scores(p, s, m, impl="reference"),
        "chunked": lambda p, s, m: patch_sentence_scores_chunked(p, s, m, None, ScoresOptions(), tile_elements=chunked_tile),
        "triton": lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton"),
        "triton_deterministic": lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton", deterministic=True),
    }
    rows = []
    for B, G, K, S, D in DRY_SHAPES if ctx.dry_run else BENCH_SHAPES:
        sets = [make_inputs(B, G, K, S, D, dtype, str(dev), seed=i) for i in range(N_INPUT_SETS)]
        shape = dict(B=B, G=G, K=K, S=S, D=D, dtype=dtype)
        # The plain matmul producing the [B*K, G*S] grid: the floor the fused forward should match.
        pk = [x[0].detach().reshape(B * K, D) for x in sets]
        sg = [x[1].detach().reshape(G * S, D) for x in sets]
        counter = [0]

        def grid_matmul():
            i = counter[0] = (counter[0] + 1) % N_INPUT_SETS
            return pk[i] @ sg[i].T

        grid_ms = ctx.time_ms(grid_matmul)
        rows.append(dict(shape, provider="grid_matmul", mode="fwd", ms=grid_ms, tflops=flops(B, G, K, S, D, "fwd") / grid_ms / 1e9))
        ref_out = None
        for name, fn in providers.items():
            try:
                out = fn(*[t.detach() for t in sets[0][:2]], sets[0][2])
                if name == "naive":
                    ref_out = out
                diff = None if ref_out is None else max(float((o - r).abs().max()) for o, r in zip(out, ref_out))

                def fwd(fn=fn):
                    i = counter[0] = (counter[0] + 1) % N_INPUT_SETS
                    p, s, m, _, _ = sets[i]
                    return fn(p, s, m)

                def full(fn=fn):
                    i = counter[0] = (counter[0] + 1) % N_INPUT_SETS
                    p, s, m, gi, gt = sets[i]
                    i2t, t2i = fn(p, s, m)
                    return torch.autograd.grad((i2t * gi).sum() + (t2i * gt).sum(), (p, s))

                # Backward alone: one forward graph per input set, kept, differentiated repeatedly.
                graphs = []
                for p, s, m, gi, gt in sets:
                    i2t, t2i = fn(p, s, m)
                    graphs.append(((i2t * gi).sum() + (t2i * gt).sum(), p, s))

                def bwd():
                    i = counter[0] = (counter[0] + 1) % N_INPUT_SETS
                    loss, p, s = graphs[i]
                    return torch.autograd.grad(loss, (p, s), retain_graph=True)

                times = {"fwd": ctx.time_ms(fwd), "bwd": ctx.time_ms(bwd), "full": ctx.time_ms(full)}
                del graphs
                peak = ctx.peak_bytes(full)
                grads = (B * K + G * S) * D * getattr(torch, dtype).itemsize
                for mode, ms in times.items():
                    rows.append(
                        dict(
                            shape,
                            provider=name,
                            mode=mode,
                            ms=ms,
                            tflops=flops(B, G, K, S, D, mode) / ms / 1e9,
                            pct_of_matmul_rate=(100 * flops(B, G, K, S, D, mode) / ms / 1e9 / rate) if rate else None,
                            peak_bytes_full=peak,
                            op_bytes_full=None if peak is None else max(peak - grads, 0),
                            max_abs_diff_vs_naive=diff,
                        )
                    )
            except Exception as err:  # e.g. the naive grid running out of memory at the largest shapes
                rows.append(dict(shape, provider=name, error=f"{type(err).__name__}: {err}"[:500]))
            finally:
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del sets, pk, sg
    ctx.shared["bench_rows"] = rows
    return {"rows": rows, "targets": _targets(rows), "chunked_tile_elements": chunked_tile}


def _targets(rows) -> dict:
    """PERF.md targets evaluated on the rows (None where a number is missing)."""

    def get(provider, mode, **shape):
        for r in rows:
            if r.get("provider") == provider and r.get("mode") == mode and all(r.get(k) == v for k, v in shape.items()):
                return r
        return None

    def ratio(a, b, key="ms"):
        return None if a is None or b is None or key not in a or key not in b or not b[key] else a[key] / b[key]

    out = {}
    wide = dict(B=128, G=1024, K=196, D=512)
    t = get("triton", "fwd", **wide)
    out["fwd_pct_of_bf16_matmul_128x1024_d512 (>= 40)"] = t and t.get("pct_of_matmul_rate")
    out["fwd_time_over_grid_matmul_128x1024_d512 (<= 1)"] = ratio(t, get("grid_matmul", "fwd", **wide))
    for B, K in ((128, 196), (128, 98)):
        s = dict(B=B, G=B, K=K, D=256)
        out[f"naive_over_fused_fwd_B{B}_K{K}_d256 (>= 3)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
        out[f"naive_over_fused_full_B{B}_K{K}_d256 (>= 3)"] = ratio(get("naive", "full", **s), get("triton", "full", **s))
        out[f"bwd_over_fwd_B{B}_K{K}_d256 (<= 2.2)"] = ratio(get("triton", "bwd", **s), get("triton", "fwd", **s))
        out[f"naive_over_fused_op_memory_B{B}_K{K}_d256 (>= 150)"] = ratio(
            get("naive", "full", **s), get("triton", "full", **s), key="op_bytes_full"
        )
    s = dict(B=512, G=512, K=196, D=256)
    out["naive_over_fused_fwd_B512_d256 (>= 4)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
    s = dict(B=32, G=32, K=196, D=256)
    out["naive_over_fused_fwd_B32_d256 (>= 1)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
    return out


FWD_SWEEP = [  # candidate forward configs; ROWS = sentence rows per tile (GB = ROWS // S_CH)
    dict(ROWS=128, BN=128, BD=64, num_warps=8, num_stages=3),
    dict(ROWS=128, BN=128, BD=64, num_warps=8, num_stages=4),
    dict(ROWS=128, BN=128, BD=32, num_warps=8, num_stages=4),
    dict(ROWS=128, BN=64, BD=64, num_warps=8, num_stages=3),
    dict(ROWS=64, BN=128, BD=64, num_warps=4, num_stages=3),
    dict(ROWS=64, BN=256, BD=64, num_warps=8, num_stages=3),
    dict(ROWS=256, BN=64, BD=64, num_warps=8, num_stages=3),
    dict(ROWS=128, BN=128, BD=128, num_warps=8, num_stages=2),
]


def section_patch_sentence_fwd_config_sweep(ctx: Context) -> dict:
    """Forward time per block configuration at the 128 x 1024, D=512 bf16 shape (input for tuning the
    launcher's default); a config that fails to compile is recorded with its error."""
    from bench_patch_sentence import make_inputs

    from mlip_fast.kernels._target import target_of
    from mlip_fast.kernels.patch_sentence import fwd_config, patch_sentence_fwd

    B, G, K, S, D = (4, 6, 8, 4, 32) if ctx.dry_run else (128, 1024, 196, 16, 512)
    dtype = "float32" if ctx.dry_run else "bfloat16"
    p, s, m, _, _ = make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=0)
    p, s = p.detach(), s.detach()
    target = target_of(p.device)
    default = fwd_config(B, K, G, S, D, p.dtype, target.arch, target.sm_count)
    expected = patch_sentence_fwd(p, s, m, None)[:2]
    rows = [dict(config="default", **default, ms=ctx.time_ms(lambda: patch_sentence_fwd(p, s, m, None)))]
    for cand in FWD_SWEEP[:2] if ctx.dry_run else FWD_SWEEP:
        cfg = {k: v for k, v in cand.items() if k != "ROWS"}
        cfg["GB"] = max(1, cand["ROWS"] // default["S_CH"]) if not default["LARGE_S"] else 1
        if ctx.dry_run:
            cfg.update(BN=16, BD=16, num_stages=1)
        try:
            got = patch_sentence_fwd(p, s, m, None, config=cfg)[:2]
            diff = max(float((a - b).abs().max()) for a, b in zip(got, expected))
            rows.append(dict(config="candidate", **cfg, ms=ctx.time_ms(lambda: patch_sentence_fwd(p, s, m, None, config=cfg)), max_abs_diff=diff))
        except Exception as err:
            rows.append(dict(config="candidate", **cfg, error=f"{type(err).__name__}: {err}"[:300]))
    best = min((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    return {"shape": [B, G, K, S, D], "dtype": dtype, "rows": rows, "best": best}


BWD_SWEEP = [  # candidate backward overrides (both sides); None = the launcher's default
    None,
    dict(num_warps=4),
    dict(num_warps=8),
    dict(DC=128, num_warps=4),
    dict(DC=128, num_warps=8),
    dict(num_warps=4, num_stages=3),
]


def section_patch_sentence_bwd_config_sweep(ctx: Context) -> dict:
    """Backward time per block configuration at B=G=128 and 128 x 1024, K=98, S=16, D=512, bf16 (input for
    tuning the launcher); a config that fails to compile is recorded with its error."""
    torch = ctx.torch
    from bench_patch_sentence import make_inputs

    from mlip_fast.kernels.patch_sentence import patch_sentence_bwd, patch_sentence_fwd

    shapes = [(4, 6, 8, 4, 32)] if ctx.dry_run else [(128, 128, 98, 16, 512), (128, 1024, 98, 16, 512)]
    dtype = "float32" if ctx.dry_run else "bfloat16"
    rows = []
    for B, G, K, S, D in shapes:
        p, s, m, gi, gt = make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=2)
        p, s = p.detach(), s.detach()
        _, _, a_i, a_t, _, _ = patch_sentence_fwd(p, s, m, None)
        args = (gi, gt, p, s, a_i, a_t, m, None)
        expected = patch_sentence_bwd(*args)
        for cand in BWD_SWEEP[:2] if ctx.dry_run else BWD_SWEEP:
            row = dict(shape=[B, G, K, S, D], config=cand or "default")
            try:
                got = patch_sentence_bwd(*args, config=cand)
                row["max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, expected))
                row["ms"] = ctx.time_ms(lambda cand=cand: patch_sentence_bwd(*args, config=cand))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory on this card
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
        del p, s, a_i, a_t
    return {"dtype": dtype, "rows": rows}


def section_loss_local(ctx: Context) -> dict:
    """The patch-sentence loss (local mode, one process) forward + backward at B=128, K=98 / 196, S=16, D=512,
    bf16: one both-directions call per loss, against the same loss built from two one-direction calls (what
    training did before) and against the reference impl."""
    torch = ctx.torch
    from bench_patch_sentence import make_inputs

    from mlip_fast import functional as MF
    from mlip_fast.constants import INIT_LOGIT_SCALE
    from mlip_fast.ops import patch_sentence_scores

    dtype = "float32" if ctx.dry_run else "bfloat16"
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
            i2t, _ = patch_sentence_scores(pn, sn, m, directions="i2t", impl="triton" if ctx.device.type == "cuda" else "chunked")
            _, t2i = patch_sentence_scores(pn, sn, m, directions="t2i", impl="triton" if ctx.device.type == "cuda" else "chunked")
            labels = torch.arange(B, device=p.device)
            scale = INIT_LOGIT_SCALE
            loss = 0.5 * (torch.nn.functional.cross_entropy(scale * i2t, labels)
                          + torch.nn.functional.cross_entropy(scale * t2i.T, labels))
            return torch.autograd.grad(loss, (p, s))

        fused = "triton" if ctx.device.type == "cuda" else "chunked"
        for name, fn in (("one_call_" + fused, one_call(fused)), ("two_calls_" + fused, two_calls),
                         ("reference", one_call("reference"))):
            try:
                rows.append(dict(B=B, K=K, S=S, D=D, dtype=dtype, provider=name, ms=ctx.time_ms(fn),
                                 peak_bytes=ctx.peak_bytes(fn)))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(B=B, K=K, S=S, D=D, dtype=dtype, provider=name, error=f"{type(err).__name__}: {err}"[:300]))
    return {"rows": rows}


def section_train_step(ctx: Context) -> dict:
    """One MLIP training step (ViT-B/16 + BERT-base, bf16, batch 64) for the reference and fused impls: step
    time, peak memory and the largest per-GPU batch before out-of-memory (doubling search)."""
    if ctx.device.type != "cuda":
        return {"skipped": "CUDA only (the CPU step is measured by bench_train_step.py)"}
    import bench_train_step

    return {"rows": [bench_train_step._measure(impl, bench_train_step.GPU_CASE) for impl in ("reference", "triton")]}


def section_compiled_kernels(ctx: Context) -> dict:
    """What the GPU actually compiled for the kernels run so far (registers, spills, shared memory, warps),
    next to the static compile's committed record of the same kernels, so the two can be related."""
    import importlib

    found = []
    for module_name, kernels in (("mlip_fast.kernels.patch_sentence", ("_patch_sentence_fwd_kernel", "_patch_sentence_bwd_kernel")),
                                 ("mlip_fast.kernels.integrity_mask", ("_integrity_mask_fwd_kernel", "_integrity_mask_bwd_kernel"))):
        module = importlib.import_module(module_name)
        for name in kernels:
            fn = getattr(module, name)
            for caches in getattr(fn, "device_caches", {}).values():
                for key, compiled in caches[0].items():
                    row = dict(kernel=name, specialization=str(key)[:400])
                    for attr in ("n_regs", "n_spills", "n_max_threads"):
                        row[attr] = getattr(compiled, attr, None)
                    meta = getattr(compiled, "metadata", None)
                    if meta is not None:
                        row.update(shared=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                                   num_stages=getattr(meta, "num_stages", None))
                    found.append(row)
    static_path = HERE / "results" / "kernel_static.json"
    static = []
    if static_path.exists():
        arch = None
        if ctx.device.type == "cuda":
            major, minor = ctx.torch.cuda.get_device_capability(ctx.device)
            arch = f"sm_{major}{minor}"
        import kernel_static

        data = json.loads(static_path.read_text())
        for r in kernel_static.unpack(data):
            shape = r.get("shape", {})
            if r.get("compiled") and r["arch"] == arch and r["dtype"] == "bf16" and shape.get("K") in (98, 196) \
                    and shape.get("S") == 16 and shape.get("D") == 512 and shape.get("G") in (128, 1024):
                static.append({k: r.get(k) for k in ("kernel", "mode", "shape", "config", "registers", "spill_bytes",
                                                     "shared_bytes", "blocks_per_sm", "tensor_core_sass")})
    return {"compiled_here": found, "static_records": static}


def section_model_vs_measurement(ctx: Context) -> dict:
    """The performance model's predictions (``results/perf_model.json``) beside this run's measurements of the
    same shapes: the first GPU run calibrates the model."""
    path = HERE / "results" / "perf_model.json"
    if not path.exists():
        return {"skipped": f"{path.name} not found"}
    model = json.loads(path.read_text())["records"]
    bench = ctx.shared.get("bench_rows", [])
    name = ctx.torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    card = "A100" if "A100" in name else "H100"  # H200: same SMs and clocks as H100, more HBM bandwidth
    rows = []
    for r in bench:
        if "ms" not in r or r.get("provider") not in ("triton", "naive"):
            continue
        mode = "fwd+bwd" if r["mode"] == "full" else r["mode"]
        impl = "fused" if r["provider"] == "triton" else "naive"
        pred = next((m for m in model if m["impl"] == impl and m["mode"] == mode and m["card"] == card
                     and all(m[k] == r[k] for k in ("B", "G", "K", "S", "D"))), None)
        if pred is None:
            continue
        rows.append(dict(impl=impl, mode=mode, B=r["B"], G=r["G"], K=r["K"], S=r["S"], D=r["D"],
                         measured_us=r["ms"] * 1e3, predicted_us=pred["predicted_s"] * 1e6,
                         measured_over_predicted=r["ms"] * 1e-3 / pred["predicted_s"], model_card=card))
    for row in rows:
        print(f"  model vs measured: {row['impl']:5s} {row['mode']:7s} {row['B']}x{row['G']} K{row['K']} D{row['D']}: "
              f"predicted {row['predicted_us']:.1f} us, measured {row['measured_us']:.1f} us", flush=True)
    return {"device": name, "model_card": card, "rows": rows}


def section_integrity_mask(ctx: Context) -> dict:
    """Integrity-scored masking on CUDA: correctness, no host sync, timings vs argsort + gather and copy."""
    if ctx.device.type != "cuda":
        return {"skipped": "CUDA only (the CPU dry run covers the patch-sentence sections)"}
    import gpu_integrity_mask

    out: dict = {}
    gpu_integrity_mask.gpu_section_integrity_mask(out)
    return out["integrity_mask"]


SECTIONS = [
    section_environment,
    section_matmul_rate,
    section_patch_sentence_correctness,
    section_patch_sentence_benchmark,
    section_model_vs_measurement,
    section_loss_local,
    section_compiled_kernels,
    section_patch_sentence_fwd_config_sweep,
    section_patch_sentence_bwd_config_sweep,
    section_integrity_mask,
    section_train_step,
]


# ---------------------------------------------------------------------------------------------------- main


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _table(result: dict) -> list:
    """Rows for the README table: triton vs naive at each benchmark shape."""
    bench = result.get("sections", {}).get("patch_sentence_benchmark", {}).get("result", {})
    rows = []
    for r in bench.get("rows", []):
        if "ms" in r and r["provider"] in ("naive", "chunked", "triton"):
            rows.append(
                {
                    "shape": f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']} {r['dtype']}",
                    "provider": r["provider"],
                    "mode": r["mode"],
                    "ms": r["ms"],
                    "TFLOP/s": r["tflops"],
                    "op_MiB_full": None if r.get("op_bytes_full") is None else r["op_bytes_full"] / 2**20,
                }
            )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CUDA correctness sweep and benchmark for mlip_fast's fused ops")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_<card>.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    parser.add_argument("--sections", nargs="*", help="run only these sections (names without 'section_')")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        if not args.dry_run:
            parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
        # Must be set before the first kernel module import (read when @triton.jit decorates).
        os.environ["TRITON_INTERPRET"] = "1"
    ctx = Context(args.dry_run)
    name = "cpu_dry_run" if ctx.device.type == "cpu" else "gpu_" + _slug(torch.cuda.get_device_name(ctx.device))
    if args.dry_run and ctx.device.type == "cuda":
        name += "_dry_run"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    result = {"script": "benchmarks/gpu_check.py", "dry_run": args.dry_run, "sections": {}}
    wanted = set(args.sections or [])
    started = time.perf_counter()
    for section in SECTIONS:
        key = section.__name__.removeprefix("section_")
        if wanted and key not in wanted:
            continue
        t0 = time.perf_counter()
        try:
            entry = {"ok": True, "result": section(ctx)}
            if isinstance(entry["result"], dict) and entry["result"].get("ok") is False:
                entry["ok"] = False
        except Exception:
            entry = {"ok": False, "error": traceback.format_exc()[-4000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        result["sections"][key] = entry
        if key == "environment" and entry["ok"]:
            result["environment"] = entry["result"]
        result["table"] = _table(result)
        result["wall_seconds"] = round(time.perf_counter() - started, 2)
        path.write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"[{entry['seconds']:7.1f}s] {key}: {'ok' if entry['ok'] else 'FAILED'}", flush=True)
    print(f"wrote {path}")
    return 0 if all(e["ok"] for e in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
