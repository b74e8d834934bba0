"""The static GPU gate: every Triton kernel compiled for sm_80 and sm_90 on this CPU machine.

``python -m tools.kernel_static --gate`` (run in its own process: the kernels must be decorated for a GPU target,
not for the interpreter this test session uses) compiles the gate cases on both archs and fails on a compile
error, a spill, shared memory above the arch limit, a half-precision matmul kernel without tensor-core
instructions, committed records that no longer cover every launch of the sweep, or a compile that differs
from its committed record. The helpers it relies on (SASS loop finding, occupancy, the gate rules) are
checked here against hand-made inputs with known answers.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tools.kernel_static import analysis as ks
from tools.kernel_static.records import violations

ROOT = Path(__file__).resolve().parents[1]


def test_gate_on_sm80_and_sm90():
    why = ks.tools_available()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "tools.kernel_static", "--gate", "--workers", "2",
         "--json", str(ROOT / "benchmarks" / "results" / "kernel_static.json")],
        capture_output=True, text=True, timeout=900, env=env, cwd=str(ROOT),
    )
    failures = [line for line in proc.stderr.splitlines() if "[gate] FAIL" in line]
    assert proc.returncode == 0, "\n".join(failures[:40]) or proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 problems" in proc.stdout


SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   IMAD R2, R3, R4, RZ ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   SHFL.BFLY PT, R5, R6, 0x1, 0x1f ;
        /*0040*/               @P0 BRA 0x20 ;
        /*0050*/                   LDS R7, [R8] ;
        /*0060*/              @!P1 BRA 0x10 ;
        /*0070*/                   EXIT ;
"""


def test_sass_loops_nesting_and_counts():
    instrs = ks.parse_sass(SASS)
    assert [op for _, op, _ in instrs][:3] == ["MOV", "IMAD", "HGMMA.64x128x16.F32.BF16"]
    loops = ks.sass_loops(instrs, 90)
    inner, outer = sorted(loops, key=lambda lp: lp["instructions"])
    assert (inner["start"], inner["end"], inner["instructions"]) == (0x20, 0x40, 3)
    assert inner["innermost"] and inner["depth"] == 1 and inner["tensor_core"] == 1 and inner["shuffles"] == 1
    assert (outer["start"], outer["end"], outer["instructions"]) == (0x10, 0x60, 6)
    assert not outer["innermost"] and outer["depth"] == 0 and outer["shared_loads"] == 1


@pytest.mark.parametrize("arch,regs,shared,warps,blocks,limit", [
    (90, 128, 0, 8, 2, "registers"),  # 128 regs x 256 threads = 32768 of 65536
    (90, 255, 0, 8, 1, "registers"),  # 256 (allocation unit) x 256 threads: one block
    (90, 64, 100_000, 4, 2, "shared"),  # 233472 // 101024
    (80, 16, 0, 4, 16, "warps"),  # 64 warps per SM / 4 (registers would allow 32)
    (80, 16, 0, 1, 32, "blocks"),  # at most 32 resident blocks
])
def test_occupancy_closed_forms(arch, regs, shared, warps, blocks, limit):
    occ = ks.occupancy(arch, regs, shared, warps)
    assert occ["blocks_per_sm"] == blocks and occ["limited_by"] == limit


def test_gate_rules_flag_each_violation():
    good = dict(op="patch_sentence", mode="fwd", kernel="k", arch="sm_90", dtype="bf16", shape={}, compiled=True,
                matmul=True, spill_bytes=0, shared_bytes=1000, shared_limit=232_448, tensor_core_sass=4)
    assert violations([good]) == []
    cases = {
        "spills 8 bytes": dict(spill_bytes=8),
        "shared memory 300000 > 232448": dict(shared_bytes=300_000),
        "no tensor-core instructions": dict(tensor_core_sass=0),
        "does not compile: OutOfResources": dict(compiled=False, error="OutOfResources"),
    }
    for want, change in cases.items():
        ((_, why),) = violations([{**good, **change}])
        assert want in "; ".join(why)
    assert violations([{**good, "dtype": "fp32", "tensor_core_sass": 0}]) == []  # fp32 is FMA by design
    assert violations([dict(good, compiled=False, refused="P too large")]) == []  # refused up front is fine
