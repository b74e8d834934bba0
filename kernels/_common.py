"""What every kernel package's launchers share: the interpreter flag, power-of-two sizes, the dtype rules of
``tl.dot`` under the interpreter, and the masks and counts the patch-sentence kernels read.

Only Python launch code lives here; each kernel's ``@triton.jit`` source stays in its own package (a shared jit
helper would change every kernel's compile, and the static records are keyed by kernel source).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton

__all__ = ["INTERPRET", "pow2", "half", "upcast", "mask_bytes", "valid_counts"]

# Read once, like @triton.jit does: it decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pow2(n: int, lo: int = 1) -> int:
    """The next power of two >= ``n`` (and >= ``lo``)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def half(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel widens its ``tl.dot`` operands to fp32: fp32 needs no widening; half inputs are widened
    only under the interpreter, whose half-precision dot is wrong."""
    return dtype == torch.float32 or INTERPRET


def mask_bytes(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A validity mask as the contiguous uint8 the kernels index (any input strides, bool or uint8 0/1)."""
    if mask is None:
        return None
    mask = mask.contiguous()
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def valid_counts(
    sentence_mask: Optional[torch.Tensor], patch_mask: Optional[torch.Tensor], B: int, K: int, G: int, S: int, device
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Valid patches per image [B] and valid sentences per report [G], int32."""
    i32 = dict(dtype=torch.int32, device=device)
    n_p = patch_mask.sum(1, dtype=torch.int32) if patch_mask is not None else torch.full((B,), K, **i32)
    n_s = sentence_mask.sum(1, dtype=torch.int32) if sentence_mask is not None else torch.full((G,), S, **i32)
    return n_p, n_s
