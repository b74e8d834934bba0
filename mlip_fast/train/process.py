"""Process set-up of the training app: the process group (through DeepSpeed: gloo on CPU, NCCL on GPU), decisions
taken on rank 0 and shared with every rank, deterministic mode, and the end of the process.

Exit. With several processes on CPU, DeepSpeed's shared-memory all-reduce op can abort the interpreter at exit
after a successful run. The app never builds that op (the collectives go through gloo; it only serves
DeepSpeed's inference all-reduce), and :func:`exit_process` ends with ``barrier``, ``destroy_process_group`` and
``os._exit`` after flushing every output.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["LaunchError", "Ranks", "init_distributed", "on_rank0", "barrier", "device_type_name",
           "deterministic_algorithms", "exit_process"]


class LaunchError(RuntimeError):
    """The processes could not form their group (e.g. the rendezvous port is taken), or cannot start at all."""


def require_deepspeed() -> None:
    """The training app runs on DeepSpeed, an extra of the package: a clear error before anything else when it is
    not installed."""
    if importlib.util.find_spec("deepspeed") is None:
        raise LaunchError("the training app needs DeepSpeed, which is not installed: pip install 'mlip_fast[train]'")


@dataclass(frozen=True)
class Ranks:
    """Where this process sits: its rank among ``world`` processes and among the ``local_world`` of its node."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Ranks:
    """The process's :class:`Ranks` after initialising torch.distributed through DeepSpeed. A plain
    ``python train.py`` runs as a world of one."""
    import deepspeed  # the training app's engine; imported when a run starts, not for --help or usage errors
    import deepspeed.ops

    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed's CPU shared-memory all-reduce op only serves inference all-reduce; building it costs a JIT
    # compile and, with several processes, it can abort the interpreter at exit. gloo does the collectives.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        try:
            deepspeed.init_distributed(verbose=False)
        except dist.DistNetworkError as e:
            raise LaunchError(f"cannot start the process group at {os.environ.get('MASTER_ADDR')}:"
                              f"{os.environ.get('MASTER_PORT')} ({e}); another run probably uses this port: pass "
                              f"--master_port <free port> to the deepspeed launcher") from None
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    return Ranks(rank, world, local_rank, local_world)


def on_rank0(fn, rank: int):
    """Runs ``fn`` on rank 0 and gives every rank its result, or raises its exception on every rank (so
    that a decision such as "this checkpoint is corrupted" stops all processes alike)."""
    payload = [None]
    if rank == 0:
        try:
            payload = [("ok", fn())]
        except Exception as e:  # re-raised below, on every rank
            payload = [("error", e)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    kind, value = payload[0]
    if kind == "error":
        raise value
    return value


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def device_type_name() -> str:
    """The accelerator DeepSpeed picked: "cuda", "cpu", ..."""
    from deepspeed.accelerator import get_accelerator  # see init_distributed

    return get_accelerator().device_name()


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """``torch.use_deterministic_algorithms(True)`` for the run when ``enabled``, the previous mode after it."""
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def exit_process(code: int) -> None:
    """Flushes the outputs, leaves the process group (after a barrier when ``code`` is 0, success) and ends the
    process with ``code`` (see the module doc)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        try:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer that already failed: nothing left to synchronise with
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
