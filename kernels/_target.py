"""The GPU a launch is planned for: compute capability and SM count, read from the device.

Launch heuristics (block sizes per architecture, how many programs fill the GPU) ask :func:`target_of`.
``OVERRIDE`` lets the static compile tool (``tools/kernel_static``) plan launches for a GPU that is
not present, so that what it compiles is exactly what the launchers would launch there.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class Target:
    arch: int  # compute capability as major * 10 + minor (80 = A100, 90 = H100/H200); 0 = no GPU
    sm_count: int


OVERRIDE: Optional[Target] = None
NO_GPU = Target(arch=0, sm_count=1)


def target_of(device: torch.device) -> Target:
    """The target GPU of tensors on ``device`` (``OVERRIDE`` when set; ``NO_GPU`` off CUDA)."""
    if OVERRIDE is not None:
        return OVERRIDE
    if device.type != "cuda":
        return NO_GPU
    return _cuda_target(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    """A card's properties do not change while the process runs: read once per device index."""
    props = torch.cuda.get_device_properties(index)
    return Target(arch=props.major * 10 + props.minor, sm_count=props.multi_processor_count)
