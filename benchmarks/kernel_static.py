"""Static GPU compile of every Triton kernel, without a GPU: registers, spills, shared memory, occupancy,
tensor-core instructions and hot-loop SASS sizes for sm_80 (A100) and sm_90 (H100 / H200).

    python benchmarks/kernel_static.py --json benchmarks/results/kernel_static.json [--dump DIR] [--quick]
    python benchmarks/kernel_static.py --readme      # only regenerate the table in benchmarks/README.md

How. A stand-in active Triton driver reports the target GPU (``GPUTarget("cuda", 90, 32)`` or 80). The real
launchers of ``kernels/`` are called on ``meta`` tensors, so their block-size heuristics, constexprs, grids and
split decisions are exactly those of a real launch; only the final ``kernel[grid](...)`` is redirected to
``kernel.warmup(...)`` with ``MockTensor`` arguments, which runs Triton's whole pipeline down to PTX and a cubin
through the ``ptxas`` shipped in the triton wheel. Registers and spills come from ``ptxas -v`` on that PTX
(the flags Triton uses), SASS from ``cuobjdump -sass``. Run it in a process without ``TRITON_INTERPRET``
(the interpreter flag is read when kernels are decorated).

Per compiled launch it records: kernel, arch, dtype, shape, config (constexprs, warps, stages), grid,
compiled (or the error), registers, spill bytes (stores + loads), stack bytes, shared bytes, blocks per SM
from registers / shared memory / warps and which one limits, tensor-core instructions in the SASS
(``HGMMA`` on sm_90, ``HMMA`` on sm_80) and the PTX (``wgmma`` / ``mma.sync``), layout conversions in the
TTGIR, and every loop of the SASS (backward branches) with its instruction count, tensor-core count and
shuffle / shared-memory traffic, instructions per execution pipe and L1 / shared-memory data bytes. Identical
compiles (same kernel, arch and specialisation) are compiled once.

``--dump DIR`` writes each distinct kernel's PTX, cubin and SASS so anyone can re-check with
``ptxas -v --gpu-name=sm_90a``.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402
from triton.runtime.jit import MockTensor  # noqa: E402

RESULTS = HERE / "results"
DEFAULT_JSON = RESULTS / "kernel_static.json"
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


# ------------------------------------------------------------------------------------ stand-in driver


class StandInDriver:
    """An 'active' Triton driver that only tells the compiler which GPU to compile for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton caches its compile target per device: one stand-in device per arch keeps them apart.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        return ty


@contextlib.contextmanager
def compile_target(arch: int):
    """Makes Triton compile for ``arch`` and the launchers plan for it (SM count, capability)."""
    from mlip_fast.kernels import _target

    previous, previous_driver = _target.OVERRIDE, triton_driver._active
    triton_driver.set_active(StandInDriver(arch))
    _target.OVERRIDE = _target.Target(arch=arch, sm_count=ARCHS[arch]["sm_count"])
    try:
        yield
    finally:
        _target.OVERRIDE = previous
        triton_driver._active = previous_driver  # reset_active() would probe for a real GPU driver


# ------------------------------------------------------------------------------------ capturing launches


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call of a launcher, captured instead of run."""

    module: str
    kernel: str
    arch: int
    grid: tuple
    args: list  # ["T", dtype, shape] for a tensor, else the plain value
    kwargs: dict
    key: str = ""


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` function inside a kernels module: ``kernel[grid](*args, **kw)``
    records the launch (tensor arguments as dtype and shape) instead of running it."""

    def __init__(self, module: str, jit_fn, arch: int, sink: list):
        self.module, self.jit_fn, self.arch, self.sink = module, jit_fn, arch, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grid_t = tuple(int(g) for g in (grid(kwargs) if callable(grid) else grid))
            spec = [["T", str(a.dtype).replace("torch.", ""), list(a.shape)] if isinstance(a, torch.Tensor) else _plain(a)
                    for a in args]
            name = self.jit_fn.fn.__name__
            rec = Launch(self.module, name, self.arch, grid_t, spec, {k: _plain(v) for k, v in kwargs.items()})
            rec.key = _compile_key(self.jit_fn, rec)
            self.sink.append(rec)

        return launch


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _compile_key(jit_fn, ln: Launch) -> str:
    """What Triton specialises a compile on: tensor dtypes, ints == 1 or divisible by 16 (unless the kernel
    says not to specialise them), constexprs and launch options; plus the arch and the kernel source."""
    skip = {a if isinstance(a, str) else jit_fn.arg_names[a] for a in jit_fn.do_not_specialize}
    parts = [ln.module, ln.kernel, hashlib.sha1(jit_fn.src.encode()).hexdigest()[:12], f"arch={ln.arch}"]
    for name, a in zip(jit_fn.arg_names, ln.args):
        if isinstance(a, list):
            parts.append(f"T{a[1]}")
        elif isinstance(a, bool) or not isinstance(a, int) or name in skip:
            parts.append("v" if isinstance(a, int) and not isinstance(a, bool) else repr(a))
        else:
            parts.append("1" if a == 1 else ("d16" if a % 16 == 0 else "i"))
    parts += [f"{k}={v}" for k, v in sorted(ln.kwargs.items())]
    return "|".join(parts)


@contextlib.contextmanager
def recording(module, names: Iterable[str], arch: int, sink: list):
    saved = []
    for n in names:
        saved.append((n, getattr(module, n)))
        setattr(module, n, _LaunchRecorder(module.__name__, getattr(module, n), arch, sink))
    try:
        yield
    finally:
        for n, fn in saved:
            setattr(module, n, fn)


# ------------------------------------------------------------------------------------ compiling (workers)


def compile_and_analyse(job: dict, dump: Optional[str]) -> dict:
    """Compiles one captured launch for its arch through Triton's own pipeline and analyses the result."""
    import importlib

    arch = job["arch"]
    module = importlib.import_module(job["module"])
    jit_fn = getattr(module, job["kernel"])
    args = [MockTensor(getattr(torch, a[1]), a[2]) if isinstance(a, list) else a for a in job["args"]]
    with compile_target(arch):
        try:
            compiled = jit_fn.warmup(*args, grid=tuple(job["grid"]), **job["kwargs"])
        except Exception as err:  # noqa: BLE001 - a failed compile is a result
            return {"compiled": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"}
    try:
        out = analyse(compiled, arch, job["kwargs"].get("num_warps", 4), Path(dump) if dump else None, job["key"])
    except Exception as err:  # noqa: BLE001
        return {"compiled": True, "analysis_error": f"{type(err).__name__}: {err}"}
    return {"compiled": True, **out}


def _worker_main() -> int:
    """``--worker``: compile jobs read as JSON lines from stdin, one JSON result line each on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the compiler prints must not mix with the results
    for line in sys.stdin:
        job = json.loads(line)
        result = compile_and_analyse(job["job"], job.get("dump"))
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


def compile_all(jobs: dict, workers: int, dump: Optional[Path], progress: bool = True) -> dict:
    """{key: analysis} for every distinct job, over ``workers`` processes; a compiler crash (the process
    dies) is recorded for the job that caused it and its worker is replaced."""
    import queue
    import threading

    pending: "queue.Queue" = queue.Queue()
    for key, job in jobs.items():
        pending.put((key, job))
    results: dict = {}
    lock = threading.Lock()
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def spawn():
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)

    def run():
        proc = spawn()
        while True:
            try:
                key, job = pending.get_nowait()
            except queue.Empty:
                break
            try:
                proc.stdin.write(json.dumps({"job": job, "dump": str(dump) if dump else None}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                rc = proc.wait()
                result = {"compiled": False, "error": f"the compiler crashed (worker exit code {rc})"}
                proc = spawn()
            else:
                result = json.loads(line)
            with lock:
                results[key] = result
                if progress and len(results) % 10 == 0:
                    print(f"[static] compiled {len(results)} / {len(jobs)} ({time.time() - start:.0f} s)",
                          file=sys.stderr, flush=True)
        proc.stdin.close()
        proc.wait()

    threads = [threading.Thread(target=run) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ------------------------------------------------------------------------------------ analysis


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


# ------------------------------------------------------------------------------------ the sweep


PS_K = (49, 98, 196, 576, 1024)
PS_S_SMALL = (1, 16, 64, 256)
PS_D = (64, 256, 512, 768, 1024)
PS_BG = ((1, 1), (128, 128), (128, 1024), (1024, 1024))
MASK_P = (64, 196, 576, 1024, 4096)
MASK_C = (64, 768, 1024)
MASK_B = (1, 128, 1024)


def patch_sentence_cases(quick: bool = False) -> list:
    """(mode, shape) cases of the patch-sentence kernels: the PERF.md shapes and what users run."""
    from mlip_fast.kernels.patch_sentence import MAX_TOKENS

    s_values = PS_S_SMALL + (MAX_TOKENS - 1,)
    cases = []
    for K in PS_K:
        for S in s_values:
            for D in PS_D:
                for B, G in PS_BG:
                    if quick and (B, G) not in ((128, 128), (128, 1024)):
                        continue
                    for mode in ("fwd", "bwd"):
                        cases.append((mode, dict(B=B, G=G, K=K, S=S, D=D, directions="both")))
    for directions in ("i2t", "t2i"):
        for mode in ("fwd", "bwd"):
            cases.append((mode, dict(B=128, G=1024, K=98, S=16, D=512, directions=directions)))
    # what the losses run: normalisation fused into the op (and fp32 on the TF32 tensor cores when asked)
    for extra in (dict(normalize=True), dict(normalize=True, precision="tf32")):
        for G in (128, 1024):
            for K in PS_K:
                for mode in ("fwd", "bwd"):
                    cases.append((mode, dict(B=128, G=G, K=K, S=16, D=512, directions="both", **extra)))
    # the forward kernel v3 replaced on sm_90 (half inputs), forced at the PERF.md shapes: the model's before / after
    for extra in ({}, dict(normalize=True)):
        for G in (128, 1024):
            for K in (98, 196):
                cases.append(("fwd", dict(B=128, G=G, K=K, S=16, D=512, directions="both", **extra, kernel="v2")))
    return cases


OT_K = (49, 98, 196, 257)  # 257 with S = 16: refused up front (a pair above the forward's register tile)
OT_S = (1, 16, 32)
OT_D = (64, 512)
OT_BG = ((1, 1), (128, 128), (128, 1024))


def ot_cases(quick: bool = False) -> list:
    """(mode, shape) cases of the optimal-transport kernels; the forward with and without the tolerance check."""
    cases = []
    for K in OT_K:
        for S in OT_S:
            for D in OT_D:
                for B, G in OT_BG:
                    if quick and (B, G) not in ((128, 128), (128, 1024)):
                        continue
                    for tol in (None, 1e-3):
                        cases.append(("fwd", dict(B=B, G=G, K=K, S=S, D=D, tol=tol)))
                    cases.append(("bwd", dict(B=B, G=G, K=K, S=S, D=D, tol=None)))
    return cases


def mask_cases(quick: bool = False) -> list:
    from mlip_fast.kernels.integrity_mask import MAX_PATCHES

    cases = []
    for P in MASK_P + (MAX_PATCHES, 2 * MAX_PATCHES):  # the last is refused up front
        for C in MASK_C:
            for B in MASK_B:
                if quick and B != 128:
                    continue
                for mode in ("fwd", "bwd"):
                    cases.append((mode, dict(B=B, P=P, C=C, keep=max(1, P // 2))))
    return cases


# What CI compiles on every run (both archs), in fp32 and bf16 (fp16 compiles the same code as bf16 with another
# element type; the committed records cover it): the PERF.md shapes, and the extremes of each kernel (reports
# longer than a tile, the largest K and D, S = 1, the mask kernel's patch limit; fp64 for the mask).
GATE_PS_DEFAULT = [dict(B=128, G=G, K=K, S=16, D=D, directions="both") for G in (128, 1024) for K in (98, 196)
                   for D in (256, 512)]
GATE_PS_TRAINING = [dict(B=128, G=G, K=98, S=16, D=512, directions="both", normalize=True) for G in (128, 1024)]
GATE_PS_V2 = [dict(B=128, G=128, K=98, S=16, D=512, directions="both", normalize=True, kernel="v2")]  # fwd only
GATE_PS_EXTREME = [dict(B=128, G=128, K=98, S=32767, D=512, directions="both"),
                   dict(B=128, G=128, K=1024, S=256, D=1024, directions="both"),
                   dict(B=128, G=128, K=49, S=1, D=64, directions="both")]
GATE_MASK = [dict(B=128, P=196, C=768, keep=98), dict(B=128, P=8192, C=768, keep=4096)]
GATE_OT = [dict(B=128, G=128, K=98, S=16, D=256, tol=None), dict(B=128, G=1024, K=196, S=16, D=512, tol=1e-3)]


def gate_cases(op_name: str) -> list:
    """(mode, shape, dtypes) the CI gate compiles."""
    if op_name == "patch_sentence":
        return ([(m, sh, ("fp32", "bf16")) for sh in GATE_PS_DEFAULT for m in ("fwd", "bwd")]
                + [(m, sh, ("fp32", "bf16")) for sh in GATE_PS_TRAINING for m in ("fwd", "bwd")]
                + [("fwd", sh, ("bf16",)) for sh in GATE_PS_V2]
                + [(m, sh, ("fp32", "bf16")) for sh in GATE_PS_EXTREME for m in ("fwd", "bwd")])
    if op_name == "patch_sentence_ot":
        return [(m, sh, ("fp32", "bf16")) for sh in GATE_OT for m in ("fwd", "bwd")]
    return [(m, sh, ("fp32", "bf16", "fp64")) for sh in GATE_MASK for m in ("fwd", "bwd")]


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def run_patch_sentence(mode: str, shape: dict, dtype: torch.dtype) -> None:
    from mlip_fast.kernels import patch_sentence as ps

    B, G, K, S, D = (shape[k] for k in "BGKSD")
    do_i2t = shape["directions"] in ("both", "i2t")
    do_t2i = shape["directions"] in ("both", "t2i")
    normalize, tf32 = shape.get("normalize", False), shape.get("precision") == "tf32"
    p, s = _meta(B, K, D, dtype=dtype), _meta(G, S, D, dtype=dtype)
    smask, pmask = _meta(G, S, dtype=torch.bool), _meta(B, K, dtype=torch.bool)
    if mode == "fwd":
        ps.patch_sentence_fwd(p, s, smask, pmask, do_i2t, do_t2i, normalize=normalize, tf32=tf32,
                              kernel=shape.get("kernel"))
    else:
        g = _meta(B, G, dtype=torch.float32)
        inv = dict(inv_p=_meta(B, K, dtype=torch.float32), inv_s=_meta(G, S, dtype=torch.float32)) if normalize else {}
        ps.patch_sentence_bwd(
            g if do_i2t else None, g if do_t2i else None, p, s,
            _meta(B, G, K, dtype=torch.int16), _meta(B, G, S, dtype=torch.int16), smask, pmask, tf32=tf32, **inv,
        )


def run_mask(mode: str, shape: dict, dtype: torch.dtype) -> None:
    from mlip_fast.kernels import integrity_mask as im

    B, P, C, keep = shape["B"], shape["P"], shape["C"], shape["keep"]
    if mode == "fwd":
        im.integrity_mask_fwd(_meta(B, P, C, dtype=dtype), _meta(B, P, dtype=dtype), keep, 1.0, 0)
    else:
        im.integrity_mask_bwd(_meta(B, keep, C, dtype=dtype), _meta(B, P, dtype=torch.int32))


def run_patch_sentence_ot(mode: str, shape: dict, dtype: torch.dtype) -> None:
    from mlip_fast.kernels.patch_sentence_ot import launch

    B, G, K, S, D = (shape[k] for k in "BGKSD")
    p, s = _meta(B, K, D, dtype=dtype), _meta(G, S, D, dtype=dtype)
    if mode == "fwd":
        launch.patch_sentence_ot_fwd(p, s, _meta(G, S, dtype=torch.bool), _meta(B, K, dtype=torch.bool), 0.05, 50,
                                     shape["tol"])
    else:
        f32 = torch.float32
        launch.patch_sentence_ot_bwd(_meta(B, G, dtype=f32), p, s, _meta(B, G, K, dtype=f32), _meta(B, G, S, dtype=f32),
                                     0.05)


@dataclass
class Op:
    name: str
    module: str
    kernels: tuple
    cases: Callable
    run: Callable
    dtypes: tuple
    matmul: tuple  # the kernels whose half-precision versions must use tensor cores


PS_KERNELS = ("_patch_sentence_fwd_kernel", "_patch_sentence_fwd_v3_kernel", "_patch_sentence_bwd_kernel")
PS_SIDE_KERNELS = ("_patch_sentence_prep_kernel", "_patch_sentence_weights_kernel", "_patch_sentence_grad_epilogue_kernel")
OPS = (
    # the launch module: the launchers look their kernels up there, so that is where recording() replaces them
    Op("patch_sentence", "mlip_fast.kernels.patch_sentence.launch", PS_KERNELS + PS_SIDE_KERNELS,
       patch_sentence_cases, run_patch_sentence, ("fp32", "bf16", "fp16"), PS_KERNELS),
    Op("integrity_mask", "mlip_fast.kernels.integrity_mask.launch",
       ("_integrity_mask_fwd_kernel", "_integrity_mask_bwd_kernel"),
       mask_cases, run_mask, ("fp32", "bf16", "fp16", "fp64"), ()),
)


# The optimal-transport kernels (kernels/patch_sentence_ot/); both contain the matmuls that must use tensor cores.
OT_KERNELS = ("_patch_sentence_ot_fwd_kernel", "_patch_sentence_ot_bwd_kernel")
OPS = OPS + (
    Op("patch_sentence_ot", "mlip_fast.kernels.patch_sentence_ot.launch", OT_KERNELS, ot_cases, run_patch_sentence_ot,
       ("fp32", "bf16", "fp16"), OT_KERNELS),
)


def collect(archs=(80, 90), quick: bool = False, ops=OPS, gate: bool = False) -> list:
    """Every case of every op on every arch and dtype, run through the launchers on meta tensors:
    [(op, mode, dtype, shape, launches or the refusal)]. Nothing is compiled here. ``gate``: only the cases
    of :func:`gate_cases`."""
    import importlib

    cases = []
    for arch in archs:
        with compile_target(arch):
            for op in ops:
                module = importlib.import_module(op.module)
                if gate:
                    todo = [(d, m, sh) for m, sh, dts in gate_cases(op.name) for d in dts]
                else:
                    todo = [(d, m, sh) for d in op.dtypes for m, sh in op.cases(quick)]
                for dname, mode, shape in todo:
                    launches: list = []
                    error = None
                    with recording(module, op.kernels, arch, launches):
                        try:
                            op.run(mode, shape, DTYPES[dname])
                        except Exception as err:  # noqa: BLE001 - a refusal is a result
                            error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
                    cases.append((op, mode, dname, shape, arch, launches, error))
    return cases


def sweep(archs=(80, 90), quick: bool = False, dump: Optional[Path] = None, ops=OPS, workers: int = 2,
          progress: bool = True, gate: bool = False) -> list:
    """One record per kernel launch the launchers make over the sweep, each with its compile analysis."""
    cases = collect(archs, quick, ops, gate)
    jobs = {}
    for *_, launches, _ in cases:
        for ln in launches:
            jobs.setdefault(ln.key, dict(module=ln.module, kernel=ln.kernel, arch=ln.arch, grid=list(ln.grid),
                                         args=ln.args, kwargs=ln.kwargs, key=ln.key))
    if progress:
        print(f"[static] {sum(len(c[5]) for c in cases)} launches, {len(jobs)} distinct compiles", file=sys.stderr)
    analysed = compile_all(jobs, workers, dump, progress)
    records = []
    for op, mode, dname, shape, arch, launches, error in cases:
        if error is not None and not launches:
            records.append(dict(op=op.name, mode=mode, kernel=None, arch=ARCHS[arch]["name"], dtype=dname,
                                shape=shape, compiled=False, refused=error))
            continue
        for ln in launches:
            rec = dict(op=op.name, mode=mode, kernel=ln.kernel, arch=ARCHS[arch]["name"], dtype=dname, shape=shape,
                       grid=list(ln.grid), programs=int(_prod(ln.grid)), matmul=ln.kernel in op.matmul,
                       config={k: v for k, v in ln.kwargs.items()},
                       compile_id=hashlib.sha1(ln.key.encode()).hexdigest()[:12])
            rec.update(analysed[ln.key])
            records.append(rec)
    return records


def _prod(xs):
    n = 1
    for x in xs:
        n *= int(x)
    return n


# ------------------------------------------------------------------------------------ gate and summary


def violations(records: list) -> list:
    """Records that break the static gate: not compiled (and not refused up front), spills, shared memory
    above the arch limit, or a half-precision matmul kernel without tensor-core instructions."""
    bad = []
    for r in records:
        if r.get("refused"):
            continue
        why = []
        if not r.get("compiled"):
            why.append(f"does not compile: {r.get('error')}")
        else:
            if r.get("analysis_error"):
                why.append(r["analysis_error"])
            if r.get("spill_bytes", 0) > 0:
                why.append(f"spills {r['spill_bytes']} bytes")
            if r.get("shared_bytes", 0) > r.get("shared_limit", 1 << 62):
                why.append(f"shared memory {r['shared_bytes']} > {r['shared_limit']}")
            if r.get("matmul") and r["dtype"] in ("bf16", "fp16") and r.get("tensor_core_sass", 0) == 0:
                why.append("no tensor-core instructions")
        if why:
            bad.append((r, why))
    return bad


_FLAG_PREFIXES = ("HAS_", "DO_", "UPCAST", "USE_", "SEED_", "NORMALIZE", "PRECISION", "NAN_REDUCE")


def summary_rows(records: list) -> list:
    """The README table: the PERF.md shape (B=128 x G=1024, K=98, S=16, D=512) for each patch-sentence kernel (the
    forward v2 forced on sm_90 too; side kernels left out) and the mask kernels at P=196, C=768 (fp32 and bf16; fp64
    for the mask), on both archs."""
    rows = []
    for r in records:
        if not r.get("compiled"):
            continue
        if r["op"] == "patch_sentence":
            main = dict(B=128, G=1024, K=98, S=16, D=512, directions="both")
            shapes = (main, dict(main, normalize=True), dict(main, normalize=True, kernel="v2"))
            if r["shape"] in shapes and r["dtype"] in ("fp32", "bf16") and r["kernel"] in PS_KERNELS:
                rows.append(r)
        elif r["shape"] == dict(B=128, P=196, C=768, keep=98) and r["dtype"] in ("fp32", "bf16", "fp64"):
            rows.append(r)
    return rows


def table_markdown(data: dict) -> str:
    recs = unpack(data)
    env = data["environment"]
    lines = [
        f"**kernel_static.json**: static compile (no GPU), triton {env['triton']}, ptxas of the triton wheel, "
        f"{env['date']}; {len(recs)} launches, {data['distinct_compiles']} distinct compiles, "
        f"{len(violations(recs))} gate violations, {sum(1 for r in recs if r.get('refused'))} shapes refused up front",
        "",
        "| kernel | arch | dtype | shape | tile | regs | spill B | shared B | blocks/SM | TC instr | hot loop SASS instr |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary_rows(recs):
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "directions")
        cfg = " ".join(f"{k}={v}" for k, v in r["config"].items()
                       if (k.isupper() and not k.startswith(_FLAG_PREFIXES)) or k == "num_warps")
        name = r["kernel"].strip("_").replace("_kernel", "")
        lines.append(
            f"| {name} | {r['arch']} | {r['dtype']} | {shape} | {cfg} | {r['registers']} | "
            f"{r['spill_bytes']} | {r['shared_bytes']} | {r['blocks_per_sm']} ({r['limited_by']}) | "
            f"{r['tensor_core_sass']} | {', '.join(map(str, r['hot_loop_instructions']))} |"
        )
    worst = {}
    for r in recs:
        if r.get("compiled"):
            k = (r["kernel"], r["arch"])
            if k not in worst or (r["registers"], r["shared_bytes"]) > (worst[k]["registers"], worst[k]["shared_bytes"]):
                worst[k] = r
    lines += ["", "Largest register / shared-memory footprint of each kernel over the whole sweep (all spill-free):", "",
              "| kernel | arch | dtype | shape | regs | spill B | shared B | blocks/SM |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (kern, arch), r in sorted(worst.items()):
        shape = " ".join(f"{k}={v}" for k, v in r["shape"].items() if k != "directions")
        lines.append(f"| {kern.strip('_').replace('_kernel', '')} | {arch} | {r['dtype']} | {shape} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes']} | {r['blocks_per_sm']} |")
    return "\n".join(lines)


GATE_FIELDS = ("compiled", "registers", "spill_bytes", "stack_bytes", "shared_bytes", "tensor_core_sass")
# Fields every launch record keeps; the rest of a compile's analysis (loops, ptxas report, occupancy detail)
# is stored once per distinct compile under "compiles" (the same kernel compiles for many shapes).
RECORD_FIELDS = ("op", "mode", "kernel", "arch", "dtype", "shape", "grid", "programs", "compile_id", "refused",
                 "compiled", "error", "registers", "spill_bytes", "shared_bytes", "blocks_per_sm")


def pack(records: list, env: dict, **extra) -> dict:
    """The JSON layout: compact launch records plus one full analysis per distinct compile."""
    compiles = {}
    for r in records:
        if r.get("compile_id") and r["compile_id"] not in compiles:
            compiles[r["compile_id"]] = {k: v for k, v in r.items()
                                         if k not in RECORD_FIELDS or k in GATE_FIELDS or k == "blocks_per_sm"}
    slim = [{k: r[k] for k in RECORD_FIELDS if k in r} for r in records]
    return {"environment": env, **extra, "distinct_compiles": len(compiles), "records": slim, "compiles": compiles}


def unpack(data: dict) -> list:
    """Launch records with their compile's full analysis merged back in."""
    compiles = data.get("compiles", {})
    return [{**compiles.get(r.get("compile_id"), {}), **r} for r in data["records"]]


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
        print(f"[gate] {committed} is missing: run benchmarks/kernel_static.py --json {committed}", file=sys.stderr)
        return 1
    data = json.loads(committed.read_text())
    if data["environment"]["triton"] != triton.__version__:
        problems.append(f"committed records are from triton {data['environment']['triton']}, this is {triton.__version__}")
    committed_records = unpack(data)
    by_id = {r["compile_id"]: r for r in committed_records if r.get("compile_id")}
    for r, why in violations(committed_records):
        problems.append(f"committed record violates the gate: {_describe(r)}: {'; '.join(why)}")
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
        problems.append(f"{_describe(r)}: {'; '.join(why)}")
    for r in records:
        old = by_id.get(r.get("compile_id"))
        if old is not None:
            diff = {f: (old.get(f), r.get(f)) for f in GATE_FIELDS if old.get(f) != r.get(f)}
            if diff:
                problems.append(f"{_describe(r)} differs from its committed record: {diff}")
    ids = {r.get("compile_id") for r in records}
    print(f"[gate] {len(records)} gate launches ({len(ids)} distinct compiles) on sm_80 and sm_90, "
          f"{sum(len(c[5]) for c in full)} sweep launches checked against {committed.name}, "
          f"{len(problems)} problems, {time.time() - start:.0f} s")
    for p in problems:
        print(f"[gate] FAIL {p}", file=sys.stderr)
    return 1 if problems else 0


def _describe(r: dict) -> str:
    return f"{r['arch']} {r.get('kernel') or r['op']} {r['mode']} {r['dtype']} {r['shape']} config={r.get('config')}"


def environment() -> dict:
    import datetime
    import platform

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
    """Kernels must be decorated for a real GPU target: read when ``mlip_fast.kernels`` is first imported."""
    if "mlip_fast.kernels.patch_sentence" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("kernel_static needs a process whose kernels were not decorated under TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "0"


def main(argv=None) -> int:
    _no_interpreter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
        return _worker_main()
    why = tools_available()
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.readme:
        import harness

        harness.write_readme_table()
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


if __name__ == "__main__":
    sys.exit(main())
