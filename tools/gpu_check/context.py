"""What every section of the GPU check gets (:class:`Context`): the device, the dry-run flag, the time budget,
timing (``triton.testing.do_bench`` median; kernel-only time from ``torch.profiler``), peak memory, the sampled SM
clock, and a dict the sections share results through.
"""
from __future__ import annotations

import statistics
import time

import torch
from torch.autograd import DeviceType

from benchmarks import harness

DEFAULT_BUDGET_S = 630.0


class Context:
    """What every section gets: device, dry-run flag, time budget, timing and memory helpers, shared results."""

    def __init__(self, dry_run: bool, budget_s: float = DEFAULT_BUDGET_S, sampler=None):
        self.torch = torch
        self.dry_run = dry_run
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.shared: dict = {}
        self.sampler = sampler
        self.budget_s = budget_s
        self.started = time.perf_counter()

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def out_of_time(self, need_s: float = 0.0) -> bool:
        """Whether the run's budget leaves less than ``need_s`` seconds."""
        return self.left_s() < need_s

    def time_ms(self, fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
        """Median milliseconds of ``fn()``."""
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
        if not self.dry_run:
            fn()
        times = []
        for _ in range(1 if self.dry_run else 3):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    def kernel_profile(self, fn, match: str = None) -> dict:
        """Per call of ``fn()`` under ``torch.profiler`` (three calls after a warm-up; one in a dry run): the
        summed durations of its GPU kernels (memsets and copies included) and of those whose name contains
        ``match``, the number of kernels and the count of each kernel name (``launches`` and ``kernels``: None
        on CPU); on CPU (dry run) the durations are the ops' self CPU time."""
        iters = 1 if self.dry_run else 3
        if not self.dry_run:
            fn()
        cuda = self.device.type == "cuda"
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(iters):
                fn()
            if cuda:
                torch.cuda.synchronize(self.device)
        if cuda:
            spans = [(e.name, e.time_range.elapsed_us()) for e in prof.events() if e.device_type == DeviceType.CUDA]
            if not spans:  # kernels attached to the ops that launched them
                spans = [(k.name, k.duration) for e in prof.events() for k in getattr(e, "kernels", [])]
        else:
            spans = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
        total = sum(us for _, us in spans) / 1e3 / iters
        matched = None if match is None else sum(us for name, us in spans if match in name) / 1e3 / iters
        names = {}
        for name, _ in spans:
            names[name[:60]] = names.get(name[:60], 0) + 1
        return {"total_ms": total, "matched_ms": matched, "launches": len(spans) / iters if cuda else None,
                "kernels": {k: v / iters for k, v in sorted(names.items(), key=lambda kv: -kv[1])} if cuda else None}

    def kernel_ms(self, fn) -> float:
        """Kernel-only milliseconds of one ``fn()`` (see :meth:`kernel_profile`)."""
        return self.kernel_profile(fn)["total_ms"]

    def peak_bytes(self, fn):
        """Peak bytes allocated over ``fn()`` beyond what was allocated before (None off CUDA)."""
        if self.device.type != "cuda":
            return None
        return harness.cuda_peak_memory(fn, self.device)

    def sm_clock_hz(self):
        """The SM clock sampled over the last 30 s (None without samples)."""
        if self.sampler is None:
            return None
        now = time.time()
        clocks = self.sampler.window(now - 30, now).get("sm_mhz")
        return clocks["median"] * 1e6 if clocks else None
