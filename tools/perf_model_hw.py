"""The hardware side of the performance MODEL (``perf_model.py``): the cards' published figures, the model's
stated assumptions about them, and the issue model that turns a SASS loop's instructions per pipe
(``kernel_static.analysis.SASS_PIPES``) into clocks. Nothing here is measured; ``gpu_check`` measures the L2
bandwidth, clocks and power that these assumptions stand in for.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Card:
    """Published figures (dense, no sparsity; SXM parts) and the model's ASSUMPTIONS, per card."""

    name: str
    arch: str  # the static records' arch
    sm_count: int
    bf16_tflops: float  # dense tensor-core peak
    tf32_tflops: float
    fp32_tflops: float  # FMA peak (no tensor cores)
    hbm_tbs: float
    l2_band: tuple  # ASSUMPTION: L2 -> SM read bandwidth, TB/s (pessimistic, middle, optimistic); not published
    attainable: float  # ASSUMPTION: share of the peak a large plain GEMM reaches (H100: 790 of 989 TF/s)
    l2_port_bytes_per_clk: int = 64  # ASSUMPTION: what one SM can pull from L2 per clock
    l2_latency_cycles: int = 600  # ASSUMPTION: L2 hit latency under load, exposed once per tile without prefetch
    launch_us: float = 4.0  # ASSUMPTION: per kernel in an eager stream (launch gap, ramp and tail)
    graph_launch_us: float = 1.0  # ASSUMPTION: per kernel under CUDA-graph replay


CARDS = (
    Card("H100", "sm_90", 132, 989.4, 494.7, 66.9, 3.35, (5.5, 7.0, 10.0), 0.80),
    # A100's band: H100's band scaled to the 4.5 TB/s middle assumption
    Card("A100", "sm_80", 108, 312.0, 156.0, 19.5, 2.04, (3.5, 4.5, 6.4), 0.85),
)
L2_LABELS = ("pessimistic", "middle", "optimistic")
# Clocks one warp-instruction occupies its pipe on one scheduler (four per SM); every instruction also takes
# one issue slot. Opcodes map to pipes in kernel_static.analysis.SASS_PIPES.
PIPE_CLOCKS = {
    "sm_90": {"fp32": ("fma", 1), "imad": ("fma", 2), "alu": ("alu", 2), "xu": ("xu", 8)},
    "sm_80": {"fp32": ("fma", 2), "imad": ("fma", 2), "alu": ("alu", 2), "xu": ("xu", 8)},
}
DATA_PATH_BYTES_PER_CLK = 128  # L1 / shared memory per SM
def clock_hz(card: Card) -> float:
    """SM clock implied by the dense peak: 4096 bf16 FLOP per clock per SM on sm_90, 2048 on sm_80."""
    return card.bf16_tflops * 1e12 / (card.sm_count * (4096 if card.arch == "sm_90" else 2048))


# ------------------------------------------------------------------------------------------- issue model


def mix(loop: dict, times: float = 1.0, minus: dict = None) -> tuple:
    """(instructions per pipe, data-path bytes) of ``times`` iterations of ``loop`` (less one of ``minus``)."""
    pipes = {k: v * times for k, v in loop["pipes"].items()}
    data = loop["data_bytes"] * times
    if minus is not None:
        for k, v in minus["pipes"].items():
            pipes[k] = pipes.get(k, 0) - v
        data -= minus["data_bytes"]
    return pipes, data


def add_mix(a: tuple, b: tuple) -> tuple:
    return {k: a[0].get(k, 0) + b[0].get(k, 0) for k in set(a[0]) | set(b[0])}, a[1] + b[1]


def issue_cycles(m: tuple, warps: int, arch: str) -> tuple:
    """(clocks, limiting pipe) for ``warps`` warps on one SM each issuing the mix ``m`` once."""
    pipes, data = m
    busy = {"issue": sum(pipes.values())}
    for cls, n in pipes.items():
        if cls in PIPE_CLOCKS[arch]:
            pipe, clocks = PIPE_CLOCKS[arch][cls]
            busy[pipe] = busy.get(pipe, 0) + n * clocks
    per_scheduler = math.ceil(warps / 4)
    cycles = {k: per_scheduler * v for k, v in busy.items()}
    cycles["data path"] = warps * data / DATA_PATH_BYTES_PER_CLK
    limit = max(cycles, key=cycles.get)
    return cycles[limit], limit


def tile_loop(rec: dict) -> tuple:
    """(tile loop, its innermost dot loop or None): the loop that issues one tile's dot and reductions."""
    loops = rec["loops"]
    inner = min((lp for lp in loops if lp["innermost"] and lp["tensor_core"] + lp["pipes"].get("fp32", 0) > 0),
                key=lambda lp: lp["instructions"], default=None)
    if inner is None:
        raise ValueError(f"{rec['kernel']} {rec['arch']}: no loop issues a dot")
    enclosing = [lp for lp in loops if lp is not inner and lp["start"] <= inner["start"] and inner["end"] <= lp["end"]]
    if not enclosing:  # the dot is issued once per iteration of the innermost loop itself
        return inner, None
    return min(enclosing, key=lambda lp: lp["instructions"]), inner
