"""Stop requests: SIGINT / SIGTERM, and the DeepSpeed launcher going away.

How the single-node ``deepspeed`` command starts a run (DeepSpeed 0.19, ``deepspeed/launcher/``):

- ``runner.py`` (the ``deepspeed`` / ``ds`` command) starts ``python -u -m deepspeed.launcher.launch ...``
  with ``subprocess.Popen`` and waits for it. On a single node it installs no signal handler, so a SIGINT /
  SIGTERM sent to it ends it at once (exit -2 / -15) and nothing else hears of it.
- ``launch.py`` starts one ``python -u train.py --local_rank=N ...`` per rank. On SIGINT / SIGTERM it sends
  SIGTERM to every rank's process tree, SIGKILLs whatever is left 30 s later and exits 1. When a rank exits
  with a non-zero code it does the same to the other ranks and exits with that code.
- All of them share the process group of the shell's job, so a Ctrl-C in a terminal reaches every one.

The ranks therefore install what the runner lacks (:func:`watch_launcher`): under the DeepSpeed launcher a
daemon thread watches the launcher and the runner, and when either ends while the rank trains it requests a
stop exactly as a SIGTERM would (finish the optimizer step, checkpoint, exit 143). The runner itself still
returns to the shell at once (DeepSpeed's code); the launcher and the ranks follow once the checkpoint is
written.

:class:`StopRequest` is installed first thing in a run, before anything slow (the process group, the
dataset build, a resume load), together with the launcher watch. While the run is not training
(``immediate``: start-up, and the export and evaluation after the last checkpoint) a stop interrupts at once
with :class:`StopSignal` (there is no step to finish; the watcher delivers its request to the main thread as a
SIGTERM, so a blocking call returns); during training it is a flag that the loop checks between steps. One stop
often arrives several times: a terminal's Ctrl-C reaches every process and the launcher forwards it again as
SIGTERM a few milliseconds later, and the launcher's disappearance is seen by the watcher. Everything within
``ECHO_WINDOW_S`` of the first request is one request; a signal after that interrupts at once
(``KeyboardInterrupt``: exit 130, no checkpoint). A process forked from the run (a DataLoader or pool worker)
inherits the handler; there it falls back to the signal's default action.

Runners recognised above the launcher: DeepSpeed's ``deepspeed`` / ``ds`` commands and
``python -m deepspeed.launcher.runner``, and ``mlip-train`` (:mod:`mlip_fast.train.launch`, which runs
DeepSpeed's runner in its own process).
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Callable, Optional

import psutil

__all__ = ["ECHO_WINDOW_S", "LAUNCHER_POLL_S", "RUNNER_NAMES", "StopSignal", "StopRequest", "LauncherWatch",
           "launcher_chain", "watch_launcher"]

# A signal within this many seconds of the first stop request is a copy of it (terminal + launcher forwarding).
ECHO_WINDOW_S = 1.0
# How often the ranks look at the launcher processes.
LAUNCHER_POLL_S = 0.5
# Commands that run DeepSpeed's runner in their own process (console scripts, and their ``python -m`` modules).
RUNNER_NAMES = ("deepspeed", "ds", "mlip-train")
RUNNER_MODULES = ("deepspeed.launcher.runner", "mlip_fast.train.launch")


class StopSignal(BaseException):
    """A stop request while the run is not training (start-up, or the export and evaluation after the last
    checkpoint): raised in the main thread at once. A ``BaseException``, like ``KeyboardInterrupt``, so that no
    ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int, reason: str):
        self.signum, self.reason = int(signum), reason
        super().__init__(f"stop requested ({reason})")


class StopRequest:
    """SIGTERM / SIGINT (and :meth:`request`) -> a stop flag the training loop checks, or, while ``immediate``,
    :class:`StopSignal` raised in the main thread at once.

    ``signum`` is the signal whose exit code the stop takes (128 + signum) and ``reason`` says what asked
    for it; both keep the first request. A signal more than ``ECHO_WINDOW_S`` after the first request
    raises ``KeyboardInterrupt`` in the main thread: the second stop interrupts at once.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, immediate: bool = False):
        self.signum: Optional[int] = None
        self.reason: Optional[str] = None
        self.immediate = immediate
        self._since: Optional[float] = None
        self._clock = clock
        self._previous: dict = {}
        self._pid = os.getpid()
        self._delivering = False
        self._raised = False
        self.checks: list = []  # the watchers' look-now methods (:meth:`poll`)

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def request(self, signum: int, reason: str) -> None:
        """Asks for a stop (no-op when one is already pending). Safe to call from any thread; from another
        thread while ``immediate``, the request is delivered to the main thread as ``signum``."""
        if self.signum is not None:
            return
        self.signum, self.reason, self._since = int(signum), reason, self._clock()
        if self.immediate and threading.current_thread() is not threading.main_thread() and self._previous:
            self._delivering = True
            signal.pthread_kill(threading.main_thread().ident, signum)

    def poll(self) -> None:
        """Lets every watcher look now (the training loop does, when another rank voted to stop and this one has
        no request yet: its own watcher, polling on its own clock, may simply not have looked)."""
        for check in list(self.checks):
            if self.signum is not None or check():
                return

    def raise_if_requested(self) -> None:
        """Raises :class:`StopSignal` for a request that arrived while the run was training (the loop had not
        seen it yet) once the run is in an ``immediate`` phase again."""
        if self.signum is not None and not self._raised:
            self._raised = True
            raise StopSignal(self.signum, self.reason)

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:  # a forked worker: the signal's default action
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self._delivering:  # the watcher's request, delivered by request()
            self._delivering = False
        elif self._since is None:
            self.request(signum, signal.Signals(signum).name)
        elif self._clock() - self._since > ECHO_WINDOW_S:
            raise KeyboardInterrupt(f"second stop request ({signal.Signals(signum).name}): stopping without a checkpoint")
        else:
            return  # a copy of the first request
        if self.immediate:
            self.raise_if_requested()


def _is_runner(proc: psutil.Process) -> bool:
    """A runner of DeepSpeed's launcher: ``deepspeed`` / ``ds`` / ``mlip-train`` (console scripts) or
    ``python -m deepspeed.launcher.runner`` / ``python -m mlip_fast.train.launch``."""
    cmd = proc.cmdline()
    return (any(m in cmd for m in RUNNER_MODULES)
            or any(os.path.basename(a) in RUNNER_NAMES for a in cmd[:2]))


def launcher_chain() -> list:
    """The DeepSpeed launcher processes above this process, nearest first: ``[launch.py]`` or
    ``[launch.py, runner]`` (single node, started by the ``deepspeed`` command); ``[]`` when this process was
    not started by ``deepspeed.launcher.launch`` (torchrun, plain python, a test)."""
    try:
        parent = psutil.Process(os.getppid())
        if "deepspeed.launcher.launch" not in parent.cmdline():
            return []
        chain = [parent]
        runner = parent.parent()
        if runner is not None and _is_runner(runner):
            chain.append(runner)
        return chain
    except (psutil.Error, OSError):
        return []


def _ended(proc: psutil.Process) -> bool:
    try:
        # a killed runner stays a zombie until its parent reaps it (a parent may wait on our output first)
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class LauncherWatch:
    """A daemon thread that requests a stop (as SIGTERM) when one of the watched processes ends.

    ``procs``: ``(name, psutil.Process)`` pairs; :meth:`close` ends the thread."""

    def __init__(self, stop: StopRequest, procs: list, poll_s: float = LAUNCHER_POLL_S):
        self.procs = list(procs)
        self._stop = stop
        self._poll_s = poll_s
        self._closed = threading.Event()
        self._thread = None
        if self.procs:
            stop.checks.append(self.check)
            self._thread = threading.Thread(target=self._run, name="mlip-launcher-watch", daemon=True)
            self._thread.start()

    def check(self) -> bool:
        """Looks at the watched processes now; requests the stop (and returns True) when one has ended."""
        for name, proc in self.procs:
            if _ended(proc):
                self._stop.request(signal.SIGTERM, f"the {name} (pid {proc.pid}) exiting")
                return True
        return False

    def _run(self) -> None:
        while not self._closed.wait(self._poll_s):
            if self.check():
                return

    def close(self) -> None:
        if self.check in self._stop.checks:
            self._stop.checks.remove(self.check)
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self._poll_s)


def watch_launcher(stop: StopRequest) -> LauncherWatch:
    """Watches the DeepSpeed launcher and runner above this rank (nothing elsewhere); see the module doc."""
    names = ("deepspeed launcher", "deepspeed command")
    return LauncherWatch(stop, list(zip(names, launcher_chain())))
