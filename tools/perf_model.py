"""Performance MODEL (not a measurement) of the patch-sentence op and its peers on H100 and A100, built from the
compiled code.

    python -m tools.perf_model           # benchmarks/results/kernel_static.json -> benchmarks/results/perf_model.json
    python -m tools.perf_model --print   # also prints the tables

Every number this script writes is a prediction from published peak rates, stated assumptions (``Card``) and the
static compile records of ``tools/kernel_static``; ``tools/gpu_check`` measures the same shapes on a real card and
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
replay). The fused op's launches: ``perf_model_fused.py``; cards, assumptions and the issue model:
``perf_model_hw.py``; baselines (naive, naive_bf16, compiled, lik, flash_maxsim): ``perf_model_peers.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from benchmarks import harness
from tools import perf_model_peers as peers_model
from tools.kernel_static.records import unpack
from tools.perf_model_fused import BWD_KERNEL, FWD_KERNEL, fused_op, index_static
from tools.perf_model_hw import CARDS, L2_LABELS, PIPE_CLOCKS, Card

STATIC_JSON = harness.RESULTS / "kernel_static.json"
MODEL_JSON = harness.RESULTS / "perf_model.json"
# the records' "model" field names the tool (tools/perf_model.py) as it did under benchmarks/
LABEL = "perf_model.py: a prediction, not a measurement"

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
    parser = argparse.ArgumentParser(prog="python -m tools.perf_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--static", type=Path, default=STATIC_JSON)
    parser.add_argument("--out", type=Path, default=MODEL_JSON)
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args(argv)
    if not args.static.exists():
        print(f"error: {args.static} not found: run python -m tools.kernel_static --json {args.static} first",
              file=sys.stderr)
        return 2
    raw = json.loads(args.static.read_text())
    static = unpack(raw)
    if any("pipes" not in lp for r in static if r.get("kernel") in (FWD_KERNEL, BWD_KERNEL) for lp in r.get("loops", [])):
        print(f"error: {args.static} predates the per-pipe loop counts: regenerate it with "
              "python -m tools.kernel_static --json", file=sys.stderr)
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

