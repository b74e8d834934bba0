"""The method's default values, one home each (losses, functional API, model configs and the training app
read them from here).

- ``INIT_TEMPERATURE``: CLIP's initial temperature tau; both learnable logit scales (global and local)
  start at ``INIT_LOGIT_SCALE`` = 1 / tau.
- ``MAX_LOGIT_SCALE``: the bound on a logit scale (CLIP, open_clip); the parameter log(scale) is clamped at
  log(``MAX_LOGIT_SCALE``) after each optimizer step (:class:`mlip_fast.losses.LogitScale`).
- ``DEFAULT_SIE_TEMPERATURE``: tau_sie of the semantic integrity estimator's target distribution (the
  method leaves it open).
- ``LOCAL_MATCHINGS``: how the local loss aggregates patch-sentence similarities: token-wise ``"max"`` (MLIP as
  specified, the default) or entropic optimal transport ``"ot"`` (Sinkhorn with regularisation
  ``DEFAULT_OT_EPS`` for ``DEFAULT_OT_ITERS`` iterations; chosen on the synthetic benchmark's validation split,
  docs/training.md).
- ``SIE_MODES``: the readings of semantic integrity the model and the losses offer as one switch (``sie_mode``):
  ``"guided"`` (the method as specified), ``"discriminative"`` (the same estimator, a target specific to the
  pair), ``"maco"`` (MaCo's mask-layout weight, uniform masking) and ``"predictor"`` (a head predicts each masked
  view's integrity, uniform masking); ``ESTIMATOR_MODES`` are those that use the patch estimator (docs/training.md).
"""
from __future__ import annotations

__all__ = ["INIT_TEMPERATURE", "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "DEFAULT_SIE_TEMPERATURE", "LOCAL_MATCHINGS",
           "DEFAULT_OT_EPS", "DEFAULT_OT_ITERS", "SIE_MODES", "ESTIMATOR_MODES"]

INIT_TEMPERATURE = 0.07
INIT_LOGIT_SCALE = 1.0 / INIT_TEMPERATURE
MAX_LOGIT_SCALE = 100.0
DEFAULT_SIE_TEMPERATURE = 0.1
LOCAL_MATCHINGS = ("max", "ot")
DEFAULT_OT_EPS = 0.05
DEFAULT_OT_ITERS = 50
SIE_MODES = ("guided", "discriminative", "maco", "predictor")
ESTIMATOR_MODES = ("guided", "discriminative")
