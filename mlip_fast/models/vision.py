"""ViT image tower whose transformer blocks run only on the patches kept by integrity-scored masking.

Forward pass for images [B, C_in, H, W] (P = (H / patch)^2 patches, width C):

1. patch embedding (conv with kernel = stride = patch) + learned position embedding -> tokens [B, P, C];
2. semantic integrity estimator (SIE) on every token -> integrity logits a [B, P] (a tower built without one,
   for the integrity modes that mask uniformly, skips this step);
3. ``integrity_mask`` keeps K = round((1 - r) P) tokens per image by Gumbel-top-k over a / t_mask, or over zero
   scores (uniform random masking, FLIP) when the masking is not scored (r = 0 keeps every token in its original
   order and samples nothing);
4. pre-norm transformer blocks on [CLS] + kept tokens -> final LayerNorm;
5. CLS state = global vector [B, C]; the other states = kept patch vectors [B, K, C].

Every parameter lives in a submodule whose ``forward`` uses it (embeddings, estimator, blocks, norm), so
the tower works under DeepSpeed ZeRO-3, which gathers a module's parameters only around its forward.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from mlip_fast.models.attention import attention
from mlip_fast.models.config import VisionConfig, check_mask_ratio
from mlip_fast.models.estimator import SemanticIntegrityEstimator
from mlip_fast.ops.integrity_mask import integrity_mask
from mlip_fast.preprocess.transforms import _LUMA as LUMA  # the weights the preprocessing reduces colour with

__all__ = ["VisionTransformer", "VisionOutput", "Block", "Attention", "Mlp", "Embeddings", "num_kept"]

logger = logging.getLogger(__name__)


def num_kept(num_patches: int, mask_ratio: float) -> int:
    """K = round((1 - r) P), half rounded up, at least 1."""
    mask_ratio = check_mask_ratio(mask_ratio)
    return max(1, int(math.floor((1.0 - mask_ratio) * num_patches + 0.5)))


_noticed_rgb = False


def _rgb_to_grey(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W] with the BT.601 weights of the preprocessing; says so once per process."""
    global _noticed_rgb
    if not _noticed_rgb:
        _noticed_rgb = True
        logger.warning("the image tower takes grey images [B, 1, H, W]; 3-channel input is reduced to BT.601 "
                       "luminance (0.299 R + 0.587 G + 0.114 B); the model's transforms read any image file as grey "
                       "(this notice is shown once)")
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)


@dataclass
class VisionOutput:
    """Outputs of :class:`VisionTransformer` (unprojected, width C).

    global_features [B, C]        final-norm CLS state
    patch_features [B, K, C]      final-norm states of the kept patches, in ``patch_index`` order
    patch_index [B, K] int64      kept patch positions (row-major in the grid), ascending
    integrity_logits_all [B, P]   SIE logits on every patch (None without an estimator)
    integrity_logits [B, K]       SIE logits at the kept positions (None without an estimator)
    integrity_weights [B]         kept integrity mass sum_{p kept} softmax_p(a_p), detached (1 when r = 0 or
                                  when the masking was not scored)
    """

    global_features: torch.Tensor
    patch_features: torch.Tensor
    patch_index: torch.Tensor
    integrity_logits_all: Optional[torch.Tensor]
    integrity_logits: Optional[torch.Tensor]
    integrity_weights: torch.Tensor


class Embeddings(nn.Module):
    """Patch embedding + [CLS] token + learned position embedding ([1, 1 + P, C], CLS first), and with
    ``cfg.registers`` R > 0 the register tokens ``registers`` [1, R, C] (no position: they belong to no place).
    Every parameter is read inside ``forward`` (ZeRO-3 gathers a module's parameters for its own forward only)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.in_chans = cfg.in_chans
        self.proj = nn.Conv2d(cfg.in_chans, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, cfg.width))
        self.registers = nn.Parameter(torch.zeros(1, cfg.registers, cfg.width)) if cfg.registers else None

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B, C_in, H, W] -> (prefix [B, 1 + R, C], patches [B, P, C]): the prefix is CLS (with its
        position) followed by the R register tokens, the patches carry their positions.

        A grey tower (C_in = 1) also takes [B, 3, H, W] (an RGB rendering, normalised as its preprocessing
        does): the channels are reduced to BT.601 luminance, as the preprocessing reduces colour files, with a
        notice the first time. Images are cast to the patch embedding's dtype (a bf16 / fp16 model takes the
        transforms' fp32 output)."""
        if images.ndim == 4 and images.shape[1] == 3 and self.in_chans == 1:
            images = _rgb_to_grey(images)
        if images.ndim != 4 or images.shape[1] != self.in_chans or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images must have shape [B, {self.in_chans}, {self.image_size}, {self.image_size}], "
                f"got {tuple(images.shape)}"
            )
        patches = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2) + self.pos_embed[:, 1:]
        prefix = self.cls_token + self.pos_embed[:, :1]
        if self.registers is not None:
            prefix = torch.cat([prefix, self.registers], dim=1)
        return prefix.expand(images.shape[0], -1, -1).to(patches.dtype), patches


class Attention(nn.Module):
    """Multi-head self-attention through :func:`mlip_fast.models.attention.attention`."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, backend: str = "auto"):
        super().__init__()
        self.heads = heads
        self.backend = backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, C] -> [B, N, C]."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).unbind(2)
        return self.proj(attention(q, k, v, self.backend).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads, cfg.qkv_bias, cfg.attn_backend)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT with integrity-scored token masking before the blocks (see the module docstring).

    Attributes used by segmentation decoders: ``grid_size`` (patches per side), ``width`` (C),
    ``num_patches`` (P), ``patch_size``. ``estimator=False`` builds the tower without the integrity estimator
    (``estimator`` is None; masking is then always uniform).
    """

    def __init__(self, cfg: VisionConfig, sie_hidden: int = 256, estimator: bool = True):
        super().__init__()
        self.config = cfg
        self.grid_size = cfg.grid_size
        self.num_patches = cfg.num_patches
        self.patch_size = cfg.patch_size
        self.width = cfg.width
        self.grad_checkpointing = False
        self.embeddings = Embeddings(cfg)
        self.estimator = SemanticIntegrityEstimator(cfg.width, sie_hidden) if estimator else None
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's ViT init: truncated normal (std 0.02) for Linear weights and position / CLS embeddings,
        zero biases, LayerNorm at identity, the patch conv as a Linear over the flattened patch."""
        nn.init.trunc_normal_(self.embeddings.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=0.02)
        if self.embeddings.registers is not None:
            nn.init.trunc_normal_(self.embeddings.registers, std=0.02)
        w = self.embeddings.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.embeddings.proj.bias)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.norm(x)

    def forward(
        self,
        images: torch.Tensor,
        mask_ratio: float = 0.0,
        *,
        temperature: float = 1.0,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        scored: bool = True,
    ) -> VisionOutput:
        """Encodes ``images`` [B, C_in, H, W] keeping K = round((1 - mask_ratio) P) patches per image.

        ``temperature`` is the Gumbel-top-k temperature over the integrity logits; ``seed`` or
        ``generator`` make the sampled mask reproducible (see ``mlip_fast.ops.integrity_mask``).
        ``scored=False`` (or a tower without an estimator) masks uniformly: Gumbel-top-k over zero scores, every
        image weighted 1; the estimator's logits are still returned.
        """
        prefix, tokens = self.embeddings(images)
        logits_all = self.estimator(tokens) if self.estimator is not None else None
        scored = scored and logits_all is not None
        b, p, _ = tokens.shape
        # same dtype as the op's integrity output (float32, float64 for float64 scores)
        weight_dtype = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        if mask_ratio == 0.0:
            kept = tokens
            index = torch.arange(p, device=tokens.device).expand(b, p).contiguous()
            weights = torch.ones(b, device=tokens.device, dtype=weight_dtype)
        else:
            scores = logits_all if scored else tokens.new_zeros(b, p, dtype=weight_dtype)
            # check_finite=False: the finiteness check is a host sync per step on CUDA; a NaN logit
            # shows up in the loss through the integrity weights anyway.
            result = integrity_mask(tokens, scores, num_kept(p, mask_ratio), temperature=temperature if scored else 1.0,
                                    seed=seed, generator=generator, check_finite=False)
            kept, index = result.kept, result.index
            weights = result.integrity if scored else torch.ones(b, device=tokens.device, dtype=weight_dtype)
        x = self._run_blocks(torch.cat([prefix, kept], dim=1))
        return VisionOutput(
            global_features=x[:, 0],
            patch_features=x[:, prefix.shape[1]:],
            patch_index=index,
            integrity_logits_all=logits_all,
            integrity_logits=logits_all.gather(1, index) if logits_all is not None else None,
            integrity_weights=weights.detach(),
        )

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """All token states without masking: images [B, C_in, H, W] -> [B, 1 + P, C] (CLS first, then the
        patches in row-major grid order), after the final LayerNorm; register tokens are dropped. For dense heads
        such as segmentation decoders (reshape ``[:, 1:]`` to [B, grid, grid, C])."""
        prefix, tokens = self.embeddings(images)
        x = self._run_blocks(torch.cat([prefix, tokens], dim=1))
        return x if prefix.shape[1] == 1 else torch.cat([x[:, :1], x[:, prefix.shape[1]:]], dim=1)
