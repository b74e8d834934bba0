"""Fused optimal-transport patch-sentence scores, backward: the plan from the saved potentials, two products.

Derivation
----------
The forward gives score[b, g] = sum_pq P_bg[p, q] sim_bg[p, q] with sim_bg = V_b U_g^T (V_b [K, D] the patches
of image b, U_g [S, D] the sentences of report g) and the plan P_bg[p, q] = exp(f[b, g, p] + g[b, g, q] +
sim_bg[p, q] / eps). The gradient is the envelope one (see ``mlip_fast.reference.patch_sentence_ot``): the plan is
held constant, so with upstream gradient w = dL/dscore [B, G]

    dL/dsim_bg[p, q] = M_bg[p, q] = w[b, g] * P_bg[p, q]

and by the chain rule through sim_bg = V_b U_g^T

    dV_b = sum_g M_bg U_g            [K, D]
    dU_g = sum_b M_bg^T V_b          [S, D]

Two GEMM-shaped products. M is never stored: each block of it is rebuilt from the similarity block (recomputed
from the inputs over the whole of D) and the saved potentials, which are -inf wherever the plan has no mass
(padding, empty pairs), so exp gives exactly 0 there and the kernel reads no mask.

Both products are the same computation with the roles of the two sides swapped: "own" rows (the patches of b,
or the sentences of g) whose gradient a program writes, and "other" rows it walks over. Its rows are XB own
entities x RB slots, each step's columns YB other entities x CB slots (the patch side takes XB = 1 image and YB
reports of CB sentence slots; the sentence side XB reports of RB slots and YB = 1 image), so the block is

    M[(x, r), (y, c)] = w[x, y] * exp2(log2(e) * (pot_own[x, y, r] + pot_oth[x, y, c] + sim[(x, r), (y, c)] / eps))

with the potentials and weights addressed through strides that name (b, g) in either order. The patch potentials
f vary along both axes of a block; the sentence potentials g and the weights w along one only (the image is fixed
per program on the patch side and per step on the sentence side), so those are loaded as vectors. The block is
multiplied with the other rows' DC columns of D (``tl.dot``: tensor cores for half inputs, the block rounded to
the input dtype as a same-dtype PyTorch backward rounds its gradient; IEEE fp32 for fp32). D above DC is split
over programs, each recomputing the similarity: 2*B*G*K*S*D*(1 + D / DC) FLOPs per side, no atomics, and the
result does not depend on the launch (deterministic).
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # a global a kernel reads must be constexpr


@triton.jit(do_not_specialize=["X", "R", "Y", "C", "so_x", "so_y", "st_x", "st_y", "sw_x", "sw_y"])
def _patch_sentence_ot_bwd_kernel(
    out_ptr,  # [X, R, D] gradient of the own rows, in their dtype
    own_ptr,  # [X, R, D] own rows, contiguous
    oth_ptr,  # [Y, C, D] other rows, contiguous
    pot_own_ptr,  # fp32 own-side potential of slot r for the pair (x, y): x * so_x + y * so_y + r
    pot_oth_ptr,  # fp32 other-side potential of slot c for the pair (x, y): x * st_x + y * st_y + c
    w_ptr,  # fp32 upstream gradient of the pair (x, y): x * sw_x + y * sw_y
    X,
    R,
    Y,
    C,
    D,
    so_x,
    so_y,
    st_x,
    st_y,
    sw_x,
    sw_y,
    z_scale,  # log2(e) / eps
    OWN_IS_PATCH: tl.constexpr,  # patch side (XB = 1) or sentence side (YB = 1)
    UPCAST: tl.constexpr,
    XB: tl.constexpr,  # own entities per program (1 on the patch side)
    RB: tl.constexpr,  # own slots per entity
    YB: tl.constexpr,  # other entities per step (1 on the sentence side)
    CB: tl.constexpr,  # other slots per entity in a step
    BD: tl.constexpr,  # D chunk of the similarity dot
    DC: tl.constexpr,  # D columns of the output per program
):
    BM: tl.constexpr = XB * RB
    BN: tl.constexpr = YB * CB
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_rc = tl.cdiv(R, RB)
    x0 = (pid_m // n_rc) * XB
    r0 = (pid_m % n_rc) * RB

    offs_m = tl.arange(0, BM)
    x_m = (x0 + offs_m // RB).to(tl.int64)
    r_m = r0 + offs_m % RB
    m_ok = (x_m < X) & (r_m < R)
    own_rows = own_ptr + (x_m * R + r_m) * D
    offs_d = tl.arange(0, BD)
    offs_c = pid_d * DC + tl.arange(0, DC)
    c_in = offs_c < D
    offs_n = tl.arange(0, BN)

    acc = tl.zeros([BM, DC], dtype=tl.float32)
    n_cc = tl.cdiv(C, CB)
    for step in range(0, tl.cdiv(Y, YB) * n_cc):
        y_n = ((step // n_cc) * YB + offs_n // CB).to(tl.int64)
        c_n = (step % n_cc) * CB + offs_n % CB
        n_ok = (y_n < Y) & (c_n < C)
        oth_rows = oth_ptr + (y_n * C + c_n) * D

        sim = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dd = d0 + offs_d
            d_in = dd < D
            a = tl.load(own_rows[:, None] + dd[None, :], mask=m_ok[:, None] & d_in[None, :], other=0.0)
            bt = tl.load(oth_rows[None, :] + dd[:, None], mask=d_in[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            sim = tl.dot(a, bt, sim, input_precision="ieee")

        # The patch potentials f[b, g, p] vary along both axes of the block; the sentence potentials g[b, g, q]
        # and the weights w[b, g] along one only (the program's image is fixed on the patch side, each step's
        # image on the sentence side), so they are loaded as vectors and broadcast.
        ok = m_ok[:, None] & n_ok[None, :]
        if OWN_IS_PATCH:
            x0_64 = x0.to(tl.int64)
            pot = tl.load(pot_own_ptr + x0_64 * so_x + y_n[None, :] * so_y + r_m[:, None], mask=ok, other=float("-inf"))
            pot += tl.load(pot_oth_ptr + x0_64 * st_x + y_n * st_y + c_n, mask=n_ok, other=float("-inf"))[None, :]
            w = tl.load(w_ptr + x0_64 * sw_x + y_n * sw_y, mask=n_ok, other=0.0)[None, :]
        else:
            y0 = (step // n_cc).to(tl.int64)
            pot = tl.load(pot_own_ptr + x_m * so_x + y0 * so_y + r_m, mask=m_ok, other=float("-inf"))[:, None]
            pot += tl.load(pot_oth_ptr + x_m[:, None] * st_x + y0 * st_y + c_n[None, :], mask=ok, other=float("-inf"))
            w = tl.load(w_ptr + x_m * sw_x + y0 * sw_y, mask=m_ok, other=0.0)[:, None]
        m_blk = w * tl.exp2(pot * LOG2E + sim * z_scale)

        rows = tl.load(oth_rows[:, None] + offs_c[None, :], mask=n_ok[:, None] & c_in[None, :], other=0.0)
        if UPCAST:
            rows = rows.to(tl.float32)
        else:
            m_blk = m_blk.to(rows.dtype)
        acc = tl.dot(m_blk, rows, acc, input_precision="ieee")

    out = out_ptr + (x_m * R + r_m)[:, None] * D + offs_c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & c_in[None, :])
