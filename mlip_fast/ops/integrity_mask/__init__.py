"""Public integrity-scored masking op: input checks, then dispatch to the reference or Triton impl.

See ``mlip_fast.reference.integrity_mask`` for the formula and ``kernels/integrity_mask/`` for the fused
kernels. The Triton backend (``triton_impl``: a ``torch.library`` custom op with a fake impl and a registered
backward) exposes its ``IMPL``; this package registers the backends explicitly, in one place.

Randomness. Each impl is deterministic for a given seed (or generator state) on a given device, but the
two impls draw from different streams (the reference from ``torch.rand``, the Triton kernel from in-kernel
Philox keyed by the seed and the position b * P + p), so the same seed gives different masks under
``impl="reference"`` and ``impl="triton"``; both sample the same distribution. With ``generator`` (or no
seed at all, i.e. torch's default generator of the device) the Triton path draws a 63-bit seed with
``torch.randint`` on the device and the kernel reads it from device memory: no host-side random numbers
and no host synchronisation, and the generator advances on every call.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.ops.dispatch import Impl, registry
from mlip_fast.ops.integrity_mask import triton_impl
from mlip_fast.ops.integrity_mask.triton_impl import SEED_LIMIT
from mlip_fast.reference import integrity_mask as _reference
from mlip_fast.reference.integrity_mask import MaskResult

OP_NAME = "integrity_mask"
PRIORITY = {"cuda": ["triton", "reference"], "cpu": ["reference"], "default": ["reference"]}

__all__ = ["integrity_mask", "MaskResult"]


def _reference_impl(tokens, scores, keep, temperature, seed, generator) -> MaskResult:
    return _reference.integrity_mask(tokens, scores, keep, temperature, seed=seed, generator=generator)


REGISTRY = registry(OP_NAME, PRIORITY)
REGISTRY.register(
    Impl(
        name="reference",
        fn=_reference_impl,
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=_checks.FLOAT_DTYPES,
    )
)
REGISTRY.register(triton_impl.IMPL)


def _check_number(name: str, value, *, integral: bool):
    """``value`` as a Python int (``integral``) or float; bools and tensors are refused."""
    kind = numbers.Integral if integral else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integral else 'a real number'}, got {type(value).__name__}")
    return int(value) if integral else float(value)


def integrity_mask(
    tokens: torch.Tensor,
    scores: torch.Tensor,
    keep: int,
    *,
    temperature: float = 1.0,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    impl: str = "auto",
    check_finite: Optional[bool] = None,
) -> MaskResult:
    """Integrity-scored masking: keep ``keep`` = K of P patch tokens per image by Gumbel-top-k sampling.

    ``key[b, p] = scores[b, p] / temperature + Gumbel noise``; the K largest keys of each row are kept
    (sampling without replacement with Plackett-Luce probabilities softmax(scores / temperature)), so a
    patch's chance to be kept grows with its score. temperature -> infinity gives uniform random masking
    (FLIP); temperature -> 0 keeps the top K scores.

    Args:
        tokens: [B, P, C] patch tokens (float16/bfloat16/float32/float64).
        scores: [B, P] integrity logits (any float dtype), same device as ``tokens``.
        keep: K, number of patches kept per image, 1 <= K <= P.
        temperature: > 0, divides the scores before the noise is added.
        seed: int in [0, 2**63): the same seed gives the same mask (per impl and device).
        generator: a ``torch.Generator`` on the tokens' device type to draw the noise (reference) or the
            seed (triton) from; mutually exclusive with ``seed``. Both None: the device's default generator.
        impl: "auto" (triton on CUDA, reference elsewhere), "reference" or "triton".
        check_finite: raise on NaN/Inf scores; None (default) follows the package's value-check switch
            (``MLIP_FAST_VALUE_CHECKS``, off while ``torch.compile`` traces), as every op does. On CUDA this
            check is the op's one host synchronisation: pass False in a training step that must not sync.

    Returns:
        MaskResult(kept [B, K, C] tokens' dtype, index [B, K] int64 strictly ascending positions,
        integrity [B] = sum over kept p of softmax_p(scores[b]) in (0, 1], float32 (float64 for float64
        scores)). Gradients flow to ``tokens`` only; ``index`` and ``integrity`` carry none.
    """
    _checks.check_tensor("tokens", tokens, 3, dims=("B", "P", "C"), finite=False)
    _checks.check_tensor("scores", scores, 2, dims=("B", "P"), finite=False)
    B, P, C = tokens.shape
    if min(B, P, C) == 0:
        raise ValueError(f"tokens must be non-empty [B, P, C], got {tuple(tokens.shape)}")
    if scores.shape[0] != B:
        raise ValueError(f"scores has batch size {scores.shape[0]} but tokens has B={B}")
    if scores.shape[1] != P:
        raise ValueError(f"scores has {scores.shape[1]} patches but tokens has P={P}")
    if scores.device != tokens.device:
        raise ValueError(f"scores are on {scores.device} but tokens are on {tokens.device}")
    keep = _check_number("keep", keep, integral=True)
    if not 1 <= keep <= P:
        raise ValueError(f"keep must satisfy 1 <= keep <= P={P}, got {keep}")
    temperature = _check_number("temperature", temperature, integral=False)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if seed is not None:
        seed = _check_number("seed", seed, integral=True)
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        if generator is not None:
            raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != tokens.device.type:
            raise ValueError(f"generator is on {generator.device} but tokens are on {tokens.device}")
    if check_finite is None:
        check_finite = _checks.value_checks()
    if check_finite and not torch.compiler.is_compiling() and not torch.isfinite(scores).all():
        raise ValueError("scores contains NaN or Inf")
    chosen = REGISTRY.select(impl, tokens.device, tokens.dtype, dict(B=B, P=P, C=C, keep=keep))
    return chosen.fn(tokens, scores, keep, temperature, seed, generator)
