"""Benchmarks of patch_sentence_scores: providers (reference, chunked, triton and the peers of
``benchmarks/peers.py``) x modes (fwd, bwd, full) x named shapes, with peak memory (mode "full") and the
environment in ``extra_info``.

GPU shapes follow PERF.md (B=G in {32, 128, 256, 512} and 128 x 1024 local x gathered, K in {98, 196}, S=16,
D in {256, 512}, bf16). On CPU only the CPU target shape (B=G=128, K=98, S=16, D=256, fp32) and a small one
run, for reference, chunked, ``torch.compile(reference)`` and maxsim-cpu; triton runs on CUDA only (the
interpreter measures nothing useful). A peer's output is checked against the reference first: a wrong peer is
recorded as wrong at that shape (``extra_info["wrong"]``) and not timed; a missing one is skipped with the
reason. Value checks are off in every timed region (no host synchronisation but the op's own).

    pytest benchmarks/bench_patch_sentence.py --benchmark-only --benchmark-json out.json
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import harness, peers
from mlip_fast import _checks
from mlip_fast.ops import patch_sentence_scores

ON_CUDA = torch.cuda.is_available()
OWN = ["reference", "chunked", "triton"]
PEERS = [name for name, peer in peers.PEERS.items() if ("cuda" if ON_CUDA else "cpu") in peer.devices]
PROVIDERS = OWN + PEERS
MODES = ["fwd", "bwd", "full"]

GPU_SHAPES = {  # name -> (B, G, K, S, D)
    f"b{b}x{g}-k{k}-d{d}": (b, g, k, 16, d)
    for b, g in ((32, 32), (128, 128), (256, 256), (512, 512), (128, 1024))
    for k in (98, 196)
    for d in (256, 512)
}
CPU_SHAPES = {
    "cpu-small-b16-k49-d64": (16, 16, 49, 8, 64),
    "cpu-target-b128-k98-d256": (128, 128, 98, 16, 256),
}
SHAPES = GPU_SHAPES if ON_CUDA else CPU_SHAPES
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = "bfloat16" if ON_CUDA else "float32"


def make_inputs(B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """L2-normalised patches [B, K, D] and sentences [G, S, D] (requires_grad), a ragged sentence mask
    [G, S] (each report keeps S/2..S sentences) and upstream gradients (gi, gt) [B, G]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    p = torch.nn.functional.normalize(torch.randn(B, K, D, generator=gen, device=device), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(G, S, D, generator=gen, device=device), dim=-1)
    lengths = torch.randint(max(1, S // 2), S + 1, (G,), generator=gen, device=device)
    smask = torch.arange(S, device=device)[None, :] < lengths[:, None]
    gi = torch.randn(B, G, generator=gen, device=device)
    gt = torch.randn(B, G, generator=gen, device=device)
    return p.to(dt).requires_grad_(), s.to(dt).requires_grad_(), smask, gi, gt


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


_BUILT = {}


def forward(provider, p, s, smask):
    if provider in OWN:
        return patch_sentence_scores(p, s, smask, impl=provider)
    if provider not in _BUILT:
        _BUILT[provider] = peers.build(provider, p.device)
    return _BUILT[provider](p, s, smask)


def peer_check(provider, p, s, smask) -> dict:
    """{"ok", "max_rel_err"} of a peer at these inputs (the tolerance of their dtype); ours pass through."""
    if provider in OWN:
        return {"ok": True}
    rtol = 1e-4 if p.dtype == torch.float32 else 2e-2
    return peers.check_peer(lambda a, b, m: forward(provider, a, b, m), p, s, smask, rtol)


def backward(out, p, s, gi, gt):
    i2t, t2i = out
    return torch.autograd.grad((i2t * gi).sum() + (t2i * gt).sum(), (p, s))


def make_step(provider, mode, B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """A zero-argument callable running one ``mode`` ("fwd" or "full") step on fresh inputs; used for
    timing and by the fresh-process memory probe (``harness.cpu_peak_memory``). Value checks are off."""
    _checks.VALUE_CHECKS = False
    p, s, smask, gi, gt = make_inputs(B, G, K, S, D, dtype, device, seed)

    def step():
        out = forward(provider, p, s, smask)
        if mode == "full":
            out = backward(out, p, s, gi, gt)
        _sync(device)
        return out

    return step


def make_loss_step(provider, mode, B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """Like :func:`make_step` for the patch-sentence *loss* (local mode, one process: one scores call with both
    directions, then the symmetric cross-entropy); "full" back-propagates it to patches and sentences. G must
    equal B (each image has its own report)."""
    from mlip_fast.functional import patch_sentence_loss

    _checks.VALUE_CHECKS = False
    p, s, smask, _, _ = make_inputs(B, G, K, S, D, dtype, device, seed)

    def step():
        loss = patch_sentence_loss(p, s, smask, impl=provider)
        out = torch.autograd.grad(loss, (p, s)) if mode == "full" else loss
        _sync(device)
        return out

    return step


def op_peak_memory(provider, B, G, K, S, D, dtype, device, factory="make_step", mode="full"):
    """Peak bytes of one ``mode`` step ("fwd" or "full" = fwd+bwd) above the inputs, and the bytes of the input
    gradients it returns (0 for the forward)."""
    if torch.device(device).type == "cuda":
        peak = harness.cuda_peak_memory(globals()[factory](provider, mode, B, G, K, S, D, dtype, device), device)
    else:
        kwargs = dict(provider=provider, mode=mode, B=B, G=G, K=K, S=S, D=D, dtype=dtype, device=device)
        peak = harness.cpu_peak_memory(f"benchmarks.bench_patch_sentence:{factory}", kwargs)
    grads = (B * K + G * S) * D * getattr(torch, dtype).itemsize if mode == "full" else 0
    return peak, grads


def flops(B, G, K, S, D, mode):
    """PERF.md's count: forward 2*B*G*K*S*D, backward from argmax 4*B*G*K*S*D."""
    unit = 2 * B * G * K * S * D
    return {"fwd": unit, "bwd": 2 * unit, "full": 3 * unit}[mode]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patch_sentence(benchmark, bench_env, provider, mode, shape, monkeypatch):
    if provider == "triton" and not ON_CUDA:
        pytest.skip("triton is benchmarked on CUDA only (the CPU interpreter is ~250x slower than torch)")
    if provider in peers.PEERS:
        why = peers.unavailable(provider, DEVICE)
        if why:
            pytest.skip(why)
        if mode != "fwd" and not peers.PEERS[provider].backward:
            pytest.skip(f"{provider} has no backward")
        if provider == "compiled" and benchmark.disabled and shape == "cpu-target-b128-k98-d256":
            pytest.skip("compiling the grid at the target shape takes minutes: run with --benchmark-only")
    monkeypatch.setattr(_checks, "VALUE_CHECKS", False)
    B, G, K, S, D = SHAPES[shape]
    benchmark.group = f"patch_sentence-{mode}-{shape}"
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(
        provider=provider, mode=mode, shape=shape, B=B, G=G, K=K, S=S, D=D, dtype=DTYPE, flop=flops(B, G, K, S, D, mode)
    )
    p, s, smask, gi, gt = make_inputs(B, G, K, S, D, DTYPE, DEVICE, seed=1)
    check = peer_check(provider, p, s, smask)
    if not check["ok"]:
        benchmark.extra_info.update(wrong=check)
        pytest.skip(f"{provider} is wrong at {shape} (max relative error {check['max_rel_err']:.3g}): not timed")
    if mode == "full" and not (benchmark.disabled and provider == "compiled"):
        peak, grads = op_peak_memory(provider, B, G, K, S, D, DTYPE, DEVICE)
        benchmark.extra_info.update(peak_memory_bytes=peak, input_grad_bytes=grads)
    if mode == "bwd":
        def setup():
            return (forward(provider, p, s, smask),), {}

        def run_bwd(out):
            grads = backward(out, p, s, gi, gt)
            _sync(DEVICE)
            return grads

        forward(provider, p, s, smask)  # warm-up (JIT) outside the timing
        benchmark.pedantic(run_bwd, setup=setup, rounds=3 if not ON_CUDA else 20, iterations=1, warmup_rounds=1)
        return

    def run():
        out = forward(provider, p, s, smask)
        if mode == "full":
            out = backward(out, p, s, gi, gt)
        _sync(DEVICE)
        return out

    run()  # warm-up (JIT) outside the timing
    benchmark(run)
