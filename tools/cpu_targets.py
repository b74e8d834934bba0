"""CPU targets of PERF.md for the patch-sentence scores op and loss, measured in one run against the peers:

    B=G=128, K=98, S=16, D=256, fp32, one process: the forward and forward + backward of the scores op for the
    reference grid, the chunked impl, ``torch.compile(reference)`` and maxsim-cpu (forward only); forward +
    backward of the patch-sentence loss (local mode: one both-directions call, then the cross-entropies) for
    reference and chunked.
    Targets: chunked no slower than ``torch.compile(reference)`` for the forward and for fwd+bwd; op and loss
    memory <= 1/33 of the reference's.

Each peer's output is checked against the reference first (``peers.check_peer``): a wrong peer is recorded as
wrong at this shape, with its error, and not timed. Time: the providers run in this process, interleaved round
by round (rotating which goes first) after a warm-up (compiles happen there); the ratios are taken on the
per-provider minimum (the least-disturbed round on a shared machine) and also reported on the median. Peak
memory: one step per provider in a fresh process (peak RSS delta above the inputs after a warm-up step, see
``benchmarks/harness.py``); "op memory" excludes the input gradients every provider must return (PERF.md's definition),
"peak" includes them. Value checks are off in every timed region.

Writes benchmarks/results/cpu.json (machine, versions, date, load, numbers) and regenerates the results table in
benchmarks/README.md. ``--readme`` only regenerates the table from the JSON files already there.

    python -m tools.cpu_targets [--rounds 7] [--readme]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

from benchmarks import bench_patch_sentence as bps
from benchmarks import harness, peers
from mlip_fast import _checks
from tools import readme_table

SHAPE = dict(B=128, G=128, K=98, S=16, D=256)
MEMORY_TARGET = 1 / 33
# subject -> (step factory, {mode: providers})
SUBJECTS = {
    "op": ("make_step", {"fwd": ("reference", "chunked", "compiled", "maxsim_cpu"),
                         "full": ("reference", "chunked", "compiled")}),
    "loss": ("make_loss_step", {"full": ("reference", "chunked")}),
}
NAMES = {"op": "patch_sentence scores op", "loss": "patch_sentence loss"}


def check_providers(providers) -> dict:
    """{provider: None (usable) or why it is not timed (unavailable, or wrong at this shape)}."""
    p, s, smask, _, _ = bps.make_inputs(**SHAPE, dtype="float32", device="cpu", seed=0)
    out = {}
    for provider in providers:
        why = peers.unavailable(provider, "cpu") if provider in peers.PEERS else None
        if why is None:
            check = bps.peer_check(provider, p, s, smask)
            why = None if check["ok"] else f"wrong at this shape: max relative error {check['max_rel_err']:.3g}"
        out[provider] = why
    return out


def measure_times(rounds: int, factory: str, mode: str, providers) -> dict:
    make = getattr(bps, factory)
    steps = {p: make(p, mode, **SHAPE, dtype="float32", device="cpu", seed=0) for p in providers}
    # two warm-up calls each: compiles and first-call set-up are not the op's time
    return harness.interleaved_times(steps, rounds, warmup=2, rotate=True)


def measure_memory(factory: str, mode: str, providers) -> dict:
    out = {}
    for p in providers:
        peak, grads = bps.op_peak_memory(p, **SHAPE, dtype="float32", device="cpu", factory=factory, mode=mode)
        out[p] = {"peak_bytes": peak, "input_grad_bytes": grads, "op_bytes": max(peak - grads, 0)}
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def run(rounds: int) -> dict:
    _checks.VALUE_CHECKS = False
    results, table = {}, []
    all_providers = sorted({p for _, modes in SUBJECTS.values() for ps in modes.values() for p in ps})
    refused = check_providers(all_providers)
    for subject, (factory, modes) in SUBJECTS.items():
        results[subject] = {}
        for mode, providers in modes.items():
            timed = [p for p in providers if refused[p] is None]
            times = measure_times(rounds, factory, mode, timed)
            memory = measure_memory(factory, mode, timed)
            t_min = {p: min(v) for p, v in times.items()}
            t_med = {p: statistics.median(v) for p, v in times.items()}
            ratios = {
                "chunked_vs_reference_time_min": _ratio(t_min.get("chunked"), t_min.get("reference")),
                "chunked_vs_reference_time_median": _ratio(t_med.get("chunked"), t_med.get("reference")),
                "chunked_vs_compiled_time_min": _ratio(t_min.get("chunked"), t_min.get("compiled")),
                "chunked_vs_compiled_time_median": _ratio(t_med.get("chunked"), t_med.get("compiled")),
                "op_memory_ratio": _ratio(memory["chunked"]["op_bytes"], memory["reference"]["op_bytes"]),
                "peak_memory_ratio_with_input_grads": _ratio(memory["chunked"]["peak_bytes"],
                                                             memory["reference"]["peak_bytes"]),
            }
            targets = {"memory_ratio_max": MEMORY_TARGET,
                       "memory_met": ratios["op_memory_ratio"] <= MEMORY_TARGET}
            if ratios["chunked_vs_compiled_time_min"] is not None:
                targets.update(time_vs_compiled_max=1.0, time_met=ratios["chunked_vs_compiled_time_min"] <= 1.0)
            results[subject][mode] = {"times_s": times, "memory": memory, "ratios": ratios, "targets": targets,
                                      "not_timed": {p: refused[p] for p in providers if refused[p]}}
            name = f"{NAMES[subject]} {'fwd' if mode == 'fwd' else 'fwd+bwd'}"
            for p in providers:
                row = {"op": name, "shape": "B=G=128 K=98 S=16 D=256 fp32", "provider": p}
                if refused[p]:
                    row.update(time_min_s=refused[p])
                else:
                    row.update(time_min_s=t_min[p], time_median_s=t_med[p], op_memory_MiB=memory[p]["op_bytes"] / 2**20,
                               peak_with_grads_MiB=memory[p]["peak_bytes"] / 2**20)
                table.append(row)
            table.append({"op": name, "shape": "ratio chunked / reference", "provider": "memory target <= 1/33",
                          "time_min_s": ratios["chunked_vs_reference_time_min"],
                          "time_median_s": ratios["chunked_vs_reference_time_median"],
                          "op_memory_MiB": ratios["op_memory_ratio"],
                          "peak_with_grads_MiB": ratios["peak_memory_ratio_with_input_grads"]})
            if ratios["chunked_vs_compiled_time_min"] is not None:
                table.append({"op": name, "shape": "ratio chunked / compiled", "provider": "time target <= 1",
                              "time_min_s": ratios["chunked_vs_compiled_time_min"],
                              "time_median_s": ratios["chunked_vs_compiled_time_median"]})
    return {
        "environment": harness.environment("cpu"),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "shape": SHAPE,
        "dtype": "float32",
        "rounds": rounds,
        **results,
        "table": table,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.cpu_targets", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds per provider")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "cpu.json")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README table from the JSON files")
    args = parser.parse_args(argv)
    if not args.readme:
        result = run(args.rounds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        summary = {f"{s}.{m}": {"ratios": v["ratios"], "targets": v["targets"]}
                   for s in SUBJECTS for m, v in result[s].items()}
        print(json.dumps(summary, indent=2))
        print(f"wrote {args.out}")
    print(f"wrote {readme_table.write_readme_table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
