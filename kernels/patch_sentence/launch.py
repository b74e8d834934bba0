"""Launchers and launch heuristics of the fused patch-sentence kernels (``forward.py``, ``backward.py``): block
sizes per input and GPU, the size limits ``impl="auto"`` sees, the split of the backward, and the launches."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton

from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence.backward import _patch_sentence_bwd_kernel
from mlip_fast.kernels.patch_sentence.forward import _patch_sentence_fwd_kernel

# Read once, like @triton.jit does: it decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_TOKENS = 2**15  # argmax indices are int16: K and S must stay below
NORM_EPS = 1e-12  # F.normalize's floor on the norm


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _upcast(dtype: torch.dtype) -> bool:
    # fp32 needs no widening; half inputs are widened only where the interpreter's half dot is wrong.
    return dtype == torch.float32 or INTERPRET


def _half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


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


def valid_counts(
    sentence_mask: Optional[torch.Tensor], patch_mask: Optional[torch.Tensor], B: int, K: int, G: int, S: int, device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Valid patches per image [B] and valid sentences per report [G], int32."""
    n_p = patch_mask.sum(1, dtype=torch.int32) if patch_mask is not None else torch.full((B,), K, dtype=torch.int32, device=device)
    n_s = sentence_mask.sum(1, dtype=torch.int32) if sentence_mask is not None else torch.full((G,), S, dtype=torch.int32, device=device)
    return n_p, n_s


MIN_SLOTS = 16  # sentence slots per report in a forward tile


def fwd_config(B: int, K: int, G: int, S: int, D: int, dtype: torch.dtype, arch: int, sm_count: int, *,
               normalize: bool = False, directions: str = "both") -> dict:
    """Block sizes of the forward for these sizes on compute capability ``arch`` (checked spill-free on sm_80
    and sm_90 by ``benchmarks/kernel_static.py``).

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
    n_rb = triton.cdiv(G, gb)
    if INTERPRET:
        ib = B
    elif large_s:  # a few programs per SM, each with a scratch row it reuses for all its images
        ib = triton.cdiv(B, max(1, (4 * max(sm_count, 1)) // n_rb))
    else:  # several images per program only when that still leaves about eight programs per SM
        ib = min(8, max(1, min(B, (n_rb * B) // (8 * max(sm_count, 1)))))
    return dict(GB=gb, S_CH=s_ch, BN=bn, BD=bd, LARGE_S=large_s, IB=ib, num_warps=warps, num_stages=stages)


def _mask_bytes(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A validity mask as the contiguous uint8 the kernels index (any input strides, bool or uint8)."""
    if mask is None:
        return None
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, 1e-12) over the last dim in fp32: [..., D] -> [...] (what ``normalize`` scales by)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal().contiguous()


def patch_sentence_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool = True,
    do_t2i: bool = True,
    config: Optional[dict] = None,
    *,
    normalize: bool = False,
    tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward.

    Args:
        patches: [B, K, D] fp16/bf16/fp32; sentences: [G, S, D] same dtype and device (any strides).
        sentence_mask: [G, S] bool or None (all valid); patch_mask: [B, K] bool or None (any strides).
        do_i2t / do_t2i: which directions to compute (at least one).
        config: optional block-size override (keys of :func:`fwd_config`), for tuning sweeps and tests.
        normalize: score x / max(||x||, eps): the tile is scaled by both inverse norms after the dot.
        tf32: fp32 inputs on the TF32 tensor cores instead of IEEE fp32 FMAs.

    Returns:
        (i2t [B, G] fp32, t2i [B, G] fp32, arg_i2t [B, G, K] int16, arg_t2i [B, G, S] int16, inv_p [B, K],
        inv_s [G, S]). A direction not computed comes back as empty tensors, and the inverse norms are empty
        unless ``normalize``.
    """
    if not (do_i2t or do_t2i):
        raise ValueError("patch_sentence_fwd: nothing to compute (do_i2t and do_t2i are both False)")
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    target = target_of(patches.device)
    why = limits(K, S, patches.dtype, target.arch)
    if why:
        raise ValueError("patch_sentence_fwd: " + "; ".join(why))
    device = patches.device
    n_p, n_s = valid_counts(sentence_mask, patch_mask, B, K, G, S, device)
    f32 = dict(dtype=torch.float32, device=device)
    i2t = torch.empty((B, G) if do_i2t else (0,), **f32)
    t2i = torch.empty((B, G) if do_t2i else (0,), **f32)
    arg_i2t = torch.empty((B, G, K) if do_i2t else (0,), dtype=torch.int16, device=device)
    arg_t2i = torch.empty((B, G, S) if do_t2i else (0,), dtype=torch.int16, device=device)
    directions = "both" if (do_i2t and do_t2i) else ("i2t" if do_i2t else "t2i")
    cfg = dict(fwd_config(B, K, G, S, D, patches.dtype, target.arch, target.sm_count, normalize=normalize,
                          directions=directions), **(config or {}))
    pm = _mask_bytes(patch_mask) if patch_mask is not None else n_p
    sm = _mask_bytes(sentence_mask) if sentence_mask is not None else n_s
    inv_p = inverse_norms(patches) if normalize else torch.empty((0,), **f32)
    inv_s = inverse_norms(sentences) if normalize else torch.empty((0,), **f32)
    n_rb = triton.cdiv(G, cfg["GB"])
    ib = cfg.pop("IB")
    grid = (n_rb * triton.cdiv(B, ib),)
    k_scratch = triton.cdiv(K, cfg["BN"]) * cfg["BN"] if cfg["LARGE_S"] else 0
    scratch_v = torch.empty((grid[0] * k_scratch if k_scratch else 1,), **f32)
    scratch_a = torch.empty(scratch_v.shape, dtype=torch.int32, device=device)
    _patch_sentence_fwd_kernel[grid](
        patches, sentences, pm, sm, n_p, n_s, inv_p if normalize else n_p, inv_s if normalize else n_s,
        i2t, t2i, arg_i2t, arg_t2i, scratch_v, scratch_a, k_scratch,
        B, G, K, S, D,
        patches.stride(0), patches.stride(1), sentences.stride(0), sentences.stride(1),
        n_rb, ib,
        HAS_PMASK=patch_mask is not None,
        HAS_SMASK=sentence_mask is not None,
        DO_I2T=do_i2t,
        DO_T2I=do_t2i,
        NORMALIZE=normalize,
        PRECISION=_precision(patches.dtype, tf32),
        NAN_REDUCE=not INTERPRET,
        UPCAST=_upcast(patches.dtype),
        **cfg,
    )
    return i2t, t2i, arg_i2t, arg_t2i, inv_p, inv_s


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


def _bwd_side(
    own: torch.Tensor,
    other: torch.Tensor,
    launch_args: tuple,
    has_own: bool,
    has_oth: bool,
    own_is_patch: bool,
    deterministic: bool,
    split: Optional[int] = None,
    config: Optional[dict] = None,
    inv_other: Optional[torch.Tensor] = None,
    tf32: bool = False,
) -> torch.Tensor:
    """grad for one side: own [X, R, D] rows, other [Y, C, D] rows. Returns [X, R, D]: fp32, or the own dtype
    when one program per output tile wrote it directly (no split, no normalisation left to apply).

    With ``inv_other`` ([Y, C] inverse norms) the other rows enter normalised: the result is the gradient
    w.r.t. the normalised own rows (fp32), which the caller maps to the raw ones.
    """
    X, R, D = own.shape
    Y, C, _ = other.shape
    target = target_of(own.device)
    cfg = dict(bwd_config(X, R, Y, C, D, own.dtype, target.arch, own_is_patch), **(config or {}))
    row_programs = triton.cdiv(X, cfg["XB"]) * triton.cdiv(R, cfg["RB"])
    tiles = row_programs * triton.cdiv(D, cfg["DC"])
    steps = triton.cdiv(Y, cfg["YB"]) * triton.cdiv(C, cfg["CB"])
    # Split the walk over the other side so that about two waves of programs fill the GPU.
    if split is None:
        split = 1 if INTERPRET else max(1, min(steps, triton.cdiv(2 * target.sm_count, tiles)))
        if deterministic:
            split = min(split, DETERMINISTIC_SPLIT)  # each split costs a [X*R, D] fp32 buffer
    split = max(1, min(int(split), steps))
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)
    # Small splits write separate buffers summed in a fixed order (bitwise reproducible) even when not asked:
    # the buffers are cheap there; only wide splits, outside the deterministic mode, add with atomics.
    use_atomic = split > DETERMINISTIC_SPLIT and not deterministic
    if use_atomic:
        cfg = dict(bwd_config(X, R, Y, C, D, own.dtype, target.arch, own_is_patch, atomic=True), **(config or {}))
        out = torch.zeros((1, X * R, D), dtype=torch.float32, device=own.device)
    else:
        # the one program per tile writes the final dtype itself (not under the interpreter, whose conversion to
        # bf16 does not round to nearest)
        direct = split == 1 and inv_other is None and not INTERPRET
        out = torch.empty((split, X * R, D), dtype=own.dtype if direct else torch.float32, device=own.device)
    grid = (row_programs, triton.cdiv(D, cfg["DC"]), split)
    _patch_sentence_bwd_kernel[grid](
        out, other, *launch_args[:4], inv_other if inv_other is not None else launch_args[2],
        X, R, Y, C, D, per_split, *launch_args[4:],
        HAS_OWN=has_own,
        HAS_OTH=has_oth,
        USE_ATOMIC=use_atomic,
        UPCAST=_upcast(other.dtype),
        NORMALIZE=inv_other is not None,
        PRECISION=_precision(other.dtype, tf32),
        **cfg,
    )
    # A fixed-order sum over the split buffers keeps the result bitwise reproducible.
    return (out[0] if out.shape[0] == 1 else out.sum(0)).view(X, R, D)


def patch_sentence_bwd(
    grad_i2t: Optional[torch.Tensor],
    grad_t2i: Optional[torch.Tensor],
    patches: torch.Tensor,
    sentences: torch.Tensor,
    arg_i2t: torch.Tensor,
    arg_t2i: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    deterministic: bool = False,
    split: Optional[int] = None,
    config: Optional[dict] = None,
    *,
    inv_p: Optional[torch.Tensor] = None,
    inv_s: Optional[torch.Tensor] = None,
    tf32: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launches the backward from the saved argmax indices.

    Args:
        grad_i2t / grad_t2i: [B, G] upstream gradients (None for a direction not computed or without
            upstream gradient: its terms are skipped).
        patches [B, K, D], sentences [G, S, D], masks as in :func:`patch_sentence_fwd`.
        arg_i2t [B, G, K], arg_t2i [B, G, S]: int16 indices from the forward.
        deterministic: no atomics; bitwise reproducible.
        split: programs sharing one output tile (default: enough to fill the GPU; 1 under the interpreter).
        config: optional overrides of :func:`bwd_config`'s block sizes for both sides (tuning sweeps).
        inv_p [B, K], inv_s [G, S]: the forward's inverse norms when it normalised (both or neither).
        tf32: fp32 inputs on the TF32 tensor cores.

    Returns:
        (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype; with inverse norms, the fp32
        gradients w.r.t. the *normalised* inputs (the caller maps them to the raw inputs).
    """
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    n_p, n_s = valid_counts(sentence_mask, patch_mask, B, K, G, S, patches.device)
    has_i2t, has_t2i = grad_i2t is not None, grad_t2i is not None
    normalized = inv_p is not None
    if not (has_i2t or has_t2i):
        dtype = torch.float32 if normalized else None
        return torch.zeros_like(patches, dtype=dtype), torch.zeros_like(sentences, dtype=dtype)
    zero = torch.zeros((B, G), dtype=torch.float32, device=patches.device)
    w_i2t = grad_i2t.float() / n_p.clamp(min=1)[:, None] if has_i2t else zero
    w_t2i = grad_t2i.float() / n_s.clamp(min=1)[None, :] if has_t2i else zero
    w_i2t, w_t2i = w_i2t.contiguous(), w_t2i.contiguous()
    a_i = arg_i2t if has_i2t else torch.full((1,), -1, dtype=torch.int16, device=patches.device)
    a_t = arg_t2i if has_t2i else torch.full((1,), -1, dtype=torch.int16, device=patches.device)
    # Patch side: x = b, y = g, r = p, c = q; own argmax a[b, g, p], other argmax c[b, g, q].
    grad_p = _bwd_side(
        patches, sentences,
        (a_i, a_t, w_i2t, w_t2i, G * K, K, 1, G * S, S, 1, G, 1),
        has_i2t, has_t2i, True, deterministic, split, config, inv_s.contiguous() if normalized else None, tf32,
    )
    # Sentence side: x = g, y = b, r = q, c = p; own argmax c[b, g, q], other argmax a[b, g, p].
    grad_s = _bwd_side(
        sentences, patches,
        (a_t, a_i, w_t2i, w_i2t, S, G * S, 1, K, G * K, 1, 1, G),
        has_t2i, has_i2t, False, deterministic, split, config, inv_p.contiguous() if normalized else None, tf32,
    )
    if normalized:
        return grad_p, grad_s
    return grad_p.to(patches.dtype), grad_s.to(sentences.dtype)
