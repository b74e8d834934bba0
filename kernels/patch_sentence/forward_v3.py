"""Fused patch-sentence scores, forward v3: the persistent sm_90 kernel for half inputs (bf16 / fp16).

Same scores, indices and conventions as ``forward.py`` (read its derivation first):

    i2t[b, g] = 1/|m_b| * sum_{p valid} max_{q valid} sim[p, q],   a[b, g, p] = its argmax (lowest q on ties)
    t2i[b, g] = 1/|n_g| * sum_{q valid} max_{p valid} sim[p, q],   c[b, g, q] = its argmax (lowest p on ties)

with sim = <P_b[p], S_g[q]> (times both inverse norms when ``NORMALIZE``), -1 indices where no gradient flows and
0 scores for a pair with an empty side; the backward (``backward.py``) reads the indices as before. What changes
is where the bytes and the instructions go.

Schedule. One program per (report block, image range), about one per SM: it loads the sentence block of its GB
reports ([GB x S_CH, D], S padded to S_CH = 16 slots by the tensor descriptor's zero fill) ONCE, keeps it in
registers as the wgmma A operand (D / 4 registers per thread: 128 at D = 512), and walks its images' patch tiles
[BN, D] in order. Patch tiles arrive through tensor descriptors (``tl.make_tensor_descriptor`` over [B, K, D]:
rows past K are zero filled, never read from the next image) into a ring of STAGES shared-memory buffers, so the
next tiles stream in while the current one is multiplied and reduced. Streamed bytes per tile: BN * D * 2 (64 KiB
at BN = 64, D = 512) against (GB * S_CH + BN) * D * 2 for ``forward.py``, whose tiles re-read their sentence rows
from L2. Programs are numbered report block fastest, so the programs running together read the same images (a
patch tile comes from HBM once and from L2 for the other report blocks). The valid counts, the inverse norms and
the patches' key limits come from one preparation launch (``side.py``).

Epilogue: one reduction per direction. Each entry y of the fp32 tile becomes one int32 key: the value's bits made
monotone (negative values get their magnitude bits flipped, so integer order is float order and the canonical
NaN lies above +inf), the low L = log2(S_CH) + log2(BN) bits replaced by the complemented slot and column:

    key = (mono(y) & ~(2^L - 1)) | (S_CH - 1 - slot) * BN + (BN - 1 - column)

An integer max over the rows of a report gives the i2t maximum AND its slot (equal value bits: the larger
complement, the lowest slot, wins); over the columns of a row the t2i maximum and its column; the carry over an
image's patch tiles compares value bits only (strict ``>``: the earlier tile keeps a tie). A masked entry is capped
at the smallest key by an integer min with its row's and column's limit (no select per entry), so it never wins,
and a pair whose maximum is that key has no valid entry (index -1, no score). NaN propagates as in the grid;
+-inf keep their exact value (the value bits of a key decode with the index bits cleared toward -inf).

Error bound (half inputs only): a reported maximum has its L low mantissa bits cleared, toward -inf: relative
error below 2^(L - 23) = 2^-13 (1.2e-4) at BN = 64 (2^-14 at the 32-patch tiles of one-direction calls), beneath
the bf16 / fp16 rounding of the inputs (2^-9 / 2^-12 per element); a mean of such maxima carries the same bound.
Entries that close to the maximum count as ties and go to the lowest index; exact ties always do.

Numerics: fp32 accumulation on the tensor cores (the interpreter widens the operands to fp32: its half dot is
wrong); the tile is scaled by both fp32 inverse norms after the dot when ``NORMALIZE``. On a GPU every NaN of the
tile has come out of an fp32 multiply or add (the normalisation, or ``+ 0.0`` on raw tiles), which returns the
canonical positive NaN; the interpreter's numpy arithmetic may return a negative NaN, so there the tile is
canonicalised explicitly (``CANON_NAN``).

Registers. The resident block (128), the accumulator (32 at BN = 64) and the epilogue leave ptxas no room for the
loop-invariant row vectors the compiler would hoist out of the tile loop, so the loop is compiled with
``disable_licm`` (they are recomputed per tile from the program id: cheaper than the spills).

Why no warp specialisation (the FA3-style ping-pong of two consumer warpgroups over tiles, which would hide the
reduction under the next tile's MMA): triton's automatic warp specialisation on sm_90 (``tl.range(...,
warp_specialize=True)``, num_warps 4) splits ONE tile's rows between two consumer warpgroups behind a producer,
so both multiply and then reduce in the same phase; on this kernel (triton 3.9) it also spills (about 1 KB) and
needs more shared memory than an SM has, and triton 3.6, the GPU machines' version, cannot partition the
per-report reshape of the i2t reduction at all. Issuing the next tile's dot before this tile's reduction by hand
gets a ``wait(0)`` after the dot from triton's wgmma pipeliner. Two resident programs per SM would overlap by
themselves, but two resident sentence blocks do not fit the registers and two 64-row blocks double the L2 bytes.
So the tensor cores idle during the reduction, and the reduction is kept short instead.
"""
import triton
import triton.language as tl

KEY_MIN = tl.constexpr(-2147483648)  # int32 minimum: the key of a masked entry
KEY_MAX = tl.constexpr(2147483647)


@triton.jit
def _monotone_key(y, idx, LOW: tl.constexpr):
    """The packed key of fp32 ``y``: value bits made monotone, the low LOW bits replaced by ``idx`` (the slot bits;
    the caller adds the column code into the zero bits below them)."""
    bits = y.to(tl.int32, bitcast=True)
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (mono & ~LOW) | idx


@triton.jit
def _key_value(key, LOW: tl.constexpr):
    """The fp32 value a key stands for (its low bits cleared in key order: rounded toward -inf)."""
    bits = tl.where(key < 0, (key | LOW) ^ 0x7FFFFFFF, key & ~LOW)
    return bits.to(tl.float32, bitcast=True)


# B, G, K, S and the image ranges are not specialised on (one compile serves every size); D is a constexpr (the
# descriptors' chunks and the resident block's registers depend on it).
@triton.jit(do_not_specialize=["B", "G", "K", "S", "n_rb", "imgs_per_prog"])
def _patch_sentence_fwd_v3_kernel(
    p_ptr,  # [B, K, D] half, contiguous, 16-byte aligned (TMA)
    s_ptr,  # [G, S, D] half, contiguous, 16-byte aligned
    lim_p_ptr,  # [B, K] int32 key limits of the patches, 2^31 - 1 valid / -2^31 masked (read when HAS_PMASK)
    smask_ptr,  # [G, S] uint8 (read when HAS_SMASK)
    n_p_ptr,  # [B] int32 valid patches per image
    n_s_ptr,  # [G] int32 valid sentences per report
    inv_p_ptr,  # [B, K] fp32 (read when NORMALIZE)
    inv_s_ptr,  # [G, S] fp32 (read when NORMALIZE)
    i2t_ptr,  # [B, G] fp32 out
    t2i_ptr,  # [B, G] fp32 out
    arg_i2t_ptr,  # [B, G, K] int16 out
    arg_t2i_ptr,  # [B, G, S] int16 out
    B,
    G,
    K,
    S,
    n_rb,  # report blocks
    imgs_per_prog,
    D: tl.constexpr,
    HAS_PMASK: tl.constexpr,
    HAS_SMASK: tl.constexpr,
    DO_I2T: tl.constexpr,
    DO_T2I: tl.constexpr,
    NORMALIZE: tl.constexpr,
    CANON_NAN: tl.constexpr,  # canonicalise NaN in the tile (the interpreter)
    UPCAST: tl.constexpr,  # widen the operands to fp32 before the dot (the interpreter)
    GB: tl.constexpr,  # reports per block
    S_CH: tl.constexpr,  # sentence slots per report (S padded; 16)
    BN: tl.constexpr,  # patches per tile
    DC: tl.constexpr,  # D per descriptor box (a TMA box is at most 256 wide)
    NUM_DC: tl.constexpr,  # boxes over D (1 or 2)
    STAGES: tl.constexpr,  # patch tiles in flight
):
    BM: tl.constexpr = GB * S_CH
    COLB: tl.constexpr = BN.bit_length() - 1
    LOW: tl.constexpr = (S_CH << COLB) - 1  # the index bits of a key
    COLS: tl.constexpr = BN - 1
    pid = tl.program_id(0)
    rb = pid % n_rb
    g0 = rb * GB
    b_lo = (pid // n_rb) * imgs_per_prog
    n_img = tl.minimum(imgs_per_prog, B - b_lo)
    n_ct = tl.cdiv(K, BN)

    s_desc = tl.make_tensor_descriptor(s_ptr, shape=[G, S, D], strides=[S * D, D, 1], block_shape=[GB, S_CH, DC])
    p_desc = tl.make_tensor_descriptor(p_ptr, shape=[B, K, D], strides=[K * D, D, 1], block_shape=[1, BN, DC])

    # The resident sentence block (rows: slot q of report g0 + j), and what the rows need for the whole walk.
    a0 = tl.reshape(s_desc.load([g0, 0, 0]), [BM, DC])
    if UPCAST:
        a0 = a0.to(tl.float32)
    if NUM_DC == 2:
        a1 = tl.reshape(s_desc.load([g0, 0, DC]), [BM, DC])
        if UPCAST:
            a1 = a1.to(tl.float32)
    offs_m = tl.arange(0, BM)
    q_m = offs_m % S_CH
    g_m = g0 + offs_m // S_CH
    row_in = (g_m < G) & (q_m < S)
    row_ok = row_in
    if HAS_SMASK:
        row_ok = row_ok & (tl.load(smask_ptr + g_m * S + q_m, mask=row_in, other=0) != 0)
    if NORMALIZE:
        inv_row = tl.load(inv_s_ptr + g_m * S + q_m, mask=row_in, other=0.0)
    # a masked row's keys are capped at KEY_MIN (an integer min instead of a select per entry)
    lim_row = tl.where(row_ok, KEY_MAX, KEY_MIN)
    g_j = g0 + tl.arange(0, GB)
    g_j_in = g_j < G
    n_valid_s = tl.load(n_s_ptr + g_j, mask=g_j_in, other=0)  # [GB]
    report_ok = n_valid_s > 0
    slot_code = (S_CH - 1 - q_m) << COLB  # [BM]
    offs_n = tl.arange(0, BN)
    col_code = COLS - offs_n  # [BN]
    i2t_offs = g_j[:, None] * K + offs_n[None, :]  # [GB, BN] within one image's [G, K] block of arg_i2t

    # Carried over the patch tiles of one image.
    run_key = tl.full([BM], KEY_MIN, tl.int32)
    run_arg = tl.zeros([BM], dtype=tl.int32)
    i2t_sum = tl.zeros([GB], dtype=tl.float32)
    for t in tl.range(0, n_img * n_ct, num_stages=STAGES, disable_licm=True):
        b = b_lo + t // n_ct
        ct = t % n_ct
        k0 = ct * BN
        img = b.to(tl.int64) * K  # first row of the image in [B, K] arrays
        pt = tl.reshape(p_desc.load([b, k0, 0]), [BN, DC])
        if UPCAST:
            pt = pt.to(tl.float32)
        acc = tl.dot(a0, tl.trans(pt))
        if NUM_DC == 2:
            pt1 = tl.reshape(p_desc.load([b, k0, DC]), [BN, DC])
            if UPCAST:
                pt1 = pt1.to(tl.float32)
            acc = tl.dot(a1, tl.trans(pt1), acc)

        col_in = offs_n < K - k0
        if HAS_PMASK:
            lim_col = tl.load(lim_p_ptr + img + k0 + offs_n, mask=col_in, other=KEY_MIN)
        else:
            lim_col = tl.where(col_in, KEY_MAX, KEY_MIN)
        if NORMALIZE:
            inv_col = tl.load(inv_p_ptr + img + k0 + offs_n, mask=col_in, other=0.0)
            acc = acc * inv_row[:, None] * inv_col[None, :]
        else:
            acc = acc + 0.0  # an fp32 add: a NaN of the tile becomes the canonical (positive) NaN
        if CANON_NAN:
            acc = tl.where(acc != acc, float("nan"), acc)
        key = _monotone_key(acc, slot_code[:, None], LOW) + col_code[None, :]
        key = tl.minimum(tl.minimum(key, lim_row[:, None]), lim_col[None, :])

        if DO_I2T:
            # per patch, over the sentence rows of each report: the maximum and its slot in one reduction; a pair
            # with a valid patch and a report with a valid sentence has a key above KEY_MIN, any other pair not
            ki = tl.max(tl.reshape(key, [GB, S_CH, BN]), axis=1)  # [GB, BN]
            pair_ok = ki > KEY_MIN
            i2t_sum += tl.sum(tl.where(pair_ok, _key_value(ki, LOW), 0.0), axis=1)
            slot = ((ki >> COLB) ^ (S_CH - 1)) & (S_CH - 1)  # the key holds S_CH - 1 - slot
            tl.store(arg_i2t_ptr + (img * G + k0) + i2t_offs, tl.where(pair_ok, slot, -1).to(tl.int16),
                     mask=g_j_in[:, None] & (offs_n < K - k0)[None, :])
        if DO_T2I:
            # per sentence row, over this tile's patches; the carry keeps the earlier tile on equal values
            kt = tl.max(key, axis=1)  # [BM]
            better = (kt & ~COLS) > (run_key & ~COLS)
            run_key = tl.where(better, kt, run_key)
            run_arg = tl.where(better, k0 + COLS - (kt & COLS), run_arg)

        if ct == n_ct - 1:  # the image is done: its scores, the t2i indices, and a fresh carry
            n_valid_p = tl.load(n_p_ptr + b)
            if DO_I2T:
                i2t = tl.where(report_ok & (n_valid_p > 0), i2t_sum / tl.maximum(n_valid_p, 1).to(tl.float32), 0.0)
                tl.store(i2t_ptr + b.to(tl.int64) * G + g_j, i2t, mask=g_j_in)
            if DO_T2I:
                # a valid sentence of an image with a valid patch: a row that kept a key above KEY_MIN
                row_final = run_key > KEY_MIN
                t2i_sum = tl.sum(tl.reshape(tl.where(row_final, _key_value(run_key, LOW), 0.0), [GB, S_CH]), axis=1)
                t2i = tl.where(report_ok, t2i_sum / tl.maximum(n_valid_s, 1).to(tl.float32), 0.0)
                tl.store(t2i_ptr + b.to(tl.int64) * G + g_j, t2i, mask=g_j_in)
                tl.store(arg_t2i_ptr + (b.to(tl.int64) * G + g_m) * S + q_m, tl.where(row_final, run_arg, -1).to(tl.int16),
                         mask=row_in)
            run_key = tl.full([BM], KEY_MIN, tl.int32)
            run_arg = tl.zeros([BM], dtype=tl.int32)
            i2t_sum = tl.zeros([GB], dtype=tl.float32)
