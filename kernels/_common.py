"""What every kernel package's launchers share: the interpreter flag, power-of-two sizes, the dtype rules of
``tl.dot`` under the interpreter, and the masks and counts the patch-sentence kernels read.

Only Python launch code lives here; each kernel's ``@triton.jit`` source stays in its own package (a shared jit
helper would change every kernel's compile, and the static records are keyed by kernel source).
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

__all__ = ["INTERPRET", "cdiv", "next_pow2", "pow2", "half", "upcast", "mask_bytes", "valid_counts"]

# Read once, like @triton.jit does: it decides at decoration time whether kernels run in the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Host-side integer helpers in plain Python. Since triton 3.5, ``triton.cdiv`` and ``triton.next_power_of_2`` are
# constexpr functions usable inside kernels, and a call from host code unwraps its arguments first: about 4 us a
# call on this project's CPU machines, where a plain division takes 0.01 us, and the split searches of the
# patch-sentence launchers made hundreds of such calls per forward + backward on a GPU (benchmarks/
# bench_launch_plan.py). Kernels keep using ``tl.cdiv``.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive ints (``triton.cdiv`` without its call cost)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` for n >= 1, 0 for 0, as ``triton.next_power_of_2`` (without its call cost)."""
    return 1 << (int(n) - 1).bit_length() if n > 0 else 0


def pow2(n: int, lo: int = 1) -> int:
    """The next power of two >= ``n`` (and >= ``lo``)."""
    return max(lo, next_pow2(max(int(n), 1)))


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
