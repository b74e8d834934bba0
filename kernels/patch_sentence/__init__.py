"""Fused patch-sentence scores as Triton kernels: ``forward.py`` (similarity tile, both maxima and their argmax
from one tile; every GPU), ``forward_v3.py`` (the persistent sm_90 forward for half inputs: resident sentence
block, TMA patch tiles, one packed-key reduction per direction), ``backward.py`` (both input gradients from the
argmax indices), ``side.py`` (inverse norms, backward weights, gradient epilogue: one launch each),
``heuristics.py`` (which kernel, block sizes, size limits, the backward's split) and ``launch.py`` (the launches).
Shipped as ``mlip_fast.kernels.patch_sentence``; the names below are its public surface (launchers, heuristics,
limits, and the kernels themselves for tools that compile them)."""
from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence.backward import _patch_sentence_bwd_kernel
from mlip_fast.kernels.patch_sentence.forward import _max_and_first_index, _patch_sentence_fwd_kernel
from mlip_fast.kernels.patch_sentence.forward_v3 import _patch_sentence_fwd_v3_kernel
from mlip_fast.kernels.patch_sentence.heuristics import (
    DETERMINISTIC_SPLIT,
    INTERPRET,
    MAX_TOKENS,
    MIN_SLOTS,
    NORM_EPS,
    backward_split,
    bwd_config,
    fwd_config,
    fwd_v3_config,
    fwd_v3_reasons,
    limits,
    s_tile,
)
from mlip_fast.kernels._common import valid_counts
from mlip_fast.kernels.patch_sentence.launch import (
    FWD_KERNELS,
    inverse_norms,
    forward_prep,
    last_forward,
    patch_sentence_bwd,
    patch_sentence_fwd,
)
from mlip_fast.kernels.patch_sentence.side import (
    _patch_sentence_grad_epilogue_kernel,
    _patch_sentence_prep_kernel,
    _patch_sentence_weights_kernel,
)

__all__ = [
    "DETERMINISTIC_SPLIT", "FWD_KERNELS", "INTERPRET", "MAX_TOKENS", "MIN_SLOTS", "NORM_EPS", "_max_and_first_index",
    "_patch_sentence_bwd_kernel", "_patch_sentence_fwd_kernel", "_patch_sentence_fwd_v3_kernel",
    "_patch_sentence_grad_epilogue_kernel", "_patch_sentence_prep_kernel", "_patch_sentence_weights_kernel",
    "backward_split", "bwd_config", "fwd_config", "fwd_v3_config", "fwd_v3_reasons", "inverse_norms",
    "forward_prep", "last_forward", "limits", "patch_sentence_bwd", "patch_sentence_fwd", "s_tile", "target_of",
    "valid_counts",
]
