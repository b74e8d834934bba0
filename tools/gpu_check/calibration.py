"""GPU check, calibration runs: the measurements that pin down the performance model's assumptions and the
launchers' choices (``perf_model.py``, ``kernels/patch_sentence/launch.py``).

- L2 read bandwidth: a Triton kernel summing a buffer that fits in L2, re-read many times, on every SM (the
  model's L2 band) and with one 16-warp block on each of 8 SMs (what one SM pulls from L2 per clock: the
  model's L2 port); the same over 1 GiB gives the HBM read rate.
- a D sweep (64 to 1024) of the training-path op (``normalize=True``, bf16) at B=G=128, K=196, S=16;
- directions: i2t, t2i and both at B=128, G=1024, K=98, S=16, D=512 (one direction skips half the work);
- the backward's split across programs (1 to 16, and the launcher's choice) with atomics vs deterministic
  split buffers, at B=128, G=128 and 1024, K=98, S=16, D=512, on the training path;
- tile overrides of the forward and backward launchers (input for tuning their defaults).

Timing as in ``context.Context`` (do_bench median; kernel-only from the profiler); every sweep stops with a
note once the run's time budget is spent. The kernels are decorated for the interpreter or the GPU when first
imported: ``python -m tools.gpu_check`` decides which before importing this module.
"""
from __future__ import annotations

import functools

import torch

from benchmarks.bench_patch_sentence import flops, make_inputs
from mlip_fast import _checks
from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence import fwd_config, fwd_v3_reasons, patch_sentence_bwd, patch_sentence_fwd
from mlip_fast.ops import patch_sentence_scores

L2_SIZES_MIB = (8, 16, 32)
HBM_SIZE_MIB = 1024
PORT_SMS = 8  # blocks (one per SM) of the per-SM L2 rate


@functools.lru_cache(maxsize=None)
def _read_kernel():
    """sum of x re-read ``ITERS`` times by every program (grid-stride), one partial sum per program; built on
    first use (after the interpreter flag is settled)."""
    import triton
    import triton.language as tl

    @triton.jit
    def read(x_ptr, out_ptr, n, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        step = tl.num_programs(0) * BLOCK
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for _ in range(ITERS):
            for start in range(pid * BLOCK, n, step):
                offs = start + tl.arange(0, BLOCK)
                acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), acc)

    return read


def _read_rate(ctx, mib: float, programs: int, iters: int, warps: int) -> dict:
    n = int(mib * 2**20) // 4
    x = torch.rand(n, device=ctx.device)  # positive: the sums can be checked to fp32 rounding
    block = 16 * 32 * warps  # 16 fp32 per thread per step (four 16-byte loads): enough in flight to cover latency
    out = torch.empty(programs * block, device=ctx.device)
    kernel = _read_kernel()

    def run():
        kernel[(programs,)](x, out, n, ITERS=iters, BLOCK=block, num_warps=warps)

    run()
    expected = float(x.sum()) * iters
    got = float(out.sum())
    ms = ctx.time_ms(run)
    return dict(mib=mib, programs=programs, warps=warps, iters=iters, ms=ms, gbs=n * 4 * iters / ms / 1e6,
                sum_rel_err=abs(got - expected) / max(abs(expected), 1e-12))


def section_l2_bandwidth(ctx) -> dict:
    """L2 read rate with every SM reading, per-SM L2 rate with one block on each of a few SMs, HBM read rate."""
    sms = torch.cuda.get_device_properties(ctx.device).multi_processor_count if ctx.device.type == "cuda" else 2
    if ctx.dry_run:
        sizes, hbm, iters = (0.0625,), 0.125, 1
    else:
        sizes, hbm, iters = L2_SIZES_MIB, HBM_SIZE_MIB, 20
    l2 = [_read_rate(ctx, mib, 4 * sms, iters, 8) for mib in sizes]
    port = _read_rate(ctx, sizes[0], min(PORT_SMS, sms), iters, 16)
    dram = _read_rate(ctx, hbm, 4 * sms, 1 if not ctx.dry_run else iters, 8)
    best = max(r["gbs"] for r in l2)
    sm_hz = ctx.sm_clock_hz()
    out = {"l2": l2, "per_sm": port, "hbm": dram, "l2_read_tbs": best / 1e3, "hbm_read_tbs": dram["gbs"] / 1e3,
           "sm_clock_hz_used": sm_hz}
    if sm_hz:
        out["per_sm_l2_bytes_per_clock"] = port["gbs"] * 1e9 / port["programs"] / sm_hz
    ctx.shared["l2_bandwidth"] = out
    return out


def _time_op(ctx, B, G, K, S, D, dtype, seed=0, **kw) -> dict:
    """fwd and full (fwd+bwd) ms, kernel-only ms and TFLOP/s of the op called with ``kw``."""
    p, s, m, gi, gt = make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=seed)

    def fwd():
        return patch_sentence_scores(p, s, m, impl="triton", **kw)

    def full():
        i2t, t2i = fwd()
        outs = [x * g for x, g in ((i2t, gi), (t2i, gt)) if x is not None]
        return torch.autograd.grad(sum(o.sum() for o in outs), (p, s))

    row = dict(B=B, G=G, K=K, S=S, D=D, dtype=dtype, **kw)
    for mode, fn in (("fwd", fwd), ("full", full)):
        row[f"{mode}_ms"] = ms = ctx.time_ms(fn)
        row[f"{mode}_kernel_ms"] = ctx.kernel_ms(fn)
        row[f"{mode}_tflops"] = flops(B, G, K, S, D, mode) / ms / 1e9
    return row


def _sweep(ctx, cases) -> list:
    rows = []
    checks_were = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False
    try:
        for args, kw in cases:
            if ctx.out_of_time():
                rows.append(dict(case=str((args, kw)), skipped="time budget spent"))
                continue
            try:
                rows.append(_time_op(ctx, *args, **kw))
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at the widest D
                rows.append(dict(case=str((args, kw)), error=f"{type(err).__name__}: {err}"[:300]))
    finally:
        _checks.VALUE_CHECKS = checks_were
    return rows


def section_d_sweep(ctx) -> dict:
    """The training path at B=G=128, K=196, S=16 for D in 64..1024 (dry run: two tiny D)."""
    if ctx.dry_run:
        cases = [((3, 4, 5, 3, d, "float32"), dict(normalize=True)) for d in (16, 33)]
    else:
        cases = [((128, 128, 196, 16, d, "bfloat16"), dict(normalize=True)) for d in (64, 128, 256, 512, 768, 1024)]
    return {"rows": _sweep(ctx, cases)}


def section_direction_sweep(ctx) -> dict:
    """i2t, t2i and both on the training path at B=128, G=1024, K=98, S=16, D=512 (dry run: tiny)."""
    shape = (3, 4, 5, 3, 16, "float32") if ctx.dry_run else (128, 1024, 98, 16, 512, "bfloat16")
    return {"rows": _sweep(ctx, [(shape, dict(normalize=True, directions=d)) for d in ("i2t", "t2i", "both")])}


SPLITS = (None, 1, 2, 4, 8, 16)


def section_bwd_split_sweep(ctx) -> dict:
    """The backward launcher with each split (None: its own choice) x atomic / deterministic buffers on the
    training path; time, kernel-only time and the largest difference from the launcher's default result."""
    shapes = [(4, 6, 8, 4, 32)] if ctx.dry_run else [(128, 128, 98, 16, 512), (128, 1024, 98, 16, 512)]
    dtype = "float32" if ctx.dry_run else "bfloat16"
    rows = []
    for B, G, K, S, D in shapes:
        p, s, m, gi, gt = make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=3)
        p, s = p.detach(), s.detach()
        _, _, a_i, a_t, inv_p, inv_s = patch_sentence_fwd(p, s, m, None, normalize=True)
        args = (gi, gt, p, s, a_i, a_t, m, None)
        expected = patch_sentence_bwd(*args, inv_p=inv_p, inv_s=inv_s)
        for split in SPLITS[1:3] if ctx.dry_run else SPLITS:
            for deterministic in (False, True):
                row = dict(shape=[B, G, K, S, D], split=split or "launcher", deterministic=deterministic)
                if ctx.out_of_time():
                    rows.append(dict(row, skipped="time budget spent"))
                    continue

                def run(split=split, deterministic=deterministic):
                    return patch_sentence_bwd(*args, deterministic=deterministic, split=split, inv_p=inv_p, inv_s=inv_s)

                try:
                    got = run()
                    row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
                    row["ms"] = ctx.time_ms(run)
                    row["kernel_ms"] = ctx.kernel_ms(run)
                except Exception as err:  # noqa: BLE001
                    row["error"] = f"{type(err).__name__}: {err}"[:300]
                rows.append(row)
        del p, s, a_i, a_t, expected
    return {"dtype": dtype, "rows": rows}


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


def section_patch_sentence_fwd_config_sweep(ctx) -> dict:
    """Forward time per block configuration at the 128 x 1024, K=196, D=512 bf16 shape, raw and on the training
    path (input for tuning the launcher's default): the v2 kernel's tiles (forced) and, where it runs, the v3
    kernel's; a config that fails to compile is recorded with its error."""
    B, G, K, S, D = (4, 6, 8, 4, 32) if ctx.dry_run else (128, 1024, 196, 16, 512)
    dtype = "float32" if ctx.dry_run else "bfloat16"
    p, s, m, _, _ = make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=0)
    p, s = p.detach(), s.detach()
    target = target_of(p.device)
    rows = []
    v3_ok = not fwd_v3_reasons(K, S, D, p.dtype, target.arch)

    def candidate(row: dict, config, expected) -> dict:
        """``row`` with the tile config's largest difference from the default's output and its time, or why not
        (the time budget spent, or the launch's error: e.g. out of shared memory or registers on this card)."""
        if ctx.out_of_time():
            return dict(row, skipped="time budget spent")
        call = dict(config=config, normalize=row["normalize"], kernel=row["kernel"])
        try:
            got = patch_sentence_fwd(p, s, m, None, **call)[:2]
            row["max_abs_diff"] = max(float((a - b).abs().max()) for a, b in zip(got, expected))
            row["ms"] = ctx.time_ms(lambda: patch_sentence_fwd(p, s, m, None, **call))
        except Exception as err:  # noqa: BLE001
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        return row

    for normalize in (False, True):
        default = fwd_config(B, K, G, S, D, p.dtype, target.arch, target.sm_count, normalize=normalize)
        expected = patch_sentence_fwd(p, s, m, None, normalize=normalize, kernel="v2")[:2]
        rows.append(dict(config="default", kernel="v2", normalize=normalize, **default,
                         ms=ctx.time_ms(lambda: patch_sentence_fwd(p, s, m, None, normalize=normalize, kernel="v2"))))
        for cand in V3_SWEEP if v3_ok else []:  # the persistent sm_90 forward's tiles (None: its default)
            row = dict(config="v3 default" if cand is None else "v3 candidate", kernel="v3", normalize=normalize,
                       **(cand or {}))
            rows.append(candidate(row, cand, expected))
        for cand in FWD_SWEEP[:2] if ctx.dry_run else FWD_SWEEP:
            cfg = {k: v for k, v in cand.items() if k != "ROWS"}
            cfg["GB"] = max(1, cand["ROWS"] // default["S_CH"]) if not default["LARGE_S"] else 1
            if ctx.dry_run:
                cfg.update(BN=16, BD=16, num_stages=1)
            rows.append(candidate(dict(config="candidate", kernel="v2", normalize=normalize, **cfg), cfg, expected))
    best = {n: min((r for r in rows if "ms" in r and r["normalize"] == n), key=lambda r: r["ms"]) for n in (False, True)}
    return {"shape": [B, G, K, S, D], "dtype": dtype, "rows": rows, "best": best}


V3_SWEEP = [None, dict(BN=32), dict(STAGES=3), dict(BN=32, STAGES=3)]  # v3 overrides (None: its default)

BWD_SWEEP = [  # candidate backward overrides (both sides); None = the launcher's default
    None,
    dict(num_warps=4),
    dict(num_warps=8),
    dict(DC=128, num_warps=4),
    dict(DC=128, num_warps=8),
    dict(num_warps=4, num_stages=3),
]


def section_patch_sentence_bwd_config_sweep(ctx) -> dict:
    """Backward time per block configuration at B=G=128 and 128 x 1024, K=98, S=16, D=512, bf16 (input for
    tuning the launcher); a config that fails to compile is recorded with its error."""
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
            if ctx.out_of_time():
                rows.append(dict(row, skipped="time budget spent"))
                continue
            try:
                got = patch_sentence_bwd(*args, config=cand)
                row["max_abs_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, expected))
                row["ms"] = ctx.time_ms(lambda cand=cand: patch_sentence_bwd(*args, config=cand))
            except Exception as err:  # noqa: BLE001 - e.g. out of shared memory on this card
                row["error"] = f"{type(err).__name__}: {err}"[:300]
            rows.append(row)
        del p, s, a_i, a_t
    return {"dtype": dtype, "rows": rows}
