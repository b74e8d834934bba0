"""GPU check, the op against its peers: timings of the patch-sentence scores op and of what a user would run
instead, side by side in one process on one card.

- :func:`section_peers` (PERF.md's shapes: B=128, G=128 and 1024, K=98 and 196, S=16, D=512, bf16): our Triton
  op on the training path (``normalize=True``) and on raw inputs, each with the dispatch's forward (v3 on sm_90)
  and with the forward it replaced forced (``*_v2``), chunked, the "dense dSim + two cuBLAS GEMMs"
  backward (chunked with one tile holding the whole grid: the grid, its dense gradient and two GEMMs), and every
  peer of ``benchmarks/peers.py`` (torch.compile of the reference with max-autotune, the eager bf16 grid,
  late-interaction-kernels and flash-maxsim with one call per direction). Each provider's output is checked
  against the fp32 reference first (``peers.check_peer``): a wrong provider is recorded with its error and not
  timed; a missing one is skipped with the reason. The section starts no measurement after ``SECTION_CAP_S``
  (the compiled peer, which autotunes its GEMMs at each new shape, only with ``COMPILE_S`` left), so the later
  sections keep their share of the run's budget; the compiled backward keeps its saved buffers (no buffer
  donation) so that it can also run alone on a kept graph.
- :func:`section_patch_sentence_benchmark`: reference grid vs chunked vs triton over the wider shape list of
  the model (B up to 512, D 256 and 512) and PERF.md's targets evaluated on it.

Per provider and mode (fwd, bwd alone on a kept graph, fwd+bwd): the call time (``triton.testing.do_bench``:
warm-up, median; three input sets rotated so L2 does not hold the inputs) and the kernel-only time (the sum of
the GPU kernels' durations under ``torch.profiler``, per call), TFLOP/s, % of the measured bf16 matmul rate and
the peak memory of fwd+bwd. Value checks are off (``mlip_fast._checks.VALUE_CHECKS = False``) in every timed
region, so no timing includes a host synchronisation of ours.
"""
from __future__ import annotations

import time

import torch

from benchmarks import peers
from benchmarks.bench_patch_sentence import flops, make_inputs
from mlip_fast import _checks
from mlip_fast.kernels.patch_sentence import launch as ps_launch
from mlip_fast.ops import patch_sentence_scores
from mlip_fast.ops.patch_sentence import ScoresOptions
from mlip_fast.ops.patch_sentence.chunked import patch_sentence_scores_chunked

N_INPUT_SETS = 3
PEER_SHAPES = [(128, 128, 98, 16, 512), (128, 1024, 98, 16, 512), (128, 128, 196, 16, 512), (128, 1024, 196, 16, 512)]
DRY_PEER_SHAPES = [(4, 6, 5, 3, 32)]
DENSE_TILE = 2**62  # one chunked tile holds the whole grid
SECTION_CAP_S = 300.0  # the peers section starts no measurement after this, so later sections keep their time
COMPILE_S = 150.0  # time left needed to start the compiled peer at a new shape (max-autotune: 3 graphs)


def _forward(kernel: str, fn):
    """``fn`` with the op's forward kernel forced (the backward is the same): v3 against the kernel it replaced."""
    def run(p, s, m):
        ps_launch.FORWARD_OVERRIDE = kernel
        try:
            return fn(p, s, m)
        finally:
            ps_launch.FORWARD_OVERRIDE = None

    return run


OWN = {  # name -> fn(patches, sentences, sentence_mask) -> (i2t, t2i); the triton ones run the dispatch's forward
    "triton_train": lambda p, s, m: patch_sentence_scores(p, s, m, normalize=True, impl="triton"),
    "triton": lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton"),
    "triton_train_v2": _forward("v2", lambda p, s, m: patch_sentence_scores(p, s, m, normalize=True, impl="triton")),
    "triton_v2": _forward("v2", lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton")),
    "chunked": lambda p, s, m: patch_sentence_scores(p, s, m, impl="chunked"),
    "dense_dsim": lambda p, s, m: patch_sentence_scores_chunked(p, s, m, None, ScoresOptions(), tile_elements=DENSE_TILE),
}


def input_sets(ctx) -> int:
    """Input sets rotated through the timed calls (one in a dry run: the interpreter is slow, L2 is not the point)."""
    return 1 if ctx.dry_run else N_INPUT_SETS


class Rotation:
    """Input sets used in turn by every timed call."""

    def __init__(self, sets: list):
        self.sets, self.i = sets, 0

    def next(self):
        self.i = (self.i + 1) % len(self.sets)
        return self.sets[self.i]


def measure(ctx, fn, rot: Rotation, backward: bool = True) -> dict:
    """{mode: {ms, kernel_ms} or {error}} for fwd, full and bwd (alone, on kept graphs), and the peak bytes of one
    full step. Each mode is measured on its own: a provider whose backward cannot run again on a kept graph
    (CUDA-graph trees of a compiled function may refuse) still gets its fwd and full times."""
    def fwd():
        p, s, m, _, _ = rot.next()
        return fn(p, s, m)

    def full():
        p, s, m, gi, gt = rot.next()
        i2t, t2i = fn(p, s, m)
        return torch.autograd.grad((i2t * gi).sum() + (t2i * gt).sum(), (p, s))

    def bwd_alone():
        graphs = []
        for p, s, m, gi, gt in rot.sets:
            i2t, t2i = fn(p, s, m)
            graphs.append(((i2t * gi).sum() + (t2i * gt).sum(), p, s))
        kept = Rotation(graphs)

        def bwd():
            loss, p, s = kept.next()
            return torch.autograd.grad(loss, (p, s), retain_graph=True)

        return ctx.time_ms(bwd), ctx.kernel_ms(bwd)

    fwd()  # compiles, autotuning and lazy initialisation stay outside every timing
    out = {"fwd": {"ms": ctx.time_ms(fwd), "kernel_ms": ctx.kernel_ms(fwd)}}
    if backward:
        full()
        out["full"] = {"ms": ctx.time_ms(full), "kernel_ms": ctx.kernel_ms(full)}
        out["peak_bytes_full"] = ctx.peak_bytes(full)
        try:
            ms, kernel_ms = bwd_alone()
            out["bwd"] = {"ms": ms, "kernel_ms": kernel_ms}
        except Exception as err:  # noqa: BLE001
            out["bwd"] = {"error": f"{type(err).__name__}: {err}"[:300]}
    return out


def _rows(ctx, shape: dict, provider: str, res: dict, dtype_bytes: int) -> list:
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    rate = ctx.shared.get("matmul_tflops")
    peak = res.get("peak_bytes_full")
    grads = (B * K + G * S) * D * dtype_bytes
    rows = []
    for mode in ("fwd", "bwd", "full"):
        if mode not in res:
            continue
        if "error" in res[mode]:
            rows.append(dict(shape, provider=provider, mode=mode, error=res[mode]["error"]))
            continue
        ms = res[mode]["ms"]
        rows.append(dict(shape, provider=provider, mode=mode, ms=ms, kernel_ms=res[mode]["kernel_ms"],
                         tflops=flops(B, G, K, S, D, mode) / ms / 1e9,
                         pct_of_matmul_rate=100 * flops(B, G, K, S, D, mode) / ms / 1e9 / rate if rate else None,
                         peak_bytes_full=peak, op_bytes_full=None if peak is None else max(peak - grads, 0)))
    return rows


def section_peers(ctx) -> dict:
    """Our op (training path and raw), chunked, the dense-dSim backward and every peer, at PERF.md's shapes."""
    dtype = "float32" if ctx.dry_run else "bfloat16"
    skipped = {n: why for n in peers.PEERS if (why := peers.unavailable(n, ctx.device)) is not None}
    built = {**OWN, **{n: peers.build(n, ctx.device) for n in peers.PEERS if n not in skipped}}
    checks_were = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False
    try:
        # the compiled backward also runs alone on a kept graph, so it must not donate its saved buffers
        with torch._functorch.config.patch(donated_buffer=False):
            rows, checks = _peer_rows(ctx, built, dtype)
    finally:
        _checks.VALUE_CHECKS = checks_were
    ctx.shared["peer_rows"] = rows
    return {"rows": rows, "checks": checks, "skipped": skipped, "versus": versus(rows)}


def _peer_rows(ctx, built: dict, dtype: str) -> tuple:
    """(timing rows, output checks) of every provider at every shape, within the section's and the run's time."""
    rows, checks = [], []
    rtol = 1e-4 if dtype == "float32" else 2e-2
    stop_at = time.perf_counter() + SECTION_CAP_S
    for B, G, K, S, D in DRY_PEER_SHAPES if ctx.dry_run else PEER_SHAPES:
        shape = dict(B=B, G=G, K=K, S=S, D=D, dtype=dtype)
        rot = Rotation([make_inputs(B, G, K, S, D, dtype, str(ctx.device), seed=i) for i in range(input_sets(ctx))])
        for name, fn in built.items():
            need = COMPILE_S if name == "compiled" else 0.0
            if ctx.out_of_time(need) or time.perf_counter() + need > stop_at:
                rows.append(dict(shape, provider=name, skipped="time budget spent"))
                continue
            try:
                p, s, m, _, _ = rot.sets[0]
                check = peers.check_peer(fn, p, s, m, rtol)
                checks.append(dict(shape, provider=name, **check))
                if not check["ok"]:
                    rows.append(dict(shape, provider=name, wrong=f"max relative error {check['max_rel_err']:.3g}"))
                    continue
                backward = name in OWN or peers.PEERS[name].backward
                rows += _rows(ctx, shape, name, measure(ctx, fn, rot, backward), getattr(torch, dtype).itemsize)
            except Exception as err:  # noqa: BLE001 - e.g. a peer out of memory at G=1024
                rows.append(dict(shape, provider=name, error=f"{type(err).__name__}: {err}"[:500]))
            finally:
                if ctx.device.type == "cuda":
                    torch.cuda.empty_cache()
        del rot
    return rows, checks


def versus(rows: list) -> list:
    """Per shape: the training path's time against every other provider's (other / ours > 1: ours faster), and
    its bwd / fwd, by call time and by kernel-only time."""
    out = []
    timed = [r for r in rows if "ms" in r]
    for r in timed:
        if r["provider"] != "triton_train":
            continue
        same = [o for o in timed if o["mode"] == r["mode"] and all(o[k] == r[k] for k in "BGKSD")]
        row = dict(B=r["B"], G=r["G"], K=r["K"], S=r["S"], D=r["D"], mode=r["mode"],
                   other_over_ours={o["provider"]: o["ms"] / r["ms"] for o in same if o["provider"] != "triton_train"})
        if r["mode"] == "bwd":
            fwd = next((o for o in timed if o["provider"] == "triton_train" and o["mode"] == "fwd"
                        and all(o[k] == r[k] for k in "BGKSD")), None)
            if fwd:
                row["bwd_over_fwd"] = r["ms"] / fwd["ms"]
                if r["kernel_ms"] and fwd["kernel_ms"]:
                    row["bwd_over_fwd_kernel_only"] = r["kernel_ms"] / fwd["kernel_ms"]
        out.append(row)
    return out


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
BENCH_PROVIDERS = {
    "naive": lambda p, s, m: patch_sentence_scores(p, s, m, impl="reference"),
    "chunked": lambda p, s, m: patch_sentence_scores_chunked(p, s, m, None, ScoresOptions(), tile_elements=2**24),
    "triton": lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton"),
    "triton_deterministic": lambda p, s, m: patch_sentence_scores(p, s, m, impl="triton", deterministic=True),
}


def section_patch_sentence_benchmark(ctx) -> dict:
    """naive (reference grid) vs chunked (tiles of 2**24 elements) vs triton, fwd / bwd / full, bf16 inputs, over
    the model's shapes; the plain grid matmul; PERF.md's targets."""
    dev, dtype = ctx.device, ("float32" if ctx.dry_run else "bfloat16")
    rows = []
    checks_were = _checks.VALUE_CHECKS
    _checks.VALUE_CHECKS = False
    try:
        for B, G, K, S, D in DRY_SHAPES if ctx.dry_run else BENCH_SHAPES:
            shape = dict(B=B, G=G, K=K, S=S, D=D, dtype=dtype)
            rot = Rotation([make_inputs(B, G, K, S, D, dtype, str(dev), seed=i) for i in range(input_sets(ctx))])
            # The plain matmul producing the [B*K, G*S] grid: the floor the fused forward should match.
            mats = Rotation([(x[0].detach().reshape(B * K, D), x[1].detach().reshape(G * S, D)) for x in rot.sets])

            def grid_matmul():
                a, b = mats.next()
                return a @ b.T

            grid_ms = ctx.time_ms(grid_matmul)
            rows.append(dict(shape, provider="grid_matmul", mode="fwd", ms=grid_ms, kernel_ms=ctx.kernel_ms(grid_matmul),
                             tflops=flops(B, G, K, S, D, "fwd") / grid_ms / 1e9))
            ref_out = None
            for name, fn in BENCH_PROVIDERS.items():
                if ctx.out_of_time():
                    rows.append(dict(shape, provider=name, skipped="time budget spent"))
                    continue
                try:
                    out = fn(*[t.detach() for t in rot.sets[0][:2]], rot.sets[0][2])
                    ref_out = out if name == "naive" else ref_out
                    diff = None if ref_out is None else max(float((o - r).abs().max()) for o, r in zip(out, ref_out))
                    for row in _rows(ctx, shape, name, measure(ctx, fn, rot), getattr(torch, dtype).itemsize):
                        rows.append(dict(row, max_abs_diff_vs_naive=diff))
                except Exception as err:  # e.g. the naive grid running out of memory at the largest shapes
                    rows.append(dict(shape, provider=name, error=f"{type(err).__name__}: {err}"[:500]))
                finally:
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            del rot, mats
    finally:
        _checks.VALUE_CHECKS = checks_were
    ctx.shared["bench_rows"] = rows
    return {"rows": rows, "targets": targets(rows)}


def targets(rows) -> dict:
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
    out["fwd_pct_of_bf16_matmul_128x1024_d512 (>= 50)"] = t and t.get("pct_of_matmul_rate")
    out["fwd_time_over_grid_matmul_128x1024_d512 (<= 1)"] = ratio(t, get("grid_matmul", "fwd", **wide))
    for B, K in ((128, 196), (128, 98)):
        s = dict(B=B, G=B, K=K, D=256)
        out[f"naive_over_fused_fwd_B{B}_K{K}_d256 (>= 3)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
        out[f"naive_over_fused_full_B{B}_K{K}_d256 (>= 3)"] = ratio(get("naive", "full", **s), get("triton", "full", **s))
        out[f"bwd_over_fwd_B{B}_K{K}_d256 (<= 2.0)"] = ratio(get("triton", "bwd", **s), get("triton", "fwd", **s))
        out[f"naive_over_fused_op_memory_B{B}_K{K}_d256 (>= 150)"] = ratio(
            get("naive", "full", **s), get("triton", "full", **s), key="op_bytes_full"
        )
    s = dict(B=512, G=512, K=196, D=256)
    out["naive_over_fused_fwd_B512_d256 (>= 4)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
    s = dict(B=32, G=32, K=196, D=256)
    out["naive_over_fused_fwd_B32_d256 (>= 1)"] = ratio(get("naive", "fwd", **s), get("triton", "fwd", **s))
    return out
