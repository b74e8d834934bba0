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
