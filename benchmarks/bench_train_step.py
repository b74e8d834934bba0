"""End-to-end MLIP training step: model forward, ``MLIPLoss`` and backward, and an AdamW update, for the
patch-sentence impls "reference" (materialised similarity grid) and the fused one ("chunked" on CPU,
"triton" on CUDA).

- CPU: ``mlip-tiny`` at 64 px, batch 32, fp32: samples/s and the peak RSS of one step (fresh process,
  ``harness.cpu_peak_memory``), reference vs chunked.
- CUDA: ``mlip-vit-b16-bert-base`` (ViT-B/16 at 224 px + BERT-base) under bf16 autocast: samples/s at a
  fixed batch and the largest per-GPU batch that fits before out-of-memory, per impl (a doubling search
  then a bisection; each probe runs one full step). Skipped on CPU.

The step is the model + loss + optimizer work of one DeepSpeed micro-step without the engine (no
gradient all-reduce in one process).

    pytest benchmarks/bench_train_step.py --benchmark-only --benchmark-json out.json
    python benchmarks/bench_train_step.py            # writes benchmarks/results/train_step_<device>.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # as a script (python benchmarks/bench_train_step.py): the repository importable
    sys.path.insert(0, str(HERE.parent))

from benchmarks import harness  # noqa: E402

ON_CUDA = torch.cuda.is_available()
FUSED = "triton" if ON_CUDA else "chunked"
IMPLS = ["reference", FUSED]
CPU_CASE = dict(config="mlip-tiny", batch=32, image_size=64, dtype="float32", device="cpu")
GPU_CASE = dict(config="mlip-vit-b16-bert-base", batch=64, image_size=224, dtype="bfloat16", device="cuda")
GPU_BATCH_LIMIT = 8192

_REPORT = ("Heart size is {size}. {effusion} There is {opacity} in the {side} lower lobe. No pneumothorax. "
           "Impression: {impression}.")


def _reports(batch: int) -> list:
    sizes, sides = ("normal", "mildly enlarged", "moderately enlarged"), ("right", "left")
    effusions = ("No pleural effusion.", "Small left pleural effusion.", "Moderate right pleural effusion.")
    return [_REPORT.format(size=sizes[i % 3], effusion=effusions[(i // 3) % 3], side=sides[i % 2],
                           opacity="patchy opacity" if i % 4 else "no focal consolidation",
                           impression="no acute disease" if i % 5 else "possible pneumonia")
            for i in range(batch)]


def make_train_step(impl: str, config: str = "mlip-tiny", batch: int = 64, image_size: int = 64,
                    dtype: str = "float32", device: str = "cpu", seed: int = 0) -> Callable[[], float]:
    """A zero-argument callable running one training step (forward, loss, backward, AdamW) on a fixed
    batch; returns the loss. Also the target of the fresh-process memory probe."""
    from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
    from mlip_fast.models import create_model
    from mlip_fast.preprocess.tokenization import tokenize_reports
    from mlip_fast.train.loop import loss_inputs

    torch.manual_seed(seed)
    model = create_model(config, vision={"image_size": image_size}).to(device)
    model.train()
    criterion = MLIPLoss(impl=impl)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    cfg = model.config
    # the batch's own S, as the training app's collator gives it
    text = tokenize_reports(model.tokenizer, _reports(batch), cfg.text.max_length, cfg.text.max_sentences)
    inputs = {"images": torch.randn(batch, cfg.vision.in_chans, image_size, image_size), **text}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    amp_dtype = getattr(torch, dtype)

    def step() -> float:
        with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype,
                            enabled=amp_dtype != torch.float32):
            outputs = model(inputs)
        outputs = loss_inputs(outputs)  # the training app's precision policy: local embeddings stay half
        loss, _ = criterion(**outputs)
        loss.backward()
        optimizer.step()
        clamp_logit_scales_(model)
        optimizer.zero_grad(set_to_none=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss.detach())

    return step


def largest_batch(fits: Callable[[int], bool], start: int = 8, limit: int = GPU_BATCH_LIMIT) -> int:
    """Largest batch in [1, limit] for which ``fits(batch)`` holds, assuming it holds up to a threshold and
    fails above: doubling from ``start``, then bisection between the last fitting and the first failing
    size. 0 when not even batch 1 fits."""
    lo, hi = 0, None
    b = start
    while b <= limit:
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
            break
    if hi is None:
        return lo
    if lo == 0:
        lo_probe = 0
        for b in range(1, hi):
            if not fits(b):
                return lo_probe
            lo_probe = b
        return lo_probe
    while hi - lo > max(1, lo // 16):  # within ~6% is enough to compare impls
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _cuda_fits(impl: str, batch: int) -> bool:
    step = None
    try:
        step = make_train_step(impl, **{**GPU_CASE, "batch": batch})
        step()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del step
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- benchmarks
@pytest.mark.skipif(ON_CUDA, reason="the CPU case; on CUDA the GPU case runs")
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_cpu(benchmark, bench_env, impl):
    step = make_train_step(impl, **CPU_CASE)
    step()  # warm-up (allocator, first-call dispatch)
    loss = benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    assert loss == loss  # finite
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(impl=impl, **CPU_CASE)
    if not benchmark.disabled:  # a measurement run (the memory probe is a fresh process: seconds)
        peak = harness.cpu_peak_memory("benchmarks.bench_train_step:make_train_step", {"impl": impl, **CPU_CASE})
        benchmark.extra_info["peak_rss_mb"] = round(peak / 2**20, 1)
        benchmark.extra_info["samples_per_s"] = round(CPU_CASE["batch"] / benchmark.stats.stats.mean, 2)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("impl", IMPLS)
def test_train_step_gpu(benchmark, bench_env, impl):
    step = make_train_step(impl, **GPU_CASE)
    step()
    benchmark.pedantic(step, rounds=5, iterations=1, warmup_rounds=1)
    peak = harness.cuda_peak_memory(step, GPU_CASE["device"])
    del step
    torch.cuda.empty_cache()
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(impl=impl, **GPU_CASE, peak_mb=round(peak / 2**20, 1),
                                max_batch=largest_batch(lambda b: _cuda_fits(impl, b)))
    if not benchmark.disabled:
        benchmark.extra_info["samples_per_s"] = round(GPU_CASE["batch"] / benchmark.stats.stats.mean, 2)


def test_largest_batch_search():
    """The search against known thresholds (no device needed)."""
    for threshold in (0, 1, 5, 8, 13, 100, 777, 4096, 10_000):
        calls = []

        def fits(b, t=threshold):
            calls.append(b)
            return b <= t

        found = largest_batch(fits, start=8, limit=8192)
        expected = min(threshold, 8192)
        assert expected - max(1, expected // 16) <= found <= expected, (threshold, found)
        assert len(calls) <= 24


# -------------------------------------------------------------------------------------------- script
def _measure(impl: str, case: dict, rounds: int = 5) -> dict:
    import time

    step = make_train_step(impl, **case)
    step()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    row = {"impl": impl, "config": case["config"], "batch": case["batch"], "image_size": case["image_size"],
           "dtype": case["dtype"], "step_s": round(median, 4), "samples_per_s": round(case["batch"] / median, 2)}
    if case["device"] == "cpu":
        row["peak_rss_mb"] = round(harness.cpu_peak_memory("benchmarks.bench_train_step:make_train_step",
                                                           {"impl": impl, **case}) / 2**20, 1)
    else:
        row["peak_mb"] = round(harness.cuda_peak_memory(step, case["device"]) / 2**20, 1)
        del step
        torch.cuda.empty_cache()
        row["max_batch"] = largest_batch(lambda b: _cuda_fits(impl, b))
    return row


def main(argv: Optional[list] = None) -> Path:
    case = GPU_CASE if ON_CUDA else CPU_CASE
    rows = [_measure(impl, case) for impl in IMPLS]
    out = harness.RESULTS / f"train_step_{'cuda' if ON_CUDA else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": "bench_train_step", "environment": harness.environment(case["device"]), "table": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    for row in rows:
        print(row)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
