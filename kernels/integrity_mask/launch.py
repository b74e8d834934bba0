"""Launchers and launch heuristics of the integrity-scored masking kernels (``forward.py``, ``backward.py``):
the launch configuration per input size, the size limits ``impl="auto"`` sees, and the two launches."""
from __future__ import annotations

from typing import Optional

import torch

from mlip_fast.kernels._common import cdiv, next_pow2
from mlip_fast.kernels.integrity_mask.backward import _integrity_mask_bwd_kernel
from mlip_fast.kernels.integrity_mask.forward import MAX_PATCHES, _integrity_mask_fwd_kernel


def _interpreting(device: torch.device) -> bool:
    # CPU tensors can only reach a kernel through the interpreter.
    return device.type == "cpu"


def fwd_config(B: int, P: int, C: int, keep: int, *, interpret: bool, itemsize: int = 4,
               score_itemsize: int = 4) -> dict:
    """Launch configuration of the forward kernel for these sizes.

    Interpreter: as few programs and loop trips as possible (each op costs a fixed Python overhead).
    GPU: about 256 selection lanes per program (several rows when P is small), 32 kept slots per
    program so that B * K / 32 programs share the copy, copy tiles of 32 KiB ([32, 256] fp32 elements,
    half as many columns for 8-byte tokens), and one warp per 512 positions of the row (4 to 32 warps), so
    each thread holds at most 16 positions of the selection (P = 8192 takes 16 warps) and nothing spills.
    """
    block_p = next_pow2(P)
    block_k = next_pow2(keep)
    if interpret:
        rows = min(next_pow2(B), max(1, 8192 // block_p))
        kpb = block_k
        block_c = min(next_pow2(C), 256)
        block_j = min(rows * kpb, max(1, 16384 // block_c))
        return dict(ROWS=rows, KPB=kpb, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=4)
    rows = min(next_pow2(B), max(1, 256 // block_p))
    kpb = min(block_k, max(1, 32 // rows))
    block_j = rows * kpb
    block_c = min(next_pow2(C), max(16, (32768 // itemsize) // block_j))
    lanes_per_warp = 512 if score_itemsize <= 4 else 64  # fp64 rows of 1024+ positions take 16 warps
    min_warps = 4 if score_itemsize <= 4 else 8  # fp64: at 4 warps ptxas spills a register in the copy loop
    num_warps = min(16, max(min_warps, (rows * block_p) // lanes_per_warp))
    return dict(ROWS=rows, KPB=kpb, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=num_warps)


def limits(B: int, P: int) -> list:
    """Why the kernels cannot take these sizes (empty: they can)."""
    reasons = []
    if P > MAX_PATCHES:
        reasons.append(f"P={P} patches per image is above the kernel's {MAX_PATCHES} (the selection keeps a row "
                       f"in registers)")
    if B * P >= 2**31:
        reasons.append(f"B * P = {B * P} exceeds the int32 Philox offsets")
    return reasons


def integrity_mask_fwd(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    temperature: float,
    seed: int,
    seed_tensor: Optional[torch.Tensor] = None,
    config: Optional[dict] = None,
):
    """Launches the fused forward. Inputs are assumed checked by ``mlip_fast.ops.integrity_mask``.

    Args:
        tokens: [B, P, C] float tensor, any strides.
        scores: [B, P] float tensor on the same device.
        keep: K, 1 <= K <= P.
        temperature: > 0.
        seed: Philox seed (0 <= seed < 2**63), used when ``seed_tensor`` is None.
        seed_tensor: one-element int64 tensor on the device holding the seed, or None.
        config: overrides of ``fwd_config``'s launch parameters (tuning scripts only).

    Returns:
        kept [B, K, C] (tokens' dtype), index [B, K] int64 ascending, integrity [B] (float32, float64 for
        float64 scores), slot [B, P] int32 (kept slot of each position, -1 if dropped).
    """
    B, P, C = tokens.shape
    why = limits(B, P)
    if why:
        raise ValueError("integrity_mask_fwd: " + "; ".join(why))
    device = tokens.device
    acc = torch.float64 if scores.dtype == torch.float64 else torch.float32
    kept = torch.empty((B, keep, C), dtype=tokens.dtype, device=device)
    index = torch.empty((B, keep), dtype=torch.int64, device=device)
    masses = torch.empty((2, B), dtype=acc, device=device)
    slot = torch.empty((B, P), dtype=torch.int32, device=device)
    cfg = fwd_config(B, P, C, keep, interpret=_interpreting(device), itemsize=tokens.element_size(),
                     score_itemsize=scores.element_size())
    cfg.update(config or {})
    grid = (cdiv(B, cfg["ROWS"]), cdiv(keep, cfg["KPB"]))
    _integrity_mask_fwd_kernel[grid](
        tokens,
        scores,
        seed_tensor if seed_tensor is not None else index,
        kept,
        index,
        masses,
        slot,
        0 if seed_tensor is not None else int(seed),
        float(temperature),
        B,
        P,
        C,
        keep,
        *tokens.stride(),
        *scores.stride(),
        *kept.stride(),
        SEED_FROM_PTR=seed_tensor is not None,
        BLOCK_P=next_pow2(P),
        **cfg,
    )
    integrity = masses[0] / masses[1]  # a division in the kernel would call fp64's slow-path routine
    return kept, index, integrity, slot


def integrity_mask_bwd(grad_kept: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """grad_tokens [B, P, C] from grad_kept [B, K, C] (any strides) and the forward's slot [B, P] int32."""
    B, P = slot.shape
    C = grad_kept.shape[-1]
    grad_tokens = torch.empty((B, P, C), dtype=grad_kept.dtype, device=grad_kept.device)
    slot = slot.contiguous()
    if _interpreting(grad_kept.device):
        block_c = min(next_pow2(C), 256)
        block_n = min(next_pow2(B * P), max(1, 16384 // block_c))
    else:  # 32 KiB tiles: 8192 fp32 / 4096 fp64 elements over 128 threads
        block_c = min(next_pow2(C), 256)
        block_n = max(1, (32768 // grad_kept.element_size()) // block_c)
    grid = (cdiv(B * P, block_n),)
    _integrity_mask_bwd_kernel[grid](
        grad_kept, slot, grad_tokens, B * P, P, C, *grad_kept.stride(), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4
    )
    return grad_tokens
