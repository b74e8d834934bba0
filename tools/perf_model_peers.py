"""Performance MODEL of the baselines and of the torch side kernels (used by ``perf_model.py``; not a measurement).

Every baseline is modelled from its algorithm as a sequence of kernels, each costing the larger of its FLOPs at
the matmul rate it reaches and its bytes at the memory it streams from, plus the card's per-kernel launch cost;
the op is their sum. N = B*G*K*S grid elements, eb = bytes per input element.

- ``naive``: the reference (``mlip_fast.reference.patch_sentence``) in eager PyTorch: the einsum writes the grid
  in the input dtype, ``.to(float32)`` widens it, each direction runs ``masked_fill`` and ``max(dim)`` over the
  fp32 grid. Backward: per direction the max scatters into a zero-filled fp32 grid and ``masked_fill``'s backward
  rewrites it; the two are summed, cast back and read by the einsum's two GEMMs.
- ``naive_bf16``: the grid a user writes by hand in bf16 (``peers._naive_bf16``): einsum, ``masked_fill`` and
  ``amax`` in bf16; ``amax``'s backward (equality mask, tie count, scaled mask) per direction, the sum, the GEMMs.
- ``compiled``: ``torch.compile`` of the reference (max-autotune): one GEMM writing the grid in the input dtype,
  one fused masked-max reduction per direction reading it (the fp32 widening fused into them). Backward, the
  compiler's best case: one pointwise kernel writing the dense dSim in the input dtype from the saved indices,
  then the two GEMMs reading it (the "dense dSim + two cuBLAS GEMMs" backward that ``gpu_check`` times);
  a scatter into a zero-filled fp32 grid would add 16 N bytes.
- ``lik`` / ``flash_maxsim``: both are one-direction MaxSim kernels with one program per (query item, document
  item) pair, the query block and every document token streamed from L2 by each program, and an atomic
  backward with one program per query token walking the documents (gather a row, FMA into dQ, fp32 atomic add
  into dD). Modelled as a LOWER BOUND: their tensor-core FLOPs at the dense peak, their L2 and HBM bytes at the
  stated bandwidths, launches; their own instruction issue is not modelled (their kernels are not compiled
  here), so the real peers are at least this slow. Two calls, one per direction; flash-maxsim also zero-fills
  its int32 argmax buffer.

Normalisation (the training path, ``normalize=True``): eager ``F.normalize``-style copies and their autograd for
``naive`` / ``naive_bf16`` / ``flash_maxsim``; one fused reduction + pointwise kernel per input each way for
``compiled``; lik normalises inside its forward kernel and maps the gradient in a torch epilogue after its
backward. ``fused`` (ours) is counted in ``perf_model.py`` from the launchers' code.
"""
from __future__ import annotations

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4}


def matmul_peak(card, dtype: str) -> float:
    """FLOP/s of the card's dense peak for a GEMM in ``dtype`` (fp32: the FMA peak, tf32 / bf16: tensor cores)."""
    return {"fp32": card.fp32_tflops, "tf32": card.tf32_tflops}.get(dtype, card.bf16_tflops) * 1e12


def kernel(card, flops: float = 0.0, rate: float = 1.0, nbytes: float = 0.0, l2_bytes: float = 0.0,
           l2_tbs: float = 0.0) -> float:
    """Seconds of one kernel: the slowest of its FLOPs at ``rate``, its HBM bytes and its L2 bytes."""
    t = [flops / rate, nbytes / (card.hbm_tbs * 1e12)]
    if l2_bytes:
        t.append(l2_bytes / (l2_tbs * 1e12))
    return max(t)


class Timeline:
    """Kernels in one stream: the sum of their bodies, and the launch count (each costs ``card.launch_us`` in an
    eager stream, ``card.graph_launch_us`` under CUDA-graph replay)."""

    def __init__(self, card):
        self.card, self.body_s, self.launches, self.parts = card, 0.0, 0, {}

    def add(self, name: str, seconds: float, launches: int = 1) -> "Timeline":
        self.body_s += seconds
        self.launches += launches
        part = self.parts.setdefault(name, {"seconds": 0.0, "launches": 0})
        part["seconds"] += seconds
        part["launches"] += launches
        return self

    def passes(self, name: str, nbytes: float, launches: int) -> "Timeline":
        """Memory-bound elementwise / reduction kernels moving ``nbytes`` in all."""
        return self.add(name, nbytes / (self.card.hbm_tbs * 1e12), launches)

    def result(self) -> dict:
        c = self.card
        return dict(seconds=self.body_s + self.launches * c.launch_us * 1e-6,
                    kernel_seconds=self.body_s + self.launches * c.graph_launch_us * 1e-6,
                    launches=self.launches, parts={k: dict(v) for k, v in self.parts.items()})


def normalize_cost(tl: Timeline, style: str, mode: str, elems: int, eb: int) -> None:
    """The normalisation's own kernels over ``elems`` = (B*K + G*S)*D input elements, for ``style`` eager /
    compiled / lik, forward or backward. Eager forward per input: widen, norm, clamp, divide, narrow (5 launches);
    its autograd about 7 launches and 5 fp32 passes. Compiled: one fused kernel per input each way. lik: in its
    kernel forward; backward norms, normalised copies and a 5-step gradient map per input (8 launches)."""
    per_input = 2
    if style == "compiled":
        tl.passes("normalize", elems * (2 * eb if mode == "fwd" else 3 * eb), per_input)
    elif style == "lik":
        if mode != "fwd":
            tl.passes("normalize", elems * (3 * eb + 10 * eb), 8 * per_input)
    elif mode == "fwd":
        tl.passes("normalize", elems * (eb + 4 + 4 + 4 + 4 + 4 + eb), 5 * per_input)
    else:
        tl.passes("normalize", elems * (eb + 5 * 12 + eb), 7 * per_input)


def grid_model(impl: str, mode: str, card, shape: dict, dtype: str, normalize: bool = False) -> dict:
    """``naive``, ``naive_bf16`` or ``compiled``: fwd or bwd seconds (see the module docstring for the counts)."""
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = DTYPE_BYTES[dtype]
    n = B * G * K * S
    rate = matmul_peak(card, dtype) * card.attainable
    gemm = 2 * B * G * K * S * D
    inputs = (B * K + G * S) * D * eb
    tl = Timeline(card)
    if normalize:
        normalize_cost(tl, "compiled" if impl == "compiled" else "eager", mode, (B * K + G * S) * D, eb)
    if impl == "naive":
        if mode == "fwd":
            tl.add("grid GEMM", kernel(card, gemm, rate, eb * n + inputs))
            tl.passes("widen grid to fp32", (eb + 4) * n, 1)
            tl.passes("masked_fill + max, two directions", 2 * 12 * n, 4)
            tl.passes("means, masks", 0, 6)
        else:
            tl.passes("max scatter + masked_fill backward, two directions", 2 * 12 * n, 6)
            tl.passes("sum of the two grid gradients, cast", 12 * n + (4 + eb) * n, 2)
            tl.add("two GEMMs", kernel(card, 2 * gemm, rate, 2 * eb * n + 2 * inputs), 2)
    elif impl == "naive_bf16":
        if mode == "fwd":
            tl.add("grid GEMM", kernel(card, gemm, rate, eb * n + inputs))
            tl.passes("masked_fill + amax (i2t), amax (t2i)", 4 * eb * n, 3)
            tl.passes("means, masks", 0, 6)
        else:
            tl.passes("amax backward, two directions", 2 * (eb + 1 + 1 + 1 + eb) * n, 6)
            tl.passes("masked_fill backward, sum", 2 * eb * n + 3 * eb * n, 2)
            tl.add("two GEMMs", kernel(card, 2 * gemm, rate, 2 * eb * n + 2 * inputs), 2)
    elif impl == "compiled":
        if mode == "fwd":
            tl.add("grid GEMM", kernel(card, gemm, rate, eb * n + inputs))
            tl.passes("fused masked-max reductions, two directions", 2 * eb * n + 8 * B * G * (K + S), 2)
            tl.passes("means", 0, 1)
        else:
            tl.passes("dense dSim from the saved indices", eb * n + 8 * B * G * (K + S), 1)
            tl.add("two GEMMs", kernel(card, 2 * gemm, rate, 2 * eb * n + 2 * inputs), 2)
    else:
        raise ValueError(impl)
    return dict(tl.result(), bound="hbm+gemm", model_kind="algorithm (kernels counted from the code)")


def _maxsim_call(tl: Timeline, mode: str, card, l2_tbs: float, q: tuple, d: tuple, D: int, eb: int,
                 zero_argmax: bool) -> None:
    """One MaxSim call, queries q = (Nq, Lq) against documents d = (Nd, Ld), forward or backward (lower bound)."""
    (nq, lq), (nd, ld) = q, d
    pairs = nq * nd
    if mode == "fwd":
        flops = 2 * pairs * lq * ld * D
        l2 = pairs * (lq + ld) * D * eb
        hbm = (nq * lq + nd * ld) * D * eb + pairs * (lq * 4 + 4)
        tl.add("MaxSim forward kernel", kernel(card, flops, card.bf16_tflops * 1e12, hbm, l2, l2_tbs))
        if zero_argmax:
            tl.passes("argmax buffer zero fill", pairs * lq * 4, 1)
        tl.passes("score scaling in the wrapper", 0, 3)
    else:
        steps = nq * lq * nd
        l2 = steps * (D * eb + 4 * D + 8)
        hbm = (nq * lq + nd * ld) * D * (eb + 4) + pairs * lq * 4
        tl.passes("dD zero fill", nd * ld * D * 4, 1)
        tl.add("MaxSim atomic backward kernel", kernel(card, 2 * steps * D, card.fp32_tflops * 1e12, hbm, l2, l2_tbs))
        tl.passes("gradient casts, wrapper backward", (nq * lq + nd * ld) * D * (4 + eb), 5)


def maxsim_model(impl: str, mode: str, card, l2_tbs: float, shape: dict, dtype: str, normalize: bool = False) -> dict:
    """``lik`` / ``flash_maxsim``: two one-direction calls (i2t: patches against reports; t2i: sentences against
    images), fwd or bwd seconds, a lower bound (see the module docstring)."""
    B, G, K, S, D = (shape[k] for k in "BGKSD")
    eb = DTYPE_BYTES[dtype]
    tl = Timeline(card)
    if normalize:
        normalize_cost(tl, "lik" if impl == "lik" else "eager", mode, (B * K + G * S) * D, eb)
    for q, d in (((B, K), (G, S)), ((G, S), (B, K))):
        _maxsim_call(tl, mode, card, l2_tbs, q, d, D, eb, zero_argmax=impl == "flash_maxsim")
    return dict(tl.result(), bound="l2", model_kind="lower bound (MMA at dense peak, L2 / HBM bytes, launches; "
                                                    "the peer's instruction issue not modelled)")
