"""Performance MODEL (not a measurement) of the patch-sentence op on H100 and A100, built from the compiled code.

    python benchmarks/perf_model.py                 # reads results/kernel_static.json, writes results/perf_model.json
    python benchmarks/perf_model.py --print         # also prints the table

Every number this script writes is a prediction from published peak rates, a stated L2 bandwidth assumption
and the static compile records of ``kernel_static.py``; ``gpu_check.py`` measures the same shapes on a real card
and prints model and measurement side by side, and the measurement replaces the model wherever both exist.

Fused kernels. For each launch the static JSON gives the tile shape (constexprs), the grid, the resident
blocks per SM and the SASS of every loop. Per tile (one step of the loop that holds the tensor-core dot):

- tensor time: the dot's issued FLOPs (padding included) at the card's dense peak (fp32 kernels: at the
  fp32 FMA peak);
- issue time: instructions per warp of that loop body (the inner D loop counted once per D chunk) times the
  warps of a block, at four warp-instructions per cycle per SM;
- a block overlaps its own dots with its own reductions only across blocks: with one resident block per SM the
  two add up, with two or more the longer one wins;
- L2 time: the operand bytes each tile streams (no reuse across tiles is assumed inside the SM), at the
  assumed L2 bandwidth; HBM time: the unique bytes of inputs, indices and outputs at the HBM bandwidth.

The op's time is the largest of (compute over the waves of blocks, L2, HBM) plus a fixed launch cost per
kernel. Naive path: the reference (``mlip_fast.reference.patch_sentence``): the grid GEMM at the attainable
matmul rate plus every byte its elementwise passes move over the B*G*K*S grid (counted from its code below).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

RESULTS = HERE / "results"
STATIC_JSON = RESULTS / "kernel_static.json"
MODEL_JSON = RESULTS / "perf_model.json"


@dataclass(frozen=True)
class Card:
    """Published figures (dense, no sparsity) and the model's assumptions, per card."""

    name: str
    arch: str  # the static records' arch
    sm_count: int
    bf16_tflops: float  # dense tensor-core peak
    fp32_tflops: float  # FMA peak (no tensor cores)
    hbm_tbs: float
    l2_tbs: float  # ASSUMPTION: L2 -> SM read bandwidth (not published; microbenchmarks report 2-3x HBM)
    attainable: float  # ASSUMPTION: share of the peak a large plain GEMM reaches (H100: 790 of 989 TF/s)
    launch_us: float = 4.0  # ASSUMPTION: per kernel launch and tail


CARDS = (
    Card("H100", "sm_90", 132, 989.4, 66.9, 3.35, 7.0, 0.80),
    Card("A100", "sm_80", 108, 312.0, 19.5, 2.04, 4.5, 0.85),
)
ISSUE_PER_CYCLE = 4  # warp-instructions per SM per cycle (four schedulers)

# The shapes PERF.md and the kernel issues judge: B x G, K, S, D.
SHAPES = (
    dict(B=128, G=128, K=98, S=16, D=512),
    dict(B=128, G=1024, K=98, S=16, D=512),
    dict(B=128, G=128, K=196, S=16, D=512),
    dict(B=128, G=1024, K=196, S=16, D=512),
    dict(B=128, G=128, K=196, S=16, D=256),
    dict(B=512, G=512, K=196, S=16, D=256),
    dict(B=32, G=32, K=196, S=16, D=256),
)
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def clock_ghz(card: Card) -> float:
    """SM clock implied by the dense peak: 4096 bf16 FLOP per cycle per SM on sm_90, 2048 on sm_80."""
    per_sm = 4096 if card.arch == "sm_90" else 2048
    return card.bf16_tflops * 1e12 / (card.sm_count * per_sm) / 1e9


def tile_loop(rec: dict) -> tuple:
    """(tile loop, its innermost dot loop or None): the loop that issues one tile's dot and reductions."""
    loops = rec["loops"]
    tc_loops = [lp for lp in loops if lp["tensor_core"] > 0 or lp["innermost"]]
    if not tc_loops:
        return None, None
    inner = min((lp for lp in loops if lp["innermost"]), key=lambda lp: lp["instructions"], default=None)
    enclosing = [lp for lp in loops if lp is not inner and lp["start"] <= inner["start"] and inner["end"] <= lp["end"]]
    if not enclosing:  # the dot is issued once per iteration of the innermost loop itself
        return inner, None
    return min(enclosing, key=lambda lp: lp["instructions"]), inner


def _find(static: list, kernel: str, arch: str, dtype: str, shape: dict, mode: str) -> list:
    out = []
    for r in static:
        if r.get("kernel") != kernel or r["arch"] != arch or r["dtype"] != dtype or r["mode"] != mode:
            continue
        s = r["shape"]
        if s.get("directions", "both") == "both" and all(s.get(k) == v for k, v in shape.items()):
            out.append(r)
    return out


def fused_kernel_time(rec: dict, card: Card, shape: dict, dtype: str, side: str = "fwd") -> dict:
    """Predicted seconds of one fused-kernel launch from its static record (side: fwd, patches, sentences)."""
    cfg, ghz = rec["config"], clock_ghz(card)
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = DTYPE_BYTES[dtype]
    warps = cfg.get("num_warps", 4)
    blocks = rec["programs"]
    if side == "fwd":
        bm, bn, bd = cfg["GB"] * cfg["S_CH"], cfg["BN"], cfg["BD"]
        tiles = math.ceil(G / cfg["GB"]) * B * math.ceil(S / cfg["S_CH"]) * math.ceil(K / bn)
        d_iters = math.ceil(D / bd)
        d_pad = d_iters * bd
        l2_bytes = tiles * (bm + bn) * D * eb
        hbm_bytes = (B * K + G * S) * D * eb + B * G * (K + S) * 2 + 2 * B * G * 4
    else:  # a backward side: every (row block, D block) walks all the steps of the other side
        bm, bn, dc = cfg["XB"] * cfg["RB"], cfg["YB"] * cfg["CB"], cfg["DC"]
        if side == "patches":
            steps = math.ceil(G / cfg["YB"]) * math.ceil(S / cfg["CB"])
        else:
            steps = math.ceil(B / cfg["YB"]) * math.ceil(K / cfg["CB"])
        tiles = rec["grid"][0] * rec["grid"][1] * steps
        d_iters, d_pad = 1, dc
        own_rows = B * K if side == "patches" else G * S
        l2_bytes = tiles * (bn * dc * eb + bm * bn // 4)  # other rows + compact index / weight loads
        hbm_bytes = (B * K + G * S) * D * eb + own_rows * D * 4 * (2 if rec["grid"][2] > 1 else 1) + B * G * (K + S) * 2
    flops_issued = tiles * bm * bn * d_pad * 2
    peak = (card.bf16_tflops if dtype != "fp32" else card.fp32_tflops) * 1e12
    t_mma_tile = bm * bn * d_pad * 2 / (peak / card.sm_count)  # one tile's dot on one SM's tensor cores
    loop, inner = tile_loop(rec)
    if loop is None:
        issue_instr = 0
    elif inner is None:
        issue_instr = loop["instructions"]
    else:
        issue_instr = loop["instructions"] - inner["instructions"] + inner["instructions"] * d_iters
    t_issue_tile = warps * issue_instr / ISSUE_PER_CYCLE / (ghz * 1e9)
    resident = max(1, rec["blocks_per_sm"])
    if dtype == "fp32":  # the FMA dot is itself issued instructions, already in the count
        t_tile = t_issue_tile
    elif resident >= 2:  # one block's reductions run while another block's dots occupy the tensor cores
        t_tile = max(t_mma_tile, t_issue_tile)
    else:
        t_tile = t_mma_tile + t_issue_tile
    tiles_per_block = tiles / max(blocks, 1)
    t_compute = math.ceil(blocks / card.sm_count) * tiles_per_block * t_tile
    t_l2 = l2_bytes / (card.l2_tbs * 1e12)
    t_hbm = hbm_bytes / (card.hbm_tbs * 1e12)
    t = max(t_compute, t_l2, t_hbm) + card.launch_us * 1e-6
    bound = max((("compute", t_compute), ("l2", t_l2), ("hbm", t_hbm)), key=lambda kv: kv[1])[0]
    return dict(seconds=t, t_compute=t_compute, t_l2=t_l2, t_hbm=t_hbm, flops_issued=flops_issued,
                l2_bytes=l2_bytes, hbm_bytes=hbm_bytes, tiles=tiles, blocks=blocks, blocks_per_sm=resident,
                registers=rec["registers"], issue_instructions_per_tile_warp=issue_instr,
                t_mma_tile_us=t_mma_tile * 1e6, t_issue_tile_us=t_issue_tile * 1e6, bound=bound)


def naive_time(mode: str, card: Card, shape: dict, dtype: str) -> dict:
    """The reference's fwd / bwd: grid GEMM(s) at the attainable rate plus its elementwise grid traffic.

    Forward (counted from ``reference/patch_sentence.py``), N = B*G*K*S grid elements: einsum writes N in the
    input dtype; ``.to(fp32)`` reads it and writes 4N bytes; per direction ``masked_fill`` reads and writes
    the fp32 grid and ``max`` reads it: 2 x 12N. Backward: per direction the max's gradient scatters into a
    zeroed fp32 grid (write 4N) and ``masked_fill``'s backward reads and writes it (8N); the two are summed
    (read 8N, write 4N), cast back (read 4N, write eb*N) and the einsum backward's two GEMMs read it (2 eb*N).
    """
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = DTYPE_BYTES[dtype]
    n = B * G * K * S
    gemm_flops = 2 * B * G * K * S * D
    rate = (card.bf16_tflops if dtype != "fp32" else card.fp32_tflops) * 1e12 * card.attainable
    if mode == "fwd":
        nbytes, flops, launches = eb * n + (eb + 4) * n + 2 * 12 * n, gemm_flops, 8
    else:
        nbytes, flops, launches = 2 * 12 * n + 12 * n + (4 + eb) * n + 2 * eb * n, 2 * gemm_flops, 10
    t = flops / rate + nbytes / (card.hbm_tbs * 1e12) + launches * card.launch_us * 1e-6
    return dict(seconds=t, grid_bytes=nbytes, flops_issued=flops, bound="hbm")


def build(static: list) -> list:
    records = []
    for card in CARDS:
        for shape in SHAPES:
            for dtype in ("bf16",):
                useful = 2 * shape["B"] * shape["G"] * shape["K"] * shape["S"] * shape["D"]
                peak = card.bf16_tflops * 1e12
                fused = {}
                fwd = _find(static, "_patch_sentence_fwd_kernel", card.arch, dtype, shape, "fwd")
                bwd = _find(static, "_patch_sentence_bwd_kernel", card.arch, dtype, shape, "bwd")
                if fwd and all("loops" in r for r in fwd):
                    fused["fwd"] = fused_kernel_time(fwd[0], card, shape, dtype, "fwd")
                if len(bwd) == 2 and all("loops" in r for r in bwd):  # launch order: patch side, sentence side
                    sides = [fused_kernel_time(r, card, shape, dtype, side) for r, side in zip(bwd, ("patches", "sentences"))]
                    fused["bwd"] = dict(seconds=sum(x["seconds"] for x in sides), sides=sides,
                                        bound="+".join(x["bound"] for x in sides))
                if "fwd" in fused and "bwd" in fused:
                    fused["fwd+bwd"] = dict(seconds=fused["fwd"]["seconds"] + fused["bwd"]["seconds"])
                naive = {m: naive_time(m, card, shape, dtype) for m in ("fwd", "bwd")}
                naive["fwd+bwd"] = dict(seconds=naive["fwd"]["seconds"] + naive["bwd"]["seconds"])
                for impl, modes in (("fused", fused), ("naive", naive)):
                    for mode, pred in modes.items():
                        work = useful * (1 if mode == "fwd" else 2 if mode == "bwd" else 3)
                        rec = dict(impl=impl, mode=mode, card=card.name, **shape, dtype=dtype,
                                   predicted_s=pred["seconds"], fraction_of_peak=work / pred["seconds"] / peak,
                                   fraction_of_attainable=work / pred["seconds"] / (peak * card.attainable),
                                   useful_flops=work, model="perf_model.py (prediction, not a measurement)")
                        rec.update({k: v for k, v in pred.items() if k not in ("seconds", "sides")})
                        if "sides" in pred:
                            rec["sides"] = [{k: v for k, v in sd.items()} for sd in pred["sides"]]
                        records.append(rec)
                # The training loss before one call per loss: an i2t call and a t2i call, each over the full
                # grid (as fused kernels with one direction each, which cost the same dots).
                if "fwd+bwd" in fused:
                    records.append(dict(impl="fused", mode="loss_local_two_calls", card=card.name, **shape, dtype=dtype,
                                        predicted_s=2 * fused["fwd+bwd"]["seconds"],
                                        fraction_of_peak=3 * useful / (2 * fused["fwd+bwd"]["seconds"]) / peak,
                                        model="perf_model.py (prediction): the loss before one call per loss"))
                    records.append(dict(impl="fused", mode="loss_local_one_call", card=card.name, **shape, dtype=dtype,
                                        predicted_s=fused["fwd+bwd"]["seconds"],
                                        fraction_of_peak=3 * useful / fused["fwd+bwd"]["seconds"] / peak,
                                        model="perf_model.py (prediction): one both-directions call per loss"))
    return records


def summary_rows(records: list) -> list:
    rows = []
    index = {(r["impl"], r["mode"], r["card"], r["B"], r["G"], r["K"], r["S"], r["D"]): r for r in records}
    for r in records:
        if r["impl"] != "fused" or r["mode"] not in ("fwd", "bwd", "fwd+bwd"):
            continue
        naive = index.get(("naive", r["mode"], r["card"], r["B"], r["G"], r["K"], r["S"], r["D"]))
        rows.append(dict(
            card=r["card"], shape=f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']} {r['dtype']}", mode=r["mode"],
            fused_us=round(r["predicted_s"] * 1e6, 1), naive_us=round(naive["predicted_s"] * 1e6, 1) if naive else None,
            speedup=round(naive["predicted_s"] / r["predicted_s"], 2) if naive else None,
            pct_of_peak=round(100 * r["fraction_of_peak"], 1),
            pct_of_attainable=round(100 * r.get("fraction_of_attainable", float("nan")), 1),
            bound=r.get("bound", ""),
        ))
    return rows


def table_markdown(data: dict) -> str:
    rows = summary_rows(data["records"])
    lines = [
        f"**perf_model.json**: a MODEL, not a measurement (published peaks; assumed L2 bandwidth "
        + ", ".join(f"{c['name']} {c['l2_tbs']} TB/s" for c in data["cards"])
        + "; issue cycles from the static compile); replaced by `gpu_check.py` measurements when a GPU run exists",
        "",
        "| card | shape | mode | fused us | naive us | naive / fused | % of dense peak | % of attainable GEMM | bound |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r['card']} | {r['shape']} | {r['mode']} | {r['fused_us']} | {r['naive_us']} | {r['speedup']} | "
                     f"{r['pct_of_peak']} | {r['pct_of_attainable']} | {r['bound']} |")
    two = {(r["card"], r["B"], r["G"], r["K"], r["D"]): r for r in data["records"] if r["mode"] == "loss_local_two_calls"}
    one = {(r["card"], r["B"], r["G"], r["K"], r["D"]): r for r in data["records"] if r["mode"] == "loss_local_one_call"}
    if one:
        lines += ["", "Local loss per step (fwd + bwd of the scores): two one-direction calls (before) vs one call:", "",
                  "| card | shape | two calls us | one call us |", "| --- | --- | --- | --- |"]
        for key, r in one.items():
            lines.append(f"| {key[0]} | {key[1]}x{key[2]} K{key[3]} D{key[4]} | {round(two[key]['predicted_s'] * 1e6, 1)} | "
                         f"{round(r['predicted_s'] * 1e6, 1)} |")
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

    static = json.loads(args.static.read_text())
    records = build(kernel_static.unpack(static))
    data = {"model": "prediction from published peaks, stated assumptions and the static compile; not a measurement",
            "static_source": str(args.static.name), "static_environment": static.get("environment"),
            "cards": [c.__dict__ for c in CARDS], "records": records}
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}: {len(records)} records")
    if args.print:
        print(table_markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
