"""Independent references and input cases for testing mlip_fast's ops: fp64 grids written apart from
``mlip_fast.reference``, case generators with odd shapes and ragged masks, and exact distributions. The tests, the
GPU check (``tools/gpu_check``) and the benchmarks use the same ones.

- ``mlip_fast.testing.patch_sentence``: the max scores op;
- ``mlip_fast.testing.patch_sentence_ot``: the optimal-transport scores op;
- ``mlip_fast.testing.integrity_mask``: integrity-scored masking.
"""
