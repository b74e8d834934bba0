"""The rivals a user would pick instead of the fused patch-sentence scores op, behind one interface.

Every peer computes what the op computes, ``(i2t [B, G], t2i [B, G])`` fp32 for patches [B, K, D], sentences
[G, S, D] and a ragged sentence mask [G, S] whose valid sentences come first (the benchmarks' inputs):

- ``compiled``: ``torch.compile`` of the reference grid (max-autotune on CUDA), free for every user;
- ``naive_bf16``: the grid a user writes by hand in the input dtype (bf16 grid, masked max, fp32 means);
- ``lik``: late-interaction-kernels' fused Triton MaxSim, one call per direction (CUDA);
- ``flash_maxsim``: flash-maxsim's batched training kernel, one call per direction (CUDA);
- ``maxsim_cpu``: maxsim-cpu's Rust MaxSim, forward only, one call per image and per report (CPU).

MaxSim libraries sum over query tokens; the op's directions are means, so each peer's sums are divided by the
valid counts. A peer that is not installed is reported with the reason (``unavailable``), and every peer's
output must be checked against the reference before it is timed (:func:`check_peer`): a wrong peer is recorded
as wrong at that shape, never timed.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from mlip_fast.reference.patch_sentence import patch_sentence_scores as reference_scores


@dataclass(frozen=True)
class Peer:
    name: str
    package: Optional[str]  # the pip package it needs (None: torch itself)
    devices: tuple
    backward: bool  # differentiable (fwd+bwd can be timed)
    build: Callable  # (device) -> fn(patches, sentences, sentence_mask) -> (i2t, t2i)


def _lengths(mask: torch.Tensor) -> torch.Tensor:
    return mask.sum(1)


def _compiled(device):
    mode = "max-autotune" if torch.device(device).type == "cuda" else None

    def grid(p, s, m):
        return reference_scores(p, s, m, None, "both")

    return torch.compile(grid, mode=mode, dynamic=False)


def _naive_bf16(device):
    def scores(p, s, m):
        sim = torch.einsum("bkd,gsd->bgks", p, s)  # [B, G, K, S] in the input dtype
        i2t = sim.masked_fill(~m[None, :, None, :], float("-inf")).amax(-1).float().mean(-1)
        best = sim.amax(-2).float()  # [B, G, S]
        t2i = (best * m[None]).sum(-1) / _lengths(m).clamp(min=1)[None]
        return i2t, t2i

    return scores


def _lik(device):
    from late_interaction_kernels import maxsim

    def scores(p, s, m):
        i2t = maxsim(p, s, d_mask=m) / p.shape[1]
        t2i = maxsim(s, p, q_mask=m).T / _lengths(m).clamp(min=1)[None]
        return i2t.float(), t2i.float()

    return scores


def _flash_maxsim(device):
    from flash_maxsim import flash_maxsim_batched_train

    def scores(p, s, m):
        lengths = _lengths(m).to(torch.int32)
        i2t = flash_maxsim_batched_train(p, s, doc_lengths=lengths) / p.shape[1]
        t2i = flash_maxsim_batched_train(s, p, query_lengths=lengths).T / lengths.clamp(min=1)[None]
        return i2t.float(), t2i.float()

    return scores


def _maxsim_cpu(device):
    import maxsim_cpu

    def scores(p, s, m):
        pn = p.detach().float().numpy()
        lengths = _lengths(m).tolist()
        docs = [s[g, :n].detach().float().numpy() for g, n in enumerate(lengths)]
        i2t = torch.stack([torch.from_numpy(maxsim_cpu.maxsim_scores_variable(pn[b], docs)) for b in range(len(pn))])
        t2i = torch.stack([torch.from_numpy(maxsim_cpu.maxsim_scores(docs[g], pn)) for g in range(len(docs))]).T
        return i2t / p.shape[1], t2i / torch.tensor(lengths, dtype=t2i.dtype).clamp(min=1)[None]

    return scores


PEERS = {
    peer.name: peer
    for peer in (
        Peer("compiled", None, ("cpu", "cuda"), True, _compiled),
        Peer("naive_bf16", None, ("cuda",), True, _naive_bf16),
        Peer("lik", "late_interaction_kernels", ("cuda",), True, _lik),
        Peer("flash_maxsim", "flash_maxsim", ("cuda",), True, _flash_maxsim),
        Peer("maxsim_cpu", "maxsim_cpu", ("cpu",), False, _maxsim_cpu),
    )
}


def unavailable(name: str, device) -> Optional[str]:
    """Why peer ``name`` cannot run on ``device`` (None when it can)."""
    peer = PEERS[name]
    if torch.device(device).type not in peer.devices:
        return f"{name} runs on {', '.join(peer.devices)} only"
    if peer.package is not None:
        try:
            importlib.import_module(peer.package)
        except Exception as err:  # an installed package can still fail to import (no CUDA, ABI)
            return f"{name} is not usable here ({peer.package}: {type(err).__name__}: {err}); pip install '.[bench]'"
    return None


def build(name: str, device):
    """fn(patches, sentences, sentence_mask) -> (i2t, t2i) of peer ``name``."""
    return PEERS[name].build(device)


def check_peer(fn, p: torch.Tensor, s: torch.Tensor, m: torch.Tensor, rtol: float) -> dict:
    """Runs ``fn`` once and compares it with the fp32 reference: {"ok", "max_rel_err"} (relative to the scores'
    scale). ``rtol`` is the tolerance of the inputs' dtype."""
    with torch.no_grad():
        want = reference_scores(p.float(), s.float(), m, None, "both")
        got = fn(p.detach(), s.detach(), m)
    err = max(float((g.float() - w).abs().max() / w.abs().max().clamp(min=1e-12)) for g, w in zip(got, want))
    return {"ok": bool(err <= rtol), "max_rel_err": err}
