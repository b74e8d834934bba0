"""Static GPU compile of every Triton kernel, without a GPU: registers, spills, shared memory, occupancy,
tensor-core instructions and hot-loop SASS sizes for sm_80 (A100) and sm_90 (H100 / H200).

    python -m tools.kernel_static --json benchmarks/results/kernel_static.json [--dump DIR] [--quick]
    python -m tools.kernel_static --readme      # only regenerate the table in benchmarks/README.md

How. A stand-in active Triton driver reports the target GPU (``GPUTarget("cuda", 90, 32)`` or 80). The real
launchers of ``kernels/`` are called on ``meta`` tensors, so their block-size heuristics, constexprs, grids and
split decisions are exactly those of a real launch; only the final ``kernel[grid](...)`` is redirected to
``kernel.warmup(...)`` with ``MockTensor`` arguments, which runs Triton's whole pipeline down to PTX and a cubin
through the ``ptxas`` shipped in the triton wheel. Registers and spills come from ``ptxas -v`` on that PTX
(the flags Triton uses), SASS from ``cuobjdump -sass``. Run it in a process without ``TRITON_INTERPRET``
(the interpreter flag is read when kernels are decorated).

Per compiled launch it records: kernel, arch, dtype, shape, config (constexprs, warps, stages), grid,
compiled (or the error), registers, spill bytes (stores + loads), stack bytes, shared bytes, blocks per SM
from registers / shared memory / warps and which one limits, tensor-core instructions in the SASS
(``HGMMA`` on sm_90, ``HMMA`` on sm_80) and the PTX (``wgmma`` / ``mma.sync``), layout conversions in the
TTGIR, and every loop of the SASS (backward branches) with its instruction count, tensor-core count and
shuffle / shared-memory traffic, instructions per execution pipe and L1 / shared-memory data bytes. Identical
compiles (same kernel, arch and specialisation) are compiled once.

``--dump DIR`` writes each distinct kernel's PTX, cubin and SASS so anyone can re-check with
``ptxas -v --gpu-name=sm_90a``.

Modules: ``analysis`` (the arch tables and what is read from a compile: ptxas report, SASS loops and pipes,
occupancy), ``compile`` (the stand-in driver, launches captured instead of run, the compiler worker processes),
``cases`` (the sweep and the gate cases of every op, run through the real launchers), ``records`` (the gate
rules, the JSON layout and the README table; no triton needed, so the performance model and the GPU check read
the records through it) and ``cli`` (the command). This ``__init__`` imports nothing: ``python -m
tools.kernel_static`` turns the interpreter off before anything imports a kernel.
"""
