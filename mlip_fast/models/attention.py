"""The one attention switch of the ViT image tower.

Backends, in ``auto`` priority order:

- ``flash``: ``flash_attn.flash_attn_func`` (flash-attention 2/3), CUDA tensors in fp16/bf16 only.
- ``xformers``: ``xformers.ops.memory_efficient_attention``, CUDA tensors.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` (which picks PyTorch's own flash /
  memory-efficient / math kernels for the device).
- ``math``: the explicit ``softmax(Q K^T / sqrt(d)) V`` in the input dtype, the readable reference.

The ViT runs on [CLS] + kept tokens, the same count for every image of a batch, so no backend needs a
padding mask or varlen path here.

Selection goes through the op registry of :mod:`mlip_fast.ops.dispatch` (op name ``vit_attention``):
``auto`` takes the first backend that can run for the input's device and dtype; an explicit backend that
cannot run raises :class:`~mlip_fast.ops.dispatch.ImplUnavailableError` naming every backend and why it
declined. The environment variable ``MLIP_ATTN_BACKEND`` overrides the configured backend (for debugging
and benchmarking without editing configs). :func:`selected_backend` reports the backend used last, and
``mlip_fast.ops.dispatch.describe_selected()`` includes it, so a run log can state it. When ``auto`` would
switch backends between calls (e.g. an fp32 evaluation after bf16 training on CUDA) a warning says so
once, so a change is never silent.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F

from mlip_fast.ops.dispatch import Impl, ImplUnavailableError, registry

__all__ = ["attention", "BACKENDS", "ENV_VAR", "selected_backend", "resolve_backend", "backend_report",
           "ImplUnavailableError"]

logger = logging.getLogger(__name__)

BACKENDS = ("flash", "xformers", "sdpa", "math")
ENV_VAR = "MLIP_ATTN_BACKEND"
_ALL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


FLASH_MAX_HEAD_DIM = 256


def _flash_limits(inputs) -> list:
    """flash-attn's kernels take head dims up to 256, in multiples of 8."""
    head_dim = inputs.get("head_dim")
    if head_dim is None:
        return []
    reasons = []
    if head_dim > FLASH_MAX_HEAD_DIM:
        reasons.append(f"head dim {head_dim} > {FLASH_MAX_HEAD_DIM} is not supported by flash-attn")
    elif head_dim % 8:
        reasons.append(f"head dim {head_dim} is not a multiple of 8 (flash-attn)")
    return reasons


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=q.shape[-1] ** -0.5, causal=False)


def _xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention

    return memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=q.shape[-1] ** -0.5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # SDPA wants [B, H, N, Dh]; the transposes are views and SDPA handles the strides.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    # scores and softmax in fp32 for half inputs, as the fused kernels keep them (rounding the scores to
    # bf16 before the softmax would double the error)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).transpose(1, 2)


def _module_missing(module: str, install: str):
    def probe(device: torch.device) -> Optional[str]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
        return None

    return probe


_REGISTRY = registry(
    "vit_attention",
    priority={"cuda": ["flash", "xformers", "sdpa", "math"], "default": ["sdpa", "math"]},
)
_REGISTRY.register(Impl("flash", _flash, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16),
                        unavailable=_module_missing("flash_attn", "pip install flash-attn"), limits=_flash_limits))
_REGISTRY.register(Impl("xformers", _xformers, devices=("cuda",), dtypes=(torch.float16, torch.bfloat16, torch.float32),
                        unavailable=_module_missing("xformers", "pip install xformers")))
_REGISTRY.register(Impl("sdpa", _sdpa, devices=("cpu", "cuda", "mps", "xpu"), dtypes=_ALL_FLOATS))
_REGISTRY.register(Impl("math", _math, devices=("cpu", "cuda", "mps", "xpu", "meta"), dtypes=_ALL_FLOATS))

_warned_switch = False


def resolve_backend(requested: str = "auto") -> str:
    """The backend name to use: ``MLIP_ATTN_BACKEND`` when set, else ``requested``; validated."""
    name = os.environ.get(ENV_VAR, "").strip().lower() or requested
    if name not in ("auto", *BACKENDS):
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR, "").strip() else "attn_backend"
        raise ValueError(f"{source}={name!r} is not an attention backend; choose one of {('auto', *BACKENDS)}")
    return name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Multi-head self-attention without masking or dropout.

    Args:
        q, k, v: [B, N, H, Dh] queries, keys, values (same dtype and device).
        backend: "auto" | "flash" | "xformers" | "sdpa" | "math" (``MLIP_ATTN_BACKEND`` overrides it).
    Returns:
        [B, N, H, Dh] = softmax(q k^T / sqrt(Dh)) v per head, in the input dtype.
    Raises:
        ImplUnavailableError: an explicit backend cannot run for this device / dtype (the message lists
            every backend and why it declined), or none can under ``auto``.
    """
    global _warned_switch
    name = resolve_backend(backend)
    previous = _REGISTRY.last_used
    impl = _REGISTRY.select(name, q.device, q.dtype, dict(head_dim=q.shape[-1], heads=q.shape[2], tokens=q.shape[1]))
    if name == "auto" and previous is not None and impl.name != previous and not _warned_switch:
        _warned_switch = True
        logger.warning("ViT attention backend changed from %s to %s (device=%s, dtype=%s)",
                       previous, impl.name, q.device.type, q.dtype)
    return impl.fn(q, k, v)


def selected_backend() -> Optional[str]:
    """Name of the attention backend used by the last ViT attention call (None before the first)."""
    return _REGISTRY.last_used


def backend_report(device: torch.device | str, dtype: torch.dtype, head_dim: Optional[int] = None) -> dict:
    """{backend: "available" or the reason it cannot run} for ``device`` / ``dtype`` (and the model's head
    dim, when given), for run logs."""
    device = torch.device(device)
    inputs = {} if head_dim is None else {"head_dim": head_dim}
    return {name: (_REGISTRY.impls[name].refusal(device, dtype, inputs) or "available") for name in BACKENDS}
