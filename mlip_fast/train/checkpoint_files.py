"""What a checkpoint folder holds and how its files are read without trusting them.

Trust model. A checkpoint folder is data, never code: every ``.pt`` file of a checkpoint is read with
``torch.load(weights_only=True)``, whose unpickler builds tensors, containers and plain values and nothing else.
The few classes DeepSpeed itself pickles into its files (its loss scaler, the ZeRO stage enum, the fragment
addresses of ZeRO-1/2 and the numpy array of the saved RNG state: ``_safe_globals``) are allowed by name,
for the duration of one load (``torch.serialization.safe_globals``), not registered for the whole process. A
file holding anything else (an object whose ``__reduce__`` would run a command) is refused before any of it
runs, naming the file. DeepSpeed's own loader calls ``torch.load(weights_only=False)``; the training app
replaces the engine's loader (:func:`install_weights_only_loader`) and DeepSpeed's consolidation script's
(:func:`weights_only_zero_to_fp32`) with this one.

Integrity. Each checkpoint folder holds ``manifest.json``: the size and SHA-256 of every file in it, written
after the files are complete (and read back to hash them) and before ``latest`` may name the folder.
:func:`verify_manifest` checks them all; a flipped bit anywhere (tensor data included) names the file.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import pickle
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "DiskFullError", "LATEST", "MANIFEST", "tag_for", "step_of", "fsync", "fsync_tree",
           "is_disk_full", "refusal_reason", "load_weights_only", "install_weights_only_loader", "weights_only_zero_to_fp32",
           "write_manifest", "verify_manifest", "folder_bytes"]

LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "mlip_fast.checkpoint-manifest"
_TAG = re.compile(r"^step(\d{8})$")
_HASH_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint folder is absent, incomplete, corrupted, unsafe or from an incompatible run."""


class DiskFullError(CheckpointError):
    """The filesystem ran out of space while a checkpoint was written (the message says how much is needed)."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> Optional[int]:
    """The step of a checkpoint tag ``step00000200`` -> 200; None for any other name."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync(Path(dirpath) / name)
        fsync(Path(dirpath))


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` means the filesystem is full: ENOSPC / EDQUOT, also as torch.save reports them (a
    RuntimeError of its zip writer, which drops the errno)."""
    for e in (error, error.__cause__, error.__context__):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, RuntimeError) and ("No space left" in str(e) or "file write failed" in str(e)):
            return True
    return False


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ safe loading
def _safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files (besides tensors and containers)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address,
            # the numpy RNG state saved in the client state
            np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def refusal_reason(error: pickle.UnpicklingError) -> tuple:
    """(whether the file asked for code, what it asked for or why it is no weights-only pickle) of a
    ``torch.load(weights_only=True)`` failure."""
    text = str(error)
    found = re.search(r"GLOBAL ([\w.]+)", text) or re.search(r"reduce for callable ([\w.]+)", text)
    if found is not None:
        return True, found.group(1)
    detail = re.search(r"(Unsupported operand \d+|Unsupported class [\w.]+)", text)
    return False, detail.group(1) if detail else "not a pickle of tensors"


def load_weights_only(path, map_location="cpu", mmap: bool = False):
    """``torch.load(path, weights_only=True)`` with the classes of ``_safe_globals`` allowed for this load only.

    Raises :class:`CheckpointError` naming the file when it holds anything else (nothing of it is run) or
    cannot be read at all."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        unsafe, reason = refusal_reason(e)
        if unsafe:
            raise CheckpointError(f"checkpoint file {path} was refused: it asks to run {reason} (a checkpoint holds "
                                  f"tensors and plain values only, and is never loaded as code)") from None
        raise CheckpointError(f"checkpoint file {path} is not a weights-only torch file ({reason}); the checkpoint "
                              f"is corrupted or was not written by DeepSpeed") from None
    except Exception as e:  # noqa: BLE001 - every failure names the file; nothing of it was executed
        text = str(e)
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(e).__name__}: "
                              f"{text.split('. ')[0][:200] if text else ''}); the checkpoint is corrupted") from None


def install_weights_only_loader(engine) -> None:
    """Makes every file DeepSpeed's ``engine.load_checkpoint`` reads go through :func:`load_weights_only` (its
    checkpoint engine calls ``torch.load(weights_only=False)``). Only DeepSpeed's default torch checkpoint engine
    is known to read through that one method; any other is refused."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    checkpoint_engine = engine.checkpoint_engine
    if type(checkpoint_engine) is not TorchCheckpointEngine:
        raise CheckpointError(f"DeepSpeed checkpoint engine {type(checkpoint_engine).__name__} is not supported by the "
                              f"training app (only its default torch engine can be made to load weights only)")
    checkpoint_engine.load = lambda path, map_location=None: load_weights_only(path)


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's consolidation script sees it: every attribute is torch's, ``load`` is
    :func:`load_weights_only`."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, map_location=None, mmap=None, weights_only=None):
        return load_weights_only(f, mmap=bool(mmap))


@contextlib.contextmanager
def weights_only_zero_to_fp32():
    """``deepspeed.utils.zero_to_fp32`` with its file reads made weights-only (its ``torch.load`` calls pass
    ``weights_only=False``); yields the module. Rank 0 only, after training (no other thread loads files)."""
    from deepspeed.utils import zero_to_fp32

    original = zero_to_fp32.torch
    zero_to_fp32.torch = _WeightsOnlyTorch()
    try:
        yield zero_to_fp32
    finally:
        zero_to_fp32.torch = original


# ------------------------------------------------------------------------------------------- manifest
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, **facts) -> Path:
    """Writes ``folder/manifest.json``: ``{"format", "files": {relative path: {"bytes", "sha256"}}, **facts}``
    (fsynced). Every file is read back to hash it, so a file the filesystem could not store fails here."""
    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    path = folder / MANIFEST
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"format": MANIFEST_FORMAT, **facts, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def verify_manifest(folder: Path) -> Optional[dict]:
    """Checks every file of ``folder`` against its ``manifest.json``; returns the manifest, or None when the
    folder has none (written before manifests existed). Raises :class:`CheckpointError` naming the first file
    that is missing, added, resized or changed."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError("not a checkpoint manifest")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupted ({e})") from None
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    for name in sorted(set(files) | present):
        file = folder / name
        if name not in present:
            raise CheckpointError(f"checkpoint file {file} is missing (listed in {path})")
        if name not in files:
            raise CheckpointError(f"checkpoint file {file} is not listed in {path}: the folder was changed after the save")
        entry = files[name]
        size = file.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"checkpoint file {file} has {size} bytes, {path} says {entry.get('bytes')}: it "
                                  f"was truncated or changed after the save")
        if _sha256(file) != entry.get("sha256"):
            raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 in {path}: its bytes changed "
                                  f"after the save (disk or copy corruption, or an edit)")
    return manifest
