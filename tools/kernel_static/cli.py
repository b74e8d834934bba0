"""The command: the sweep into the records JSON (``--json``, ``--op`` to replace one op's records), the CI gate
(``--gate``), the README table (``--readme``) and the compiler workers (``--worker``); see the package docstring.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

from benchmarks import harness
from tools import readme_table
from tools.kernel_static import compile as static_compile
from tools.kernel_static.analysis import ARCHS, ptxas_for, tools_available
from tools.kernel_static.cases import OPS, collect, sweep
from tools.kernel_static.records import GATE_FIELDS, describe, pack, table_markdown, unpack, violations

DEFAULT_JSON = harness.RESULTS / "kernel_static.json"
DESCRIPTION = ("Static GPU compile of every Triton kernel, without a GPU: registers, spills, shared memory, occupancy, "
               "tensor-core instructions and hot-loop SASS sizes for sm_80 (A100) and sm_90 (H100 / H200).")


def run_gate(committed: Path, workers: int) -> int:
    """The CI gate. Fails (exit 1, offending records printed) when:

    - a gate case does not compile, spills, exceeds shared memory, or a half matmul kernel has no
      tensor-core instruction, on sm_80 or sm_90;
    - the committed records miss a launch of the full sweep (the kernels or their launch heuristics changed
      since they were written: regenerate with ``--json``), were made by another triton version, or hold a
      violation;
    - a gate case compiled now differs from its committed record (registers, spills, shared memory).
    """
    problems = []
    start = time.time()
    if not committed.exists():
        print(f"[gate] {committed} is missing: run python -m tools.kernel_static --json {committed}", file=sys.stderr)
        return 1
    data = json.loads(committed.read_text())
    if data["environment"]["triton"] != triton.__version__:
        problems.append(f"committed records are from triton {data['environment']['triton']}, this is {triton.__version__}")
    committed_records = unpack(data)
    by_id = {r["compile_id"]: r for r in committed_records if r.get("compile_id")}
    for r, why in violations(committed_records):
        problems.append(f"committed record violates the gate: {describe(r)}: {'; '.join(why)}")
    full = collect(tuple(ARCHS), quick=bool(data.get("quick")))
    missing = {}
    for op, mode, dname, shape, arch, launches, error in full:
        for ln in launches:
            cid = hashlib.sha1(ln.key.encode()).hexdigest()[:12]
            if cid not in by_id:
                missing.setdefault(cid, f"{ARCHS[arch]['name']} {ln.kernel} {dname} {shape}")
    if missing:
        problems.append(f"{len(missing)} launches of the sweep have no committed record (regenerate the JSON), e.g. "
                        + "; ".join(list(missing.values())[:5]))
    records = sweep(tuple(ARCHS), workers=workers, progress=False, gate=True)
    for r, why in violations(records):
        problems.append(f"{describe(r)}: {'; '.join(why)}")
    for r in records:
        old = by_id.get(r.get("compile_id"))
        if old is not None:
            diff = {f: (old.get(f), r.get(f)) for f in GATE_FIELDS if old.get(f) != r.get(f)}
            if diff:
                problems.append(f"{describe(r)} differs from its committed record: {diff}")
    ids = {r.get("compile_id") for r in records}
    print(f"[gate] {len(records)} gate launches ({len(ids)} distinct compiles) on sm_80 and sm_90, "
          f"{sum(len(c[5]) for c in full)} sweep launches checked against {committed.name}, "
          f"{len(problems)} problems, {time.time() - start:.0f} s")
    for p in problems:
        print(f"[gate] FAIL {p}", file=sys.stderr)
    return 1 if problems else 0




def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ptxas": {a: _tool_version(ptxas_for(a)) for a in ARCHS},
        "archs": {ARCHS[a]["name"]: ARCHS[a] for a in ARCHS},
    }


def _tool_version(path: Path) -> str:
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except OSError as err:
        return f"unavailable: {err}"


def _no_interpreter() -> None:
    """Kernels must be decorated for a real GPU target: the flag is read when ``mlip_fast.kernels`` is first
    imported, so ``python -m tools.kernel_static`` turns it off before importing this module."""
    if "mlip_fast.kernels.patch_sentence" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernel_static needs a process whose kernels were not decorated under TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "0"


def main(argv=None) -> int:
    _no_interpreter()
    parser = argparse.ArgumentParser(prog="python -m tools.kernel_static", description=DESCRIPTION)
    parser.add_argument("--json", type=Path, help="write the records here (e.g. benchmarks/results/kernel_static.json)")
    parser.add_argument("--dump", type=Path, help="write each distinct kernel's PTX, cubin and SASS here")
    parser.add_argument("--quick", action="store_true", help="only B x G = 128 x 128 and 128 x 1024 (mask: B=128)")
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS), help="default: all")
    parser.add_argument("--readme", action="store_true", help="only regenerate the README table from --json")
    parser.add_argument("--workers", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                        help="compiler processes (default: up to 4, one per core)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=[op.name for op in OPS],
                        help="sweep only this op and replace its records in --json, keeping every other op's records")
    parser.add_argument("--gate", action="store_true",
                        help="CI: compile the gate cases, check them, and check that --json (the committed records) "
                             "covers every launch of the full sweep with the same results")
    args = parser.parse_args(argv)
    if args.worker:
        return static_compile.worker_main()
    why = tools_available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.readme:
        readme_table.write_readme_table()
        return 0
    if args.gate:
        return run_gate(args.json or DEFAULT_JSON, args.workers)
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ops = tuple(op for op in OPS if op.name == args.op) if args.op else OPS
    records = sweep(tuple(args.arch or sorted(ARCHS)), quick=args.quick, dump=args.dump, workers=args.workers, ops=ops)
    if args.op and args.json and args.json.exists():
        old = json.loads(args.json.read_text())
        kept = [r for r in unpack(old) if r["op"] != args.op]
        data = pack(kept + records, old["environment"], quick=old.get("quick"), wall_s=old.get("wall_s"))
    else:
        data = pack(records, environment(), quick=args.quick, wall_s=round(time.time() - start, 1))
    compiles = data["distinct_compiles"]
    bad = violations(records)
    for r, why in bad[:50]:
        print(f"[static] VIOLATION {r['arch']} {r['kernel']} {r['dtype']} {r['shape']}: {'; '.join(why)}", file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n")
        tmp.replace(args.json)
        print(f"[static] wrote {args.json}: {len(records)} records, {compiles} distinct compiles, "
              f"{len(bad)} violations, {data['wall_s']} s")
    else:
        print(table_markdown(data))
    return 1 if bad else 0
