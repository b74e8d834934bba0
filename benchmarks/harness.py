"""Shared benchmark harness: environment record, peak-memory measurement, the results folder.

Imported by the pytest-benchmark files (``from benchmarks import harness``; the fixtures are in
``benchmarks/conftest.py``) and by the tools that record results (``tools/``, which also render the README
tables from ``results/``: ``tools/readme_table.py``); also runnable as ``python benchmarks/harness.py probe
MODULE:FACTORY JSON_KWARGS`` (the fresh-process memory probe used on CPU).

Peak memory
-----------
- CUDA: ``torch.cuda.max_memory_allocated`` delta over the step (inputs allocated before the baseline).
- CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the step runs once more
  in a fresh process: a warm-up step (library initialisation), then the kernel's peak-RSS counter (VmHWM) is
  reset through /proc/self/clear_refs and the peak RSS over one step is read back, minus the RSS before it.
  glibc's mmap threshold is pinned at 64 KiB in that process so freed tensors go back to the OS at once
  instead of staying in the heap (which would make the RSS peak depend on the allocation history).
"""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def environment(device=None) -> dict:
    """Machine, device and library versions, for ``benchmark.extra_info`` and result JSON files."""
    import torch

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device is not None and torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device=props.name,
            device_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            driver=_nvidia_driver(),
        )
    else:
        info["device"] = "cpu"
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _nvidia_driver() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def cuda_peak_memory(step: Callable[[], object], device) -> int:
    """Peak bytes allocated on ``device`` during ``step()`` above what was allocated before it."""
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _probe(target: str, kwargs: dict) -> dict:
    """In this (fresh) process: build the step, warm up, then measure one step's peak RSS delta."""
    module, factory = target.split(":")
    step = getattr(importlib.import_module(module), factory)(**kwargs)
    step()  # warm-up: library initialisation and one-off buffers are not the op's memory
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    base = _status_bytes("VmRSS")
    out = step()
    peak = _status_bytes("VmHWM") - base
    del out
    return {"peak_bytes": peak, "baseline_rss_bytes": base}


def cpu_peak_memory(target: str, kwargs: dict, timeout: float = 300) -> int:
    """Peak RSS delta (bytes) of one ``step()`` built by ``target`` ("module:factory", e.g.
    "benchmarks.bench_train_step:make_train_step"; ``factory(**kwargs)`` returns a zero-argument step) in a fresh
    Python process."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "probe", target, json.dumps(kwargs)],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {target} {kwargs} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def write_result(out: Path, result: dict, line: Callable[[dict], str]) -> Path:
    """Writes a stand-alone benchmark's ``result`` as JSON to ``out`` (folders made) and prints each row of its
    ``table`` through ``line``, then where it went."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["table"]:
        print(line(row))
    print(f"wrote {out}")
    return out


def interleaved_times(steps: dict, rounds: int, number: int = 1, warmup: int = 1, rotate: bool = False) -> dict:
    """Seconds per call of each of ``steps`` ({name: zero-argument callable}), ``rounds`` values each: every round
    runs each step ``number`` times in turn (after ``warmup`` untimed calls of each), so a drift of the machine's
    speed hits all of them alike; ``rotate`` moves the first step to the back after every round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(rounds):
        for name in order:
            start = time.perf_counter()
            for _ in range(number):
                steps[name]()
            times[name].append((time.perf_counter() - start) / number)
        if rotate:
            order = order[1:] + order[:1]
    return times


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        print(json.dumps(_probe(sys.argv[2], json.loads(sys.argv[3]))))
    else:
        sys.exit("usage: python benchmarks/harness.py probe MODULE:FACTORY JSON_KWARGS")
