"""The scatter backward of integrity-scored masking (forward in ``forward.py``).

Backward derivation. ``index`` is piecewise constant in ``scores`` (no gradient; ``integrity`` carries none by
contract), so the only differentiable path is the gather:
    dL/dtokens[b, p, c] = sum_k [index[b, k] == p] * dL/dkept[b, k, c].
Positions within a row are unique, so at most one k matches and the sum is a copy:
    dL/dtokens[b, p, c] = dL/dkept[b, slot[b, p], c]  if slot[b, p] >= 0,  else 0.
The backward kernel therefore writes every element of grad_tokens exactly once (no zero-fill pass, no
atomics) and reads only the kept rows of grad_kept; the result is bitwise equal to a scatter into zeros.
"""
from __future__ import annotations

import triton
import triton.language as tl


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
