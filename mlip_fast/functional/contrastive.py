"""The global image-report contrastive loss (symmetric InfoNCE, open_clip's distributed modes)."""
from __future__ import annotations

from typing import Optional

import torch

from mlip_fast import _checks
from mlip_fast.distributed import gather, rank_and_world
from mlip_fast.functional._common import _check_batch, _check_scale, _labels, _normalize, _row_weights, _symmetric_ce


def global_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale,
    weights: Optional[torch.Tensor] = None,
    *,
    local_loss: bool = True,
    gather_with_grad: bool = True,
    group=None,
) -> torch.Tensor:
    """Symmetric InfoNCE between global image and text vectors.

    Args:
        image: [B, D] image vectors (of the masked view); text: [B, D] report vectors; pair b is positive.
        logit_scale: scalar multiplier of the cosine similarities (1 / temperature).
        weights: optional [B] per-sample weights (MLIP's kept integrity mass); detached and normalised to
            mean 1 over the global batch; row b of both directions is weighted by weights[b].
        local_loss: score local rows against gathered columns (else every rank computes the full G x G).
        gather_with_grad: gathered columns carry gradient back to their ranks.

    Returns:
        0-dim float32 loss = 1/2 [CE(s * I T^T, diag) + CE(s * T I^T, diag)] (weighted mean over rows).
    """
    _checks.check_tensor("image", image, 2, dims=("B", "D"))
    _checks.check_tensor("text", text, 2, dims=("B", "D"))
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be [B, D] with equal B and D")
    _check_batch("image", image)
    scale = _check_scale("logit_scale", logit_scale)
    image, text = _normalize(image), _normalize(text)
    rank, _ = rank_and_world(group)
    B = image.shape[0]
    image_all = gather(image, with_grad=gather_with_grad, group=group)
    text_all = gather(text, with_grad=gather_with_grad, group=group)
    if local_loss:
        sim_i = image @ text_all.T  # [B, G]
        sim_t = text @ image_all.T  # [B, G]
        labels = _labels(B, rank * B, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=False)
    else:
        sim_i = image_all @ text_all.T  # [G, G]
        sim_t = sim_i.T
        labels = _labels(image_all.shape[0], 0, image.device)
        w = _row_weights(weights, B, image.device, group, gathered=True)
    return _symmetric_ce(sim_i, sim_t, scale, labels, w)
