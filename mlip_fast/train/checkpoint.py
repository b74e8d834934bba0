"""Checkpoints, exact resume and the consolidated export.

Layout of a run folder::

    <output_dir>/checkpoints/latest             tag of the newest complete checkpoint
    <output_dir>/checkpoints/step00000200/      engine.save_checkpoint: module, ZeRO shards, scheduler,
                                                client state (below)
    <output_dir>/export/                        save_pretrained of the consolidated fp32 weights

Atomic saves (:class:`Checkpointer`). Every rank writes its files into ``checkpoints/.partial-<tag>/<tag>/``;
after DeepSpeed's closing barrier rank 0 fsyncs them, renames the folder to ``checkpoints/<tag>`` and only
then replaces ``latest`` (written to a temporary file, fsynced, renamed over the old one). A process killed
at any point leaves ``latest`` naming a complete checkpoint; leftovers (``.partial-*``, ``.discard-*``) are
removed by the next run. An existing step folder is never written into: a resumed run does not save the
step it resumed from again, and resuming from an older checkpoint of the same folder first points
``latest`` at it and sets the newer ones aside (``<tag>.superseded-<time>``). Old checkpoints are pruned by
renaming them to ``.discard-<tag>`` before deleting them, so a half-deleted folder never looks like one.

Client state: ``step`` (optimizer steps done), ``epoch`` and ``step_in_epoch`` (the sampler position),
``samples_seen``, ``world_size``, ``global_batch``, ``num_train`` and ``data_fingerprint`` (to refuse
resuming on other data), ``seed``, the python / numpy / torch RNG states of rank 0, and ``args`` for
reference. Data order and the masking and dropout randomness of step ``s`` are functions of (seed, s)
(see :mod:`mlip_fast.train.loop`), so the sampler position restores them exactly on every rank.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["CheckpointError", "CHECKPOINT_DIR", "EXPORT_DIR", "LATEST", "tag_for", "step_of", "Checkpointer",
           "resolve_resume", "verify_checkpoint", "load_checkpoint", "set_aside_newer", "export_consolidated",
           "rng_state", "restore_rng_state"]

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
LATEST = "latest"
_TAG = re.compile(r"^step(\d{8})$")
_PARTIAL = ".partial-"
_DISCARD = ".discard-"
# DeepSpeed copies its consolidation script next to the checkpoints; it is kept in the checkpoint root.
_RECOVERY_SCRIPT = "zero_to_fp32.py"


class CheckpointError(RuntimeError):
    """A checkpoint folder is absent, incomplete, corrupted or from an incompatible run."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def step_of(tag: str) -> Optional[int]:
    """The step of a checkpoint tag ``step00000200`` -> 200; None for any other name."""
    m = _TAG.match(tag)
    return int(m.group(1)) if m else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


def _write_latest(ckpt_root: Path, tag: str) -> None:
    """Points ``latest`` at ``tag`` atomically: a temporary file, fsynced, renamed over the old one."""
    tmp = ckpt_root / f".{LATEST}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / LATEST)
    _fsync(ckpt_root)


def _discard(folder: Path) -> None:
    """Deletes a checkpoint folder after renaming it out of the checkpoint namespace (a kill during the
    deletion then leaves a ``.discard-*`` leftover, never a half-deleted checkpoint)."""
    trash = folder.with_name(f"{_DISCARD}{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(ckpt_root: Path) -> None:
    """Staging folders and half-deleted checkpoints of processes that were killed (one run per folder holds
    the run lock, so none of them is in use)."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith((_PARTIAL, _DISCARD)):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp-"):
            p.unlink(missing_ok=True)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class Checkpointer:
    """The checkpoint saves of one run into ``ckpt_root`` (atomic; see the module docstring).

    Args:
        ckpt_root: the run's ``checkpoints/`` folder.
        keep: checkpoints kept on disk, the newest first (0 keeps all).
        resumed: ``(checkpoint root, tag)`` the run resumed from: when it is a folder of ``ckpt_root``,
            saving its step again returns it unchanged (the state is the one it holds).
    """

    def __init__(self, ckpt_root: Path, keep: int = 0, resumed: Optional[tuple] = None):
        self.root = Path(ckpt_root)
        self.keep = int(keep)
        self.resumed_step = None
        if resumed is not None and Path(resumed[0]).resolve() == self.root.resolve():
            self.resumed_step = step_of(resumed[1])
        if _is_rank0():
            _remove_leftovers(self.root)

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective (every rank calls it): writes the checkpoint of ``step``, points ``latest`` at it and
        (rank 0) prunes older ones. Returns the tag folder."""
        tag = tag_for(step)
        final = self.root / tag
        if step == self.resumed_step and final.is_dir():
            latest = self.root / LATEST
            if _is_rank0() and not (latest.is_file() and latest.read_text().strip() == tag):
                _write_latest(self.root, tag)
            _barrier()
            return final
        if final.exists():  # every rank sees the same folder, so every rank raises
            raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it (the run folder "
                                  f"was changed by something else while this run used it)")
        staging = self.root / f"{_PARTIAL}{tag}"
        if _is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        state = dict(client_state, rng=rng_state())
        # DeepSpeed writes every rank's files and ends with a barrier: after it the staging folder is complete.
        engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
        if _is_rank0():
            _fsync_tree(staging)
            script = staging / _RECOVERY_SCRIPT
            if script.is_file():
                os.replace(script, self.root / _RECOVERY_SCRIPT)
            os.rename(staging / tag, final)
            _fsync(self.root)
            _write_latest(self.root, tag)
            shutil.rmtree(staging, ignore_errors=True)
            self._prune(step)
        _barrier()
        return final

    def _prune(self, step: int) -> None:
        if self.keep <= 0:
            return
        older = sorted(s for s in (step_of(p.name) for p in self.root.iterdir() if p.is_dir()) if s is not None and s < step)
        for s in older[:max(0, len(older) - (self.keep - 1))]:
            _discard(self.root / tag_for(s))


def set_aside_newer(ckpt_root: Path, tag: str) -> list:
    """Rank 0, before resuming from ``tag`` of ``ckpt_root``: points ``latest`` at ``tag`` and renames the
    checkpoints of later steps (left by the run being rewound) to ``<tag>.superseded-<unix time>``, so that
    the resumed run never writes into them. Returns the new names."""
    step = step_of(tag)
    if step is None:
        return []
    newer = sorted(p for p in ckpt_root.iterdir() if p.is_dir() and (step_of(p.name) or -1) > step)
    if not newer:
        return []
    _write_latest(ckpt_root, tag)
    stamp = int(time.time())
    moved = []
    for p in newer:
        target, n = p.with_name(f"{p.name}.superseded-{stamp}"), 0
        while target.exists():  # rewound twice within a second
            n += 1
            target = p.with_name(f"{p.name}.superseded-{stamp}-{n}")
        os.rename(p, target)
        moved.append(target)
    _fsync(ckpt_root)
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

    ``latest``: the newest checkpoint of ``output_dir`` when given, else of the most recently modified run
    under ``runs_root`` that has one. A path: a checkpoint root (holding ``latest``), a tag folder inside
    one, or a run folder (holding ``checkpoints/``).
    """
    if resume == "latest":
        if output_dir is not None:
            root = output_dir / CHECKPOINT_DIR
            if not root.is_dir():
                raise CheckpointError(f"--resume latest: {output_dir} has no {CHECKPOINT_DIR}/ folder")
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


def verify_checkpoint(ckpt_root: Path, tag: str, world_size: int, zero_stage: int) -> dict:
    """Checks that every file the engine will read exists and loads; returns the client state.

    DeepSpeed reports a missing checkpoint with a warning and carries on from scratch; this raises
    :class:`CheckpointError` instead, naming the file and the cause.
    """
    folder = ckpt_root / tag
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist ({ckpt_root / LATEST} names it)")
    model_files = sorted(folder.glob("*mp_rank_00_model_states.pt"))
    if not model_files:
        raise CheckpointError(f"checkpoint {folder} has no mp_rank_00_model_states.pt; it is incomplete")
    try:
        state = torch.load(model_files[0], map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or overwritten file
        raise CheckpointError(f"checkpoint file {model_files[0]} cannot be read ({type(e).__name__}: {e}); the "
                              f"checkpoint is corrupted, resume from an older one") from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{model_files[0]} was not written by this training app (no client state)")
    saved_world = state.get("world_size")
    if saved_world is not None and saved_world != world_size:
        raise CheckpointError(f"checkpoint {folder} was written by {saved_world} processes but this run has "
                              f"{world_size}; resume with the same number of processes")
    saved_stage = state.get("zero_stage")
    if saved_stage is not None and saved_stage != zero_stage:
        raise CheckpointError(f"checkpoint {folder} was written with ZeRO stage {saved_stage} but the config asks "
                              f"for stage {zero_stage}; resume with the same stage")
    optim_files = sorted(folder.glob("*optim_states.pt"))
    if len(optim_files) != world_size:
        raise CheckpointError(f"checkpoint {folder} has {len(optim_files)} optimizer shard file(s) for a run of "
                              f"{world_size} process(es); it is incomplete or from another world size")
    for f in optim_files:
        if f.stat().st_size == 0:
            raise CheckpointError(f"checkpoint file {f} is empty; the checkpoint is corrupted")
    return state


def load_checkpoint(engine, ckpt_root: Path, tag: str) -> dict:
    """Collective: loads module, optimizer, scheduler and client state; restores rank 0's RNG states."""
    try:
        path, client_state = engine.load_checkpoint(str(ckpt_root), tag=tag)
    except Exception as e:
        raise CheckpointError(f"loading checkpoint {ckpt_root / tag} failed ({type(e).__name__}: {e})") from e
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_root / tag}")
    if "rng" in client_state:
        restore_rng_state(client_state["rng"])
    return client_state


def export_consolidated(ckpt_root: Path, tag: str, fresh_model: torch.nn.Module, out_dir: Path) -> Path:
    """Rank 0: consolidates the fp32 master weights of a ZeRO 1/2/3 checkpoint (DeepSpeed's zero_to_fp32),
    loads them into ``fresh_model`` (same config and tokenizer, no DeepSpeed) and writes
    ``save_pretrained(out_dir)``. Missing or unexpected keys are an error."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
    own = fresh_model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    # buffers DeepSpeed does not store (non-persistent) are absent from both sides; anything else is a bug
    if missing or unexpected:
        raise CheckpointError(f"consolidated checkpoint {ckpt_root / tag} does not match the model: missing "
                              f"{missing[:10]}, unexpected {unexpected[:10]}")
    wrong = sorted(k for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape))
    if wrong:
        raise CheckpointError(f"consolidated checkpoint {ckpt_root / tag} has wrong shapes for {wrong[:10]}")
    fresh_model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh_model.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
