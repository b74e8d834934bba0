"""Variable-length self-attention with dropout as a small C kernel (``attention_cpu.c``: math, layout, dropout mask
and numerics in its header), built on first use (``kernels/_native.py``) and called through ctypes.

Why: the report tower's attention with dropout on CPU ran as a dozen PyTorch operators per group of 16 rows of
similar length (gather into a padded block, permute, two batched matmuls, softmax, a Mersenne-Twister mask, scatter
back) and as many again in the backward: about 40 ms of its 103 ms forward + backward at the default run's batch,
for attention products of 4 x 57 x 57 x 32 multiply-adds per row and head. The kernel reads the packed tokens in
place, keeps one (row, head) item's q, k, v (a few KiB) in L1, draws the dropout mask from a counter-based hash
(so the backward recomputes it instead of storing it) and recomputes the probabilities from the saved log-sum-exp.

Work items (row, head) are split over ``torch.get_num_threads()`` threads in parts of about equal L^2 cost: on
torch's own OpenMP threads when the library could be built with -fopenmp against torch's runtime
(``kernels/_native.py``), else on a Python pool (the calling thread takes part 0; ctypes releases the GIL). Items
are independent, so the split never changes a number.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import List, Optional

import torch

from mlip_fast.kernels import _native

__all__ = ["SOURCE", "library", "status", "runs", "forward", "backward", "dropout"]

SOURCE = Path(__file__).with_name("attention_cpu.c")
_state: dict = {}  # "lib": CDLL or None once decided, "why": the reason when None


def _build() -> Path:
    return _native.build(SOURCE, _native.FLAGS, _native.NATIVE_FLAGS, openmp=True)


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, f32, u64 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_uint64
    lib.mlip_attention_fwd.restype = i64
    lib.mlip_attention_fwd.argtypes = [i64] * 5 + [ptr] * 4 + [f32, u64, i64]
    lib.mlip_attention_bwd.restype = i64
    lib.mlip_attention_bwd.argtypes = [i64] * 5 + [ptr] * 5 + [f32, u64, i64]
    lib.mlip_dropout.restype = None
    lib.mlip_dropout.argtypes = [i64, i64, ptr, ptr, u64, i64]
    for name, fn in (("fwd", lib.mlip_attention_fwd), ("bwd", lib.mlip_attention_bwd)):
        parts = getattr(lib, f"mlip_attention_{name}_parts")
        parts.restype, parts.argtypes = i64, [i64, ptr] + fn.argtypes[2:]
    lib.mlip_dropout_parts.restype = None
    lib.mlip_dropout_parts.argtypes = [i64, ptr, ptr, ptr, u64, i64]


def library() -> Optional[ctypes.CDLL]:
    """The built kernel library, or None when it is off or cannot be built (the reason: :func:`status`)."""
    return _native.load(_state, _build, _declare, "the CPU attention kernel could not be built ({why}); the report "
                        "tower's attention runs its PyTorch path instead")


def status() -> str:
    """What computes the report tower's attention with dropout on CPU, for run records."""
    if not _native.enabled():
        return "pytorch (MLIP_FAST_CPU_KERNELS=0)"
    return "c" if library() is not None else f"pytorch (C kernel unavailable: {_state.get('why')})"


def runs(x: torch.Tensor) -> bool:
    """Whether the kernel computes attention on ``x``'s device and dtype (fp32 on CPU, kernel built)."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and library() is not None


def _parts(offsets: torch.Tensor, heads: int, threads: int) -> List[int]:
    """Item boundaries [0, ..., B H] cutting the items into ``threads`` parts of about equal sum of L^2."""
    lengths = (offsets[1:] - offsets[:-1]).double()
    cost = (lengths * lengths + lengths).repeat_interleave(heads).cumsum(0)
    total = float(cost[-1]) if cost.numel() else 0.0
    cuts = [0] + [int(torch.searchsorted(cost, total * i / threads)) for i in range(1, threads)] + [cost.numel()]
    return sorted(cuts)


def _run(name: str, offsets: torch.Tensor, heads: int, args: tuple) -> None:
    items = (offsets.numel() - 1) * heads
    threads = max(1, min(torch.get_num_threads(), items))
    if any(_native.split(library(), name, _parts(offsets, heads, threads), args)):
        raise MemoryError("the CPU attention kernel could not allocate its scratch buffers")


def forward(qkv: torch.Tensor, offsets: torch.Tensor, heads: int, scale: float, k_drop: int, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [N, 3C] fp32 contiguous, offsets [B + 1] int64 (row b: tokens [offsets[b], offsets[b+1])) ->
    (out [N, C], lse [N, H]); dropout on the probabilities with the mask of ``seed``, an element dropped when its
    16-bit piece is below ``k_drop`` (the C header)."""
    n, c3 = qkv.shape
    c = c3 // 3
    out = qkv.new_empty(n, c)
    lse = qkv.new_empty(n, heads)
    lmax = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if n and lmax:
        _run("mlip_attention_fwd", offsets, heads,
             (heads, c // heads, lmax, offsets.data_ptr(), qkv.data_ptr(), out.data_ptr(), lse.data_ptr(), scale,
              seed % (1 << 64), k_drop))
    return out, lse


def backward(grad_out: torch.Tensor, qkv: torch.Tensor, lse: torch.Tensor, offsets: torch.Tensor, heads: int,
             scale: float, k_drop: int, seed: int) -> torch.Tensor:
    """The gradient w.r.t. qkv [N, 3C] of :func:`forward`'s out, from grad_out [N, C] and its saved lse."""
    n, c3 = qkv.shape
    grad = qkv.new_empty(n, c3)
    lmax = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
    if n and lmax:
        _run("mlip_attention_bwd", offsets, heads,
             (heads, c3 // 3 // heads, lmax, offsets.data_ptr(), qkv.data_ptr(), grad_out.data_ptr(), lse.data_ptr(),
              grad.data_ptr(), scale, seed % (1 << 64), k_drop))
    return grad


def dropout(x: torch.Tensor, k_drop: int, seed: int) -> torch.Tensor:
    """x * keep * 65536 / (65536 - k_drop) for a fp32 CPU tensor, the flat mask of ``seed`` (``mlip_dropout`` in
    the C source); the same call on the gradient is the backward. Split over threads in ranges of whole words."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    threads = max(1, min(torch.get_num_threads(), n // 65536))
    cuts = [(n * i // threads) // 4 * 4 for i in range(threads)] + [n]
    _native.split(library(), "mlip_dropout", cuts, (x.data_ptr(), out.data_ptr(), seed % (1 << 64), k_drop))
    return out
