"""Backend selection for mlip_fast's ops.

Each op keeps an :class:`OpRegistry` of :class:`Impl` entries. An impl declares the devices and dtypes it
supports and an ``unavailable`` probe returning a reason string (or None when it can run).
``impl="auto"`` walks the op's priority list for the input's device and takes the first impl that can
run; an explicit impl that cannot run raises :class:`ImplUnavailableError` listing why. The impl used
last is kept in ``OpRegistry.last_used`` and reported by :func:`describe_selected` for run logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


class ImplUnavailableError(RuntimeError):
    """Raised when a requested impl cannot run on the given inputs."""


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why Triton kernels cannot run on ``device`` (None when they can).

    Kernels run on CUDA tensors, or on CPU tensors under the Triton interpreter (TRITON_INTERPRET=1).
    """
    try:
        import triton  # noqa: F401  (availability probe)
    except ImportError:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    return f"triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable
    devices: Sequence[str]
    dtypes: Sequence[torch.dtype]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None

    def refusal(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if device.type not in self.devices:
            return f"device {device.type} not supported (supports {', '.join(self.devices)})"
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})"
        return self.unavailable(device)


@dataclass
class OpRegistry:
    op_name: str
    priority: dict  # device type -> ordered impl names for "auto"
    impls: dict = field(default_factory=dict)
    last_used: Optional[str] = None

    def register(self, impl: Impl) -> Impl:
        self.impls[impl.name] = impl
        return impl

    def select(self, impl: str, device: torch.device, dtype: torch.dtype) -> Impl:
        if impl == "auto":
            reasons = []
            for name in self.priority.get(device.type, self.priority.get("default", [])):
                candidate = self.impls.get(name)
                if candidate is None:
                    continue
                why = candidate.refusal(device, dtype)
                if why is None:
                    self.last_used = name
                    return candidate
                reasons.append(f"{name}: {why}")
            raise ImplUnavailableError(
                f"{self.op_name}: no impl can run on device={device.type} dtype={dtype}; " + "; ".join(reasons)
            )
        if impl not in self.impls:
            raise ValueError(
                f"{self.op_name}: unknown impl {impl!r}; choose one of {['auto', *sorted(self.impls)]}"
            )
        why = self.impls[impl].refusal(device, dtype)
        if why is not None:
            others = [
                f"{n}: {self.impls[n].refusal(device, dtype) or 'available'}" for n in sorted(self.impls) if n != impl
            ]
            raise ImplUnavailableError(f"{self.op_name}: impl {impl!r} cannot run: {why}. Others: " + "; ".join(others))
        self.last_used = impl
        return self.impls[impl]


_REGISTRIES: dict = {}


def registry(op_name: str, priority: dict) -> OpRegistry:
    """The registry for ``op_name``, created on first use."""
    if op_name not in _REGISTRIES:
        _REGISTRIES[op_name] = OpRegistry(op_name, priority)
    return _REGISTRIES[op_name]


def describe_selected() -> dict:
    """{op name: impl used last} for run logs."""
    return {name: reg.last_used for name, reg in _REGISTRIES.items()}
