"""Rank helpers and all-gather with gradient (works with gloo and NCCL).

The losses compute a local-vs-gathered rectangle: each rank scores its B local rows against the
G = B x world_size gathered columns. :func:`all_gather_with_grad` makes the gathered columns carry
gradient back to the rank that owns them: its backward sums the incoming gradients over ranks
(all-reduce) and returns the slice of the local rank, so that summing every rank's loss gives the same
gradient as one process on the concatenated batch (data parallel engines average that sum over ranks).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple:
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        ctx.rank, world = rank_and_world(group)
        ctx.rows = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenates ``x`` [B, ...] from every rank along dim 0 -> [B * world, ...], differentiable.

    Every rank must pass the same B. Without an initialised process group this returns ``x``.
    """
    if not is_distributed(group):
        return x
    return _AllGatherWithGrad.apply(x, group)


def all_gather_no_grad(x: torch.Tensor, group=None, *, keep_local_grad: bool = True) -> torch.Tensor:
    """Concatenates ``x`` from every rank along dim 0; only the local slice keeps its autograd history
    (when ``keep_local_grad``), as open_clip's gather without gradient."""
    if not is_distributed(group):
        return x
    rank, world = rank_and_world(group)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    if keep_local_grad:
        parts[rank] = x
    return torch.cat(parts, dim=0)


def gather(x: Optional[torch.Tensor], *, with_grad: bool, group=None) -> Optional[torch.Tensor]:
    """All-gathers ``x`` along dim 0 with or without gradient to other ranks; None passes through."""
    if x is None:
        return None
    if x.dtype == torch.bool:  # not every backend all-gathers bool tensors
        return all_gather_no_grad(x.to(torch.uint8), group, keep_local_grad=False).bool()
    if not x.is_floating_point() or not with_grad:
        return all_gather_no_grad(x, group, keep_local_grad=x.is_floating_point())
    return all_gather_with_grad(x, group)
