"""Every input layout and every value, every impl, the same answer: the scores op against an independent fp64
grid (``mlip_fast.testing.patch_sentence.grid_scores``) for strided, expanded, transposed and sliced features and
masks, bool and uint8 masks, NaN / Inf in valid and in padded entries (value checks off), and the fused L2
normalisation with its gradient. The Triton impl runs in the interpreter (fp32); reference and chunked run in
fp64 and must match to 1e-12, Triton to 1e-5 of the output's scale (fp32 over D <= 16 terms)."""
import pytest
import torch

from mlip_fast import _checks
from mlip_fast.ops import patch_sentence_scores
from mlip_fast.testing.patch_sentence import POISON, grid_scores, make_case, poison_case, rel_err, run

IMPLS = ["reference", "chunked", "triton"]
B, G, K, S, D = 3, 4, 5, 6, 8


def _dtype(impl):
    return torch.float32 if impl == "triton" else torch.float64


def _tol(impl):
    return 1e-5 if impl == "triton" else 1e-12


def _strided(x, dim):
    """x's values in a view with stride 2 along ``dim`` (every other element of a tensor twice as long)."""
    shape = list(x.shape)
    shape[dim] *= 2
    big = torch.zeros(shape, dtype=x.dtype)
    index = [slice(None)] * x.ndim
    index[dim] = slice(None, None, 2)
    big[tuple(index)] = x
    return big[tuple(index)]


def _transposed(x):
    """x's values in a view whose first two dims are swapped in memory."""
    return x.transpose(0, 1).contiguous().transpose(0, 1)


def _sliced(x):
    """x's values in a view at an offset inside a larger tensor."""
    big = torch.zeros(x.shape[0] + 2, x.shape[1] + 3, *x.shape[2:], dtype=x.dtype)
    big[1 : 1 + x.shape[0], 2 : 2 + x.shape[1]] = x
    return big[1 : 1 + x.shape[0], 2 : 2 + x.shape[1]]


LAYOUTS = {
    "strided": lambda x: _strided(x, 1),
    "strided_last": lambda x: _strided(x, x.ndim - 1),
    "transposed": _transposed,
    "sliced": _sliced,
}


def _case(seed=7):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=seed, dtype=torch.float64)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    return p, s, smask, pmask, gi, gt


def _check(impl, p, s, smask, pmask, gi, gt, ref, **kw):
    fn = lambda a, b, sm, pm, d: patch_sentence_scores(a, b, sm, pm, directions=d, impl=impl, **kw)  # noqa: E731
    out, dp, ds = run(fn, p, s, smask, pmask, "both", gi, gt)
    ref_out, ref_dp, ref_ds = ref
    for x, r in [*zip(out, ref_out), (dp, ref_dp), (ds, ref_ds)]:
        assert rel_err(x, r) <= _tol(impl)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_feature_layouts(impl, layout):
    p, s, smask, pmask, gi, gt = _case()
    ref = run(grid_scores, p, s, smask, pmask, "both", gi, gt)
    make = LAYOUTS[layout]
    pv, sv = make(p.to(_dtype(impl))), make(s.to(_dtype(impl)))
    assert not (pv.is_contiguous() and sv.is_contiguous())
    _check(impl, pv, sv, smask, pmask, gi, gt, ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_features(impl):
    # every image holds the same patches (stride 0 over B): the scores of each image are equal
    p, s, smask, _, gi, gt = _case()
    p = p[:1].expand(B, K, D)
    ref = run(grid_scores, p.contiguous(), s, smask, None, "both", gi, gt)
    _check(impl, p.to(_dtype(impl)), s.to(_dtype(impl)), smask, None, gi, gt, ref)


MASK_LAYOUTS = {
    "strided": lambda m: _strided(m, 1),
    "transposed": _transposed,
    "sliced": _sliced,
    "uint8": lambda m: m.to(torch.uint8),
    "uint8_strided": lambda m: _strided(m.to(torch.uint8), 1),
}


@pytest.mark.parametrize("layout", sorted(MASK_LAYOUTS))
@pytest.mark.parametrize("impl", IMPLS)
def test_mask_layouts(impl, layout):
    p, s, smask, pmask, gi, gt = _case(seed=11)
    ref = run(grid_scores, p, s, smask, pmask, "both", gi, gt)
    make = MASK_LAYOUTS[layout]
    _check(impl, p.to(_dtype(impl)), s.to(_dtype(impl)), make(smask), make(pmask), gi, gt, ref)


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_mask(impl):
    p, s, _, _ = make_case(B, G, K, S, D, masked=False, seed=3, dtype=torch.float64)
    gi, gt = torch.randn(B, G, dtype=torch.float64), torch.randn(B, G, dtype=torch.float64)
    row = torch.tensor([True, False, True, True, False, True])
    smask = row[None].expand(G, S)  # stride 0 over reports
    ref = run(grid_scores, p, s, smask.contiguous(), None, "both", gi, gt)
    _check(impl, p.to(_dtype(impl)), s.to(_dtype(impl)), smask, None, gi, gt, ref)


@pytest.mark.parametrize("kind", POISON)
@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_values_propagate_as_in_the_grid(impl, kind, monkeypatch):
    """With value checks off, NaN / Inf in valid entries reach exactly the scores the plain grid gives them to
    (same NaN / Inf pattern, same finite values elsewhere); in padded entries they change nothing."""
    monkeypatch.setattr(_checks, "VALUE_CHECKS", False)
    p, s, smask, pmask = poison_case(kind)
    ref_i2t, ref_t2i = grid_scores(p, s, smask, pmask)
    i2t, t2i = patch_sentence_scores(p.to(_dtype(impl)), s.to(_dtype(impl)), smask, pmask, impl=impl)
    for got, ref in ((i2t, ref_i2t), (t2i, ref_t2i)):
        got = got.double()
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
        finite = torch.isfinite(ref)
        assert rel_err(got[finite], ref[finite]) <= _tol(impl)
    if kind.endswith(("padded_sentence", "masked_patch")):
        assert torch.isfinite(ref_i2t).all() and torch.isfinite(ref_t2i).all()


def _normalized_grid(p, s, smask, pmask, directions):
    return grid_scores(torch.nn.functional.normalize(p, dim=-1), torch.nn.functional.normalize(s, dim=-1),
                       smask, pmask, directions)


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
@pytest.mark.parametrize("impl", IMPLS)
def test_fused_normalisation_and_its_gradient(impl, directions):
    """normalize=True scores the unit vectors and back-propagates through the normalisation to the raw inputs
    (vectors of norms from 0.01 to 100, so the projection term matters)."""
    p, s, smask, pmask, gi, gt = _case(seed=13)
    p = p * torch.logspace(-2, 2, K, dtype=torch.float64)[None, :, None]
    s = s * torch.logspace(2, -2, S, dtype=torch.float64)[None, :, None]
    ref = run(_normalized_grid, p, s, smask, pmask, directions, gi, gt)
    fn = lambda a, b, sm, pm, d: patch_sentence_scores(a, b, sm, pm, directions=d, impl=impl, normalize=True)  # noqa: E731
    out, dp, ds = run(fn, p.to(_dtype(impl)), s.to(_dtype(impl)), smask, pmask, directions, gi, gt)
    # gradients w.r.t. raw vectors scale with 1 / norm: compare row by row relative to each row's scale
    for x, r in zip(out, ref[0]):
        assert rel_err(x, r) <= _tol(impl)
    for x, r in ((dp, ref[1]), (ds, ref[2])):
        scale = r.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        assert ((x.double() - r).abs() / scale).max().item() <= 10 * _tol(impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_normalised_bf16_within_twice_torch_error(impl):
    """bf16 inputs with fused normalisation: error vs fp64 at most 2x that of PyTorch's own bf16 pipeline
    (normalise in fp32, round to bf16, bf16 grid), plus 1e-6 of scale."""
    p, s, smask, pmask = make_case(3, 4, 9, 5, 32, masked=True, seed=21, dtype=torch.bfloat16, min_gap=0.006)
    gi, gt = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    ref = run(_normalized_grid, p.double(), s.double(), smask, pmask, "both", gi, gt)

    def torch_bf16(a, b, sm, pm, d):
        unit = lambda x: torch.nn.functional.normalize(x.float(), dim=-1).to(torch.bfloat16)  # noqa: E731
        return grid_scores(unit(a), unit(b), sm, pm, d)

    base = run(torch_bf16, p, s, smask, pmask, "both", gi, gt)
    fn = lambda a, b, sm, pm, d: patch_sentence_scores(a, b, sm, pm, directions=d, impl=impl, normalize=True)  # noqa: E731
    got = run(fn, p, s, smask, pmask, "both", gi, gt)
    for x, bx, r in [*zip(got[0], base[0], ref[0]), (got[1], base[1], ref[1]), (got[2], base[2], ref[2])]:
        assert rel_err(x, r) <= 2 * rel_err(bx, r) + 1e-6


def test_precision_option_is_checked_and_tf32_is_exact_off_gpu():
    p, s, smask, pmask, _, _ = _case(seed=17)
    p, s = p.float(), s.float()
    with pytest.raises(ValueError, match="precision"):
        patch_sentence_scores(p, s, precision="fp8")
    ieee = patch_sentence_scores(p, s, smask, pmask, impl="triton")
    tf32 = patch_sentence_scores(p, s, smask, pmask, impl="triton", precision="tf32")  # the interpreter is IEEE
    for a, b in zip(ieee, tf32):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_backward_of_one_used_direction_equals_that_direction_alone(impl):
    """Only i2t reaches the loss: the t2i half of the backward is skipped (no upstream gradient), and the
    gradients equal those of directions="i2t"."""
    p, s, smask, pmask, gi, _ = _case(seed=19)
    p, s = p.to(_dtype(impl)), s.to(_dtype(impl))
    grads = []
    for directions in ("both", "i2t"):
        a, b = p.clone().requires_grad_(), s.clone().requires_grad_()
        i2t, _ = patch_sentence_scores(a, b, smask, pmask, directions=directions, impl=impl)
        grads.append(torch.autograd.grad((i2t.double() * gi).sum(), (a, b)))
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
