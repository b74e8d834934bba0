"""``impl="chunked"`` for optimal-transport patch-sentence scores: pure PyTorch, tiled, memory-lean.

The [B, G, K, S] similarity grid is produced one tile of (image block, report block) at a time; each tile runs
its Sinkhorn iterations while it is in cache, writes its scores and keeps only the potentials f [B, G, K] and
g [B, G, S]. Peak extra memory is O(B*G*(K + S)) plus a few tiles instead of several B*G*K*S grids. The
backward recomputes each similarity tile and the plan P = exp(f + g + sim / eps) from the potentials and
applies the envelope gradient dsim = w * P with two matmuls (see ``kernels/patch_sentence_ot/backward.py``
for the derivation).

Iterations. The same iterates as the log-domain reference (``mlip_fast.reference.patch_sentence_ot``),
computed in the stabilised scaling form (Schmitzer 2019, POT's ``sinkhorn_stabilized``): the tile holds the
current plan kern = exp(f + g + sim / eps), from f = g = 0 when exp(sim / eps) cannot overflow (else after a first
log-domain iteration), and each half-step updates a linear scaling instead of a potential,

    v_q <- b_q / sum_p kern_pq u_p        (g = g_abs + log v)
    u_p <- a_p / sum_q kern_pq v_q        (f = f_abs + log u)

which is two batched vector-matrix products over the tile (``bmm`` of a row vector with kern for v, with kern's
transpose for u, kept beside it: each reads its layout along rows; at [455, 48, 12] on this project's CPU machine
2.5x and more faster than a multiply into a buffer and a sum) instead of two exp passes and three more for the
logsumexp. Pairs narrower than ATen's naive-loop bmm threshold run with dead sentence columns (BMM_MIN_CELLS).
When a new scaling leaves [exp(-ABSORB_AT), exp(ABSORB_AT)] (or a row or column of kern underflowed), that
half-step is redone in the log domain and the scalings are absorbed into the potentials (kern recomputed), so
the numbers stay those of the log-domain iteration for any eps: entries of kern that underflow carry at most
exp(-87 + 2 * ABSORB_AT) of mass in fp32. Runs on any device and dtype (iterations in fp32, or fp64 for fp64);
on an accelerator (the fallback for pairs above the Triton tile) each absorption check is a host synchronisation.
fp32 tiles on CPU run these iterations, their absorptions (per lane group of 16 pairs) and the plan's exp in a C
kernel (``kernels/patch_sentence_ot/sinkhorn_cpu.c``, in L1) when it builds, and on the loop below when it does not;
on small grids whose tiles hold whole image rows its buffers are made once for all B G pairs (``PairSinkhorn``).

Normalisation (``normalize=True``, what the local loss uses): the op takes raw embeddings and scores their unit
rows, made exactly as ``mlip_fast.reference.patch_sentence.unit_rows`` makes them (padded rows zeroed, then
x / max(||x||, 1e-12), norms in fp32): the sentences' once ([G, S, D], small), each image block's per tile, so no
normalised copy of the patches is held; the backward maps the gradients w.r.t. the unit rows back to the raw
rows in row blocks, with the elementary steps autograd would take through ``unit_rows``. fp32 / fp64 scores and
gradients are therefore bitwise those of normalising first (tested).

Padding never matters: the forward sets every entry that is not live to DEAD after the GEMM, and the backward
zeroes the operands' padded rows before recomputing the tiles, so NaN / Inf stored there reach neither a score
nor a gradient (padded rows get gradient 0). Forward and backward are ``torch.library`` custom ops
(``mlip_fast::patch_sentence_ot_chunked_fwd`` / ``_bwd``) with fake impls: torch.compile traces the op whole.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from mlip_fast import _checks
from mlip_fast.constants import DEFAULT_OT_EPS, DEFAULT_OT_ITERS
from mlip_fast.kernels.patch_sentence_ot import cpu as cpu_kernel
from mlip_fast.ops.dispatch import Impl
from mlip_fast.reference.patch_sentence import row_norms, score_dtype, unit_rows_backward_, unit_rows_from_norms
from mlip_fast.reference.patch_sentence_ot import DEAD, log_marginals

# Elements of one similarity tile: 2**18 fp32 values (1 MiB) keep a tile and its work buffers in cache.
TILE_ELEMENTS = 2**18
# Largest |log scaling| kept in the linear domain before it is absorbed into the potentials.
ABSORB_AT = 16.0
# Largest sim / eps of a tile for which the iterations start in the scaling form from kern = exp(sim / eps); above
# it the first iteration runs in the log domain. Unit vectors at eps >= 1/32 always start linear (|sim| <= 1).
LINEAR_START_AT = 32.0
# ATen's CPU bmm runs products with contraction x rows x columns < 400 in a naive loop instead of its BLAS (0.7-1.6
# against 0.16-0.25 ns per kern element on this project's CPU machine): the PyTorch loop's narrower pairs get dead
# sentence columns up to BMM_MIN_CELLS (exact zeros in every product), as long as that at most triples the tile.
BMM_MIN_CELLS = 400
MAX_WIDENING = 3
# fp32 on CPU with tiles of whole image rows: the C kernel's buffers made once for all pairs and tiles of up to
PAIR_TILES = 8  # times tile_elements cells (fewer calls; the kernel works on 16 pairs at a time); 0: tile by tile


def _run_width(K: int, S: int) -> int:
    """S, or the least width with K * width >= BMM_MIN_CELLS when that is at most MAX_WIDENING * S."""
    if K * S == 0 or K * S >= BMM_MIN_CELLS:
        return S
    wide = -(-BMM_MIN_CELLS // K)
    return wide if wide <= MAX_WIDENING * S else S


def _tiles(B: int, K: int, G: int, S: int, tile_elements: int):
    """(image slice, report slice) covering [B] x [G], at most ``tile_elements`` K*S cells each (or one pair)."""
    per_pair = K * S
    g_block = max(1, min(G, tile_elements // per_pair))
    b_block = max(1, min(B, tile_elements // (per_pair * g_block)))
    for b0 in range(0, B, b_block):
        for g0 in range(0, G, g_block):
            yield slice(b0, min(b0 + b_block, B)), slice(g0, min(g0 + g_block, G))


def _log_update(shifted: torch.Tensor, dim: int, log_marginal: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """One log-domain half-step: log m - logsumexp(shifted, dim), DEAD where not live."""
    return torch.where(live, log_marginal - torch.logsumexp(shifted, dim=dim), torch.full_like(log_marginal, DEAD))


class _TileSinkhorn:
    """Sinkhorn on one tile of N pairs: z [N, K, S] = sim / eps (DEAD off the live entries)."""

    def __init__(self, z, live_p, live_q, tol, absorb_at):
        self.z, self.live_p, self.live_q, self.tol = z, live_p, live_q, tol
        dtype = z.dtype
        self.tiny = torch.finfo(dtype).tiny
        self.hi, self.lo = math.exp(absorb_at), math.exp(-absorb_at)
        self.log_a, self.log_b = log_marginals(live_p, dtype), log_marginals(live_q, dtype)  # [N, K], [N, S]
        # Linear marginals with ``tiny`` in place of 0: a dead entry's kern row / column is 0, clamped to tiny,
        # so its scaling is tiny / tiny = 1 and never triggers an absorption.
        self.a = self.log_a.exp().clamp_min(self.tiny)[:, :, None]
        self.b = self.log_b.exp().clamp_min(self.tiny)[:, None, :]
        self.active = None if tol is None else torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
        self.buf = torch.empty_like(z)

    def g_log(self, f):
        return _log_update(torch.add(f[:, :, None], self.z, out=self.buf), 1, self.log_b, self.live_q)

    def f_log(self, g):
        return _log_update(torch.add(g[:, None, :], self.z, out=self.buf), 2, self.log_a, self.live_p)

    def absorb(self, f, g):
        """The plan of potentials (f, g) as the new kern [N, K, S] and its transpose [N, S, K] (each product
        reads the layout whose rows run along the summed axis), with unit scalings; f = g = None: exp(z)."""
        kern = self.z.exp() if f is None else torch.add(f[:, :, None], g[:, None, :]).add_(self.z).exp_()
        return kern, kern.transpose(1, 2).contiguous(), torch.ones_like(self.a), torch.ones_like(self.b)

    def _moderate(self, x) -> bool:
        lo, hi = torch.aminmax(x)
        return self.lo <= lo.item() and hi.item() <= self.hi  # NaN fails both

    def _keep_frozen(self, new, old):
        return new if self.active is None else torch.where(self.active.view(-1, *[1] * (new.ndim - 1)), new, old)

    def run(self, n_iter: int, bound: float):
        """(f [N, K], g [N, S], score [N]) after ``n_iter`` iterations (or each pair's convergence); ``bound``:
        an upper bound of z's live entries known beforehand (inf if none), which spares the pass for z's max."""
        z = self.z
        if bound <= LINEAR_START_AT or z.amax().item() <= LINEAR_START_AT:
            # kern = exp(z) cannot overflow: start in the scaling form from f = g = 0, u = v = 1 (the first
            # iteration's v and u are then exp of the log-domain iteration's g and f); fp32 on CPU: the C kernel
            done = None if self.active is not None else cpu_kernel.sinkhorn(
                z, self.live_p, self.live_q, self.log_a, self.log_b, n_iter, self.lo, self.hi)
            if done is not None:
                return done
            f, g = torch.zeros_like(self.log_a), torch.zeros_like(self.log_b)
            kern, kern_t, u, v = self.absorb(None, None)
            first = 0
        else:
            f = torch.where(self.live_p, torch.zeros((), dtype=z.dtype, device=z.device),
                            torch.full_like(self.log_a, DEAD))
            g = self.g_log(f)
            f = self.f_log(g)
            kern, kern_t, u, v = self.absorb(f, g)
            first = 1
        for it in range(first, n_iter):
            col = torch.bmm(u.transpose(1, 2), kern)  # [N, 1, S]
            v_new = torch.div(self.b, col.clamp_min_(self.tiny))
            if self.active is not None and it > 0:  # as the reference: no check before a whole iteration
                # L1 violation of the sentence marginal by the current plan: sum_q |v_q col_q - b_q|
                self.active &= (v * col - self.b).abs().sum((1, 2)) > self.tol
                if not bool(self.active.any()):
                    break
                v_new = self._keep_frozen(v_new, v)
            if self._moderate(v_new):
                v = v_new
            else:  # redo the sentence update in the log domain and absorb the scalings
                f = f + u[:, :, 0].log()
                g = self._keep_frozen(self.g_log(f), g + v[:, 0].log())
                kern, kern_t, u, v = self.absorb(f, g)
            row = torch.bmm(v, kern_t).transpose(1, 2)  # [N, K, 1]
            u_new = self._keep_frozen(torch.div(self.a, row.clamp_min_(self.tiny)), u)
            if self._moderate(u_new):
                u = u_new
            else:  # redo the patch update in the log domain and absorb the scalings
                g = g + v[:, 0].log()
                f = self._keep_frozen(self.f_log(g), f + u[:, :, 0].log())
                kern, kern_t, u, v = self.absorb(f, g)
        # score = sum_pq u_p kern_pq v_q sim_pq, with sim = z * eps on the live entries (kern is 0 elsewhere)
        weighted = torch.bmm(torch.mul(kern, z, out=self.buf), v.transpose(1, 2))  # [N, K, 1]
        return f + u[:, :, 0].log(), g + v[:, 0].log(), (weighted * u).sum((1, 2))


def _sim_tile(p_blk, sent_flat, gs, S, work):
    """[bc * K, gc * S] similarities of a tile (image block ``p_blk`` [bc, K, D]), computed in the input dtype (as
    the reference grid), widened."""
    return (p_blk.flatten(0, 1) @ sent_flat[gs.start * S: gs.stop * S].T).to(work)


def _zero_padded(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``x`` [N, L, D] with the rows of invalid entries zeroed (a copy only when there is padding)."""
    return x if bool(valid.all()) else x.masked_fill(~valid[..., None], 0)


class _ImageBlocks:
    """The image block [bc, K, D] a tile multiplies: ``patches[bs]`` as given, or with ``norm_p`` its unit rows,
    made once per block (the tiles of one block follow each other)."""

    def __init__(self, patches, patch_mask, norm_p):
        self.patches, self.patch_mask, self.norm_p = patches, patch_mask, norm_p
        self.start, self.block = None, None

    def __getitem__(self, bs: slice) -> torch.Tensor:
        if self.norm_p is None:
            return self.patches[bs]
        if bs.start != self.start:
            self.start, self.block = bs.start, None  # drop the last block before making the next
            self.block = unit_rows_from_norms(self.patches[bs], self.patch_mask[bs], self.norm_p[bs])
        return self.block


# The forward and backward are torch.library custom ops (with fake impls), so torch.compile traces the op as one
# node instead of breaking its graph on the tile loop and the data-dependent absorption checks inside.
@torch.library.custom_op("mlip_fast::patch_sentence_ot_chunked_fwd", mutates_args=())
def chunked_fwd(patches: torch.Tensor, sentences: torch.Tensor, sentence_mask: torch.Tensor, patch_mask: torch.Tensor,
                eps: float, n_iter: int, tol: Optional[float], tile_elements: int, absorb_at: float, normalize: bool,
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tiled forward: (scores [B, G], f [B, G, K], g [B, G, S]) in ``score_dtype``, potentials -inf where not
    live. Masks are bool and given (the wrapper fills in all-valid ones). Padded entries are DEAD in every tile
    whatever the GEMM gave there, so NaN / Inf stored in them never reach a score or a potential. ``normalize``:
    the sentences' unit rows are made once ([G, S, D]), each image block's per tile; no [B, K, D] copy."""
    B, K, D = patches.shape
    G, S_in, _ = sentences.shape
    device, work = patches.device, score_dtype(patches.dtype)
    norm_p = row_norms(patches, patch_mask, work) if normalize else None
    if normalize:
        sentences = unit_rows_from_norms(sentences, sentence_mask, row_norms(sentences, sentence_mask, work))
    S = S_in if tol is None and cpu_kernel.runs(device, work) else _run_width(K, S_in)  # C: no widening needed
    if S > S_in:  # dead sentence columns (zero rows, masked) up to BLAS's width: see BMM_MIN_CELLS
        sentences = torch.cat([sentences, sentences.new_zeros(G, S - S_in, D)], 1)
        sentence_mask = torch.cat([sentence_mask, sentence_mask.new_zeros(G, S - S_in)], 1)
    has_p, has_s = patch_mask.any(1), sentence_mask.any(1)
    # which sides have dead entries at all (a padded row, or a partner without any), and the largest sim / eps
    # of valid rows (Cauchy-Schwarz on their norms: unit vectors give 1 / eps, so no tile needs its own max)
    dead_p = not (bool(patch_mask.all()) and bool(has_s.all()))
    dead_q = not (bool(sentence_mask.all()) and bool(has_p.all()))
    if normalize:  # unit rows: |sim| <= 1 up to rounding
        bound = (1 + 1e-5) / eps
    else:
        norm_s = row_norms(sentences, sentence_mask, work)
        bound = float(row_norms(patches, patch_mask, work).amax() * norm_s.amax()) / eps if B * K and G * S else 0.0
    sent_flat, neg_inf = sentences.reshape(G * S, D), float("-inf")
    blocks = _ImageBlocks(patches, patch_mask, norm_p)
    if PAIR_TILES and tol is None and bound <= LINEAR_START_AT and cpu_kernel.runs(device, work) and \
            0 < G * K * S <= tile_elements and B * G * (K + S) <= tile_elements:
        # small grids (the pair buffers, ~8 x B G (K + S) floats, within a few tiles): tiles of whole image rows
        # rounded up to whole lane groups of pairs b G + g; the C kernel forms z from each GEMM tile and iterates
        live_p = (patch_mask[:, None, :] & has_s[None, :, None]).reshape(B * G, K)
        live_q = (sentence_mask[None, :, :] & has_p[:, None, None]).reshape(B * G, S)
        pairs = cpu_kernel.PairSinkhorn(live_p, live_q, log_marginals(live_p, work), log_marginals(live_q, work),
                                        n_iter, math.exp(-absorb_at), math.exp(absorb_at))
        rows = cpu_kernel.LANES // math.gcd(G, cpu_kernel.LANES)
        step = -(-(PAIR_TILES * tile_elements // (G * K * S)) // rows) * rows
        for b0 in range(0, B, step):
            bs = slice(b0, min(b0 + step, B))
            pairs.tile(b0 * G, _sim_tile(blocks[bs], sent_flat, slice(0, G), S, work).view(-1, K, G, S), eps)
        f, g, score = pairs.result()
        return (score.view(B, G).mul_(eps), f.masked_fill_(~live_p, neg_inf).view(B, G, K),
                g.masked_fill_(~live_q, neg_inf).view(B, G, S))
    scores, f_all, g_all = (torch.empty(B, G, *n, dtype=work, device=device) for n in ((), (K,), (S,)))
    for bs, gs in _tiles(B, K, G, S, tile_elements):
        bc, gc = bs.stop - bs.start, gs.stop - gs.start
        sim = _sim_tile(blocks[bs], sent_flat, gs, S, work).view(bc, K, gc, S)
        live_p = (patch_mask[bs, None, :] & has_s[None, gs, None]).reshape(bc * gc, K)
        live_q = (sentence_mask[None, gs, :] & has_p[bs, None, None]).reshape(bc * gc, S)
        # [b, p, g, q] -> [b, g, p, q] divided by eps: one pass, then every pair's K x S block is contiguous
        z = (cpu_kernel.workspace("z", (bc * gc, K, S), work) if device.type == "cpu"  # reused: no page faults
             else torch.empty(bc * gc, K, S, dtype=work, device=device))
        torch.div(sim.transpose(1, 2), eps, out=z.view(bc, gc, K, S))
        if dead_p:  # DEAD on the entries of dead rows and columns, each side broadcast (skipped when none)
            z.masked_fill_(~live_p[:, :, None], DEAD)
        if dead_q:
            z.masked_fill_(~live_q[:, None, :], DEAD)
        f, g, score = _TileSinkhorn(z, live_p, live_q, tol, absorb_at).run(n_iter, bound)
        scores[bs, gs] = score.view(bc, gc).mul_(eps)
        f_all[bs, gs] = f.masked_fill_(~live_p, neg_inf).view(bc, gc, K)
        g_all[bs, gs] = g.masked_fill_(~live_q, neg_inf).view(bc, gc, S)
    return scores, f_all, g_all if S == S_in else g_all[..., :S_in].contiguous()


@chunked_fwd.register_fake
def _(patches, sentences, sentence_mask, patch_mask, eps, n_iter, tol, tile_elements, absorb_at, normalize):
    (B, K, _), (G, S, _) = patches.shape, sentences.shape
    work = dict(dtype=score_dtype(patches.dtype))
    return patches.new_empty((B, G), **work), patches.new_empty((B, G, K), **work), patches.new_empty((B, G, S), **work)


@torch.library.custom_op("mlip_fast::patch_sentence_ot_chunked_bwd", mutates_args=())
def chunked_bwd(
    grad_scores: torch.Tensor,
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: torch.Tensor,
    patch_mask: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    need_p: bool,
    need_s: bool,
    tile_elements: int,
    normalize: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Envelope backward from the potentials: (grad_patches [B, K, D], grad_sentences [G, S, D]) in the input
    dtype (empty for a side not needed).

    The operands' padded rows are zeroed first: their similarities are then finite, so the plan there is exactly
    exp(-inf) = 0, and the products never multiply a NaN / Inf they held by that 0. Padded rows get gradient 0.
    ``normalize``: the forward scored the unit rows; they are remade as there (the sentences once, each image
    block per tile) and the gradients w.r.t. them mapped back to the raw rows at the end, in place."""
    B, K, D = patches.shape
    G, S, _ = sentences.shape
    device, work = patches.device, score_dtype(patches.dtype)
    w = grad_scores.to(work)
    if normalize:
        norm_p, norm_s = row_norms(patches, patch_mask, work), row_norms(sentences, sentence_mask, work)
        sent_flat = unit_rows_from_norms(sentences, sentence_mask, norm_s).reshape(G * S, D)
        blocks = _ImageBlocks(patches, patch_mask, norm_p)
    else:
        blocks = _ImageBlocks(_zero_padded(patches, patch_mask), patch_mask, None)
        sent_flat = _zero_padded(sentences, sentence_mask).reshape(G * S, D)
    # Gradients are accumulated in the score dtype (fp32 for half inputs) and cast back once.
    grad_p = torch.zeros(B, K, D, dtype=work, device=device) if need_p else None
    grad_s = torch.zeros(G * S, D, dtype=work, device=device) if need_s else None
    for bs, gs in _tiles(B, K, G, S, tile_elements):
        bc, gc = bs.stop - bs.start, gs.stop - gs.start
        rows = slice(gs.start * S, gs.stop * S)
        # M[b, p, g, q] = w[b, g] exp(f[b, g, p] + g[b, g, q] + sim / eps), built in place in the
        # [b, p, g, q] layout of the similarity tile (-inf potentials give exactly 0)
        p_blk = blocks[bs]
        m = _sim_tile(p_blk, sent_flat, gs, S, work).view(bc, K, gc, S)
        if not cpu_kernel.plan_(m, f[bs, gs], g[bs, gs], w[bs, gs], eps):  # fp32 on CPU: one pass in C
            m.div_(eps).add_(f[bs, gs].transpose(1, 2)[..., None]).add_(g[bs, gs][:, None])
            m.exp_().mul_(w[bs, gs][:, None, :, None])
        m = m.view(bc * K, gc * S)
        if need_p:
            grad_p[bs].view(bc * K, D).addmm_(m, sent_flat[rows].to(work))
        if need_s:
            grad_s[rows].addmm_(m.T, p_blk.flatten(0, 1).to(work))
    m = p_blk = blocks = None  # the last tile freed before the normalisation's backward
    if normalize and need_p:
        unit_rows_backward_(grad_p.view(B * K, D), patches.reshape(B * K, D), patch_mask.reshape(-1), norm_p.view(-1))
    if normalize and need_s:
        unit_rows_backward_(grad_s, sentences.reshape(G * S, D), sentence_mask.reshape(-1), norm_s.view(-1))
    empty = patches.new_empty((0,))
    return (grad_p.to(patches.dtype) if need_p else empty,
            grad_s.view(G, S, D).to(sentences.dtype) if need_s else empty.clone())


@chunked_bwd.register_fake
def _(grad_scores, patches, sentences, sentence_mask, patch_mask, f, g, eps, need_p, need_s, tile_elements,
      normalize):
    return (torch.empty_like(patches) if need_p else patches.new_empty((0,)),
            torch.empty_like(sentences) if need_s else patches.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    patches, sentences, sentence_mask, patch_mask, eps, _, _, tile_elements, _, normalize = inputs
    _, f, g = output
    ctx.save_for_backward(patches, sentences, sentence_mask, patch_mask, f, g)
    ctx.eps, ctx.tile_elements, ctx.normalize = eps, tile_elements, normalize
    # the potentials are outputs no caller differentiates: their gradients arrive as None instead of zeros of
    # [B, G, K] and [B, G, S] (at PERF.md's CPU shape 7.1 MiB, the op's largest buffer after the saved f)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_scores, _grad_f, _grad_g):
    patches, sentences, sentence_mask, patch_mask, f, g = ctx.saved_tensors
    need_p, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if grad_scores is None:  # only the potentials were used downstream: they carry no gradient
        grad_scores = torch.zeros_like(f[..., 0])
    grad_p, grad_s = chunked_bwd(grad_scores, patches, sentences, sentence_mask, patch_mask, f, g, ctx.eps, need_p,
                                 need_s, ctx.tile_elements, ctx.normalize)
    return (grad_p if need_p else None, grad_s if need_s else None) + (None,) * 8


chunked_fwd.register_autograd(_backward, setup_context=_setup_context)


def patch_sentence_ot_scores_chunked(
    patches: torch.Tensor,
    sentences: torch.Tensor,
    sentence_mask: Optional[torch.Tensor] = None,
    patch_mask: Optional[torch.Tensor] = None,
    eps: float = DEFAULT_OT_EPS,
    n_iter: int = DEFAULT_OT_ITERS,
    tol: Optional[float] = None,
    tile_elements: int = TILE_ELEMENTS,
    absorb_at: float = ABSORB_AT,
    normalize: bool = False,
) -> torch.Tensor:
    """Tiled OT patch-sentence scores (same contract as ``mlip_fast.ops.patch_sentence_ot_scores``).

    Args:
        patches: [B, K, D]; sentences: [G, S, D] (any float dtype, same device).
        sentence_mask: [G, S] bool (True = valid) or None; patch_mask: [B, K] bool or None.
        eps, n_iter, tol: as in ``mlip_fast.reference.patch_sentence_ot``.
        tile_elements: K*S similarity cells per tile (memory per tile vs per-op overhead).
        absorb_at: largest |log scaling| kept in the linear domain (tests lower it to force absorptions).
        normalize: score the rows' unit vectors (padded rows zeroed, x / max(||x||, 1e-12)) without holding a
            normalised copy of the patches; gradients w.r.t. the raw rows, bitwise those of normalising first
            with ``unit_rows`` through autograd (fp32 / fp64).

    Returns:
        [B, G] scores, float32 for half inputs, else the input dtype; envelope gradient (plan constant).
    """
    B, K, _ = patches.shape
    G, S, _ = sentences.shape
    if sentence_mask is None:
        sentence_mask = torch.ones(G, S, dtype=torch.bool, device=patches.device)
    if patch_mask is None:
        patch_mask = torch.ones(B, K, dtype=torch.bool, device=patches.device)
    scores, _, _ = chunked_fwd(patches, sentences, sentence_mask, patch_mask, float(eps), int(n_iter),
                               None if tol is None else float(tol), int(tile_elements), float(absorb_at),
                               bool(normalize))
    return scores


IMPL = Impl(
    name="chunked",
    fn=patch_sentence_ot_scores_chunked,
    devices=("cpu", "cuda", "mps", "xpu"),
    dtypes=_checks.FLOAT_DTYPES,
    detail=lambda inputs: {"sinkhorn": cpu_kernel.status(inputs["dtype"])} if inputs["device"].type == "cpu" else {},
)
