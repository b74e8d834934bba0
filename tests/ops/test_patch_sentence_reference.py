"""The public scores op (reference impl) against explicit loops in float64, gradcheck, and bad input."""
import pytest
import torch

from mlip_fast.ops import ImplUnavailableError, patch_sentence_scores
from tests.slow_reference import slow_scores

SHAPES = [  # B, G, K, S, D
    (1, 1, 1, 1, 1),
    (2, 3, 1, 4, 5),
    (3, 2, 5, 1, 33),
    (4, 4, 7, 3, 16),
    (2, 5, 9, 6, 17),
]


def _mask(G, S, gen, *, full_rows=()):
    m = torch.rand(G, S, generator=gen) > 0.4
    m[:, 0] |= ~m.any(dim=1)  # at least one valid sentence per report unless asked otherwise
    for g in full_rows:
        m[g] = True
    return m


@pytest.mark.parametrize("B,G,K,S,D", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reference_matches_loops(B, G, K, S, D, masked):
    gen = torch.Generator().manual_seed(B * 100 + G * 10 + K)
    p = torch.randn(B, K, D, generator=gen, dtype=torch.float64)
    s = torch.randn(G, S, D, generator=gen, dtype=torch.float64)
    smask = _mask(G, S, gen) if masked else None
    pmask = _mask(B, K, gen) if masked else None
    i2t, t2i = patch_sentence_scores(p, s, smask, pmask, impl="reference")
    e_i2t, e_t2i = slow_scores(p, s, smask, pmask)
    torch.testing.assert_close(i2t, e_i2t, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t2i, e_t2i, rtol=1e-12, atol=1e-12)


def test_all_negative_similarities_and_padding_never_wins():
    # Every valid similarity is negative; padded sentences hold vectors with huge positive similarity.
    p = torch.ones(2, 3, 4, dtype=torch.float64)
    s = -torch.rand(3, 4, 4, dtype=torch.float64) - 0.1
    s[:, 3] = 100.0
    smask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    i2t, t2i = patch_sentence_scores(p, s, smask, impl="reference")
    e_i2t, e_t2i = slow_scores(p, s, smask)
    assert (i2t < 0).all() and (t2i < 0).all()
    torch.testing.assert_close(i2t, e_i2t)
    torch.testing.assert_close(t2i, e_t2i)


def test_fully_padded_report_scores_zero_without_gradient():
    p = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    s = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)
    smask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    i2t, t2i = patch_sentence_scores(p, s, smask, impl="reference")
    assert (i2t[:, 1] == 0).all() and (t2i[:, 1] == 0).all()
    (i2t.sum() + t2i.sum()).backward()
    assert (s.grad[1] == 0).all()


@pytest.mark.parametrize("directions", ["both", "i2t", "t2i"])
def test_gradcheck(directions):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(3, 4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    smask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    pmask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)

    def f(a, b):
        out = patch_sentence_scores(a, b, smask, pmask, directions=directions, impl="reference")
        return tuple(o for o in out if o is not None)

    assert torch.autograd.gradcheck(f, (p, s))


def test_directions_return_none_for_the_other():
    p, s = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    assert patch_sentence_scores(p, s, directions="i2t", impl="reference")[1] is None
    assert patch_sentence_scores(p, s, directions="t2i", impl="reference")[0] is None


def test_half_inputs_give_float32_scores():
    p, s = torch.randn(2, 3, 8, dtype=torch.bfloat16), torch.randn(2, 2, 8, dtype=torch.bfloat16)
    i2t, t2i = patch_sentence_scores(p, s, impl="reference")
    assert i2t.dtype == torch.float32 and t2i.dtype == torch.float32


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(2, 3), torch.randn(2, 2, 3)), ValueError, "patches"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 4)), ValueError, "sentences"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 2, 5)), ValueError, "widths"),
        (lambda: (torch.randint(0, 3, (2, 3, 4)), torch.randn(2, 2, 4)), TypeError, "patches"),
        (lambda: (torch.randn(2, 3, 4), torch.randn(2, 2, 4).double()), TypeError, "dtype"),
        (lambda: (torch.full((2, 3, 4), float("nan")), torch.randn(2, 2, 4)), ValueError, "NaN"),
    ],
)
def test_bad_input(make, exc, match):
    p, s = make()
    with pytest.raises(exc, match=match):
        patch_sentence_scores(p, s)


def test_bad_masks_and_options():
    p, s = torch.randn(2, 3, 4), torch.randn(2, 2, 4)
    with pytest.raises(TypeError, match="sentence_mask"):
        patch_sentence_scores(p, s, torch.ones(2, 2))
    with pytest.raises(ValueError, match="sentence_mask"):
        patch_sentence_scores(p, s, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_mask"):
        patch_sentence_scores(p, s, None, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="directions"):
        patch_sentence_scores(p, s, directions="both_ways")
    with pytest.raises(ValueError, match="unknown impl"):
        patch_sentence_scores(p, s, impl="cuda_magic")


def test_auto_uses_a_cpu_impl_and_triton_refuses_without_interpreter(monkeypatch):
    from mlip_fast.ops.dispatch import describe_selected, triton_unavailable_reason

    patch_sentence_scores(torch.randn(2, 3, 4), torch.randn(2, 2, 4))
    assert describe_selected()["patch_sentence_scores"] in ("chunked", "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "CUDA" in triton_unavailable_reason(torch.device("cpu"))
    with pytest.raises(ImplUnavailableError):
        from mlip_fast.ops.dispatch import Impl, OpRegistry

        reg = OpRegistry("demo", {"cpu": ["t"]})
        reg.register(Impl("t", lambda: None, ("cuda",), (torch.float32,)))
        reg.select("auto", torch.device("cpu"), torch.float32)
