"""The arch tables and what the static compile reads from one compiled kernel: registers, stack and spills from
``ptxas -v``, the SASS listing, its loops with their instructions per execution pipe, and the resident blocks per
SM. The ptxas and cuobjdump used are those shipped in the triton wheel.
"""
from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import triton

TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"

# Per-arch hardware limits (CUDA programming guide, compute capability tables).
ARCHS = {
    80: dict(name="sm_80", card="A100", sm_count=108, smem_per_block=166_912, smem_per_sm=167_936),
    90: dict(name="sm_90", card="H100", sm_count=132, smem_per_block=232_448, smem_per_sm=233_472),
}
REGS_PER_SM = 65_536
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_RESERVED_PER_BLOCK = 1_024

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
TENSOR_CORE_SASS = {80: ("HMMA",), 90: ("HGMMA", "HMMA")}
# The execution pipe each SASS opcode issues to on sm_80 / sm_90 (CUDA programming guide, arithmetic instruction
# throughput table; NVIDIA's Ampere and Hopper whitepapers for the pipe split), for the performance model's
# per-pipe issue limits. Opcodes not named are "other" (moves, special registers, constants): they cost an issue
# slot and no pipe. Uniform-datapath opcodes (U*) run beside the vector pipes.
SASS_PIPES = {
    "tensor": ("HGMMA", "HMMA", "IMMA", "DMMA", "BMMA"),
    "fp32": ("FFMA", "FADD", "FMUL", "FFMA2", "HFMA2", "HADD2", "HMUL2", "FSWZADD"),
    "imad": ("IMAD", "IMUL", "IDP"),
    "alu": ("FMNMX", "FSEL", "FSETP", "SEL", "ISETP", "LOP3", "LOP", "PLOP3", "IADD3", "IADD", "VIADD", "VIADDMNMX",
            "IMNMX", "VIMNMX", "VIMNMX3", "IABS", "SHF", "SHL", "SHR", "LEA", "PRMT", "P2R", "R2P", "SGXT", "BMSK",
            "F2FP", "FCHK", "FLO", "POPC", "BREV", "CSET", "CSETP", "PSETP"),
    "xu": ("MUFU", "I2F", "F2I", "F2F", "FRND", "I2FP", "F2IP", "I2I"),
    "shuffle": ("SHFL",),
    "shared": ("LDS", "STS", "LDSM", "STSM", "ATOMS"),
    "global": ("LDG", "STG", "LDGSTS", "REDG", "RED", "ATOMG", "ATOM", "LD", "ST", "LDL", "STL", "UTMALDG", "UTMASTG"),
    "control": ("BRA", "BAR", "BSSY", "BSYNC", "CALL", "RET", "EXIT", "DEPBAR", "LDGDEPBAR", "MEMBAR", "FENCE", "NOP",
                "WARPSYNC", "WARPGROUP", "YIELD", "ERRBAR", "SYNCS", "ELECT", "ARRIVES", "CCTL"),
}
_PIPE_OF = {op: pipe for pipe, ops in SASS_PIPES.items() for op in ops}


def sass_pipe(opcode: str) -> str:
    """The pipe of one SASS opcode (with or without its suffixes): a key of ``SASS_PIPES``, "uniform" or "other"."""
    base = opcode.split(".")[0]
    if base in _PIPE_OF:
        return _PIPE_OF[base]
    return "uniform" if base.startswith("U") or base in ("R2UR", "S2UR") else "other"


def sass_data_bytes(opcode: str) -> int:
    """Bytes one warp moves through the SM's L1 / shared-memory data path with this opcode (0 for other pipes):
    32 lanes x the access width (.64, .128; 4 bytes otherwise) for shared and global accesses, 128 per 8x8
    matrix of LDSM / STSM (.2, .4), 128 per shuffle."""
    pipe = sass_pipe(opcode)
    parts = opcode.split(".")
    if pipe == "shuffle":
        return 128
    if pipe not in ("shared", "global") or parts[0].startswith("UTMA"):
        return 0
    if parts[0] in ("LDSM", "STSM"):
        return 128 * (4 if "4" in parts[1:] else 2 if "2" in parts[1:] else 1)
    return 32 * (16 if "128" in parts[1:] else 8 if "64" in parts[1:] else 4)


def tools_available() -> Optional[str]:
    """None when the wheel ships ptxas and cuobjdump, else the reason."""
    missing = [t for t in ("ptxas", "ptxas-blackwell", "cuobjdump") if not (TOOLS / t).exists()]
    return f"the triton wheel has no {', '.join(missing)} under {TOOLS}" if missing else None


def ptxas_for(arch: int) -> Path:
    # Triton's own choice: the legacy ptxas below sm_90, the newer one from sm_90 on.
    return TOOLS / ("ptxas" if arch < 90 else "ptxas-blackwell")


def gpu_name(arch: int) -> str:
    return "sm_90a" if arch == 90 else f"sm_{arch}"


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, stack and spill bytes from ``ptxas -v`` with the flags Triton compiles with."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [str(ptxas_for(arch)), "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name(arch)}",
               str(src), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:500]}")
    log = proc.stderr + proc.stdout
    out = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(log)
        out[key] = int(m.group(1)) if m else 0
    return out


def sass_of(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {proc.stderr.strip()[:300]}")
    return proc.stdout


def parse_sass(sass: str) -> list:
    """[(address, opcode, operands)] of the SASS listing."""
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def sass_loops(instrs: list, arch: int) -> list:
    """Every loop of the SASS (a backward branch closes it): size, nesting, and what its body issues.

    ``innermost`` loops contain no other loop: they are the hot loops whose instruction counts the
    performance model turns into issue cycles. ``pipes`` counts the body's instructions per execution pipe
    (:data:`SASS_PIPES`) and ``data_bytes`` what one warp moves through the L1 / shared-memory data path per
    iteration (:func:`sass_data_bytes`), for the model's per-pipe limits.
    """
    addr_index = {a: i for i, (a, _, _) in enumerate(instrs)}
    loops = []
    for i, (addr, op, operands) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", operands)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in addr_index:
            continue
        body = instrs[addr_index[target]: i + 1]
        ops = [o for _, o, _ in body]
        loops.append(dict(
            start=target, end=addr, instructions=len(body),
            tensor_core=sum(o.split(".")[0] in TENSOR_CORE_SASS[arch] for o in ops),
            shuffles=sum(o.startswith("SHFL") for o in ops),
            shared_loads=sum(o.startswith(("LDS", "LDSM")) for o in ops),
            shared_stores=sum(o.startswith("STS") for o in ops),
            global_loads=sum(o.startswith(("LDG", "LDGSTS")) for o in ops) + sum(o.startswith("UTMALDG") for o in ops),
            barriers=sum(o.startswith(("BAR", "WARPSYNC")) for o in ops),
            pipes={pipe: n for pipe, n in Counter(map(sass_pipe, ops)).items()},
            data_bytes=sum(map(sass_data_bytes, ops)),
        ))
    for lp in loops:
        lp["innermost"] = not any(
            o is not lp and lp["start"] <= o["start"] and o["end"] <= lp["end"] for o in loops
        )
        lp["depth"] = sum(o is not lp and o["start"] <= lp["start"] and lp["end"] <= o["end"] for o in loops)
    return sorted(loops, key=lambda lp: lp["start"])


def occupancy(arch: int, registers: int, shared: int, num_warps: int) -> dict:
    """Resident blocks per SM from registers, shared memory and warps, and which one limits."""
    lim = ARCHS[arch]
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "registers": REGS_PER_SM // (regs_per_warp * num_warps),
        "shared": lim["smem_per_sm"] // (shared + SMEM_RESERVED_PER_BLOCK) if shared else 1 << 30,
        "warps": MAX_WARPS_PER_SM // num_warps,
        "blocks": MAX_BLOCKS_PER_SM,
    }
    blocks = min(by.values())
    return {"blocks_per_sm": blocks, "limited_by": min(by, key=by.get), "by": by,
            "warps_per_sm": blocks * num_warps}


def analyse(compiled, arch: int, num_warps: int, dump: Optional[Path], key: str) -> dict:
    asm = compiled.asm
    ptx, cubin, ttgir = asm["ptx"], asm["cubin"], asm.get("ttgir", "")
    rep = ptxas_report(ptx, arch)
    shared = int(compiled.metadata.shared)
    sass = sass_of(cubin)
    instrs = parse_sass(sass)
    loops = sass_loops(instrs, arch)
    out = dict(rep)
    out["spill_bytes"] = rep["spill_stores"] + rep["spill_loads"]
    out["shared_bytes"] = shared
    out["shared_limit"] = ARCHS[arch]["smem_per_block"]
    out.update(occupancy(arch, rep["registers"], shared, num_warps))
    out["sass_instructions"] = len(instrs)
    out["tensor_core_sass"] = sum(o.split(".")[0] in TENSOR_CORE_SASS[arch] for _, o, _ in instrs)
    out["tensor_core_ptx"] = len(re.findall(r"\bwgmma\.mma_async|\bmma\.sync", ptx))
    out["layout_conversions"] = len(re.findall(r"ttg\.convert_layout", ttgir))
    out["loops"] = loops
    hot = [lp for lp in loops if lp["innermost"]]
    out["hot_loop_instructions"] = [lp["instructions"] for lp in hot]
    if dump is not None:
        stem = hashlib.sha1(key.encode()).hexdigest()[:12]
        base = dump / f"{compiled.metadata.name}_{gpu_name(arch)}_{stem}"
        base.with_suffix(".ptx").write_text(ptx)
        base.with_suffix(".cubin").write_bytes(cubin)
        base.with_suffix(".sass").write_text(sass)
        base.with_suffix(".key").write_text(key + "\n")
        out["dump"] = base.name
    return out
