"""Every impl of ``mlip_fast.ops.patch_sentence_ot_scores`` (reference, chunked, and triton in the interpreter on
CPU) against the float64 reference, forward and backward with a random upstream gradient, plus dispatch, input
checks and the custom ops.

Tolerances:
- fp32 inputs: 2e-5 of the output's scale. The iterations work on exponents of size |sim| / eps and potentials of
  the same order (<= about 20 at eps = 0.05 for unit vectors); fp32 rounds each to ~1e-6 absolute, which is the
  relative error of each plan entry, and the Sinkhorn map does not expand errors from one iteration to the next;
  scores and gradients are plan-weighted sums of fp32 dot products over D <= 40 terms. Observed: <= 4e-7.
- fp64 (reference vs chunked, whose iterations are the same recursion in scaling form): 1e-12.
- bf16 / fp16 inputs: at most 2x the error of PyTorch's own same-dtype computation (the reference run on the half
  inputs: grid in the input dtype, iterations in fp32, gradients through a half einsum), plus 1e-6 of scale.
"""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mlip_fast import _checks
from mlip_fast.kernels.patch_sentence_ot import launch
from mlip_fast.ops import ImplUnavailableError, patch_sentence_ot_scores
from mlip_fast.ops.patch_sentence_ot import REGISTRY, chunked
from mlip_fast.ops.patch_sentence_ot.triton_impl import patch_sentence_ot_scores_fwd
from mlip_fast.reference.patch_sentence import unit_rows
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_scores
from mlip_fast.reference.patch_sentence_ot import transport_plan
from mlip_fast.testing import assert_compiled_grads_equal
from mlip_fast.testing.patch_sentence_ot import live_pairs, make_case, rel_err, run

F64 = torch.float64
IMPLS = ["reference", "chunked", "triton"]
N_ITER = 15  # the interpreter runs every iteration in Python: enough to leave the first, cheap enough to test


def op(impl, **kw):
    return lambda p, s, sm, pm: patch_sentence_ot_scores(p, s, sm, pm, impl=impl, **kw)


def ref64(**kw):
    return lambda p, s, sm, pm: reference_scores(p.double(), s.double(), sm, pm, **kw)


def upstream(B, G, seed=0):
    return torch.randn(B, G, generator=torch.Generator().manual_seed(seed), dtype=F64)


CASES = [  # B, G, K, S, D, masked, negative
    (3, 5, 7, 3, 33, True, False),  # odd sizes, ragged, a fully padded report next to a full one, a padded image
    (2, 3, 1, 1, 16, False, False),  # K = 1, S = 1
    (2, 4, 1, 5, 33, True, False),  # K = 1 with masks
    (4, 2, 70, 5, 20, True, False),  # K above 64 (128 patch columns), B != G
    (2, 3, 6, 17, 40, True, False),  # S not a power of two, above 16
    (3, 4, 9, 4, 24, True, True),  # every similarity negative
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,G,K,S,D,masked,negative", CASES)
def test_fp32_matches_fp64_reference(impl, B, G, K, S, D, masked, negative):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=masked, seed=B + 7 * K + S, negative=negative)
    grad = upstream(B, G)
    ref_out, ref_dp, ref_ds = run(ref64(n_iter=N_ITER), p, s, smask, pmask, grad)
    out, dp, ds = run(op(impl, n_iter=N_ITER), p, s, smask, pmask, grad)
    assert out.dtype == torch.float32 and dp.dtype == ds.dtype == torch.float32
    assert rel_err(out, ref_out) < 2e-5
    assert rel_err(dp, ref_dp) < 2e-5
    assert rel_err(ds, ref_ds) < 2e-5
    pairs = live_pairs(B, G, smask, pmask)
    assert (out[~pairs] == 0).all()  # a pair with an empty side scores 0 ...
    if masked and G > 2:
        assert (ds[1] == 0).all()  # ... and its report or image gets no gradient
    if masked and B > 2:
        assert (dp[1] == 0).all()
    if negative:
        assert (out[pairs] < 0).all()


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_large_eps_and_more_iterations(impl):
    B, G, K, S, D = 2, 3, 10, 6, 12
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=21)
    grad = upstream(B, G, seed=1)
    for eps, n_iter in ((0.5, 4), (0.02, 40)):
        ref = run(ref64(eps=eps, n_iter=n_iter), p, s, smask, pmask, grad)
        got = run(op(impl, eps=eps, n_iter=n_iter), p, s, smask, pmask, grad)
        for x, r in zip(got, ref):
            assert rel_err(x, r) < 2e-5, (eps, n_iter)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,G,K,S,D", [(3, 5, 7, 3, 33), (2, 3, 1, 1, 16), (3, 2, 9, 5, 40)])
def test_half_within_twice_torch_error(impl, dtype, B, G, K, S, D):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=3 * B + K, dtype=dtype)
    grad = upstream(B, G, seed=2)
    ref = run(ref64(n_iter=N_ITER), p, s, smask, pmask, grad)
    base = run(lambda *a: reference_scores(*a, n_iter=N_ITER), p, s, smask, pmask, grad)
    out, dp, ds = run(op(impl, n_iter=N_ITER), p, s, smask, pmask, grad)
    assert out.dtype == torch.float32 and dp.dtype == ds.dtype == dtype
    for x, b, r in zip((out, dp, ds), base, ref):
        assert rel_err(x, r) <= 2 * rel_err(b, r) + 1e-6


@pytest.mark.parametrize("tile_elements", [1, 40, 10**6])
@pytest.mark.parametrize("absorb_at", [16.0, 0.5])
@pytest.mark.parametrize("linear_start_at", [chunked.LINEAR_START_AT, float("-inf")])
@pytest.mark.parametrize("max_widening", [chunked.MAX_WIDENING, 1000])
def test_chunked_fp64_is_the_reference_recursion(tile_elements, absorb_at, linear_start_at, max_widening,
                                                 monkeypatch):
    # tiles: one pair each, several reports of one image, everything at once; absorb_at 0.5 redoes most half-steps
    # in the log domain (the absorption path), 16 almost none. Small eps makes the scalings swing. Unit vectors:
    # eps 0.05 starts in the scaling form (sim / eps <= 20), eps 0.01 with a log-domain iteration (up to 100);
    # linear_start_at -inf makes every tile start in the log domain. max_widening 1000 runs the 4 x 3 pairs at
    # width 100 (97 dead sentence columns added for BLAS's bmm), the default leaves them at 3.
    monkeypatch.setattr(chunked, "LINEAR_START_AT", linear_start_at)
    monkeypatch.setattr(chunked, "MAX_WIDENING", max_widening)
    B, G, K, S, D = 3, 5, 4, 3, 12
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=5, dtype=F64)
    grad = upstream(B, G, seed=3)
    for eps in (0.05, 0.01):
        ref = run(ref64(eps=eps, n_iter=30), p, s, smask, pmask, grad)

        def fn(p_, s_, sm, pm, eps=eps):
            return chunked.patch_sentence_ot_scores_chunked(p_, s_, sm, pm, eps, 30, None, tile_elements, absorb_at)

        for x, r in zip(run(fn, p, s, smask, pmask, grad), ref):
            torch.testing.assert_close(x, r, rtol=1e-12, atol=1e-12)


def test_chunked_run_width():
    # pairs below BLAS's 400 cells of bmm get dead sentence columns, unless that more than triples them
    assert [chunked._run_width(k, s) for k, s in ((48, 12), (32, 12), (16, 12), (8, 12), (4, 3), (0, 5), (400, 1))] \
        == [12, 13, 25, 12, 3, 5, 1]


@pytest.mark.parametrize("impl", ["chunked", "chunked_widened", "triton"])
def test_tolerance_matches_the_reference(impl, monkeypatch):
    if impl == "chunked_widened":  # the 6 x 4 pairs at width 67: dead columns must not move the stopping test
        monkeypatch.setattr(chunked, "MAX_WIDENING", 1000)
        impl = "chunked"
    B, G, K, S, D, eps, n_iter = 3, 4, 6, 4, 8, 0.05, 40
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=9)
    grad = upstream(B, G, seed=4)
    # 3e-3: each pair's violation sequence (fp64) stays at least 2% away from it (fp32 computes it to ~1e-6, 3e-4
    # of tol), so every impl stops each pair where fp64 does: here after 10 to 37 iterations, pair by pair
    tol = 3e-3
    viol = [(transport_plan(p.double(), s.double(), smask, pmask, eps, n)[0].sum(-2)
             - smask.double() / smask.sum(1, keepdim=True).clamp(min=1)).abs().sum(-1) for n in range(1, n_iter)]
    pairs = live_pairs(B, G, smask, pmask)
    ratios = torch.stack([v[pairs] for v in viol]) / tol
    assert ((ratios < 0.98) | (ratios > 1.02)).all() and (ratios[-1] < 1).all()
    for t, n in ((tol, n_iter), (0.0, N_ITER), (2.0, N_ITER)):  # and: never stops early, stops at the first check
        ref = run(ref64(eps=eps, n_iter=n, tol=t), p, s, smask, pmask, grad)
        got = run(op(impl, eps=eps, n_iter=n, tol=t), p, s, smask, pmask, grad)
        for x, r in zip(got, ref):
            assert rel_err(x, r) < 2e-5, t
    # every similarity negative: the plan before any iteration, exp(sim / eps), violates the marginals by less
    # than 1.5, so a check before the first whole iteration would stop every pair there; the first check is
    # after one iteration, as in the reference
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=9, negative=True)
    ref = run(ref64(eps=eps, n_iter=N_ITER, tol=1.5), p, s, smask, pmask, grad)
    got = run(op(impl, eps=eps, n_iter=N_ITER, tol=1.5), p, s, smask, pmask, grad)
    for x, r in zip(got, ref):
        assert rel_err(x, r) < 2e-5


def test_triton_potentials_match_the_reference():
    B, G, K, S, D = 3, 4, 9, 5, 20
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=12)
    scores, f, g = launch.patch_sentence_ot_fwd(p, s, smask, pmask, 0.05, N_ITER)
    _, _, ref_f, ref_g = transport_plan(p.double(), s.double(), smask, pmask, 0.05, N_ITER)
    for x, r in ((f, ref_f), (g, ref_g)):
        live = torch.isfinite(r)
        assert torch.equal(torch.isneginf(x), ~live)  # -inf exactly where nothing is transported
        torch.testing.assert_close(x[live].double(), r[live], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_backward_allocates_no_gradient_for_the_potentials(impl):
    """The custom ops also return the potentials f [B, G, K] and g [B, G, S], which no caller differentiates: their
    gradients must arrive as None, not as zero tensors of their size (7.1 MiB at PERF.md's CPU shape, 40% of the
    chunked op's memory before). Sizes are pairwise distinct, so no other buffer has those byte counts."""
    B, G, K, S, D = 3, 7, 11, 5, 4
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=3)
    p, s = p.requires_grad_(), s.requires_grad_()
    out = patch_sentence_ot_scores(p, s, smask, pmask, impl=impl, n_iter=3)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out.backward(upstream(B, G).float())
    # leaf operators only: a parent's figure is the sum of its children's allocations
    allocated = {e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children}
    assert not allocated & {B * G * K * 4, B * G * S * 4}, sorted(allocated)
    assert p.grad.abs().sum() > 0 and s.grad.abs().sum() > 0


def _raw_rows(x, seed, lo=0.25, hi=4.0):
    """x's rows at random lengths in [lo, hi] (the op's inputs are unit rows; ``normalize`` takes any)."""
    gen = torch.Generator().manual_seed(seed)
    return x * (lo + (hi - lo) * torch.rand(*x.shape[:-1], 1, generator=gen, dtype=x.dtype))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,G,K,S,D,masked,negative", CASES[:1] + CASES[3:5])
def test_normalize_matches_the_fp64_reference_on_raw_rows(impl, B, G, K, S, D, masked, negative):
    """``normalize=True`` scores the raw rows' unit vectors and differentiates through the normalisation: against
    the fp64 reference that normalises through autograd (F.normalize of the zero-filled rows), 2e-5 of scale."""
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=masked, seed=B + 7 * K + S, negative=negative)
    p, s = _raw_rows(p, 1), _raw_rows(s, 2)
    grad = upstream(B, G)
    ref_out, ref_dp, ref_ds = run(ref64(n_iter=N_ITER, normalize=True), p, s, smask, pmask, grad)
    out, dp, ds = run(op(impl, n_iter=N_ITER, normalize=True), p, s, smask, pmask, grad)
    assert rel_err(out, ref_out) < 2e-5
    assert rel_err(dp, ref_dp) < 2e-5
    assert rel_err(ds, ref_ds) < 2e-5
    p, s = p.double(), s.double()
    unit_out, _, _ = run(ref64(n_iter=N_ITER), p / p.norm(dim=-1, keepdim=True), s / s.norm(dim=-1, keepdim=True),
                         smask, pmask, grad)
    assert rel_err(ref_out, unit_out) < 1e-12  # what is scored: the unit rows


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_chunked_normalize_is_bitwise_normalising_first(dtype):
    """The local loss hands the chunked op raw embeddings (``normalize=True``) where it used to normalise them first
    with ``unit_rows`` through autograd: scores and both gradients must be the same bits, so that training numbers
    do not move. Several tiles and image blocks, more rows than one block of the normalisation's backward, NaN in
    padded rows, a valid zero row (norm 0: gradient g / 1e-12 as F.normalize's) and one below the norm floor."""
    B, G, K, S, D = 7, 6, 45, 4, 12  # B * K = 315 rows > UNIT_ROWS_BLOCK
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=11, dtype=dtype)
    p, s = _raw_rows(p, 3), _raw_rows(s, 4)
    p[~pmask], s[~smask] = float("nan"), float("inf")
    p[0, 0], p[2, 0] = 0.0, 1e-13
    grad = upstream(B, G).to(dtype)
    runs = []
    for fused in (False, True):
        pp, ss = p.clone().requires_grad_(), s.clone().requires_grad_()
        args = (pp, ss) if fused else (unit_rows(pp, pmask), unit_rows(ss, smask))
        out = chunked.patch_sentence_ot_scores_chunked(*args, smask, pmask, n_iter=6, tile_elements=4 * K * S * G,
                                                       normalize=fused)
        (out * grad).sum().backward()
        runs.append((out.detach(), pp.grad, ss.grad))
    for x, y in zip(*runs):
        assert torch.equal(x, y)
    assert runs[1][1].isfinite().all() and runs[1][2].isfinite().all()
    assert runs[1][1][0, 0].abs().max() > 1e6  # the zero row's gradient went through the floor


def test_chunked_normalize_holds_no_normalised_copy_of_the_patches():
    """What the fused normalisation saves (PERF.md: the loss's memory <= 1/33 of the reference's): the forward
    allocates no buffer of the patches' size (each image block is normalised per tile; two blocks here: the forward's
    tiles of whole image rows hold 182 images at this G K S, the backward's 22) and the backward exactly one, the
    patches' gradient. Normalising first allocates the unit copy, and its backward the normalisation's temporaries of
    that size. Sizes are distinct (B * K, G * S and the tiles' cells)."""
    B, G, K, S, D = 200, 24, 40, 12, 8
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=5)
    p, s = _raw_rows(p, 5).requires_grad_(), _raw_rows(s, 6).requires_grad_()
    size = B * K * D * 4

    def allocations(fn):  # the input checks' isfinite pass is the public function's, not the op's: off
        with _checks.value_checks_disabled(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0 and not e.cpu_children]

    for fused in (True, False):
        box = {}

        def forward():
            args = (p, s) if fused else (unit_rows(p, pmask), unit_rows(s, smask))
            box["out"] = patch_sentence_ot_scores(*args, smask, pmask, n_iter=3, impl="chunked", normalize=fused)

        fwd = allocations(forward)
        bwd = allocations(lambda: box["out"].backward(upstream(B, G).float()))
        p.grad = s.grad = None
        if fused:
            assert fwd.count(size) == 0 and bwd.count(size) == 1, (sorted(fwd), sorted(bwd))
        else:  # the check bites: normalising first allocates what the fused path does not
            assert fwd.count(size) >= 1 and bwd.count(size) >= 2, (sorted(fwd), sorted(bwd))


FWD_CONFIGS = [  # (B, G, K, S, D, config): tilings the GPU heuristics pick, at interpreter sizes
    (3, 5, 7, 3, 40, dict(GB=1, BD=16)),  # one report per program, several D chunks
    (2, 7, 20, 5, 24, dict(GB=4, S_CH=8)),  # several reports per program, the last block partial
    (2, 3, 5, 2, 24, dict(GB=8, S_CH=2)),  # two-slot reports (below MIN_SLOTS, as an explicit config)
]
BWD_CONFIGS = [  # small blocks: several row blocks, column steps and D-column programs per side
    (3, 5, 40, 6, 40, dict(RB=16, CB=16, DC=16, BD=16)),
    (2, 3, 7, 17, 24, dict(RB=16, CB=16, DC=16, BD=16)),
]


@pytest.mark.parametrize("B,G,K,S,D,config", FWD_CONFIGS)
def test_triton_forward_tilings(B, G, K, S, D, config):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=K + S)
    scores, _, _ = launch.patch_sentence_ot_fwd(p, s, smask, pmask, 0.05, N_ITER, config=config)
    assert rel_err(scores, reference_scores(p.double(), s.double(), smask, pmask, 0.05, N_ITER)) < 2e-5


@pytest.mark.parametrize("B,G,K,S,D,config", BWD_CONFIGS)
def test_triton_backward_tilings(B, G, K, S, D, config):
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=K * S)
    grad = upstream(B, G, seed=5)
    _, ref_dp, ref_ds = run(ref64(n_iter=N_ITER), p, s, smask, pmask, grad)
    _, f, g = launch.patch_sentence_ot_fwd(p, s, smask, pmask, 0.05, N_ITER)
    dp, ds = launch.patch_sentence_ot_bwd(grad.float(), p, s, f, g, 0.05, config=config)
    assert rel_err(dp, ref_dp) < 2e-5 and rel_err(ds, ref_ds) < 2e-5


def test_auto_is_chunked_on_cpu_and_explicit_triton_needs_gpu_or_interpreter(monkeypatch):
    p, s, _, _ = make_case(2, 3, 4, 2, 8, masked=False, seed=1)
    patch_sentence_ot_scores(p, s, n_iter=3)
    assert REGISTRY.last_used == "chunked"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ImplUnavailableError, match="triton.*CUDA.*TRITON_INTERPRET"):
        patch_sentence_ot_scores(p, s, impl="triton")


def test_triton_declines_pairs_above_its_register_tile():
    p, s = torch.randn(1, 300, 8), torch.randn(2, 16, 8)
    with pytest.raises(ImplUnavailableError, match="register tile"):
        patch_sentence_ot_scores(p, s, impl="triton")
    assert launch.limits(256, 16, torch.bfloat16, 90) == [] and launch.limits(98, 32, torch.bfloat16, 90) == []
    assert launch.limits(257, 16, torch.bfloat16, 90) and launch.limits(98, 64, torch.float32, 80)


def test_triton_refuses_float64_naming_the_dtype():
    p, s, _, _ = make_case(2, 3, 4, 2, 8, masked=False, seed=1, dtype=F64)
    with pytest.raises(ImplUnavailableError, match="dtype float64"):
        patch_sentence_ot_scores(p, s, impl="triton")
    assert patch_sentence_ot_scores(p, s, impl="chunked").dtype == F64


def test_custom_op_under_torch_compile():
    B, G, K, S, D = 2, 3, 4, 3, 16
    p, s, smask, pmask = make_case(B, G, K, S, D, masked=True, seed=4)
    torch.library.opcheck(
        torch.ops.mlip_fast.patch_sentence_ot_scores_fwd.default,
        (p, s, smask, pmask, 0.05, 5, None),
        test_utils=("test_schema", "test_faketensor"),
    )

    def loss_fn(p_, s_):
        scores, _, _ = patch_sentence_ot_scores_fwd(p_, s_, smask, pmask, 0.05, 5, None)
        return (scores * torch.arange(G)).sum()

    assert_compiled_grads_equal(loss_fn, p, s)


BAD_INPUTS = [  # (what to change, error type, message)
    (dict(patches=torch.randn(2, 4)), ValueError, r"patches must have shape \[B, K, D\]"),
    (dict(sentences=torch.randn(3, 2, 8, dtype=F64)), TypeError, "differs from patches dtype"),
    (dict(sentences=torch.randn(3, 2, 6)), ValueError, "embedding widths differ"),
    (dict(patches=torch.randn(2, 0, 8)), ValueError, "empty input"),
    (dict(patches=torch.randint(0, 3, (2, 4, 8))), TypeError, "floating"),
    (dict(patches=torch.full((2, 4, 8), float("nan"))), ValueError, "NaN or Inf"),
    (dict(sentence_mask=torch.ones(3, 3, dtype=torch.bool)), ValueError, r"sentence_mask must have shape \(3, 2\)"),
    (dict(patch_mask=torch.ones(2, 4)), TypeError, "patch_mask must be a bool"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=float("inf")), ValueError, "eps must be a finite number > 0"),
    (dict(eps=True), ValueError, "eps must be a finite number > 0"),
    (dict(n_iter=0), ValueError, "n_iter must be an integer >= 1"),
    (dict(n_iter=2.5), ValueError, "n_iter must be an integer >= 1"),
    (dict(tol=-1e-3), ValueError, "tol must be None or a finite number >= 0"),
    (dict(tol=float("nan")), ValueError, "tol must be None or a finite number >= 0"),
    (dict(impl="fast"), ValueError, "unknown impl 'fast'"),
]


@pytest.mark.parametrize("change,error,message", BAD_INPUTS)
def test_bad_inputs_are_refused_naming_the_argument(change, error, message):
    args = dict(patches=torch.randn(2, 4, 8), sentences=torch.randn(3, 2, 8), sentence_mask=None, patch_mask=None,
                eps=0.05, n_iter=3, tol=None, impl="auto", **{})
    args.update(change)
    with pytest.raises(error, match=message):
        patch_sentence_ot_scores(args.pop("patches"), args.pop("sentences"), args.pop("sentence_mask"),
                                 args.pop("patch_mask"), **args)
