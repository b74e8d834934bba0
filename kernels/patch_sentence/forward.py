"""Fused patch-sentence scores, forward kernel (token-wise max, both directions from one tile).

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

The backward (``backward.py``) needs only the argmax indices this kernel writes (and, for ``normalize``, the inverse
norms the launcher computed): a max passes its gradient to its argmax alone.

Numerics: fp32 inputs use IEEE fp32 dot products (TF32 when asked). bf16/fp16 inputs feed the tensor cores
directly with fp32 accumulation; under the Triton interpreter (CPU) they are widened to fp32 first because the
interpreter's half-precision dot is wrong. This kernel is the path on every GPU other than sm_90 (and for fp32 and
reports longer than one tile there); ``forward_v3.py`` is the persistent sm_90 kernel for half inputs.
"""
import triton
import triton.language as tl


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
