"""Launchers of the fused patch-sentence kernels: the forward (``forward_v3.py`` on sm_90 for half inputs,
``forward.py`` elsewhere, one dispatch with its reasons), the backward (``backward.py``, both sides) and the side
kernels (``side.py``). Block sizes and the other choices come from ``heuristics.py``.

The kernels are looked up as attributes of this module at every launch, which is what lets the static compile
tool (``python -m tools.kernel_static``) record the launches instead of running them.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional, Tuple

import torch
from triton.runtime import _allocation

from mlip_fast.kernels._common import cdiv
from mlip_fast.kernels._common import mask_bytes as _mask_bytes
from mlip_fast.kernels._common import upcast as _upcast
from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence.backward import _patch_sentence_bwd_kernel
from mlip_fast.kernels.patch_sentence.forward import _patch_sentence_fwd_kernel
from mlip_fast.kernels.patch_sentence.forward_v3 import _patch_sentence_fwd_v3_kernel
from mlip_fast.kernels.patch_sentence.heuristics import (
    DETERMINISTIC_SPLIT,
    INTERPRET,
    NORM_EPS,
    _pow2,
    _precision,
    backward_split,
    bwd_config,
    fwd_config,
    fwd_v3_config,
    fwd_v3_reasons,
    limits,
)
from mlip_fast.kernels.patch_sentence.side import (
    _patch_sentence_grad_epilogue_kernel,
    _patch_sentence_prep_kernel,
    _patch_sentence_weights_kernel,
)

LOG = logging.getLogger("mlip_fast.kernels.patch_sentence")
FWD_KERNELS = ("v3", "v2")  # forward_v3.py (persistent, sm_90, half inputs) and forward.py (every GPU)
# The forward kernel of calls that do not name one: None = the dispatch's choice. Set by tools that compare the two
# kernels through the op (``tools/gpu_check``), the way ``_target.OVERRIDE`` sets the GPU planned for.
FORWARD_OVERRIDE: Optional[str] = None
_LAST_FORWARD: dict = {}


def last_forward() -> dict:
    """The last forward launch's kernel ("v3" or "v2") and, for "v2", why v3 did not run (for run records)."""
    return dict(_LAST_FORWARD)


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, 1e-12) over the last dim in fp32: [..., D] -> [...] (what ``normalize`` scales by)."""
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(NORM_EPS).reciprocal().contiguous()


def forward_prep(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    normalize: bool,
    limits: bool = False,
) -> Tuple[torch.Tensor, ...]:
    """One launch before the forward kernel (``side.py``): (n_p [B] int32, n_s [G] int32, inv_p [B, K] fp32,
    inv_s [G, S] fp32, lim_p [B, K] int32). The inverse norms are empty unless ``normalize``; the patches' key
    limits (the v3 kernel's patch mask) are empty unless ``limits`` and a patch mask is given. Inputs contiguous."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    dev = patches.device
    f32, i32 = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
    n_p, n_s = torch.empty((B,), **i32), torch.empty((G,), **i32)
    inv_p = torch.empty((B, K) if normalize else (0,), **f32)
    inv_s = torch.empty((G, S) if normalize else (0,), **f32)
    limits = limits and patch_mask is not None
    lim_p = torch.empty((B, K) if limits else (0,), **i32)
    pm, sm = _mask_bytes(patch_mask), _mask_bytes(sentence_mask)
    none = torch.empty((1,), dtype=torch.uint8, device=dev)  # the pointer of an absent mask (never read)
    bd = min(_pow2(D, 16), 128 if INTERPRET else 256)
    _patch_sentence_prep_kernel[(B + G,)](
        patches, sentences, pm if pm is not None else none, sm if sm is not None else none,
        inv_p if normalize else n_p, inv_s if normalize else n_s, n_p, n_s, lim_p if limits else n_p,
        B, G, K, S, D, NORM_EPS,
        HAS_PMASK=pm is not None, HAS_SMASK=sm is not None, NORMALIZE=normalize, LIMITS=limits,
        ROWS=16 if INTERPRET else 32, BD=bd, num_warps=4,
    )
    return n_p, n_s, inv_p, inv_s, lim_p


def _tma_allocation(size: int, alignment: int, stream: Optional[int]):
    # the workspace of the tensor descriptors the v3 kernel builds on the device (128 bytes each per program)
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _v3_ineligible(patches: torch.Tensor, sentences: torch.Tensor, arch: int) -> list:
    B, K, D = patches.shape
    why = fwd_v3_reasons(K, sentences.shape[1], D, patches.dtype, arch)
    if any(t.device.type != "meta" and t.data_ptr() % 16 for t in (patches, sentences)):
        why.append("an input's storage is not 16-byte aligned (TMA)")
    return why


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
    kernel: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward.

    Args:
        patches: [B, K, D] fp16/bf16/fp32; sentences: [G, S, D] same dtype and device (any strides).
        sentence_mask: [G, S] bool or None (all valid); patch_mask: [B, K] bool or None (any strides).
        do_i2t / do_t2i: which directions to compute (at least one).
        config: optional block-size override of the chosen kernel (keys of :func:`fwd_config` or
            :func:`fwd_v3_config`), for tuning sweeps and tests.
        normalize: score x / max(||x||, eps): the tile is scaled by both inverse norms after the dot.
        tf32: fp32 inputs on the TF32 tensor cores instead of IEEE fp32 FMAs.
        kernel: "v3" or "v2" to force one forward kernel (an ineligible "v3" raises with the reasons); None
            (and no ``FORWARD_OVERRIDE``) runs v3 wherever it can (sm_90, half inputs, S <= 16, D <= 512,
            D % 8 == 0) and v2 elsewhere.

    Returns:
        (i2t [B, G] fp32, t2i [B, G] fp32, arg_i2t [B, G, K] int16, arg_t2i [B, G, S] int16, inv_p [B, K],
        inv_s [G, S]). A direction not computed comes back as empty tensors, and the inverse norms are empty
        unless ``normalize``.
    """
    if not (do_i2t or do_t2i):
        raise ValueError("patch_sentence_fwd: nothing to compute (do_i2t and do_t2i are both False)")
    kernel = kernel or FORWARD_OVERRIDE
    if kernel not in (None,) + FWD_KERNELS:
        raise ValueError(f"patch_sentence_fwd: kernel={kernel!r}; expected one of {FWD_KERNELS} or None")
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    target = target_of(patches.device)
    why = limits(K, S, patches.dtype, target.arch)
    if why:
        raise ValueError("patch_sentence_fwd: " + "; ".join(why))
    not_v3 = _v3_ineligible(patches, sentences, target.arch) if kernel != "v2" else ["kernel='v2' asked for"]
    if kernel == "v3" and not_v3:
        raise ValueError("patch_sentence_fwd: the v3 kernel cannot run here: " + "; ".join(not_v3))
    choice = "v2" if not_v3 else "v3"
    record = dict(kernel=choice, why_not_v3=not_v3)
    if record != _LAST_FORWARD:
        LOG.debug("patch-sentence forward: %s%s", choice, f" (v3 not used: {'; '.join(not_v3)})" if not_v3 else "")
        _LAST_FORWARD.clear()
        _LAST_FORWARD.update(record)
    device = patches.device
    f32 = dict(dtype=torch.float32, device=device)
    i2t = torch.empty((B, G) if do_i2t else (0,), **f32)
    t2i = torch.empty((B, G) if do_t2i else (0,), **f32)
    arg_i2t = torch.empty((B, G, K) if do_i2t else (0,), dtype=torch.int16, device=device)
    arg_t2i = torch.empty((B, G, S) if do_t2i else (0,), dtype=torch.int16, device=device)
    prep = forward_prep(patches, sentences, sentence_mask, patch_mask, normalize, limits=choice == "v3")
    outs = (i2t, t2i, arg_i2t, arg_t2i)
    if choice == "v3":
        _fwd_v3(patches, sentences, sentence_mask, patch_mask, prep, outs, do_i2t, do_t2i, normalize,
                target.sm_count, config)
    else:
        _fwd_v2(patches, sentences, sentence_mask, patch_mask, prep, outs, do_i2t, do_t2i, normalize, tf32,
                target, config)
    return i2t, t2i, arg_i2t, arg_t2i, prep[2], prep[3]


def _fwd_v3(patches, sentences, sentence_mask, patch_mask, prep, outs, do_i2t, do_t2i, normalize, sm_count,
            config) -> None:
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    n_p, n_s, inv_p, inv_s, lim_p = prep
    directions = "both" if (do_i2t and do_t2i) else ("i2t" if do_i2t else "t2i")
    cfg = dict(fwd_v3_config(B, K, G, S, D, sm_count, directions), **(config or {}))
    imgs = cfg.pop("IMGS")
    n_rb = cdiv(G, cfg["GB"])
    grid = (n_rb * cdiv(B, imgs),)
    sm = _mask_bytes(sentence_mask)
    token = None
    if patches.device.type == "cuda" and _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        token = _allocation._allocator.set(_tma_allocation)  # for this launch only, when the caller set none
    try:
        _patch_sentence_fwd_v3_kernel[grid](
            patches, sentences, lim_p if patch_mask is not None else n_p, sm if sm is not None else n_s, n_p, n_s,
            inv_p if normalize else n_p, inv_s if normalize else n_s, *outs,
            B, G, K, S, n_rb, imgs,
            D=D,
            HAS_PMASK=patch_mask is not None,
            HAS_SMASK=sentence_mask is not None,
            DO_I2T=do_i2t,
            DO_T2I=do_t2i,
            NORMALIZE=normalize,
            CANON_NAN=INTERPRET,
            UPCAST=INTERPRET,
            **cfg,
        )
    finally:
        if token is not None:
            _allocation._allocator.reset(token)


def _fwd_v2(patches, sentences, sentence_mask, patch_mask, prep, outs, do_i2t, do_t2i, normalize, tf32,
            target, config) -> None:
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    n_p, n_s, inv_p, inv_s, _ = prep
    directions = "both" if (do_i2t and do_t2i) else ("i2t" if do_i2t else "t2i")
    cfg = dict(fwd_config(B, K, G, S, D, patches.dtype, target.arch, target.sm_count, normalize=normalize,
                          directions=directions), **(config or {}))
    pm = _mask_bytes(patch_mask) if patch_mask is not None else n_p
    sm = _mask_bytes(sentence_mask) if sentence_mask is not None else n_s
    n_rb = cdiv(G, cfg["GB"])
    ib = cfg.pop("IB")
    grid = (n_rb * cdiv(B, ib),)
    k_scratch = cdiv(K, cfg["BN"]) * cfg["BN"] if cfg["LARGE_S"] else 0
    f32 = dict(dtype=torch.float32, device=patches.device)
    scratch_v = torch.empty((grid[0] * k_scratch if k_scratch else 1,), **f32)
    scratch_a = torch.empty(scratch_v.shape, dtype=torch.int32, device=patches.device)
    _patch_sentence_fwd_kernel[grid](
        patches, sentences, pm, sm, n_p, n_s, inv_p if normalize else n_p, inv_s if normalize else n_s,
        *outs, scratch_v, scratch_a, k_scratch,
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


def _grad_epilogue(part: torch.Tensor, own: torch.Tensor, inv: Optional[torch.Tensor]) -> torch.Tensor:
    """Fixed-order sum of the split buffers ``part`` [SPLIT, N, D] fp32, the normalisation's Jacobian when ``inv``
    is given, the cast to own's dtype: one launch (see ``side.py``)."""
    split, N, D = part.shape
    # the interpreter's conversion to bf16 does not round to nearest: there the kernel stays fp32 and torch casts
    out = torch.empty((N, D), dtype=torch.float32 if INTERPRET else own.dtype, device=own.device)
    rows = 4 if D > 256 else 8
    _patch_sentence_grad_epilogue_kernel[(cdiv(N, rows),)](
        out, part, own, inv if inv is not None else part, N, D, N * D, NORM_EPS,
        SPLIT=split, NORMALIZE=inv is not None, ROWS=rows, BD=_pow2(D, 16), num_warps=4,
    )
    return out.to(own.dtype)


@functools.lru_cache(maxsize=4096)
def _bwd_plan(X: int, R: int, Y: int, C: int, D: int, dtype: torch.dtype, arch: int, sm_count: int,
              own_is_patch: bool, deterministic: bool, split: Optional[int], config: tuple) -> tuple:
    """The launch plan of one backward side, a pure function of sizes, dtype and card (cached: the split
    search evaluates up to one candidate per step of the walk): (block config items, row programs, programs
    per output tile, steps per program, whether the partial sums go through atomics). ``config``: overrides
    of :func:`bwd_config`'s block sizes as sorted (key, value) pairs; ``split``: a forced split or None."""
    def config_of(atomic: bool) -> dict:
        return dict(bwd_config(X, R, Y, C, D, dtype, arch, own_is_patch, atomic=atomic), **dict(config))

    cfg = config_of(False)
    row_programs = cdiv(X, cfg["XB"]) * cdiv(R, cfg["RB"])
    tiles = row_programs * cdiv(D, cfg["DC"])
    steps = cdiv(Y, cfg["YB"]) * cdiv(C, cfg["CB"])
    if split is None:
        split = backward_split(tiles, steps, sm_count, arch, dtype, config_of, deterministic)
    split = max(1, min(int(split), steps))
    per_split = cdiv(steps, split)
    split = cdiv(steps, per_split)
    # Small splits write separate buffers summed in a fixed order (bitwise reproducible) even when not asked:
    # the buffers are cheap there; only wide splits, outside the deterministic mode, add with atomics.
    use_atomic = split > DETERMINISTIC_SPLIT and not deterministic
    if use_atomic:
        cfg = config_of(True)
    return tuple(cfg.items()), row_programs, split, per_split, use_atomic


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
    inv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    tf32: bool = False,
) -> torch.Tensor:
    """grad for one side: own [X, R, D] rows, other [Y, C, D] rows; [X, R, D] in own's dtype.

    With ``inv`` = (inverse norms of the own rows [X, R], of the other rows [Y, C]) the forward normalised: the
    other rows enter scaled by theirs, and the epilogue maps the gradient w.r.t. the normalised own rows to the
    raw ones.
    """
    X, R, D = own.shape
    Y, C, _ = other.shape
    target = target_of(own.device)
    cfg, row_programs, split, per_split, use_atomic = _bwd_plan(
        X, R, Y, C, D, own.dtype, target.arch, target.sm_count, own_is_patch, bool(deterministic),
        None if split is None else int(split), tuple(sorted((config or {}).items())))
    cfg = dict(cfg)
    if use_atomic:
        out = torch.zeros((1, X * R, D), dtype=torch.float32, device=own.device)
    else:
        # one program per tile writes the final dtype itself (not under the interpreter, whose conversion to bf16
        # does not round to nearest)
        direct = split == 1 and inv is None and not INTERPRET
        out = torch.empty((split, X * R, D), dtype=own.dtype if direct else torch.float32, device=own.device)
    grid = (row_programs, cdiv(D, cfg["DC"]), split)
    _patch_sentence_bwd_kernel[grid](
        out, other, *launch_args[:4], inv[1] if inv is not None else launch_args[2],
        X, R, Y, C, D, per_split, *launch_args[4:],
        HAS_OWN=has_own,
        HAS_OTH=has_oth,
        USE_ATOMIC=use_atomic,
        UPCAST=_upcast(other.dtype),
        NORMALIZE=inv is not None,
        PRECISION=_precision(other.dtype, tf32),
        **cfg,
    )
    if out.shape[0] == 1 and inv is None and out.dtype == own.dtype:
        return out[0].view(X, R, D)
    return _grad_epilogue(out, own.view(X * R, D), inv[0].reshape(X * R) if inv is not None else None).view(X, R, D)


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
            upstream gradient: its terms are skipped); any strides.
        patches [B, K, D], sentences [G, S, D], masks as in :func:`patch_sentence_fwd`.
        arg_i2t [B, G, K], arg_t2i [B, G, S]: int16 indices from the forward.
        deterministic: no atomics; bitwise reproducible.
        split: programs sharing one output tile (default: :func:`backward_split`'s choice; 1 under the
            interpreter).
        config: optional overrides of :func:`bwd_config`'s block sizes for both sides (tuning sweeps).
        inv_p [B, K], inv_s [G, S]: the forward's inverse norms when it normalised (both or neither).
        tf32: fp32 inputs on the TF32 tensor cores.

    Returns:
        (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype, w.r.t. the raw inputs (with
        inverse norms, the normalisation's Jacobian is applied in the gradient epilogue).
    """
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    has_i2t, has_t2i = grad_i2t is not None, grad_t2i is not None
    normalized = inv_p is not None
    if not (has_i2t or has_t2i):
        return torch.zeros_like(patches), torch.zeros_like(sentences)
    f32 = dict(dtype=torch.float32, device=patches.device)
    w_i2t = torch.empty((B, G), **f32) if has_i2t else None
    w_t2i = torch.empty((B, G), **f32) if has_t2i else None
    w_i2t, w_t2i = (w_i2t if has_i2t else w_t2i), (w_t2i if has_t2i else w_i2t)  # an absent one is never read
    pm, sm = _mask_bytes(patch_mask), _mask_bytes(sentence_mask)
    gi, gt = (grad_i2t if has_i2t else w_i2t), (grad_t2i if has_t2i else w_t2i)
    _patch_sentence_weights_kernel[(cdiv(B, 16), cdiv(G, 64))](
        gi, gt, pm if pm is not None else patches, sm if sm is not None else sentences, w_i2t, w_t2i,
        B, G, K, S, gi.stride(0), gi.stride(1), gt.stride(0), gt.stride(1),
        HAS_I2T=has_i2t, HAS_T2I=has_t2i, HAS_PMASK=pm is not None, HAS_SMASK=sm is not None,
        BB=16, BG=64, TC=64, num_warps=4,
    )
    a_i = arg_i2t if has_i2t else arg_t2i  # never read when its direction is absent
    a_t = arg_t2i if has_t2i else arg_i2t
    inv = (inv_p.contiguous(), inv_s.contiguous()) if normalized else None
    # Patch side: x = b, y = g, r = p, c = q; own argmax a[b, g, p], other argmax c[b, g, q].
    grad_p = _bwd_side(
        patches, sentences,
        (a_i, a_t, w_i2t, w_t2i, G * K, K, 1, G * S, S, 1, G, 1),
        has_i2t, has_t2i, True, deterministic, split, config, inv, tf32,
    )
    # Sentence side: x = g, y = b, r = q, c = p; own argmax c[b, g, q], other argmax a[b, g, p].
    grad_s = _bwd_side(
        sentences, patches,
        (a_t, a_i, w_t2i, w_i2t, S, G * S, 1, K, G * K, 1, 1, G),
        has_t2i, has_i2t, False, deterministic, split, config, inv[::-1] if inv else None, tf32,
    )
    return grad_p, grad_s
