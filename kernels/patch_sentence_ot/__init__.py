"""Optimal-transport patch-sentence scores as Triton kernels: ``forward.py`` (similarity tile, Sinkhorn and score
in one program, potentials out), ``backward.py`` (the plan rebuilt from the potentials, two gradient products),
``launch.py`` (block sizes, size limits, the launches). Shipped as ``mlip_fast.kernels.patch_sentence_ot``."""
