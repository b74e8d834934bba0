"""Side kernels of the fused patch-sentence op: what used to be a handful of small PyTorch launches around the
forward and backward kernels, each now one launch.

Forward preparation: one program per image and per report computes its valid count from the mask (|m_b|,
|n_g|), with ``normalize`` its rows' inverse norms inv[r] = 1 / max(||x_r||, eps) summed in fp32 (what
``torch.linalg.vector_norm(..., dtype=torch.float32)`` computes), and for the v3 forward the patches' key limits
(2^31 - 1 valid, -2^31 masked: an integer min applies the mask to a packed key). One launch in place of two count
launches and three PyTorch launches per input for the norms (norm, clamp, reciprocal).

Gradient epilogue (backward): the backward kernel leaves fp32 partial gradients G_s [SPLIT, N, D] (SPLIT programs
per output tile). With g = sum_s G_s (in the fixed order s = 0, 1, ...: bitwise reproducible) and, when the forward
normalised, x_hat = x * inv the unit row it scored:

    dL/dx = inv * (g - x_hat * <x_hat, g>)        (the Jacobian of x / ||x|| applied to g; inv = 1 / ||x||)

and dL/dx = g without normalisation; then the cast to the input dtype. Where ||x|| < eps (the clamp of the
forward is active) the normalisation is x * (1 / eps), linear, and the gradient is g * inv. One program owns
whole rows (the dot product spans D), so the split sum, the map and the cast are one read of the partials and
one write, in place of the split sum, about nine PyTorch launches of the map and the cast.
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["B", "G", "K", "S", "D"])
def _patch_sentence_prep_kernel(
    p_ptr,  # [B, K, D] contiguous
    s_ptr,  # [G, S, D] contiguous
    pmask_ptr,  # [B, K] uint8 (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8 (read when HAS_SMASK)
    inv_p_ptr,  # [B, K] fp32 out (NORMALIZE)
    inv_s_ptr,  # [G, S] fp32 out (NORMALIZE)
    n_p_ptr,  # [B] int32 out: valid patches per image
    n_s_ptr,  # [G] int32 out: valid sentences per report
    lim_p_ptr,  # [B, K] int32 out (LIMITS): 2^31 - 1 for a valid patch, -2^31 for a masked one
    B,
    G,
    K,
    S,
    D,
    eps,
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    NORMALIZE: tl.constexpr,
    LIMITS: tl.constexpr,
    ROWS: tl.constexpr,
    BD: tl.constexpr,
):
    """Program i < B: image i (its K patch rows); program B + j: report j. The row count (from the mask), the
    inverse norms and, for the v3 forward, the masked patches' key limits."""
    pid = tl.program_id(0)
    is_p = pid < B
    e = tl.where(is_p, pid, pid - B).to(tl.int64)
    n = tl.where(is_p, K, S)
    rows_base = tl.where(is_p, p_ptr, s_ptr) + e * n * D
    mask_base = tl.where(is_p, pmask_ptr, smask_ptr) + e * n
    count = tl.zeros([ROWS], dtype=tl.int32)
    for r0 in range(0, n, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_in = rows < n
        ok = row_in
        # an absent mask reads as all valid
        if HAS_PMASK and HAS_SMASK:
            ok = ok & (tl.load(mask_base + rows, mask=row_in, other=0) != 0)
        elif HAS_PMASK:
            ok = ok & (tl.load(mask_base + rows, mask=row_in & (rows * 0 + pid < B), other=1) != 0)
        elif HAS_SMASK:
            ok = ok & (tl.load(mask_base + rows, mask=row_in & (rows * 0 + pid >= B), other=1) != 0)
        count += ok.to(tl.int32)
        if LIMITS:
            tl.store(lim_p_ptr + e * K + rows, tl.where(ok, 2147483647, -2147483648), mask=row_in & (rows * 0 + pid < B))
        if NORMALIZE:
            acc = tl.zeros([ROWS], dtype=tl.float32)
            for d0 in range(0, D, BD):
                dd = d0 + tl.arange(0, BD)
                x = tl.load(rows_base + rows.to(tl.int64)[:, None] * D + dd[None, :],
                            mask=row_in[:, None] & (dd < D)[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(x * x, axis=1)
            inv = 1.0 / tl.maximum(tl.sqrt_rn(acc), eps)
            tl.store(tl.where(is_p, inv_p_ptr, inv_s_ptr) + e * n + rows, inv, mask=row_in)
    tl.store(tl.where(is_p, n_p_ptr, n_s_ptr) + e, tl.sum(count, axis=0))


@triton.jit(do_not_specialize=["N", "split_stride"])
def _patch_sentence_grad_epilogue_kernel(
    out_ptr,  # [N, D] in the input dtype
    part_ptr,  # [SPLIT, N, D] fp32 partial gradients w.r.t. the (normalised) rows
    x_ptr,  # [N, D] the raw rows (read when NORMALIZE)
    inv_ptr,  # [N] fp32 inverse norms (read when NORMALIZE)
    N,
    D,
    split_stride,  # N * D
    eps,  # the forward's floor on the norm
    SPLIT: tl.constexpr,
    NORMALIZE: tl.constexpr,
    ROWS: tl.constexpr,
    BD: tl.constexpr,  # at least D: one program holds whole rows
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    dd = tl.arange(0, BD)
    ok = (rows < N)[:, None] & (dd < D)[None, :]
    offs = rows.to(tl.int64)[:, None] * D + dd[None, :]
    g = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLIT):
        g += tl.load(part_ptr + s * split_stride + offs, mask=ok, other=0.0)
    if NORMALIZE:
        inv = tl.load(inv_ptr + rows, mask=rows < N, other=0.0)
        x_hat = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32) * inv[:, None]
        proj = tl.where(inv < 1.0 / eps, tl.sum(x_hat * g, axis=1), 0.0)  # 0 where the floor was active
        g = (g - x_hat * proj[:, None]) * inv[:, None]
    tl.store(out_ptr + offs, g.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["B", "G", "K", "S", "sib", "sig", "stb", "stg"])
def _patch_sentence_weights_kernel(
    gi_ptr,  # [B, G] upstream gradient of i2t, strides (sib, sig) (read when HAS_I2T)
    gt_ptr,  # [B, G] upstream gradient of t2i, strides (stb, stg) (read when HAS_T2I)
    pmask_ptr,  # [B, K] uint8 (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8 (read when HAS_SMASK)
    wi_ptr,  # [B, G] fp32 out: dI / max(|m_b|, 1)
    wt_ptr,  # [B, G] fp32 out: dT / max(|n_g|, 1)
    B,
    G,
    K,
    S,
    sib,
    sig,
    stb,
    stg,
    HAS_I2T: tl.constexpr,
    HAS_T2I: tl.constexpr,
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    BB: tl.constexpr,
    BG: tl.constexpr,
    TC: tl.constexpr,  # mask entries per chunk of the count
):
    """The backward's weights wI = dI / |m_b|, wT = dT / |n_g| for a [BB, BG] block of pairs, the valid counts
    summed from the masks on the way (what took the count, widening, clamp and division launches)."""
    bs = tl.program_id(0) * BB + tl.arange(0, BB)
    gs = tl.program_id(1) * BG + tl.arange(0, BG)
    b_in, g_in = bs < B, gs < G
    ok = b_in[:, None] & g_in[None, :]
    out = bs.to(tl.int64)[:, None] * G + gs[None, :]
    tc = tl.arange(0, TC)
    if HAS_I2T:
        n_p = tl.zeros([BB], dtype=tl.int32) + K
        if HAS_PMASK:
            n_p = tl.zeros([BB], dtype=tl.int32)
            for k0 in range(0, K, TC):
                kk = k0 + tc
                m = tl.load(pmask_ptr + bs.to(tl.int64)[:, None] * K + kk[None, :],
                            mask=b_in[:, None] & (kk < K)[None, :], other=0)
                n_p += tl.sum((m != 0).to(tl.int32), axis=1)
        gi = tl.load(gi_ptr + bs.to(tl.int64)[:, None] * sib + gs[None, :] * sig, mask=ok, other=0.0).to(tl.float32)
        tl.store(wi_ptr + out, gi / tl.maximum(n_p, 1).to(tl.float32)[:, None], mask=ok)
    if HAS_T2I:
        n_s = tl.zeros([BG], dtype=tl.int32) + S
        if HAS_SMASK:
            n_s = tl.zeros([BG], dtype=tl.int32)
            for s0 in range(0, S, TC):
                ss = s0 + tc
                m = tl.load(smask_ptr + gs.to(tl.int64)[:, None] * S + ss[None, :],
                            mask=g_in[:, None] & (ss < S)[None, :], other=0)
                n_s += tl.sum((m != 0).to(tl.int32), axis=1)
        gt = tl.load(gt_ptr + bs.to(tl.int64)[:, None] * stb + gs[None, :] * stg, mask=ok, other=0.0).to(tl.float32)
        tl.store(wt_ptr + out, gt / tl.maximum(n_s, 1).to(tl.float32)[None, :], mask=ok)
