"""Root test configuration: interpreter mode for Triton on machines without a GPU, seeds, temp caches.

TRITON_INTERPRET must be set before any ``@triton.jit`` decorator runs, so it is set here, before tests
import kernels.
"""
import os
import random

import pytest

if not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch.nn.functional as _torch_functional  # noqa: E402

_TORCH_LINEAR = _torch_functional.linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _seed_everything():
    import numpy as np
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _restore_torch_linear():
    """DeepSpeed's ZeRO-3 engine replaces ``torch.nn.functional.linear`` with its own autograd function for the
    rest of the process; a test that starts one in-process (or a fixture of it) would otherwise change the
    numerics, and the rounding-sensitive convergence comparisons, of every model built by the tests after it."""
    yield
    _torch_functional.linear = _TORCH_LINEAR
