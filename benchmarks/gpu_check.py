"""One-command GPU check: correctness on real CUDA, the op against its peers, the calibration runs of the
performance model and the op inside a training step, written to one JSON file.

    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR          # on a CUDA machine: inside 12 min on an H100
    PYTHONPATH=. python benchmarks/gpu_check.py --out DIR --dry-run  # CPU, Triton interpreter, tiny shapes

Needs only torch and triton (no network, no deepspeed); late-interaction-kernels and flash-maxsim are timed when
installed and skipped with the reason otherwise. Writes ``DIR/gpu_<card>.json`` (``cpu_dry_run.json`` for a dry
run) after every section, so a crash or a timeout keeps what was measured. Each section is a function in
``SECTIONS``, run in order, cheapest and most informative first: the card (exact variant, clocks and power
sampled for the whole run), the bf16 matmul rate, L2 / HBM read bandwidth, correctness, the persistent sm_90
forward against the kernel it replaced (``gpu_v3.py``), the op against its peers (``gpu_peers.py``), the op's share
of a training step (``gpu_train.py``), the calibration sweeps (``gpu_calibration.py``), the wider benchmark, then
the largest batch (the optimal-transport op, ``gpu_ot.py``, after the integrity mask). Each section records its
wall time and the clocks and power over it; a failing section records its traceback and the others still run.

Time budget (``--budget-s``, default 630 s, so the whole run with start-up and the last measurement's overrun
ends inside 12 minutes on one H100): a section does not start with less than its ``MIN_START`` left (recorded as
skipped with the reason), and the sweeps inside sections stop at the budget; the free sections (environment,
model vs measurement, compiled kernels) always run. The clocks and power of each section are attached at the
end of the run, from nvidia-smi's timestamped samples. To add a section, write ``def section_<name>(ctx) -> dict``
and add it to ``SECTIONS``.

Timing follows PERF.md: ``triton.testing.do_bench`` (warm-up first, median), fresh random inputs rotated over
several sets so L2 is not what is measured, value checks off in timed regions; kernel-only times are the sum of
the GPU kernels' durations under ``torch.profiler`` per call. Memory is the ``torch.cuda.max_memory_allocated``
delta over one step (inputs allocated before). Every number is recorded with the card, driver, torch and
triton versions.
"""
from __future__ import annotations

import argparse
import importlib
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

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402

import gpu_calibration  # noqa: E402
import gpu_env  # noqa: E402
import gpu_ot  # noqa: E402
import gpu_peers  # noqa: E402
import gpu_train  # noqa: E402
import gpu_v3  # noqa: E402
import harness  # noqa: E402

DEFAULT_BUDGET_S = 630.0
MIN_START_S = 20.0  # seconds a section needs left to start; longer for the sections that cannot stop midway
MIN_START = {"patch_sentence_correctness": 60.0, "forward_v3": 30.0, "peers": 60.0, "train_step": 45.0, "integrity_mask": 40.0,
             "patch_sentence_ot": 40.0}


class Context:
    """What every section gets: device, dry-run flag, time budget, timing and memory helpers, shared results."""

    def __init__(self, dry_run: bool, budget_s: float = DEFAULT_BUDGET_S, sampler=None):
        self.torch = torch
        self.dry_run = dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shared: dict = {}
        self.sampler = sampler
        self.budget_s = budget_s
        self.started = time.perf_counter()

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def out_of_time(self, need_s: float = 0.0) -> bool:
        """Whether the run's budget leaves less than ``need_s`` seconds."""
        return self.left_s() < need_s

    def time_ms(self, fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
        """Median milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        if not self.dry_run:
            fn()
        times = []
        for _ in range(1 if self.dry_run else 3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def kernel_profile(self, fn, match: str = None) -> dict:
        """Per call of ``fn()`` under ``torch.profiler`` (three calls after a warm-up; one in a dry run): the
        summed durations of its GPU kernels (memsets and copies included) and of those whose name contains
        ``match``; on CPU (dry run) the ops' self CPU time."""
        iters = 1 if self.dry_run else 3
        if not self.dry_run:
            fn()
        cuda = self.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                fn()
            if cuda:
                torch.cuda.synchronize(self.device)
        if cuda:
            spans = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
            if not spans:  # kernels attached to the ops that launched them
                spans = [(k.name, k.duration) for e in prof.events() for k in getattr(e, "kernels", [])]
        else:
            spans = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
        total = sum(us for _, us in spans) / 1e3 / iters
        matched = None if match is None else sum(us for name, us in spans if match in name) / 1e3 / iters
        return {"total_ms": total, "matched_ms": matched}

    def kernel_ms(self, fn) -> float:
        """Kernel-only milliseconds of one ``fn()`` (see :meth:`kernel_profile`)."""
        return self.kernel_profile(fn)["total_ms"]

    def peak_bytes(self, fn):
        """Peak bytes allocated over ``fn()`` beyond what was allocated before (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        return harness.cuda_peak_memory(fn, self.device)

    def sm_clock_hz(self):
        """The SM clock sampled over the last 30 s (None without samples)."""
        if self.sampler is None:
            return None
        now = time.time()
        clocks = self.sampler.window(now - 30, now).get("sm_mhz")
        return clocks["median"] * 1e6 if clocks else None


# ------------------------------------------------------------------------------------------------ sections


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
    from mlip_fast.ops import patch_sentence_scores
    from mlip_fast.testing.patch_sentence import CASES, grid_scores, make_case, rel_err, run

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
    for module_name, kernels in (("mlip_fast.kernels.patch_sentence.launch", ps_kernels),
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
        import kernel_static  # triton compiler internals: a triton without them costs this section only

        data = json.loads(static_path.read_text())
        for r in kernel_static.unpack(data):
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
    path = HERE / "results" / "perf_model.json"
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
    import gpu_integrity_mask

    out: dict = {}
    gpu_integrity_mask.gpu_section_integrity_mask(out)
    return out["integrity_mask"]


SECTIONS = [
    section_environment,
    section_matmul_rate,
    gpu_calibration.section_l2_bandwidth,
    section_patch_sentence_correctness,
    gpu_v3.section_forward_v3,
    gpu_peers.section_peers,
    gpu_train.section_train_step,
    gpu_calibration.section_d_sweep,
    gpu_calibration.section_direction_sweep,
    gpu_calibration.section_bwd_split_sweep,
    gpu_train.section_loss_local,
    gpu_calibration.section_patch_sentence_fwd_config_sweep,
    gpu_calibration.section_patch_sentence_bwd_config_sweep,
    gpu_peers.section_patch_sentence_benchmark,
    section_integrity_mask,
    gpu_ot.section_patch_sentence_ot,
    section_model_vs_measurement,
    section_compiled_kernels,
    gpu_train.section_train_step_max_batch,
]
FREE = {"environment", "model_vs_measurement", "compiled_kernels"}  # cheap: run whatever the budget says


# ---------------------------------------------------------------------------------------------------- main


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _table(result: dict) -> list:
    """Rows for the README table: every provider of the peers section and triton vs naive at the wider shapes."""
    rows = []
    for section in ("peers", "patch_sentence_benchmark"):
        for r in result.get("sections", {}).get(section, {}).get("result", {}).get("rows", []):
            if "ms" in r and (section == "peers" or r["provider"] in ("naive", "chunked", "triton")):
                rows.append({"shape": f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']} {r['dtype']}",
                             "provider": r["provider"], "mode": r["mode"], "ms": r["ms"], "kernel_ms": r.get("kernel_ms"),
                             "TFLOP/s": r["tflops"],
                             "op_MiB_full": None if r.get("op_bytes_full") is None else r["op_bytes_full"] / 2**20})
    return rows


def _write(path: Path, result: dict, ctx: Context) -> None:
    result["table"] = _table(result)
    result["wall_seconds"] = round(time.perf_counter() - ctx.started, 2)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def _key(section) -> str:
    return section.__name__.removeprefix("section_")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CUDA correctness sweep and benchmark for mlip_fast's fused ops")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_<card>.json")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes; on CPU through the Triton interpreter")
    parser.add_argument("--sections", nargs="*", help="run only these sections (names without 'section_')")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds for the sections; later ones are skipped once spent (default: %(default)s)")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available():
        if not args.dry_run:
            parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
        # Must be set before the first kernel module import (read when @triton.jit decorates).
        os.environ["TRITON_INTERPRET"] = "1"
    sampler = None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        sampler = gpu_env.ClockSampler(index)
    ctx = Context(args.dry_run, args.budget_s, sampler)
    name = "cpu_dry_run" if ctx.device.type == "cpu" else "gpu_" + _slug(torch.cuda.get_device_name(ctx.device))
    if args.dry_run and ctx.device.type == "cuda":
        name += "_dry_run"
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{name}.json"
    result = {"script": "benchmarks/gpu_check.py", "dry_run": args.dry_run, "budget_s": args.budget_s, "sections": {}}
    wanted = set(args.sections or [])
    windows = {}
    try:
        for section in SECTIONS:
            key = _key(section)
            if wanted and key not in wanted:
                continue
            t0, wall0 = time.perf_counter(), time.time()
            if key not in FREE and ctx.out_of_time(MIN_START.get(key, MIN_START_S)):
                entry = {"ok": True, "skipped": f"time budget spent ({ctx.budget_s - ctx.left_s():.0f} of {ctx.budget_s:.0f} s)"}
            else:
                try:
                    entry = {"ok": True, "result": section(ctx)}
                    if isinstance(entry["result"], dict) and entry["result"].get("ok") is False:
                        entry["ok"] = False
                except Exception:
                    entry = {"ok": False, "error": traceback.format_exc()[-4000:]}
            entry["seconds"] = round(time.perf_counter() - t0, 2)
            windows[key] = (wall0, time.time())
            result["sections"][key] = entry
            if key == "environment" and entry["ok"]:
                result["environment"] = entry["result"]
            _write(path, result, ctx)
            status = "skipped" if "skipped" in entry else ("ok" if entry["ok"] else "FAILED")
            print(f"[{entry['seconds']:7.1f}s] {key}: {status}", flush=True)
    finally:
        if sampler is not None:
            sampler.stop()
            for key, (w0, w1) in windows.items():
                result["sections"][key]["clocks"] = sampler.window(w0, w1)
            result["clocks_whole_run"] = sampler.window(0, time.time())
            _write(path, result, ctx)
    print(f"wrote {path}")
    return 0 if all(e["ok"] for e in result["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
