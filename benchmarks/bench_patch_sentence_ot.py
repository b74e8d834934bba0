"""Benchmarks of patch_sentence_ot_scores (optimal-transport matching): providers x modes (fwd, full = fwd+bwd) x
named shapes, with peak memory (mode "full") and the environment in ``extra_info``. eps = 0.05, n_iter = 50.

Providers: the op's impls (reference, chunked, triton: CUDA only) and POT as a peer:
- ``pot-batch``: POT's batched log-domain Sinkhorn (``ot.batch.solve_batch``, method "log_sinkhorn", torch
  backend, envelope gradient) on the materialised [B*G, K, S] cost grid 1 - sim, padded sentences priced out;
  score 1 - value_linear. The same problem, plan and gradient up to iteration order (POT updates the patch side
  first) and its convergence check every 10 iterations. Its autograd graph keeps every iteration (about 9 bytes
  per grid cell and iteration), so mode "fwd" runs it under no_grad, and mode "full" is skipped where that graph
  would not fit (4 GiB on CPU, half the GPU's memory; at the CPU target shape it is 11 GB).
- ``pot-pairs``: ``ot.sinkhorn2`` (numpy, method "sinkhorn_log") one pair at a time: forward only, and only where
  B*G is small (16,384 separate solver calls at the CPU target shape would take minutes).

GPU shapes: B=G in {32, 128, 256} and 128 x 1024 local x gathered, K in {98, 196}, S=16, D in {256, 512}, bf16.
On CPU the target shape of PERF.md (B=G=128, K=98, S=16, D=256, fp32) and a small one; with
``--benchmark-disable`` (CI runs each benchmark once as a test) only the small one runs (the reference takes
about 20 s per call at the target shape on 2 cores), without the fresh-process memory probes.

    pytest benchmarks/bench_patch_sentence_ot.py --benchmark-only --benchmark-json out.json
    python benchmarks/bench_patch_sentence_ot.py --cpu-ratio   # writes benchmarks/results/ot_cpu.json

``--cpu-ratio``: chunked against reference at the CPU target shape, forward + backward, one process, for the op
(on unit vectors) and for the local loss with OT matching (``patch_sentence_loss(..., local_matching="ot")``, which
hands the op raw embeddings to normalise), each against PERF.md's targets (time <= 0.5x, memory <= 1/33); and the
op against ``torch.compile`` of the reference, forward + backward and forward alone (target: no slower).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import ot  # POT, the peer (pinned in requirements/cpu.txt; absent on the GPU machines)
except ImportError:
    ot = None

HERE = Path(__file__).resolve().parent
if __name__ == "__main__":  # as a script: the repository importable, as under pytest
    sys.path.insert(0, str(HERE.parent))

from benchmarks import harness  # noqa: E402
from mlip_fast.ops import patch_sentence_ot_scores  # noqa: E402
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_scores  # noqa: E402

PROVIDERS = ["reference", "chunked", "triton", "pot-batch", "pot-pairs"]
MODES = ["fwd", "full"]
EPS, N_ITER = 0.05, 50

GPU_SHAPES = {  # name -> (B, G, K, S, D)
    f"b{b}x{g}-k{k}-d{d}": (b, g, k, 16, d)
    for b, g in ((32, 32), (128, 128), (256, 256), (128, 1024))
    for k in (98, 196)
    for d in (256, 512)
}
CPU_SHAPES = {
    "cpu-small-b8-k49-d64": (8, 8, 49, 8, 64),
    "cpu-target-b128-k98-d256": (128, 128, 98, 16, 256),
}
CPU_TARGET = "cpu-target-b128-k98-d256"
ON_CUDA = torch.cuda.is_available()
SHAPES = GPU_SHAPES if ON_CUDA else CPU_SHAPES
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = "bfloat16" if ON_CUDA else "float32"
POT_PAIRS_MAX = 256  # pairs solved one by one at most
POT_GRAPH_BYTES_PER_CELL_ITER = 9  # measured: 11.4 GB at B=G=128, K=98, S=16, n_iter=50
POT_GRAPH_CPU_BYTES_MAX = 4 * 2**30  # the CPU machines have 24 GB, shared; on CUDA: half the device's memory
GRID_CELLS_MAX = 2**30  # materialised-grid providers beyond this many B*G*K*S cells are skipped


def make_inputs(B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """L2-normalised patches [B, K, D] and sentences [G, S, D] (requires_grad), a ragged sentence mask [G, S]
    (each report keeps S/2..S sentences) and an upstream gradient [B, G]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)
    p = torch.nn.functional.normalize(torch.randn(B, K, D, generator=gen, device=device), dim=-1)
    s = torch.nn.functional.normalize(torch.randn(G, S, D, generator=gen, device=device), dim=-1)
    lengths = torch.randint(max(1, S // 2), S + 1, (G,), generator=gen, device=device)
    smask = torch.arange(S, device=device)[None, :] < lengths[:, None]
    grad = torch.randn(B, G, generator=gen, device=device)
    return p.to(dt).requires_grad_(), s.to(dt).requires_grad_(), smask, grad


def pot_batch_scores(p, s, smask, eps=EPS, n_iter=N_ITER):
    """[B, G] scores by POT's batched log-domain Sinkhorn on the full cost grid (fp32), envelope gradient."""
    B, K, _ = p.shape
    G, S, _ = s.shape
    sim = torch.einsum("bkd,gsd->bgks", p, s).float().reshape(B * G, K, S)
    # Padded sentences: no mass (b = 0) and a prohibitive cost, so that POT's first patch update ignores them too.
    cost = torch.where(smask.repeat(B, 1)[:, None, :], 1.0 - sim, torch.full((), 1e3, device=sim.device))
    a = torch.full((B * G, K), 1.0 / K, device=sim.device)
    b = (smask.float() / smask.sum(1, keepdim=True)).repeat(B, 1)
    res = ot.batch.solve_batch(cost, reg=eps, a=a, b=b, max_iter=n_iter, tol=0.0, method="log_sinkhorn",
                               grad="envelope")
    return 1.0 - res.value_linear.view(B, G)


def pot_pairs_scores(p, s, smask, eps=EPS, n_iter=N_ITER):
    """[B, G] scores by ``ot.sinkhorn2`` one pair at a time (numpy; no gradient)."""
    sim = torch.einsum("bkd,gsd->bgks", p.detach(), s.detach()).double().cpu().numpy()
    mask = smask.cpu().numpy()
    B, G, K, _ = sim.shape
    out = np.zeros((B, G))
    for b in range(B):
        for g in range(G):
            block = sim[b, g][:, mask[g]]
            out[b, g] = 1.0 - ot.sinkhorn2(np.full(K, 1.0 / K), np.full(block.shape[1], 1.0 / block.shape[1]),
                                           1.0 - block, eps, method="sinkhorn_log", numItermax=n_iter, stopThr=0.0,
                                           warn=False)
    return torch.from_numpy(out)


_COMPILED = {}


def compiled_reference():
    """``torch.compile`` of the reference op (eps and n_iter fixed, so its 50 iterations unroll into one graph): the
    first rival PERF.md names for a CPU path. Compiled once per process, on first call (and again for a call
    without grad: dynamo guards on the grad mode)."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(lambda p, s, smask: reference_scores(p, s, smask, None, EPS, N_ITER))
    return _COMPILED["fn"]


def forward(provider, p, s, smask, mode="full"):
    if provider == "compiled":
        return compiled_reference()(p, s, smask)
    if provider == "pot-batch":
        if mode == "fwd":
            with torch.no_grad():
                return pot_batch_scores(p, s, smask)
        return pot_batch_scores(p, s, smask)
    if provider.startswith("pot") and ot is None:
        return "POT is not installed (pip install pot)"
    if provider == "pot-pairs":
        return pot_pairs_scores(p, s, smask)
    return patch_sentence_ot_scores(p, s, smask, eps=EPS, n_iter=N_ITER, impl=provider)


def backward(out, p, s, grad):
    return torch.autograd.grad((out * grad).sum(), (p, s))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_step(provider, mode, B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """A zero-argument callable running one ``mode`` ("fwd" or "full") step on fresh inputs; used for timing and
    by the fresh-process memory probe (``harness.cpu_peak_memory``)."""
    p, s, smask, grad = make_inputs(B, G, K, S, D, dtype, device, seed)

    def step():
        out = forward(provider, p, s, smask, mode)
        if mode == "full":
            out = backward(out, p, s, grad)
        _sync(device)
        return out

    return step


def make_loss_step(provider, mode, B, G, K, S, D, dtype="float32", device="cpu", seed=0):
    """Like :func:`make_step` for the local loss with OT matching (``patch_sentence_loss(...,
    local_matching="ot")``, which normalises its inputs on the way in) through ``provider``'s scores op; "full"
    back-propagates it to patches and sentences."""
    from mlip_fast.functional import patch_sentence_loss

    p, s, smask, _ = make_inputs(B, G, K, S, D, dtype, device, seed)

    def step():
        loss = patch_sentence_loss(p, s, smask, impl=provider, local_matching="ot", ot_eps=EPS, ot_iters=N_ITER)
        out = torch.autograd.grad(loss, (p, s)) if mode == "full" else loss
        _sync(device)
        return out

    return step


def op_peak_memory(provider, B, G, K, S, D, dtype, device, factory="make_step"):
    """Peak bytes of one fwd+bwd step built by ``factory`` (``make_step``: the op, ``make_loss_step``: the loss)
    above the inputs, and the bytes of the input gradients it returns."""
    if torch.device(device).type == "cuda":
        peak = harness.cuda_peak_memory(globals()[factory](provider, "full", B, G, K, S, D, dtype, device), device)
    else:
        kwargs = dict(provider=provider, mode="full", B=B, G=G, K=K, S=S, D=D, dtype=dtype, device=device)
        peak = harness.cpu_peak_memory(f"benchmarks.bench_patch_sentence_ot:{factory}", kwargs, timeout=900)
    grads = (B * K + G * S) * D * getattr(torch, dtype).itemsize
    return peak, grads


def skip_reason(provider, mode, shape, disabled):
    """Why this benchmark does not run here (None: it runs)."""
    B, G, K, S, D = SHAPES[shape]
    if provider == "triton" and not ON_CUDA:
        return "triton is benchmarked on CUDA only (the CPU interpreter is ~250x slower than torch)"
    if provider.startswith("pot") and ot is None:
        return "POT is not installed (pip install pot)"
    if provider == "pot-pairs":
        if mode != "fwd":
            return "POT's per-pair solver (numpy) has no backward; pot-batch times POT's gradient"
        if ON_CUDA or B * G > POT_PAIRS_MAX:
            return (f"{B * G} pairs one at a time; pot-pairs runs on CPU up to {POT_PAIRS_MAX} pairs "
                    "(pot-batch is the peer)")
    if provider in ("reference", "pot-batch") and B * G * K * S > GRID_CELLS_MAX:
        return f"the materialised grid has {B * G * K * S} cells (> {GRID_CELLS_MAX})"
    graph = B * G * K * S * N_ITER * POT_GRAPH_BYTES_PER_CELL_ITER
    limit = 0.5 * torch.cuda.get_device_properties(0).total_memory if ON_CUDA else POT_GRAPH_CPU_BYTES_MAX
    if provider == "pot-batch" and mode == "full" and graph > limit:
        return f"POT's autograd graph over {N_ITER} iterations would take about {graph / 2**30:.1f} GiB here"
    if disabled and shape == CPU_TARGET:
        return "the CPU target shape runs with --benchmark-only or --cpu-ratio (about 20 s per reference call)"
    return None


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_patch_sentence_ot(benchmark, bench_env, provider, mode, shape):
    why = skip_reason(provider, mode, shape, benchmark.disabled)
    if why:
        pytest.skip(why)
    B, G, K, S, D = SHAPES[shape]
    benchmark.group = f"patch_sentence_ot-{mode}-{shape}"
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(provider=provider, mode=mode, shape=shape, B=B, G=G, K=K, S=S, D=D, dtype=DTYPE,
                                eps=EPS, n_iter=N_ITER)
    if mode == "full" and not benchmark.disabled:  # a fresh process per probe: only when results are kept
        peak, grads = op_peak_memory(provider, B, G, K, S, D, DTYPE, DEVICE)
        benchmark.extra_info.update(peak_memory_bytes=peak, input_grad_bytes=grads)
    step = make_step(provider, mode, B, G, K, S, D, DTYPE, DEVICE, seed=1)
    step()  # warm-up (JIT, allocator) outside the timing
    if ON_CUDA:
        benchmark(step)
    else:
        benchmark.pedantic(step, rounds=3, iterations=1)


# ------------------------------------------------------------------------------ CPU ratio (one process)

RATIO_PROVIDERS = ("reference", "chunked")
TIME_TARGET, MEMORY_TARGET = 0.5, 1 / 33
COMPILED_TARGET = 1.0  # PERF.md: the CPU path no slower than torch.compile(reference), forward and fwd + bwd


def cpu_ratio(rounds: int, compiled: bool = True) -> dict:
    """Chunked vs reference at the CPU target shape, fwd+bwd, fp32: times interleaved round by round in this
    process (alternating the order), memory as the peak RSS delta of one step in a fresh process; "op memory"
    excludes the input gradients every provider returns (PERF.md's definition). With ``compiled``, the chunked op
    also against ``torch.compile(reference)`` (:func:`compiled_reference`), fwd + bwd and forward alone (no grad,
    each side's inference path), its compile time (the first call's) recorded apart; its memory is not probed."""
    B, G, K, S, D = CPU_SHAPES[CPU_TARGET]
    load_before = os.getloadavg()
    # "op": the scores op on unit vectors; "loss": the local loss with OT matching (raw embeddings: the op
    # normalises them); "fwd": the op's forward under no_grad
    factories = {"op": "make_step", "loss": "make_loss_step"}

    def label(kind, p):  # the record's name of a (kind, provider) pair
        return p if kind == "op" else f"{kind}_{p}"

    steps = {(kind, p): globals()[factories[kind]](p, "full", B, G, K, S, D)
             for kind in factories for p in RATIO_PROVIDERS}
    if compiled:
        steps["op", "compiled"] = make_step("compiled", "full", B, G, K, S, D)
        for p in ("chunked", "compiled"):
            step = make_step(p, "fwd", B, G, K, S, D)
            steps["fwd", p] = lambda step=step: _no_grad(step)
    first_call_s = {}
    for key, step in steps.items():  # warm-up (the compiled provider compiles here)
        start = time.perf_counter()
        step()
        first_call_s[label(*key)] = time.perf_counter() - start
    times = {key: [] for key in steps}
    for r in range(rounds):
        for key in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
            start = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - start)
    memory = {}
    for kind, p in ((k, p) for k, p in steps if p in RATIO_PROVIDERS and k in factories):
        peak, grads = op_peak_memory(p, B, G, K, S, D, "float32", "cpu", factory=factories[kind])
        memory[label(kind, p)] = {"peak_bytes": peak, "input_grad_bytes": grads, "op_bytes": max(peak - grads, 0)}
    t_min = {key: min(v) for key, v in times.items()}
    t_med = {key: statistics.median(v) for key, v in times.items()}
    ratios = {
        "time_ratio_min": t_min["op", "chunked"] / t_min["op", "reference"],
        "time_ratio_median": t_med["op", "chunked"] / t_med["op", "reference"],
        "op_memory_ratio": memory["chunked"]["op_bytes"] / max(memory["reference"]["op_bytes"], 1),
        "peak_memory_ratio_with_input_grads":
            memory["chunked"]["peak_bytes"] / max(memory["reference"]["peak_bytes"], 1),
        "loss_time_ratio_min": t_min["loss", "chunked"] / t_min["loss", "reference"],
        "loss_time_ratio_median": t_med["loss", "chunked"] / t_med["loss", "reference"],
        "loss_memory_ratio": memory["loss_chunked"]["op_bytes"] / max(memory["loss_reference"]["op_bytes"], 1),
        "loss_peak_memory_ratio_with_input_grads":
            memory["loss_chunked"]["peak_bytes"] / max(memory["loss_reference"]["peak_bytes"], 1),
    }
    targets = {"time_ratio_max": TIME_TARGET, "memory_ratio_max": MEMORY_TARGET,
               "time_met": ratios["time_ratio_min"] <= TIME_TARGET,
               "memory_met": ratios["op_memory_ratio"] <= MEMORY_TARGET,
               "loss_time_met": ratios["loss_time_ratio_min"] <= TIME_TARGET,
               "loss_memory_met": ratios["loss_memory_ratio"] <= MEMORY_TARGET}
    if compiled:
        for kind in ("op", "fwd"):
            name = "compiled_full" if kind == "op" else "compiled_fwd"
            ratios[f"{name}_ratio_min"] = t_min[kind, "chunked"] / t_min[kind, "compiled"]
            ratios[f"{name}_ratio_median"] = t_med[kind, "chunked"] / t_med[kind, "compiled"]
            targets[f"{name}_met"] = ratios[f"{name}_ratio_min"] <= COMPILED_TARGET
        targets["compiled_ratio_max"] = COMPILED_TARGET
    shape = f"B=G={B} K={K} S={S} D={D} fp32 eps={EPS} n_iter={N_ITER}"
    table = []
    for kind, name in (("op", "patch_sentence_ot scores fwd+bwd"), ("fwd", "patch_sentence_ot scores fwd (no grad)"),
                       ("loss", "patch_sentence loss (OT) fwd+bwd")):
        providers = [p for k, p in steps if k == kind]
        if not providers:
            continue
        for p in providers:
            row = {"op": name, "shape": shape, "provider": p, "time_min_s": t_min[kind, p],
                   "time_median_s": t_med[kind, p]}
            if label(kind, p) in memory:
                row.update(op_memory_MiB=memory[label(kind, p)]["op_bytes"] / 2**20,
                           peak_with_grads_MiB=memory[label(kind, p)]["peak_bytes"] / 2**20)
            table.append(row)
        if "reference" in providers:
            prefix = "loss_" if kind == "loss" else ""
            table.append({"op": name, "shape": "ratio chunked / reference",
                          "provider": f"targets: time <= {TIME_TARGET}, memory <= 1/33",
                          "time_min_s": ratios[prefix + "time_ratio_min"],
                          "time_median_s": ratios[prefix + "time_ratio_median"],
                          "op_memory_MiB": ratios["loss_memory_ratio" if prefix else "op_memory_ratio"],
                          "peak_with_grads_MiB": ratios[prefix + "peak_memory_ratio_with_input_grads"]})
        if "compiled" in providers:
            name_c = "compiled_full" if kind == "op" else "compiled_fwd"
            table.append({"op": name, "shape": "ratio chunked / compiled", "provider": f"target: <= {COMPILED_TARGET}",
                          "time_min_s": ratios[f"{name_c}_ratio_min"],
                          "time_median_s": ratios[f"{name_c}_ratio_median"]})
    return {
        "environment": harness.environment("cpu"),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_1_5_15min_before": load_before,
        "load_average_1_5_15min_after": os.getloadavg(),
        "shape": dict(B=B, G=G, K=K, S=S, D=D),
        "dtype": "float32",
        "eps": EPS,
        "n_iter": N_ITER,
        "rounds": rounds,
        "first_call_s": first_call_s,
        "times_s": {label(kind, p): v for (kind, p), v in times.items()},
        "memory": memory,
        "ratios": ratios,
        "targets": targets,
        "table": table,
    }


def _no_grad(step):
    with torch.no_grad():
        return step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="CPU ratio of the OT scores op: chunked vs reference, fwd+bwd")
    parser.add_argument("--cpu-ratio", action="store_true", help="measure and write --out")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per provider")
    parser.add_argument("--no-compiled", action="store_true",
                        help="skip torch.compile(reference) (its compile takes a minute or more on 2 cores)")
    parser.add_argument("--threads", type=int, help="torch threads here and in the memory probes (default: torch's)")
    parser.add_argument("--note", default="", help="what the numbers cannot say by themselves (machine state)")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "ot_cpu.json")
    args = parser.parse_args(argv)
    if not args.cpu_ratio:
        parser.error("nothing to do: pass --cpu-ratio (the benchmarks run under pytest)")
    if args.threads:
        # one thread per process keeps the ratio stable on a machine shared with other work (a busy core stalls
        # every multi-threaded op at its barrier, and the chunked impl runs many small ops)
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    result = cpu_ratio(args.rounds, compiled=not args.no_compiled)
    if args.note:
        result["note"] = args.note
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"ratios": result["ratios"], "targets": result["targets"]}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
