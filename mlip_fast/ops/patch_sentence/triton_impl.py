"""``impl="triton"`` for patch-sentence scores: the fused kernels as ``torch.library`` custom ops.

``mlip_fast::patch_sentence_scores_fwd`` returns the scores and the int16 argmax indices;
``mlip_fast::patch_sentence_scores_bwd`` turns upstream gradients and those indices into the input
gradients. Both have fake (meta) impls, and the forward's autograd formula is registered with
``torch.library.register_autograd``, so torch.compile traces through the op instead of breaking on the raw
Triton launch. The kernels (``kernels/patch_sentence/``) are imported at module top; without triton the module
still loads and the impl says why it cannot run (``mlip_fast.ops._template``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast.ops._template import custom_op_name, kernels_missing, triton_impl
from mlip_fast.ops.patch_sentence.options import ScoresOptions

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


try:
    from mlip_fast.kernels import patch_sentence as _kernels
except ImportError as err:  # triton absent (a CPU-only install): the impl reports it, nothing else changes
    _kernels, _IMPORT_ERROR = None, kernels_missing(err)
else:
    _IMPORT_ERROR = None


@torch.library.custom_op(custom_op_name("patch_sentence_scores", "fwd"), mutates_args=())
def patch_sentence_scores_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool,
    do_t2i: bool,
    normalize: bool,
    tf32: bool,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: (i2t [B, G] fp32, t2i [B, G] fp32, arg_i2t [B, G, K] int16, arg_t2i [B, G, S] int16,
    inv_p [B, K] fp32, inv_s [G, S] fp32); the inverse norms are empty unless ``normalize``.

    A direction not computed comes back as empty tensors. ``deterministic`` is read by the backward only (an
    input here so that the autograd context, which sees the forward's inputs, can hand it on).
    """
    return _kernels.patch_sentence_fwd(patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i,
                                         normalize=normalize, tf32=tf32)


@patch_sentence_scores_fwd.register_fake
def _(patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, normalize, tf32, deterministic):
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    f32, i16 = dict(dtype=torch.float32), dict(dtype=torch.int16)
    return (
        patches.new_empty((B, G) if do_i2t else (0,), **f32),
        patches.new_empty((B, G) if do_t2i else (0,), **f32),
        patches.new_empty((B, G, K) if do_i2t else (0,), **i16),
        patches.new_empty((B, G, S) if do_t2i else (0,), **i16),
        patches.new_empty((B, K) if normalize else (0,), **f32),
        patches.new_empty((G, S) if normalize else (0,), **f32),
    )


@torch.library.custom_op(custom_op_name("patch_sentence_scores", "bwd"), mutates_args=())
def patch_sentence_scores_bwd(
    grad_i2t: Optional[torch.Tensor],
    grad_t2i: Optional[torch.Tensor],
    patches: torch.Tensor,
    sentences: torch.Tensor,
    arg_i2t: torch.Tensor,
    arg_t2i: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    inv_p: Optional[torch.Tensor],
    inv_s: Optional[torch.Tensor],
    tf32: bool,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype.

    grad_i2t / grad_t2i are [B, G], None for a direction without upstream gradient (its work is skipped);
    inv_p / inv_s are the forward's inverse norms when it normalised (None otherwise).
    """
    # with inverse norms the launcher maps the gradients through the normalisation itself (one fused epilogue)
    return _kernels.patch_sentence_bwd(grad_i2t, grad_t2i, patches, sentences, arg_i2t, arg_t2i, sentence_mask,
                                         patch_mask, deterministic, inv_p=inv_p, inv_s=inv_s, tf32=tf32)


@patch_sentence_scores_bwd.register_fake
def _(grad_i2t, grad_t2i, patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask, inv_p, inv_s, tf32,
      deterministic):
    return torch.empty_like(patches), torch.empty_like(sentences)


def _setup_context(ctx, inputs, output):
    patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, normalize, tf32, deterministic = inputs
    _, _, arg_i2t, arg_t2i, inv_p, inv_s = output
    ctx.save_for_backward(patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask, inv_p, inv_s)
    ctx.flags = (do_i2t, do_t2i, normalize, tf32, deterministic)
    # an unused output's gradient arrives as None (not zeros), so the backward can skip that direction
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_i2t, grad_t2i, _grad_arg_i2t, _grad_arg_t2i, _grad_inv_p, _grad_inv_s):
    patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask, inv_p, inv_s = ctx.saved_tensors
    do_i2t, do_t2i, normalize, tf32, deterministic = ctx.flags
    grad_p, grad_s = patch_sentence_scores_bwd(
        grad_i2t if do_i2t else None,
        grad_t2i if do_t2i else None,
        patches,
        sentences,
        arg_i2t,
        arg_t2i,
        sentence_mask,
        patch_mask,
        inv_p if normalize else None,
        inv_s if normalize else None,
        tf32,
        deterministic,
    )
    return grad_p, grad_s, None, None, None, None, None, None, None


patch_sentence_scores_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_sentence_scores_triton(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    options: ScoresOptions,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused Triton patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_scores``).

    Args:
        patches: [B, K, D] fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1), any strides.
        sentences: [G, S, D], same dtype and device.
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None (any strides).
        options: directions (only the asked ones are computed), normalize, precision ("tf32" puts fp32
            inputs on the TF32 tensor cores), deterministic (backward without atomics).

    Returns:
        (i2t [B, G], t2i [B, G]) float32, None for a direction not asked for.
    """
    i2t, t2i, _, _, _, _ = patch_sentence_scores_fwd(
        patches, sentences, sentence_mask, patch_mask, options.do_i2t, options.do_t2i, options.normalize,
        options.precision == "tf32", options.deterministic,
    )
    return (i2t if options.do_i2t else None), (t2i if options.do_t2i else None)


def triton_limits(inputs) -> list:
    """The kernels' size limits for these inputs (int16 indices; K for reports longer than one tile)."""
    return _kernels.limits(inputs["K"], inputs["S"], inputs["dtype"], _kernels.target_of(inputs["device"]).arch)


IMPL = triton_impl(patch_sentence_scores_triton, _kernels, _IMPORT_ERROR, SUPPORTED_DTYPES, triton_limits)
