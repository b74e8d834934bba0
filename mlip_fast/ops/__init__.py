"""mlip_fast ops: fused kernels behind one dispatching API, each with a reference impl.

- ``patch_sentence_scores``: token-wise max patch-sentence scores, both directions.
- ``patch_sentence_ot_scores``: optimal-transport patch-sentence scores (entropic, log-domain Sinkhorn), one
  matrix for both directions.
- ``integrity_mask``: integrity-scored masking (score -> Gumbel-top-k -> gather).
"""
from mlip_fast.ops.dispatch import ImplUnavailableError, describe_selected
from mlip_fast.ops.integrity_mask import MaskResult, integrity_mask
from mlip_fast.ops.patch_sentence import patch_sentence_scores
from mlip_fast.ops.patch_sentence_ot import patch_sentence_ot_scores

__all__ = ["patch_sentence_scores", "patch_sentence_ot_scores", "integrity_mask", "MaskResult", "ImplUnavailableError", "describe_selected"]
