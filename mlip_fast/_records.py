"""What every run record (the ``summary.json`` of training, evaluation and the synthetic benchmark,
``metrics.jsonl``) shares: the one writer of a record file, the library versions of the run and conversion of
values to plain JSON."""
from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Optional

import torch

from mlip_fast._version import __version__

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


# the distributions whose versions a run records (their import names differ for scikit-learn)
RECORDED_PACKAGES = ("torch", "numpy", "deepspeed", "transformers", "triton", "scikit-learn")


def package_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution`` from its metadata (None when it is not installed). Nothing is
    imported: importing DeepSpeed only to read its version prints its accelerator guess."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def version_line() -> str:
    """``mlip_fast X (python ..., torch ..., ...)``: what ``--version`` prints."""
    found = ", ".join(f"{name} {package_version(name) or 'not installed'}" for name in RECORDED_PACKAGES)
    return f"mlip_fast {__version__} (python {platform.python_version()}, {found})"


def versions() -> dict:
    """Python, platform, mlip_fast and the :data:`RECORDED_PACKAGES` versions (None when a package is not
    installed; read from package metadata), plus CUDA and the GPU name when one is visible."""
    out = {"python": platform.python_version(), "platform": platform.platform(), "mlip_fast": __version__}
    out.update({name: package_version(name) for name in RECORDED_PACKAGES})
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
