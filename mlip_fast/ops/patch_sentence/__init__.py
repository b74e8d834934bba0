"""Public patch-sentence scores op: the one validation boundary, then dispatch to the reference, chunked or
Triton impl.

See ``mlip_fast.reference.patch_sentence`` for the formula and the masking semantics. One module per backend
(``chunked``, ``triton_impl``), each exposing its ``IMPL``; this package registers them explicitly, in one
place. Every impl takes ``(patches, sentences, sentence_mask, patch_mask, options)`` with the inputs already
checked (:func:`check_inputs`) and a :class:`ScoresOptions`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast import _checks
from mlip_fast.ops.dispatch import Impl, registry
from mlip_fast.ops.patch_sentence import chunked, triton_impl
from mlip_fast.ops.patch_sentence.options import DIRECTIONS, PRECISIONS, ScoresOptions
from mlip_fast.reference import patch_sentence as _reference
from mlip_fast.reference.patch_sentence import unit_rows

__all__ = ["patch_sentence_scores", "scores_unchecked", "check_inputs", "unit_rows", "ScoresOptions", "DIRECTIONS",
           "PRECISIONS", "REGISTRY"]

OP_NAME = "patch_sentence_scores"
PRIORITY = {
    "cuda": ["triton", "chunked", "reference"],
    "cpu": ["chunked", "reference"],
    "default": ["chunked", "reference"],
}


def _reference_impl(patches, sentences, sentence_mask, patch_mask, options: ScoresOptions):
    return _reference.patch_sentence_scores(patches, sentences, sentence_mask, patch_mask, options.directions,
                                            normalize=options.normalize)


REGISTRY = registry(OP_NAME, PRIORITY)
REGISTRY.register(Impl(name="reference", fn=_reference_impl, devices=("cpu", "cuda", "mps", "xpu"),
                       dtypes=_checks.FLOAT_DTYPES))
REGISTRY.register(chunked.IMPL)
REGISTRY.register(triton_impl.IMPL)


def check_inputs(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    *,
    sentence_dims: Tuple[str, str, str] = ("G", "S", "D"),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Checks the op's tensors (types, ranks, dtypes, devices, widths, empty sizes, masks; values when value
    checks are on) and returns the masks as bool. The losses call it once and pass the checked tensors down."""
    _checks.check_tensor("patches", patches, 3, dims=("B", "K", "D"))
    _checks.check_tensor("sentences", sentences, 3, dims=sentence_dims)
    if sentences.dtype != patches.dtype:
        raise TypeError(f"sentences dtype {sentences.dtype} differs from patches dtype {patches.dtype}")
    if sentences.device != patches.device:
        raise ValueError(f"sentences are on {sentences.device} but patches are on {patches.device}")
    if sentences.shape[-1] != patches.shape[-1]:
        raise ValueError(
            f"embedding widths differ: patches [B, K, D={patches.shape[-1]}], sentences "
            f"[{sentence_dims[0]}, {sentence_dims[1]}, D={sentences.shape[-1]}]"
        )
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    if min(B, K, G, S, D) == 0:
        raise ValueError(f"empty input: patches {tuple(patches.shape)}, sentences {tuple(sentences.shape)}")
    sentence_mask = _checks.check_mask("sentence_mask", sentence_mask, (G, S), device=patches.device)
    patch_mask = _checks.check_mask("patch_mask", patch_mask, (B, K), device=patches.device)
    return sentence_mask, patch_mask


def patch_sentence_scores(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    directions: str = "both",
    normalize: bool = False,
    precision: str = "ieee",
    impl: str = "auto",
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Patch-sentence scores with token-wise max aggregation in both directions (MLIP / FILIP style).

    Args:
        patches: [B, K, D] patch embeddings (float16/bfloat16/float32/float64), any strides.
        sentences: [G, S, D] sentence embeddings, same dtype and device as ``patches``.
        sentence_mask: [G, S] bool (or uint8 0/1), True = valid sentence; None = all valid.
        patch_mask: [B, K] bool (or uint8 0/1), True = valid patch; None = all valid.
        directions: "both", "i2t" (image-to-text only) or "t2i" (text-to-image only).
        normalize: score x / max(||x||, 1e-12) of both inputs (fused: no normalised copies are kept; the
            gradient is the raw inputs').
        precision: "ieee" (default: fp32 inputs give IEEE fp32 dot products) or "tf32" (fp32 inputs on the TF32
            tensor cores, Triton on GPU only). Half inputs use their tensor cores with fp32 accumulation.
        impl: "auto" (triton on CUDA, chunked elsewhere), "reference", "chunked" or "triton".
        deterministic: fused backward without atomics (bitwise reproducible gradients).

    Returns:
        ``(i2t, t2i)``, each [B, G] (None for a direction not asked for), float32 for half inputs and the
        input dtype otherwise:
        ``i2t[b, g] = mean_{valid p} max_{valid q} <patches[b, p], sentences[g, q]>``,
        ``t2i[b, g] = mean_{valid q} max_{valid p} <patches[b, p], sentences[g, q]>``.
        Padded sentences and patches never win a max and never enter a mean, whatever they hold; NaN / Inf in
        valid entries propagate (with value checks off) as in the plain grid. A report with no valid sentence
        (or an image with no valid patch) scores 0 and gets no gradient.
    """
    options = ScoresOptions(directions, bool(normalize), precision, bool(deterministic)).checked()
    sentence_mask, patch_mask = check_inputs(patches, sentences, sentence_mask, patch_mask)
    return scores_unchecked(patches, sentences, sentence_mask, patch_mask, options, impl=impl)


def describe_inputs(patches: torch.Tensor, sentences: torch.Tensor, options: ScoresOptions) -> dict:
    """What an impl's ``limits`` sees: device, dtype, B, K, G, S, D and the options."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    return dict(device=patches.device, dtype=patches.dtype, B=B, K=K, G=G, S=S, D=D, options=options,
                directions=options.directions)


def scores_unchecked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    options: ScoresOptions,
    *,
    impl: str = "auto",
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """:func:`patch_sentence_scores` for callers that checked the inputs already (:func:`check_inputs`, bool
    masks) and built the options: dispatch only, no checks (and so no host synchronisation)."""
    chosen = REGISTRY.select(impl, patches.device, patches.dtype, describe_inputs(patches, sentences, options))
    return chosen.fn(patches, sentences, sentence_mask, patch_mask, options)
