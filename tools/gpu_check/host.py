"""GPU check, the host side of one op call: where the time goes that is neither GPU kernel nor waiting.

The H100 run of 2026-12-05 (``benchmarks/results/gpu_nvidia-h100-80gb-hbm3.json``) found the op on the training
path host-bound at one GPU's batch: 1.87 ms per forward + backward call at B = G = 128 against 0.55 ms of GPU
kernels, and about 1.9-2.2 ms per call whatever D (64 to 1,024), while the v2 forward's call time was close to its
kernel time and v3's was not. :func:`section_host_overhead` measures, for the op as training calls it
(``normalize=True``, both directions, bf16) with the dispatch's forward and with v2 forced, forward alone and
forward + backward:

- ``host_ms``: the CPU time per call, N calls issued back to back without a synchronisation (the GPU queue
  absorbs them unless a call waits for the device);
- ``wall_ms``: the same N calls until the device is done, per call (host-bound when close to ``host_ms``);
- ``kernel_ms``, ``launches`` and ``kernels``: the GPU kernels' summed time, their number and names per call
  (``Context.kernel_profile``);
- ``syncs``: host synchronisations per call (CUDA's sync debug mode; 0 is the contract of the training path);
- ``python_top``: the 12 Python functions with the most own time per forward + backward call (``cProfile``),
  which names the wrapper, dispatch or launcher code to remove.

On CPU (dry run) the same runs through the Triton interpreter; launches and syncs are not counted there.
"""
from __future__ import annotations

import cProfile
import pstats
import time
import warnings

import torch

from benchmarks.bench_patch_sentence import _sync, make_inputs
from mlip_fast import _checks
from mlip_fast.kernels.patch_sentence import launch as ps_launch
from mlip_fast.ops import patch_sentence_scores

SHAPE = (128, 128, 98, 16, 512)
DRY_SHAPE = (4, 6, 5, 3, 32)
CALLS = 50
DRY_CALLS = 2


def _syncs_per_call(dev, fn) -> int | None:
    """Host synchronisations of one call of ``fn`` (CUDA's sync debug mode warns on each)."""
    if dev.type != "cuda":
        return None
    _sync(dev)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in seen)


def python_top(fn, calls: int, n: int = 12) -> list:
    """The ``n`` Python functions with the most own time per call of ``fn`` (microseconds)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:n]
    return [{"function": f"{'/'.join(file.rsplit('/', 2)[-2:])}:{line}({name})",
             "calls_per_call": round(v[1] / calls, 2), "own_us_per_call": round(v[2] / calls * 1e6, 1),
             "cumulative_us_per_call": round(v[3] / calls * 1e6, 1)} for (file, line, name), v in rows]


def section_host_overhead(ctx) -> dict:
    """Host time, launches and syncs per call of the op on the training path (see the module docstring)."""
    dev = ctx.device
    B, G, K, S, D = DRY_SHAPE if ctx.dry_run else SHAPE
    dtype = "float32" if ctx.dry_run else "bfloat16"
    calls = DRY_CALLS if ctx.dry_run else CALLS
    p, s, smask, gi, gt = make_inputs(B, G, K, S, D, dtype, dev.type)
    forwards = ("dispatch",) if ctx.dry_run else ("dispatch", "v2")
    rows = []
    checks = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False  # as in every timed region of the check: no value check of ours syncs
    try:
        for forward in forwards:
            ps_launch.FORWARD_OVERRIDE = None if forward == "dispatch" else forward

            def fwd():
                return patch_sentence_scores(p, s, smask, normalize=True, impl="triton")

            def full():
                i2t, t2i = fwd()
                torch.autograd.backward((i2t, t2i), (gi, gt))

            for mode, fn in (("fwd", fwd), ("fwd+bwd", full)):
                if ctx.out_of_time(5.0):
                    rows.append(dict(forward=forward, mode=mode, skipped="time budget spent"))
                    continue
                fn()
                _sync(dev)
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                issued = time.perf_counter()
                _sync(dev)
                done = time.perf_counter()
                kernels = ctx.kernel_profile(fn)
                row = dict(forward=forward, ran=ps_launch.last_forward().get("kernel"), mode=mode, B=B, G=G, K=K, S=S,
                           D=D, dtype=dtype, calls=calls, host_ms=(issued - start) * 1e3 / calls,
                           wall_ms=(done - start) * 1e3 / calls, syncs=_syncs_per_call(dev, fn),
                           kernel_ms=kernels["total_ms"] if dev.type == "cuda" else None,
                           launches=kernels["launches"], kernels=kernels["kernels"])
                if mode == "fwd+bwd":
                    row["python_top"] = python_top(fn, calls)
                    _sync(dev)
                rows.append(row)
                p.grad = s.grad = None
    finally:
        ps_launch.FORWARD_OVERRIDE = None
        _checks.VALUE_CHECKS = checks
    return {"rows": rows}
