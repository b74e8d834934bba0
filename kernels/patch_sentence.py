"""Fused patch-sentence scores (token-wise max, both directions): Triton forward and backward + launchers.

Forward
-------
For image b (patches P_b [K, D], validity m_b [K]) and report g (sentences S_g [S, D], validity n_g [S]),
with sim[p, q] = <P_b[p], S_g[q]>:

    i2t[b, g] = 1/|m_b| * sum_{p valid} sim[p, a[b, g, p]],   a[b, g, p] = argmax_{q valid} sim[p, q]
    t2i[b, g] = 1/|n_g| * sum_{q valid} sim[c[b, g, q], q],   c[b, g, q] = argmax_{p valid} sim[p, q]

Tile. One program owns a block of GB reports and a group of IB images. Its tile is the transposed
similarity block: rows are the sentence slots of the GB reports (GB x S_CH rows, S_CH = S padded to a power
of two), columns are BN patches of one image, accumulated over D in chunks of BD with fp32 accumulation
(``tl.dot``: wgmma on sm_90, mma.sync on sm_80 for half inputs). Sentences on the rows is what makes both
reductions cheap in the tensor-core accumulator layout, where a warp holds 16 consecutive rows:

- i2t (per patch, max over the sentences of each report) reduces the tile reshaped to [GB, S_CH, BN] over
  its middle axis: the rows of one report sit in one warp (S_CH <= 16) or a few, so the max is in-thread
  plus lane shuffles, with no trip through shared memory. Complete inside the tile; its mean over valid
  patches accumulates over the image's patch chunks.
- t2i (per sentence, max over the patches of the image) reduces each row: in-thread plus two shuffle
  rounds, carried as a running max over the patch chunks of the image.

The program walks its images one after the other with the same report block (its sentence rows stay hot
in L2); programs are numbered report block fastest, so the programs resident together share their images.
Only the [B, G] scores and the argmax indices a [B, G, K] and c [B, G, S] (int16) leave the kernel; the
B*G*K*S grid never exists in memory. Pairs with an empty side score 0 and get argmax -1, which the
backward reads as "no gradient". Ties go to the lowest index in both directions (strict ``>`` across
chunks, left tie-break inside one).

Reports longer than one tile (S padded above ``S_TILE`` rows, e.g. S = 1024): the program owns one report and
walks its sentence chunks of S_TILE rows, each against every patch chunk of the image. t2i of a chunk's
rows is complete after its patch chunks; the i2t max over the sentence chunks is carried per patch in a
program-private scratch row in global memory (K values and indices, L2-resident), read and written once per
tile behind a block barrier, so neither K nor S is limited by registers.

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
sentences of g) and "other" rows, an "own" argmax pointing from an own row into the other side and an
"other" argmax pointing back. ``_patch_sentence_bwd_kernel`` serves both. Its rows are XB own entities x RB
slots, its columns YB other entities x CB slots (the patch side takes XB = 1 image and YB reports of
CB = S slots; the sentence side XB reports of RB = S slots and YB = 1 image), so the block of M is

    M[(x, r), (y, c)] = w_own[x, y] * [a_own[x, y, r] == c] + w_oth[x, y] * [a_oth[x, y, c] == r]

built in registers from compact loads: a_own is [XB, RB, YB] values broadcast along c, a_oth is
[XB, YB, CB] values broadcast along r, the weights [XB, YB] broadcast along both: no value is loaded twice.
The block is built once per step of the walk over the other side and multiplied with the other rows over the
program's whole D range (DC columns; D above DC is split over programs, each rebuilding M), on the tensor
cores: 2*B*G*K*S*D FLOPs per gradient, as counted in PERF.md.

To fill the GPU the walk over the other side can be split across SPLIT programs per output tile (the split
count comes from the SM count, so it differs between GPUs). Their partial sums are either added with
relaxed fp32 atomics (default, fastest, order-dependent in the last bits) or written to SPLIT separate
buffers summed in a fixed order (``deterministic=True``: bitwise reproducible on a given GPU model).

Numerics: fp32 inputs use IEEE fp32 dot products (no TF32). bf16/fp16 inputs feed the tensor cores directly
with fp32 accumulation; under the Triton interpreter (CPU) they are widened to fp32 first because the
interpreter's half-precision dot is wrong. In the half backward the weights in M are rounded to the input
dtype, as a same-dtype PyTorch backward rounds its upstream gradient.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from mlip_fast.kernels._target import target_of

# Read once, like @triton.jit does: it decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

MAX_TOKENS = 2**15  # argmax indices are int16: K and S must stay below
NORM_EPS = 1e-12  # F.normalize's floor on the norm


@triton.jit
def _max_propagating_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _max_and_first_index(x, axis: tl.constexpr, n: tl.constexpr, NAN_REDUCE: tl.constexpr):
    """(max of x along axis, NaN if any entry is NaN; the lowest index reaching it, 0 for a NaN max). Two plain
    reductions (max, then min of the indices not below it) cost fewer instructions and shuffles than one
    reduction carrying (value, index) pairs.

    On a GPU (``NAN_REDUCE``) the max is one NaN-propagating reduction (``max.NaN.f32``, the cost of a plain
    max). The interpreter runs a reduction with a custom combine element by element in Python, so there the
    same value comes from the built-in (NaN-ignoring) max and a NaN count."""
    if NAN_REDUCE:
        m = tl.reduce(x, axis, _max_propagating_nan)
    else:
        m = tl.max(x, axis=axis)
        m = tl.where(tl.max(tl.where(x != x, 1, 0), axis=axis) > 0, float("nan"), m)
    if axis == 1:
        iota = tl.arange(0, n)[None, :, None] if len(x.shape) == 3 else tl.arange(0, n)[None, :]
    else:
        iota = tl.arange(0, n)[:, None]
    # "not below the max": the max itself, and every entry when the max is NaN (x < NaN is false)
    idx = tl.min(tl.where(x < tl.expand_dims(m, axis), n, iota), axis=axis)
    return m, idx


# Shape ints are not specialised on (== 1, divisible by 16): one compile serves every B, G, K, S; D and the
# strides (multiples of D) keep their alignment specialisation, which lets the loads vectorise.
@triton.jit(do_not_specialize=["K_SCRATCH", "B", "G", "K", "S", "n_rb", "IB"])
def _patch_sentence_fwd_kernel(
    p_ptr,  # [B, K, D], last dim contiguous
    s_ptr,  # [G, S, D], last dim contiguous
    pmask_ptr,  # [B, K] uint8, contiguous (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8, contiguous (read when HAS_SMASK)
    np_ptr,  # [B] int32: valid patches per image
    ns_ptr,  # [G] int32: valid sentences per report
    inv_p_ptr,  # [B, K] fp32: 1 / max(||patch||, eps) (read when NORMALIZE)
    inv_s_ptr,  # [G, S] fp32: 1 / max(||sentence||, eps) (read when NORMALIZE)
    i2t_ptr,  # [B, G] fp32 out
    t2i_ptr,  # [B, G] fp32 out
    arg_i2t_ptr,  # [B, G, K] int16 out: sentence index per patch, -1 = no gradient
    arg_t2i_ptr,  # [B, G, S] int16 out: patch index per sentence, -1 = no gradient
    scratch_v_ptr,  # [programs, K_SCRATCH] fp32 (LARGE_S only): running i2t max per patch
    scratch_a_ptr,  # [programs, K_SCRATCH] int32 (LARGE_S only): its sentence index
    K_SCRATCH,
    B,
    G,
    K,
    S,
    D,
    stride_pb,
    stride_pk,
    stride_sg,
    stride_ss,
    n_rb,  # report blocks
    IB,  # images per program
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    DO_I2T: tl.constexpr,
    DO_T2I: tl.constexpr,
    NORMALIZE: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs; half inputs always use their tensor cores)
    NAN_REDUCE: tl.constexpr,  # NaN-propagating max as one reduction (not under the interpreter)
    GB: tl.constexpr,  # reports per block (1 when LARGE_S)
    S_CH: tl.constexpr,  # sentence rows per report in the tile (S padded, or one sentence chunk)
    BN: tl.constexpr,  # patches per tile
    BD: tl.constexpr,  # D chunk of the dot
    LARGE_S: tl.constexpr,  # reports span several sentence chunks
    UPCAST: tl.constexpr,
):
    BM: tl.constexpr = GB * S_CH
    pid = tl.program_id(0)
    rb = pid % n_rb
    ib = pid // n_rb
    g0 = rb * GB

    # Rows of the tile: sentence slot q (within the current chunk) of report g0 + j.
    offs_m = tl.arange(0, BM)
    j_of_m = offs_m // S_CH
    g_m = g0 + j_of_m
    g_m_in = g_m < G
    s_row_base = s_ptr + g_m.to(tl.int64) * stride_sg
    offs_j = tl.arange(0, GB)
    g_j = g0 + offs_j
    g_j_in = g_j < G
    n_valid_s = tl.load(ns_ptr + g_j, mask=g_j_in, other=0)  # [GB]
    report_ok = n_valid_s > 0  # [GB]: the report has a valid sentence

    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    neg_inf = float("-inf")

    for bi in range(IB):
        b = ib * IB + bi
        if b < B:
            b64 = b.to(tl.int64)
            p_base = p_ptr + b64 * stride_pb
            n_valid_p = tl.load(np_ptr + b)
            i2t_sum = tl.zeros([GB], dtype=tl.float32)
            t2i_sum = tl.zeros([GB], dtype=tl.float32)
            if LARGE_S:
                scr = pid.to(tl.int64) * K_SCRATCH
                for k0 in range(0, K, BN):
                    tl.store(scratch_v_ptr + scr + k0 + offs_n, tl.full([BN], neg_inf, tl.float32))
                    tl.store(scratch_a_ptr + scr + k0 + offs_n, tl.zeros([BN], dtype=tl.int32))
                tl.debug_barrier()
            for s0 in range(0, S, S_CH):
                q_m = s0 + offs_m % S_CH
                row_in = g_m_in & (q_m < S)
                row_ok = row_in
                if HAS_SMASK:
                    row_ok = row_ok & (tl.load(smask_ptr + g_m * S + q_m, mask=row_in, other=0) != 0)
                inv_row = tl.full([BM], 1.0, tl.float32)
                if NORMALIZE:
                    inv_row = tl.load(inv_s_ptr + g_m * S + q_m, mask=row_in, other=0.0)
                s_rows = s_row_base + q_m * stride_ss
                t2i_max = tl.full([BM], neg_inf, tl.float32)
                t2i_arg = tl.zeros([BM], dtype=tl.int32)
                for k0 in range(0, K, BN):
                    p_n = k0 + offs_n
                    col_in = p_n < K
                    col_ok = col_in
                    if HAS_PMASK:
                        col_ok = col_ok & (tl.load(pmask_ptr + b64 * K + p_n, mask=col_in, other=0) != 0)
                    p_cols = p_base + p_n * stride_pk

                    acc = tl.zeros([BM, BN], dtype=tl.float32)
                    for d0 in range(0, D, BD):
                        dd = d0 + offs_d
                        d_in = dd < D
                        a = tl.load(s_rows[:, None] + dd[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
                        bt = tl.load(p_cols[None, :] + dd[:, None], mask=d_in[:, None] & col_in[None, :], other=0.0)
                        if UPCAST:
                            a = a.to(tl.float32)
                            bt = bt.to(tl.float32)
                        acc = tl.dot(a, bt, acc, input_precision=PRECISION)
                    if NORMALIZE:
                        inv_col = tl.load(inv_p_ptr + b64 * K + p_n, mask=col_in, other=0.0)
                        acc = acc * inv_row[:, None] * inv_col[None, :]
                    # Invalid entries (padded or masked sentence row, or patch column) are -inf whatever the
                    # dot gave there (NaN included), so they never win a max; validity below comes from the
                    # masks and counts, never from values, so NaN / Inf in valid entries propagate.
                    acc = tl.where(row_ok[:, None] & col_ok[None, :], acc, neg_inf)

                    if DO_I2T:
                        # Per patch, max over the sentence rows of each report of the block.
                        v, arg = _max_and_first_index(tl.reshape(acc, [GB, S_CH, BN]), 1, S_CH, NAN_REDUCE)
                        if LARGE_S:
                            # merge into the report's running max; strict > keeps the earlier sentence chunk,
                            # a NaN replaces anything and stays
                            v1 = tl.reshape(v, [BN])
                            a1 = tl.reshape(arg, [BN]) + s0
                            old_v = tl.load(scratch_v_ptr + scr + k0 + offs_n)
                            old_a = tl.load(scratch_a_ptr + scr + k0 + offs_n)
                            better = (v1 > old_v) | (v1 != v1)
                            tl.store(scratch_v_ptr + scr + k0 + offs_n, tl.where(better, v1, old_v))
                            tl.store(scratch_a_ptr + scr + k0 + offs_n, tl.where(better, a1, old_a))
                            tl.debug_barrier()
                        else:
                            pair_ok = report_ok[:, None] & col_ok[None, :]  # [GB, BN]
                            i2t_sum += tl.sum(tl.where(pair_ok, v, 0.0), axis=1)
                            arg_ptrs = arg_i2t_ptr + (b64 * G + g_j[:, None]) * K + p_n[None, :]
                            tl.store(arg_ptrs, tl.where(pair_ok, arg, -1).to(tl.int16),
                                     mask=g_j_in[:, None] & col_in[None, :])
                    if DO_T2I:
                        # Per sentence row, running max over the patches of the image (a NaN stays).
                        cmax, carg = _max_and_first_index(acc, 1, BN, NAN_REDUCE)
                        better = (cmax > t2i_max) | (cmax != cmax)
                        t2i_max = tl.where(better, cmax, t2i_max)
                        t2i_arg = tl.where(better, carg + k0, t2i_arg)
                if DO_T2I:
                    row_final = row_ok & (n_valid_p > 0)  # a valid sentence of an image with a valid patch
                    t2i_sum += tl.sum(tl.reshape(tl.where(row_final, t2i_max, 0.0), [GB, S_CH]), axis=1)
                    tl.store(arg_t2i_ptr + (b64 * G + g_m) * S + q_m, tl.where(row_final, t2i_arg, -1).to(tl.int16),
                             mask=row_in)
            if DO_I2T:
                if LARGE_S:
                    # the report's i2t over every sentence chunk, patch chunk by patch chunk
                    for k0 in range(0, K, BN):
                        p_n = k0 + offs_n
                        run_v = tl.load(scratch_v_ptr + scr + p_n)
                        run_a = tl.load(scratch_a_ptr + scr + p_n)
                        ok = (p_n < K) & (tl.sum(n_valid_s) > 0)  # a valid patch of a report with a sentence
                        if HAS_PMASK:
                            ok = ok & (tl.load(pmask_ptr + b64 * K + p_n, mask=p_n < K, other=0) != 0)
                        i2t_sum += tl.sum(tl.where(ok, run_v, 0.0))
                        tl.store(arg_i2t_ptr + (b64 * G + g0) * K + p_n, tl.where(ok, run_a, -1).to(tl.int16),
                                 mask=p_n < K)
                    tl.debug_barrier()  # the next image re-initialises the scratch row
                i2t = tl.where((n_valid_s > 0) & (n_valid_p > 0), i2t_sum / tl.maximum(n_valid_p, 1).to(tl.float32), 0.0)
                tl.store(i2t_ptr + b64 * G + g_j, i2t, mask=g_j_in)
            if DO_T2I:
                t2i = tl.where(n_valid_s > 0, t2i_sum / tl.maximum(n_valid_s, 1).to(tl.float32), 0.0)
                tl.store(t2i_ptr + b64 * G + g_j, t2i, mask=g_j_in)


@triton.jit(do_not_specialize=["X", "R", "Y", "C", "steps_per_split", "sa_x", "sa_y", "sa_r", "sb_x", "sb_y", "sb_c",
                               "sw_x", "sw_y"])
def _patch_sentence_bwd_kernel(
    out_ptr,  # [SPLIT, X * R, D] fp32 (atomic mode: one zero-filled slice)
    other_ptr,  # [Y, C, D] rows of the other side, contiguous
    arg_own_ptr,  # (x, y, r) -> other-side slot c in [0, C) or -1
    arg_oth_ptr,  # (x, y, c) -> own-side slot r in [0, R) or -1
    w_own_ptr,  # (x, y) fp32 weight of the own argmax term
    w_oth_ptr,  # (x, y) fp32 weight of the other argmax term (same strides as w_own)
    inv_oth_ptr,  # [Y, C] fp32 inverse norms of the other rows (read when NORMALIZE)
    X,
    R,
    Y,
    C,
    D,
    steps_per_split,
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
    NORMALIZE: tl.constexpr,  # the other rows enter as x * inv (the gradient w.r.t. the normalised own rows)
    PRECISION: tl.constexpr,
    XB: tl.constexpr,  # own entities per program (1 on the patch side)
    RB: tl.constexpr,  # own slots per entity in the tile
    YB: tl.constexpr,  # other entities per step (1 on the sentence side)
    CB: tl.constexpr,  # other slots per entity in a step
    DC: tl.constexpr,  # D columns per program
):
    BM: tl.constexpr = XB * RB
    BN: tl.constexpr = YB * CB
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_rc = tl.cdiv(R, RB)  # own slot chunks per entity block
    x0 = (pid_m // n_rc) * XB
    r0 = (pid_m % n_rc) * RB

    # Own rows (x, r), as 1-d [BM] and as the [XB, RB] pieces the compact loads broadcast from.
    offs_m = tl.arange(0, BM)
    x_m = x0 + offs_m // RB
    r_m = r0 + offs_m % RB
    xs = x0 + tl.arange(0, XB)
    rs = r0 + tl.arange(0, RB)
    x_ok = xs < X
    r_ok = rs < R
    x64 = xs.to(tl.int64)
    offs_d = pid_d * DC + tl.arange(0, DC)
    d_in = offs_d < D

    n_cc = tl.cdiv(C, CB)
    n_steps = tl.cdiv(Y, YB) * n_cc
    t_lo = pid_s * steps_per_split
    t_hi = tl.minimum(t_lo + steps_per_split, n_steps)
    acc = tl.zeros([BM, DC], dtype=tl.float32)
    for t in range(t_lo, t_hi):
        y0 = (t // n_cc) * YB
        c0 = (t % n_cc) * CB
        ys = y0 + tl.arange(0, YB)
        cs = c0 + tl.arange(0, CB)
        y_ok = ys < Y
        c_ok = cs < C
        y64 = ys.to(tl.int64)
        # [XB, 1, YB, 1] weights, zero outside the own / other ranges
        xy_ok = x_ok[:, None, None, None] & y_ok[None, None, :, None]
        w_offs = x64[:, None, None, None] * sw_x + y64[None, None, :, None] * sw_y
        grad = tl.zeros([XB, RB, YB, CB], dtype=tl.float32)
        if HAS_OWN:
            # a_own[x, y, r] ([XB, RB, YB, 1]) names the slot c of the other entity that row r picked
            own_ok = xy_ok & r_ok[None, :, None, None]
            a_own = tl.load(arg_own_ptr + x64[:, None, None, None] * sa_x + y64[None, None, :, None] * sa_y
                            + rs[None, :, None, None] * sa_r, mask=own_ok, other=-1)
            w_own = tl.load(w_own_ptr + w_offs, mask=xy_ok, other=0.0)
            grad += tl.where(a_own.to(tl.int32) == cs[None, None, None, :], w_own, 0.0)
        if HAS_OTH:
            # a_oth[x, y, c] ([XB, 1, YB, CB]) names the own slot r that column c picked
            oth_ok = xy_ok & c_ok[None, None, None, :]
            a_oth = tl.load(arg_oth_ptr + x64[:, None, None, None] * sb_x + y64[None, None, :, None] * sb_y
                            + cs[None, None, None, :] * sb_c, mask=oth_ok, other=-1)
            w_oth = tl.load(w_oth_ptr + w_offs, mask=xy_ok, other=0.0)
            grad += tl.where(a_oth.to(tl.int32) == rs[None, :, None, None], w_oth, 0.0)
        if NORMALIZE:  # M's columns scaled by the other rows' inverse norms: M @ (rows * inv)
            inv_oth = tl.load(inv_oth_ptr + y64[None, None, :, None] * C + cs[None, None, None, :],
                              mask=y_ok[None, None, :, None] & c_ok[None, None, None, :], other=0.0)
            grad = grad * inv_oth
        m_blk = tl.reshape(grad, [BM, BN])

        offs_n = tl.arange(0, BN)
        y_n = y0 + offs_n // CB
        c_n = c0 + offs_n % CB
        n_ok = (y_n < Y) & (c_n < C)
        rows = tl.load(other_ptr + (y_n.to(tl.int64) * C + c_n)[:, None] * D + offs_d[None, :],
                       mask=n_ok[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            rows = rows.to(tl.float32)
        else:
            m_blk = m_blk.to(rows.dtype)
        acc = tl.dot(m_blk, rows, acc, input_precision=PRECISION)

    out_rows = (x_m.to(tl.int64) * R + r_m)[:, None] * D + offs_d[None, :]
    out_mask = ((x_m < X) & (r_m < R))[:, None] & d_in[None, :]
    if USE_ATOMIC:  # every split adds into the one zero-filled buffer; no ordering is needed between them
        tl.atomic_add(out_ptr + out_rows, acc, mask=out_mask, sem="relaxed")
    else:  # split s writes its own buffer (in the output's dtype), summed in a fixed order by the launcher
        tl.store(out_ptr + pid_s.to(tl.int64) * X * R * D + out_rows, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------------------------- launchers


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
