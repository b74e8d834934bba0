"""pytest-benchmark for integrity-scored masking (score -> Gumbel-top-k -> gather, and its backward).

Providers: ``reference`` (the op's PyTorch impl: noise, topk, sort, gather), ``argsort`` (the unfused
argsort + gather path of :func:`argsort_gather`) and ``triton`` (the fused kernels; CUDA
only, the interpreter is no performance path). Modes: ``fwd`` and ``full`` (forward + backward to the
tokens with a fixed upstream gradient). Shapes: B in {128, 256}, P = 196, C in {768, 1024}, mask ratio
0.5 and 0.25 (K = 98 and 147), bfloat16 tokens and float32 scores; on CPU only the B = 128, C = 768 shapes
run (a CI run executes each case once). ``extra_info`` records the bytes the step must move, the achieved
bandwidth (when timed), and the device and library versions (the shared ``bench_env`` record).
"""
from __future__ import annotations

from typing import Optional

import pytest
import torch

from mlip_fast.ops.dispatch import triton_unavailable_reason
from mlip_fast.ops.integrity_mask import integrity_mask

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
P = 196
DTYPE = torch.bfloat16
if DEVICE.type == "cuda":
    SHAPES = [(b, c, r) for b in (128, 256) for c in (768, 1024) for r in (0.5, 0.25)]
else:
    SHAPES = [(128, 768, 0.5), (128, 768, 0.25)]
PROVIDERS = ["reference", "argsort", "triton"]
MODES = ["fwd", "full"]


def kept_count(P: int, ratio: float) -> int:
    """K = round((1 - r) P), at least 1."""
    return max(1, round((1 - ratio) * P))


def argsort_gather(tokens: torch.Tensor, scores: torch.Tensor, keep: int, temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None):
    """The unfused path the kernel is measured against: Gumbel noise, a full argsort of every row, the first
    K positions sorted ascending, a gather, and the kept softmax mass. Returns (kept, index, integrity)."""
    keys = scores.float() / temperature
    u = torch.rand(keys.shape, device=keys.device, generator=generator).clamp_min(1e-20)
    keys = keys - torch.log(-torch.log(u))
    index = keys.argsort(dim=1, descending=True)[:, :keep].sort(dim=1).values
    kept = tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    integrity = torch.softmax(scores.float(), dim=1).gather(1, index).sum(dim=1)
    return kept, index, integrity


def forward_bytes(B: int, P: int, C: int, keep: int, elem: int) -> int:
    """Bytes the forward must move: kept tokens read and written, scores read, index and integrity written."""
    return 2 * B * keep * C * elem + B * P * 4 + B * keep * 8 + B * 4


def backward_bytes(B: int, P: int, C: int, keep: int, elem: int) -> int:
    """Bytes the backward must move: grad_kept read, every grad_tokens element written once."""
    return B * keep * C * elem + B * P * C * elem


def _triton_skip_reason():
    if DEVICE.type != "cuda":
        return "the triton provider is timed on CUDA only (on CPU it would time the interpreter)"
    return triton_unavailable_reason(DEVICE)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _step(provider: str, mode: str, tokens, scores, keep: int, grad_kept):
    if provider == "argsort":
        run = lambda: argsort_gather(tokens, scores, keep)[0]  # noqa: E731
    else:
        run = lambda: integrity_mask(tokens, scores, keep, seed=3, impl=provider, check_finite=False).kept  # noqa: E731

    def fwd():
        out = run()
        _sync()
        return out

    def full():
        out = torch.autograd.grad(run(), tokens, grad_kept)
        _sync()
        return out

    return fwd if mode == "fwd" else full


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("B,C,ratio", SHAPES, ids=[f"B{b}-C{c}-r{r}" for b, c, r in SHAPES])
def test_integrity_mask(benchmark, bench_env, B, C, ratio, provider, mode):
    if provider == "triton" and _triton_skip_reason():
        pytest.skip(_triton_skip_reason())
    keep = kept_count(P, ratio)
    gen = torch.Generator(device=DEVICE).manual_seed(B + C)
    tokens = torch.randn(B, P, C, device=DEVICE, generator=gen).to(DTYPE).requires_grad_(mode == "full")
    scores = torch.randn(B, P, device=DEVICE, generator=gen)
    grad_kept = torch.randn(B, keep, C, device=DEVICE, generator=gen).to(DTYPE)
    step = _step(provider, mode, tokens, scores, keep, grad_kept)
    step()  # warm-up: kernel compilation and allocator growth stay outside the timing

    elem = tokens.element_size()
    moved = forward_bytes(B, P, C, keep, elem) + (backward_bytes(B, P, C, keep, elem) if mode == "full" else 0)
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(B=B, P=P, C=C, K=keep, dtype=str(DTYPE).replace("torch.", ""), bytes_moved=moved)
    out = benchmark(step)
    assert out is not None
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None and stats.stats.median > 0:
        benchmark.extra_info["GBps_median"] = round(moved / stats.stats.median / 1e9, 2)
