"""Fused patch-sentence scores as Triton kernels: ``forward.py`` (similarity tile, both maxima and their argmax
from one tile; the path on every GPU but sm_90), ``backward.py`` (both input gradients from the argmax indices),
``launch.py`` (block sizes, size limits, the split of the backward, the launches). Shipped as
``mlip_fast.kernels.patch_sentence``; the names below are its public surface (launchers, heuristics, limits, and
the kernels themselves for tools that compile them)."""
from mlip_fast.kernels._target import target_of
from mlip_fast.kernels.patch_sentence.backward import _patch_sentence_bwd_kernel
from mlip_fast.kernels.patch_sentence.forward import _max_and_first_index, _patch_sentence_fwd_kernel
from mlip_fast.kernels.patch_sentence.launch import (
    DETERMINISTIC_SPLIT,
    INTERPRET,
    MAX_TOKENS,
    MIN_SLOTS,
    NORM_EPS,
    bwd_config,
    fwd_config,
    inverse_norms,
    limits,
    patch_sentence_bwd,
    patch_sentence_fwd,
    s_tile,
    valid_counts,
)

__all__ = [
    "DETERMINISTIC_SPLIT", "INTERPRET", "MAX_TOKENS", "MIN_SLOTS", "NORM_EPS", "_max_and_first_index",
    "_patch_sentence_bwd_kernel", "_patch_sentence_fwd_kernel", "bwd_config", "fwd_config", "inverse_norms", "limits",
    "patch_sentence_bwd", "patch_sentence_fwd", "s_tile", "target_of", "valid_counts",
]
