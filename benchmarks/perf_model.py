"""Performance MODEL (not a measurement) of the patch-sentence op and its peers on H100 and A100, built from the
compiled code.

    python benchmarks/perf_model.py                 # reads results/kernel_static.json, writes results/perf_model.json
    python benchmarks/perf_model.py --print         # also prints the tables

Every number this script writes is a prediction from published peak rates, stated assumptions (``Card``) and the
static compile records of ``kernel_static.py``; ``gpu_check.py`` measures the same shapes on a real card and
prints model and measurement side by side; the measurement replaces the model wherever both exist.

Fused kernels. Per launch the static JSON gives the tile (constexprs), the grid, the resident blocks per SM and
every SASS loop with its instructions per execution pipe. Per tile (one step of the loop that holds the dot):

- MMA: the dot's issued FLOPs (padding included) at one SM's share of the dense bf16 or TF32 peak; fp32 IEEE
  dots are FFMA instructions and count on the fp32 pipe instead;
- issue: the loop's instructions (the inner D loop once per D chunk) limited by the busiest of the issue slot
  (one warp-instruction per clock per scheduler), the pipes (per scheduler: fp32 1 clock on sm_90 and 2 on
  sm_80, IMAD 2 on the same pipe, ALU ops such as FMNMX / FSEL / SEL / ISETP / LOP3 2, MUFU / conversions 8)
  and the L1 / shared-memory data path (128 bytes per clock per SM: shuffles, shared and global accesses);
- streaming: the operand bytes of the tile from L2 at one SM's L2 port (64 bytes per clock, an assumption);
- forward: the D loop overlaps its MMA, its issue and its stream; the epilogue (max, argmax, means) follows
  the last MMA of the tile and the next tile's first loads follow the epilogue, so one block pays
  latency + D loop + epilogue per tile; backward: the block of M is built, then multiplied (the SASS waits on
  every wgmma), while the next step's rows stream in.

Blocks: the busiest SM runs ceil(grid / SMs) blocks, ``min(resident, that)`` at a time, so overlap between
blocks comes from the actual grid, not the occupancy limit. Co-resident blocks share the tensor cores, the
pipes and the L2 port; each block still pays its own serial chain. The kernel takes the largest of that,
its L2 bytes at the L2 bandwidth (a band: pessimistic / middle / optimistic, verdicts at each) and its unique
HBM bytes at the HBM bandwidth. The op adds its side kernels, counted from the launchers: valid counts,
inverse norms, the backward's weights, zero fills, split sums, casts and the normalisation epilogue, each
kernel paying the card's launch cost (``launch_us`` in an eager stream, ``graph_launch_us`` under CUDA-graph
replay). Cards, assumptions and the issue model: ``perf_model_hw.py``; baselines (naive, naive_bf16,
compiled, lik, flash_maxsim): ``perf_model_peers.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import perf_model_peers as peers_model  # noqa: E402
from perf_model_hw import CARDS, L2_LABELS, PIPE_CLOCKS, Card, add_mix, clock_hz, issue_cycles, mix, tile_loop  # noqa: E402

RESULTS = HERE / "results"
STATIC_JSON = RESULTS / "kernel_static.json"
MODEL_JSON = RESULTS / "perf_model.json"
LABEL = "perf_model.py: a prediction, not a measurement"
FWD_KERNEL, BWD_KERNEL = "_patch_sentence_fwd_kernel", "_patch_sentence_bwd_kernel"
V3_KERNEL = "_patch_sentence_fwd_v3_kernel"
PREP_KERNEL, WEIGHTS_KERNEL = "_patch_sentence_prep_kernel", "_patch_sentence_weights_kernel"
EPILOGUE_KERNEL = "_patch_sentence_grad_epilogue_kernel"
PS_KERNELS = (FWD_KERNEL, V3_KERNEL, BWD_KERNEL, PREP_KERNEL, WEIGHTS_KERNEL, EPILOGUE_KERNEL)

# The shapes PERF.md and the kernel issues judge: B x G, K, S, D. PERF_SHAPES also get the normalised
# (training) path and its peers; the rest the raw op.
PERF_SHAPES = tuple(dict(B=128, G=G, K=K, S=16, D=512) for G in (128, 1024) for K in (98, 196))
SHAPES = PERF_SHAPES + (
    dict(B=128, G=128, K=196, S=16, D=256),
    dict(B=512, G=512, K=196, S=16, D=256),
    dict(B=32, G=32, K=196, S=16, D=256),
)
# (dtype, normalize): the fused variants; "tf32" = fp32 inputs with precision="tf32" (normalised, as a fp32
# training run that opts in); ("bf16", True) is the TRAINING PATH (what a bf16 run hands the op).
FUSED_VARIANTS = (("fp32", False), ("bf16", False), ("fp32", True), ("tf32", True), ("bf16", True))
PEER_VARIANTS = {"naive": ("fp32", "tf32", "bf16"), "naive_bf16": ("bf16",), "compiled": ("fp32", "tf32", "bf16"),
                 "lik": ("bf16",), "flash_maxsim": ("bf16",)}
NOT_MODELLED = {"lik": "fp32 / tf32 inputs not modelled (bf16 is what the peers train in)",
                "flash_maxsim": "fp32 / tf32 inputs not modelled (the kernel computes in fp16 whatever the input)"}


# ------------------------------------------------------------------------------------------- fused kernels


def fused_kernel_time(rec: dict, card: Card, shape: dict, side: str, l2_tbs: float) -> dict:
    """Predicted seconds of one fused-kernel launch from its static record (side: fwd, patches, sentences)."""
    cfg, hz = rec["config"], clock_hz(card)
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    half = rec["dtype"] in ("bf16", "fp16")
    eb = 2 if half else 4
    warps, blocks = cfg.get("num_warps", 4), rec["programs"]
    if side == "fwd_v3":
        return _v3_kernel_time(rec, card, shape, l2_tbs)
    if side == "fwd":
        bm, bn, bd = cfg["GB"] * cfg["S_CH"], cfg["BN"], cfg["BD"]
        tiles = math.ceil(G / cfg["GB"]) * B * math.ceil(S / cfg["S_CH"]) * math.ceil(K / bn)
        d_iters = math.ceil(D / bd)
        k_dot = d_iters * bd
        stream = (bm + bn) * D * eb
        hbm = (B * K + G * S) * D * eb + B * G * (K + S) * 2 + 2 * B * G * 4
    else:  # a backward side: every (row block, D block) walks all the steps of the other side
        xb, rb, yb, cb, dc = (cfg[k] for k in ("XB", "RB", "YB", "CB", "DC"))
        bm, bn, k_dot = xb * rb, yb * cb, dc  # [BM, BN] block of M times [BN, DC] other rows
        steps = math.ceil(G / yb) * math.ceil(S / cb) if side == "patches" else math.ceil(B / yb) * math.ceil(K / cb)
        tiles = rec["grid"][0] * rec["grid"][1] * steps
        d_iters = 1
        stream = bn * dc * eb + 2 * (xb * rb * yb + xb * yb * cb) + 8 * xb * yb + (4 * yb * cb if cfg["NORMALIZE"] else 0)
        own = B * K if side == "patches" else G * S
        out_bytes = 4 if (cfg["USE_ATOMIC"] or rec["grid"][2] > 1 or cfg["NORMALIZE"]) else eb
        hbm = (B * K + G * S) * D * eb + own * D * out_bytes * rec["grid"][2] + B * G * (K + S) * 2
    flops_tile = bm * bn * k_dot * 2
    precision = cfg.get("PRECISION", "ieee")
    tensor = card.bf16_tflops if half else (card.tf32_tflops if precision == "tf32" else None)
    t_mma = flops_tile / (tensor * 1e12 / card.sm_count) if tensor else 0.0
    loop, inner = tile_loop(rec)
    if inner is None:
        epi, dloop = mix(loop), ({}, 0)
    else:
        epi, dloop = mix(loop, minus=inner), mix(inner, d_iters)
    epi_c, epi_limit = issue_cycles(epi, warps, card.arch)
    dl_c, dl_limit = issue_cycles(dloop, warps, card.arch)
    t_stream = stream / (card.l2_port_bytes_per_clk * hz)
    t_lat = card.l2_latency_cycles / hz
    if side == "fwd":
        chain = t_lat + max(t_mma, dl_c / hz, t_stream) + epi_c / hz
        per_block = 0.0
    else:
        chain = max(t_mma + epi_c / hz, t_stream)
        per_block = t_lat
    per_sm = math.ceil(blocks / card.sm_count)
    resident = max(1, min(rec["blocks_per_sm"], per_sm))
    tiles_per_block = tiles / blocks
    limits = {}

    def round_time(r: int) -> float:
        both = issue_cycles(add_mix(epi, dloop), warps * r, card.arch)
        per_tile = {"serial chain (one block: MMA, issue and epilogue in turn)": chain, "tensor cores": r * t_mma,
                    f"pipes ({both[1]})": both[0] / hz, "L2 port": r * t_stream}
        name = max(per_tile, key=per_tile.get)
        limits[r] = name
        return tiles_per_block * per_tile[name] + per_block

    full, rest = divmod(per_sm, resident)
    t_compute = full * round_time(resident) + (round_time(rest) if rest else 0.0)
    l2_bytes = tiles * stream
    t_l2 = l2_bytes / (l2_tbs * 1e12)
    t_hbm = hbm / (card.hbm_tbs * 1e12)
    t = max(t_compute, t_l2, t_hbm)
    bound = max((("compute: " + limits[resident], t_compute), ("l2", t_l2), ("hbm", t_hbm)), key=lambda kv: kv[1])[0]
    return dict(seconds=t, t_compute=t_compute, t_l2=t_l2, t_hbm=t_hbm, flops_issued=tiles * flops_tile,
                l2_bytes=l2_bytes, hbm_bytes=hbm, tiles=tiles, blocks=blocks, blocks_per_sm=rec["blocks_per_sm"],
                co_resident=resident, registers=rec["registers"], warps=warps, t_mma_tile_us=t_mma * 1e6,
                t_epilogue_tile_us=epi_c / hz * 1e6, epilogue_limit=epi_limit, t_dloop_tile_us=dl_c / hz * 1e6,
                dloop_limit=dl_limit, t_stream_tile_us=t_stream * 1e6, bound=bound, kernel_name=rec["kernel"],
                l2_bytes_per_tile=stream, issue_cycles_per_tile=epi_c + dl_c)


def _v3_kernel_time(rec: dict, card: Card, shape: dict, l2_tbs: float) -> dict:
    """The persistent forward (``forward_v3.py``): each program loads its sentence block once (latency and bytes
    paid once), then per patch tile the MMA and the reduction run in turn (the same warps issue both) while the
    next tiles stream in through the shared-memory ring: per tile max(MMA + issue of the tile loop, stream). The
    tile loop is the SASS loop that holds the dot (no inner D loop: D is one or two wgmma chains)."""
    cfg, hz = rec["config"], clock_hz(card)
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = 2 if rec["dtype"] in ("bf16", "fp16") else 4
    warps, programs = cfg.get("num_warps", 4), rec["programs"]
    bm, bn, k_dot = cfg["GB"] * cfg["S_CH"], cfg["BN"], cfg["NUM_DC"] * cfg["DC"]
    n_rb, n_ct = math.ceil(G / cfg["GB"]), math.ceil(K / bn)
    imgs = math.ceil(B / (programs // n_rb))  # images of the busiest program
    tiles = n_rb * B * n_ct
    flops_tile = 2 * bm * bn * k_dot
    t_mma = flops_tile / (card.bf16_tflops * 1e12 / card.sm_count)
    loop, _ = tile_loop(rec)
    epi_c, epi_limit = issue_cycles(mix(loop), warps, card.arch)
    port = card.l2_port_bytes_per_clk * hz
    t_stream = bn * D * eb / port
    per_tile = max(t_mma + epi_c / hz, t_stream)
    name = "serial chain (one block: MMA then reduction, next tiles prefetched)" if per_tile > t_stream else "L2 port"
    resident = max(1, min(rec["blocks_per_sm"], math.ceil(programs / card.sm_count)))
    rounds = math.ceil(programs / (card.sm_count * resident))
    start = card.l2_latency_cycles / hz + bm * D * eb / port  # the sentence block and the first tile's latency
    t_compute = rounds * (start + imgs * n_ct * per_tile)
    l2_bytes = tiles * bn * D * eb + programs * bm * D * eb
    hbm = (B * K + G * S) * D * eb + B * G * (K + S) * 2 + 2 * B * G * 4
    t_l2, t_hbm = l2_bytes / (l2_tbs * 1e12), hbm / (card.hbm_tbs * 1e12)
    t = max(t_compute, t_l2, t_hbm)
    bound = max((("compute: " + name, t_compute), ("l2", t_l2), ("hbm", t_hbm)), key=lambda kv: kv[1])[0]
    return dict(seconds=t, t_compute=t_compute, t_l2=t_l2, t_hbm=t_hbm, flops_issued=tiles * flops_tile,
                l2_bytes=l2_bytes, hbm_bytes=hbm, tiles=tiles, blocks=programs, blocks_per_sm=rec["blocks_per_sm"],
                co_resident=resident, registers=rec["registers"], warps=warps, t_mma_tile_us=t_mma * 1e6,
                t_epilogue_tile_us=epi_c / hz * 1e6, epilogue_limit=epi_limit, t_dloop_tile_us=0.0, dloop_limit="",
                t_stream_tile_us=t_stream * 1e6, bound=bound, kernel_name=V3_KERNEL,
                l2_bytes_per_tile=l2_bytes / tiles, issue_cycles_per_tile=epi_c)


def static_shape(shape: dict, dtype: str, normalize: bool, kernel: str = None) -> dict:
    """The static sweep's shape key of a model case (``kernel``: a forced forward kernel)."""
    out = dict(shape, directions="both")
    if normalize:
        out["normalize"] = True
    if dtype == "tf32":
        out["precision"] = "tf32"
    if kernel:
        out["kernel"] = kernel
    return out


def find_static(index: dict, card: Card, dtype: str, shape: dict, normalize: bool, mode: str,
                kernel: str = None) -> list:
    """The launches of one case in launch order (prep, forward / weights, backward sides, epilogues)."""
    key = (card.arch, "fp32" if dtype == "tf32" else dtype, mode,
           json.dumps(static_shape(shape, dtype, normalize, kernel), sort_keys=True))
    return index.get(key, [])


def index_static(static: list) -> dict:
    index: dict = {}
    for r in static:
        if r.get("kernel") in PS_KERNELS and r.get("compiled"):
            key = (r["arch"], r["dtype"], r["mode"], json.dumps(r["shape"], sort_keys=True))
            index.setdefault(key, []).append(r)
    return index


def fused_op(index: dict, card: Card, shape: dict, dtype: str, normalize: bool, l2_tbs: float,
             forward: str = None) -> dict:
    """{mode: prediction} of the fused op, launch by launch as the launchers ran them in the static sweep
    (``forward="v2"``: the forward with the kernel v3 replaced on sm_90); {} when the sweep has no record."""
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = peers_model.DTYPE_BYTES[dtype]
    fwd = find_static(index, card, dtype, shape, normalize, "fwd", forward)
    bwd = find_static(index, card, dtype, shape, normalize, "bwd")
    mains = [r for r in fwd if r["kernel"] in (FWD_KERNEL, V3_KERNEL)]
    if len(mains) != 1 or len([r for r in bwd if r["kernel"] == BWD_KERNEL]) != 2:
        return {}
    tl = peers_model.Timeline(card)
    for rec in fwd:
        if rec["kernel"] == PREP_KERNEL:  # counts from the masks, inverse norms (reads the inputs), key limits
            norms = (B * K + G * S) * (D * eb + 4) if normalize else 0
            limits = B * K * 4 if rec["config"]["LIMITS"] else 0
            tl.passes("prep (counts, inverse norms, limits)", (B * K + G * S) * 1 + norms + limits, 1)
        else:
            main = fused_kernel_time(rec, card, shape, "fwd_v3" if rec["kernel"] == V3_KERNEL else "fwd", l2_tbs)
            tl.add("forward kernel" + (" v3" if rec["kernel"] == V3_KERNEL else ""), main["seconds"])
    out = {"fwd": dict(tl.result(), kernel=main)}
    tl = peers_model.Timeline(card)
    sides = []
    own_elems = iter((B * K * D, G * S * D))
    side_names = iter(("patches", "sentences"))
    for rec in bwd:
        if rec["kernel"] == WEIGHTS_KERNEL:  # both directions' weights from the upstream gradients and the masks
            tl.passes("weights (counts, division)", 4 * B * G * 4 + B * K + G * S, 1)
        elif rec["kernel"] == BWD_KERNEL:
            side, own = next(side_names), next(own_elems)
            split, atomic = rec["grid"][2], rec["config"]["USE_ATOMIC"]
            if atomic:
                tl.passes("zero fill (atomic split)", own * 4, 1)
            pred = fused_kernel_time(rec, card, shape, side, l2_tbs)
            sides.append(dict(pred, side=side, split=split, atomic=atomic))
            tl.add(f"backward kernel, {side}", pred["seconds"])
        elif rec["kernel"] == EPILOGUE_KERNEL:  # split sum, normalisation map, cast: one read, one write
            parts = rec["config"]["SPLIT"]
            tl.passes("gradient epilogue", own * (4 * parts + eb + (eb if rec["config"]["NORMALIZE"] else 0)), 1)
    out["bwd"] = dict(tl.result(), sides=sides)
    return out


# ------------------------------------------------------------------------------------------- records


def _record(impl: str, mode: str, card: Card, shape: dict, dtype: str, normalize: bool, by_l2: list) -> dict:
    useful = 2 * shape["B"] * shape["G"] * shape["K"] * shape["S"] * shape["D"] * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
    peak = peers_model.matmul_peak(card, dtype)
    middle = by_l2[1]["pred"]
    rec = dict(impl=impl, mode=mode, card=card.name, **shape, dtype=dtype, normalize=normalize,
               training_path=impl == "fused" and dtype == "bf16" and normalize,
               forward_kernel=middle["kernel"]["kernel_name"] if "kernel" in middle else None,
               predicted_s=middle["seconds"], kernel_s=middle["kernel_seconds"], launches=middle["launches"],
               fraction_of_peak=useful / middle["seconds"] / peak, useful_flops=useful,
               model=LABEL + "; " + middle.get("model_kind", "kernels from the static compile, side kernels counted"),
               by_l2=[dict(l2_tbs=x["l2_tbs"], assumption=x["label"], predicted_s=x["pred"]["seconds"],
                           kernel_s=x["pred"]["kernel_seconds"], fraction_of_peak=useful / x["pred"]["seconds"] / peak,
                           bound=x["pred"].get("bound", _bound_of(x["pred"]))) for x in by_l2])
    rec["parts"] = {k: round(v["seconds"] * 1e6, 2) for k, v in middle.get("parts", {}).items()}
    for k in ("kernel", "sides"):
        if k in middle:
            rec[k] = middle[k]
    return rec


def _bound_of(pred: dict) -> str:
    if "kernel" in pred:
        return pred["kernel"]["bound"]
    return " + ".join(s["bound"] for s in pred.get("sides", [])) or "?"


def _sum(a: dict, b: dict) -> dict:
    return dict(seconds=a["seconds"] + b["seconds"], kernel_seconds=a["kernel_seconds"] + b["kernel_seconds"],
                launches=a["launches"] + b["launches"], model_kind=a.get("model_kind", ""),
                bound=a.get("bound", _bound_of(a)) + " | " + b.get("bound", _bound_of(b)))


def build(static: list) -> list:
    index = index_static(static)
    records = []
    for card in CARDS:
        for shape in SHAPES:
            variants = [("fused", d, n) for d, n in FUSED_VARIANTS]
            variants += [(impl, d, False) for impl, ds in PEER_VARIANTS.items() for d in ds]
            if shape in PERF_SHAPES:
                variants += [(impl, d, True) for impl, ds in PEER_VARIANTS.items() for d in ds]
                # the forward v3 replaced (forced in the static sweep): before / after in one model run
                variants += [("fused_v2", "bf16", n) for n in (False, True)]
            for impl, dtype, normalize in variants:
                if impl == "fused" and normalize and shape not in PERF_SHAPES:
                    continue
                per_l2 = []
                for l2, label in zip(card.l2_band, L2_LABELS):
                    if impl in ("fused", "fused_v2"):
                        modes = fused_op(index, card, shape, dtype, normalize, l2, "v2" if impl == "fused_v2" else None)
                    elif impl in ("lik", "flash_maxsim"):
                        modes = {m: peers_model.maxsim_model(impl, m, card, l2, shape, dtype, normalize) for m in ("fwd", "bwd")}
                    else:
                        modes = {m: peers_model.grid_model(impl, m, card, shape, dtype, normalize) for m in ("fwd", "bwd")}
                    if not modes:
                        break
                    modes["fwd+bwd"] = _sum(modes["fwd"], modes["bwd"])
                    per_l2.append((l2, label, modes))
                if not per_l2:
                    continue
                for mode in ("fwd", "bwd", "fwd+bwd"):
                    by_l2 = [dict(l2_tbs=l2, label=label, pred=modes[mode]) for l2, label, modes in per_l2]
                    records.append(_record(impl, mode, card, shape, dtype, normalize, by_l2))
    return records


def verdicts(records: list) -> list:
    """PERF.md's targets for the bf16 fused op (training path and raw) at each L2 assumption."""
    idx = {(r["impl"], r["mode"], r["card"], r["B"], r["G"], r["K"], r["S"], r["D"], r["dtype"], r["normalize"]): r
           for r in records}
    out = []
    for r in records:
        if r["impl"] != "fused" or r["mode"] != "fwd" or r["dtype"] != "bf16" or not any(
                all(r[k] == s[k] for k in "BGKSD") for s in PERF_SHAPES):
            continue
        key = lambda impl, mode: idx.get((impl, mode, r["card"], r["B"], r["G"], r["K"], r["S"], r["D"], "bf16", r["normalize"]))  # noqa: E731
        bwd, full = key("fused", "bwd"), key("fused", "fwd+bwd")
        checks = [("fwd % of dense bf16 peak (>= 50 middle, >= 40 pessimistic)",
                   [100 * x["fraction_of_peak"] for x in r["by_l2"]], lambda v, i: v >= (40 if i == 0 else 50)),
                  ("bwd / fwd (<= 2.0)", [b["predicted_s"] / f["predicted_s"] for b, f in zip(bwd["by_l2"], r["by_l2"])],
                   lambda v, i: v <= 2.0)]
        for peer, mode, goal in (("compiled", "fwd", 2.0), ("lik", "fwd", 1.5), ("compiled", "fwd+bwd", 2.0)):
            other, mine = key(peer, mode), (r if mode == "fwd" else full)
            checks.append((f"{peer} / fused {mode} (>= {goal})",
                           [o["predicted_s"] / m["predicted_s"] for o, m in zip(other["by_l2"], mine["by_l2"])],
                           lambda v, i, goal=goal: v >= goal))
        for name, values, ok in checks:
            out.append(dict(card=r["card"], shape=f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']}",
                            path="training (normalize, bf16)" if r["normalize"] else "raw bf16", target=name,
                            values=[round(v, 3) for v in values], met=[bool(ok(v, i)) for i, v in enumerate(values)]))
    return out


# ------------------------------------------------------------------------------------------- tables


def _us(s: float) -> str:
    return f"{s * 1e6:,.0f}" if s >= 1e-4 else f"{s * 1e6:.1f}"


def table_markdown(data: dict) -> str:
    recs = data["records"]
    idx = {(r["impl"], r["mode"], r["card"], r["B"], r["G"], r["K"], r["D"], r["dtype"], r["normalize"]): r for r in recs}
    band = "; ".join(f"{c['name']} " + " / ".join(map(str, c["l2_band"])) + " TB/s" for c in data["cards"])
    lines = [
        f"**perf_model.json**: a MODEL, not a measurement (published peaks; L2 bandwidth band {band}; issue per pipe "
        "from the static compile; side kernels counted; eager launch cost per kernel); replaced by `gpu_check.py` "
        "measurements when a GPU run exists. Peers `lik` and `flash_maxsim` are lower bounds.",
        "",
        "Training path (normalize=True, bf16) and its peers (same inputs), B=128, S=16, D=512: time in us at the "
        "pessimistic / middle / optimistic L2 bandwidth; peer / fused at the middle one.",
        "",
        "| card | G | K | fused fwd us | fused bwd us | bwd / fwd | fwd % of bf16 peak | fwd bound (middle) | "
        "compiled / fused fwd, full | naive_bf16 / fused fwd, full | lik / fused fwd, full | flash_maxsim / fused fwd, full |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in data["cards"]:
        for s in PERF_SHAPES:
            key = lambda impl, mode: idx.get((impl, mode, c["name"], s["B"], s["G"], s["K"], s["D"], "bf16", True))  # noqa: E731
            f, b, full = key("fused", "fwd"), key("fused", "bwd"), key("fused", "fwd+bwd")
            if f is None:
                continue
            row = [c["name"], s["G"], s["K"], " / ".join(_us(x["predicted_s"]) for x in f["by_l2"]),
                   " / ".join(_us(x["predicted_s"]) for x in b["by_l2"]),
                   " / ".join(f"{y['predicted_s'] / x['predicted_s']:.2f}" for x, y in zip(f["by_l2"], b["by_l2"])),
                   " / ".join(f"{100 * x['fraction_of_peak']:.0f}" for x in f["by_l2"]), f["by_l2"][1]["bound"]]
            for peer in ("compiled", "naive_bf16", "lik", "flash_maxsim"):
                pf, pfull = key(peer, "fwd"), key(peer, "fwd+bwd")
                row.append(f"{pf['predicted_s'] / f['predicted_s']:.2f}, {pfull['predicted_s'] / full['predicted_s']:.2f}")
            lines.append("| " + " | ".join(map(str, row)) + " |")
    lines += ["", "Forward kernel v2 (``forward.py``, forced) against v3 (``forward_v3.py``, the launcher's choice on "
              "sm_90 for half inputs), bf16, B=128, S=16, D=512, middle L2 assumption: registers, resident warps per "
              "SM, L2 bytes and issue cycles per tile (tiles differ: v2 128 x 64 x D streaming both operands, v3 "
              "128 x 64 x D streaming the patch tile), forward time, share of the dense bf16 peak, peer / fused forward.",
              "", "| card | path | G | K | kernel | regs | warps/SM | L2 KB/tile | issue clk/tile | MMA us/tile | fwd us "
              "| % peak | compiled / fwd | lik / fwd | flash_maxsim / fwd |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in data["cards"]:
        for normalize in (True, False):
            for s in PERF_SHAPES:
                key = lambda impl: idx.get((impl, "fwd", c["name"], s["B"], s["G"], s["K"], s["D"], "bf16", normalize))  # noqa: E731
                for impl in ("fused_v2", "fused"):
                    r = key(impl)
                    if r is None or "kernel" not in r or (impl == "fused" and r["kernel"] == key("fused_v2")["kernel"]):
                        continue  # (where the dispatch runs v2 itself, its row is the one above)
                    k = r["kernel"]
                    name = "v3" if k["kernel_name"].endswith("_v3_kernel") else "v2"
                    lines.append(
                        f"| {c['name']} | {'training' if normalize else 'raw'} | {s['G']} | {s['K']} | {name} | "
                        f"{k['registers']} | {k['warps'] * k['co_resident']} | {k['l2_bytes_per_tile'] / 1024:.0f} | "
                        f"{k['issue_cycles_per_tile']:,.0f} | {k['t_mma_tile_us']:.2f} | {_us(r['predicted_s'])} | "
                        f"{100 * r['fraction_of_peak']:.0f} | "
                        + " | ".join(f"{key(peer)['predicted_s'] / r['predicted_s']:.2f}"
                                     for peer in ("compiled", "lik", "flash_maxsim")) + " |")
    lines += ["", "Every impl and dtype at B=G=128, K=98, S=16, D=512, raw inputs (normalize=False; fused tf32: "
              "normalised, the only TF32 case compiled), middle L2 assumption: us (kernel-only us under CUDA-graph "
              "replay)", "", "| card | impl | dtype | fwd | bwd | fwd+bwd | fwd % of the dtype's peak |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in data["cards"]:
        for impl in ("fused", "naive", "naive_bf16", "compiled", "lik", "flash_maxsim"):
            for dtype in ("fp32", "tf32", "bf16"):
                key = lambda mode: idx.get((impl, mode, c["name"], 128, 128, 98, 512, dtype, impl == "fused" and dtype == "tf32"))  # noqa: E731
                if key("fwd") is None:
                    continue
                cells = [f"{_us(key(m)['predicted_s'])} ({_us(key(m)['kernel_s'])})" for m in ("fwd", "bwd", "fwd+bwd")]
                lines.append(f"| {c['name']} | {impl} | {dtype} | " + " | ".join(cells)
                             + f" | {100 * key('fwd')['fraction_of_peak']:.0f} |")
    groups: dict = {}
    for v in data["verdicts"]:
        groups.setdefault((v["card"], v["shape"], v["path"]), []).append(v)
    targets = [v["target"] for v in next(iter(groups.values()), [])]
    lines += ["", "PERF.md targets of the bf16 fused op, each at the pessimistic / middle / optimistic L2 assumption "
              "(Y = met, n = not met; lik is a lower bound, so its ratio is a floor):", "",
              "| card | shape | path | " + " | ".join(targets) + " |", "| --- | --- | --- |" + " --- |" * len(targets)]
    for (card, shape, path), vs in groups.items():
        cells = [" / ".join(f"{x:.2f}" if x < 10 else f"{x:.0f}" for x in v["values"]) + " ("
                 + "".join("Y" if m else "n" for m in v["met"]) + ")" for v in vs]
        lines.append(f"| {card} | {shape} | {path} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", type=Path, default=STATIC_JSON)
    parser.add_argument("--out", type=Path, default=MODEL_JSON)
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args(argv)
    if not args.static.exists():
        print(f"error: {args.static} not found: run benchmarks/kernel_static.py --json {args.static} first", file=sys.stderr)
        return 2
    import kernel_static

    raw = json.loads(args.static.read_text())
    static = kernel_static.unpack(raw)
    if any("pipes" not in lp for r in static if r.get("kernel") in (FWD_KERNEL, BWD_KERNEL) for lp in r.get("loops", [])):
        print(f"error: {args.static} predates the per-pipe loop counts: regenerate it with kernel_static.py --json",
              file=sys.stderr)
        return 2
    records = build(static)
    data = {"model": "prediction from published peaks, stated assumptions and the static compile; not a measurement",
            "static_source": args.static.name, "static_environment": raw.get("environment"),
            "cards": [dataclasses.asdict(c) for c in CARDS], "pipe_clocks": PIPE_CLOCKS,
            "not_modelled": NOT_MODELLED, "records": records}
    data["verdicts"] = verdicts(records)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}: {len(records)} records")
    if args.print:
        print(table_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
