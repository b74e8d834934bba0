"""Integrity-scored masking (reference and Triton impls) and the semantic integrity estimator.

Every expected value is computed here independently of the op: masks are checked for validity, kept
tokens against ``torch.gather``, integrity against a float64 softmax, gradients against a scatter into
zeros, and the sampling distribution against exact Plackett-Luce probabilities from enumerating every
ordered selection. On CPU the Triton impl runs under the interpreter (TRITON_INTERPRET=1, set by the root
conftest), so shapes stay small; rows with identical scores are independent samples, which gives thousands
of draws from one launch.
"""
import math

import pytest
import torch

from mlip_fast.models.estimator import SemanticIntegrityEstimator
from mlip_fast.ops.dispatch import ImplUnavailableError, triton_unavailable_reason
from mlip_fast.ops.integrity_mask import REGISTRY, MaskResult, integrity_mask
from mlip_fast.testing.integrity_mask import max_abs_z, plackett_luce

_TRITON_SKIP = triton_unavailable_reason(torch.device("cpu"))
IMPLS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP)))]

# B, P, C, keep: P=1, keep=P, keep=1, non-powers of two, P beyond 1024.
SHAPES = [(3, 1, 5, 1), (2, 7, 3, 7), (4, 9, 5, 1), (2, 197, 3, 98), (2, 1027, 2, 300)]


def _inputs(B, P, C, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, P, C, generator=gen).to(dtype)
    scores = torch.randn(B, P, generator=gen) * 2
    return tokens, scores


def _integrity_f64(scores, index):
    s = scores.double()
    e = torch.exp(s - s.max(dim=1, keepdim=True).values)
    kept = torch.zeros_like(s, dtype=torch.bool).scatter_(1, index, True)
    return (e * kept).sum(1) / e.sum(1)


def _check_valid(result, tokens, keep):
    B, P, C = tokens.shape
    assert isinstance(result, MaskResult)
    index = result.index
    assert index.dtype == torch.int64 and index.shape == (B, keep)
    assert bool((index >= 0).all()) and bool((index < P).all())
    assert bool((index.diff(dim=1) > 0).all()), "index must be strictly ascending (hence unique)"
    assert result.kept.shape == (B, keep, C) and result.kept.dtype == tokens.dtype
    assert torch.equal(result.kept, torch.gather(tokens, 1, index.unsqueeze(-1).expand(-1, -1, C)))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,P,C,keep", SHAPES)
def test_mask_gather_and_integrity(impl, B, P, C, keep):
    tokens, scores = _inputs(B, P, C, seed=P)
    result = integrity_mask(tokens, scores, keep, seed=11, impl=impl)
    _check_valid(result, tokens, keep)
    assert result.integrity.dtype == torch.float32
    # float32 softmax and sums over at most P terms: worst-case rounding about P ulps of 1.
    torch.testing.assert_close(result.integrity.double(), _integrity_f64(scores, result.index), rtol=0, atol=1e-6 + P * 1.2e-7)
    assert bool((result.integrity > 0).all()) and bool((result.integrity <= 1 + 1e-6).all())
    if keep == P:
        assert torch.equal(result.index, torch.arange(P).expand(B, P))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes_copy_exactly(impl, dtype):
    tokens, scores = _inputs(3, 13, 6, dtype=dtype)
    result = integrity_mask(tokens, scores.to(dtype), 5, seed=3, impl=impl)
    _check_valid(result, tokens, 5)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert result.integrity.dtype == expected_dtype
    torch.testing.assert_close(result.integrity.double(), _integrity_f64(scores.to(dtype), result.index), rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_tokens(impl):
    tokens = torch.randn(5, 4, 11).transpose(0, 1)  # [B=4, P=5, C=11], non-contiguous
    scores = torch.randn(5, 4).t()  # [B=4, P=5], non-contiguous
    result = integrity_mask(tokens, scores, 3, seed=0, impl=impl)
    _check_valid(result, tokens, 3)


@pytest.mark.parametrize("impl", IMPLS)
def test_same_seed_same_mask_and_seeds_differ(impl):
    tokens, scores = _inputs(8, 32, 4)
    a = integrity_mask(tokens, scores, 8, seed=1234, impl=impl)
    b = integrity_mask(tokens, scores, 8, seed=1234, impl=impl)
    c = integrity_mask(tokens, scores, 8, seed=1235, impl=impl)
    assert torch.equal(a.index, b.index) and torch.equal(a.kept, b.kept) and torch.equal(a.integrity, b.integrity)
    assert not torch.equal(a.index, c.index)
    big = integrity_mask(tokens, scores, 8, seed=2**63 - 1, impl=impl)
    _check_valid(big, tokens, 8)


@pytest.mark.parametrize("impl", IMPLS)
def test_generator_and_default_generator(impl):
    tokens, scores = _inputs(6, 20, 3)
    gen_a, gen_b = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = integrity_mask(tokens, scores, 5, generator=gen_a, impl=impl)
    assert torch.equal(first.index, integrity_mask(tokens, scores, 5, generator=gen_b, impl=impl).index)
    second = integrity_mask(tokens, scores, 5, generator=gen_a, impl=impl)
    assert not torch.equal(first.index, second.index), "the generator must advance between calls"
    torch.manual_seed(99)
    d1 = integrity_mask(tokens, scores, 5, impl=impl)
    torch.manual_seed(99)
    d2 = integrity_mask(tokens, scores, 5, impl=impl)
    assert torch.equal(d1.index, d2.index)


@pytest.mark.parametrize("impl", IMPLS)
def test_inclusion_matchesplackett_luce(impl):
    P, keep, n = 5, 2, 8000
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5])
    temperature = 0.8
    inclusion, subsets = plackett_luce(torch.softmax(row.double() / temperature, 0), keep)
    tokens = torch.zeros(n, P, 1)
    result = integrity_mask(tokens, row.expand(n, P), keep, temperature=temperature, seed=2024, impl=impl)
    _check_valid(result, tokens, keep)
    # Per-position binomial z-scores; |z| < 4.5 for all 5 has probability > 0.9999 under the null.
    assert max_abs_z(result.index, P, inclusion) < 4.5
    # Joint test over the 10 kept subsets: Pearson chi-square with 9 degrees of freedom, p > 1e-4.
    codes = result.index[:, 0] * P + result.index[:, 1]
    observed = torch.bincount(codes, minlength=P * P).double()
    chi2 = 0.0
    for (i, j), pr in subsets.items():
        chi2 += (observed[i * P + j].item() - n * pr) ** 2 / (n * pr)
    dof = len(subsets) - 1
    p_value = torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2, dtype=torch.float64))
    assert p_value.item() > 1e-4, f"chi2={chi2:.1f} with {dof} dof"
    # The test has power: the uniform law (temperature -> infinity) is far from this one.
    assert max_abs_z(result.index, P, torch.full((P,), keep / P, dtype=torch.float64)) > 10


@pytest.mark.parametrize("impl", IMPLS)
def test_large_temperature_is_uniform(impl):
    P, keep, n = 7, 3, 3000
    row = torch.tensor([4.0, -3.0, 2.0, 0.0, 5.0, -6.0, 1.0])
    tokens = torch.zeros(n, P, 1)
    result = integrity_mask(tokens, row.expand(n, P), keep, temperature=1e6, seed=5, impl=impl)
    assert max_abs_z(result.index, P, torch.full((P,), keep / P, dtype=torch.float64)) < 4.5


@pytest.mark.parametrize("impl", IMPLS)
def test_small_temperature_is_top_k(impl):
    B, P, keep = 16, 37, 9
    gen = torch.Generator().manual_seed(1)
    # Scores 0.1 apart: at temperature 1e-4 keys are >= 1000 apart, more than any float32 Gumbel draw spans.
    scores = torch.stack([torch.randperm(P, generator=gen) for _ in range(B)]).float() * 0.1
    tokens = torch.randn(B, P, 2)
    result = integrity_mask(tokens, scores, keep, temperature=1e-4, seed=3, impl=impl)
    assert torch.equal(result.index, scores.topk(keep, dim=1).indices.sort(dim=1).values)


@pytest.mark.parametrize("impl", IMPLS)
def test_exact_ties_give_a_valid_mask(impl):
    # scores / temperature ~ 1e30 absorbs the noise: every key in a row ties with its equals.
    scores = torch.tensor([[5.0, 5.0, 5.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    tokens = torch.randn(2, 5, 3)
    result = integrity_mask(tokens, scores, 2, temperature=1e-30, seed=0, impl=impl)
    _check_valid(result, tokens, 2)
    assert bool((result.index[0] < 3).all())
    if impl == "triton":  # ties are broken by position in the kernel
        assert result.index.tolist() == [[0, 1], [0, 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_scatter(impl, dtype):
    B, P, C, keep = 3, 29, 7, 10
    tokens, scores = _inputs(B, P, C, dtype=dtype)
    tokens.requires_grad_(True)
    scores.requires_grad_(True)
    result = integrity_mask(tokens, scores, keep, seed=4, impl=impl)
    assert not result.integrity.requires_grad and not result.index.requires_grad
    grad_kept = torch.randn(B, C, keep).to(dtype).transpose(1, 2)  # non-contiguous upstream gradient
    (grad_tokens,) = torch.autograd.grad(result.kept, tokens, grad_kept)
    expected = torch.zeros(B, P, C, dtype=dtype).scatter_(1, result.index.unsqueeze(-1).expand(-1, -1, C), grad_kept)
    assert torch.equal(grad_tokens, expected)


@pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP))
def test_triton_mask_does_not_depend_on_launch_config():
    from mlip_fast.kernels import integrity_mask as kernels

    B, P, C, keep = 5, 100, 40, 37
    tokens, scores = _inputs(B, P, C)
    base = kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 77)
    # The GPU configuration (several programs per row sharing the kept slots), a minimal one, and one whose
    # copy tile is wider than the program's kept slots.
    for config in (kernels.fwd_config(B, P, C, keep, interpret=False), dict(ROWS=1, KPB=8, BLOCK_J=2, BLOCK_C=16),
                   dict(ROWS=2, KPB=4, BLOCK_J=16, BLOCK_C=32)):
        other = kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 77, config=config)
        for a, b in zip(base, other):
            assert torch.equal(a, b)
    seeded = kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 0, seed_tensor=torch.tensor([77]))
    assert torch.equal(seeded[1], base[1])


@pytest.mark.skipif(_TRITON_SKIP is not None, reason=str(_TRITON_SKIP))
def test_triton_under_torch_compile():
    B, P, C, keep = 2, 9, 4, 4
    tokens, scores = _inputs(B, P, C)
    tokens.requires_grad_(True)

    def step(t, s):
        r = integrity_mask(t, s, keep, seed=21, impl="triton")
        return r.kept, r.index, r.integrity

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    kept, index, integrity = compiled(tokens, scores)
    eager = step(tokens, scores)
    assert torch.equal(index, eager[1]) and torch.equal(kept, eager[0]) and torch.equal(integrity, eager[2])
    grad_kept = torch.randn_like(kept)
    (g,) = torch.autograd.grad(kept, tokens, grad_kept)
    assert torch.equal(g, torch.zeros(B, P, C).scatter_(1, index.unsqueeze(-1).expand(-1, -1, C), grad_kept))


def test_auto_dispatch_on_cpu_and_unavailable_triton(monkeypatch):
    tokens, scores = _inputs(2, 6, 3)
    integrity_mask(tokens, scores, 2, seed=0)
    assert REGISTRY.last_used == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="triton"):
        integrity_mask(tokens, scores, 2, seed=0, impl="triton")
    with pytest.raises(ValueError, match="unknown impl"):
        integrity_mask(tokens, scores, 2, seed=0, impl="cuda-magic")


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(keep=0), ValueError, "keep"),
        (dict(keep=7), ValueError, "keep"),
        (dict(keep=2.0), TypeError, "keep"),
        (dict(keep=True), TypeError, "keep"),
        (dict(scores=torch.tensor([[0.0, float("nan"), 1, 2, 3, 4]] * 2)), ValueError, "NaN"),
        (dict(scores=torch.tensor([[0.0, float("inf"), 1, 2, 3, 4]] * 2)), ValueError, "Inf"),
        (dict(scores=torch.zeros(3, 6)), ValueError, "batch size"),
        (dict(scores=torch.zeros(2, 5)), ValueError, "patches"),
        (dict(scores=torch.zeros(2, 6, 1)), ValueError, "scores"),
        (dict(scores=torch.zeros(2, 6, dtype=torch.int64)), TypeError, "scores"),
        (dict(tokens=torch.zeros(2, 6, 3, dtype=torch.int32)), TypeError, "tokens"),
        (dict(tokens=torch.zeros(2, 6)), ValueError, "tokens"),
        (dict(tokens=torch.zeros(2, 6, 0)), ValueError, "tokens"),
        (dict(tokens=[[1.0]]), TypeError, "tokens"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=2**63), ValueError, "seed"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(seed=1, generator=torch.Generator()), ValueError, "seed or generator"),
        (dict(generator=42), TypeError, "generator"),
        (
            dict(tokens=torch.zeros(2, 6, 3, device="meta"), scores=torch.zeros(2, 6, device="meta"), generator=torch.Generator()),
            ValueError,
            "generator is on cpu",
        ),
    ],
)
def test_bad_input(change, error, match):
    args = dict(tokens=torch.randn(2, 6, 3), scores=torch.randn(2, 6), keep=2, temperature=1.0, seed=None, generator=None)
    args.update(change)
    with pytest.raises(error, match=match):
        integrity_mask(args.pop("tokens"), args.pop("scores"), args.pop("keep"), **args)


def test_check_finite_can_be_skipped():
    scores = torch.randn(2, 6)
    scores[0, 0] = float("nan")
    result = integrity_mask(torch.randn(2, 6, 3), scores, 2, seed=0, check_finite=False)
    assert result.index.shape == (2, 2)


# Semantic integrity estimator


def test_estimator_shapes_and_neutral_init():
    est = SemanticIntegrityEstimator(24, 8)
    patches = torch.randn(3, 17, 24)
    logits = est(patches)
    assert logits.shape == (3, 17) and logits.dtype == torch.float32
    assert torch.equal(logits, torch.zeros(3, 17)), "the zero-initialised output layer gives uniform logits"
    assert SemanticIntegrityEstimator(24).fc1.out_features == 6


def test_estimator_matches_formula_and_gradcheck():
    est = SemanticIntegrityEstimator(6, 5).double()
    torch.nn.init.normal_(est.fc2.weight)
    torch.nn.init.normal_(est.fc2.bias)
    torch.nn.init.normal_(est.norm.weight)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    h = (x - mean) / torch.sqrt(var + 1e-6) * est.norm.weight + est.norm.bias
    h = h @ est.fc1.weight.t() + est.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    expected = (h @ est.fc2.weight.t() + est.fc2.bias).squeeze(-1)
    torch.testing.assert_close(est(x), expected, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(est, (x,))
    est(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in est.parameters())
    assert est.fc1.weight.grad.abs().sum() > 0


def test_estimator_feeds_the_mask():
    est = SemanticIntegrityEstimator(8, 4)
    torch.nn.init.normal_(est.fc2.weight)
    patches = torch.randn(4, 10, 8, requires_grad=True)
    logits = est(patches)
    result = integrity_mask(patches, logits, 3, seed=0)
    (result.kept.sum() + logits.gather(1, result.index).sum()).backward()
    assert patches.grad is not None and torch.isfinite(patches.grad).all()


@pytest.mark.parametrize(
    "args, match", [((0,), "dim"), ((True,), "dim"), ((8, 0), "hidden"), ((8, 2.5), "hidden")]
)
def test_estimator_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        SemanticIntegrityEstimator(*args)


def test_estimator_bad_input():
    est = SemanticIntegrityEstimator(8)
    with pytest.raises(ValueError, match="C=8"):
        est(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="B, P"):
        est(torch.randn(3, 8))
    with pytest.raises(TypeError, match="patches"):
        est([1.0])


@pytest.mark.parametrize("impl", IMPLS)
def test_estimator_trained_by_semantic_integrity_loss(impl):
    """Estimator logits -> mask -> logits at the kept positions -> SemanticIntegrityLoss: the estimator learns,
    the tokens get the gather's gradient, and the integrity weights stay out of the graph."""
    from mlip_fast.losses import SemanticIntegrityLoss

    B, P, C, S, keep = 3, 12, 8, 4, 5
    est = SemanticIntegrityEstimator(C, 6)
    torch.nn.init.normal_(est.fc2.weight, std=0.5)
    tokens = torch.randn(B, P, C, requires_grad=True)
    logits = est(tokens)
    result = integrity_mask(tokens, logits, keep, seed=9, impl=impl)
    loss = SemanticIntegrityLoss()(logits.gather(1, result.index), result.kept, torch.randn(B, S, C))
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    assert est.fc1.weight.grad.abs().sum() > 0 and est.fc2.weight.grad.abs().sum() > 0
    assert tokens.grad is not None and not result.integrity.requires_grad


def test_triton_declines_rows_above_its_patch_limit():
    from mlip_fast.kernels.integrity_mask import MAX_PATCHES  # triton is optional: imported where used

    P = MAX_PATCHES + 1
    tokens, scores = torch.randn(1, P, 2), torch.randn(1, P)
    with pytest.raises(ImplUnavailableError, match=f"P={P} patches per image"):
        integrity_mask(tokens, scores, 3, seed=0, impl="triton")
    out = integrity_mask(tokens, scores, 3, seed=0, impl="auto")  # the reference takes it
    assert out.kept.shape == (1, 3, 2)
