"""Fused patch-sentence scores, backward kernel: both input gradients from the forward's argmax indices.


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
buffers summed in a fixed order (``deterministic=True``: bitwise reproducible on a given GPU model). The launcher
picks the split with the least work on the busiest SM (``heuristics.backward_split``: whole rounds of resident
blocks, no partial wave where a smaller split fills the GPU as well), and one epilogue launch (``side.py``) sums
the buffers, applies the normalisation's Jacobian when the forward normalised, and casts to the input dtype.

Numerics: fp32 inputs use IEEE fp32 dot products (no TF32). bf16/fp16 inputs feed the tensor cores directly
with fp32 accumulation; under the Triton interpreter (CPU) they are widened to fp32 first because the
interpreter's half-precision dot is wrong. In the half backward the weights in M are rounded to the input
dtype, as a same-dtype PyTorch backward rounds its upstream gradient.
"""
import triton
import triton.language as tl


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
