"""The fused op's part of the performance MODEL (``perf_model.py``; not a measurement): each launch of the fused
op timed from its static compile record (tile, grid, resident blocks, the SASS loop's instructions per pipe), and
the op's launches as the launchers ran them in the static sweep, side kernels included (see ``perf_model.py``'s
docstring for the per-tile model).
"""
from __future__ import annotations

import json
import math

from tools import perf_model_peers as peers_model
from tools.perf_model_hw import Card, add_mix, clock_hz, issue_cycles, mix, tile_loop

FWD_KERNEL, BWD_KERNEL = "_patch_sentence_fwd_kernel", "_patch_sentence_bwd_kernel"
V3_KERNEL = "_patch_sentence_fwd_v3_kernel"
PREP_KERNEL, WEIGHTS_KERNEL = "_patch_sentence_prep_kernel", "_patch_sentence_weights_kernel"
EPILOGUE_KERNEL = "_patch_sentence_grad_epilogue_kernel"
PS_KERNELS = (FWD_KERNEL, V3_KERNEL, BWD_KERNEL, PREP_KERNEL, WEIGHTS_KERNEL, EPILOGUE_KERNEL)


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
