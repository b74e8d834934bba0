"""The chunked OT op's Sinkhorn iterations as a small C kernel (``sinkhorn_cpu.c``: math, layout and numerics in
its header), built on first use with the system's C compiler and called through ctypes.

Why: on CPU the PyTorch loop spends an iteration in two batched vector-matrix products over a whole tile (about
1 MiB, re-read from L2 each time) and a dozen operator calls; the kernel keeps 16 pairs' K x S blocks in L1 for
all the iterations, makes the plan exp(z) there and absorbs out-of-range scalings in the log domain itself (in
training a tile's groups absorb about 20 times in all: handed back to PyTorch, those rounds cost more than the
iterations). Lane groups are split over ``torch.get_num_threads()`` threads: torch's own OpenMP threads when
the build could use its runtime (``kernels/_native.py``), else a Python pool (ctypes releases the GIL); pairs are
independent, so the split never changes a number.

Build and cache: ``kernels/_native.py`` (built on first use with the system's C compiler, cached per source,
compiler, flags and CPU). No compiler, a failed build or ``MLIP_FAST_CPU_KERNELS=0``: :func:`library` returns None
(with one warning for a failure) and the op runs its PyTorch loop, with the same iterates up to the order of the
sums.
"""
from __future__ import annotations

import ctypes
import math
import threading
from pathlib import Path
from typing import Optional, Tuple

import torch

from mlip_fast.kernels import _native

__all__ = ["LANES", "SOURCE", "enabled", "library", "runs", "status", "sinkhorn", "PairSinkhorn", "plan_",
           "workspace"]

LANES = 16  # pairs per lane group; the C source's LANES
SOURCE = Path(__file__).with_name("sinkhorn_cpu.c")
FLAGS = _native.FLAGS
NATIVE_FLAGS = _native.NATIVE_FLAGS
STATS = {"tiles": 0, "absorptions": 0}  # tiles the kernel ran, absorptions of a lane group it made
_local = threading.local()  # per-thread reusable buffers (:func:`workspace`)
_state: dict = {}  # "lib": CDLL or None once decided, "why": the reason when None


enabled = _native.enabled
_compiler = _native.compiler


def _build() -> Path:
    return _native.build(SOURCE, FLAGS, NATIVE_FLAGS, openmp=True)


def _declare(lib: ctypes.CDLL) -> None:
    fn = lib.mlip_sinkhorn_lanes
    fn.restype = ctypes.c_int64
    fn.argtypes = [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 13 + [ctypes.c_float] * 3
    parts = lib.mlip_sinkhorn_lanes_parts
    parts.restype, parts.argtypes = ctypes.c_int64, [ctypes.c_int64, ctypes.c_void_p] + fn.argtypes[2:]
    lib.mlip_ot_lanes_from_sim.restype = None
    lib.mlip_ot_lanes_from_sim.argtypes = ([ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 4 + [ctypes.c_float]
                                           + [ctypes.c_void_p] * 4)
    lib.mlip_ot_plan.restype = ctypes.c_int64
    lib.mlip_ot_plan.argtypes = [ctypes.c_int64] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 4


def library() -> Optional[ctypes.CDLL]:
    """The built kernel library, or None when it is off or cannot be built (the reason: :func:`status`)."""
    return _native.load(_state, _build, _declare, "the CPU Sinkhorn kernel could not be built ({why}); the chunked "
                        "OT op runs its PyTorch loop instead")


def status(dtype: torch.dtype = torch.float32) -> str:
    """What runs the iterations of CPU tiles computed in ``dtype`` (fp32 for half inputs), for run records."""
    if dtype == torch.float64:
        return "pytorch (fp64: the C kernel is fp32)"
    if not enabled():
        return "pytorch (MLIP_FAST_CPU_KERNELS=0)"
    return "c" if library() is not None else f"pytorch (C kernel unavailable: {_state.get('why')})"


def runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :func:`sinkhorn` computes iterations on ``device`` in ``dtype`` (fp32 on CPU, kernel built)."""
    return device.type == "cpu" and dtype == torch.float32 and library() is not None


def workspace(name: str, shape: tuple, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU buffer of ``shape``, kept per thread and reused across tiles and calls: a tile's 1 MiB
    buffers would otherwise come fresh from the allocator each time and fault in page by page (about 3 ms of the
    op's forward at the default run's shape). The caller must be done with it before asking for ``name`` again."""
    bufs = _local.__dict__.setdefault("bufs", {})
    numel = math.prod(shape)
    buf = bufs.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = bufs[name] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def _lanes(x: torch.Tensor, groups: int, fill, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, M] -> [groups, M, LANES] (pair n at group n // LANES, lane n % LANES), extra pairs filled; into ``out``
    when given."""
    n, m = x.shape
    if out is None:
        out = torch.empty(groups, m, LANES, dtype=x.dtype)
    full, rest = divmod(n, LANES)
    by_pair = out.transpose(1, 2)  # [groups, LANES, M], a view
    by_pair[:full].copy_(x[:full * LANES].reshape(full, LANES, m))
    if full < groups:
        by_pair[full, :rest].copy_(x[full * LANES:])
        by_pair[full, rest:].fill_(fill)
    return out


def _group_cuts(groups: int) -> list:
    """Lane-group boundaries cutting ``groups`` into min(torch.get_num_threads(), groups) even parts."""
    threads = max(1, min(torch.get_num_threads(), groups))
    return [groups * i // threads for i in range(threads + 1)]


def _unlanes(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(-1, x.shape[1])[:n]


def sinkhorn(z: torch.Tensor, live_p: torch.Tensor, live_q: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
             n_iter: int, lo: float, hi: float) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The chunked op's Sinkhorn on one tile from f = g = 0, in the kernel (its absorptions included).

    Args:
        z: [N, K, S] fp32 on CPU, sim / eps on the live entries and the op's DEAD (finite) elsewhere.
        live_p, live_q: [N, K] / [N, S] bool; log_a, log_b: their log marginals (DEAD where not live).
        n_iter: iterations; lo, hi: the scalings' range before an absorption.
    Returns:
        (f [N, K], g [N, S], score / eps [N]) after ``n_iter`` iterations, as ``_TileSinkhorn.run`` (each lane
        group absorbs when one of its scalings leaves [lo, hi]: ``sinkhorn_cpu.c``); None when the kernel does
        not run here.
    """
    if not runs(z.device, z.dtype):
        return None
    n, k, s = live_p.shape[0], live_p.shape[1], live_q.shape[1]
    pairs = PairSinkhorn(live_p, live_q, log_a, log_b, n_iter, lo, hi)
    # padding pairs: z = 0 with uniform marginals (every scaling stays 1)
    groups = pairs.f.shape[0]
    pairs.iterate(_lanes(z.reshape(n, k * s), groups, 0.0, workspace("z_lanes", (groups, k * s, LANES))), 0)
    return pairs.result()


class PairSinkhorn:
    """The kernel's Sinkhorn over N pairs (live masks [N, K] / [N, S], log marginals DEAD where not live) whose
    similarities come tile by tile: the masks, marginals and lane buffers are made once for all N pairs instead of
    a dozen operators per tile, and each tile's z is formed and iterated in them. A pair's numbers never depend on
    its tile, so the result is bitwise that of running the tiles one by one.

    ``tile(n0, sim, eps)``: the pairs [n0, n0 + bc gc) whose similarities are ``sim`` [bc, K, gc, S] (the GEMM's
    output, pair n0 + b gc + g, contiguous fp32; n0 a multiple of LANES): the kernel forms z = sim / eps (DEAD off
    the live entries) in its lane layout itself and iterates. ``result()``: (f [N, K], g [N, S], score / eps [N]),
    as :func:`sinkhorn`."""

    def __init__(self, live_p: torch.Tensor, live_q: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
                 n_iter: int, lo: float, hi: float):
        self.n, self.k, self.s = live_p.shape[0], live_p.shape[1], live_q.shape[1]
        groups = -(-self.n // LANES)
        self.live_p, self.live_q = live_p.contiguous(), live_q.contiguous()
        self.live_pl, self.live_ql = _lanes(self.live_p, groups, True), _lanes(self.live_q, groups, True)
        self.log_al = _lanes(log_a, groups, -math.log(self.k))
        self.log_bl = _lanes(log_b, groups, -math.log(self.s))
        self.tiny = torch.finfo(torch.float32).tiny
        # dead: tiny, so their scaling is 1
        self.a, self.b = self.log_al.exp().clamp_min(self.tiny), self.log_bl.exp().clamp_min(self.tiny)
        self.f, self.g = torch.empty_like(self.a), torch.empty_like(self.b)
        self.u, self.v = torch.empty_like(self.a), torch.empty_like(self.b)
        self.score = torch.empty(groups, LANES, dtype=torch.float32)
        self.n_iter, self.lo, self.hi = n_iter, lo, hi

    def tile(self, n0: int, sim: torch.Tensor, eps: float) -> None:
        if n0 % LANES or not sim.is_contiguous():
            raise ValueError(f"a tile starts at a multiple of {LANES} pairs and is contiguous (pair {n0})")
        bc, k, gc, s = sim.shape
        n = bc * gc
        groups = -(-n // LANES)
        zl = workspace("z_lanes", (groups, k * s, LANES))
        cuts = torch.tensor(_group_cuts(groups), dtype=torch.int64)
        library().mlip_ot_lanes_from_sim(cuts.numel() - 1, cuts.data_ptr(), k, s, gc, n, eps, sim.data_ptr(),
                                         self.live_p[n0:].data_ptr(), self.live_q[n0:].data_ptr(), zl.data_ptr())
        self.iterate(zl, n0 // LANES)

    def iterate(self, zl: torch.Tensor, g0: int) -> None:
        """The iterations of lane groups [g0, g0 + len(zl)) from their z lanes ``zl``."""
        groups = zl.shape[0]
        kern = workspace("kern_lanes", zl.shape)  # made in the kernel
        own = (self.a, self.b, self.log_al, self.log_bl, self.live_pl, self.live_ql, self.f, self.g, self.u, self.v,
               self.score)
        ptrs = [kern.data_ptr(), zl.data_ptr()] + [t[g0:g0 + groups].data_ptr() for t in own]
        absorbed = sum(_native.split(library(), "mlip_sinkhorn_lanes", _group_cuts(groups),
                                     (self.k, self.s, self.n_iter, *ptrs, self.lo, self.hi, self.tiny)))
        STATS["tiles"] += 1
        STATS["absorptions"] += absorbed

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f [N, K], g [N, S], score / eps [N]), contiguous (one lane group's reshape can be a strided view)."""
        return (_unlanes(self.f + self.u.log(), self.n).contiguous(),
                _unlanes(self.g + self.v.log(), self.n).contiguous(), self.score.view(-1)[:self.n])


def plan_(m: torch.Tensor, f: torch.Tensor, g: torch.Tensor, w: torch.Tensor, eps: float) -> bool:
    """The backward's plan tile in place, in one pass of the kernel (``mlip_ot_plan``): m [bc, K, gc, S] (the
    similarities, contiguous) <- exp(m / eps + f[b, g, p] + g[b, g, q]) * w[b, g], with f [bc, gc, K], g [bc, gc, S]
    and w [bc, gc]. False (m untouched) when the kernel does not run here."""
    if not runs(m.device, m.dtype) or not m.is_contiguous():
        return False
    f, g, w = f.contiguous(), g.contiguous(), w.contiguous()
    bc, k, gc, s = m.shape
    if library().mlip_ot_plan(bc, k, gc, s, eps, m.data_ptr(), f.data_ptr(), g.data_ptr(), w.data_ptr()):
        raise MemoryError("the CPU OT kernel could not allocate its scratch row")
    return True
