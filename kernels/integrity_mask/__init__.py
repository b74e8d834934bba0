"""Integrity-scored masking in Triton: in-kernel Gumbel noise -> exact per-row top-k -> gather (``forward.py``), the
scatter backward (``backward.py``), and their launchers (``launch.py``)."""
from mlip_fast.kernels.integrity_mask.backward import _integrity_mask_bwd_kernel
from mlip_fast.kernels.integrity_mask.forward import MAX_PATCHES, _integrity_mask_fwd_kernel
from mlip_fast.kernels.integrity_mask.launch import fwd_config, integrity_mask_bwd, integrity_mask_fwd, limits

__all__ = ["MAX_PATCHES", "fwd_config", "limits", "integrity_mask_fwd", "integrity_mask_bwd",
           "_integrity_mask_fwd_kernel", "_integrity_mask_bwd_kernel"]
