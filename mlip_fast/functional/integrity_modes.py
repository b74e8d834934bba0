"""The losses that train the per-view integrity heads of the ``maco`` and ``predictor`` modes.

Both modes mask uniformly and weight each masked view b by a head's output (``mlip_fast.models.integrity``);
the weights enter the contrastive rows detached and normalised to mean 1, so the heads learn from these terms
alone (the ``lambda_sie`` term of :func:`~mlip_fast.functional.mlip_loss` in these modes):

- :func:`mask_layout_loss` (``maco``), MaCo's scaled-logit term: with the global similarities S and logit scale
  s held constant (detached), the view weight w_b = softplus(theta^T m_b + c) acts as a per-row temperature,
  L = 1/2 [CE_rows(diag(w) s S_I2T) + CE_rows(diag(w) s S_T2I)], diagonal positives. A row the model already
  matches gains from a larger w (a sharper softmax), a row it mismatches from a smaller one, so theta learns
  which keep layouts leave the pair recognisable. Only w carries gradient.
- :func:`integrity_prediction_loss` (``predictor``): L = mean_b (q_b - t_b)^2 (MSE), the predicted integrity q
  against the detached cosine target t of the masked view to the whole image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mlip_fast import _checks
from mlip_fast.distributed import gather, rank_and_world
from mlip_fast.functional._common import _check_batch, _check_scale, _labels, _normalize

__all__ = ["mask_layout_loss", "integrity_prediction_loss"]


def _check_view_scores(name: str, values: torch.Tensor, rows: int) -> None:
    _checks.check_tensor(name, values, 1, dims=("B",))
    if values.shape[0] != rows:
        raise ValueError(f"{name} must have shape [B={rows}] (one value per view), got {tuple(values.shape)}")


def mask_layout_loss(layout_weights: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale, *,
                     group=None) -> torch.Tensor:
    """MaCo's scaled-logit term that trains the mask-layout weight (module docstring).

    Args:
        layout_weights: [B] w_b > 0 with gradient (``MaskLayoutWeight``'s output).
        image, text: [B, D] global embeddings of the masked views and of their reports (detached inside).
        logit_scale: the global contrastive term's scale s (detached inside).
        group: under torch.distributed the columns are every rank's (gathered without gradient); each rank's
            loss is the mean over its own rows, so the ranks' average has the gradient of the whole batch.

    Returns:
        0-dim loss in float32 (float64 for float64 weights); gradient to ``layout_weights`` only.
    """
    _checks.check_tensor("image", image, 2, dims=("B", "D"))
    _checks.check_tensor("text", text, 2, dims=("B", "D"))
    if image.shape != text.shape:
        raise ValueError(f"image {tuple(image.shape)} and text {tuple(text.shape)} must both be [B, D]")
    _check_batch("image", image)
    B = image.shape[0]
    _check_view_scores("layout_weights", layout_weights, B)
    scale = _check_scale("logit_scale", logit_scale).detach()
    dtype = torch.promote_types(layout_weights.dtype, torch.float32)
    rank, _ = rank_and_world(group)
    with torch.no_grad():
        image_n, text_n = _normalize(image.detach().to(dtype)), _normalize(text.detach().to(dtype))
        sim_i = image_n @ gather(text_n, with_grad=False, group=group).T  # [B, G]
        sim_t = text_n @ gather(image_n, with_grad=False, group=group).T  # [B, G]
    labels = _labels(B, rank * B, image.device)
    row_scale = layout_weights.to(dtype)[:, None] * scale.to(device=image.device, dtype=dtype)
    return 0.5 * (F.cross_entropy(row_scale * sim_i, labels) + F.cross_entropy(row_scale * sim_t, labels))


def integrity_prediction_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_b (prediction_b - target_b)^2 over the views of this rank: prediction [B] with gradient (the
    ``IntegrityPredictor``'s q), target [B] (detached inside). Returns 0-dim float32 (float64 for float64)."""
    _checks.check_tensor("prediction", prediction, 1, dims=("B",))
    _check_batch("prediction", prediction)
    _check_view_scores("target", target, prediction.shape[0])
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    return F.mse_loss(prediction.to(dtype), target.detach().to(device=prediction.device, dtype=dtype))
