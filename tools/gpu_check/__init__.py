"""One-command GPU check: correctness on real CUDA, the op against its peers, the calibration runs of the
performance model and the op inside a training step, written to one JSON file.

    python -m tools.gpu_check --out DIR            # on a CUDA machine: inside 12 min on an H100
    python -m tools.gpu_check --out DIR --dry-run  # CPU, Triton interpreter, tiny shapes
    python benchmarks/gpu_check.py --out DIR       # the same command under its older name

Needs only torch and triton (no network, no deepspeed); late-interaction-kernels and flash-maxsim are timed when
installed and skipped with the reason otherwise. Writes ``DIR/gpu_<card>.json`` (``cpu_dry_run.json`` for a dry
run) after every section, so a crash or a timeout keeps what was measured. Each section is a function in
``SECTIONS``, run in order, cheapest and most informative first: the card (exact variant, clocks and power
sampled for the whole run), the bf16 matmul rate, L2 / HBM read bandwidth, correctness, the optimal-transport op
(``ot.py``: the default run's matching; correctness, then bf16 timings before fp32), the persistent sm_90
forward against the kernel it replaced (``v3.py``), the host time, launches and syncs of one call (``host.py``),
the op against its peers (``peers.py``), the op's share of a
training step (``train.py``), the calibration sweeps (``calibration.py``), the wider benchmark, the integrity mask
(``integrity_mask.py``), then the largest batch. Each section records its
wall time and the clocks and power over it; a failing section records its traceback and the others still run.

Time budget (``--budget-s``, default 630 s, so the whole run with start-up and the last measurement's overrun
ends inside 12 minutes on one H100): a section does not start with less than its ``MIN_START`` left (recorded as
skipped with the reason), and the sweeps inside sections stop at the budget; the free sections (environment,
model vs measurement, compiled kernels) always run. The clocks and power of each section are attached at the
end of the run, from nvidia-smi's timestamped samples. To add a section, write ``def section_<name>(ctx) -> dict``
and add it to ``SECTIONS``.

Timing follows PERF.md: ``triton.testing.do_bench`` (warm-up first, median), fresh random inputs rotated over
several sets so L2 is not what is measured, value checks off in timed regions; kernel-only times are the sum of
the GPU kernels' durations under ``torch.profiler`` per call. Memory is the ``torch.cuda.max_memory_allocated``
delta over one step (inputs allocated before). Every number is recorded with the card, driver, torch and
triton versions.

Modules: ``context`` (what every section gets), ``sections`` (the card, the matmul rate, correctness, model vs
measurement, the compiled kernels), one module per group of sections (``env``, ``calibration``, ``v3``,
``host``, ``peers``, ``train``, ``integrity_mask``, ``ot``) and ``cli`` (the order of the sections, the budget, the JSON).
``python -m tools.gpu_check`` turns the Triton interpreter on before any kernel is imported when there is no CUDA
device (the dry run); this ``__init__`` imports nothing, so that entry runs first.
"""
