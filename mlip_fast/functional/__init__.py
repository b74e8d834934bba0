"""MLIP's losses as functions (the ``mlip_fast.losses`` modules wrap these).

Conventions: embeddings are L2-normalised inside (normalising twice changes nothing); masks are bool with
True = valid; ``logit_scale`` is the multiplicative scale (exp of the learnable log-scale); reductions are
means over the local rows. Under torch.distributed every loss scores the B local rows against the
G = B x world_size gathered columns (open_clip's ``local_loss``) and, with ``gather_with_grad``, the
gathered columns carry gradient to their owners, so the sum of the per-rank losses has the gradient of
one process on the concatenated batch. The patch-sentence scores go through
:func:`mlip_fast.ops.patch_sentence_scores` (or :func:`mlip_fast.ops.patch_sentence_ot_scores` with
``local_matching="ot"``), whose ``impl`` picks reference / chunked / triton.

One module per loss: ``contrastive`` (global), ``local`` (patch-sentence), ``integrity`` (the estimator's),
``integrity_modes`` (the per-view integrity heads' of the ``maco`` and ``predictor`` modes), ``total``
(MLIP's sum and :class:`LossConfig`); ``_common`` holds what they share.
"""
from mlip_fast.functional.contrastive import global_contrastive_loss
from mlip_fast.functional.integrity import semantic_integrity_loss
from mlip_fast.functional.integrity_modes import integrity_prediction_loss, mask_layout_loss
from mlip_fast.functional.local import LocalMatching, patch_sentence_loss, within_report_loss
from mlip_fast.functional.total import LossConfig, check_loss_weights, mlip_loss

__all__ = ["global_contrastive_loss", "patch_sentence_loss", "within_report_loss", "semantic_integrity_loss",
           "mask_layout_loss", "integrity_prediction_loss", "mlip_loss", "LossConfig", "LocalMatching", "check_loss_weights"]
