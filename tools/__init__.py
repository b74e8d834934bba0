"""The project's apps that are not the library: they measure, record and check it, and write
``benchmarks/results/`` and the README tables. Each runs from the repository root as ``python -m tools.<name>``:

- ``ablation``: MLIP's parts on the built-in synthetic benchmark, several seeds, paired differences;
- ``default_run``: records a finished (or a fresh) default training run;
- ``tune_default_run``: the default run's candidate settings, chosen on the validation split;
- ``train_changes``: each speed change of the default run's training step, before / after in one process;
- ``cpu_targets``: the CPU targets of PERF.md for the patch-sentence op and loss against their peers;
- ``kernel_static``: every Triton kernel compiled for sm_80 and sm_90 without a GPU, and the CI gate on it;
- ``perf_model``: the performance MODEL of the fused op and its peers from the static compile;
- ``gpu_check``: the one-command GPU check (correctness, peers, calibration, training step);
- ``readme_table``: the README results tables (called by the others; ``--readme`` of each).

Layers: ``tools`` sits on top of everything: it imports the library (``mlip_fast``, any part) and the benchmarks'
shared inputs and measurements (``benchmarks``: the harness, the peers, the pytest-benchmark files' step
factories); neither imports ``tools`` (``tests/test_architecture.py``). Not part of the wheel.
"""
