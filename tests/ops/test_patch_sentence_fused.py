"""Fused patch-sentence impls (triton under the interpreter on CPU, chunked) against a float64 grid.

The reference is written independently of ``mlip_fast.reference`` (``mlip_fast.testing.patch_sentence``: an
explicit einsum grid in float64 with masked max / mean, differentiated by autograd). Tolerances:
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
from mlip_fast.testing import assert_compiled_grads_equal
from mlip_fast.testing.patch_sentence import CASES, grid_scores, make_case, rel_err, run

IMPLS = ["triton", "chunked"]


def fused(impl, **kw):
    return lambda p, s, sm, pm, d: patch_sentence_scores(p, s, sm, pm, directions=d, impl=impl, **kw)


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

    assert_compiled_grads_equal(loss_fn, p, s)
