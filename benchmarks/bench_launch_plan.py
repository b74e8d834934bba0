"""Host time of planning one call of the fused patch-sentence op: the block sizes and schedules its launchers
choose before the kernels run (the v3 forward's image split, the v2 forward's config, both backward sides' block
config and split over programs), for the GPU path (the heuristics as on sm_90 with 132 SMs; no GPU needed).

Why: the H100 run of the GPU check (``results/gpu_nvidia-h100-80gb-hbm3.json``) found the op host-bound at one
GPU's batch (1.87 ms per forward + backward call at B = G = 128, 0.55 ms of it GPU kernels). Planning was part of
that host time: the split searches evaluate one candidate per image (v3) and per step of the backward walk,
each through ``triton.cdiv`` / ``triton.next_power_of_2``, which since triton 3.5 are constexpr functions whose
host calls cost microseconds. Three ways, per op call (forward + backward), at PERF.md's shapes, bf16:

- ``triton_helpers_uncached``: as the code was (triton's helpers, recomputed every call);
- ``plain_helpers_uncached``: plain-Python ``cdiv`` / ``next_pow2`` (``kernels/_common.py``), recomputed;
- ``cached``: as the code is now (plain helpers, plans cached on sizes, dtype and card: a dict lookup).

The heuristics must be imported without the Triton interpreter (which plans differently), so the script runs
itself in a fresh process without ``TRITON_INTERPRET``:

    python benchmarks/bench_launch_plan.py            # writes benchmarks/results/launch_plan_cpu.json
    pytest benchmarks/bench_launch_plan.py            # the same measurement, a few repeats, into a temp file
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import timeit
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

SHAPES = [(128, 128, 98, 16, 512), (128, 1024, 98, 16, 512), (128, 128, 196, 16, 512), (128, 1024, 196, 16, 512)]
ARCH, SMS = 90, 132
WAYS = ("triton_helpers_uncached", "plain_helpers_uncached", "cached")


def _measure(repeats: int, number: int) -> list:
    """Microseconds per op call of each way at each shape (min over ``repeats`` of ``number`` calls)."""
    import torch
    import triton

    from mlip_fast.kernels import _common
    from mlip_fast.kernels.patch_sentence import heuristics as h
    from mlip_fast.kernels.patch_sentence import launch as L

    if h.INTERPRET:
        raise RuntimeError("the launch plans must be measured without TRITON_INTERPRET (the interpreter plans otherwise)")
    dtype = torch.bfloat16
    plain = (h.cdiv, L.cdiv, _common.next_pow2)
    bwd_cached = h.bwd_config

    def way(name):
        uncached = name != "cached"
        old = name == "triton_helpers_uncached"
        h.cdiv = L.cdiv = triton.cdiv if old else plain[0]
        _common.next_pow2 = triton.next_power_of_2 if old else plain[2]
        h.bwd_config = L.bwd_config = bwd_cached.__wrapped__ if uncached else bwd_cached
        fwd_v3 = h.fwd_v3_config.__wrapped__ if uncached else h.fwd_v3_config
        fwd_v2 = h.fwd_config.__wrapped__ if uncached else h.fwd_config
        plan = L._bwd_plan.__wrapped__ if uncached else L._bwd_plan
        return fwd_v3, fwd_v2, plan

    rows = []
    try:
        for B, G, K, S, D in SHAPES:
            for name in WAYS:
                fwd_v3, fwd_v2, plan = way(name)

                def call():
                    fwd_v3(B, K, G, S, D, SMS, "both")  # the dispatch's forward on sm_90
                    plan(B, K, G, S, D, dtype, ARCH, SMS, True, False, None, ())  # patch side
                    plan(G, S, B, K, D, dtype, ARCH, SMS, False, False, None, ())  # sentence side

                def call_v2():
                    fwd_v2(B, K, G, S, D, dtype, ARCH, SMS, normalize=True)

                call()
                us = min(timeit.repeat(call, number=number, repeat=repeats)) / number * 1e6
                us_v2 = min(timeit.repeat(call_v2, number=number, repeat=repeats)) / number * 1e6
                rows.append({"shape": f"{B}x{G} K{K} S{S} D{D} bf16", "way": name,
                             "v3_fwd_plus_bwd_plan_us": round(us, 2), "v2_fwd_config_us": round(us_v2, 2)})
    finally:
        h.cdiv, L.cdiv, _common.next_pow2 = plain
        h.bwd_config = L.bwd_config = bwd_cached
    return rows


def run(out: Path, repeats: int = 5, number: int = 200) -> dict:
    """Measures in a fresh process without TRITON_INTERPRET, writes ``out`` and prints its rows."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    code = (f"import json, sys; sys.path.insert(0, {str(harness.ROOT)!r}); from benchmarks import bench_launch_plan as b; "
            f"print(json.dumps(b._measure({repeats}, {number})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(harness.ROOT),
                          timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    result = {"environment": dict(harness.environment(), load_1min=round(os.getloadavg()[0], 2)),
              "what": "host microseconds to plan one forward + backward call of the patch-sentence op for sm_90 "
                      "(132 SMs), min over repeats; v2_fwd_config_us: the v2 forward's config alone",
              "repeats": repeats, "number": number, "table": rows}
    harness.write_result(out, result, lambda r: (f"{r['shape']:<28} {r['way']:<26} {r['v3_fwd_plus_bwd_plan_us']:>9.1f} "
                                                 f"us  (v2 fwd config {r['v2_fwd_config_us']:.1f} us)"))
    return result


def test_launch_plan_host_time(tmp_path, benchmark):
    """Every way at every shape is measured (the numbers themselves are the JSON's, not asserted)."""
    result = benchmark.pedantic(run, args=(tmp_path / "plan.json", 1, 5), rounds=1, iterations=1)
    rows = result["table"]
    assert {(r["shape"], r["way"]) for r in rows} == {(f"{B}x{G} K{K} S{S} D{D} bf16", w)
                                                      for B, G, K, S, D in SHAPES for w in WAYS}
    assert all(r["v3_fwd_plus_bwd_plan_us"] > 0 and r["v2_fwd_config_us"] > 0 for r in rows)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="launch-planning host time -> benchmarks/results/launch_plan_cpu.json")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "launch_plan_cpu.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=200)
    args = parser.parse_args(argv)
    run(args.out, args.repeats, args.number)
    return args.out


if __name__ == "__main__":
    main()
