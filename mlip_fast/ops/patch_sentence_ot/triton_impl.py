"""``impl="triton"`` for optimal-transport patch-sentence scores: the fused kernels as ``torch.library`` custom ops.

``mlip_fast::patch_sentence_ot_scores_fwd`` returns the scores and the potentials f [B, G, K], g [B, G, S];
``mlip_fast::patch_sentence_ot_scores_bwd`` turns the upstream gradient and those potentials into the input
gradients (plan constant, see ``kernels/patch_sentence_ot/backward.py``) from the inputs with their padded rows
zeroed (the forward kernel sets every entry that is not live to DEAD itself), so padding never matters. Both have
fake (meta) impls, and the forward's autograd formula is registered with ``torch.library.register_autograd``, so
torch.compile traces through the op instead of breaking on the raw Triton launch.

The kernel modules are imported here, at module top, so the path from the op to its kernels is visible; without
triton they are None and the impl's ``unavailable`` says why (the rest of the op still loads).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.ops._template import custom_op_name, kernels_missing, triton_impl
from mlip_fast.reference.patch_sentence import unit_rows

try:
    from mlip_fast.kernels.patch_sentence_ot import launch as _launch
except ImportError as err:  # triton absent (a CPU-only install): the impl reports it, nothing else changes
    _launch, _IMPORT_ERROR = None, kernels_missing(err)
else:
    _IMPORT_ERROR = None

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@torch.library.custom_op(custom_op_name("patch_sentence_ot_scores", "fwd"), mutates_args=())
def patch_sentence_ot_scores_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    eps: float,
    n_iter: int,
    tol: Optional[float],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: (scores [B, G] fp32, f [B, G, K] fp32, g [B, G, S] fp32)."""
    return _launch.patch_sentence_ot_fwd(patches, sentences, sentence_mask, patch_mask, eps, n_iter, tol)


@patch_sentence_ot_scores_fwd.register_fake
def _(patches, sentences, sentence_mask, patch_mask, eps, n_iter, tol):
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    f32 = dict(dtype=torch.float32)
    return patches.new_empty((B, G), **f32), patches.new_empty((B, G, K), **f32), patches.new_empty((B, G, S), **f32)


@torch.library.custom_op(custom_op_name("patch_sentence_ot_scores", "bwd"), mutates_args=())
def patch_sentence_ot_scores_bwd(
    grad_scores: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype."""
    return _launch.patch_sentence_ot_bwd(grad_scores, patches, sentences, f, g, eps)


@patch_sentence_ot_scores_bwd.register_fake
def _(grad_scores, patches, sentences, f, g, eps):
    return torch.empty_like(patches), torch.empty_like(sentences)


def _setup_context(ctx, inputs, output):
    patches, sentences, sentence_mask, patch_mask, eps, _, _ = inputs
    _, f, g = output
    ctx.save_for_backward(patches, sentences, sentence_mask, patch_mask, f, g)
    ctx.eps = eps
    ctx.set_materialize_grads(False)  # the potentials' gradients arrive as None, not as zeros of their size


def _zero_padded(x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
    return x if valid is None else x.masked_fill(~valid[..., None], 0)


def _backward(ctx, grad_scores, _grad_f, _grad_g):
    patches, sentences, sentence_mask, patch_mask, f, g = ctx.saved_tensors
    if grad_scores is None:  # only the potentials were used downstream: they carry no gradient
        grad_scores = patches.new_zeros(f.shape[:2], dtype=torch.float32)
    # The kernel rebuilds the plan from the similarities of the operands' rows: padded rows are zeroed first, so
    # whatever they hold the plan there is exp2(-inf) = 0 exactly and no NaN / Inf enters the products.
    patches, sentences = _zero_padded(patches, patch_mask), _zero_padded(sentences, sentence_mask)
    grad_p, grad_s = patch_sentence_ot_scores_bwd(grad_scores, patches, sentences, f, g, ctx.eps)
    return grad_p, grad_s, None, None, None, None, None


patch_sentence_ot_scores_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_sentence_ot_scores_triton(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Fused Triton OT patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_ot_scores``).

    Args:
        patches: [B, K, D] fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1).
        sentences: [G, S, D], same dtype and device.
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None.
        eps, n_iter, tol: as in ``mlip_fast.reference.patch_sentence_ot``.
        normalize: score the rows' unit vectors; the kernels take unit vectors, so here they are made first with
            ``unit_rows`` (through autograd: normalised copies of [B, K, D] and [G, S, D] are held, unlike the
            chunked impl, which normalises per tile).

    Returns:
        [B, G] float32 scores; envelope gradient (plan constant).
    """
    if normalize:
        patches, sentences = unit_rows(patches, patch_mask), unit_rows(sentences, sentence_mask)
    scores, _, _ = patch_sentence_ot_scores_fwd(
        patches, sentences, sentence_mask, patch_mask, float(eps), int(n_iter), None if tol is None else float(tol)
    )
    return scores


def triton_limits(inputs) -> list:
    """The forward's register tile: a pair's padded S x K block must fit (see ``launch.limits``)."""
    return _launch.limits(inputs["K"], inputs["S"], inputs["dtype"], _launch.target_of(inputs["device"]).arch)


IMPL = triton_impl(patch_sentence_ot_scores_triton, _launch, _IMPORT_ERROR, SUPPORTED_DTYPES, triton_limits)
