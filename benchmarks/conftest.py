"""Shared fixtures for the pytest-benchmark files: the environment record for ``benchmark.extra_info``.

Measurement helpers (peak memory on CUDA and, in a fresh process, on CPU) live in ``benchmarks/harness.py`` so
that the tools recording results (``tools/cpu_targets.py``, ``tools/gpu_check``) use the same code.
"""
import pytest
import torch

from benchmarks import harness


@pytest.fixture(scope="session")
def bench_env():
    """Device, machine and library versions (added to every benchmark's extra_info)."""
    return harness.environment("cuda" if torch.cuda.is_available() else "cpu")
