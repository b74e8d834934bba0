"""One run per folder: the run lock, refusing to reuse a folder that holds a run, and rewinding a resumed
run's records to its checkpoint.

- :class:`RunLock`: ``<run>/.run.lock`` is held (``flock``) for the whole run by rank 0 and names its
  holder (pid, host, start time). A second run on the folder is refused while the first holds it. A lock
  left by a process that died (kill -9, power loss) is stale: on the same host the kernel has dropped its
  ``flock`` and the recorded pid is gone, so it is taken over; a lock recorded by another host cannot be
  checked from here and is refused with the way to clear it.
- :func:`check_run_folder`: a folder that already holds a run (``checkpoints/``, ``summary.json``,
  ``export/``, or training steps in ``metrics.jsonl``) is refused without ``--resume``, and a resume writes
  only into the folder of its own checkpoint or into a fresh one; an ``--output-dir`` that is a file is
  refused. A folder holding only a ``tokenizer/`` (prepared for the run), or the log of a start that failed
  before its first step, is not a run.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import psutil

__all__ = ["RunFolderError", "RunLock", "LOCK_NAME", "RUN_MARKERS", "holds_run", "check_run_folder"]

LOCK_NAME = ".run.lock"
# What a run that trained leaves in its folder; any of them means the folder holds a run.
RUN_MARKERS = ("checkpoints", "summary.json", "export")
METRICS = "metrics.jsonl"


class RunFolderError(ValueError):
    """The run folder cannot be used by this run (held by another run, holds a finished one, is a file)."""


def _has_steps(metrics: Path) -> bool:
    if not metrics.is_file():
        return False
    with open(metrics, encoding="utf-8", errors="replace") as f:
        return any('"kind": "train"' in line for line in f)


def holds_run(folder: Path) -> list:
    """What in ``folder`` shows that a run trained there: names from ``RUN_MARKERS``, and ``metrics.jsonl``
    when it records a training step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return ([METRICS] if _has_steps(folder / METRICS) else []) + [m for m in RUN_MARKERS if (folder / m).exists()]


def check_run_folder(folder: Path, resuming: bool, checkpoint_run: Optional[Path] = None) -> None:
    """Raises :class:`RunFolderError` (one line: what is wrong and what to do) unless ``folder`` may receive
    this run: a new or prepared folder, or, when resuming, the folder of the checkpoint's own run."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--output-dir {folder} is a file, not a folder; choose a folder")
    found = holds_run(folder)
    if not found:
        return
    if not resuming:
        raise RunFolderError(f"{folder} already holds a run ({', '.join(found)}); continue it with --resume latest "
                             f"--output-dir {folder}, or choose another --output-dir / --run-name")
    if checkpoint_run is not None and Path(checkpoint_run).resolve() != folder.resolve():
        raise RunFolderError(f"{folder} holds another run ({', '.join(found)}) than the checkpoint's ({checkpoint_run}); "
                             f"resume into {checkpoint_run} (leave out --output-dir) or into a new folder")


def _host() -> str:
    return socket.gethostname()


def _process_start(pid: int) -> Optional[float]:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


class RunLock:
    """The exclusive lock of one run folder (see the module docstring). ``acquire()`` raises
    :class:`RunFolderError` when another live run holds it; ``stale`` then describes a lock taken over."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.stale: Optional[dict] = None
        self._fd: Optional[int] = None

    def acquire(self, cleanup: Optional[Callable[[], None]] = None) -> "RunLock":
        """Takes the lock; ``cleanup`` runs once it is held and before its record is written (removing a killed
        run's leftovers first: on a full disk they hold the space the record needs)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = self._read_holder(fd)
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderError(f"{self.path.parent} is in use by another run ({self._describe(holder)}); wait "
                                     f"for it to end or choose another --output-dir") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # the holder released (unlinked) it between our open and flock: try the new one
                os.close(fd)
                continue
            holder = self._read(fd)
            if holder:
                self._check_stale(fd, holder)
            if cleanup is not None:
                try:
                    cleanup()
                except BaseException:
                    os.close(fd)
                    raise
            record = {"pid": os.getpid(), "host": _host(), "start": _process_start(os.getpid()),
                      "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunFolderError(f"could not lock {self.path}: it keeps being replaced by another process")

    def _check_stale(self, fd: int, holder: dict) -> None:
        """We hold the flock, so a live holder on this host is impossible; the recorded process is gone (or its
        pid now belongs to another process). Another host's record cannot be checked from here."""
        if holder.get("host") != _host():
            os.close(fd)
            raise RunFolderError(f"{self.path.parent} is locked by a run on another host ({self._describe(holder)}); "
                                 f"if that run is no longer running, delete {self.path}")
        pid = holder.get("pid")
        alive = isinstance(pid, int) and _process_start(pid) is not None and _process_start(pid) == holder.get("start")
        if alive:  # the recorded process still runs but does not hold the lock: do not guess
            os.close(fd)
            raise RunFolderError(f"{self.path} names a running process ({self._describe(holder)}) that does not hold "
                                 f"it; if no run uses {self.path.parent}, delete {self.path}")
        self.stale = holder

    @classmethod
    def _read_holder(cls, fd: int, wait_s: float = 5.0) -> dict:
        """The holder's record; a holder that has just taken the lock writes it after clearing the run's leftovers,
        so an empty record is read again for up to ``wait_s``."""
        deadline = time.monotonic() + wait_s
        holder = cls._read(fd)
        while not holder and time.monotonic() < deadline:
            time.sleep(0.05)
            holder = cls._read(fd)
        return holder

    @staticmethod
    def _read(fd: int) -> dict:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            return json.loads(text) if text else {}
        except (OSError, json.JSONDecodeError):
            return {}

    @staticmethod
    def _describe(holder: dict) -> str:
        if not holder:
            return "holder unknown"
        return f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('since')}"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # before closing: nobody can take the old file after we let go
        finally:
            os.close(self._fd)
            self._fd = None
