"""The op template's shared pieces: what every fused op's Triton backend needs besides its own kernels.

An op ``<op>`` is built the same way each time (the OT op is the worked example in docs/architecture.md):

- ``kernels/<op>/`` (``forward.py``, ``backward.py``, ``launch.py`` with the launch heuristics and ``limits``;
  shared launcher code in ``kernels/_common.py``); ``mlip_fast/reference/<op>.py``, the readable PyTorch version;
- ``mlip_fast/ops/<op>/__init__.py``: the public function, its one validation boundary, the op's registry with every
  backend registered explicitly; ``chunked.py`` (tiled PyTorch) and ``triton_impl.py`` (custom ops named
  ``mlip_fast::<op>_fwd`` / ``_bwd`` with fake impls and a registered autograd formula), each exposing its ``IMPL``;
- value checks through ``mlip_fast._checks.value_checks()`` (one switch: ``MLIP_FAST_VALUE_CHECKS``, off while
  ``torch.compile`` traces).

A ``triton_impl`` imports its kernels module at its top, so readers and tools see the path from the op to its
kernels, inside ``try: ... except ImportError as err:`` binding it to None (triton is not a requirement), with
:func:`kernels_missing` as the reason; :func:`triton_impl` builds the backend's ``Impl``, whose ``unavailable``
says why it cannot run: no triton, no GPU nor interpreter, or kernels decorated for the other mode.
"""
from __future__ import annotations

from types import ModuleType
from typing import Callable, Optional, Sequence

import torch

from mlip_fast.ops.dispatch import Impl, triton_unavailable_reason

__all__ = ["custom_op_name", "kernels_missing", "triton_impl"]


def custom_op_name(op: str, part: str) -> str:
    """The torch.library name of an op's custom op: ``mlip_fast::<op>_<part>`` (part: "fwd", "bwd")."""
    return f"mlip_fast::{op}_{part}"


def kernels_missing(err: ImportError) -> str:
    """Why the Triton impl is unavailable when its kernels module failed to import (triton absent: CPU-only)."""
    return f"the Triton kernels cannot be imported ({err}); pip install triton"


def triton_impl(fn: Callable, kernels: Optional[ModuleType], import_error: Optional[str],
                dtypes: Sequence[torch.dtype], limits: Callable) -> Impl:
    """The ``Impl`` named "triton" of an op: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1."""

    def unavailable(device: torch.device) -> Optional[str]:
        if import_error is not None:
            return import_error
        why = triton_unavailable_reason(device)
        if why is None and device.type == "cpu" and not getattr(kernels, "INTERPRET", True):
            why = ("the kernels were imported without TRITON_INTERPRET=1, so they cannot run on CPU tensors "
                   "(set it before importing mlip_fast)")
        return why

    return Impl(name="triton", fn=fn, devices=("cuda", "cpu"), dtypes=tuple(dtypes), unavailable=unavailable,
                limits=limits)
