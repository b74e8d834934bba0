"""Fused patch-sentence scores (token-wise max, both directions): Triton forward and backward + launchers.

Forward
-------
For image b (patches P_b [K, D], validity m_b [K]) and report g (sentences S_g [S, D], validity n_g [S]),
with sim[p, q] = <P_b[p], S_g[q]>:

    i2t[b, g] = 1/|m_b| * sum_{p valid} sim[p, a[b, g, p]],   a[b, g, p] = argmax_{q valid} sim[p, q]
    t2i[b, g] = 1/|n_g| * sum_{q valid} sim[c[b, g, q], q],   c[b, g, q] = argmax_{p valid} sim[p, q]

One program owns image b and a block of GB reports. It walks the patches in chunks of BLOCK_K; for each
chunk it accumulates the [BLOCK_K, GB * S_PAD] tile of dot products over D in chunks of BLOCK_D (fp32
accumulation), and from that same tile takes both maxima: per patch over the sentences of each report
(i2t: complete inside the chunk, summed into the mean) and per sentence over the chunk's patches (t2i:
a running max across chunks). Only the [B, G] scores and the argmax indices a [B, G, K] and c [B, G, S]
(int16) leave the kernel; the B*G*K*S grid never exists in memory. Pairs with an empty side score 0 and
get argmax -1, which the backward reads as "no gradient".

Backward
--------
Given upstream gradients dI = dL/di2t and dT = dL/dt2i (both [B, G]), let

    wI[b, g] = dI[b, g] / |m_b|,        wT[b, g] = dT[b, g] / |n_g|.

A max passes its gradient to its argmax only, so each score is a sum of selected dot products:

    dL/dsim[b, g, p, q] = M_bg[p, q] = wI[b, g] * [a[b, g, p] == q] + wT[b, g] * [c[b, g, q] == p]

(the mask conditions are already in the indices: an invalid p or q, or an empty side, has index -1 and
never matches). By the chain rule through sim = P_b S_g^T:

    dP_b = sum_g M_bg S_g            [K, D]
    dS_g = sum_b M_bg^T P_b          [S, D]

Both are the same computation with the roles of the two sides swapped: "own" rows (patches of b, or
sentences of g), "other" rows of every entity on the other side, an "own" argmax pointing from an own row
into the other side and an "other" argmax pointing back. ``_patch_sentence_bwd_kernel`` therefore serves
both. One program owns BLOCK_N consecutive own rows (flattened over entity x rows, so odd K or S wastes
nothing) and BLOCK_D columns of D; it walks the other side's flattened rows in chunks of BLOCK_M, builds the
[BLOCK_N, BLOCK_M] block of M from the int16 indices (no recompute of the grid) and multiplies it with the
other rows on the tensor cores: 2*B*G*K*S*D FLOPs per gradient, as counted in PERF.md.

To fill the GPU the other side can be split across SPLIT programs per output tile. Their partial sums are
either added with fp32 atomics (default, fastest, order-dependent in the last bits) or written to SPLIT
separate buffers that are summed in a fixed order (``deterministic=True``: bitwise reproducible).

Numerics: fp32 inputs use IEEE fp32 dot products (no TF32). bf16/fp16 inputs feed the tensor cores directly
with fp32 accumulation; under the Triton interpreter (CPU) they are widened to fp32 first because the
interpreter's half-precision dot is wrong. In the half backward the weights in M are rounded to the input
dtype, as a same-dtype PyTorch backward rounds its upstream gradient.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from mlip_fast.kernels._target import target_of

# Read once, like @triton.jit does: it decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _patch_sentence_fwd_kernel(
    p_ptr,  # [B, K, D], last dim contiguous
    s_ptr,  # [G, S, D], last dim contiguous
    pmask_ptr,  # [B, K] uint8 (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8 (read when HAS_SMASK)
    np_ptr,  # [B] int32: valid patches per image
    ns_ptr,  # [G] int32: valid sentences per report
    i2t_ptr,  # [B, G] fp32 out
    t2i_ptr,  # [B, G] fp32 out
    arg_i2t_ptr,  # [B, G, K] int16 out: sentence index per patch, -1 = no gradient
    arg_t2i_ptr,  # [B, G, S] int16 out: patch index per sentence, -1 = no gradient
    G,
    K,
    S,
    D,
    stride_pb,
    stride_pk,
    stride_sg,
    stride_ss,
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    DO_I2T: tl.constexpr,
    DO_T2I: tl.constexpr,
    S_PAD: tl.constexpr,
    GB: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
):
    BLOCK_N: tl.constexpr = GB * S_PAD
    b = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GB

    # Sentence side of the tile: column n is sentence (n % S_PAD) of report g0 + n // S_PAD.
    offs_n = tl.arange(0, BLOCK_N)
    g_idx = g0 + offs_n // S_PAD
    s_idx = offs_n % S_PAD
    n_in = (g_idx < G) & (s_idx < S)
    n_ok = n_in
    if HAS_SMASK:
        n_ok = n_ok & (tl.load(smask_ptr + g_idx * S + s_idx, mask=n_in, other=0) != 0)
    s_rows = s_ptr + g_idx.to(tl.int64) * stride_sg + s_idx * stride_ss

    g_out = g0 + tl.arange(0, GB)
    g_out_in = g_out < G
    n_valid_s = tl.load(ns_ptr + g_out, mask=g_out_in, other=0)  # [GB]
    n_valid_p = tl.load(np_ptr + b)

    offs_d = tl.arange(0, BLOCK_D)
    neg_inf = float("-inf")
    i2t_sum = tl.zeros([GB], dtype=tl.float32)
    t2i_max = tl.full([BLOCK_N], neg_inf, tl.float32)
    t2i_arg = tl.zeros([BLOCK_N], dtype=tl.int32)

    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        k_ok = k_in
        if HAS_PMASK:
            k_ok = k_ok & (tl.load(pmask_ptr + b * K + offs_k, mask=k_in, other=0) != 0)
        p_rows = p_ptr + b * stride_pb + offs_k * stride_pk

        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + offs_d
            d_in = dd < D
            p = tl.load(p_rows[:, None] + dd[None, :], mask=k_in[:, None] & d_in[None, :], other=0.0)
            q = tl.load(s_rows[None, :] + dd[:, None], mask=n_in[None, :] & d_in[:, None], other=0.0)
            if UPCAST:
                p = p.to(tl.float32)
                q = q.to(tl.float32)
            acc = tl.dot(p, q, acc, input_precision="ieee")

        if DO_I2T:
            # Per patch, max over the valid sentences of each report of the block.
            sim = tl.where(n_ok[None, :], acc, neg_inf)
            row_max, row_arg = tl.max(tl.reshape(sim, [BLOCK_K, GB, S_PAD]), axis=2, return_indices=True)
            pair_ok = k_ok[:, None] & (n_valid_s[None, :] > 0)
            i2t_sum += tl.sum(tl.where(pair_ok, row_max, 0.0), axis=0)
            arg_ptrs = arg_i2t_ptr + (b * G + g_out[None, :]) * K + offs_k[:, None]
            tl.store(arg_ptrs, tl.where(pair_ok, row_arg, -1).to(tl.int16), mask=k_in[:, None] & g_out_in[None, :])
        if DO_T2I:
            # Per sentence, running max over the valid patches; the strict ">" keeps the first maximum,
            # matching the left tie-break inside a chunk.
            sim = tl.where(k_ok[:, None], acc, neg_inf)
            col_max, col_arg = tl.max(sim, axis=0, return_indices=True)
            better = col_max > t2i_max
            t2i_max = tl.where(better, col_max, t2i_max)
            t2i_arg = tl.where(better, col_arg + k0, t2i_arg)

    if DO_I2T:
        i2t = tl.where((n_valid_s > 0) & (n_valid_p > 0), i2t_sum / tl.maximum(n_valid_p, 1).to(tl.float32), 0.0)
        tl.store(i2t_ptr + b * G + g_out, i2t, mask=g_out_in)
    if DO_T2I:
        col_ok = n_ok & (n_valid_p > 0)
        t2i_sum = tl.sum(tl.reshape(tl.where(col_ok, t2i_max, 0.0), [GB, S_PAD]), axis=1)
        t2i = tl.where(n_valid_s > 0, t2i_sum / tl.maximum(n_valid_s, 1).to(tl.float32), 0.0)
        tl.store(t2i_ptr + b * G + g_out, t2i, mask=g_out_in)
        tl.store(
            arg_t2i_ptr + (b * G + g_idx) * S + s_idx,
            tl.where(col_ok, t2i_arg, -1).to(tl.int16),
            mask=n_in,
        )


@triton.jit
def _patch_sentence_bwd_kernel(
    out_ptr,  # [SPLIT, X * R, D] fp32 (atomic mode: SPLIT = 1 slice, zero-filled)
    other_ptr,  # [Y * C, D] rows of the other side, contiguous
    arg_own_ptr,  # (x, y, r) -> other-side index c in [0, C) or -1
    arg_oth_ptr,  # (x, y, c) -> own-side index r in [0, R) or -1
    w_own_ptr,  # (x, y) fp32 weight of the own argmax term
    w_oth_ptr,  # (x, y) fp32 weight of the other argmax term (same strides as w_own)
    R,
    C,
    D,
    n_rows,  # X * R
    n_cols,  # Y * C
    cols_per_split,
    sa_x,
    sa_y,
    sa_r,
    sb_x,
    sb_y,
    sb_c,
    sw_x,
    sw_y,
    HAS_OWN: tl.constexpr,
    HAS_OTH: tl.constexpr,
    USE_ATOMIC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < n_rows
    x = (offs_n // R).to(tl.int64)
    r = offs_n % R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_in = offs_d < D

    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_lo = pid_s * cols_per_split
    m_hi = tl.minimum(m_lo + cols_per_split, n_cols)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_in = offs_m < m_hi
        y = (offs_m // C).to(tl.int64)
        c = offs_m % C
        pair_in = n_in[:, None] & m_in[None, :]
        w_offs = x[:, None] * sw_x + y[None, :] * sw_y

        grad = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if HAS_OWN:
            a_own = tl.load(arg_own_ptr + x[:, None] * sa_x + y[None, :] * sa_y + r[:, None] * sa_r, mask=pair_in, other=-1)
            w_own = tl.load(w_own_ptr + w_offs, mask=pair_in, other=0.0)
            grad += tl.where(a_own.to(tl.int32) == c[None, :], w_own, 0.0)
        if HAS_OTH:
            a_oth = tl.load(arg_oth_ptr + x[:, None] * sb_x + y[None, :] * sb_y + c[None, :] * sb_c, mask=pair_in, other=-1)
            w_oth = tl.load(w_oth_ptr + w_offs, mask=pair_in, other=0.0)
            grad += tl.where(a_oth.to(tl.int32) == r[:, None], w_oth, 0.0)

        rows = tl.load(other_ptr + offs_m.to(tl.int64)[:, None] * D + offs_d[None, :], mask=m_in[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            rows = rows.to(tl.float32)
        else:
            grad = grad.to(rows.dtype)
        acc = tl.dot(grad, rows, acc, input_precision="ieee")

    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * D + offs_d[None, :]
    out_mask = n_in[:, None] & d_in[None, :]
    if USE_ATOMIC:  # every split adds into the one zero-filled buffer
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:  # split s writes its own buffer, summed in a fixed order by the launcher
        tl.store(out_ptrs + pid_s.to(tl.int64) * n_rows * D, acc, mask=out_mask)


# ----------------------------------------------------------------------------------------------- launchers


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def _upcast(dtype: torch.dtype) -> bool:
    # fp32 needs no widening; half inputs are widened only where the interpreter's half dot is wrong.
    return dtype == torch.float32 or INTERPRET


def valid_counts(
    sentence_mask: Optional[torch.Tensor], patch_mask: Optional[torch.Tensor], B: int, K: int, G: int, S: int, device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Valid patches per image [B] and valid sentences per report [G], int32."""
    n_p = patch_mask.sum(1, dtype=torch.int32) if patch_mask is not None else torch.full((B,), K, dtype=torch.int32, device=device)
    n_s = sentence_mask.sum(1, dtype=torch.int32) if sentence_mask is not None else torch.full((G,), S, dtype=torch.int32, device=device)
    return n_p, n_s


def fwd_config(K: int, S: int, G: int, D: int, dtype: torch.dtype) -> dict:
    """Block sizes for the forward: about 128 sentence columns per tile (GB reports of S_PAD rows)."""
    s_pad = _pow2(S)
    target_n = 16 if INTERPRET and G * s_pad < 128 else 128
    gb = max(1, min(target_n // s_pad, _pow2(G)))
    while gb * s_pad < 16:  # tl.dot needs at least 16 columns
        gb *= 2
    block_k = min(64, _pow2(K, 16))
    block_d = min(64 if dtype != torch.float32 else 32, _pow2(D, 16))
    if INTERPRET:
        block_d = min(128, _pow2(D, 16))
    warps = 8 if block_k * gb * s_pad >= 8192 else 4
    return dict(S_PAD=s_pad, GB=gb, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps, num_stages=3)


def patch_sentence_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool = True,
    do_t2i: bool = True,
    config: Optional[dict] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the forward.

    Args:
        patches: [B, K, D] fp16/bf16/fp32; sentences: [G, S, D] same dtype and device.
        sentence_mask: [G, S] bool or None (all valid); patch_mask: [B, K] bool or None.
        do_i2t / do_t2i: which directions to compute (at least one).
        config: optional block-size override (keys of :func:`fwd_config`), for tuning sweeps.

    Returns:
        (i2t [B, G] fp32, t2i [B, G] fp32, arg_i2t [B, G, K] int16, arg_t2i [B, G, S] int16). A direction
        not computed comes back as empty tensors.
    """
    if not (do_i2t or do_t2i):
        raise ValueError("patch_sentence_fwd: nothing to compute (do_i2t and do_t2i are both False)")
    if max(patches.shape[1], sentences.shape[1]) >= 2**15:
        raise ValueError("patch_sentence_fwd: K and S must be below 32768 (argmax indices are int16)")
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    device = patches.device
    n_p, n_s = valid_counts(sentence_mask, patch_mask, B, K, G, S, device)
    f32 = dict(dtype=torch.float32, device=device)
    i2t = torch.empty((B, G) if do_i2t else (0,), **f32)
    t2i = torch.empty((B, G) if do_t2i else (0,), **f32)
    arg_i2t = torch.empty((B, G, K) if do_i2t else (0,), dtype=torch.int16, device=device)
    arg_t2i = torch.empty((B, G, S) if do_t2i else (0,), dtype=torch.int16, device=device)
    cfg = dict(fwd_config(K, S, G, D, patches.dtype), **(config or {}))
    pm = patch_mask.view(torch.uint8) if patch_mask is not None else n_p
    sm = sentence_mask.view(torch.uint8) if sentence_mask is not None else n_s
    grid = (B, triton.cdiv(G, cfg["GB"]))
    _patch_sentence_fwd_kernel[grid](
        patches, sentences, pm, sm, n_p, n_s, i2t, t2i, arg_i2t, arg_t2i,
        G, K, S, D,
        patches.stride(0), patches.stride(1), sentences.stride(0), sentences.stride(1),
        HAS_PMASK=patch_mask is not None,
        HAS_SMASK=sentence_mask is not None,
        DO_I2T=do_i2t,
        DO_T2I=do_t2i,
        UPCAST=_upcast(patches.dtype),
        **cfg,
    )
    return i2t, t2i, arg_i2t, arg_t2i


def _bwd_side(
    own: torch.Tensor,
    other: torch.Tensor,
    launch_args: tuple,
    has_own: bool,
    has_oth: bool,
    deterministic: bool,
    split: Optional[int] = None,
) -> torch.Tensor:
    """grad for one side: own [X, R, D] rows, other [Y, C, D] rows; returns fp32 [X, R, D]."""
    X, R, D = own.shape
    Y, C, _ = other.shape
    n_rows, n_cols = X * R, Y * C
    block_n = 64 if n_rows >= 64 else _pow2(n_rows, 16)
    block_m = 64 if n_cols >= 64 else _pow2(n_cols, 16)
    block_d = min(128, _pow2(D, 16))
    tiles = triton.cdiv(n_rows, block_n) * triton.cdiv(D, block_d)
    # Split the other side so that about two waves of programs fill the GPU.
    chunks = triton.cdiv(n_cols, block_m)
    if split is None:
        split = 1 if INTERPRET else max(1, min(chunks, triton.cdiv(2 * target_of(own.device).sm_count, tiles)))
        if deterministic:
            split = min(split, 4)  # each split costs a [X*R, D] fp32 buffer
    split = max(1, min(int(split), chunks))
    cols_per_split = triton.cdiv(chunks, split) * block_m
    split = triton.cdiv(n_cols, cols_per_split)
    use_atomic = split > 1 and not deterministic
    if use_atomic:
        out = torch.zeros((1, n_rows, D), dtype=torch.float32, device=own.device)
    else:
        out = torch.empty((split, n_rows, D), dtype=torch.float32, device=own.device)
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(D, block_d), split)
    _patch_sentence_bwd_kernel[grid](
        out, other, *launch_args[:4], R, C, D, n_rows, n_cols, cols_per_split, *launch_args[4:],
        HAS_OWN=has_own,
        HAS_OTH=has_oth,
        USE_ATOMIC=use_atomic,
        UPCAST=_upcast(other.dtype),
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=4,
        num_stages=2,
    )
    # A fixed-order sum over the split buffers keeps the deterministic mode bitwise reproducible.
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
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launches the backward from the saved argmax indices.

    Args:
        grad_i2t / grad_t2i: [B, G] upstream gradients (None for a direction not computed).
        patches [B, K, D], sentences [G, S, D], masks as in :func:`patch_sentence_fwd`.
        arg_i2t [B, G, K], arg_t2i [B, G, S]: int16 indices from the forward.
        deterministic: no atomics; bitwise reproducible.
        split: programs sharing one output tile (default: enough to fill the GPU; 1 under the interpreter).

    Returns:
        (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype.
    """
    patches = patches.contiguous()
    sentences = sentences.contiguous()
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    n_p, n_s = valid_counts(sentence_mask, patch_mask, B, K, G, S, patches.device)
    has_i2t, has_t2i = grad_i2t is not None, grad_t2i is not None
    if not (has_i2t or has_t2i):
        return torch.zeros_like(patches), torch.zeros_like(sentences)
    zero = torch.zeros((B, G), dtype=torch.float32, device=patches.device)
    w_i2t = grad_i2t.float() / n_p.clamp(min=1)[:, None] if has_i2t else zero
    w_t2i = grad_t2i.float() / n_s.clamp(min=1)[None, :] if has_t2i else zero
    w_i2t, w_t2i = w_i2t.contiguous(), w_t2i.contiguous()
    a_i = arg_i2t if has_i2t else torch.full((1,), -1, dtype=torch.int16, device=patches.device)
    a_t = arg_t2i if has_t2i else torch.full((1,), -1, dtype=torch.int16, device=patches.device)
    # Patches own side: x = b, y = g, r = p, c = q; own argmax a[b, g, p], other argmax c[b, g, q].
    grad_p = _bwd_side(
        patches, sentences,
        (a_i, a_t, w_i2t, w_t2i, G * K, K, 1, G * S, S, 1, G, 1),
        has_i2t, has_t2i, deterministic, split,
    )
    # Sentences own side: x = g, y = b, r = q, c = p; own argmax c[b, g, q], other argmax a[b, g, p].
    grad_s = _bwd_side(
        sentences, patches,
        (a_t, a_i, w_t2i, w_i2t, S, G * S, 1, K, G * K, 1, 1, G),
        has_t2i, has_i2t, deterministic, split,
    )
    return grad_p.to(patches.dtype), grad_s.to(sentences.dtype)
