"""Backend selection for mlip_fast's ops.

Each op keeps an :class:`OpRegistry` of :class:`Impl` entries. An impl declares the devices and dtypes it
supports, an ``unavailable`` probe (is the backend usable on this device at all) and ``limits``, which sees
the actual inputs of the call (shapes, flags) and returns its reasons for declining them (index widths,
shared-memory or register limits of a kernel), like xformers' ``not_supported_reasons``. ``impl="auto"``
walks the op's priority list for the input's device and takes the first impl with no reason; when an impl is
passed over because of the inputs, that is logged once per op, impl and reason (logger ``mlip_fast.ops``).
An explicit impl that cannot run raises :class:`ImplUnavailableError` naming every reason of every impl.
The impl used last is kept in ``OpRegistry.last_used`` and reported by :func:`describe_selected`.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, List, Mapping, Optional, Sequence

import torch

logger = logging.getLogger("mlip_fast.ops")


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


def _no_limits(inputs: Mapping) -> List[str]:
    return []


@dataclass(frozen=True)
class Impl:
    """One backend of an op.

    ``limits(inputs)`` gets the call's description (a mapping with at least ``device`` and ``dtype``, plus
    the op's shapes and flags) and returns the reasons this impl cannot take those inputs (empty: it can).
    ``detail(inputs)`` adds to the run record what the impl runs inside for such a call (e.g. a CPU kernel).
    """

    name: str
    fn: Callable
    devices: Sequence[str]
    dtypes: Sequence[torch.dtype]
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None
    limits: Callable[[Mapping], List[str]] = _no_limits
    detail: Callable[[Mapping], dict] = lambda inputs: {}

    def not_supported_reasons(self, inputs: Mapping) -> List[str]:
        device, dtype = inputs["device"], inputs["dtype"]
        if device.type not in self.devices:
            return [f"device {device.type} not supported (supports {', '.join(self.devices)})"]
        reasons = []
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {str(dtype).replace('torch.', '')} not supported (supports {names})")
        why = self.unavailable(device)
        if why is not None:
            reasons.append(why)
        if not reasons:
            reasons.extend(self.limits(inputs))
        return reasons

    def refusal(self, device: torch.device, dtype: torch.dtype, inputs: Optional[Mapping] = None) -> Optional[str]:
        """All reasons joined into one string, or None when the impl can run."""
        reasons = self.not_supported_reasons({**(inputs or {}), "device": device, "dtype": dtype})
        return "; ".join(reasons) if reasons else None


@dataclass
class OpRegistry:
    op_name: str
    priority: dict  # device type -> ordered impl names for "auto"
    impls: dict = field(default_factory=dict)
    last_used: Optional[str] = None
    last_call: Optional[dict] = None  # impl, device and dtype of the last selection (for run records)

    def register(self, impl: Impl) -> Impl:
        self.impls[impl.name] = impl
        return impl

    _logged: set = field(default_factory=set)

    def select(self, impl: str, device: torch.device, dtype: torch.dtype, inputs: Optional[Mapping] = None) -> Impl:
        """The impl to run for these inputs (``inputs``: the op's shapes and flags, seen by ``limits``)."""
        desc = {**(inputs or {}), "device": device, "dtype": dtype}
        if impl == "auto":
            reasons = []
            for name in self.priority.get(device.type, self.priority.get("default", [])):
                candidate = self.impls.get(name)
                if candidate is None:
                    continue
                why = candidate.not_supported_reasons(desc)
                if not why:
                    self._log_fallbacks(reasons, name)
                    self._remember(name, desc)
                    return candidate
                reasons.append(f"{name}: {'; '.join(why)}")
            raise ImplUnavailableError(
                f"{self.op_name}: no impl can run on device={device.type} dtype={dtype}; " + "; ".join(reasons)
            )
        if impl not in self.impls:
            raise ValueError(
                f"{self.op_name}: unknown impl {impl!r}; choose one of {['auto', *sorted(self.impls)]}"
            )
        why = self.impls[impl].not_supported_reasons(desc)
        if why:
            others = [
                f"{n}: {'; '.join(self.impls[n].not_supported_reasons(desc)) or 'available'}"
                for n in sorted(self.impls) if n != impl
            ]
            raise ImplUnavailableError(
                f"{self.op_name}: impl {impl!r} cannot run: {'; '.join(why)}. Others: " + "; ".join(others)
            )
        self._remember(impl, desc)
        return self.impls[impl]

    def _remember(self, name: str, desc: Mapping) -> None:
        self.last_used = name
        self.last_call = {"impl": name, "device": desc["device"].type,
                          "dtype": str(desc["dtype"]).replace("torch.", ""), **self.impls[name].detail(desc)}

    def _log_fallbacks(self, reasons: List[str], chosen: str) -> None:
        for reason in reasons:
            key = (chosen, reason)
            if key not in self._logged:
                self._logged.add(key)
                logger.warning("%s: using %s because %s", self.op_name, chosen, reason)


_REGISTRIES: dict = {}


def registry(op_name: str, priority: dict) -> OpRegistry:
    """The registry for ``op_name``, created on first use."""
    if op_name not in _REGISTRIES:
        _REGISTRIES[op_name] = OpRegistry(op_name, priority)
    return _REGISTRIES[op_name]


def describe_selected(detail: bool = False) -> dict:
    """{op name: impl used last} for run logs; with ``detail``, {op name: {"impl", "device", "dtype"}} of the last
    call (what a training step ran: e.g. the scores op in bfloat16 under a bf16 engine)."""
    if detail:
        return {name: reg.last_call for name, reg in _REGISTRIES.items()}
    return {name: reg.last_used for name, reg in _REGISTRIES.items()}
