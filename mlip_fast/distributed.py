"""Rank helpers, all-gather with gradient, ragged gathers and the score-block exchange (gloo and NCCL).

The losses compute a local-vs-gathered rectangle: each rank scores its B local rows against the
G = B x world_size gathered columns. :func:`all_gather_with_grad` makes the gathered columns carry
gradient back to the rank that owns them: its backward sums the incoming gradients over ranks
(all-reduce) and returns the slice of the local rank, so that summing every rank's loss gives the same
gradient as one process on the concatenated batch (data parallel engines average that sum over ranks).

The library owns its distributed contract: ranks may hold different numbers of sentences per report (S);
:func:`gather` with ``pad_dim`` pads every rank's tensor to the largest size before gathering (masks with
False, so padding is never valid), and :func:`all_to_all_blocks` exchanges [B, B] blocks of a score matrix so
that a direction computed on the rank that owns the images reaches the rank that owns the reports.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F


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


def max_size(n: int, group=None, device=None) -> int:
    """The largest ``n`` over the ranks of ``group`` (``n`` itself without a process group)."""
    if not is_distributed(group):
        return int(n)
    t = torch.tensor([int(n)], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def pad_to(x: torch.Tensor, size: int, dim: int, value=0) -> torch.Tensor:
    """``x`` padded at the end of ``dim`` to ``size`` with ``value`` (differentiable; a no-op when equal)."""
    extra = size - x.shape[dim]
    if extra == 0:
        return x
    if x.dtype == torch.bool:
        return pad_to(x.to(torch.uint8), size, dim, int(bool(value))).bool()
    pad = [0, 0] * (x.ndim - 1 - dim) + [0, extra]
    return F.pad(x, pad, value=value)


def gather(x: Optional[torch.Tensor], *, with_grad: bool, group=None, pad_dim: Optional[int] = None,
           pad_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """All-gathers ``x`` along dim 0 with or without gradient to other ranks; None passes through.

    ``pad_dim``: ranks may differ in the size of that dim (e.g. S sentences per report); every rank's
    tensor is padded at the end to ``pad_size`` (the largest size over ranks, found with one small
    all-reduce when not given) with zeros / False before the gather. The local rows keep their gradient
    through the padding.
    """
    if x is None:
        return None
    if pad_dim is not None and is_distributed(group):
        size = pad_size if pad_size is not None else max_size(x.shape[pad_dim], group, x.device)
        x = pad_to(x, size, pad_dim, False if x.dtype == torch.bool else 0)
    if x.dtype == torch.bool:  # not every backend all-gathers bool tensors
        return all_gather_no_grad(x.to(torch.uint8), group, keep_local_grad=False).bool()
    if not x.is_floating_point() or not with_grad:
        return all_gather_no_grad(x, group, keep_local_grad=x.is_floating_point())
    return all_gather_with_grad(x, group)


class _AllToAllBlocks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        _, world = rank_and_world(group)
        R, WC = x.shape
        C = WC // world
        ctx.shape = (world, R, C)
        recv = torch.empty((world * C, R), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(recv, x.T.contiguous(), group=group)
        return recv.view(world, C, R).transpose(1, 2).reshape(world * R, C)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world, R, C = ctx.shape
        send = grad.reshape(world, R, C).transpose(1, 2).reshape(world * C, R).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=ctx.group)
        return recv.view(world, C, R).permute(2, 0, 1).reshape(R, world * C), None


def all_to_all_blocks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Exchanges column blocks: ``x`` [R, world * C] on every rank -> [world * R, C].

    Block ``r`` of the output rows is rank ``r``'s ``x[:, rank * C : (rank + 1) * C]`` (the columns that
    belong to this rank). Differentiable: the backward sends each block's gradient back to the rank that
    computed it (the reverse exchange). Every rank must pass the same shape. Without a process group this
    returns ``x``.
    """
    if not is_distributed(group):
        return x
    _, world = rank_and_world(group)
    if x.ndim != 2 or x.shape[1] % world:
        raise ValueError(f"all_to_all_blocks needs [R, world * C] with world={world}, got {tuple(x.shape)}")
    return _AllToAllBlocks.apply(x, group)
