"""Fixtures shared by every test folder."""
import pytest

from tests.process_group import one_process_world as _one_process_world


@pytest.fixture
def one_process_world(monkeypatch):
    """A world of one for a DeepSpeed engine built in the test (``tests.process_group.one_process_world``)."""
    yield from _one_process_world(monkeypatch)
