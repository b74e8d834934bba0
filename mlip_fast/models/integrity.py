"""The per-view integrity heads of the two modes that mask uniformly (``MLIPConfig.sie_mode``).

MLIP weights each masked view b of the batch by how much of the report's meaning it kept. The ``guided`` and
``discriminative`` modes read that from the patch estimator (:class:`~mlip_fast.models.estimator.
SemanticIntegrityEstimator`): the kept integrity mass of Gumbel-top-k masking. The two other modes mask
uniformly (FLIP) and score the view afterwards:

- ``maco`` (MaCo's correlation weighting): the binary keep layout m_b in {0, 1}^P of view b (1 = patch kept)
  gives w_b = softplus(theta^T m_b + c) (:class:`MaskLayoutWeight`). theta starts at 0 and c at log(e - 1), so
  every view starts at weight exactly 1; theta_p grows where keeping patch p makes views easier to match.
- ``predictor``: a small head reads the masked view's global image embedding z_b (detached: the head learns to
  read integrity, the encoder is not pushed to encode it) and predicts q_b = sigmoid(h(z_b)) in (0, 1)
  (:class:`IntegrityPredictor`), trained toward t_b = clamp(cos(z_b, z_b^full), 0, 1), the cosine between the
  masked view's embedding and the whole image's, computed without gradient (:func:`view_integrity_target`).
  The output layer starts at zero, so every view starts at q = 1/2 (equal weights).

The losses that train the heads live in :mod:`mlip_fast.functional.integrity_modes`; the weights enter the
contrastive rows detached and normalised to mean 1 over the batch, as in every mode.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskLayoutWeight", "IntegrityPredictor", "keep_layout", "view_integrity_target", "LAYOUT_BIAS"]

# c with softplus(c) = 1: a layout weight of exactly 1 at initialisation (MaCo starts at softplus(0) = log 2; the
# scale of w only matters in the layout loss, where 1 leaves the global logit scale as it is)
LAYOUT_BIAS = math.log(math.e - 1.0)


def keep_layout(index: torch.Tensor, num_patches: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kept positions index [B, K] (int64) -> the binary keep layout m [B, P] of ``dtype``, 1 at kept patches."""
    if index.ndim != 2:
        raise ValueError(f"index must be [B, K], got {tuple(index.shape)}")
    layout = torch.zeros(index.shape[0], num_patches, dtype=dtype, device=index.device)
    return layout.scatter_(1, index, 1.0)


class MaskLayoutWeight(nn.Module):
    """w_b = softplus(theta^T m_b + c) over the binary keep layout m_b [P] (MaCo's mask-layout weight).

    Args:
        num_patches: P, the length of the layout (the ViT's patch grid, row-major).

    ``linear`` holds theta (weight [1, P], 0 at initialisation) and c (bias [1], :data:`LAYOUT_BIAS`).
    """

    def __init__(self, num_patches: int):
        super().__init__()
        if isinstance(num_patches, bool) or not isinstance(num_patches, int) or num_patches <= 0:
            raise ValueError(f"num_patches must be a positive int, got {num_patches!r}")
        self.num_patches = num_patches
        self.linear = nn.Linear(num_patches, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.constant_(self.linear.bias, LAYOUT_BIAS)

    def forward(self, layout: torch.Tensor) -> torch.Tensor:
        """layout [B, P] (0 / 1, any float dtype) -> weights [B] > 0, with gradient to theta and c."""
        if layout.ndim != 2 or layout.shape[1] != self.num_patches:
            raise ValueError(f"layout must be [B, P={self.num_patches}], got {tuple(layout.shape)}")
        return F.softplus(self.linear(layout.to(self.linear.weight.dtype))).squeeze(-1)


class IntegrityPredictor(nn.Module):
    """q_b = sigmoid(Linear(hidden, 1)(GELU(Linear(D, hidden)(LayerNorm(z_b))))) in (0, 1).

    Args:
        dim: D, the width of the global image embedding it reads.
        hidden: width of the hidden layer (default max(1, D // 4)).

    The output layer starts at zero: q = 1/2 for every view at initialisation.
    """

    def __init__(self, dim: int, hidden: Optional[int] = None):
        super().__init__()
        hidden = max(1, dim // 4) if hidden is None else hidden
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, D] (the masked view's global image embedding) -> predicted integrity [B] in (0, 1)."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be [B, D={self.dim}], got {tuple(features.shape)}")
        return torch.sigmoid(self.fc2(self.act(self.fc1(self.norm(features)))).squeeze(-1))


@torch.no_grad()
def view_integrity_target(masked: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """t_b = clamp(cos(masked_b, full_b), 0, 1) for masked [B, D] and whole-image full [B, D] embeddings; detached,
    float32 (float64 for float64 inputs)."""
    dtype = torch.promote_types(masked.dtype, torch.float32)
    return F.cosine_similarity(masked.to(dtype), full.to(dtype), dim=-1, eps=1e-12).clamp(0.0, 1.0)
