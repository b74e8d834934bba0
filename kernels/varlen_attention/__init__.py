"""Packed variable-length self-attention with dropout as a C kernel for CPU: ``attention_cpu.c`` (forward and
backward, the counter-based dropout mask), built and launched by ``cpu.py``. Shipped as
``mlip_fast.kernels.varlen_attention``."""
