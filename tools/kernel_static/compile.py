"""Compiling without a GPU: a stand-in active Triton driver reports the target GPU, the launchers' final
``kernel[grid](...)`` calls are captured (tensor arguments as dtype and shape) instead of run, and the captured
launches are compiled through Triton's own pipeline in worker processes (``python -m tools.kernel_static
--worker``), each analysed by :mod:`tools.kernel_static.analysis`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver as triton_driver
from triton.runtime.jit import MockTensor

from benchmarks import harness
from mlip_fast.kernels import _target
from tools.kernel_static.analysis import ARCHS, analyse

ROOT = harness.ROOT


class StandInDriver:
    """An 'active' Triton driver that only tells the compiler which GPU to compile for."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        # Triton caches its compile target per device: one stand-in device per arch keeps them apart.
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True

    def get_active_torch_device(self):
        return torch.device("meta")

    def map_python_to_cpp_type(self, ty):
        return ty



@contextlib.contextmanager
def compile_target(arch: int):
    """Makes Triton compile for ``arch`` and the launchers plan for it (SM count, capability)."""
    previous, previous_driver = _target.OVERRIDE, triton_driver._active
    triton_driver.set_active(StandInDriver(arch))
    _target.OVERRIDE = _target.Target(arch=arch, sm_count=ARCHS[arch]["sm_count"])
    try:
        yield
    finally:
        _target.OVERRIDE = previous
        triton_driver._active = previous_driver  # reset_active() would probe for a real GPU driver


# ------------------------------------------------------------------------------------ capturing launches


@dataclass
class Launch:
    """One ``kernel[grid](...)`` call of a launcher, captured instead of run."""

    module: str
    kernel: str
    arch: int
    grid: tuple
    args: list  # ["T", dtype, shape] for a tensor, else the plain value
    kwargs: dict
    key: str = ""


class _LaunchRecorder:
    """Stands in for a ``@triton.jit`` function inside a kernels module: ``kernel[grid](*args, **kw)``
    records the launch (tensor arguments as dtype and shape) instead of running it."""

    def __init__(self, module: str, jit_fn, arch: int, sink: list):
        self.module, self.jit_fn, self.arch, self.sink = module, jit_fn, arch, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            grid_t = tuple(int(g) for g in (grid(kwargs) if callable(grid) else grid))
            spec = [["T", str(a.dtype).replace("torch.", ""), list(a.shape)] if isinstance(a, torch.Tensor) else _plain(a)
                    for a in args]
            name = self.jit_fn.fn.__name__
            rec = Launch(self.module, name, self.arch, grid_t, spec, {k: _plain(v) for k, v in kwargs.items()})
            rec.key = _compile_key(self.jit_fn, rec)
            self.sink.append(rec)

        return launch


def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def _compile_key(jit_fn, ln: Launch) -> str:
    """What Triton specialises a compile on: tensor dtypes, ints == 1 or divisible by 16 (unless the kernel
    says not to specialise them), constexprs and launch options; plus the arch and the kernel source."""
    skip = {a if isinstance(a, str) else jit_fn.arg_names[a] for a in jit_fn.do_not_specialize}
    parts = [ln.module, ln.kernel, hashlib.sha1(jit_fn.src.encode()).hexdigest()[:12], f"arch={ln.arch}"]
    for name, a in zip(jit_fn.arg_names, ln.args):
        if isinstance(a, list):
            parts.append(f"T{a[1]}")
        elif isinstance(a, bool) or not isinstance(a, int) or name in skip:
            parts.append("v" if isinstance(a, int) and not isinstance(a, bool) else repr(a))
        else:
            parts.append("1" if a == 1 else ("d16" if a % 16 == 0 else "i"))
    parts += [f"{k}={v}" for k, v in sorted(ln.kwargs.items())]
    return "|".join(parts)


@contextlib.contextmanager
def recording(module, names: Iterable[str], arch: int, sink: list):
    saved = []
    for n in names:
        saved.append((n, getattr(module, n)))
        setattr(module, n, _LaunchRecorder(module.__name__, getattr(module, n), arch, sink))
    try:
        yield
    finally:
        for n, fn in saved:
            setattr(module, n, fn)


# ------------------------------------------------------------------------------------ compiling (workers)


def compile_and_analyse(job: dict, dump: Optional[str]) -> dict:
    """Compiles one captured launch for its arch through Triton's own pipeline and analyses the result."""
    arch = job["arch"]
    module = importlib.import_module(job["module"])
    jit_fn = getattr(module, job["kernel"])
    args = [MockTensor(getattr(torch, a[1]), a[2]) if isinstance(a, list) else a for a in job["args"]]
    with compile_target(arch):
        try:
            compiled = jit_fn.warmup(*args, grid=tuple(job["grid"]), **job["kwargs"])
        except Exception as err:  # noqa: BLE001 - a failed compile is a result
            return {"compiled": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:500]}"}
    try:
        out = analyse(compiled, arch, job["kwargs"].get("num_warps", 4), Path(dump) if dump else None, job["key"])
    except Exception as err:  # noqa: BLE001
        return {"compiled": True, "analysis_error": f"{type(err).__name__}: {err}"}
    return {"compiled": True, **out}


def worker_main() -> int:
    """``--worker``: compile jobs read as JSON lines from stdin, one JSON result line each on stdout."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything the compiler prints must not mix with the results
    for line in sys.stdin:
        job = json.loads(line)
        result = compile_and_analyse(job["job"], job.get("dump"))
        out.write(json.dumps(result) + "\n")
        out.flush()
    return 0


def compile_all(jobs: dict, workers: int, dump: Optional[Path], progress: bool = True) -> dict:
    """{key: analysis} for every distinct job, over ``workers`` processes; a compiler crash (the process
    dies) is recorded for the job that caused it and its worker is replaced."""
    pending: "queue.Queue" = queue.Queue()
    for key, job in jobs.items():
        pending.put((key, job))
    results: dict = {}
    lock = threading.Lock()
    start = time.time()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def spawn():
        return subprocess.Popen([sys.executable, "-m", "tools.kernel_static", "--worker"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT)

    def run():
        proc = spawn()
        while True:
            try:
                key, job = pending.get_nowait()
            except queue.Empty:
                break
            try:
                proc.stdin.write(json.dumps({"job": job, "dump": str(dump) if dump else None}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
            except (BrokenPipeError, OSError):
                line = ""
            if not line:
                rc = proc.wait()
                result = {"compiled": False, "error": f"the compiler crashed (worker exit code {rc})"}
                proc = spawn()
            else:
                result = json.loads(line)
            with lock:
                results[key] = result
                if progress and len(results) % 10 == 0:
                    print(f"[static] compiled {len(results)} / {len(jobs)} ({time.time() - start:.0f} s)",
                          file=sys.stderr, flush=True)
        proc.stdin.close()
        proc.wait()

    threads = [threading.Thread(target=run) for _ in range(max(1, workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results
