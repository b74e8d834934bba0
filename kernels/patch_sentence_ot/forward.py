"""Fused optimal-transport patch-sentence scores, forward: similarity tile, Sinkhorn, score, in one program.

Math
----
For image b (patches V_b [K, D], validity m_b [K]) and report g (sentences U_g [S, D], validity n_g [S]), with
sim[p, q] = <V_b[p], U_g[q]> over the live entries (valid p and q of a pair whose both sides are non-empty),
uniform marginals a_p = 1 / |m_b|, b_q = 1 / |n_g| and the entropic OT plan of cost 1 - sim with
regularisation eps (see ``mlip_fast.reference.patch_sentence_ot`` for the choices):

    P[p, q] = exp(f_p + g_q + sim[p, q] / eps)
    g_q <- log b_q - logsumexp_p(f_p + sim[p, q] / eps)      (iteration: sentence update,
    f_p <- log a_p - logsumexp_q(g_q + sim[p, q] / eps)       then patch update; f = 0 at the start)
    score[b, g] = sum_pq P[p, q] sim[p, q]

The kernel works in base 2 (exp2 / log2 are the hardware's instructions): z = sim * log2(e) / eps and
potentials in log2 units, P = exp2(f2 + g2 + z); f, g leave the kernel in natural-log units (times ln 2).

Backward (derived in ``backward.py``): the plan is held constant (envelope gradient), so dL/dsim = w * P with
w = dL/dscore, and the input gradients are the two products dV_b = sum_g (w P)_bg U_g, dU_g = sum_b (w P)_bg^T V_b.
All the backward needs from here is P, i.e. the potentials f and g.

Tile
----
One program owns one image and a block of GB reports. Its tile is [GB * S_CH, BN]: rows are the sentence slots
of the GB reports (S padded to a power of two S_CH, at least 16), columns are all K patches of the image (K padded
to BN), accumulated over D in chunks of BD with fp32 accumulation (``tl.dot``: wgmma on sm_90, mma.sync on sm_80 for
half inputs; IEEE fp32 for fp32 inputs). The tile is then seen as [GB, S_CH, BN] and stays in registers for all
n_iter iterations: the sentence update reduces it over its patch axis, the patch update over its sentence axis
within each report. Entries that are not live hold DEAD = -1e30 (finite, so no reduction meets inf - inf, and
exp2 of it is exactly 0): padding needs no branch in the loop.

Only the [B, G] scores and the potentials f [B, G, K] and g [B, G, S] (fp32; -inf where not live) leave the
kernel, which is what the backward (``backward.py``) needs; the B*G*K*S grid never exists in memory. Because
the whole K x S block of a pair must be resident, the launcher refuses pairs above ``MAX_PAIR_CELLS`` cells
(``impl="auto"`` then falls back to the chunked impl).

Optional tolerance (HAS_TOL): a report's pair freezes (keeps f, g) from the first iteration whose sentence
update finds the current plan's sentence marginal within ``tol`` in L1, sum_q b_q |exp2(g2_q - g2_q^new) - 1|:
the same numbers as stopping there, with no branch per report.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Globals a kernel reads must be constexpr. DEAD: the log-domain stand-in for -inf, as in the reference
# (mlip_fast.reference.patch_sentence_ot.DEAD).
DEAD = tl.constexpr(-1e30)
LN2 = tl.constexpr(0.6931471805599453)


# Shape ints are not specialised on (== 1, divisible by 16): one compile serves every B, G, K, S; D and the
# strides keep their alignment specialisation, which lets the loads vectorise.
@triton.jit(do_not_specialize=["B", "G", "K", "S", "n_rb", "n_iter"])
def _patch_sentence_ot_fwd_kernel(
    p_ptr,  # [B, K, D], last dim contiguous
    s_ptr,  # [G, S, D], last dim contiguous
    pmask_ptr,  # [B, K] uint8 (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8 (read when HAS_SMASK)
    np_ptr,  # [B] int32: valid patches per image
    ns_ptr,  # [G] int32: valid sentences per report
    score_ptr,  # [B, G] fp32 out
    f_ptr,  # [B, G, K] fp32 out: patch potentials, natural log, -inf where not live
    g_ptr,  # [B, G, S] fp32 out: sentence potentials, natural log, -inf where not live
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
    n_iter,
    z_scale,  # log2(e) / eps
    tol,  # read when HAS_TOL
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    HAS_TOL: tl.constexpr,
    GB: tl.constexpr,  # reports per program
    S_CH: tl.constexpr,  # sentence slots per report (S padded to a power of two)
    BN: tl.constexpr,  # patch columns (K padded to a power of two, at least 16)
    BD: tl.constexpr,  # D chunk of the dot
    UPCAST: tl.constexpr,
):
    BM: tl.constexpr = GB * S_CH
    pid = tl.program_id(0)
    rb = pid % n_rb
    b = pid // n_rb
    b64 = b.to(tl.int64)
    g0 = rb * GB

    # Rows as a flat [BM] index for the loads of the dot, and as [GB, S_CH] for the iterations.
    offs_m = tl.arange(0, BM)
    g_m = g0 + offs_m // S_CH
    q_m = offs_m % S_CH
    row_in = (g_m < G) & (q_m < S)
    g_j = g0 + tl.arange(0, GB)
    g_j_in = g_j < G
    offs_n = tl.arange(0, BN)
    col_in = offs_n < K

    # Similarity tile, transposed: sentence rows x patch columns, fp32 accumulation over D.
    s_rows = s_ptr + g_m.to(tl.int64) * stride_sg + q_m * stride_ss
    p_cols = p_ptr + b64 * stride_pb + offs_n * stride_pk
    offs_d = tl.arange(0, BD)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for d0 in range(0, D, BD):
        dd = d0 + offs_d
        d_in = dd < D
        a = tl.load(s_rows[:, None] + dd[None, :], mask=row_in[:, None] & d_in[None, :], other=0.0)
        bt = tl.load(p_cols[None, :] + dd[:, None], mask=d_in[:, None] & col_in[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, bt, acc, input_precision="ieee")

    # Live entries: valid on both sides of a pair whose both sides are non-empty. (The masks are read after the
    # dot, so that their predicates are not held through its loop.)
    q_2 = tl.arange(0, S_CH)[None, :]
    g_2 = g_j[:, None]
    row_in2 = (g_2 < G) & (q_2 < S)
    row_ok2 = row_in2
    if HAS_SMASK:
        row_ok2 = row_ok2 & (tl.load(smask_ptr + g_2 * S + q_2, mask=row_in2, other=0) != 0)
    col_ok = col_in
    if HAS_PMASK:
        col_ok = col_ok & (tl.load(pmask_ptr + b64 * K + offs_n, mask=col_in, other=0) != 0)
    n_p = tl.load(np_ptr + b)
    n_s = tl.load(ns_ptr + g_j, mask=g_j_in, other=0)  # [GB]
    row_live = row_ok2 & (n_p > 0)  # [GB, S_CH]
    col_live = col_ok[None, :] & (n_s[:, None] > 0)  # [GB, BN]
    live = row_live[:, :, None] & col_live[:, None, :]
    z = tl.where(live, tl.reshape(acc, [GB, S_CH, BN]) * z_scale, DEAD)
    log_a = tl.where(col_live, -tl.log2(tl.maximum(n_p, 1).to(tl.float32)), DEAD)  # [GB, BN]
    log_b = tl.where(row_live, -tl.log2(tl.maximum(n_s, 1).to(tl.float32))[:, None], DEAD)  # [GB, S_CH]

    f = tl.where(col_live, 0.0, DEAD)
    g = log_b
    active = tl.full([GB], 1, tl.int32)
    for it in range(n_iter):
        # sentence update: reduce over the patches of the image
        t = f[:, None, :] + z
        mx = tl.max(t, axis=2)
        g_new = tl.where(row_live, log_b - (mx + tl.log2(tl.sum(tl.exp2(t - mx[:, :, None]), axis=2))), DEAD)
        if HAS_TOL:
            err = tl.sum(tl.exp2(log_b) * tl.abs(tl.exp2(g - g_new) - 1.0), axis=1)  # [GB]
            active = tl.where((err > tol) | (it == 0), active, 0)
            g_new = tl.where(active[:, None] != 0, g_new, g)
        g = g_new
        # patch update: reduce over the sentences of each report
        t = g[:, :, None] + z
        mx = tl.max(t, axis=1)
        f_new = tl.where(col_live, log_a - (mx + tl.log2(tl.sum(tl.exp2(t - mx[:, None, :]), axis=1))), DEAD)
        if HAS_TOL:
            f_new = tl.where(active[:, None] != 0, f_new, f)
        f = f_new

    # score = sum_pq P sim = sum_pq P z / z_scale (P is exactly 0 where z is DEAD)
    plan = tl.exp2(f[:, None, :] + g[:, :, None] + z)
    score = tl.sum(tl.sum(plan * z, axis=2), axis=1) / z_scale
    tl.store(score_ptr + b64 * G + g_j, score, mask=g_j_in)
    pair = (b64 * G + g_j[:, None].to(tl.int64))  # [GB, 1]
    tl.store(f_ptr + pair * K + offs_n[None, :], tl.where(col_live, f * LN2, float("-inf")),
             mask=g_j_in[:, None] & col_in[None, :])
    tl.store(g_ptr + pair * S + q_2, tl.where(row_live, g * LN2, float("-inf")), mask=row_in2)
