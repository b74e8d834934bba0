"""Checkpoint folders and resuming from them: finding the checkpoint ``--resume`` names, proving it (complete,
unchanged since its save, data only), loading it, and the folder bookkeeping around a resume. Saving is
:mod:`mlip_fast.train.checkpoint_save`; the file-level trust (weights-only loads, SHA-256 manifests) is
:mod:`mlip_fast.train.checkpoint_files`.

Layout of a run folder::

    <output_dir>/checkpoints/latest             tag of the newest complete, verified checkpoint
    <output_dir>/checkpoints/step00000200/      engine.save_checkpoint: module, ZeRO shards, scheduler,
                                                client state (below), and manifest.json (size and SHA-256
                                                of every file)
    <output_dir>/export/                        save_pretrained of the consolidated fp32 weights

Client state: ``step`` (optimizer steps done), ``epoch`` and ``step_in_epoch`` (the sampler position),
``samples_seen``, ``world_size``, ``global_batch``, ``num_train`` and ``data_fingerprint`` (to refuse
resuming on other data), ``seed``, ``loss`` (the terms of the step that produced the state), the python /
numpy / torch RNG states of rank 0, and ``args`` for reference. Data order and the masking and dropout
randomness of step ``s`` are functions of (seed, s) (see :mod:`mlip_fast.train.loop`), so the sampler
position restores them exactly on every rank.

Resume (:func:`choose_checkpoint`): before anything slow, rank 0 checks the checkpoint's files against its
manifest and reads the client state and every ``.pt`` file's pickle weights-only. With ``--resume latest``
(or a run / checkpoints folder) a checkpoint that fails is named and the previous complete one is tried, loudly;
a checkpoint named by its own folder must pass. A run folder with no checkpoint at all (its run stopped before
the first one) is restarted from scratch by ``--resume latest`` (:class:`NoCheckpointYet`).
"""
from __future__ import annotations

import os
import random
import shutil
import time
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mlip_fast.train.checkpoint_files import (LATEST, CheckpointError, DiskFullError, fsync,
                                              install_weights_only_loader, load_weights_only, step_of, tag_for,
                                              verify_manifest)

__all__ = ["CheckpointError", "DiskFullError", "IncompatibleCheckpoint", "NoCheckpointYet", "CHECKPOINT_DIR",
           "EXPORT_DIR", "LATEST", "tag_for", "step_of", "write_latest", "remove_leftovers", "resolve_resume",
           "verify_checkpoint", "choose_checkpoint", "load_checkpoint", "set_aside_newer", "rng_state",
           "restore_rng_state", "PARTIAL", "DISCARD"]

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
PARTIAL = ".partial-"
DISCARD = ".discard-"


class IncompatibleCheckpoint(CheckpointError):
    """A sound checkpoint that this run cannot continue (another world size or ZeRO stage): never skipped over."""


class NoCheckpointYet(CheckpointError):
    """``--resume latest`` names a run folder without any checkpoint (its run stopped before the first save)."""


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def write_latest(ckpt_root: Path, tag: str) -> None:
    """Points ``latest`` at ``tag`` atomically: a temporary file, fsynced, renamed over the old one."""
    tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / LATEST)
    fsync(ckpt_root)


def remove_leftovers(ckpt_root: Path) -> None:
    """Staging folders and half-deleted checkpoints of processes that were killed (one run per folder holds
    the run lock, so none of them is in use). Run first thing under the lock: on a full disk they hold the
    space everything else needs."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith((PARTIAL, DISCARD)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp-"):
            p.unlink(missing_ok=True)


def set_aside_newer(ckpt_root: Path, tag: Optional[str]) -> list:
    """Rank 0, before resuming from ``tag`` of ``ckpt_root`` (None: restarting from scratch): points ``latest``
    at ``tag`` and renames the checkpoints of later steps (left by the run being rewound, or rejected on resume)
    to ``<tag>.superseded-<unix time>``, so that the resumed run never writes into them. Returns the new names."""
    step = -1 if tag is None else step_of(tag)
    if step is None or not ckpt_root.is_dir():
        return []
    newer = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and (step_of(p.name) or -1) > step)
    if not newer:
        return []
    if tag is not None:
        write_latest(ckpt_root, tag)
    stamp = int(time.time())
    moved = []
    for p in newer:
        target, n = p.with_name(f"{p.name}.superseded-{stamp}"), 0
        while target.exists():  # rewound twice within a second
            n += 1
            target = p.with_name(f"{p.name}.superseded-{stamp}-{n}")
        os.rename(p, target)
        moved.append(target)
    fsync(ckpt_root)
    return moved


def _read_latest(ckpt_root: Path) -> str:
    latest = ckpt_root / LATEST
    if not latest.is_file():
        raise CheckpointError(f"no checkpoint to resume from: {latest} does not exist (a run writes it with its "
                              f"first checkpoint; pass a checkpoint folder to --resume)")
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(f"{latest} is empty; the checkpoint folder is corrupted")
    return tag


def resolve_resume(resume: str, output_dir: Optional[Path], runs_root: Path) -> tuple:
    """``--resume`` -> (checkpoint root, tag).

    ``latest``: the newest checkpoint of ``output_dir`` when given (:class:`NoCheckpointYet` when it has none),
    else of the most recently modified run under ``runs_root`` that has one. A path: a checkpoint root (holding
    ``latest``), a tag folder inside one, or a run folder (holding ``checkpoints/``).
    """
    if resume == "latest":
        if output_dir is not None:
            root = output_dir / CHECKPOINT_DIR
            if not (root / LATEST).is_file():
                raise NoCheckpointYet(f"--resume latest: {output_dir} has no checkpoint yet")
            return root, _read_latest(root)
        candidates = sorted((p for p in runs_root.glob(f"*/{CHECKPOINT_DIR}/{LATEST}")), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise CheckpointError(f"--resume latest: no run under {runs_root}/ has a checkpoint; pass --output-dir "
                                  f"or a checkpoint folder")
        root = candidates[-1].parent
        return root, _read_latest(root)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"--resume {resume}: {path} does not exist")
    if (path / CHECKPOINT_DIR).is_dir():
        path = path / CHECKPOINT_DIR
    if (path / LATEST).is_file():
        return path, _read_latest(path)
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise CheckpointError(f"--resume {resume}: {path} is not a checkpoint folder (no 'latest' file and no "
                          f"*model_states.pt files)")


def _load_pickle_part(path: Path):
    """The file read weights-only; a zip-format file is memory-mapped, so its tensor bytes are not read (the
    manifest check hashes them) and a large optimizer shard costs a pickle scan."""
    return load_weights_only(path, mmap=zipfile.is_zipfile(path))


def verify_checkpoint(ckpt_root: Path, tag: str, world_size: int, zero_stage: int) -> dict:
    """Proves the checkpoint ``ckpt_root/tag`` before anything loads it; returns its client state.

    Every file must match the folder's manifest (size and SHA-256; a checkpoint written before manifests is
    accepted on the checks below alone), every ``.pt`` file must read weights-only (no object of it is built
    beyond tensors and plain values), the client state must be this app's, and the optimizer shards must be
    those of ``world_size`` processes at ``zero_stage``. DeepSpeed reports a missing checkpoint with a warning
    and carries on from scratch; this raises :class:`CheckpointError` instead, naming the file and the cause
    (:class:`IncompatibleCheckpoint` for another world size or stage).
    """
    folder = ckpt_root / tag
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist ({ckpt_root / LATEST} names it)")
    verify_manifest(folder)
    model_files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"checkpoint {folder} has no mp_rank_00_model_states.pt; it is incomplete")
    state = _load_pickle_part(model_files[0])
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{model_files[0]} was not written by this training app (no client state)")
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise IncompatibleCheckpoint(f"checkpoint {folder} was written by {saved_world} processes but this run has "
                                     f"{world_size}; resume with the same number of processes")
    saved_stage = state.get("zero_stage")
    if saved_stage is not None and saved_stage != zero_stage:
        raise IncompatibleCheckpoint(f"checkpoint {folder} was written with ZeRO stage {saved_stage} but the config "
                                     f"asks for stage {zero_stage}; resume with the same stage")
    optim_files = sorted(folder.glob("*optim_states.pt"))
    if len(optim_files) != world_size:
        raise CheckpointError(f"checkpoint {folder} has {len(optim_files)} optimizer shard file(s) for a run of "
                              f"{world_size} process(es); it is incomplete or from another world size")
    for f in optim_files:
        if f.stat().st_size == 0:
            raise CheckpointError(f"checkpoint file {f} is empty; the checkpoint is corrupted")
    for f in sorted(folder.glob("*.pt")):
        if f != model_files[0]:
            _load_pickle_part(f)
    return state


def _older_tags(ckpt_root: Path, tag: str) -> list:
    step = step_of(tag)
    steps = sorted((s for s in (step_of(p.name) for p in ckpt_root.iterdir() if p.is_dir()) if s is not None
                    and (step is None or s < step)), reverse=True)
    return [tag_for(s) for s in steps]


def choose_checkpoint(ckpt_root: Path, tag: str, world_size: int, zero_stage: int, fall_back: bool) -> tuple:
    """(tag, client state, [why each newer checkpoint was rejected]) of the checkpoint to resume from: ``tag``
    when it passes :func:`verify_checkpoint`; with ``fall_back`` (``latest`` was asked for), else the newest
    older checkpoint of ``ckpt_root`` that passes. Raises :class:`CheckpointError` when none does."""
    rejected = []
    for candidate in [tag, *(_older_tags(ckpt_root, tag) if fall_back else [])]:
        try:
            return candidate, verify_checkpoint(ckpt_root, candidate, world_size, zero_stage), rejected
        except IncompatibleCheckpoint:
            raise
        except CheckpointError as e:
            if not fall_back:
                raise
            rejected.append(str(e))
    raise CheckpointError(f"no checkpoint of {ckpt_root} can be resumed from: {' | '.join(rejected)}")


def load_checkpoint(engine, ckpt_root: Path, tag: str) -> dict:
    """Collective: loads module, optimizer, scheduler and client state, every file weights-only; restores rank
    0's RNG states."""
    install_weights_only_loader(engine)
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"loading checkpoint {ckpt_root / tag} failed ({type(e).__name__}: {e})") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    if "rng" in client_state:
        restore_rng_state(client_state["rng"])
    return client_state
