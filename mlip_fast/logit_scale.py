"""The learnable logit scale the model and the loss modules own, and its clamp (``mlip_fast.losses`` re-exports
both): a module of its own below the models and the losses, so that the model does not import the losses."""
from __future__ import annotations

import math

import torch
from torch import nn

from mlip_fast.constants import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE

__all__ = ["LogitScale", "clamp_logit_scales_"]


class LogitScale(nn.Module):
    """A learnable logit scale: the parameter ``log_scale`` = log(1 / temperature); ``forward()`` gives
    exp(log_scale) as a 0-dim tensor.

    The scale is bounded at ``max_scale`` by clamping the parameter after each optimizer step
    (:meth:`clamp_`, :func:`clamp_logit_scales_`), as open_clip does, and not inside ``forward``: a clamp
    in ``forward`` has zero gradient once the parameter passes log(max_scale), so it could never come back.
    An initial value above ``max_scale`` starts at ``max_scale``.

    A module of its own so that DeepSpeed ZeRO-3 gathers the parameter around the call that reads it. The
    parameter has shape [1], not [], because DeepSpeed's start-up broadcast views every parameter as bytes,
    which fails for 0-dim tensors. ``learnable=False`` keeps the value in a buffer instead.
    """

    def __init__(self, init: float = INIT_LOGIT_SCALE, max_scale: float = MAX_LOGIT_SCALE, learnable: bool = True):
        super().__init__()
        if not (math.isfinite(init) and init > 0):
            raise ValueError(f"the initial logit scale must be finite and > 0, got {init}")
        if not (math.isfinite(max_scale) and max_scale > 0):
            raise ValueError(f"max_scale must be finite and > 0, got {max_scale}")
        self.max_scale = float(max_scale)
        value = torch.full((1,), math.log(min(init, max_scale)))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    @property
    def max_log_scale(self) -> float:
        """The bound of the parameter: log(``max_scale``)."""
        return math.log(self.max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.exp().squeeze(0)

    @torch.no_grad()
    def clamp_(self) -> "LogitScale":
        """Clamps the parameter at log(``max_scale``) in place (after an optimizer step)."""
        self.log_scale.clamp_(max=self.max_log_scale)
        return self


def clamp_logit_scales_(module: nn.Module) -> None:
    """Clamps every :class:`LogitScale` inside ``module`` (the model, a loss module) at its bound; call it
    after each ``optimizer.step()``. (The DeepSpeed training app clamps the optimizer's fp32 copy as well:
    ``mlip_fast.train.loop.clamp_engine_logit_scales``.)"""
    for m in module.modules():
        if isinstance(m, LogitScale):
            m.clamp_()
