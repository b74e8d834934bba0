"""Launch heuristics of the fused patch-sentence kernels: which forward kernel runs where and why, block sizes per
input and GPU, the size limits ``impl="auto"`` sees, and how many programs share a backward output tile.

Block sizes are those the static compile (``tools/kernel_static``) checks spill-free on sm_80 and sm_90;
where a choice depends on how many blocks an SM holds, the figure is that static record's.

The configs are pure functions of sizes, dtype and card, and are cached on them (:func:`_cached`): the v3
forward's split search and the backward's split search evaluate hundreds of candidates, which cost host time on
every call of the op when they were recomputed (the op is host-bound at one GPU's batch, see the GPU check).
"""
from __future__ import annotations

import functools
from typing import List

import torch

from mlip_fast.kernels._common import INTERPRET, cdiv
from mlip_fast.kernels._common import half as _half
from mlip_fast.kernels._common import pow2 as _pow2

MAX_TOKENS = 2**15  # argmax indices are int16: K and S must stay below
NORM_EPS = 1e-12  # F.normalize's floor on the norm


def _cached(fn):
    """``fn`` (a pure function of hashable arguments returning a dict) cached on its arguments; each call gets a
    fresh copy, so a caller that edits its config cannot change the next caller's."""
    cached = functools.lru_cache(maxsize=4096)(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs) -> dict:
        return dict(cached(*args, **kwargs))

    call.cache_clear = cached.cache_clear
    call.cache_info = cached.cache_info
    return call


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    """``tl.dot``'s input precision: TF32 only when asked for fp32 inputs on a GPU (the interpreter's dot is
    plain numpy fp32 whatever it is told); half inputs ignore it."""
    return "tf32" if (tf32 and dtype == torch.float32 and not INTERPRET) else "ieee"


def s_tile(dtype: torch.dtype, arch: int) -> int:
    """Most sentence rows in one forward tile; longer reports take the multi-chunk (LARGE_S) path."""
    if INTERPRET:
        return 64
    return 128 if _half(dtype) else 64


def limits(K: int, S: int, dtype: torch.dtype, arch: int) -> List[str]:
    """Why the kernels cannot take these sizes (empty: they can). ``auto`` falls back on any reason."""
    reasons = []
    if max(K, S) >= MAX_TOKENS:
        reasons.append(f"K={K} and S={S} must be below {MAX_TOKENS} (argmax indices are int16)")
    return reasons


MIN_SLOTS = 16  # sentence slots per report in a forward tile


@_cached
def fwd_config(B: int, K: int, G: int, S: int, D: int, dtype: torch.dtype, arch: int, sm_count: int, *,
               normalize: bool = False, directions: str = "both") -> dict:
    """Block sizes of the forward for these sizes on compute capability ``arch`` (checked spill-free on sm_80
    and sm_90 by ``tools/kernel_static``).

    Half inputs: 128 sentence rows (GB reports x S_CH slots, S padded to at least 16 slots) per tile, D
    in chunks of 64, 8 warps; 128 patches per tile and 3 pipeline stages on sm_90 (96 KiB of shared memory),
    64 patches and 2 stages on sm_80 (its mma.sync accumulators hold twice the registers), and 64 patches on sm_90
    too when the tile is normalised. fp32 (FMA, no tensor cores): 64 x 32 tiles, D chunks of 32 on sm_90 with 4
    warps; on sm_80 chunks of 16 (32 for 64-slot reports) with 2 warps (see the comment below).
    Reports longer than 128 (fp32: 64) rows take the
    chunked-sentence path with one report per program and several images per program (its scratch row is
    reused). The interpreter takes tiles of at most 64 rows (each op has a fixed Python cost, so few and
    large ops, but tests exercise several chunks).
    """
    s_pad = _pow2(S)
    rows = s_tile(dtype, arch)
    large_s = s_pad > rows
    # Reports shorter than 16 sentences are padded to 16 slots: a report then fills the rows of one warp,
    # and the tile (and its compile) is that of S = 16. The tile does not shrink for small G (rows past G are
    # masked), so every G shares one compile.
    s_ch = rows if large_s else max(s_pad, MIN_SLOTS)
    gb = 1 if large_s else max(1, rows // s_ch)
    if INTERPRET:
        bn = min(64, _pow2(K, 16))
        bd = min(128, _pow2(D, 16))
        warps, stages = 4, 1
    elif _half(dtype):
        # the normalised tile (two inverse-norm vectors live in the epilogue) spills at 128 patches on sm_90
        bn = 64 if (K <= 64 or arch < 90 or normalize) else 128
        bd = 64
        warps = 8 if gb * s_ch >= 128 else 4
        stages = 3 if arch >= 90 else 2
    else:
        bn, bd = 32, (32 if (arch >= 90 or (s_ch >= 64 and not large_s)) else 16)
        # sm_80's ptxas caps this FMA tile near 168 registers at 4 warps (128 at 8) and spills; 2 warps keep it at
        # 255 without spilling; t2i alone fits in 4 warps, i2t alone in 2 warps with D chunks of 8
        warps = 4 if (arch >= 90 or directions == "t2i") else 2
        if arch < 90 and directions == "i2t":
            bd = 8
        stages = 2
    n_rb = cdiv(G, gb)
    if INTERPRET:
        ib = B
    elif large_s:  # a few programs per SM, each with a scratch row it reuses for all its images
        ib = cdiv(B, max(1, (4 * max(sm_count, 1)) // n_rb))
    else:  # several images per program only when that still leaves about eight programs per SM
        ib = min(8, max(1, min(B, (n_rb * B) // (8 * max(sm_count, 1)))))
    return dict(GB=gb, S_CH=s_ch, BN=bn, BD=bd, LARGE_S=large_s, IB=ib, num_warps=warps, num_stages=stages)


# The persistent sm_90 forward (forward_v3.py): 8 reports x 16 sentence slots resident in registers (D / 4 of them
# per thread), patch tiles of 64 streamed through 2 shared-memory stages of [64, D] (128 KiB at D = 512).
V3_SLOTS = 16
V3_REPORTS = 8
V3_MAX_D = 512
V3_BOX = 256  # widest TMA box


def fwd_v3_reasons(K: int, S: int, D: int, dtype: torch.dtype, arch: int) -> List[str]:
    """Why the persistent sm_90 forward cannot take these inputs (empty: it can); the launcher then runs
    ``forward.py``'s kernel. Contiguity and 16-byte alignment of the tensors are checked at launch."""
    why = []
    if arch != 90:
        why.append(f"compute capability {arch} (v3 is the sm_90 kernel: TMA descriptors, wgmma)" if arch else
                   "no GPU target (v3 is the sm_90 kernel)")
    if not _half(dtype):
        why.append(f"{str(dtype).replace('torch.', '')} inputs (v3 packs indices into keys within the half-precision "
                   "error bound; fp32 / tf32 keep exact maxima)")
    if S > V3_SLOTS:
        why.append(f"S={S} > {V3_SLOTS} sentence slots per report")
    if D > V3_MAX_D:
        why.append(f"D={D} > {V3_MAX_D} (the resident sentence block would not fit the registers)")
    if D % 8:
        why.append(f"D={D} not a multiple of 8 (TMA rows must be 16-byte multiples)")
    return why


@_cached
def fwd_v3_config(B: int, K: int, G: int, S: int, D: int, sm_count: int, directions: str = "both") -> dict:
    """Tile and schedule of the v3 forward: GB reports x 16 slots, BN patches per tile, D in one or two TMA boxes,
    and images split over programs so that the programs (one resident per SM: about 250 registers x 8 warps)
    fill the SMs in the fewest rounds of work (``IMGS`` images per program). 64 patches per tile for both
    directions, 32 for one (ptxas spills the one-direction 64-patch tile at D = 512 by a few dozen bytes)."""
    dc = min(V3_BOX, _pow2(D, 16))
    n_rb = cdiv(G, V3_REPORTS)
    sms = max(1, sm_count)
    # rounds of programs on the busiest SM x (images per program + about one image's worth of start-up: the
    # resident block's load and the first tile's latency), over the splits of the images
    split = min(range(1, B + 1), key=lambda s: (cdiv(n_rb * s, sms) * (cdiv(B, s) + 1), s))
    if INTERPRET:
        split = 1
    return dict(GB=V3_REPORTS, S_CH=V3_SLOTS, BN=64 if directions == "both" else 32, DC=dc, NUM_DC=cdiv(D, dc), STAGES=2,
                IMGS=cdiv(B, split), num_warps=8)


@_cached
def bwd_config(X: int, R: int, Y: int, C: int, D: int, dtype: torch.dtype, arch: int, own_is_patch: bool,
               atomic: bool = False) -> dict:
    """Block sizes of one backward side (checked spill-free on sm_80 and sm_90 by the static tool).

    Own rows: 64 (half) or 32 (fp32) per program; other columns: about 64 per step, sentence slots padded to at
    least 4 (tiny S would otherwise put 64 entities in one block); D columns per program: 256 on sm_90 (4 warps
    and two blocks per SM for 16-slot reports) and 128 on sm_80 (8 warps) for half inputs (the block of M is built once for all of
    them), 64 for fp32, whose FMA dot keeps its operands in registers.
    """
    half = _half(dtype) and not INTERPRET
    rows = 64 if (half or INTERPRET) else 32
    cols = 64 if (half or INTERPRET) else 32
    min_slots = 4
    if own_is_patch:  # rows: patch chunk of one image; columns: YB reports of CB = S slots
        xb, rb = 1, min(rows, _pow2(R, 16))
        cb = min(_pow2(C, min_slots), cols)
        yb = max(1, cols // cb)
        while yb * cb < 16:
            yb *= 2
    else:  # rows: XB reports of RB = S slots; columns: a patch chunk of one image
        rb = min(_pow2(R, min_slots), rows)
        xb = max(1, rows // rb)
        while xb * rb < 16:
            xb *= 2
        yb, cb = 1, min(cols, _pow2(C, 16))
    if INTERPRET:
        dc_max = 128
    elif half:
        dc_max = 256 if arch >= 90 else 128
    else:
        dc_max = 64
    dc = min(dc_max, _pow2(D, 16))
    # sm_90, reports of 9 to 16 sentences (16 slots), plain stores: 4 warps (one warpgroup) keep two blocks
    # resident per SM, so one block builds its block of M while the other's wgmma runs. Other slot counts (more
    # entities or wider compact loads per step), the atomic epilogue and sm_80's mma.sync accumulators need 8
    # warps to stay spill-free, except on sm_80 for reports of fewer than 16 slots: with 8 warps ptxas caps that
    # tile at 128 registers and spills, with 4 it fits.
    slots = cb if own_is_patch else rb
    if half and arch < 90:
        warps = 4 if slots < 16 else 8
    elif half and (slots != 16 or atomic):
        warps = 8
    else:
        warps = 4
    return dict(XB=xb, RB=rb, YB=yb, CB=cb, DC=dc, num_warps=warps, num_stages=2)


DETERMINISTIC_SPLIT = 4  # up to this many programs per output tile write their own buffers (no atomics)


def resident_blocks(cfg: dict, arch: int, dtype: torch.dtype) -> int:
    """Backward blocks an SM holds at once (the static records: the 4-warp sm_90 half-precision blocks take at
    most 120 registers, two fit; the 8-warp and the fp32 blocks one)."""
    return 2 if (arch >= 90 and _half(dtype) and cfg["num_warps"] == 4) else 1


def backward_split(tiles: int, steps: int, sm_count: int, arch: int, dtype: torch.dtype, config_of,
                   deterministic: bool) -> int:
    """Programs per output tile: the split of the walk over the other side (``steps`` steps, ``tiles`` output
    tiles) with the least work on the busiest SM, rounds x steps per program, where a round is one block per
    resident slot of every SM (``config_of(atomic)`` gives the block's config). Above DETERMINISTIC_SPLIT the
    partial sums go through atomics (one resident block: 8 warps), which the deterministic mode does not
    allow; ties go to the smaller split (fewer buffers)."""
    if INTERPRET:
        return 1
    best = (None, 1)
    for split in range(1, steps + 1):
        atomic = split > DETERMINISTIC_SPLIT
        if atomic and deterministic:
            break
        slots = max(1, sm_count) * resident_blocks(config_of(atomic), arch, dtype)
        cost = cdiv(tiles * split, slots) * cdiv(steps, split)
        if best[0] is None or cost < best[0]:
            best = (cost, split)
        if tiles * split >= 8 * slots:  # more rounds only add tails
            break
    return best[1]
