"""GPU section for integrity-scored masking: CUDA correctness of the Triton kernels and timings against the
argsort + gather path (``benchmarks/bench_integrity_mask.py``'s baseline) and a plain copy of the same bytes.

``gpu_section_integrity_mask(out)`` is called by the GPU check and fills ``out["integrity_mask"]``; alone,
``python -m tools.gpu_check.integrity_mask`` prints the section. It needs only torch, triton and mlip_fast.

Targets (../shared/PERF.md): the fused forward reaches >= 70% of copy bandwidth and is >= 3x faster than
argsort + gather, with no host synchronisation and no host-side random numbers.
"""
from __future__ import annotations

import json

import torch

from benchmarks import harness
from benchmarks.bench_integrity_mask import argsort_gather, backward_bytes, forward_bytes, kept_count
from mlip_fast.kernels import integrity_mask as kernels
from mlip_fast.ops.integrity_mask import integrity_mask
from mlip_fast.testing.integrity_mask import plackett_luce  # exact enumeration

SHAPES = [(b, 196, c, ratio) for b in (128, 256) for c in (768, 1024) for ratio in (0.5, 0.25)]  # B, P, C, mask ratio
# Launch-parameter variations timed next to the default heuristic, so the heuristic can be retuned from the JSON.
SWEEP = [
    dict(KPB=k, BLOCK_J=k, BLOCK_C=c, num_warps=w)
    for k, c, w in [(16, 256, 4), (32, 128, 4), (32, 512, 8), (64, 256, 8), (64, 512, 8), (128, 256, 8)]
]


def _correctness(device) -> dict:
    checks = {}
    gen = torch.Generator(device=device).manual_seed(0)
    for B, P, C, keep in [(4, 197, 72, 50), (3, 1027, 33, 1000), (64, 5, 16, 2), (128, 196, 768, 98), (2, 4096, 8, 7)]:
        for dtype in (torch.bfloat16, torch.float32):
            tokens = torch.randn(B, P, C, device=device, generator=gen).to(dtype).requires_grad_(True)
            scores = torch.randn(B, P, device=device, generator=gen) * 2
            r = integrity_mask(tokens, scores, keep, seed=123, impl="triton")
            again = integrity_mask(tokens, scores, keep, seed=123, impl="triton")
            idx = r.index
            valid = bool((idx >= 0).all() and (idx < P).all() and (idx.diff(dim=1) > 0).all())
            gathered = torch.equal(r.kept, tokens.detach().gather(1, idx.unsqueeze(-1).expand(-1, -1, C)))
            s64 = scores.double()
            e = torch.exp(s64 - s64.max(1, keepdim=True).values)
            mask = torch.zeros_like(s64, dtype=torch.bool).scatter_(1, idx, True)
            integ_err = ((e * mask).sum(1) / e.sum(1) - r.integrity.double()).abs().max().item()
            grad = torch.randn(B, keep, C, device=device, generator=gen).to(dtype)
            (g,) = torch.autograd.grad(r.kept, tokens, grad)
            scatter = torch.zeros(B, P, C, device=device, dtype=dtype).scatter_(1, idx.unsqueeze(-1).expand(-1, -1, C), grad)
            checks[f"B{B}_P{P}_C{C}_K{keep}_{str(dtype).replace('torch.', '')}"] = {
                "index_valid": valid,
                "kept_equals_gather": gathered,
                "integrity_max_abs_err": integ_err,
                "integrity_ok": integ_err <= 1e-6 + P * 1.2e-7,
                "backward_equals_scatter": torch.equal(g, scatter),
                "same_seed_same_mask": torch.equal(idx, again.index),
            }
    # Gumbel-top-k law: 200k rows with the same scores are 200k independent samples.
    n, keep, temperature = 200_000, 2, 0.8
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.5], device=device)
    r = integrity_mask(torch.zeros(n, 5, 1, device=device), row.expand(n, 5), keep, temperature=temperature, seed=7,
                       impl="triton")
    expected, _ = plackett_luce(torch.softmax(row.double().cpu() / temperature, 0).tolist(), keep)
    counts = torch.bincount(r.index.flatten(), minlength=5).double().cpu()
    z = ((counts - n * expected) / torch.sqrt(n * expected * (1 - expected))).abs().max().item()
    checks["plackett_luce_inclusion"] = {"max_abs_z": z, "ok": z < 5.0}
    # No host synchronisation with a device generator (warm-up first: compilation is not the op).
    tokens = torch.randn(256, 196, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
    scores = torch.randn(256, 196, device=device)
    cuda_gen = torch.Generator(device=device).manual_seed(1)

    def step():
        res = integrity_mask(tokens, scores, 98, generator=cuda_gen, impl="triton", check_finite=False)
        return torch.autograd.grad(res.kept, tokens, torch.ones_like(res.kept))

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        checks["no_host_sync"] = {"ok": True}
    except RuntimeError as err:
        checks["no_host_sync"] = {"ok": False, "error": str(err)[:300]}
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    checks["all_ok"] = all(
        v.get("ok", True) and all(x for k, x in v.items() if isinstance(x, bool)) for v in checks.values()
    )
    return checks


def _timings(device) -> list:
    from triton.testing import do_bench

    rows = []
    dtype, elem = torch.bfloat16, 2
    for B, P, C, ratio in SHAPES:
        keep = kept_count(P, ratio)
        tokens = torch.randn(B, P, C, device=device, dtype=dtype)
        scores = torch.randn(B, P, device=device)
        grad_kept = torch.randn(B, keep, C, device=device, dtype=dtype)
        copy_src = torch.randn(B * keep * C, device=device, dtype=dtype)
        copy_dst = torch.empty_like(copy_src)
        _, index, _, slot = kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 5)
        expand = index.unsqueeze(-1).expand(-1, -1, C)
        ms = {
            "triton_fwd": do_bench(lambda: kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 5)),
            "triton_op_fwd": do_bench(lambda: integrity_mask(tokens, scores, keep, seed=5, impl="triton", check_finite=False)),
            "argsort_gather_fwd": do_bench(lambda: argsort_gather(tokens, scores, keep)),
            "reference_fwd": do_bench(lambda: integrity_mask(tokens, scores, keep, seed=5, impl="reference", check_finite=False)),
            "copy": do_bench(lambda: copy_dst.copy_(copy_src)),
            "triton_bwd": do_bench(lambda: kernels.integrity_mask_bwd(grad_kept, slot)),
            "scatter_bwd": do_bench(lambda: torch.zeros(B, P, C, device=device, dtype=dtype).scatter_(1, expand, grad_kept)),
        }
        fwd_b = forward_bytes(B, P, C, keep, elem)
        copy_bw = 2 * B * keep * C * elem / ms["copy"] / 1e6  # GB/s
        fwd_bw = fwd_b / ms["triton_fwd"] / 1e6
        sweep = {}
        for cfg in SWEEP:
            name = "_".join(f"{k}{v}" for k, v in cfg.items())
            sweep[name] = do_bench(lambda: kernels.integrity_mask_fwd(tokens, scores, keep, 1.0, 5, config=dict(cfg)))
        best = min(sweep, key=sweep.get)
        rows.append({
            "B": B, "P": P, "C": C, "K": keep, "dtype": "bfloat16",
            **{f"{k}_us": round(v * 1e3, 2) for k, v in ms.items()},
            "triton_fwd_GBps": round(fwd_bw, 1),
            "copy_GBps": round(copy_bw, 1),
            "fwd_pct_of_copy": round(100 * fwd_bw / copy_bw, 1),
            "speedup_vs_argsort_gather": round(ms["argsort_gather_fwd"] / ms["triton_fwd"], 2),
            "speedup_vs_reference": round(ms["reference_fwd"] / ms["triton_fwd"], 2),
            "bwd_GBps": round(backward_bytes(B, P, C, keep, elem) / ms["triton_bwd"] / 1e6, 1),
            "bwd_speedup_vs_scatter": round(ms["scatter_bwd"] / ms["triton_bwd"], 2),
            "default_config": kernels.fwd_config(B, P, C, keep, interpret=False),
            "sweep_us": {k: round(v * 1e3, 2) for k, v in sweep.items()},
            "best_config": best,
            "best_config_pct_of_copy": round(100 * fwd_b / sweep[best] / 1e6 / copy_bw, 1),
        })
        del tokens, grad_kept, copy_src, copy_dst
    return rows


def gpu_section_integrity_mask(out: dict) -> None:
    """Fills ``out["integrity_mask"]`` with environment, correctness checks, timings and target verdicts."""
    if not torch.cuda.is_available():
        out["integrity_mask"] = {"skipped": "no CUDA device"}
        return
    device = torch.device("cuda")
    section = {"environment": harness.environment(device), "correctness": _correctness(device)}
    rows = _timings(device)
    section["timing"] = rows
    section["targets"] = {
        "fwd_pct_of_copy_min": min(r["fwd_pct_of_copy"] for r in rows),
        "fwd_pct_of_copy_target": 70.0,
        "speedup_vs_argsort_gather_min": min(r["speedup_vs_argsort_gather"] for r in rows),
        "speedup_target": 3.0,
        "met": all(r["fwd_pct_of_copy"] >= 70.0 and r["speedup_vs_argsort_gather"] >= 3.0 for r in rows),
        "no_host_sync": section["correctness"]["no_host_sync"]["ok"],
    }
    out["integrity_mask"] = section


if __name__ == "__main__":
    result: dict = {}
    gpu_section_integrity_mask(result)
    print(json.dumps(result, indent=1, default=str))
