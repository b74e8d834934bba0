"""``impl="triton"`` for patch-sentence scores: the fused kernels as ``torch.library`` custom ops.

``mlip_fast::patch_sentence_scores_fwd`` returns the scores and the int16 argmax indices;
``mlip_fast::patch_sentence_scores_bwd`` turns upstream gradients and those indices into the input
gradients. Both have fake (meta) impls, and the forward's autograd formula is registered with
``torch.library.register_autograd``, so torch.compile traces through the op instead of breaking on the raw
Triton launch. The kernels (``kernels/patch_sentence.py``) are imported on first use, so this module loads
without triton and the registry can say why the impl is unavailable.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast.ops.dispatch import Impl, triton_unavailable_reason

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernels():
    from mlip_fast.kernels import patch_sentence

    return patch_sentence


@torch.library.custom_op("mlip_fast::patch_sentence_scores_fwd", mutates_args=())
def patch_sentence_scores_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool,
    do_t2i: bool,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused forward: (i2t [B, G] fp32, t2i [B, G] fp32, arg_i2t [B, G, K] int16, arg_t2i [B, G, S] int16).

    A direction not computed comes back as empty tensors. ``deterministic`` only matters to the backward.
    """
    return _kernels().patch_sentence_fwd(patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i)


@patch_sentence_scores_fwd.register_fake
def _(patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, deterministic):
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    f32, i16 = dict(dtype=torch.float32), dict(dtype=torch.int16)
    return (
        patches.new_empty((B, G) if do_i2t else (0,), **f32),
        patches.new_empty((B, G) if do_t2i else (0,), **f32),
        patches.new_empty((B, G, K) if do_i2t else (0,), **i16),
        patches.new_empty((B, G, S) if do_t2i else (0,), **i16),
    )


@torch.library.custom_op("mlip_fast::patch_sentence_scores_bwd", mutates_args=())
def patch_sentence_scores_bwd(
    grad_i2t: torch.Tensor,
    grad_t2i: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    arg_i2t: torch.Tensor,
    arg_t2i: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool,
    do_t2i: bool,
    deterministic: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fused backward: (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype.

    grad_i2t / grad_t2i are [B, G] (ignored for a direction not computed).
    """
    return _kernels().patch_sentence_bwd(
        grad_i2t if do_i2t else None,
        grad_t2i if do_t2i else None,
        patches,
        sentences,
        arg_i2t,
        arg_t2i,
        sentence_mask,
        patch_mask,
        deterministic,
    )


@patch_sentence_scores_bwd.register_fake
def _(grad_i2t, grad_t2i, patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask, do_i2t, do_t2i, deterministic):
    return torch.empty_like(patches), torch.empty_like(sentences)


def _setup_context(ctx, inputs, output):
    patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, deterministic = inputs
    _, _, arg_i2t, arg_t2i = output
    ctx.save_for_backward(patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask)
    ctx.flags = (do_i2t, do_t2i, deterministic)


def _backward(ctx, grad_i2t, grad_t2i, _grad_arg_i2t, _grad_arg_t2i):
    patches, sentences, arg_i2t, arg_t2i, sentence_mask, patch_mask = ctx.saved_tensors
    do_i2t, do_t2i, deterministic = ctx.flags
    B, G = patches.shape[0], sentences.shape[0]

    def upstream(grad, done):
        if not done:
            return patches.new_empty((0,), dtype=torch.float32)
        return grad if grad is not None else patches.new_zeros((B, G), dtype=torch.float32)

    grad_p, grad_s = patch_sentence_scores_bwd(
        upstream(grad_i2t, do_i2t),
        upstream(grad_t2i, do_t2i),
        patches,
        sentences,
        arg_i2t,
        arg_t2i,
        sentence_mask,
        patch_mask,
        do_i2t,
        do_t2i,
        deterministic,
    )
    return grad_p, grad_s, None, None, None, None, None


patch_sentence_scores_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_sentence_scores_triton(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    directions: str = "both",
    deterministic: bool = False,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Fused Triton patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_scores``).

    Args:
        patches: [B, K, D] fp16/bf16/fp32 on CUDA (or CPU under TRITON_INTERPRET=1).
        sentences: [G, S, D], same dtype and device.
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None.
        directions: "both", "i2t" or "t2i" (only the asked directions are computed).
        deterministic: backward without atomics, bitwise reproducible run to run.

    Returns:
        (i2t [B, G], t2i [B, G]) float32, None for a direction not asked for.
    """
    do_i2t, do_t2i = directions in ("both", "i2t"), directions in ("both", "t2i")
    i2t, t2i, _, _ = patch_sentence_scores_fwd(
        patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, bool(deterministic)
    )
    return (i2t if do_i2t else None), (t2i if do_t2i else None)


def triton_limits(inputs) -> list:
    """The kernels' size limits for these inputs (int16 indices; K for reports longer than one tile)."""
    kernels = _kernels()
    return kernels.limits(inputs["K"], inputs["S"], inputs["dtype"], kernels.target_of(inputs["device"]).arch)


IMPL = Impl(
    name="triton",
    fn=patch_sentence_scores_triton,
    devices=("cuda", "cpu"),
    dtypes=SUPPORTED_DTYPES,
    unavailable=triton_unavailable_reason,
    limits=triton_limits,
)
