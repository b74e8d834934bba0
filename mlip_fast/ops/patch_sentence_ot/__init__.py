"""Public optimal-transport patch-sentence scores op: input checks, then dispatch to the reference, chunked or
Triton impl.

See ``mlip_fast.reference.patch_sentence_ot`` for the formulation and its choices. One module per backend
(``chunked``, ``triton_impl``), each exposing its ``IMPL``; this package registers them explicitly, in one place.
"""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.ops.dispatch import Impl, registry
from mlip_fast.ops.patch_sentence_ot import chunked, triton_impl
from mlip_fast.reference import patch_sentence_ot as _reference

OP_NAME = "patch_sentence_ot_scores"
PRIORITY = {
    "cuda": ["triton", "chunked", "reference"],
    "cpu": ["chunked", "reference"],
    "default": ["chunked", "reference"],
}

REGISTRY = registry(OP_NAME, PRIORITY)
REGISTRY.register(
    Impl(
        name="reference",
        fn=_reference.patch_sentence_ot_scores,
        devices=("cpu", "cuda", "mps", "xpu"),
        dtypes=_checks.FLOAT_DTYPES,
    )
)
REGISTRY.register(chunked.IMPL)
REGISTRY.register(triton_impl.IMPL)


def patch_sentence_ot_scores(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
    normalize: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """Patch-sentence scores by entropic optimal transport (the many-to-many reading of MLIP's matching).

    For image b and report g: sim_pq = <patches[b, p], sentences[g, q]> over valid patches and sentences, cost
    1 - sim, uniform marginals over the valid entries, plan P* from ``n_iter`` log-domain Sinkhorn iterations with
    regularisation ``eps``, and ``scores[b, g] = sum_pq P*_pq sim_pq``. One [B, G] matrix serves both directions
    of a symmetric cross-entropy. The gradient holds P* constant (envelope style; the reference's
    ``gradient="unrolled"`` differentiates through the iterations instead).

    Args:
        patches: [B, K, D] patch embeddings (float16/bfloat16/float32/float64), L2-normalised by the caller
            unless ``normalize``.
        sentences: [G, S, D] sentence embeddings, same dtype and device as ``patches``.
        sentence_mask: [G, S] bool, True = valid sentence; None = all valid.
        patch_mask: [B, K] bool, True = valid patch; None = all valid.
        eps: entropic regularisation (> 0) in units of the cost 1 - sim. Default 0.05, with n_iter = 50
            (``mlip_fast.constants``; the sweep on the synthetic benchmark's validation split that backs them is in
            docs/training.md).
        n_iter: Sinkhorn iterations (>= 1), each a sentence then a patch update.
        tol: optional per-pair stopping tolerance (>= 0) on the L1 violation of the sentence marginal; None
            runs exactly ``n_iter`` iterations.
        normalize: score the unit vectors of the rows, x / max(||x||, 1e-12) (norms in fp32), the gradient
            reaching the raw rows. The chunked impl does it without a normalised copy of the patches (each image
            block per tile), with fp32 results bitwise those of normalising first through autograd; the reference
            and the Triton kernels normalise first.
        impl: "auto" (triton on CUDA, chunked elsewhere), "reference", "chunked" or "triton".

    Returns:
        [B, G] scores, float32 (float64 for float64 inputs). A pair with no valid patch or no valid sentence
        scores 0 and gets no gradient. Padded entries never matter: whatever they hold (NaN / Inf included, with
        value checks off) they carry no mass, change no score and get gradient 0.
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
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    if min(B, K, G, S, patches.shape[-1]) == 0:
        raise ValueError(f"empty input: patches {tuple(patches.shape)}, sentences {tuple(sentences.shape)}")
    sentence_mask = _checks.check_mask("sentence_mask", sentence_mask, (G, S), device=patches.device)
    patch_mask = _checks.check_mask("patch_mask", patch_mask, (B, K), device=patches.device)
    check_solver(eps, n_iter, tol)
    return scores_unchecked(patches, sentences, sentence_mask, patch_mask, eps=eps, n_iter=n_iter, tol=tol,
                            normalize=normalize, impl=impl)


def paired_transport_plan(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    *,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
) -> torch.Tensor:
    """The transport plan of each image with its own report (localisation maps, inspection).

    Args:
        patches: [N, K, D] and sentences: [N, S, D], L2-normalised, row n of each a pair; masks [N, S] / [N, K]
            bool (True = valid) or None; eps, n_iter, tol: as :func:`patch_sentence_ot_scores`.

    Returns:
        plan [N, K, S] (float32 for half inputs, else the input dtype): P*_pq of pair n, the plan whose
        ``sum_pq P*_pq sim_pq`` is that pair's score. Column q sums to 1 / (valid sentences of report n): the
        share of the sentence's mass each patch takes is ``plan[n, :, q] * count``. Padding and empty pairs hold 0.
        Computed by the reference (a plan is N*K*S numbers, as small as its inputs' product).
    """
    _checks.check_tensor("patches", patches, 3, dims=("N", "K", "D"))
    _checks.check_tensor("sentences", sentences, 3, dims=("N", "S", "D"))
    if sentences.shape[0] != patches.shape[0] or sentences.shape[-1] != patches.shape[-1]:
        raise ValueError(f"patches {tuple(patches.shape)} and sentences {tuple(sentences.shape)} must be [N, K, D] "
                         "and [N, S, D] with the same N and D")
    if sentences.dtype != patches.dtype or sentences.device != patches.device:
        raise TypeError(f"sentences ({sentences.dtype}, {sentences.device}) and patches ({patches.dtype}, "
                        f"{patches.device}) must share dtype and device")
    N, K, _ = patches.shape
    sentence_mask = _checks.check_mask("sentence_mask", sentence_mask, (N, sentences.shape[1]), device=patches.device)
    patch_mask = _checks.check_mask("patch_mask", patch_mask, (N, K), device=patches.device)
    check_solver(eps, n_iter, tol)
    return _reference.paired_transport_plan(patches, sentences, sentence_mask, patch_mask, eps, n_iter, tol)


def check_solver(eps, n_iter, tol) -> None:
    """The Sinkhorn settings: eps a finite number > 0, n_iter an integer >= 1, tol None or a finite number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if isinstance(n_iter, bool) or not isinstance(n_iter, Integral) or n_iter < 1:
        raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
    bad_tol = isinstance(tol, bool) or not isinstance(tol, Real) or not (math.isfinite(tol) and tol >= 0)
    if tol is not None and bad_tol:
        raise ValueError(f"tol must be None or a finite number >= 0, got {tol!r}")


def describe_inputs(patches: torch.Tensor, sentences: torch.Tensor, n_iter: int, tol: Optional[float]) -> dict:
    """What an impl's ``limits`` sees: device, dtype, B, K, G, S, D, n_iter and tol."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    return dict(device=patches.device, dtype=patches.dtype, B=B, K=K, G=G, S=S, D=D, n_iter=n_iter, tol=tol)


def scores_unchecked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    *,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
    normalize: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`patch_sentence_ot_scores` for callers that validated the inputs already (the losses): dispatch
    only, no checks (and so no host synchronisation)."""
    chosen = REGISTRY.select(impl, patches.device, patches.dtype, describe_inputs(patches, sentences, n_iter, tol))
    return chosen.fn(patches, sentences, sentence_mask, patch_mask, float(eps), int(n_iter),
                     None if tol is None else float(tol), normalize=bool(normalize))
