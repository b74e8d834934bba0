"""Saving checkpoints (atomically, each with its manifest) and the consolidated export.

Atomic saves (:class:`Checkpointer`). Every rank writes its files into ``checkpoints/.partial-<tag>/<tag>/``;
after DeepSpeed's closing barrier rank 0 fsyncs them, writes ``manifest.json`` (the size and SHA-256 of every
file, read back from disk), renames the folder to ``checkpoints/<tag>`` and only then replaces ``latest``
(written to a temporary file, fsynced, renamed over the old one). A process killed at any point leaves
``latest`` naming a complete checkpoint; leftovers (``.partial-*``, ``.discard-*``) are removed by the next
run. An existing step folder is never written into: a resumed run does not save the step it resumed from
again, and resuming from an older checkpoint of the same folder first points ``latest`` at it and sets the
newer ones aside (``<tag>.superseded-<time>``). Old checkpoints are pruned by renaming them to
``.discard-<tag>`` before deleting them, so a half-deleted folder never looks like one; pruning happens only
after a new checkpoint is complete.

Full disk. A save that runs out of space removes its partial folder, leaves ``latest`` and the previous
checkpoint as they were and raises :class:`~mlip_fast.train.checkpoint_files.DiskFullError`, whose one line
names the folder, the space a checkpoint takes and the space free.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from mlip_fast.train.checkpoint import (DISCARD, LATEST, PARTIAL, CheckpointError, remove_leftovers, rng_state,
                                        step_of, tag_for, write_latest)
from mlip_fast.train.checkpoint_files import (DiskFullError, folder_bytes, fsync, fsync_tree, is_disk_full,
                                              weights_only_zero_to_fp32, write_manifest)

__all__ = ["Checkpointer", "export_consolidated"]

# DeepSpeed copies its consolidation script next to the checkpoints; it is kept in the checkpoint root.
_RECOVERY_SCRIPT = "zero_to_fp32.py"
# Bytes per parameter of a checkpoint when no earlier one tells: fp32 weights plus Adam's fp32 master copy and
# two moments (an upper bound for bf16 weights).
_BYTES_PER_PARAMETER = 16


def _discard(folder: Path) -> None:
    """Deletes a checkpoint folder after renaming it out of the checkpoint namespace (a kill during the
    deletion then leaves a ``.discard-*`` leftover, never a half-deleted checkpoint)."""
    trash = folder.with_name(f"{DISCARD}{folder.name}-{os.getpid()}")
    os.rename(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _parameter_count(engine) -> int:
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.module.parameters())


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
            remove_leftovers(self.root)

    def latest(self) -> Optional[Path]:
        """The folder ``latest`` names, or None before the first checkpoint."""
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        return self.root / tag if tag else None

    def save(self, engine, step: int, client_state: dict) -> Path:
        """Collective (every rank calls it): writes the checkpoint of ``step``, points ``latest`` at it and
        (rank 0) prunes older ones. Returns the tag folder."""
        tag = tag_for(step)
        final = self.root / tag
        if step == self.resumed_step and final.is_dir():
            latest = self.root / LATEST
            if _is_rank0() and not (latest.is_file() and latest.read_text().strip() == tag):
                write_latest(self.root, tag)
            _barrier()
            return final
        if final.exists():  # every rank sees the same folder, so every rank raises
            raise CheckpointError(f"checkpoint {final} already exists; refusing to overwrite it (the run folder "
                                  f"was changed by something else while this run used it)")
        staging = self.root / f"{PARTIAL}{tag}"
        if _is_rank0():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(staging, ignore_errors=True)
        _barrier()
        state = dict(client_state, rng=rng_state())
        try:
            # DeepSpeed writes every rank's files and ends with a barrier: after it the staging folder is complete.
            engine.save_checkpoint(str(staging), tag=tag, client_state=state, save_latest=False)
            if _is_rank0():
                self._publish(staging, tag, step, client_state.get("loss"))
        except BaseException as e:
            if _is_rank0():
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, Exception) and is_disk_full(e):
                raise DiskFullError(self._disk_full(tag, engine)) from None
            raise
        _barrier()
        return final

    def _publish(self, staging: Path, tag: str, step: int, loss) -> None:
        """Rank 0, once every file is written: manifest, rename into place, ``latest``, pruning."""
        fsync_tree(staging)
        write_manifest(staging / tag, step=step, loss=loss)
        fsync(staging / tag)
        script = staging / _RECOVERY_SCRIPT
        if script.is_file():
            os.replace(script, self.root / _RECOVERY_SCRIPT)
        os.rename(staging / tag, self.root / tag)
        fsync(self.root)
        write_latest(self.root, tag)
        shutil.rmtree(staging, ignore_errors=True)
        self._prune(step)

    def _disk_full(self, tag: str, engine) -> str:
        latest = self.latest()
        needed = folder_bytes(latest) if latest is not None and latest.is_dir() else \
            _parameter_count(engine) * _BYTES_PER_PARAMETER
        free = shutil.disk_usage(self.root).free
        kept = f"the previous checkpoint {latest} is intact" if latest is not None else "no earlier checkpoint exists"
        return (f"no space left on the filesystem of {self.root} while saving checkpoint {tag}: a checkpoint of this "
                f"run takes about {needed / 1e6:.1f} MB and {free / 1e6:.1f} MB are free. The partial save was "
                f"removed and {kept}; free space (or lower --keep-checkpoints), then continue with --resume latest")

    def _prune(self, step: int) -> None:
        if self.keep <= 0:
            return
        older = sorted(s for s in (step_of(p.name) for p in self.root.iterdir() if p.is_dir()) if s is not None and s < step)
        for s in older[:max(0, len(older) - (self.keep - 1))]:
            _discard(self.root / tag_for(s))


def export_consolidated(ckpt_root: Path, tag: str, fresh_model: torch.nn.Module, out_dir: Path) -> Path:
    """Rank 0: consolidates the fp32 master weights of a ZeRO 1/2/3 checkpoint (DeepSpeed's zero_to_fp32, reading
    weights-only), loads them into ``fresh_model`` (same config and tokenizer, no DeepSpeed) and writes
    ``save_pretrained(out_dir)``. Missing or unexpected keys are an error."""
    with weights_only_zero_to_fp32() as zero_to_fp32:
        state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(ckpt_root), tag=tag)
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
