"""``python -m tools.gpu_check``: the Triton interpreter on when there is no CUDA device (the dry run; without
``--dry-run`` the command refuses such a machine), then the command (:mod:`tools.gpu_check.cli`).

``TRITON_INTERPRET`` is read when a kernel is decorated, that is when its module is first imported; the sections'
modules import the kernels at their top, so the flag is set here, before them.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from tools.gpu_check.cli import main  # noqa: E402

sys.exit(main())
