"""The pytest-benchmark files (``bench_<op>.py``: providers x modes x named shapes, collected by ``pytest
benchmarks``), their harness (``harness.py``, fixtures in ``conftest.py``) and the peers they time (``peers.py``).
A package so that the tools (``tools/``) import the shared inputs and measurements as ``benchmarks.<module>``;
nothing here imports ``tools``.
"""
