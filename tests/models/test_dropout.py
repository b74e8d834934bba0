"""The CPU dropout mask of the report tower (mlip_fast.models.dropout): its probability, independence, scale,
gradient and reproducibility, against the Bernoulli / binomial closed forms."""
import math

import pytest
import torch

from mlip_fast.models.dropout import dropout, dropout_matmul, effective_probability, keep_bits, keep_mask


def _sigmas(observed: float, p: float, n: int) -> float:
    return abs(observed - p) / math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_probability_scale_and_each_word_position(p):
    """Drop fraction within 5 binomial sigmas of p' overall and at each of the four 16-bit words of a draw
    (positions mod 4; the top word holds bit 63, which the full-range draw makes fair), kept value exactly
    1 / (1 - p'); keep_bits gives the same draws as a bool mask and that scale."""
    torch.manual_seed(0)
    n = 4 * 150_000
    mask = keep_mask((n,), p)
    pe = effective_probability(p)
    assert abs(pe - p) <= 2 ** -17
    dropped = mask == 0
    assert _sigmas(dropped.double().mean().item(), pe, n) < 5
    for word in range(4):
        assert _sigmas(dropped[word::4].double().mean().item(), pe, n // 4) < 5, word
    assert torch.equal(torch.unique(mask), torch.tensor([0.0, 1 / (1 - pe)], dtype=torch.float32))
    assert mask.dtype == torch.float32 and keep_mask((2, 3, 5), p, dtype=torch.float64).shape == (2, 3, 5)
    torch.manual_seed(0)
    keep, scale = keep_bits((n,), p)
    assert keep.dtype == torch.bool and torch.equal(keep, ~dropped) and scale == 1 / (1 - pe)


def test_keep_mask_neighbours_uncorrelated():
    """Adjacent elements (inside one draw and across draws) and elements up to four apart are uncorrelated: the
    sample correlation of the drop indicators is within 5 / sqrt(n) of 0."""
    torch.manual_seed(1)
    n = 600_000
    d = (keep_mask((n,), 0.3) == 0).double()
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack([d[:-lag], d[lag:]]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), lag


def test_keep_mask_reproducible_from_the_seed_and_generator():
    torch.manual_seed(7)
    a = keep_mask((1000,), 0.2)
    torch.manual_seed(7)
    assert torch.equal(a, keep_mask((1000,), 0.2))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(keep_mask((999,), 0.2, generator=g1), keep_mask((999,), 0.2, generator=g2))
    assert not torch.equal(keep_mask((999,), 0.2, generator=g1), keep_mask((999,), 0.2, generator=g2.manual_seed(4)))


def test_keep_mask_rejects_bad_probabilities():
    for p in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="p must be in"):
            keep_mask((4,), p)
    with pytest.raises(ValueError, match="rounds to 1"):
        keep_mask((4,), 1 - 2 ** -18)


def test_dropout_values_gradient_and_edge_cases():
    """out = x * mask; d out / d x = the same mask; p = 0 or eval returns x itself; p = 1 gives zeros; p below the
    16-bit resolution keeps everything; p outside [0, 1] is refused."""
    torch.manual_seed(2)
    x = (torch.rand(64, 33, dtype=torch.float64) + 0.5).requires_grad_()
    out = dropout(x, 0.25)
    mask = out.detach() / x.detach()
    pe = effective_probability(0.25)
    assert set(torch.unique(mask.round(decimals=12)).tolist()) <= {0.0, round(1 / (1 - pe), 12)}
    out.backward(torch.ones_like(out))
    torch.testing.assert_close(x.grad, mask, rtol=1e-15, atol=0)
    assert dropout(x, 0.0) is x and dropout(x, 0.5, training=False) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))
    assert torch.equal(dropout(x, 2 ** -18), x)
    for training in (True, False):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dropout(x, 1.5, training)


def test_dropout_matmul_uses_the_same_mask_and_scale():
    """dropout_matmul(a, b) = dropout(a) @ b for the same seed, against fp64 products of keep_mask's draws; gradients
    in a and b equal the fp64 ones; p = 0, eval and p = 1 as F.dropout; p outside [0, 1] refused."""
    torch.manual_seed(3)
    a, b = torch.rand(2, 3, 9, 9, dtype=torch.float64), torch.randn(2, 3, 9, 4, dtype=torch.float64)
    a.requires_grad_(), b.requires_grad_()
    torch.manual_seed(6)
    out = dropout_matmul(a, b, 0.3)
    torch.manual_seed(6)
    m = keep_mask(a.shape, 0.3, dtype=torch.float64)
    torch.testing.assert_close(out, (a * m) @ b, rtol=1e-13, atol=1e-14)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(a.grad, (g @ b.detach().transpose(-1, -2)) * m, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(b.grad, (a.detach() * m).transpose(-1, -2) @ g, rtol=1e-13, atol=1e-14)
    with torch.no_grad():
        assert torch.equal(dropout_matmul(a, b, 1.0), torch.zeros_like(a @ b))
        assert torch.equal(dropout_matmul(a, b, 0.0), a @ b) and torch.equal(dropout_matmul(a, b, 0.4, False), a @ b)
        assert torch.equal(dropout_matmul(a, b, 2 ** -18), a @ b)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dropout_matmul(a, b, bad)
