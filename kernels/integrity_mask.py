"""Integrity-scored masking in Triton: in-kernel Gumbel noise -> exact per-row top-k -> gather, and the
scatter backward.

Forward, per image b (see ``mlip_fast.reference.integrity_mask`` for the specification):
    key[b, p]   = scores[b, p] / temperature + g[b, p],   g = -log(-log(u)),  u = Philox(seed, b * P + p)
    index[b]    = the K = ``keep`` largest keys' positions, ascending
    kept[b, k]  = tokens[b, index[b, k]]
    integrity_b = sum_k softmax_p(scores[b])[index[b, k]]
    slot[b, p]  = k where index[b, k] == p, else -1        (saved for the backward)

Backward derivation. ``index`` is piecewise constant in ``scores`` (no gradient; ``integrity`` carries none by
contract), so the only differentiable path is the gather:
    dL/dtokens[b, p, c] = sum_k [index[b, k] == p] * dL/dkept[b, k, c].
Positions within a row are unique, so at most one k matches and the sum is a copy:
    dL/dtokens[b, p, c] = dL/dkept[b, slot[b, p], c]  if slot[b, p] >= 0,  else 0.
The backward kernel therefore writes every element of grad_tokens exactly once (no zero-fill pass, no
atomics) and reads only the kept rows of grad_kept; the result is bitwise equal to a scatter into zeros.

Selection without a sort. Keys are float32; flipping the magnitude bits of negative floats maps them to
int32 with the same order. The K-th largest key T is the largest int32 with #{key >= T} >= K, found bit
by bit from the sign bit down (32 masked row reductions over the row held in registers). Every key > T is
kept, and keys equal to T are kept in ascending position order until exactly K are kept (a prefix sum over
the ties). A prefix sum over the keep flags then gives each kept position its output slot, so ``index``
comes out ascending with no sort, and the mask does not depend on the launch configuration.

Noise. ``tl.rand(seed, b * P + p)`` (Philox 4x32-10): no host-side random numbers. The seed is either a
Python int (kernel argument) or read from a one-element int64 device tensor (``seed_tensor``), which lets a
``torch.Generator`` on the device supply it without a host synchronisation.

Launch. Grid (ceil(B / ROWS), ceil(K / KPB)): a program selects for ROWS rows (several rows per program
when P is small), then gathers the kept slots [k0, k0 + KPB) of those rows, looping over C in blocks. Each
program recomputes the (cheap, register-resident) selection of its rows so that the copy, which dominates,
is spread over more programs than there are rows; it writes its own slots of ``index`` and reads them back
after a block barrier, so all programs are independent. Triton's autotuner needs a GPU, so the
configuration comes from a size heuristic (``fwd_config``), which a tuning script may override.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# tl.rand draws from [0, 1); clamping keeps -log(-log(u)) finite at u == 0.
_U_MIN = tl.constexpr(1e-20)
# Selection keeps the whole row in registers (at most 16 positions per thread with 16 warps): beyond this
# many patches a row would spill. The op declares the limit so that ``auto`` falls back to the reference.
MAX_PATCHES = 8192
_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit(do_not_specialize=["seed", "B", "P", "keep"])
def _integrity_mask_fwd_kernel(
    tokens_ptr,
    scores_ptr,
    seed_ptr,
    kept_ptr,
    index_ptr,
    integrity_ptr,  # [2, B]: kept softmax mass and total mass (the launcher divides: no fp64 division here)
    slot_ptr,
    seed,
    temperature,
    B,
    P,
    C,
    keep,
    stride_tb,
    stride_tp,
    stride_tc,
    stride_sb,
    stride_sp,
    stride_kb,
    stride_kk,
    stride_kc,
    SEED_FROM_PTR: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KPB: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_b * ROWS + tl.arange(0, ROWS)
    p = tl.arange(0, BLOCK_P)
    row_ok = rows < B
    valid = row_ok[:, None] & (p[None, :] < P)

    if SEED_FROM_PTR:
        seed_val = tl.load(seed_ptr)
    else:
        seed_val = seed
    # Integrity is accumulated in the output's dtype (float32, or float64 for float64 scores).
    acc_dtype = integrity_ptr.dtype.element_ty
    s_ptrs = scores_ptr + rows[:, None] * stride_sb + p[None, :] * stride_sp
    u = tl.rand(seed_val, rows[:, None] * P + p[None, :])
    gumbel = -tl.log(-tl.log(tl.maximum(u, _U_MIN)))
    key = tl.load(s_ptrs, mask=valid, other=0.0).to(tl.float32) / temperature + gumbel
    bits = key.to(tl.int32, bitcast=True)
    skey = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)

    # Largest T with #{skey >= T} >= keep: sign bit first, then bits 30..0 greedily.
    n_nonneg = tl.sum((valid & (skey >= 0)).to(tl.int32), axis=1)
    thresh = tl.where(n_nonneg >= keep, 0, _INT32_MIN)
    for i in range(31):
        cand = thresh | (1 << (30 - i))
        n_ge = tl.sum((valid & (skey >= cand[:, None])).to(tl.int32), axis=1)
        thresh = tl.where(n_ge >= keep, cand, thresh)
    above = valid & (skey > thresh[:, None])
    tie = valid & (skey == thresh[:, None])
    ties_needed = keep - tl.sum(above.to(tl.int32), axis=1)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)
    sel = above | (tie & (tie_rank <= ties_needed[:, None]))
    slot = tl.cumsum(sel.to(tl.int32), axis=1) - 1

    if pid_k == 0:
        # the scores are read again here rather than kept live through the selection (registers at large P)
        s = tl.load(s_ptrs, mask=valid, other=0.0).to(acc_dtype)
        s_masked = tl.where(valid, s, float("-inf"))
        row_max = tl.where(row_ok, tl.max(s_masked, axis=1), 0.0)
        e = tl.where(valid, tl.exp(s_masked - row_max[:, None]), 0.0)
        kept_mass = tl.sum(tl.where(sel, e, 0.0), axis=1)
        total = tl.sum(e, axis=1)
        tl.store(integrity_ptr + rows, kept_mass, mask=row_ok)
        tl.store(integrity_ptr + B + rows, total, mask=row_ok)
        tl.store(slot_ptr + rows[:, None] * P + p[None, :], tl.where(sel, slot, -1), mask=valid)

    k0 = pid_k * KPB
    mine = sel & (slot >= k0) & (slot < k0 + KPB)
    pos = tl.broadcast_to(p[None, :], (ROWS, BLOCK_P)).to(tl.int64)
    tl.store(index_ptr + rows[:, None] * keep + slot, pos, mask=mine)
    # The gather below reads these index entries back from other threads of this program.
    tl.debug_barrier()

    for j0 in range(0, ROWS * KPB, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        row = pid_b * ROWS + j // KPB
        k = k0 + j % KPB
        ok = (j < ROWS * KPB) & (row < B) & (k < keep)
        idx = tl.load(index_ptr + row * keep + k, mask=ok, other=0)
        row64 = row.to(tl.int64)
        src = tokens_ptr + row64[:, None] * stride_tb + idx[:, None] * stride_tp
        dst = kept_ptr + row64[:, None] * stride_kb + k.to(tl.int64)[:, None] * stride_kk
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m = ok[:, None] & (c[None, :] < C)
            v = tl.load(src + c[None, :] * stride_tc, mask=m)
            tl.store(dst + c[None, :] * stride_kc, v, mask=m)


@triton.jit
def _integrity_mask_bwd_kernel(
    grad_kept_ptr,
    slot_ptr,
    grad_tokens_ptr,
    N,
    P,
    C,
    stride_gb,
    stride_gk,
    stride_gc,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    slot = tl.load(slot_ptr + n, mask=n_ok, other=-1)
    kept = slot >= 0
    n64 = n.to(tl.int64)
    src = grad_kept_ptr + (n64 // P)[:, None] * stride_gb + slot.to(tl.int64)[:, None] * stride_gk
    dst = grad_tokens_ptr + n64[:, None] * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c[None, :] < C
        g = tl.load(src + c[None, :] * stride_gc, mask=kept[:, None] & c_ok, other=0.0)
        tl.store(dst + c[None, :], g, mask=n_ok[:, None] & c_ok)


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
    block_p = triton.next_power_of_2(P)
    block_k = triton.next_power_of_2(keep)
    if interpret:
        rows = min(triton.next_power_of_2(B), max(1, 8192 // block_p))
        kpb = block_k
        block_c = min(triton.next_power_of_2(C), 256)
        block_j = min(rows * kpb, max(1, 16384 // block_c))
        return dict(ROWS=rows, KPB=kpb, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=4)
    rows = min(triton.next_power_of_2(B), max(1, 256 // block_p))
    kpb = min(block_k, max(1, 32 // rows))
    block_j = rows * kpb
    block_c = min(triton.next_power_of_2(C), max(16, (32768 // itemsize) // block_j))
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
    grid = (triton.cdiv(B, cfg["ROWS"]), triton.cdiv(keep, cfg["KPB"]))
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
        BLOCK_P=triton.next_power_of_2(P),
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
        block_c = min(triton.next_power_of_2(C), 256)
        block_n = min(triton.next_power_of_2(B * P), max(1, 16384 // block_c))
    else:  # 32 KiB tiles: 8192 fp32 / 4096 fp64 elements over 128 threads
        block_c = min(triton.next_power_of_2(C), 256)
        block_n = max(1, (32768 // grad_kept.element_size()) // block_c)
    grid = (triton.cdiv(B * P, block_n),)
    _integrity_mask_bwd_kernel[grid](
        grad_kept, slot, grad_tokens, B * P, P, C, *grad_kept.stride(), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=4
    )
    return grad_tokens
