"""``python -m tools.kernel_static``: the interpreter flag off, then the command (:mod:`tools.kernel_static.cli`).

``TRITON_INTERPRET`` is read when a kernel is decorated, that is when its module is first imported; the command's
modules import the kernels at their top, so the flag is set here, before them.
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

from tools.kernel_static.cli import main  # noqa: E402

sys.exit(main())
