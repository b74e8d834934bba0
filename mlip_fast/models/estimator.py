"""Semantic integrity estimator (SIE): one integrity logit per image patch.

MLIP scores every patch by how much of the report's meaning it is likely to carry, before any transformer
block runs, so that integrity-scored masking (``mlip_fast.ops.integrity_mask``) keeps high-integrity
patches more often. The head sees the patch embeddings after patch-embed + position embedding and is
trained by ``SemanticIntegrityLoss`` towards the patch-sentence similarity of the patches that were kept.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

__all__ = ["SemanticIntegrityEstimator"]


class SemanticIntegrityEstimator(nn.Module):
    """LayerNorm -> Linear(C, hidden) -> GELU -> Linear(hidden, 1) over each patch embedding.

    Args:
        dim: C, width of the patch embeddings.
        hidden: width of the hidden layer (default max(1, C // 4)).
        eps: LayerNorm epsilon.

    The output layer starts at zero, so every logit is 0 at initialisation: masking starts as FLIP's
    uniform random masking and every image gets the same integrity weight K / P until the estimator has
    learned something.
    """

    def __init__(self, dim: int, hidden: Optional[int] = None, *, eps: float = 1e-6):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        hidden = max(1, dim // 4) if hidden is None else hidden
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.dim = dim
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorm at identity, fc1 truncated normal (std 0.02), fc2 zero (all logits 0, see class doc)."""
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.norm.bias)
        nn.init.trunc_normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [B, P, C] (after patch-embed + position, before the blocks) -> logits [B, P]."""
        if not isinstance(patches, torch.Tensor):
            raise TypeError(f"patches must be a torch.Tensor, got {type(patches).__name__}")
        if patches.ndim != 3 or patches.shape[-1] != self.dim:
            raise ValueError(f"patches must have shape [B, P, C={self.dim}], got {tuple(patches.shape)}")
        return self.fc2(self.act(self.fc1(self.norm(patches)))).squeeze(-1)
