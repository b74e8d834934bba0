"""The README's view of a GPU check's JSON (``benchmarks/results/gpu_<card>.json``): the card and what was
measured on it in a few short tables, rendered by :func:`table_markdown` for ``tools.readme_table``. The JSON
keeps every row; this picks what a reader compares:

- the card, its versions and its measured ceilings (bf16 matmul rate, HBM and L2 read bandwidth);
- correctness: the sweep's checks and failures, the deterministic backward, the v3 forward's non-finite and
  tie cases, the optimal-transport op's and the integrity mask's checks;
- the op on the training path (``triton_train``: normalised inputs, the dispatch's forward) against the
  strongest peer that ran on the card (the eager bf16 grid, ``torch.compile`` of the reference with
  max-autotune, the dense-dSim backward), per mode, both as call time and as GPU-kernel time: the gap between
  the two is host time (Python, dispatch, launches) that a small shape does not hide;
- the host side of one call (CPU time, launches, syncs), the op's share of a ViT-B/16 + BERT-base training step, the optimal-transport op and the integrity mask;
- the performance model's predictions against the measurements (measured over predicted, medians).

Pure Python over the JSON: no torch, so the README can be regenerated anywhere.
"""
from __future__ import annotations

import statistics

OURS = "triton_train"  # the op as training calls it
PEERS = {"naive_bf16": "eager bf16 grid", "compiled": "torch.compile grid", "dense_dsim": "dense dSim"}
MODES = {"fwd": "fwd", "bwd": "bwd", "full": "fwd+bwd"}


def _result(data: dict, key: str):
    entry = data.get("sections", {}).get(key, {})
    return entry.get("result") if entry.get("ok") and "result" in entry else None


def _ms(value) -> str:
    return "" if value is None else f"{value:.3g}"


def _table(cols: list, rows: list) -> list:
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _header(name: str, data: dict) -> list:
    env = data.get("environment", {})
    card = env.get("card", {})
    bits = [env.get("device", "?")]
    extra = ", ".join(str(x) for x in (card.get("variant"), card.get("capability"),
                                       env.get("driver") and f"driver {env['driver']}",
                                       env.get("cuda") and f"CUDA {env['cuda']}") if x)
    if extra:
        bits.append(f"({extra})")
    calls = data.get("calls") or [{"command": data.get("script", "python -m tools.gpu_check")}]
    line = (f"**{name}**: {' '.join(bits)}, torch {env.get('torch')}, triton {env.get('triton')}, "
            f"{str(env.get('date', ''))[:10]}; {len(calls)} call(s) of the GPU check: "
            + "; ".join(f"`{c['command']}`" for c in calls) + ".")
    ceilings = []
    mm = _result(data, "matmul_rate")
    if mm:
        ceilings.append(f"bf16 matmul {mm['tflops']:.0f} TFLOP/s (n={mm['n']})")
    bw = _result(data, "l2_bandwidth")
    if bw:
        ceilings.append(f"HBM read {bw['hbm_read_tbs']:.2f} TB/s, L2 read {bw['l2_read_tbs']:.1f} TB/s")
    if ceilings:
        line += " Measured ceilings: " + "; ".join(ceilings) + "."
    return [line, ""]


def _correctness(data: dict) -> list:
    parts = []
    ps = _result(data, "patch_sentence_correctness")
    if ps:
        det = ps.get("determinism", {})
        parts.append(f"patch-sentence op {ps['checks']} checks, {len(ps['failures'])} failures"
                     + (", deterministic backward bitwise equal run to run" if det.get("bitwise_equal") else ""))
    v3 = _result(data, "forward_v3")
    if v3:
        nf = v3.get("non_finite", [])
        ties = v3.get("ties", [])
        parts.append(f"forward v3: {sum(r['same_pattern_as_grid'] for r in nf)} of {len(nf)} non-finite cases as the "
                     f"grid, {sum(r['i2t_first_index'] and r['t2i_first_index'] for r in ties)} of {len(ties)} tie cases "
                     "first index")
    ot = _result(data, "patch_sentence_ot")
    if ot and "correctness" in ot:
        parts.append(f"OT op {ot['correctness']['checks']} checks, {len(ot['correctness']['failures'])} failures")
    im = _result(data, "integrity_mask")
    if im and "correctness" in im:
        cases = [c for c in im["correctness"].values() if isinstance(c, dict)]
        good = sum(all(v for v in c.values() if isinstance(v, bool)) for c in cases)
        parts.append(f"integrity mask {good} of {len(cases)} checks right (indices, gather, weights, backward, seeds, "
                     "inclusion rates, no host sync)")
    return ["Correctness on the card: " + "; ".join(parts) + ".", ""] if parts else []


def _peers(data: dict) -> list:
    res = _result(data, "peers")
    if not res:
        return []
    by = {}
    for r in res.get("rows", []):
        if "ms" in r:
            by[(r["B"], r["G"], r["K"], r["S"], r["D"], r["dtype"], r["mode"], r["provider"])] = r
    shapes = []
    for key in by:
        if key[:7] not in shapes:
            shapes.append(key[:7])
    rows = []
    for shape in shapes:
        ours = by.get(shape + (OURS,))
        if ours is None:
            continue
        peers = {p: by.get(shape + (p,)) for p in PEERS}
        ran = {p: r for p, r in peers.items() if r is not None}
        best = min(ran, key=lambda p: ran[p]["ms"]) if ran else None
        best_k = min(ran, key=lambda p: ran[p]["kernel_ms"]) if ran else None
        b, g, k, s, d, dtype, mode = shape
        rows.append([f"{b}x{g} K{k} S{s} D{d}", MODES.get(mode, mode), f"{_ms(ours['ms'])} ({_ms(ours['kernel_ms'])})"]
                    + [f"{_ms(r['ms'])} ({_ms(r['kernel_ms'])})" if r else "not run" for r in peers.values()]
                    + ([f"{ran[best]['ms'] / ours['ms']:.2f} ({PEERS[best]})",
                        f"{ran[best_k]['kernel_ms'] / ours['kernel_ms']:.2f} ({PEERS[best_k]})"] if best else ["", ""]))
    if not rows:
        return []
    skipped = res.get("skipped", {})
    note = ("The op on the training path (normalised bf16 inputs, both directions) against the peers that ran on the "
            "card, ms per call (GPU-kernel ms in brackets; call time minus kernel time is host time); last two "
            "columns: the fastest peer's time over ours (> 1: ours faster), by call and by kernel time.")
    if skipped:
        note += " Not run: " + "; ".join(f"{k} ({str(v).split(';')[0]})" for k, v in skipped.items()) + "."
    cols = ["B x G, shape", "mode", "ours ms (kernel)"] + [f"{v} ms (kernel)" for v in PEERS.values()] + [
        "peer / ours, call", "peer / ours, kernel"]
    return [note, ""] + _table(cols, rows)


def _host(data: dict) -> list:
    res = _result(data, "host_overhead")
    rows = [r for r in (res or {}).get("rows", []) if "host_ms" in r]
    if not rows:
        return []
    table = [[f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']} {r['dtype']}", r["forward"], r.get("ran") or "",
              r["mode"], _ms(r["host_ms"]), _ms(r["wall_ms"]), _ms(r.get("kernel_ms")), _ms(r.get("launches")),
              "" if r.get("syncs") is None else r["syncs"]] for r in rows]
    return ["Host side of one call on the training path (CPU ms per call issued back to back, wall ms until the "
            "device is done, GPU-kernel ms, kernel launches and host syncs per call; the JSON names the Python "
            "functions with the most own time):", ""] + _table(
        ["shape", "forward asked", "ran", "mode", "host ms", "wall ms", "kernel ms", "launches", "syncs"], table)


def _train_step(data: dict) -> list:
    res = _result(data, "train_step")
    if not res or not res.get("rows"):
        return []
    rows = [[r["impl"], r["config"], r["batch"], r["dtype"], _ms(r["step_ms"]), _ms(r["step_kernel_ms"]),
             _ms(r.get("op_local_ms")), _ms(r.get("op_local_kernel_ms")), r["G_emulated"],
             f"{100 * r['op_share_at_G']:.1f}%", _ms(r.get("step_launches"))] for r in res["rows"] if "step_ms" in r]
    if not rows:
        return []
    cols = ["op impl", "model", "batch", "dtype", "step ms", "step kernel ms", "op ms", "op kernel ms",
            "G emulated", "op share of step at G", "kernel launches per step"]
    return ["One training step (forward, backward, optimizer) of the full model with the op's reference vs Triton "
            "path:", ""] + _table(cols, rows)


def _ot(data: dict) -> list:
    res = _result(data, "patch_sentence_ot")
    if not res or not res.get("rows"):
        return []
    rows = [[r["impl"], f"{r['B']}x{r['G']} K{r['K']} S{r['S']} D{r['D']}", r["n_iter"], r["dtype"], _ms(r.get("fwd_ms")),
             _ms(r.get("full_ms")), _ms(r.get("full_kernel_ms")),
             "" if r.get("full_peak_bytes") is None else f"{r['full_peak_bytes'] / 2**20:.0f}"]
            for r in res["rows"] if "full_ms" in r]
    lines = ["The optimal-transport scores op (Sinkhorn iterations, fwd and fwd+bwd):", ""]
    lines += _table(["impl", "shape", "iterations", "dtype", "fwd ms", "fwd+bwd ms", "fwd+bwd kernel ms",
                     "peak MiB"], rows)
    loss = res.get("loss")
    if loss:
        lines += [f"The local loss with OT matching vs max matching ({loss['dtype']}, B={loss['B']}, K={loss['K']}, "
                  f"D={loss['D']}): {loss['ot_ms']:.3g} ms vs {loss['max_ms']:.3g} ms ({loss['ot_over_max']:.2f}x).", ""]
    return lines


def _integrity(data: dict) -> list:
    res = _result(data, "integrity_mask")
    if not res or not res.get("timing"):
        return []
    rows = [[f"B{r['B']} P{r['P']} C{r['C']} K{r['K']}", r["dtype"], _ms(r["triton_fwd_us"]),
             _ms(r["argsort_gather_fwd_us"]), _ms(r["reference_fwd_us"]), f"{r['speedup_vs_argsort_gather']:.2f}",
             f"{r['fwd_pct_of_copy']:.0f}%", _ms(r["triton_bwd_us"]), _ms(r["scatter_bwd_us"])]
            for r in res["timing"]]
    lines = ["Integrity-scored masking (score, sampled top-k, gather), us per call:", ""]
    lines += _table(["shape", "dtype", "triton fwd", "argsort+gather fwd", "reference fwd", "speedup vs argsort",
                     "of a copy's bandwidth", "triton bwd", "scatter bwd"], rows)
    t = res.get("targets")
    if t:
        lines += [f"Targets: >= {t['fwd_pct_of_copy_target']:.0f}% of a copy's bandwidth (lowest measured "
                  f"{t['fwd_pct_of_copy_min']:.1f}%), >= {t['speedup_target']:.1f}x argsort + gather (lowest "
                  f"{t['speedup_vs_argsort_gather_min']:.2f}x): {'met' if t['met'] else 'not met'}.", ""]
    return lines


def _model(data: dict) -> list:
    res = _result(data, "model_vs_measurement")
    if not res or not res.get("rows"):
        return []
    groups = {}
    for r in res["rows"]:
        if r.get("measured_us") and r.get("predicted_us"):
            mid = r["predicted_us"]["middle"]
            groups.setdefault((r["impl"], r["mode"]), []).append(
                (r["measured_us"] / mid, (r.get("measured_kernel_us") or 0) / (r.get("predicted_kernel_us") or mid)))
    rows = [[impl, mode, len(v), f"{statistics.median(x for x, _ in v):.2f}", f"{statistics.median(y for _, y in v):.2f}"]
            for (impl, mode), v in sorted(groups.items())]
    return ["The performance model (a prediction from the static compile, published peaks and an L2 assumption) "
            "against these measurements, median of measured over predicted:", ""] + _table(
        ["impl", "mode", "shapes", "call time / predicted", "kernel time / predicted kernel"], rows)


def table_markdown(data: dict, name: str = "gpu.json") -> str:
    """Markdown for one GPU check's JSON: header, correctness and the tables above (sections that did not run
    are left out)."""
    lines = _header(name, data) + _correctness(data) + _peers(data) + _host(data) + _train_step(data) + _ot(data)
    lines += _integrity(data) + _model(data)
    return "\n".join(lines).rstrip() + "\n"
