"""Public patch-sentence scores op: input checks, then dispatch to the reference, chunked or Triton impl.

See ``mlip_fast.reference.patch_sentence`` for the formula. One module per backend (``chunked``,
``triton_impl``), each exposing its ``IMPL``; this package registers them explicitly, in one place.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast import _checks
from mlip_fast.ops.dispatch import Impl, registry
from mlip_fast.ops.patch_sentence import chunked, triton_impl
from mlip_fast.reference import patch_sentence as _reference

OP_NAME = "patch_sentence_scores"
PRIORITY = {
    "cuda": ["triton", "chunked", "reference"],
    "cpu": ["chunked", "reference"],
    "default": ["chunked", "reference"],
}
DIRECTIONS = ("both", "i2t", "t2i")

REGISTRY = registry(OP_NAME, PRIORITY)
REGISTRY.register(
    Impl(
        name="reference",
        fn=_reference.patch_sentence_scores,
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=_checks.FLOAT_DTYPES,
    )
)
REGISTRY.register(chunked.IMPL)
REGISTRY.register(triton_impl.IMPL)


def patch_sentence_scores(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    directions: str = "both",
    impl: str = "auto",
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Patch-sentence scores with token-wise max aggregation in both directions (MLIP / FILIP style).

    Args:
        patches: [B, K, D] patch embeddings (float16/bfloat16/float32/float64).
        sentences: [G, S, D] sentence embeddings, same dtype and device as ``patches``.
        sentence_mask: [G, S] bool, True = valid sentence; None = all valid.
        patch_mask: [B, K] bool, True = valid patch; None = all valid.
        directions: "both", "i2t" (image-to-text only) or "t2i" (text-to-image only).
        impl: "auto" (triton on CUDA, chunked elsewhere), "reference", "chunked" or "triton".
        deterministic: fused backward without atomics (bitwise reproducible gradients).

    Returns:
        ``(i2t, t2i)``, each [B, G] (None for a direction not asked for), float32 for half inputs and the
        input dtype otherwise:
        ``i2t[b, g] = mean_{valid p} max_{valid q} <patches[b, p], sentences[g, q]>``,
        ``t2i[b, g] = mean_{valid q} max_{valid p} <patches[b, p], sentences[g, q]>``.
        Raw dot products: nothing is normalised here. Padded sentences never win a max and never enter
        a mean. A report with no valid sentence (or an image with no valid patch) scores 0 and gets no
        gradient.
    """
    _checks.check_tensor("patches", patches, 3, dims=("B", "K", "D"))
    _checks.check_tensor("sentences", sentences, 3, dims=("G", "S", "D"))
    if sentences.dtype != patches.dtype:
        raise TypeError(f"sentences dtype {sentences.dtype} differs from patches dtype {patches.dtype}")
    if sentences.device != patches.device:
        raise ValueError(f"sentences are on {sentences.device} but patches are on {patches.device}")
    if sentences.shape[-1] != patches.shape[-1]:
        raise ValueError(
            f"embedding widths differ: patches [B, K, D={patches.shape[-1]}], sentences [G, S, D={sentences.shape[-1]}]"
        )
    if directions not in DIRECTIONS:
        raise ValueError(f"directions must be one of {DIRECTIONS}, got {directions!r}")
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    if min(B, K, G, S, patches.shape[-1]) == 0:
        raise ValueError(f"empty input: patches {tuple(patches.shape)}, sentences {tuple(sentences.shape)}")
    sentence_mask = _checks.check_mask("sentence_mask", sentence_mask, (G, S), device=patches.device)
    patch_mask = _checks.check_mask("patch_mask", patch_mask, (B, K), device=patches.device)
    return scores_unchecked(patches, sentences, sentence_mask, patch_mask, directions, impl=impl,
                            deterministic=deterministic)


def describe_inputs(patches: torch.Tensor, sentences: torch.Tensor, directions: str) -> dict:
    """What an impl's ``limits`` sees: device, dtype, B, K, G, S, D and the directions."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    return dict(device=patches.device, dtype=patches.dtype, B=B, K=K, G=G, S=S, D=D, directions=directions)


def scores_unchecked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    directions: str,
    *,
    impl: str = "auto",
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`patch_sentence_scores` for callers that validated the inputs already (the losses): dispatch
    only, no checks (and so no host synchronisation)."""
    inputs = describe_inputs(patches, sentences, directions)
    chosen = REGISTRY.select(impl, patches.device, patches.dtype, inputs)
    return chosen.fn(patches, sentences, sentence_mask, patch_mask, directions, deterministic)
