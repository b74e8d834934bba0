"""The persistent sm_90 forward (``kernels/patch_sentence/forward_v3.py``) in the interpreter, planned for an sm_90
target (``_target.OVERRIDE``): scores and argmax indices against an fp64 grid of the same half-precision inputs,
within the packed keys' stated bound (a maximum loses at most its low L = log2(16) + log2(BN) mantissa bits:
relative error below 2^(L - 23)); exact ties to the lowest index, also across patch tiles; NaN / Inf as in the
grid; the dispatch's reasons; and the backward through the op from the v3 indices (with the fused gradient
epilogue). Tiles are shrunk by config overrides (16 patches per tile, two images per program) so that tiny shapes
cover several patch tiles per image, partial report blocks and several programs per report block."""
import pytest
import torch

from mlip_fast import _checks
from mlip_fast.kernels import _target
from mlip_fast.kernels.patch_sentence import fwd_v3_reasons, last_forward, patch_sentence_bwd, patch_sentence_fwd
from mlip_fast.ops import patch_sentence_scores
from mlip_fast.testing.patch_sentence import grid_scores, make_case, poison_case, rel_err, run

SMALL = dict(BN=16, IMGS=2)  # 16 patches per tile (key bits: 4 slot + 4 column), two images per program
KEY_BOUND = 2.0 ** (4 + 4 - 23)
NEG_INF = float("-inf")


@pytest.fixture
def sm90(monkeypatch):
    monkeypatch.setattr(_target, "OVERRIDE", _target.Target(arch=90, sm_count=3))


def _sim(p, s, normalize):
    p, s = p.double(), s.double()
    if normalize:
        p, s = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(s, dim=-1)
    return p, s, torch.einsum("bkd,gsd->bgks", p, s)


def _check_forward(p, s, smask, pmask, normalize, directions="both", config=SMALL):
    do_i2t, do_t2i = directions in ("both", "i2t"), directions in ("both", "t2i")
    i2t, t2i, a_i, a_t, _, _ = patch_sentence_fwd(p, s, smask, pmask, do_i2t, do_t2i, config, normalize=normalize,
                                                  kernel="v3")
    assert last_forward() == {"kernel": "v3", "why_not_v3": []}
    pr, sr, sim = _sim(p, s, normalize)
    B, K, G, S = p.shape[0], p.shape[1], s.shape[0], s.shape[1]
    smask = torch.ones(G, S, dtype=torch.bool) if smask is None else smask
    pmask = torch.ones(B, K, dtype=torch.bool) if pmask is None else pmask
    ref_i, ref_t = grid_scores(pr, sr, smask, pmask)
    scale = sim.abs().max()
    tol = KEY_BOUND * scale + 1e-5 * scale  # the keys' truncation + fp32 accumulation
    if do_i2t:
        assert (i2t.double() - ref_i).abs().max() <= tol
        best = sim.masked_fill(~smask[None, :, None, :], NEG_INF).amax(-1)  # [B, G, K]
        live = pmask[:, None, :] & smask.any(1)[None, :, None]
        assert torch.equal(a_i < 0, ~live)
        picked = sim.gather(-1, a_i.long().clamp(min=0)[..., None])[..., 0]
        assert (best - picked)[live].max() <= tol and smask[None].expand(B, G, S).gather(-1, a_i.long().clamp(min=0))[live].all()
    if do_t2i:
        assert (t2i.double() - ref_t).abs().max() <= tol
        best = sim.masked_fill(~pmask[:, None, :, None], NEG_INF).amax(-2)  # [B, G, S]
        live = smask[None] & pmask.any(1)[:, None, None]
        assert torch.equal(a_t < 0, ~live)
        picked = sim.gather(-2, a_t.long().clamp(min=0)[:, :, None, :])[:, :, 0, :]
        assert (best - picked)[live].max() <= tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_v3_matches_the_fp64_grid_within_the_key_bound(sm90, dtype, normalize):
    # 11 reports (a full block of 8 and a partial one), 40 patches (tiles of 16, the last partial), D = 24 (one
    # zero-filled box of 32), reports of 5 sentences padded to 16 slots, masks with a fully padded report
    p, s, smask, pmask = make_case(5, 11, 40, 5, 24, masked=True, seed=2, dtype=torch.float64)
    _check_forward(p.to(dtype), s.to(dtype), smask, pmask, normalize)


@pytest.mark.parametrize("directions", ["i2t", "t2i"])
def test_v3_one_direction_and_two_d_boxes(sm90, directions):
    p, s, smask, pmask = make_case(3, 4, 20, 16, 40, masked=False, seed=4, dtype=torch.float64)
    _check_forward(p.to(torch.bfloat16), s.to(torch.bfloat16), smask, pmask, False, directions,
                   dict(SMALL, DC=32, NUM_DC=2))


def test_v3_exact_ties_go_to_the_lowest_index(sm90):
    """Integer inputs (exact products): sentence slots 1 and 3 of every report equal, patches 2 and 18 (in the
    first and second tile of 16) equal; i2t must pick slot 1 where those win, t2i patch 2."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randint(-3, 4, (2, 20, 16), generator=gen).float()
    s = torch.randint(-3, 4, (9, 4, 16), generator=gen).float()
    s[:, 3] = s[:, 1]
    p[:, 18] = p[:, 2]
    p[:, 2] += 40 * s[:, 1].sum(0).sign()  # make the tied pair the best patch for sentence 1 of most reports
    p[:, 18] = p[:, 2]
    p, s = p.to(torch.bfloat16), s.to(torch.bfloat16)
    _, _, a_i, a_t, _, _ = patch_sentence_fwd(p, s, None, None, config=SMALL, kernel="v3")
    sim = torch.einsum("bkd,gsd->bgks", p.double(), s.double())
    assert not (a_i == 3).any()  # slot 3 always ties with slot 1
    assert not (a_t == 18).any()  # patch 18 always ties with patch 2
    assert (a_t[:, :, 1] == 2).any()
    exp_i = sim.argmax(-1)  # torch's argmax returns the first maximal index
    exp_t = sim.argmax(-2)
    assert torch.equal(a_i.long(), exp_i) and torch.equal(a_t.long(), exp_t)


@pytest.mark.parametrize("kind", ["nan_valid_patch", "inf_valid_patch", "neg_inf_valid_sentence", "nan_padded_sentence",
                                  "inf_masked_patch"])
def test_v3_non_finite_values_as_in_the_grid(sm90, monkeypatch, kind):
    monkeypatch.setattr(_checks, "VALUE_CHECKS", False)
    p, s, smask, pmask = poison_case(kind)
    p, s = p.to(torch.bfloat16), s.to(torch.bfloat16)
    ref_i, ref_t = grid_scores(p.double(), s.double(), smask, pmask)
    i2t, t2i, _, _, _, _ = patch_sentence_fwd(p, s, smask, pmask, config=SMALL, kernel="v3")
    for got, ref in ((i2t.double(), ref_i), (t2i.double(), ref_t)):
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref)) and torch.equal(torch.isneginf(got), torch.isneginf(ref))
        finite = torch.isfinite(ref)
        assert rel_err(got[finite], ref[finite]) <= 2 * KEY_BOUND + 1e-5


def test_v3_dispatch_says_why_not(sm90):
    assert fwd_v3_reasons(98, 16, 512, torch.bfloat16, 90) == []
    why = " ".join(fwd_v3_reasons(98, 17, 520, torch.float32, 80) + fwd_v3_reasons(98, 16, 36, torch.float16, 90))
    for part in ("compute capability 80", "float32", "S=17", "D=520", "D=36"):
        assert part in why
    p, s = torch.randn(2, 5, 16), torch.randn(3, 4, 16)
    patch_sentence_fwd(p, s, None, None)  # fp32: the v2 kernel, with the reason recorded
    assert last_forward()["kernel"] == "v2" and "float32" in last_forward()["why_not_v3"][0]
    with pytest.raises(ValueError, match="v3 kernel cannot run here"):
        patch_sentence_fwd(p, s, None, None, kernel="v3")
    patch_sentence_fwd(p.bfloat16(), s.bfloat16(), None, None, kernel="v2")
    assert last_forward() == {"kernel": "v2", "why_not_v3": ["kernel='v2' asked for"]}


@pytest.mark.parametrize("normalize", [False, True])
def test_v3_backward_through_the_op(sm90, normalize):
    """The op on the training path (bf16, normalize) takes v3's indices into the backward and its fused gradient
    epilogue; inputs with well separated maxima, so the fp64 grid's gradients are the reference."""
    p, s, smask, pmask = make_case(3, 5, 7, 3, 32, masked=True, seed=1, dtype=torch.float64, min_gap=0.006)
    p, s = p.to(torch.bfloat16), s.to(torch.bfloat16)
    gi, gt = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)

    def ref(p, s, sm, pm, d):
        if normalize:
            p, s = torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(s, dim=-1)
        return grid_scores(p, s, sm, pm, d)

    want = run(ref, p.double(), s.double(), smask, pmask, "both", gi, gt)
    got = run(lambda a, b, c, d, e: patch_sentence_scores(a, b, c, d, directions=e, impl="triton", normalize=normalize),
              p, s, smask, pmask, "both", gi, gt)
    assert last_forward()["kernel"] == "v3"
    for g, w in zip([*got[0], got[1], got[2]], [*want[0], want[1], want[2]]):
        assert rel_err(g, w) <= 2e-2  # bf16 gradients (8 mantissa bits) of an fp64 reference


def test_backward_takes_an_expanded_upstream_gradient():
    """The weights kernel reads the upstream gradients through their strides (``loss = scores.sum()`` hands a
    stride-0 gradient)."""
    p, s, smask, pmask = make_case(3, 4, 5, 3, 8, masked=True, seed=6, dtype=torch.float32)
    i2t, t2i, a_i, a_t, _, _ = patch_sentence_fwd(p, s, smask, pmask)
    ones = torch.ones(()).expand(3, 4)
    dense = patch_sentence_bwd(ones.contiguous(), ones.contiguous(), p, s, a_i, a_t, smask, pmask)
    strided = patch_sentence_bwd(ones, ones, p, s, a_i, a_t, smask, pmask)
    assert all(torch.equal(a, b) for a, b in zip(dense, strided))
