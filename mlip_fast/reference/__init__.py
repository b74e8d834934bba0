"""Readable vectorised PyTorch versions of every op: the specification, the CPU fallback, and the
baseline of tests and benchmarks."""
