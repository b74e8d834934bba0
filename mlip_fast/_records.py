"""What every run record (training and evaluation ``summary.json``, ``metrics.jsonl``) shares: the
library versions of the run and conversion of values to plain JSON."""
from __future__ import annotations

import math
import platform
from collections.abc import Mapping
from pathlib import Path


def versions() -> dict:
    """Python, platform, torch, numpy, deepspeed, transformers, triton and mlip_fast versions (None when
    a package is not importable), plus CUDA and the GPU name when one is visible."""
    import numpy
    import torch

    import mlip_fast

    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__, "mlip_fast": mlip_fast.__version__}
    for name in ("deepspeed", "transformers", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # optional at run time (triton on CPU-only installs, deepspeed at evaluation)
            out[name] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name()
    return out


def jsonable(value):
    """``value`` with mappings, sequences, numpy / torch scalars and arrays, and paths turned into plain
    JSON types; non-finite floats become None (JSON has no NaN); anything else becomes its str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch scalars and arrays
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return str(value)
