"""Fixtures shared by every test folder."""
import pytest

from tests.process_group import free_port


@pytest.fixture
def one_process_world(monkeypatch):
    """RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT (a free port) of a world of one and
    DS_ACCELERATOR=cpu, for a DeepSpeed engine built in the test; afterwards, the default process group torn down
    through DeepSpeed when the test created it (DeepSpeed's teardown also drops the groups it cached; torch's alone
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
