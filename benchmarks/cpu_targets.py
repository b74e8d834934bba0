"""CPU targets of PERF.md for the local loss, measured in one run:

    B=G=128, K=98, S=16, D=256, fp32, forward + backward: chunked vs reference, for the scores op alone and
    for the patch-sentence loss (local mode: one both-directions call, then the cross-entropies);
    targets: op memory <= 1/33 of reference, time <= 0.3x reference.

Time: both providers run in this process, interleaved round by round (alternating which goes first) after
a warm-up; the ratio is taken on the per-provider minimum (the least-disturbed round on a shared machine)
and also reported on the median. Peak memory: one fwd+bwd step per provider in a fresh process (peak RSS
delta, see ``harness.py``); "op memory" excludes the input gradients both providers must return (PERF.md's
definition of op memory), "peak" includes them.

Writes benchmarks/results/cpu.json (machine, versions, date, numbers) and regenerates the results table in
benchmarks/README.md. ``--readme`` only regenerates the table from the JSON files already there.

    python benchmarks/cpu_targets.py [--rounds 7] [--readme]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import harness  # noqa: E402

SHAPE = dict(B=128, G=128, K=98, S=16, D=256)
PROVIDERS = ("reference", "chunked")
MEMORY_TARGET = 1 / 33
TIME_TARGET = 0.3
SUBJECTS = {"op": "make_step", "loss": "make_loss_step"}  # what is measured -> its step factory


def measure_times(rounds: int, factory: str = "make_step") -> dict:
    import bench_patch_sentence

    make = getattr(bench_patch_sentence, factory)
    steps = {p: make(p, "full", **SHAPE, dtype="float32", device="cpu", seed=0) for p in PROVIDERS}
    for step in steps.values():  # warm-up: first-call library set-up is not the op's time
        step()
        step()
    times = {p: [] for p in PROVIDERS}
    for r in range(rounds):
        order = PROVIDERS if r % 2 == 0 else PROVIDERS[::-1]
        for p in order:
            start = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - start)
    return times


def measure_memory(factory: str = "make_step") -> dict:
    from bench_patch_sentence import op_peak_memory

    out = {}
    for p in PROVIDERS:
        peak, grads = op_peak_memory(p, **SHAPE, dtype="float32", device="cpu", factory=factory)
        out[p] = {"peak_bytes": peak, "input_grad_bytes": grads, "op_bytes": max(peak - grads, 0)}
    return out


def run(rounds: int) -> dict:
    import torch

    ref, cand = "reference", "chunked"
    results, table = {}, []
    for subject, factory in SUBJECTS.items():
        times = measure_times(rounds, factory)
        memory = measure_memory(factory)
        t_min = {p: min(v) for p, v in times.items()}
        t_med = {p: statistics.median(v) for p, v in times.items()}
        ratios = {
            "time_ratio_min": t_min[cand] / t_min[ref],
            "time_ratio_median": t_med[cand] / t_med[ref],
            "op_memory_ratio": memory[cand]["op_bytes"] / max(memory[ref]["op_bytes"], 1),
            "peak_memory_ratio_with_input_grads": memory[cand]["peak_bytes"] / max(memory[ref]["peak_bytes"], 1),
        }
        targets = {
            "time_ratio_max": TIME_TARGET,
            "memory_ratio_max": MEMORY_TARGET,
            "time_met": ratios["time_ratio_min"] <= TIME_TARGET,
            "memory_met": ratios["op_memory_ratio"] <= MEMORY_TARGET,
        }
        results[subject] = {"times_s": times, "memory": memory, "ratios": ratios, "targets": targets}
        name = f"patch_sentence {'scores op' if subject == 'op' else 'loss'} fwd+bwd"
        table += [
            {
                "op": name,
                "shape": "B=G=128 K=98 S=16 D=256 fp32",
                "provider": p,
                "time_min_s": t_min[p],
                "time_median_s": t_med[p],
                "op_memory_MiB": memory[p]["op_bytes"] / 2**20,
                "peak_with_grads_MiB": memory[p]["peak_bytes"] / 2**20,
            }
            for p in PROVIDERS
        ]
        table.append(
            {
                "op": name,
                "shape": "ratio chunked / reference",
                "provider": f"targets: time <= {TIME_TARGET}, memory <= 1/33",
                "time_min_s": ratios["time_ratio_min"],
                "time_median_s": ratios["time_ratio_median"],
                "op_memory_MiB": ratios["op_memory_ratio"],
                "peak_with_grads_MiB": ratios["peak_memory_ratio_with_input_grads"],
            }
        )
    return {
        "environment": harness.environment("cpu"),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
        "shape": SHAPE,
        "dtype": "float32",
        "rounds": rounds,
        **results,
        "ratios": results["loss"]["ratios"],
        "targets": results["loss"]["targets"],
        "table": table,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per provider")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "cpu.json")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README table from the JSON files")
    args = parser.parse_args(argv)
    if not args.readme:
        result = run(args.rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=2))
        print(f"wrote {args.out}")
    print(f"wrote {harness.write_readme_table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
