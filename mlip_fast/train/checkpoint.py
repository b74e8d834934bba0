"""Checkpoints, exact resume, stop signals and the consolidated export.

Layout of a run folder::

    <output_dir>/checkpoints/latest             tag of the newest complete checkpoint (DeepSpeed's file)
    <output_dir>/checkpoints/step00000200/      engine.save_checkpoint: module, ZeRO shards, scheduler,
                                                client state (below)
    <output_dir>/export/                        save_pretrained of the consolidated fp32 weights

Client state: ``step`` (optimizer steps done), ``epoch`` and ``step_in_epoch`` (the sampler position),
``samples_seen``, ``world_size``, ``global_batch``, ``num_train`` (to refuse resuming on other data),
the python / numpy / torch RNG states of rank 0, and ``args`` for reference. Data order and the masking
and dropout randomness of step ``s`` are functions of (seed, s) (see :mod:`mlip_fast.train.loop`), so the
sampler position restores them exactly on every rank.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Optional

import numpy as np
import torch

__all__ = ["CheckpointError", "CHECKPOINT_DIR", "EXPORT_DIR", "tag_for", "save_checkpoint", "resolve_resume",
           "verify_checkpoint", "load_checkpoint", "export_consolidated", "StopRequest", "rng_state",
           "restore_rng_state"]

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
_TAG = re.compile(r"^step(\d{8})$")


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


def save_checkpoint(engine, ckpt_root: Path, step: int, client_state: dict, keep: int = 0) -> Path:
    """Collective (every rank calls it): writes ``ckpt_root/step<step>`` and points ``latest`` at it, then
    (rank 0) deletes all but the newest ``keep`` checkpoints (0 keeps all). Returns the tag folder."""
    import torch.distributed as dist

    tag = tag_for(step)
    state = dict(client_state, rng=rng_state())
    engine.save_checkpoint(str(ckpt_root), tag=tag, client_state=state)
    if dist.is_initialized():
        dist.barrier()
    if keep > 0 and (not dist.is_initialized() or dist.get_rank() == 0):
        tags = sorted(p.name for p in ckpt_root.iterdir() if p.is_dir() and _TAG.match(p.name))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(ckpt_root / old, ignore_errors=True)
    return ckpt_root / tag


def _read_latest(ckpt_root: Path) -> str:
    latest = ckpt_root / "latest"
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
        candidates = sorted((p for p in runs_root.glob(f"*/{CHECKPOINT_DIR}/latest")), key=lambda p: p.stat().st_mtime)
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
    if (path / "latest").is_file():
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
        raise CheckpointError(f"checkpoint {folder} does not exist ({ckpt_root / 'latest'} names it)")
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


class StopRequest:
    """Turns SIGTERM / SIGINT into a flag the loop checks between steps (it then saves a checkpoint and
    exits with 128 + signal number). A second signal of the same kind interrupts at once."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.signum == signum:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
