"""Fused patch-sentence impls (triton under the interpreter on CPU, chunked) against a float64 grid.

The reference here is written independently of ``mlip_fast.reference``: an explicit einsum grid in
float64 with masked max / mean, differentiated by autograd. Tolerances:
- fp32 inputs: 1e-5 of the output's scale (fp32 rounding over D <= 150 terms is ~1e-6 relative).
- fp16 / bf16 inputs: at most 2x the error of PyTorch's own same-dtype grid computation (flash-attention's
  rule), plus 1e-6 of scale for baselines that happen to be exact.
Half-precision cases use inputs whose top-2 similarities are separated by more than half-precision rounding,
(0.006 of the similarity scale, 3x bf16 rounding), so every implementation picks the same argmax and
gradients are comparable.
"""
import pytest
import torch

from mlip_fast.ops import ImplUnavailableError, patch_sentence_scores
from mlip_fast.ops.patch_sentence import ScoresOptions
from mlip_fast.ops.patch_sentence.chunked import patch_sentence_scores_chunked

IMPLS = ["triton", "chunked"]
NEG_INF = float("-inf")


def grid_scores(p, s, smask, pmask, directions="both", out_dtype=None):
    """Scores through the full [B, G, K, S] grid computed in the inputs' dtype (float64 for the reference,
    half for PyTorch's own same-dtype baseline), reduced in ``out_dtype``."""
    B, K, _ = p.shape
    G, S, _ = s.shape
    out_dtype = out_dtype or torch.promote_types(p.dtype, torch.float32)
    smask = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
    pmask = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
    sim = torch.einsum("bkd,gsd->bgks", p, s).to(out_dtype)
    pair = pmask.any(1)[:, None] & smask.any(1)[None, :]  # [B, G]: both sides non-empty
    i2t = t2i = None
    if directions in ("both", "i2t"):
        best = sim.masked_fill(~smask[None, :, None, :], NEG_INF).amax(-1)  # [B, G, K]
        keep = pmask[:, None, :] & pair[:, :, None]
        i2t = torch.where(keep, best, 0).sum(-1) / pmask.sum(1).clamp(min=1)[:, None]
    if directions in ("both", "t2i"):
        best = sim.masked_fill(~pmask[:, None, :, None], NEG_INF).amax(-2)  # [B, G, S]
        keep = smask[None] & pair[:, :, None]
        t2i = torch.where(keep, best, 0).sum(-1) / smask.sum(1).clamp(min=1)[None, :]
    return i2t, t2i


def run(fn, p, s, smask, pmask, directions, gi, gt):
    """Scores and input gradients for upstream gradients (gi, gt)."""
    p = p.detach().clone().requires_grad_()
    s = s.detach().clone().requires_grad_()
    i2t, t2i = fn(p, s, smask, pmask, directions)
    outs = [o for o in (i2t, t2i) if o is not None]
    loss = sum((o.double() * g).sum() for o, g in zip((i2t, t2i), (gi, gt)) if o is not None)
    dp, ds = torch.autograd.grad(loss, (p, s))
    return outs, dp, ds


def fused(impl, **kw):
    return lambda p, s, sm, pm, d: patch_sentence_scores(p, s, sm, pm, directions=d, impl=impl, **kw)


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12)).item()


def make_case(B, G, K, S, D, *, masked, seed, dtype=torch.float32, negative=False, min_gap=0.0):
    """Inputs (rounded to ``dtype``) and masks; with ``min_gap`` > 0, redraws until every max of the grid
    (both directions) beats the runner-up by ``min_gap`` times the similarity scale."""
    for attempt in range(200):
        gen = torch.Generator().manual_seed(seed * 1000 + attempt)
        p = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
        s = torch.randn(G, S, D, generator=gen, dtype=torch.float64)
        if negative:  # every similarity negative
            p, s = p.abs() + 0.1, -(s.abs() + 0.1)
        smask = pmask = None
        if masked:
            smask = torch.rand(G, S, generator=gen) > 0.35
            smask[:, 0] |= ~smask.any(1)
            if G > 2:
                smask[1] = False  # a fully padded report between ...
                smask[2] = True  # ... a full one
            pmask = torch.rand(B, K, generator=gen) > 0.25
            pmask[:, 0] |= ~pmask.any(1)
            s = s.masked_fill(~smask[..., None], 0.0)  # padded sentences at similarity 0 must still lose
        p, s = p.to(dtype), s.to(dtype)
        if min_gap == 0.0 or _gaps_ok(p, s, smask, pmask, min_gap):
            return p, s, smask, pmask
    raise AssertionError("could not draw well-separated inputs")


def _gaps_ok(p, s, smask, pmask, min_gap):
    sim = torch.einsum("bkd,gsd->bgks", p.double(), s.double())
    B, G, K, S = sim.shape
    sm = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
    pm = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
    scale = sim.abs().max()
    directions = (
        (sim, sm[None, :, None, :], pm[:, None, :]),  # i2t: per valid patch over sentences
        (sim.transpose(-1, -2), pm[:, None, None, :], sm[None, :, :]),  # t2i: per valid sentence over patches
    )
    for grid, inner, outer in directions:
        if grid.shape[-1] < 2:
            continue
        top2 = grid.masked_fill(~inner, NEG_INF).topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1])[outer.expand(top2.shape[:-1])]
        if (gap[torch.isfinite(gap)] < min_gap * scale).any():
            return False
    return True


CASES = [  # B, G, K, S, D, masked, negative
    (3, 5, 7, 3, 33, True, False),  # odd sizes, ragged reports, a fully padded report next to a full one
    (2, 3, 1, 1, 16, False, False),  # K = 1, S = 1
    (2, 4, 1, 5, 33, True, False),  # K = 1 with masks
    (4, 2, 70, 5, 20, True, False),  # K over one patch chunk: t2i running max across chunks, B != G
    (2, 3, 6, 17, 150, True, False),  # S not a power of two, D over one D chunk
    (3, 4, 9, 4, 24, True, True),  # all similarities negative, padding at 0 never wins
    (2, 3, 20, 70, 24, True, False),  # reports longer than one tile: several sentence chunks per report
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,G,K,S,D,masked,negative", CASES)
def test_fp32_matches_fp64_grid(impl, B, G, K, S, D, masked, negative):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=masked, seed=B + 7 * K + S, negative=negative)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    ref_out, ref_dp, ref_ds = run(grid_scores, p.double(), s.double(), smask, pmask, "both", gi, gt)
    out, dp, ds = run(fused(impl), p, s, smask, pmask, "both", gi, gt)
    assert all(o.dtype == torch.float32 for o in out) and dp.dtype == ds.dtype == torch.float32
    for o, r in zip(out, ref_out):
        assert rel_err(o, r) < 1e-5
    assert rel_err(dp, ref_dp) < 1e-5
    assert rel_err(ds, ref_ds) < 1e-5
    if negative:
        pair = (pmask.any(1)[:, None] & smask.any(1)[None, :]) if masked else torch.ones(B, G, dtype=torch.bool)
        assert all((o[pair] < 0).all() for o in out)
    if masked and G > 2:
        assert all((o[:, 1] == 0).all() for o in out)  # the fully padded report scores 0 ...
        assert (ds[1] == 0).all()  # ... and gets no gradient


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("directions", ["i2t", "t2i"])
def test_one_direction(impl, directions):
    B, G, K, S, D = 3, 4, 6, 3, 20
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=11)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    i2t, t2i = patch_sentence_scores(p, s, smask, pmask, directions=directions, impl=impl)
    assert (i2t is None) == (directions == "t2i") and (t2i is None) == (directions == "i2t")
    ref_out, ref_dp, ref_ds = run(grid_scores, p.double(), s.double(), smask, pmask, directions, gi, gt)
    out, dp, ds = run(fused(impl), p, s, smask, pmask, directions, gi, gt)
    assert rel_err(out[0], ref_out[0]) < 1e-5
    assert rel_err(dp, ref_dp) < 1e-5
    assert rel_err(ds, ref_ds) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,G,K,S,D", [(3, 5, 7, 3, 33), (2, 3, 1, 1, 16), (3, 2, 9, 5, 40)])
def test_half_within_twice_torch_error(impl, dtype, B, G, K, S, D):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=3 * B + K, dtype=dtype, min_gap=0.006)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    ref_out, ref_dp, ref_ds = run(grid_scores, p.double(), s.double(), smask, pmask, "both", gi, gt)
    base_out, base_dp, base_ds = run(grid_scores, p, s, smask, pmask, "both", gi, gt)
    out, dp, ds = run(fused(impl), p, s, smask, pmask, "both", gi, gt)
    assert all(o.dtype == torch.float32 for o in out) and dp.dtype == ds.dtype == dtype
    for x, base, ref in [*zip(out, base_out, ref_out), (dp, base_dp, ref_dp), (ds, base_ds, ref_ds)]:
        assert rel_err(x, ref) <= 2 * rel_err(base, ref) + 1e-6


@pytest.mark.parametrize("tile_elements", [1, 40, 10**6])
def test_chunked_tiling_over_images_and_reports(tile_elements):
    # 1: one (image, report) pair per tile; 40: several reports, one image; 1e6: everything in one tile.
    B, G, K, S, D = 3, 5, 4, 3, 12
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=5, dtype=torch.float64)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    ref_out, ref_dp, ref_ds = run(grid_scores, p, s, smask, pmask, "both", gi, gt)

    def chunked(p, s, sm, pm, d):
        return patch_sentence_scores_chunked(p, s, sm, pm, ScoresOptions(d), tile_elements=tile_elements)

    out, dp, ds = run(chunked, p, s, smask, pmask, "both", gi, gt)
    for o, r in zip(out, ref_out):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dp, ref_dp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ds, ref_ds, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic_backward_is_bitwise_reproducible(impl):
    B, G, K, S, D = 4, 6, 10, 4, 24
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=9)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    first = run(fused(impl, deterministic=True), p, s, smask, pmask, "both", gi, gt)
    second = run(fused(impl, deterministic=True), p, s, smask, pmask, "both", gi, gt)
    for a, b in zip([*first[0], first[1], first[2]], [*second[0], second[1], second[2]]):
        assert torch.equal(a, b)


def _check_argmax(p, s, smask, pmask, arg_i2t, arg_t2i):
    """Every saved index names a maximum (first one on ties: strictly greater than every earlier value)."""
    B, K, _ = p.shape
    G, S, _ = s.shape
    sim = torch.einsum("bkd,gsd->bgks", p.double(), s.double())
    for b in range(B):
        for g in range(G):
            vp, vq = pmask[b].nonzero().flatten(), smask[g].nonzero().flatten()
            for k in range(K):
                a = int(arg_i2t[b, g, k])
                if k not in vp.tolist() or len(vq) == 0:
                    assert a == -1
                else:
                    assert a in vq.tolist() and sim[b, g, k, a] == sim[b, g, k, vq].max()
            for q in range(S):
                c = int(arg_t2i[b, g, q])
                if q not in vq.tolist():
                    assert c == -1
                else:
                    assert c in vp.tolist() and sim[b, g, c, q] == sim[b, g, vp, q].max()


def test_triton_argmax_indices_point_at_the_maxima():
    from mlip_fast.kernels.patch_sentence import patch_sentence_fwd

    B, G, K, S, D = 2, 3, 5, 4, 16
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=2)
    _, _, arg_i2t, arg_t2i, _, _ = patch_sentence_fwd(p, s, smask, pmask)
    assert arg_i2t.dtype == arg_t2i.dtype == torch.int16
    _check_argmax(p, s, smask, pmask, arg_i2t, arg_t2i)


FWD_TILINGS = [  # (B, G, K, S, D, config): what the GPU configs do, at interpreter sizes
    (5, 3, 40, 5, 24, dict(IB=2, BN=16)),  # several images per program (last group partial), 3 patch chunks
    (3, 9, 7, 3, 20, dict(IB=1, GB=4)),  # several report blocks, one image per program
    (2, 3, 37, 40, 20, dict(GB=1, S_CH=16, LARGE_S=True, BN=16, IB=1)),  # 3 sentence x 3 patch chunks
    (3, 2, 37, 40, 20, dict(GB=1, S_CH=16, LARGE_S=True, BN=16, IB=2)),  # ... with a scratch row reused
]


@pytest.mark.parametrize("B,G,K,S,D,config", FWD_TILINGS)
def test_triton_forward_tilings_match_fp64(B, G, K, S, D, config):
    from mlip_fast.kernels.patch_sentence import patch_sentence_fwd

    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=K + S)
    i2t, t2i, arg_i2t, arg_t2i, _, _ = patch_sentence_fwd(p, s, smask, pmask, config=config)
    (ref_i2t, ref_t2i), _, _ = run(grid_scores, p.double(), s.double(), smask, pmask, "both",
                                   torch.zeros(B, G, dtype=torch.float64), torch.zeros(B, G, dtype=torch.float64))
    assert rel_err(i2t, ref_i2t) < 1e-5 and rel_err(t2i, ref_t2i) < 1e-5
    _check_argmax(p, s, smask, pmask, arg_i2t, arg_t2i)


def test_triton_limits_decline_with_reasons():
    big_s = torch.randn(1, 2**15, 16)
    with pytest.raises(ImplUnavailableError, match="int16"):
        patch_sentence_scores(torch.randn(1, 3, 16), big_s, impl="triton")


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_backward_split_over_programs(deterministic):
    # Split partial sums (atomics, or fixed-order buffers when deterministic) equal the unsplit backward.
    from mlip_fast.kernels.patch_sentence import patch_sentence_bwd, patch_sentence_fwd

    B, G, K, S, D = 3, 5, 40, 3, 20
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=6)
    gi, gt = torch.randn(B, G), torch.randn(B, G)
    _, _, arg_i2t, arg_t2i, _, _ = patch_sentence_fwd(p, s, smask, pmask)
    args = (gi, gt, p, s, arg_i2t, arg_t2i, smask, pmask, deterministic)
    one = patch_sentence_bwd(*args, split=1)
    three = patch_sentence_bwd(*args, split=3)
    for a, b in zip(one, three):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_explicit_triton_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p, s = torch.randn(2, 3, 8), torch.randn(2, 2, 8)
    with pytest.raises(ImplUnavailableError, match="triton.*CUDA.*TRITON_INTERPRET"):
        patch_sentence_scores(p, s, impl="triton")
    # auto still runs, on the chunked impl
    i2t, t2i = patch_sentence_scores(p, s, impl="auto")
    assert i2t.shape == t2i.shape == (2, 2)


def test_triton_refuses_float64_naming_the_dtype():
    p, s = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 2, 8, dtype=torch.float64)
    with pytest.raises(ImplUnavailableError, match="dtype float64"):
        patch_sentence_scores(p, s, impl="triton")


def test_custom_op_under_torch_compile():
    from mlip_fast.ops.patch_sentence.triton_impl import patch_sentence_scores_fwd

    B, G, K, S, D = 2, 3, 4, 3, 16
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=4)
    torch.library.opcheck(
        torch.ops.mlip_fast.patch_sentence_scores_fwd.default,
        (p, s, smask, pmask, True, True, False, False, False),
        test_utils=("test_schema", "test_faketensor"),
    )

    def loss_fn(p, s):
        i2t, t2i, _, _, _, _ = patch_sentence_scores_fwd(p, s, smask, pmask, True, True, False, False, False)
        return (i2t * 2 + t2i).sum()

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    pe, se = p.clone().requires_grad_(), s.clone().requires_grad_()
    pc, sc = p.clone().requires_grad_(), s.clone().requires_grad_()
    loss_fn(pe, se).backward()
    compiled(pc, sc).backward()
    torch.testing.assert_close(pc.grad, pe.grad, rtol=0, atol=0)
    torch.testing.assert_close(sc.grad, se.grad, rtol=0, atol=0)
