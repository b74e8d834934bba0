"""A world of one for tests that build a DeepSpeed engine in the pytest process, and free ports for tests
that start process groups of their own."""
from __future__ import annotations

import socket
from typing import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process_world(monkeypatch) -> Iterator[None]:
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free port) of a world of one and
    DS_ACCELERATOR=cpu, set through ``monkeypatch``; afterwards, the default process group torn down through
    DeepSpeed when the test created it (DeepSpeed's teardown also drops the groups it cached; torch's alone
    would leave later in-process engines, such as the training tests', holding a destroyed world group)."""
    import torch.distributed as dist

    for key, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu").items():
        monkeypatch.setenv(key, value)
    owns_group = not dist.is_initialized()
    try:
        yield
    finally:
        if owns_group and dist.is_initialized():
            import deepspeed

            deepspeed.comm.destroy_process_group()
