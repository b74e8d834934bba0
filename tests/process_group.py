"""Free ports for tests that start process groups (the one-process world of in-process DeepSpeed engines is the
``one_process_world`` fixture of ``tests/conftest.py``)."""
import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
