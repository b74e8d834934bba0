"""The packed self-attention with dropout (``mlip_fast.ops.varlen_attention``, C kernel
``kernels/varlen_attention/attention_cpu.c``) against the float64 reference (``mlip_fast.reference.varlen_attention``:
one row and head at a time, the mask rebuilt in numpy), its mask's statistics, determinism and the op's contract;
the hashed flat dropout of the same C source (``mlip_fast.ops.hash_dropout``) against its numpy mask.

Tolerances: the reference gets the kernel's fp32 inputs in fp64. The kernel computes in fp32 with sums of dh
products (scores) and L terms (softmax, the product with v, the gradients' sums over rows), each carrying about
2^-24 relative rounding times the terms' count, and its own exp (relative error about 1e-7): outputs are checked to
2e-6 and qkv gradients to 4e-6 of their largest magnitude (16 and 33 fp32 ulps of it). Observed over the cases:
outputs 6.7e-7, gradients 1.3e-6 of the largest magnitude.
"""
import math

import pytest
import torch

from mlip_fast.ops import varlen_attention as op
from mlip_fast.ops.hash_dropout import hash_dropout
from mlip_fast.ops.hash_dropout import kernel_runs as hash_kernel_runs
from mlip_fast.reference.varlen_attention import flat_keep, keep_mask
from mlip_fast.reference.varlen_attention import varlen_attention as reference

needs_kernel = pytest.mark.skipif(not op.kernel_runs(torch.zeros(1)), reason="the C kernel is not built here")


def case(lengths, heads, dh, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    qkv = torch.randn(int(lengths.sum()), 3 * heads * dh, generator=g, dtype=torch.float64) * 1.5
    return qkv, offsets


@needs_kernel
@pytest.mark.parametrize("lengths,heads,dh", [([5, 1, 17, 9, 33], 4, 8), ([57, 64, 16, 2], 4, 32),
                                              ([3, 0, 70, 1], 2, 24), ([1], 1, 16), ([130, 20], 3, 64)])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_forward_and_backward_match_fp64_reference(lengths, heads, dh, p):
    qkv, offsets = case(lengths, heads, dh, seed=len(lengths))
    scale = 1 / math.sqrt(dh)
    x = qkv.float().requires_grad_()
    out = op.varlen_attention(x, offsets, heads, scale, p, seed=1234)
    x64 = x.detach().double().requires_grad_()  # the same fp32 inputs, computed in fp64
    ref = reference(x64, offsets, heads, scale, p, seed=1234)
    grad = torch.randn_like(ref)
    out.backward(grad.float())
    ref.backward(grad)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6 * ref.abs().max().item())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=4e-6 * x64.grad.abs().max().item())


def test_mask_drops_the_effective_probability_independently():
    """Over 4 rows x 4 heads of 200 tokens (160,000 elements) the dropped share is p' = round(p 65536) / 65536 within
    5 binomial standard deviations, per 16-bit word position, and neighbours are uncorrelated."""
    p = 0.1
    keep = torch.cat([keep_mask(99, first, 200, 4, p).reshape(-1) for first in (0, 200, 400, 600)])
    n, pd = keep.numel(), round(p * 65536) / 65536
    sd = math.sqrt(pd * (1 - pd) / n)
    assert abs((~keep).double().mean().item() - pd) < 5 * sd
    for lane in range(4):  # every 16-bit piece of a word
        part = keep.view(-1, 4)[:, lane]
        assert abs((~part).double().mean().item() - pd) < 5 * math.sqrt(pd * (1 - pd) / part.numel())
    drop = (~keep).double()
    both = (drop[1:] * drop[:-1]).mean().item()
    assert abs(both - pd * pd) < 5 * math.sqrt(pd * pd / n)
    assert not torch.equal(keep_mask(1, 0, 50, 2, p), keep_mask(2, 0, 50, 2, p))  # the seed decides the draws


@needs_kernel
def test_kernel_uses_exactly_the_reference_mask():
    """At p = 0.5 the output of a row with v = one-hot columns reads the mask back: the kernel's kept set equals the
    reference's, element for element."""
    heads, dh, length = 2, 16, 40
    qkv = torch.zeros(length, 3 * heads * dh)
    qkv[:, 2 * heads * dh:].view(length, heads, dh)[:, :, 0] = 1.0  # v = 1 in column 0 of every head
    offsets = torch.tensor([0, length])
    keep = keep_mask(7, 0, length, heads, 0.5)  # [H, L, L]; q = k = 0: uniform probabilities 1 / L
    out = op.varlen_attention(qkv, offsets, heads, 1.0, 0.5, seed=7).view(length, heads, dh)[:, :, 0]
    expected = keep.double().sum(-1).T / length * 2.0
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)


@needs_kernel
def test_deterministic_across_thread_counts_and_repeatable():
    qkv, offsets = case([57, 64, 16, 2, 33, 8], 4, 32, seed=3)
    x = qkv.float()
    grad = torch.randn(x.shape[0], x.shape[1] // 3)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            xi = x.clone().requires_grad_()
            out = op.varlen_attention(xi, offsets, 4, 0.2, 0.1, seed=5)
            out.backward(grad)
            results.append((out.detach(), xi.grad))
    finally:
        torch.set_num_threads(threads)
    for out, g in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(g, results[0][1])
    other = op.varlen_attention(x, offsets, 4, 0.2, 0.1, seed=6)
    assert not torch.equal(other, results[0][0])


@needs_kernel
def test_custom_op_contract():
    qkv, offsets = case([5, 9, 1], 2, 16, seed=4)
    torch.library.opcheck(torch.ops.mlip_fast.varlen_attention_fwd.default, (qkv.float().requires_grad_(), offsets,
                                                                               2, 0.25, 0.1, 11))


def test_fallback_and_fp64_take_the_reference():
    """fp64 (and any input where the kernel does not run) computes the reference itself, with the same mask."""
    qkv, offsets = case([6, 3], 2, 8, seed=5)
    out = op.varlen_attention(qkv, offsets, 2, 0.3, 0.2, seed=8)
    assert torch.equal(out, reference(qkv, offsets, 2, 0.3, 0.2, seed=8))


def test_draw_seed_follows_the_generator():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert op.draw_seed(g1) == op.draw_seed(g2)


@pytest.mark.parametrize("args,match", [
    ((torch.zeros(4, 10), torch.tensor([0, 4]), 2), "qkv must be"),
    ((torch.zeros(4, 12), torch.tensor([0, 4], dtype=torch.int32), 2), "offsets must be int64"),
    ((torch.zeros(4, 12), torch.tensor([0, 3]), 2), "rise from 0 to N=4"),
    ((torch.zeros(4, 12), torch.tensor([0, 3, 2, 4]), 2), "rise from 0"),
])
def test_bad_input_is_named(args, match):
    with pytest.raises(ValueError, match=match):
        op.varlen_attention(*args, scale=1.0)


def test_bad_probability_is_named():
    with pytest.raises(ValueError, match="dropout p"):
        op.varlen_attention(torch.zeros(2, 12), torch.tensor([0, 2]), 2, 1.0, p=1.0)


@pytest.mark.parametrize("numel", [467_200, 1001, 3])
def test_hash_dropout_is_the_flat_mask_and_its_own_backward(numel):
    """The C pass keeps exactly the reference's flat mask (any length, threads splitting at word boundaries), scales
    by 65536 / (65536 - k), and its gradient is the same mask times the same scale."""
    x = torch.randn(numel, generator=torch.Generator().manual_seed(numel)).requires_grad_()
    out = hash_dropout(x, 0.1, 77)
    keep = flat_keep(77, numel, 0.1)
    scale = 65536.0 / (65536 - round(0.1 * 65536))
    assert torch.equal(out, x.detach() * keep * scale)
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad, keep * torch.tensor(scale, dtype=torch.float32))
    if numel > 100_000:
        pd = round(0.1 * 65536) / 65536
        assert abs((~keep).double().mean().item() - pd) < 5 * math.sqrt(pd * (1 - pd) / numel)


def test_hash_dropout_contract():
    assert hash_dropout(torch.ones(3), 0.0, 1) is not None
    with pytest.raises(ValueError, match="dropout p"):
        hash_dropout(torch.ones(3), 1.0, 1)
    if hash_kernel_runs(torch.zeros(1)):
        torch.library.opcheck(torch.ops.mlip_fast.hash_dropout.default, (torch.randn(9, 5).requires_grad_(), 0.2, 3))
    x64 = torch.randn(40, dtype=torch.float64)  # not the kernel's dtype: the same mask from the reference
    assert torch.equal(hash_dropout(x64, 0.3, 9) != 0, flat_keep(9, 40, 0.3) & (x64 != 0))


@needs_kernel
def test_python_pool_split_equals_the_openmp_split(monkeypatch):
    """A build without OpenMP splits the items over a Python pool instead: the same numbers to the bit."""
    from mlip_fast.kernels.varlen_attention import cpu

    qkv, offsets = case([57, 64, 16, 2, 33, 8], 4, 32, seed=9)
    x = qkv.float().requires_grad_()
    grad = torch.randn(x.shape[0], x.shape[1] // 3)
    runs = []
    for openmp in (True, False):
        if not openmp:
            monkeypatch.setattr(cpu.library(), "mlip_openmp", lambda: 0)
        x.grad = None
        out = op.varlen_attention(x, offsets, 4, 0.2, 0.1, seed=5)
        out.backward(grad)
        runs.append((out.detach(), x.grad.clone(), hash_dropout(grad, 0.1, 3)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_native_build_uses_openmp_only_with_torchs_runtime(monkeypatch, tmp_path):
    """-fopenmp is tried only when torch's libgomp is loaded (else a second OpenMP runtime would start its own
    threads); the build key covers the shared header, so editing it rebuilds."""
    from mlip_fast.kernels import _native

    if _native.compiler() is None:
        pytest.skip("no C compiler")
    seen = []
    real_run = _native.subprocess.run

    def spy(cmd, **kwargs):
        seen.append(list(cmd))
        return real_run(cmd, **kwargs)

    monkeypatch.setenv("MLIP_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(_native.subprocess, "run", spy)
    source = tmp_path / "k.c"
    source.write_text('#include <stdint.h>\nint64_t k(void) { return 1; }\n')
    monkeypatch.setattr(_native, "openmp_shared", lambda: False)
    plain = _native.build(source, _native.FLAGS, (), openmp=True)
    assert not any("-fopenmp" in c for c in seen[-1])
    monkeypatch.setattr(_native, "openmp_shared", lambda: True)
    with_omp = _native.build(source, _native.FLAGS, (), openmp=True)
    assert "-fopenmp" in seen[-1] and with_omp != plain
    header = tmp_path / "h.h"
    header.write_text("/* v1 */\n")
    monkeypatch.setattr(_native, "HEADERS", (header,))
    first = _native.build(source, _native.FLAGS, ())
    header.write_text("/* v2 */\n")
    assert _native.build(source, _native.FLAGS, ()) != first


@needs_kernel
def test_portable_build_gives_the_native_builds_numbers(monkeypatch, tmp_path):
    """Built without -march=native (the vector width the machine offers) and without OpenMP, the kernel computes
    the same bits: every operation is lane-wise IEEE single precision without fused multiply-add."""
    from mlip_fast.kernels import _native
    from mlip_fast.kernels.varlen_attention import cpu

    qkv, offsets = case([57, 64, 16, 2, 33], 4, 32, seed=12)
    x = qkv.float().requires_grad_()
    grad = torch.randn(x.shape[0], x.shape[1] // 3, generator=torch.Generator().manual_seed(1))
    native = op.varlen_attention(x, offsets, 4, 0.2, 0.1, seed=5)
    native.backward(grad)
    native_grad, x.grad = x.grad, None
    native_drop = hash_dropout(grad, 0.1, 3)
    monkeypatch.setenv("MLIP_FAST_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "NATIVE_FLAGS", ())
    monkeypatch.setattr(cpu, "_build", lambda: _native.build(cpu.SOURCE, _native.FLAGS, (), openmp=False))
    monkeypatch.setattr(cpu, "_state", {})
    assert not cpu.library().mlip_openmp()
    portable = op.varlen_attention(x, offsets, 4, 0.2, 0.1, seed=5)
    portable.backward(grad)
    assert torch.equal(portable, native) and torch.equal(x.grad, native_grad)
    assert torch.equal(hash_dropout(grad, 0.1, 3), native_drop)
