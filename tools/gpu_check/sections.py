"""The GPU check's own sections: the card and versions, the dense bf16 matmul rate, correctness of the fused op
against a float64 grid, the integrity-mask section (``integrity_mask.py``), the performance model's predictions
beside this run's measurements, and what the GPU compiled beside the static compile's records.
"""
from __future__ import annotations

import json

import torch

from benchmarks import harness
from mlip_fast.kernels import integrity_mask as mask_kernels
from mlip_fast.kernels.patch_sentence import launch as ps_launch
from mlip_fast.ops import patch_sentence_scores
from mlip_fast.testing.patch_sentence import CASES, grid_scores, make_case, rel_err, run
from tools.gpu_check import env as gpu_env
from tools.gpu_check import integrity_mask as gpu_integrity_mask
from tools.gpu_check.context import Context
from tools.kernel_static import records as static_records


def section_environment(ctx: Context) -> dict:
    """Versions, and the exact card: name, variant, SMs, memory, power limit, clocks."""
    env = harness.environment(ctx.device)
    env["card"] = gpu_env.card_identity(torch, ctx.device) if ctx.device.type == "cuda" else {"unavailable": "no CUDA device"}
    return env


def section_matmul_rate(ctx: Context) -> dict:
    """Measured dense bf16 matmul rate: the denominator of every %-of-peak below."""
    n = 256 if ctx.dry_run else 8192
    dtype = torch.float32 if ctx.device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    ms = ctx.time_ms(lambda: a @ b, rep_ms=300)
    tflops = 2 * n**3 / (ms * 1e-3) / 1e12
    ctx.shared["matmul_tflops"] = tflops
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": tflops, "kernel_ms": ctx.kernel_ms(lambda: a @ b)}


def section_patch_sentence_correctness(ctx: Context) -> dict:
    """triton (and chunked) on the device vs a float64 grid on the CPU: scores and both gradients with a
    random upstream gradient; fp32 to 1e-5 of scale; bf16 within 2x of torch's own bf16 grid (on the
    device); one-direction modes; deterministic backward bitwise equal; atomic backward close to it."""
    torch = ctx.torch

    def fused(impl, **kw):
        return lambda p, s, sm, pm, d: patch_sentence_scores(p, s, sm, pm, directions=d, impl=impl, **kw)

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


def section_compiled_kernels(ctx: Context) -> dict:
    """What the GPU actually compiled for the kernels run so far (registers, spills, shared memory, warps),
    next to the static compile's committed record of the same kernels, so the two can be related."""
    found = []
    ps_kernels = ("_patch_sentence_fwd_kernel", "_patch_sentence_fwd_v3_kernel", "_patch_sentence_bwd_kernel",
                  "_patch_sentence_prep_kernel", "_patch_sentence_weights_kernel", "_patch_sentence_grad_epilogue_kernel")
    for module, kernels in ((ps_launch, ps_kernels),
                            (mask_kernels, ("_integrity_mask_fwd_kernel", "_integrity_mask_bwd_kernel"))):
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
    static_path = harness.RESULTS / "kernel_static.json"
    static = []
    if static_path.exists():
        arch = None
        if ctx.device.type == "cuda":
            major, minor = ctx.torch.cuda.get_device_capability(ctx.device)
            arch = f"sm_{major}{minor}"
        data = json.loads(static_path.read_text())
        for r in static_records.unpack(data):
            shape = r.get("shape", {})
            if r.get("compiled") and r["arch"] == arch and r["dtype"] == "bf16" and shape.get("K") in (98, 196) \
                    and shape.get("S") == 16 and shape.get("D") == 512 and shape.get("G") in (128, 1024):
                static.append({k: r.get(k) for k in ("kernel", "mode", "shape", "config", "registers", "spill_bytes",
                                                     "shared_bytes", "blocks_per_sm", "tensor_core_sass")})
    return {"compiled_here": found, "static_records": static}


# Which model record a measured provider is: (impl, normalize).
MODELLED = {"triton_train": ("fused", True), "triton": ("fused", False), "triton_train_v2": ("fused_v2", True),
            "triton_v2": ("fused_v2", False), "naive": ("naive", False),
            "naive_bf16": ("naive_bf16", False), "compiled": ("compiled", False), "lik": ("lik", False),
            "flash_maxsim": ("flash_maxsim", False)}
DTYPE_KEYS = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def compare(model: list, measured: list, card: str) -> list:
    """Measured rows beside the model's record of the same impl, mode, card, shape and dtype: call time against
    the prediction at each L2 assumption, kernel-only time against the CUDA-graph prediction."""
    index = {(m["impl"], m["mode"], m["card"], m["B"], m["G"], m["K"], m["S"], m["D"], m["dtype"], m["normalize"]): m
             for m in model}
    rows = []
    for r in measured:
        if "ms" not in r or r.get("provider") not in MODELLED:
            continue
        impl, normalize = MODELLED[r["provider"]]
        mode = "fwd+bwd" if r["mode"] == "full" else r["mode"]
        pred = index.get((impl, mode, card, r["B"], r["G"], r["K"], r["S"], r["D"], DTYPE_KEYS.get(r["dtype"]), normalize))
        if pred is None:
            continue
        by_l2 = {x["assumption"]: x["predicted_s"] * 1e6 for x in pred["by_l2"]}
        measured_us = r["ms"] * 1e3
        rows.append(dict(provider=r["provider"], impl=impl, normalize=normalize, mode=mode,
                         **{k: r[k] for k in "BGKSD"}, measured_us=measured_us,
                         measured_kernel_us=None if r.get("kernel_ms") is None else r["kernel_ms"] * 1e3,
                         predicted_us=by_l2, predicted_kernel_us=pred["kernel_s"] * 1e6,
                         measured_over_middle=measured_us / by_l2["middle"],
                         closest_l2_assumption=min(by_l2, key=lambda k: abs(by_l2[k] - measured_us)),
                         model_kind=pred["model"]))
    return rows


def section_model_vs_measurement(ctx: Context) -> dict:
    """The performance model's predictions (``results/perf_model.json``) beside this run's measurements of the
    same shapes (peers and wider benchmark), and the measured L2 / HBM read rates beside the model's band: the
    first GPU run calibrates the model."""
    path = harness.RESULTS / "perf_model.json"
    if not path.exists():
        return {"skipped": f"{path.name} not found"}
    data = json.loads(path.read_text())
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    # H200: the H100's SMs and clocks with more HBM bandwidth; PCIe and NVL parts have fewer SMs or lower clocks
    card = "A100" if "A100" in name else "H100"
    measured = ctx.shared.get("peer_rows", []) + ctx.shared.get("bench_rows", [])
    rows = compare(data["records"], measured, card)
    for row in rows:
        print(f"  model vs measured: {row['provider']:12s} {row['mode']:7s} {row['B']}x{row['G']} K{row['K']} D{row['D']}: "
              f"predicted {row['predicted_us']['middle']:.1f} us, measured {row['measured_us']:.1f} us", flush=True)
    assumed = next((c for c in data["cards"] if c["name"] == card), {})
    measured_l2 = ctx.shared.get("l2_bandwidth", {})
    return {"device": name, "model_card": card, "rows": rows,
            "l2_band_tbs": {"model": assumed.get("l2_band"), "measured": measured_l2.get("l2_read_tbs")},
            "hbm_tbs": {"model": assumed.get("hbm_tbs"), "measured": measured_l2.get("hbm_read_tbs")},
            "l2_port_bytes_per_clock": {"model": assumed.get("l2_port_bytes_per_clk"),
                                        "measured": measured_l2.get("per_sm_l2_bytes_per_clock")}}


def section_integrity_mask(ctx: Context) -> dict:
    """Integrity-scored masking on CUDA: correctness, no host sync, timings vs argsort + gather and copy."""
    if ctx.device.type != "cuda":
        return {"skipped": "CUDA only (the CPU dry run covers the patch-sentence sections)"}
    out: dict = {}
    gpu_integrity_mask.gpu_section_integrity_mask(out)
    return out["integrity_mask"]
