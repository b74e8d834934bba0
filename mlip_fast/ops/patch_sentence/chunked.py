"""``impl="chunked"`` for patch-sentence scores: pure PyTorch, tiled, with a backward from argmax indices.

The [B, G, K, S] similarity grid is produced one tile of (report block, image block) at a time, so peak extra
memory is O(B*G*(K + S)) (int16 indices, t2i maxima) plus one tile instead of O(B*G*K*S). Both maxima of a
pair are local to its tile (i2t maxes over the sentences of one report, t2i over the patches of one image),
so tiles are independent.

Tile layout. As in the Triton kernel, sentences are the rows and patches the columns: the tile is
``sentences[g-block] @ patches[b-block]^T`` viewed as [gc, S, bc, K]. Both maxima are then reductions over a
non-innermost axis or over a contiguous innermost one, which PyTorch's CPU ``amax`` vectorises (about 15x
faster here than ``max(dim)`` with indices). The argmax comes from the max without a second comparison
kernel: ``code = amax((sign(sim - max) + 1) * (n - index))`` is n - (lowest index reaching the max), using
only vectorised float ops (ties go to the lowest index, as in every impl).

Masking is exact (see ``mlip_fast.reference.patch_sentence``): the rows of padded sentences are filled with -inf
after the GEMM (``index_fill_``: only those rows are touched), masked patches' columns after the i2t reduction,
and the backward zeroes the operands' padded rows, so nothing stored there reaches a valid score or a
gradient.

``normalize=True`` scores x / max(||x||, eps) without holding normalised copies: each patch tile is normalised
on the fly (a tile-sized temporary) and the sentences' inverse norms scale the tile's rows; the backward
scales the rows of the gradient tile the same way, and turns the gradient with respect to the normalised
vectors, g, into the one for the raw x:
dx = r (g - x^ <x^, g>) with x^ = r x, r = 1 / ||x|| (and dx = g / eps below the norm floor).

The backward rebuilds, per tile, the sparse gradient of the similarity
M[b, p, g, q] = wI[b, g] [a[b, p, g] == q] + wT[b, g] [c[b, g, q] == p] from the saved indices (see
``kernels/patch_sentence/backward.py`` for the derivation) and applies it with two matmuls: no grid recompute.
Runs on any device and dtype; deterministic wherever the device's matmul is.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from mlip_fast import _checks
from mlip_fast.ops._template import custom_op_name
from mlip_fast.ops.dispatch import Impl
from mlip_fast.ops.patch_sentence.options import ScoresOptions
from mlip_fast.reference.patch_sentence import inverse_norms, score_dtype, unnormalize_grad_

# Elements of one similarity tile: 2**21 fp32 values (8 MiB; the op keeps two). Fewer, larger tiles mean fewer ops
# per call (each a dispatch round trip); benchmarks/bench_chunked_tiles.py (results/chunked_tiles_cpu.json) found
# 2**21 fastest or within noise of it at the default run's loss and at two larger shapes, and 2**17 (the size
# before, chosen to stay in cache) 1.35-1.7x slower on 2 cores.
TILE_ELEMENTS = 2**21


def _tiles(B: int, K: int, G: int, S: int, tile_elements: int):
    """Yields (image slice, report slice) covering [B] x [G] with at most ``tile_elements`` K*S cells each
    (a single pair may exceed it when K*S alone does). Reports are blocked first: wide row blocks keep the
    GEMM efficient and the per-tile op count low."""
    per_pair = K * S
    g_block = max(1, min(G, tile_elements // per_pair))
    b_block = max(1, min(B, tile_elements // (per_pair * g_block)))
    for g0 in range(0, G, g_block):
        for b0 in range(0, B, b_block):
            yield slice(b0, min(b0 + b_block, B)), slice(g0, min(g0 + g_block, G))


def _index_dtype(K: int, S: int) -> torch.dtype:
    return torch.int16 if max(K, S) < 2**15 else torch.int32


def _prepare(x: torch.Tensor, inv: Optional[torch.Tensor], valid: Optional[torch.Tensor]) -> torch.Tensor:
    """x normalised (``inv`` given) and with invalid rows zeroed (``valid`` given), in x's dtype; x itself when
    neither applies (no copy)."""
    if inv is not None:
        x = (x.to(inv.dtype) * inv[..., None]).to(x.dtype)
    if valid is not None:
        x = x.masked_fill(~valid[..., None], 0)
    return x


def _first_argmax_(work: torch.Tensor, values: torch.Tensor, best: torch.Tensor, dim: int,
                   weights: torch.Tensor) -> torch.Tensor:
    """Lowest index along ``dim`` where ``values`` reaches ``best`` (``best`` = its max, keepdim), computed in
    the scratch tensor ``work`` (same shape as ``values``, overwritten). ``weights`` holds n - index along
    ``dim``. NaN / infinite maxima give an arbitrary in-range index (their gradients are non-finite anyway)."""
    n = values.shape[dim]
    torch.sub(values, best, out=work)
    code = work.sign_().add_(1).mul_(weights).amax(dim=dim)  # n - first index; NaN where best is not finite
    return (n - code).nan_to_num_(0).clamp_(0, n - 1)


def _reverse_weights(n: int, dim: int, ndim: int, dtype, device) -> torch.Tensor:
    shape = [1] * ndim
    shape[dim] = n
    return torch.arange(n, 0, -1, dtype=dtype, device=device).view(shape)


def _pad_none(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The mask, or None when it has no invalid entry (masking work can then be skipped)."""
    return None if mask is None or bool(mask.all()) else mask


# The forward and backward are torch.library custom ops (with fake impls), so torch.compile traces the op as one
# node instead of breaking its graph on the tile loop and the data-dependent mask checks inside.
@torch.library.custom_op(custom_op_name("patch_sentence_scores_chunked", "fwd"), mutates_args=())
def chunked_fwd(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    do_i2t: bool,
    do_t2i: bool,
    normalize: bool,
    keep_idx: bool,
    tile_elements: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled forward: (i2t [B, G], t2i [B, G] in ``score_dtype``, arg_i2t [G, B, K], arg_t2i [G*S, B] (int16),
    inv_p [B, K], inv_s [G, S]). A direction not computed, the indices without ``keep_idx`` (no gradient wanted)
    and the inverse norms without ``normalize`` are empty tensors."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    device, work = patches.device, score_dtype(patches.dtype)
    sentence_mask, patch_mask = _pad_none(sentence_mask), _pad_none(patch_mask)
    n_p = patch_mask.sum(1) if patch_mask is not None else torch.full((B,), K, device=device)
    n_s = sentence_mask.sum(1) if sentence_mask is not None else torch.full((G,), S, device=device)
    pair = (n_p > 0)[:, None] & (n_s > 0)[None, :]  # [B, G]: both sides non-empty
    inv_p = inverse_norms(patches) if normalize else None  # [B, K]
    inv_s = inverse_norms(sentences) if normalize else None  # [G, S]
    s_rows = sentences.reshape(G * S, D)
    inv_rows = None if inv_s is None else inv_s.reshape(G * S, 1)
    exact = work == patches.dtype  # fp32 / fp64: the GEMM writes the score dtype directly
    pad_rows = None if sentence_mask is None else (~sentence_mask).reshape(-1).nonzero().squeeze(1)
    block_pads = {}  # report block start -> its padded rows, numbered within the block
    idx_dtype = _index_dtype(K, S)

    def empty():  # a custom op's outputs must not alias one another: a fresh empty tensor each time
        return torch.empty(0, dtype=work, device=device)

    i2t = torch.empty(B, G, dtype=work, device=device) if do_i2t else empty()
    arg_i2t = torch.empty(G, B, K, dtype=idx_dtype, device=device) if do_i2t and keep_idx else empty()
    arg_t2i = torch.empty(G * S, B, dtype=idx_dtype, device=device) if do_t2i and keep_idx else empty()
    t2i_sum = torch.empty(G, B, dtype=work, device=device) if do_t2i else None  # sum over valid q of the max
    s_valid = None if sentence_mask is None else sentence_mask[:, :, None]  # [G, S, 1]
    w_mean = (1 / n_p.clamp(min=1).to(work))[:, None]  # [B, 1]
    w_s = _reverse_weights(S, 1, 3, work, device)
    w_k = _reverse_weights(K, 2, 3, work, device)
    cells = max(min(tile_elements, G * S * B * K), K * S)  # the largest tile _tiles yields
    sim_buf = torch.empty(cells, dtype=work, device=device)
    scratch = torch.empty_like(sim_buf) if keep_idx else None

    for bs, gs in _tiles(B, K, G, S, tile_elements):
        bc, gc = bs.stop - bs.start, gs.stop - gs.start
        rows, cols = gc * S, bc * K
        p_blk = _prepare(patches[bs], None if inv_p is None else inv_p[bs], None).reshape(cols, D)
        s_blk = s_rows[gs.start * S : gs.stop * S]
        sim = sim_buf[: rows * cols].view(rows, cols)
        if exact:
            torch.mm(s_blk, p_blk.T, out=sim)
        else:  # half inputs: the GEMM in the input dtype (as the reference's grid), then widened
            sim.copy_(s_blk @ p_blk.T)
        if inv_rows is not None:  # the sentences' norms scale the tile's rows: no normalised copy of them
            sim.mul_(inv_rows[gs.start * S : gs.stop * S])
        if pad_rows is not None:  # padded sentences: -inf whatever the GEMM gave (only their rows touched)
            if gs.start not in block_pads:
                lo, hi = gs.start * S, gs.stop * S
                block_pads[gs.start] = pad_rows[(pad_rows >= lo) & (pad_rows < hi)] - lo
            sim.index_fill_(0, block_pads[gs.start], float("-inf"))
        if do_i2t:  # per patch column: max over each report's sentence rows
            sim3 = sim.view(gc, S, cols)
            best = sim3.amax(dim=1, keepdim=True)  # [gc, 1, bc*K]
            if keep_idx:
                idx = _first_argmax_(scratch[: rows * cols].view(gc, S, cols), sim3, best, 1, w_s)
                arg_i2t[gs, bs] = idx.view(gc, bc, K).to(idx_dtype)
            best = best.view(gc, bc, K)
            if patch_mask is not None:
                best = torch.where(patch_mask[bs][None], best, torch.zeros((), dtype=work, device=device))
            i2t[bs, gs] = (best * w_mean[bs][None]).sum(-1).T  # fully padded reports: -inf, zeroed below
        if do_t2i:  # per sentence row: max over each image's patch columns
            sim3 = sim.view(rows, bc, K)
            if patch_mask is not None:
                sim3.masked_fill_(~patch_mask[bs][None], float("-inf"))
            best = sim3.amax(dim=2, keepdim=True)  # [gc*S, bc, 1]
            if keep_idx:  # the tile's last use: its own buffer serves as scratch
                idx = _first_argmax_(sim3, sim3, best, 2, w_k)
                arg_t2i[gs.start * S : gs.stop * S, bs] = idx.to(idx_dtype)
            best = best.view(gc, S, bc)
            if s_valid is not None:
                best = torch.where(s_valid[gs], best, torch.zeros((), dtype=work, device=device))
            t2i_sum[gs, bs] = best.sum(1)

    zero = torch.zeros((), dtype=work, device=device)
    if do_i2t:
        i2t = torch.where(pair, i2t, zero)
    t2i = empty()
    if do_t2i:
        t2i = torch.where(pair, (t2i_sum / n_s.clamp(min=1)[:, None].to(work)).T, zero)
    return (i2t, t2i, arg_i2t, arg_t2i, empty() if inv_p is None else inv_p, empty() if inv_s is None else inv_s)


@chunked_fwd.register_fake
def _(patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, normalize, keep_idx, tile_elements):
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    work, idx = score_dtype(patches.dtype), _index_dtype(K, S)

    def out(shape, dtype, made):
        return patches.new_empty(shape if made else (0,), dtype=dtype if made else work)

    return (out((B, G), work, do_i2t), out((B, G), work, do_t2i), out((G, B, K), idx, do_i2t and keep_idx),
            out((G * S, B), idx, do_t2i and keep_idx), out((B, K), work, normalize), out((G, S), work, normalize))


@torch.library.custom_op(custom_op_name("patch_sentence_scores_chunked", "bwd"), mutates_args=())
def chunked_bwd(
    grad_i2t: Optional[torch.Tensor],
    grad_t2i: Optional[torch.Tensor],
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    arg_i2t: torch.Tensor,
    arg_t2i: torch.Tensor,
    inv_p: Optional[torch.Tensor],
    inv_s: Optional[torch.Tensor],
    need_p: bool,
    need_s: bool,
    tile_elements: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward from the saved indices: (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input dtype
    (empty for a side not needed). A direction without upstream gradient (None) is skipped."""
    sentence_mask, patch_mask = _pad_none(sentence_mask), _pad_none(patch_mask)
    do_i2t, do_t2i = grad_i2t is not None, grad_t2i is not None
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    device, work = patches.device, score_dtype(patches.dtype)
    n_p = patch_mask.sum(1) if patch_mask is not None else torch.full((B,), K, device=device)
    n_s = sentence_mask.sum(1) if sentence_mask is not None else torch.full((G,), S, device=device)
    pair = (n_p > 0)[:, None] & (n_s > 0)[None, :]
    zero = torch.zeros((), dtype=work, device=device)
    # dL/dsim is wI[b, g] at (p, a[b, p, g]) for valid p plus wT[b, g] at (c[b, g, q], q) for valid q;
    # padding and empty pairs get weight 0 (their saved indices are arbitrary but in range).
    use_i2t = do_i2t and grad_i2t is not None
    use_t2i = do_t2i and grad_t2i is not None
    if use_i2t:
        w_i2t = torch.where(pair, grad_i2t.to(work) / n_p.clamp(min=1)[:, None].to(work), zero).T  # [G, B]
    if use_t2i:
        w_t2i = torch.where(pair, grad_t2i.to(work) / n_s.clamp(min=1)[None, :].to(work), zero).T  # [G, B]
    p_valid = None if patch_mask is None else patch_mask.to(work)  # [B, K]
    s_valid = None if sentence_mask is None else sentence_mask.to(work)  # [G, S]
    # Gradients w.r.t. the (normalised) vectors, accumulated in the score dtype and cast back once.
    grad_p = torch.zeros(B * K, D, dtype=work, device=device) if need_p else None
    grad_s = torch.zeros(G * S, D, dtype=work, device=device) if need_s else None
    s_rows = sentences.reshape(G * S, D)
    if sentence_mask is not None and not bool(torch.isfinite(s_rows[(~sentence_mask).reshape(-1)]).all()):
        s_rows = _prepare(s_rows, None, sentence_mask.reshape(-1))  # padding holding NaN / Inf: zero it
    s_rows = s_rows.to(work)
    inv_rows = None if inv_s is None else inv_s.reshape(G * S, 1)
    buf = torch.empty(max(min(tile_elements, G * S * B * K), K * S), dtype=work, device=device)

    if use_i2t or use_t2i:
        for bs, gs in _tiles(B, K, G, S, tile_elements):
            bc, gc = bs.stop - bs.start, gs.stop - gs.start
            rows, cols = gc * S, bc * K
            grad_sim = buf[: rows * cols].view(rows, cols).zero_()
            if use_i2t:
                idx = arg_i2t[gs, bs].reshape(gc, 1, cols).long()
                src = w_i2t[gs, bs][:, :, None].expand(gc, bc, K)
                if p_valid is not None:
                    src = src * p_valid[bs][None]
                grad_sim.view(gc, S, cols).scatter_add_(1, idx, src.reshape(gc, 1, cols))
            if use_t2i:
                idx = arg_t2i[gs.start * S : gs.stop * S, bs].long()[:, :, None]  # [gc*S, bc, 1]
                src = w_t2i[gs, bs][:, None, :].expand(gc, S, bc)
                if s_valid is not None:
                    src = src * s_valid[gs][:, :, None]
                grad_sim.view(rows, bc, K).scatter_add_(2, idx, src.reshape(rows, bc, 1))
            rows_slice = slice(gs.start * S, gs.stop * S)
            if need_s:  # w.r.t. the (normalised) sentences: grad_sim @ (normalised) patches
                p_blk = _prepare(patches[bs], None if inv_p is None else inv_p[bs], patch_mask[bs]
                                 if patch_mask is not None else None).reshape(cols, D).to(work)
                grad_s[rows_slice].addmm_(grad_sim, p_blk)
            if need_p:  # w.r.t. the (normalised) patches: grad_sim^T @ (sentences * their inverse norms)
                if inv_rows is not None:
                    grad_sim.mul_(inv_rows[rows_slice])
                grad_p[bs.start * K : bs.stop * K].addmm_(grad_sim.T, s_rows[rows_slice])

    if need_p:
        if inv_p is not None:
            unnormalize_grad_(grad_p, patches.reshape(B * K, D), inv_p.reshape(B * K))
        grad_p = grad_p.view(B, K, D).to(patches.dtype)
    if need_s:
        if inv_s is not None:
            unnormalize_grad_(grad_s, sentences.reshape(G * S, D), inv_s.reshape(G * S))
        grad_s = grad_s.view(G, S, D).to(sentences.dtype)
    return grad_p if need_p else patches.new_empty((0,)), grad_s if need_s else patches.new_empty((0,))


@chunked_bwd.register_fake
def _(grad_i2t, grad_t2i, patches, sentences, sentence_mask, patch_mask, arg_i2t, arg_t2i, inv_p, inv_s, need_p,
      need_s, tile_elements):
    return (torch.empty_like(patches) if need_p else patches.new_empty((0,)),
            torch.empty_like(sentences) if need_s else patches.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    patches, sentences, sentence_mask, patch_mask, do_i2t, do_t2i, normalize, keep_idx, tile_elements = inputs
    _, _, arg_i2t, arg_t2i, inv_p, inv_s = output
    ctx.save_for_backward(patches, sentences, sentence_mask, patch_mask, arg_i2t, arg_t2i, inv_p, inv_s)
    ctx.flags = (do_i2t, do_t2i, normalize, tile_elements)
    ctx.set_materialize_grads(False)  # an unused direction's gradient arrives as None: its work is skipped


def _backward(ctx, grad_i2t, grad_t2i, *_unused):
    patches, sentences, sentence_mask, patch_mask, arg_i2t, arg_t2i, inv_p, inv_s = ctx.saved_tensors
    do_i2t, do_t2i, normalize, tile_elements = ctx.flags
    need_p, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_p, grad_s = chunked_bwd(grad_i2t if do_i2t else None, grad_t2i if do_t2i else None, patches, sentences,
                                 sentence_mask, patch_mask, arg_i2t, arg_t2i, inv_p if normalize else None,
                                 inv_s if normalize else None, need_p, need_s, tile_elements)
    return (grad_p if need_p else None, grad_s if need_s else None, None, None, None, None, None, None, None)


chunked_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_sentence_scores_chunked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor],
    patch_mask: Optional[torch.Tensor],
    options: ScoresOptions,
    tile_elements: int = TILE_ELEMENTS,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Tiled patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_scores``).

    Args:
        patches: [B, K, D]; sentences: [G, S, D] (any float dtype, same device, any strides).
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None.
        options: directions and normalisation (``precision`` and ``deterministic`` change nothing here: fp32
            matmuls are exact fp32 and this path has no atomics).
        tile_elements: K*S similarity cells per tile (memory per tile vs per-tile overhead).

    Returns:
        (i2t [B, G], t2i [B, G]), None for a direction not asked for; float32 for half inputs, else the
        input dtype.
    """
    keep_idx = torch.is_grad_enabled() and (patches.requires_grad or sentences.requires_grad)
    i2t, t2i, _, _, _, _ = chunked_fwd(patches, sentences, sentence_mask, patch_mask, options.do_i2t, options.do_t2i,
                                       options.normalize, keep_idx, int(tile_elements))
    return (i2t if options.do_i2t else None), (t2i if options.do_t2i else None)


IMPL = Impl(
    name="chunked",
    fn=patch_sentence_scores_chunked,
    devices=("cpu", "cuda", "mps", "xpu"),
    dtypes=_checks.FLOAT_DTYPES,
)
