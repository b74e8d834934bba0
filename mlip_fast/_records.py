"""What every run record (the ``summary.json`` of training, evaluation and the synthetic benchmark,
``metrics.jsonl``) shares: the one writer of a record file, the library versions of the run and conversion of
values to plain JSON."""
from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path

import numpy
import torch

from mlip_fast import __version__

SUMMARY_FILE = "summary.json"


def write_run_record(out_dir, record: Mapping, filename: str = SUMMARY_FILE) -> Path:
    """Writes ``record`` as ``out_dir/filename`` (default ``summary.json``; the folder is created) and returns
    the path. Values go through :func:`jsonable` (non-finite numbers become null) and the file is replaced
    atomically: written beside it, then renamed over it, so a reader never sees half a record."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / filename
    tmp = path.with_name(f".{filename}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def versions() -> dict:
    """Python, platform, torch, numpy, deepspeed, transformers, triton and mlip_fast versions (None when
    a package is not importable), plus CUDA and the GPU name when one is visible."""
    out = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
           "numpy": numpy.__version__, "mlip_fast": __version__}
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
