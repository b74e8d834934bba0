"""Integrity-scored masking in Triton, forward: in-kernel Gumbel noise -> exact per-row top-k -> gather (the
scatter backward is in ``backward.py``).

Forward, per image b (see ``mlip_fast.reference.integrity_mask`` for the specification):
    key[b, p]   = scores[b, p] / temperature + g[b, p],   g = -log(-log(u)),  u = Philox(seed, b * P + p)
    index[b]    = the K = ``keep`` largest keys' positions, ascending
    kept[b, k]  = tokens[b, index[b, k]]
    integrity_b = sum_k softmax_p(scores[b])[index[b, k]]
    slot[b, p]  = k where index[b, k] == p, else -1        (saved for the backward)

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

The backward (``backward.py``) needs only the ``slot`` map written here.
"""
from __future__ import annotations

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
