"""Launchers and launch heuristics of the optimal-transport patch-sentence kernels (``forward.py``,
``backward.py``): block sizes per input, the size limits ``impl="auto"`` sees, and the two launches."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

from mlip_fast.kernels._common import INTERPRET, cdiv, mask_bytes, valid_counts
from mlip_fast.kernels._common import half as _half
from mlip_fast.kernels._common import pow2 as _pow2
from mlip_fast.kernels._common import upcast as _upcast
from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence_ot.backward import _patch_sentence_ot_bwd_kernel
from mlip_fast.kernels.patch_sentence_ot.forward import _patch_sentence_ot_fwd_kernel

# The forward keeps a pair's whole (padded) S x K block in registers through the iterations: S_CH * BN cells
# at most (fp32 tile, its exp2 temporary and the potentials stay spill-free on sm_80 and sm_90 at 8 warps,
# checked by tools/kernel_static). Larger pairs are refused up front.
MAX_PAIR_CELLS = 4096
# Sentence slots per report in a forward tile at least: a report then fills the 16 rows of a dot on its own, and
# the patch potentials f [GB, BN] of a program stay a small part of its registers (with one slot per report they
# are as large as the tile itself, and with 4 or 8 slots the tolerance check spills at K = 256).
MIN_SLOTS = 16
# Cells of one forward tile (GB reports x S_CH x BN): reports are added to a program up to this.
TILE_CELLS = 2048


def limits(K: int, S: int, dtype: torch.dtype, arch: int) -> List[str]:
    """Why the kernels cannot take these sizes (empty: they can). ``auto`` falls back on any reason."""
    rows, k_pad = max(_pow2(S), 16), _pow2(K, 16)  # a forward tile has at least 16 rows
    if rows * k_pad > MAX_PAIR_CELLS:
        return [f"a pair's padded block ({rows} sentence rows x {k_pad} patches = {rows * k_pad} cells) exceeds the "
                f"forward's register tile of {MAX_PAIR_CELLS} cells"]
    return []


def fwd_config(B: int, K: int, G: int, S: int, D: int, dtype: torch.dtype, arch: int) -> dict:
    """Block sizes of the forward: the whole K (BN, at least 16) by S_CH sentence slots per report (S padded to a
    power of two, at least MIN_SLOTS), GB reports per program so that the tile has at least 16 rows (a ``tl.dot``
    minimum) and about TILE_CELLS cells; D in chunks of 64 (half), 32 (fp32, sm_80) or 16 (fp32, sm_90); 4 warps
    up to 2048 cells (16 per thread), 8 above (one pair of up to MAX_PAIR_CELLS cells). Spill-free on sm_80 and
    sm_90 with and without the tolerance check (``tools/kernel_static``)."""
    bn = _pow2(K, 16)
    s_ch = max(_pow2(S), MIN_SLOTS)
    gb = max(1, 16 // s_ch)
    while gb * s_ch * bn * 2 <= TILE_CELLS and gb < _pow2(G):
        gb *= 2
    cells = gb * s_ch * bn
    if INTERPRET:
        return dict(GB=gb, S_CH=s_ch, BN=bn, BD=min(128, _pow2(D, 16)), num_warps=4, num_stages=1)
    warps = 4 if cells <= 2048 else 8
    if _half(dtype):
        return dict(GB=gb, S_CH=s_ch, BN=bn, BD=64, num_warps=warps, num_stages=2)
    # fp32 (FMA dot; the D loop's time is small beside the iterations): each arch's choice is spill-free over the
    # whole static sweep, the other arch's choice spills a few bytes there at some K and S (ptxas's allocation).
    if arch >= 90:
        return dict(GB=gb, S_CH=s_ch, BN=bn, BD=16, num_warps=warps, num_stages=1)
    return dict(GB=gb, S_CH=s_ch, BN=bn, BD=32, num_warps=warps, num_stages=2)


def patch_sentence_ot_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    eps: float,
    n_iter: int,
    tol: Optional[float] = None,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward.

    Args:
        patches: [B, K, D] fp16/bf16/fp32; sentences: [G, S, D] same dtype and device.
        sentence_mask: [G, S] bool or None (all valid); patch_mask: [B, K] bool or None.
        eps, n_iter, tol: as in ``mlip_fast.reference.patch_sentence_ot``.
        config: optional block-size override (keys of :func:`fwd_config`), for tuning sweeps and tests.

    Returns:
        (scores [B, G] fp32, f [B, G, K] fp32, g [B, G, S] fp32): potentials in natural-log units, -inf where
        not live.
    """
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    target = target_of(patches.device)
    why = limits(K, S, patches.dtype, target.arch)
    if why:
        raise ValueError("patch_sentence_ot_fwd: " + "; ".join(why))
    device = patches.device
    n_p, n_s = valid_counts(sentence_mask, patch_mask, B, K, G, S, device)
    f32 = dict(dtype=torch.float32, device=device)
    scores = torch.empty((B, G), **f32)
    f = torch.empty((B, G, K), **f32)
    g = torch.empty((B, G, S), **f32)
    cfg = dict(fwd_config(B, K, G, S, D, patches.dtype, target.arch), **(config or {}))
    pm = mask_bytes(patch_mask) if patch_mask is not None else n_p
    sm = mask_bytes(sentence_mask) if sentence_mask is not None else n_s
    n_rb = cdiv(G, cfg["GB"])
    _patch_sentence_ot_fwd_kernel[(B * n_rb,)](
        patches, sentences, pm, sm, n_p, n_s, scores, f, g,
        B, G, K, S, D,
        patches.stride(0), patches.stride(1), sentences.stride(0), sentences.stride(1),
        n_rb, int(n_iter), math.log2(math.e) / eps, 0.0 if tol is None else float(tol),
        HAS_PMASK=patch_mask is not None,
        HAS_SMASK=sentence_mask is not None,
        HAS_TOL=tol is not None,
        UPCAST=_upcast(patches.dtype),
        **cfg,
    )
    return scores, f, g


def bwd_config(X: int, R: int, Y: int, C: int, D: int, dtype: torch.dtype, arch: int, own_is_patch: bool) -> dict:
    """Block sizes of one backward side (checked spill-free on sm_80 and sm_90 by the static tool).

    Half inputs: 64 own rows (patch side: a patch chunk of one image; sentence side: reports x sentence slots) by
    64 other columns per step (reports x sentence slots, or a patch chunk), the similarity dot over D in chunks of
    64, 128 output columns of D per program, 8 warps. fp32 (FMA dots, whose operands live in registers): 32 x 32
    blocks, 128 output columns, 8 warps. Each program recomputes its blocks' similarities over the whole of D, so
    the output columns per program set the work: per side 2*B*G*K*S*D*(1 + D / DC) FLOPs, at D = 256 9 units with
    DC = 32 (the fp32 config until 2026-12-06, 4 warps: the backward took 42 ms on the H100 at B = G = 128,
    K = 98, S = 16, the forward 7 ms) and 3 with DC = 128. 4 warps spill at DC = 64 on sm_80; 8 warps hold
    DC = 128 spill-free on both archs (static compile, 96-210 registers, 1-2 blocks per SM). The speed-up is a
    prediction from the FLOPs, not a measurement: the GPU check's optimal-transport section times it.
    """
    half = _half(dtype) and not INTERPRET
    rows = cols = 64 if (half or INTERPRET) else 32
    # sentence slots padded to at least 4: tiny S would otherwise put 32 or 64 reports in one block
    if own_is_patch:  # rows: patch chunk of one image; columns: YB reports of CB sentence slots
        xb, rb = 1, min(rows, _pow2(R, 16))
        cb = min(cols, _pow2(C, 4))
        yb = max(1, cols // cb)
    else:  # rows: XB reports of RB sentence slots; columns: a patch chunk of one image
        rb = min(rows, _pow2(R, 4))
        xb = max(1, rows // rb)
        yb, cb = 1, min(cols, _pow2(C, 16))
    if INTERPRET:
        return dict(XB=xb, RB=rb, YB=yb, CB=cb, BD=min(128, _pow2(D, 16)), DC=min(128, _pow2(D, 16)),
                    num_warps=4, num_stages=1)
    if half:
        return dict(XB=xb, RB=rb, YB=yb, CB=cb, BD=64, DC=min(128, _pow2(D, 16)), num_warps=8, num_stages=2)
    return dict(XB=xb, RB=rb, YB=yb, CB=cb, BD=32, DC=min(128, _pow2(D, 16)), num_warps=8, num_stages=2)


def _bwd_side(own, other, pot_own, pot_oth, w, strides: tuple, own_is_patch: bool, z_scale: float,
              config: Optional[dict]) -> torch.Tensor:
    """The gradient of the own rows [X, R, D] (in their dtype) against the other rows [Y, C, D]."""
    X, R, D = own.shape
    Y, C, _ = other.shape
    target = target_of(own.device)
    cfg = dict(bwd_config(X, R, Y, C, D, own.dtype, target.arch, own_is_patch), **(config or {}))
    if cfg["XB" if own_is_patch else "YB"] != 1:  # the kernel loads the sentence potentials as vectors
        raise ValueError(f"patch_sentence_ot_bwd: {'XB' if own_is_patch else 'YB'} must be 1 on this side, got {cfg}")
    out = torch.empty_like(own)
    grid = (cdiv(X, cfg["XB"]) * cdiv(R, cfg["RB"]), cdiv(D, cfg["DC"]))
    _patch_sentence_ot_bwd_kernel[grid](
        out, own, other, pot_own, pot_oth, w, X, R, Y, C, D, *strides, z_scale,
        OWN_IS_PATCH=own_is_patch,
        UPCAST=_upcast(own.dtype),
        **cfg,
    )
    return out


def patch_sentence_ot_bwd(
    grad_scores: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launches the backward (both sides) from the forward's potentials.

    Args:
        grad_scores: [B, G] upstream gradient; patches [B, K, D], sentences [G, S, D] as in the forward.
        f [B, G, K], g [B, G, S]: fp32 potentials from :func:`patch_sentence_ot_fwd`.
        config: optional overrides of :func:`bwd_config`'s block sizes for both sides (tuning sweeps, tests).

    Returns:
        (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype.
    """
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    w = grad_scores.to(torch.float32).contiguous()
    f, g = f.contiguous(), g.contiguous()
    z_scale = math.log2(math.e) / eps
    # Patch side: x = b, y = g, r = p, c = q; own potential f[b, g, p], other g[b, g, q], weight w[b, g].
    grad_p = _bwd_side(patches, sentences, f, g, w, (G * K, K, G * S, S, G, 1), True, z_scale, config)
    # Sentence side: x = g, y = b, r = q, c = p; own potential g[b, g, q], other f[b, g, p], weight w[b, g].
    grad_s = _bwd_side(sentences, patches, g, f, w, (S, G * S, K, G * K, 1, G), False, z_scale, config)
    return grad_p, grad_s
