"""The sweep: every (mode, shape, dtype) case of every op's kernels, run through the real launchers of ``kernels/``
on ``meta`` tensors under a stand-in target, so the block-size heuristics, constexprs, grids and split decisions
are those of a real launch; the launches are captured and compiled once per distinct specialisation. The gate
cases are the subset CI compiles on every run.
"""
from __future__ import annotations

import hashlib
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from mlip_fast.kernels import integrity_mask as im
from mlip_fast.kernels import patch_sentence as ps
from mlip_fast.kernels.integrity_mask import MAX_PATCHES
from mlip_fast.kernels.patch_sentence import MAX_TOKENS
from mlip_fast.kernels.patch_sentence_ot import launch as ot_launch
from tools.kernel_static.analysis import ARCHS, DTYPES
from tools.kernel_static.compile import compile_all, compile_target, recording
from tools.kernel_static.records import PS_KERNELS

PS_K = (49, 98, 196, 576, 1024)
PS_S_SMALL = (1, 16, 64, 256)
PS_D = (64, 256, 512, 768, 1024)
PS_BG = ((1, 1), (128, 128), (128, 1024), (1024, 1024))
MASK_P = (64, 196, 576, 1024, 4096)
MASK_C = (64, 768, 1024)
MASK_B = (1, 128, 1024)


def patch_sentence_cases(quick: bool = False) -> list:
    """(mode, shape) cases of the patch-sentence kernels: the PERF.md shapes and what users run."""
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
    B, P, C, keep = shape["B"], shape["P"], shape["C"], shape["keep"]
    if mode == "fwd":
        im.integrity_mask_fwd(_meta(B, P, C, dtype=dtype), _meta(B, P, dtype=dtype), keep, 1.0, 0)
    else:
        im.integrity_mask_bwd(_meta(B, keep, C, dtype=dtype), _meta(B, P, dtype=torch.int32))


def run_patch_sentence_ot(mode: str, shape: dict, dtype: torch.dtype) -> None:
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    p, s = _meta(B, K, D, dtype=dtype), _meta(G, S, D, dtype=dtype)
    if mode == "fwd":
        ot_launch.patch_sentence_ot_fwd(p, s, _meta(G, S, dtype=torch.bool), _meta(B, K, dtype=torch.bool), 0.05, 50,
                                     shape["tol"])
    else:
        f32 = torch.float32
        ot_launch.patch_sentence_ot_bwd(_meta(B, G, dtype=f32), p, s, _meta(B, G, K, dtype=f32), _meta(B, G, S, dtype=f32),
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
