"""``impl="chunked"`` for patch-sentence scores: pure PyTorch, tiled, with a backward from argmax indices.

The [B, G, K, S] similarity grid is produced one tile of (image block, report block) at a time, so peak
extra memory is O(B*G*(K + S)) (int16 indices, t2i maxima) plus one tile instead of O(B*G*K*S). Both
maxima of a pair are local to its tile (i2t maxes over the sentences of one report, t2i over the patches of one image), so tiles
are independent. The backward rebuilds, per tile, the sparse gradient of the similarity
M[b, p, g, q] = wI[b, g] [a[b, p, g] == q] + wT[b, g] [c[b, g, q] == p] from the saved indices (see
``kernels/patch_sentence.py`` for the derivation) and applies it with two matmuls: no grid recompute.
Runs on any device and dtype; deterministic wherever the device's matmul is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast import _checks
from mlip_fast.ops.dispatch import Impl
from mlip_fast.reference.patch_sentence import score_dtype

# Elements of one similarity tile: 2**19 fp32 values (2 MiB) stay in cache, keep the op count per call low
# (each op costs a scheduling round trip on a busy 2-core machine) and the matmul at full rate.
TILE_ELEMENTS = 2**19


def _tiles(B: int, K: int, G: int, S: int, tile_elements: int):
    """Yields (image slice, report slice) covering [B] x [G] with at most ``tile_elements`` K*S cells each
    (a single pair may exceed it when K*S alone does)."""
    per_pair = K * S
    g_block = max(1, min(G, tile_elements // per_pair))
    b_block = max(1, min(B, tile_elements // (per_pair * g_block)))
    for b0 in range(0, B, b_block):
        for g0 in range(0, G, g_block):
            yield slice(b0, min(b0 + b_block, B)), slice(g0, min(g0 + g_block, G))


def _index_dtype(K: int, S: int) -> torch.dtype:
    return torch.int16 if max(K, S) < 2**15 else torch.int32


class PatchSentenceChunkedFunction(torch.autograd.Function):
    """Tiled forward saving argmax indices; backward from the indices.

    forward(patches [B, K, D], sentences [G, S, D], sentence_mask [G, S] bool, patch_mask [B, K] bool,
    do_i2t, do_t2i, tile_elements) -> (i2t [B, G], t2i [B, G]) in ``score_dtype``; a direction not
    computed is an empty tensor.
    """

    @staticmethod
    def forward(ctx, patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, tile_elements):
        B, K, D = patches.shape
        G, S, _ = sentences.shape
        device, out_dtype = patches.device, score_dtype(patches.dtype)
        n_p = patch_mask.sum(1)  # [B]
        n_s = sentence_mask.sum(1)  # [G]
        pair = (n_p > 0)[:, None] & (n_s > 0)[None, :]  # [B, G]: both sides non-empty
        # Means as weighted sums (weight 0 on padding). Padding is filled with the most negative finite
        # value rather than -inf so that padding x weight 0 is 0, not NaN; pairs with an empty side are
        # zeroed at the end. Per-tile work is kept to a few large ops: on a busy 2-core machine every
        # extra parallel op costs a scheduling round trip.
        fill = torch.finfo(out_dtype).min
        sent_flat = sentences.reshape(G * S, D)
        idx_dtype = _index_dtype(K, S)
        empty = torch.empty(0, dtype=out_dtype, device=device)
        i2t = torch.empty(B, G, dtype=out_dtype, device=device) if do_i2t else empty
        # arg_i2t is [B, K, G] (not [B, G, K]) so a tile's slice lines up with the [b, p, g, q] tile layout.
        arg_i2t = torch.empty(B, K, G, dtype=idx_dtype, device=device) if do_i2t else empty
        arg_t2i = torch.empty(B, G, S, dtype=idx_dtype, device=device) if do_t2i else empty
        t2i_best = torch.empty(B, G, S, dtype=out_dtype, device=device) if do_t2i else empty
        patch_w = (patch_mask.to(out_dtype) / n_p.clamp(min=1)[:, None].to(out_dtype))[:, None, :]  # [B, 1, K]
        patch_pad = None if bool(patch_mask.all()) else ~patch_mask[:, :, None, None]  # [B, K, 1, 1]
        sent_pad = None if bool(sentence_mask.all()) else ~sentence_mask  # [G, S]

        for bs, gs in _tiles(B, K, G, S, tile_elements):
            bc, gc = bs.stop - bs.start, gs.stop - gs.start
            # The tile is computed in the input dtype (as the reference grid is), then widened.
            sim = (patches[bs].reshape(bc * K, D) @ sent_flat[gs.start * S : gs.stop * S].T).to(out_dtype)
            sim = sim.view(bc, K, gc, S)
            # Masks are applied in place, one after the other: t2i (max over p) only needs padded patches
            # filled, i2t (max over q) only padded sentences, and the rows / columns that the second fill
            # spoils are exactly the ones the first direction already read or weighs by 0.
            if do_t2i:
                if patch_pad is not None:
                    sim.masked_fill_(patch_pad[bs], fill)
                best, idx = sim.max(dim=1)  # [bc, gc, S]
                t2i_best[bs, gs] = best
                arg_t2i[bs, gs] = idx
            if do_i2t:
                if sent_pad is not None:
                    sim.masked_fill_(sent_pad[gs], fill)
                best, idx = sim.max(dim=3)  # [bc, K, gc]
                i2t[bs, gs] = torch.bmm(patch_w[bs], best).view(bc, gc)
                arg_i2t[bs, :, gs] = idx

        zero = torch.zeros((), dtype=out_dtype, device=device)
        if do_i2t:
            i2t = torch.where(pair, i2t, zero)
        t2i = empty
        if do_t2i:
            sent_w = sentence_mask.to(out_dtype) / n_s.clamp(min=1)[:, None].to(out_dtype)  # [G, S]
            t2i = torch.where(pair, (t2i_best * sent_w).sum(-1), zero)
        ctx.save_for_backward(patches, sentences, patch_mask, sentence_mask, arg_i2t, arg_t2i)
        ctx.flags = (do_i2t, do_t2i, tile_elements)
        ctx.mark_non_differentiable(*(t for t, done in ((i2t, do_i2t), (t2i, do_t2i)) if not done))
        return i2t, t2i

    @staticmethod
    def backward(ctx, grad_i2t, grad_t2i):
        patches, sentences, patch_mask, sentence_mask, arg_i2t, arg_t2i = ctx.saved_tensors
        do_i2t, do_t2i, tile_elements = ctx.flags
        need_p, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        B, K, D = patches.shape
        G, S, _ = sentences.shape
        device, work = patches.device, score_dtype(patches.dtype)
        n_p, n_s = patch_mask.sum(1), sentence_mask.sum(1)
        pair = (n_p > 0)[:, None] & (n_s > 0)[None, :]
        zero = torch.zeros((), dtype=work, device=device)
        # dL/dsim is wI[b, g] at (p, a[b, p, g]) for valid p plus wT[b, g] at (c[b, g, q], q) for valid q;
        # padding and empty pairs get weight 0 (their saved indices are arbitrary but in range).
        if do_i2t:
            w_i2t = torch.where(pair, grad_i2t.to(work) / n_p.clamp(min=1)[:, None].to(work), zero)
        if do_t2i:
            w_t2i = torch.where(pair, grad_t2i.to(work) / n_s.clamp(min=1)[None, :].to(work), zero)
        patch_f, sent_f = patch_mask.to(work)[:, :, None], sentence_mask.to(work)[None]
        # Gradients are accumulated in the score dtype (fp32 for half inputs) and cast back once.
        grad_p = torch.zeros(B, K, D, dtype=work, device=device) if need_p else None
        grad_s = torch.zeros(G * S, D, dtype=work, device=device) if need_s else None
        sent_flat = sentences.reshape(G * S, D).to(work)

        for bs, gs in _tiles(B, K, G, S, tile_elements):
            bc, gc = bs.stop - bs.start, gs.stop - gs.start
            grad_sim = torch.zeros(bc, K, gc, S, dtype=work, device=device)
            if do_i2t:
                idx = arg_i2t[bs, :, gs].long().unsqueeze(3)  # [bc, K, gc, 1]
                src = w_i2t[bs, gs][:, None, :] * patch_f[bs]  # [bc, K, gc]
                grad_sim.scatter_add_(3, idx, src.unsqueeze(3))
            if do_t2i:
                idx = arg_t2i[bs, gs].long().unsqueeze(1)  # [bc, 1, gc, S]
                src = w_t2i[bs, gs][:, :, None] * sent_f[:, gs]  # [bc, gc, S]
                grad_sim.scatter_add_(1, idx, src.unsqueeze(1))
            grad_sim = grad_sim.view(bc * K, gc * S)
            rows = slice(gs.start * S, gs.stop * S)
            if need_p:
                grad_p[bs].view(bc * K, D).addmm_(grad_sim, sent_flat[rows])
            if need_s:
                grad_s[rows].addmm_(grad_sim.T, patches[bs].reshape(bc * K, D).to(work))

        grad_p = grad_p.to(patches.dtype) if need_p else None
        grad_s = grad_s.view(G, S, D).to(sentences.dtype) if need_s else None
        return grad_p, grad_s, None, None, None, None, None


def patch_sentence_scores_chunked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    directions: str = "both",
    deterministic: bool = False,
    tile_elements: int = TILE_ELEMENTS,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Tiled patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_scores``).

    Args:
        patches: [B, K, D]; sentences: [G, S, D] (any float dtype, same device).
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None.
        directions: "both", "i2t" or "t2i".
        deterministic: accepted for the registry interface; this path has no atomics, so it is as
            reproducible as the device's matmul.
        tile_elements: K*S similarity cells per tile (memory per tile vs per-tile overhead).

    Returns:
        (i2t [B, G], t2i [B, G]), None for a direction not asked for; float32 for half inputs, else the
        input dtype.
    """
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    if sentence_mask is None:
        sentence_mask = torch.ones(G, S, dtype=torch.bool, device=patches.device)
    if patch_mask is None:
        patch_mask = torch.ones(B, K, dtype=torch.bool, device=patches.device)
    do_i2t, do_t2i = directions in ("both", "i2t"), directions in ("both", "t2i")
    i2t, t2i = PatchSentenceChunkedFunction.apply(
        patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, int(tile_elements)
    )
    return (i2t if do_i2t else None), (t2i if do_t2i else None)


IMPL = Impl(
    name="chunked",
    fn=patch_sentence_scores_chunked,
    devices=("cpu", "cuda", "mps", "xpu"),
    dtypes=_checks.FLOAT_DTYPES,
)
