"""The chunked OT op's CPU Sinkhorn kernel (``kernels/patch_sentence_ot/sinkhorn_cpu.c``, launched by
``kernels/patch_sentence_ot/cpu.py``) against the float64 log-domain reference, with and without absorptions, and
its build: cached by key, switched off by the environment, a failed build falling back with a warning.

Tolerances: the kernel iterates in fp32 on exponents z = sim / eps of size <= 1 / eps (20 at eps = 0.05); each
plan entry carries fp32 rounding of about 1e-6 relative (|z| * 2^-24 plus the sums' K or S terms), the Sinkhorn map
does not expand it, but the gauge of the potentials (a constant moved from f to g) is not pinned and takes up
rounding over the iterations: live potentials (of the same size as z) are checked to 3e-5 absolute, scores to 2e-5
of their scale (the op's fp32 tolerance in ``test_patch_sentence_ot_fused.py``). Observed: potentials up to 5.4e-6
after 20-25 iterations (9e-6 after 50), scores 3.3e-7 of scale.
"""
import math
import warnings

import pytest
import torch

from mlip_fast.kernels.patch_sentence_ot import cpu
from mlip_fast.ops.patch_sentence_ot import chunked
from mlip_fast.reference.patch_sentence_ot import DEAD, log_marginals, sinkhorn_potentials
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_scores
from mlip_fast.testing.patch_sentence_ot import make_case

F64 = torch.float64


def test_kernel_builds_where_a_compiler_exists():
    if cpu._compiler() is None:  # noqa: SLF001  (the probe the build itself uses)
        assert cpu.library() is None and "unavailable" in cpu.status()
        return
    assert cpu.library() is not None, cpu.status()
    assert cpu.status() == "c" and cpu.runs(torch.device("cpu"), torch.float32)
    assert not cpu.runs(torch.device("cpu"), torch.float64)


needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no C compiler on this machine (checked above)")


def tile(n, k, s, seed, eps=0.05, dead_pairs=True):
    """z [n, k, s] of unit vectors / eps with padded patches and sentences (DEAD off the live entries), a pair
    whose report has no valid sentence, and the live masks and log marginals the op builds."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.functional.normalize(torch.randn(n, k, 24, generator=g, dtype=F64), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(n, s, 24, generator=g, dtype=F64), dim=-1)
    live_p = torch.rand(n, k, generator=g) < 0.8
    live_q = torch.rand(n, s, generator=g) < 0.7
    live_p[:, 0], live_q[:, 0] = True, True
    if dead_pairs and n > 2:
        live_q[2], live_p[2] = False, False  # a report without sentences: nothing of the pair is live
    sim = p @ q.transpose(1, 2)
    z = torch.where(live_p[:, :, None] & live_q[:, None, :], sim / eps, torch.full((), DEAD, dtype=F64))
    return sim, z, live_p, live_q


def check_against_reference(n, k, s, seed, n_iter, lo, hi):
    sim, z, live_p, live_q = tile(n, k, s, seed)
    got = cpu.sinkhorn(z.float(), live_p, live_q, log_marginals(live_p, torch.float32),
                       log_marginals(live_q, torch.float32), n_iter, lo, hi)
    assert got is not None
    f, g, score = got
    f_ref, g_ref = sinkhorn_potentials(sim, live_p, live_q, 0.05, n_iter)
    assert torch.allclose(f.double()[live_p], f_ref[live_p], rtol=0, atol=3e-5)
    assert torch.allclose(g.double()[live_q], g_ref[live_q], rtol=0, atol=3e-5)
    plan = torch.exp(f_ref[:, :, None] + g_ref[:, None, :] + z)
    score_ref = (plan * z).sum((1, 2))  # the kernel returns score / eps
    assert torch.allclose(score.double(), score_ref, rtol=0, atol=2e-5 * score_ref.abs().max().item())
    return f, g, score


@needs_kernel
@pytest.mark.parametrize("n", [1, 16, 37])  # one pair in a lane group, a whole group, groups and a ragged tail
@pytest.mark.parametrize("k,s", [(32, 12), (7, 3), (1, 1), (70, 17)])
def test_iterations_match_fp64_log_domain(n, k, s):
    before = dict(cpu.STATS)
    check_against_reference(n, k, s, seed=n + 7 * k + s, n_iter=20, lo=math.exp(-16), hi=math.exp(16))
    assert cpu.STATS["tiles"] == before["tiles"] + 1


@needs_kernel
def test_absorptions_keep_the_log_domain_iterates():
    # a scaling range of [e^-0.5, e^0.5] makes most groups stop and absorb, many times, at both half-steps
    before = cpu.STATS["absorptions"]
    check_against_reference(45, 9, 5, seed=3, n_iter=25, lo=math.exp(-0.5), hi=math.exp(0.5))
    assert cpu.STATS["absorptions"] - before > 20


@needs_kernel
def test_zero_iterations_and_nan():
    sim, z, live_p, live_q = tile(20, 6, 4, seed=5)
    la, lb = log_marginals(live_p, torch.float32), log_marginals(live_q, torch.float32)
    f, g, _ = cpu.sinkhorn(z.float(), live_p, live_q, la, lb, 0, math.exp(-16), math.exp(16))
    assert torch.equal(f, torch.zeros_like(f)) and torch.equal(g, torch.zeros_like(g))  # u = v = 1
    z = z.float()
    z[4, 0, 0] = float("nan")  # a NaN similarity poisons its pair (as in the PyTorch loop), and only that pair
    f, g, score = cpu.sinkhorn(z, live_p, live_q, la, lb, 5, math.exp(-16), math.exp(16))
    assert torch.isnan(score[4]) and torch.isfinite(torch.cat([score[:4], score[5:]])).all()


def op_case(B=6, G=5, K=9, S=4, D=16, seed=0):
    return make_case(B, G, K, S, D, masked=True, seed=seed)


@needs_kernel
def test_chunked_op_runs_the_kernel_and_matches_the_reference():
    p, s, smask, pmask = op_case()
    before = cpu.STATS["tiles"]
    out = chunked.patch_sentence_ot_scores_chunked(p, s, smask, pmask, 0.05, 30, normalize=True)
    assert cpu.STATS["tiles"] > before
    ref = reference_scores(p.double(), s.double(), smask, pmask, 0.05, 30, normalize=True)
    assert torch.allclose(out.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())
    assert chunked.IMPL.detail({"device": torch.device("cpu"), "dtype": torch.bfloat16}) == {"sinkhorn": "c"}


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MLIP_FAST_CPU_KERNELS", "0")
    assert not cpu.runs(torch.device("cpu"), torch.float32)
    assert cpu.status() == "pytorch (MLIP_FAST_CPU_KERNELS=0)"
    p, s, smask, pmask = op_case(seed=1)
    before = dict(cpu.STATS)
    out = chunked.patch_sentence_ot_scores_chunked(p, s, smask, pmask, 0.05, 30, normalize=True)
    assert cpu.STATS == before  # the PyTorch loop ran
    ref = reference_scores(p.double(), s.double(), smask, pmask, 0.05, 30, normalize=True)
    assert torch.allclose(out.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """An empty build cache and no decided library; the module's state is restored afterwards."""
    monkeypatch.setenv("MLIP_FAST_CACHE", str(tmp_path))
    saved = dict(cpu._state)  # noqa: SLF001
    cpu._state.clear()  # noqa: SLF001
    yield tmp_path
    cpu._state.clear()  # noqa: SLF001
    cpu._state.update(saved)  # noqa: SLF001


@needs_kernel
def test_build_is_cached_under_a_key_of_source_compiler_flags_and_cpu(fresh_state, monkeypatch):
    first = cpu._build()  # noqa: SLF001
    assert first.is_file() and first.is_relative_to(fresh_state / "native")
    stamp = first.stat().st_mtime_ns
    assert cpu._build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    monkeypatch.setattr(cpu, "FLAGS", cpu.FLAGS + ("-DMLIP_TEST_FLAG",))
    assert cpu._build() != first  # other flags: another key
    assert list(fresh_state.rglob("*.so")) and not [x for x in fresh_state.rglob("tmp*")]  # no partial file left


def test_failed_build_warns_once_and_the_op_falls_back(fresh_state, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.library() is None  # decided once, no second warning
    assert cpu.status().startswith("pytorch (C kernel unavailable: RuntimeError")
    p, s, smask, pmask = op_case(seed=2)
    out = chunked.patch_sentence_ot_scores_chunked(p, s, smask, pmask, 0.05, 30, normalize=True)
    ref = reference_scores(p.double(), s.double(), smask, pmask, 0.05, 30, normalize=True)
    assert torch.allclose(out.double(), ref, rtol=0, atol=2e-5 * ref.abs().max().item())


def test_tile_buffers_are_reused_and_never_leak_into_results():
    p, s, smask, pmask = op_case(seed=3)
    first = chunked.patch_sentence_ot_scores_chunked(p, s, smask, pmask, 0.05, 30, normalize=True)
    kept = first.clone()
    z_buffer = cpu.workspace("z", (1,)).data_ptr()
    p2, s2, smask2, pmask2 = op_case(B=4, G=7, K=5, S=3, seed=4)  # other shapes write the same buffers
    chunked.patch_sentence_ot_scores_chunked(p2, s2, smask2, pmask2, 0.05, 30, normalize=True)
    assert torch.equal(first, kept)  # the scores of the first call are not views of a reused buffer
    again = chunked.patch_sentence_ot_scores_chunked(p, s, smask, pmask, 0.05, 30, normalize=True)
    assert torch.equal(again, first)  # what the buffers held before does not change a number
    assert cpu.workspace("z", (1,)).data_ptr() == z_buffer  # reused, not reallocated


@needs_kernel
@pytest.mark.parametrize("bc,k,gc,s", [(3, 5, 4, 3), (10, 32, 64, 12), (1, 1, 1, 1), (7, 9, 5, 7)])
def test_backward_plan_tile_matches_the_pytorch_steps(bc, k, gc, s):
    """mlip_ot_plan = exp(m / eps + f + g) * w: the PyTorch loop's fp32 steps in their order, so only exp differs
    (the kernel's about 1e-7 relative, ATen's about 1 ulp: checked at 4e-7 of each entry, values below FLT_MIN
    flushed to 0 by the kernel); against fp64 the exponent's own fp32 rounding (|x| 2^-24, |x| <= 40 here) adds up
    to 2.4e-6 relative (checked at 4e-6). -inf and DEAD potentials give exactly 0; row tails of any length (gc * s
    not a multiple of the 16 lanes)."""
    gen = torch.Generator().manual_seed(bc * 100 + k)
    sim = torch.rand(bc, k, gc, s, generator=gen) * 2 - 1
    f = torch.randn(bc, gc, k, generator=gen) - 5
    g = torch.randn(bc, gc, s, generator=gen) - 5
    w = torch.rand(bc, gc, generator=gen)
    f[0, 0, 0], g[-1, -1, -1] = float("-inf"), DEAD
    m = sim.clone()
    assert cpu.plan_(m, f, g, w, 0.05)
    steps = sim.div(0.05).add_(f.transpose(1, 2)[..., None]).add_(g[:, None]).exp_().mul_(w[:, None, :, None])
    assert torch.allclose(m, steps, rtol=4e-7, atol=torch.finfo(torch.float32).tiny)
    ref = ((sim.double() / 0.05 + f.double().transpose(1, 2)[..., None] + g.double()[:, None]).exp()
           * w.double()[:, None, :, None])
    assert torch.allclose(m.double(), ref, rtol=4e-6, atol=torch.finfo(torch.float32).tiny)
    assert (m[0, 0, 0] == 0).all() and (m[-1, :, -1, -1] == 0).all()
    assert not cpu.plan_(sim.double(), f.double(), g.double(), w.double(), 0.05)  # fp64: the caller's PyTorch steps


@needs_kernel
def test_python_pool_split_equals_the_openmp_split(monkeypatch):
    """A build without OpenMP splits the lane groups over a Python pool instead: the same numbers to the bit, forced
    absorptions included."""
    sim, z, live_p, live_q = tile(45, 9, 5, seed=8)
    la, lb = log_marginals(live_p, torch.float32), log_marginals(live_q, torch.float32)
    args = (z.float(), live_p, live_q, la, lb, 25, math.exp(-0.5), math.exp(0.5))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = cpu.sinkhorn(*args)
        monkeypatch.setattr(cpu.library(), "mlip_openmp", lambda: 0)
        second = cpu.sinkhorn(*args)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@needs_kernel
def test_portable_build_gives_the_native_builds_numbers(monkeypatch, tmp_path):
    """Built without -march=native and without OpenMP, the Sinkhorn kernel (absorptions included) and the backward's
    plan tile compute the same bits as the native build."""
    from mlip_fast.kernels import _native

    sim, z, live_p, live_q = tile(45, 9, 5, seed=8)
    la, lb = log_marginals(live_p, torch.float32), log_marginals(live_q, torch.float32)
    args = (z.float(), live_p, live_q, la, lb, 25, math.exp(-0.5), math.exp(0.5))
    m = torch.rand(3, 5, 4, 3) * 2 - 1
    plan_args = (torch.randn(3, 4, 5) - 5, torch.randn(3, 4, 3) - 5, torch.rand(3, 4), 0.05)
    native, native_plan = cpu.sinkhorn(*args), m.clone()
    assert cpu.plan_(native_plan, *plan_args)
    monkeypatch.setenv("MLIP_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu, "_build", lambda: _native.build(cpu.SOURCE, _native.FLAGS, (), openmp=False))
    monkeypatch.setattr(cpu, "_state", {})
    assert not cpu.library().mlip_openmp()
    portable, portable_plan = cpu.sinkhorn(*args), m.clone()
    assert cpu.plan_(portable_plan, *plan_args)
    assert all(torch.equal(a, b) for a, b in zip(native, portable)) and torch.equal(native_plan, portable_plan)


def _ot_case(B, G, K, S, seed):
    gen = torch.Generator().manual_seed(seed)
    p, s = torch.randn(B, K, 16, generator=gen), torch.randn(G, S, 16, generator=gen)
    smask, pmask = torch.rand(G, S, generator=gen) < 0.8, torch.rand(B, K, generator=gen) < 0.9
    smask[:, 0], pmask[:, 0], smask[1] = True, True, False
    return p, s, smask, pmask


def _forward_both_ways(monkeypatch, args):
    """The op's forward with the kernel's buffers for all pairs (PairSinkhorn; its tiles counted) and tile by tile
    with z formed in PyTorch (transpose, division, DEAD fills, lane copy)."""
    tiles, tile = [], cpu.PairSinkhorn.tile
    monkeypatch.setattr(cpu.PairSinkhorn, "tile", lambda self, n0, *args: (tiles.append(n0), tile(self, n0, *args)))
    pairs = chunked.chunked_fwd(*args)
    ran = cpu.STATS["tiles"]
    monkeypatch.setattr(chunked, "PAIR_TILES", 0)
    through_z = chunked.chunked_fwd(*args)
    assert cpu.STATS["tiles"] > ran  # the second call still ran the kernel, from the PyTorch-formed z
    return pairs, through_z, tiles


@needs_kernel
@pytest.mark.parametrize("B,G,K,S,tile", [
    (64, 64, 32, 12, 2**18),  # the default run: 7 tiles of 10 image rows
    (24, 16, 6, 4, 2**12),    # 3 tiles of 10 rows = 10 lane groups each
    (5, 3, 7, 3, 2**12),      # one tile, one ragged lane group
    (40, 33, 9, 5, 2**16),    # one tile, 82.5 lane groups
    (40, 32, 9, 5, 2**15),    # tiles of 22 rows = 44 lane groups, then 18 rows
])
def test_pair_buffers_give_the_tile_by_tile_bits(B, G, K, S, tile, monkeypatch):
    """Where the tiles already hold whole lane groups, the kernel forming z from each GEMM tile in buffers made once
    for all pairs returns the bits of the tile-by-tile path: masked patches, a report without valid sentences."""
    args = (*_ot_case(B, G, K, S, B + K), 0.04, 30, None, tile, 16.0, True)
    monkeypatch.setattr(chunked, "PAIR_TILES", 1)  # the tile path's tiling (a GEMM of another size may round otherwise)
    pairs, through_z, tiles = _forward_both_ways(monkeypatch, args)
    rows = max(1, min(B, tile // (G * K * S)))
    assert tiles == [b * G for b in range(0, B, rows)]
    assert all(torch.equal(a, b) for a, b in zip(pairs, through_z))


@needs_kernel
def test_large_grids_keep_the_tile_path(monkeypatch):
    """The pair buffers (about 8 x B G (K + S) floats) are made only when B G (K + S) fits a tile: the 64 x 64 pairs
    of 44 entries at tiles of 2^16 cells go tile by tile (PERF.md's memory target at the CPU target shape)."""
    args = (*_ot_case(64, 64, 32, 12, 9), 0.04, 30, None, 2**16, 16.0, True)
    pairs, through_z, tiles = _forward_both_ways(monkeypatch, args)
    assert tiles == [] and all(torch.equal(a, b) for a, b in zip(pairs, through_z))


@needs_kernel
def test_pair_tiles_are_larger_with_the_same_bits_at_the_default_runs_shape(monkeypatch):
    """At the default run's shape (64 x 64 pairs of 32 patches x 12 sentences, D 64) the pair path's 8x larger tiles
    (one GEMM tile instead of 7) give the bits of the tile path."""
    args = (*_ot_case(64, 64, 32, 12, 5), 0.04, 30, None, 2**18, 16.0, True)
    args = (args[0].repeat(1, 1, 4), args[1].repeat(1, 1, 4), *args[2:])
    pairs, through_z, tiles = _forward_both_ways(monkeypatch, args)
    assert tiles == [0]
    assert all(torch.equal(a, b) for a, b in zip(pairs, through_z))


@needs_kernel
def test_pair_buffers_round_tiles_up_to_whole_lane_groups(monkeypatch):
    """33 reports: tiles of 22 image rows (726 pairs) would cut lane groups, so the pair path takes 32 rows a tile
    (a different GEMM tiling: equal up to its rounding)."""
    args = (*_ot_case(40, 33, 9, 5, 3), 0.04, 30, None, 2**15, 16.0, True)
    monkeypatch.setattr(chunked, "PAIR_TILES", 1)
    pairs, through_z, tiles = _forward_both_ways(monkeypatch, args)
    assert tiles == [0, 32 * 33]
    for a, b in zip(pairs, through_z):
        live = torch.isfinite(b)
        assert torch.equal(live, torch.isfinite(a))
        torch.testing.assert_close(a[live], b[live], rtol=2e-5, atol=2e-5)
