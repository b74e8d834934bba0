"""Optimal-transport patch-sentence scores as Triton kernels: ``forward.py`` (similarity tile, Sinkhorn and score
in one program, potentials out), ``backward.py`` (the plan rebuilt from the potentials, two gradient products),
``launch.py`` (block sizes, size limits, the launches); and the chunked impl's Sinkhorn iterations on CPU as a C
kernel, ``sinkhorn_cpu.c``, built and launched by ``cpu.py``. Shipped as ``mlip_fast.kernels.patch_sentence_ot``."""
