"""Contrastive-correct gradient accumulation (GradCache; open_clip's ``--accum-freq``) for MLIP.

Plain accumulation computes the loss per micro-batch, so the global and patch-sentence losses only see
the b x world rows of one micro-batch as negatives. Here an optimizer step over N micro-batches has the
loss and the gradient of ONE batch of N x b rows per rank (N x b x world gathered columns):

1. cache: each micro-batch m is run without gradient (``torch.no_grad``); its outputs are kept
   (memory: the features, not the activations);
2. loss: the cached outputs are concatenated along the batch (sentences padded to the largest S, with
   their mask False) into leaf tensors that require grad, ``MLIPLoss`` is computed over all of them
   (under torch.distributed it still gathers every rank's rows as columns) and back-propagated to the
   leaves only: ``g = d total / d output`` for every row;
3. re-run: each micro-batch is run again WITH gradient and ``sum_k <output_k, g_k>`` over its rows is
   back-propagated; by the chain rule the parameter gradients summed over the micro-batches are exactly
   ``d total / d parameters``. The logit scales are one value for the whole step, so their gradient enters
   once (with micro-batch 0).

The re-run must reproduce the cached pass exactly: the same batch and the same randomness (the training
loop seeds each micro-step with ``step_seed(seed, step, micro, rank)`` and passes the seed to the
masking, before both passes). ``surrogate`` checks that the re-run kept the same patches and produced
(nearly) the same features, and raises otherwise.

Cost: one extra forward per micro-batch. Memory: one micro-batch's activations plus the cached outputs
(``[N b, D]`` globals, ``[N b, K, D]`` patches, ``[N b, S, D]`` sentences).

API::

    cache_outputs(forward, n_micro) -> list[dict]              # step 1 (forward(m) -> model outputs)
    loss = CachedLoss(cached, criterion)                       # step 2 forward: loss.total, loss.terms
    loss.backward()                                            # step 2 backward (collective under dist)
    backward(loss.surrogate(m, forward(m))) for each m         # step 3
    accumulate(forward, criterion, n_micro, backward=...)      # all three, for loops without checks
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple

import torch

from mlip_fast.distributed import pad_to

__all__ = ["GRAD_KEYS", "STEP_KEYS", "cache_outputs", "concat_outputs", "CachedLoss", "accumulate",
           "ReplayMismatchError"]

# Per-row model outputs that carry gradient to the parameters (integrity_score: the per-view integrity head of the
# maco / predictor modes; None in the others).
GRAD_KEYS = ("image_global", "text_global", "patches", "sentences", "integrity_logits", "integrity_score")
# One value per step (0-dim, from parameters): their gradient enters once.
STEP_KEYS = ("logit_scale_global", "logit_scale_local")
# Re-run features may differ from the cached ones by at most this share of their largest magnitude: far
# above run-to-run rounding (bitwise on CPU, bf16 atomics on GPU), far below a dropout or masking
# mismatch (tens of percent).
REPLAY_RTOL = 0.05


class ReplayMismatchError(RuntimeError):
    """The re-run of a micro-batch did not reproduce its cached pass (different batch or randomness)."""


def _detached(outputs: Mapping) -> dict:
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in outputs.items()}


def cache_outputs(forward: Callable[[int], Mapping], n_micro: int) -> list[dict]:
    """Step 1: ``[forward(m) for m in range(n_micro)]`` without gradient, outputs detached."""
    if n_micro < 1:
        raise ValueError(f"n_micro must be >= 1, got {n_micro}")
    with torch.no_grad():
        return [_detached(forward(m)) for m in range(n_micro)]


def concat_outputs(outputs: Sequence[Mapping]) -> dict:
    """Model outputs of several micro-batches as one batch: per-row tensors concatenated along dim 0,
    ``sentences [b, S_m, D]`` / ``sentence_mask [b, S_m]`` padded to the largest S (zeros / False), the
    step values (logit scales) taken from the first micro-batch; None stays None."""
    if not outputs:
        raise ValueError("no outputs to concatenate")
    keys = set(outputs[0])
    for m, o in enumerate(outputs[1:], 1):
        if set(o) != keys:
            raise ValueError(f"micro-batch {m} has outputs {sorted(o)}, micro-batch 0 has {sorted(keys)}")
    s_max = max(o["sentences"].shape[1] for o in outputs) if "sentences" in keys else 0
    out = {}
    for k in keys:
        values = [o[k] for o in outputs]
        if k in STEP_KEYS or values[0] is None:
            out[k] = values[0]
        elif k in ("sentences", "sentence_mask"):
            fill = False if k == "sentence_mask" else 0.0
            out[k] = torch.cat([pad_to(v, s_max, 1, fill) for v in values])
        else:
            out[k] = torch.cat(values)
    return out


class CachedLoss:
    """Steps 2 and 3 over cached micro-batch outputs (see the module doc).

    Args:
        cached: the outputs of ``cache_outputs`` (detached; every key ``MLIPLoss`` takes).
        criterion: ``MLIPLoss`` (or any callable ``criterion(**outputs) -> (total, terms)``).

    Attributes:
        total: 0-dim loss of the whole accumulated batch (attached to the leaves until ``backward``).
        terms: its detached terms, as ``criterion`` returns them.
    """

    def __init__(self, cached: Sequence[Mapping], criterion: Callable):
        self.cached = list(cached)
        self.rows = [int(o["image_global"].shape[0]) for o in self.cached]
        self.sentences = [int(o["sentences"].shape[1]) for o in self.cached] if "sentences" in self.cached[0] else []
        merged = concat_outputs(self.cached)
        self.leaves: Dict[str, torch.Tensor] = {}
        for k in GRAD_KEYS + STEP_KEYS:
            v = merged.get(k)
            if torch.is_tensor(v) and v.is_floating_point():
                merged[k] = self.leaves[k] = v.detach().requires_grad_(True)
        self.total, self.terms = criterion(**merged)
        self.grads: Optional[Dict[str, torch.Tensor]] = None

    def backward(self) -> None:
        """d total / d every cached output (collective when the loss gathers across ranks)."""
        if self.grads is not None:
            raise RuntimeError("CachedLoss.backward() was already called")
        keys = list(self.leaves)
        grads = torch.autograd.grad(self.total, [self.leaves[k] for k in keys], allow_unused=True)
        self.grads = {k: (g if g is not None else torch.zeros_like(self.leaves[k])) for k, g in zip(keys, grads)}
        self.total = self.total.detach()

    def _slice(self, key: str, m: int) -> torch.Tensor:
        start = sum(self.rows[:m])
        g = self.grads[key][start:start + self.rows[m]]
        if key == "sentences":
            g = g[:, : self.sentences[m]]
        return g

    def _check_replay(self, m: int, outputs: Mapping) -> None:
        old = self.cached[m]
        if "patch_index" in old and old["patch_index"] is not None:
            if not torch.equal(old["patch_index"], outputs["patch_index"].detach()):
                raise ReplayMismatchError(
                    f"micro-batch {m}: the re-run kept other patches than the cached pass; run it with the same "
                    f"batch and seed the micro-step identically before both passes (masking and dropout)")
        for k in ("image_global", "text_global"):
            a, b = old[k].float(), outputs[k].detach().float()
            if a.shape != b.shape or (a - b).abs().max() > REPLAY_RTOL * a.abs().max().clamp_min(1e-6):
                raise ReplayMismatchError(
                    f"micro-batch {m}: the re-run's {k} differs from the cached pass (max |diff| "
                    f"{(a - b).abs().max() if a.shape == b.shape else 'shape'}); use the same batch and seed the "
                    f"micro-step identically before both passes (dropout)")

    def surrogate(self, m: int, outputs: Mapping) -> torch.Tensor:
        """``sum_k <outputs_k, g_k>`` over micro-batch ``m``'s rows (plus the logit scales for m = 0):
        back-propagating it gives micro-batch m's share of ``d total / d parameters``.
        ``outputs`` is the re-run of micro-batch m with gradient."""
        if self.grads is None:
            raise RuntimeError("call CachedLoss.backward() before surrogate()")
        if not 0 <= m < len(self.rows):
            raise IndexError(f"micro-batch {m} out of range for {len(self.rows)}")
        self._check_replay(m, outputs)
        total = None
        for k in GRAD_KEYS + (STEP_KEYS if m == 0 else ()):
            out = outputs.get(k)
            if k in self.grads and torch.is_tensor(out) and out.requires_grad:
                g = self.grads[k] if k in STEP_KEYS else self._slice(k, m)
                term = (out * g.to(out.dtype)).sum()
                total = term if total is None else total + term
        if total is None:
            raise ValueError(f"micro-batch {m}: no output requires grad (run the re-run with gradient enabled)")
        return total


def accumulate(forward: Callable[[int], Mapping], criterion: Callable, n_micro: int,
               backward: Callable[[torch.Tensor], object] = torch.Tensor.backward) -> Tuple[torch.Tensor, dict]:
    """One accumulated step: cache, loss over all micro-batches, re-run each with ``backward``.

    Args:
        forward: ``forward(m)`` -> the model outputs of micro-batch m; called twice per m (without and
            with gradient) and must give the same result both times (same batch, same seeds).
        criterion: ``MLIPLoss``.
        n_micro: N.
        backward: applied to each micro-batch's surrogate (``engine.backward`` under DeepSpeed, with no
            rescaling by the accumulation steps: the surrogates already sum to the step's gradient).

    Returns:
        (total loss of the N x b batch, detached; its terms).
    """
    loss = CachedLoss(cache_outputs(forward, n_micro), criterion)
    loss.backward()
    for m in range(n_micro):
        backward(loss.surrogate(m, forward(m)))
    return loss.total, loss.terms
