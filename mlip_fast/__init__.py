"""mlip_fast: MLIP (medical language-image pre-training with masked local representation learning)
with fused Triton kernels, a reference PyTorch path for every op, and a DeepSpeed training app.

Public API (import lazily from the submodules; nothing heavy happens at import time):
- ``mlip_fast.losses``: ``MLIPLoss``, ``GlobalContrastiveLoss``, ``PatchSentenceLoss``, ``SemanticIntegrityLoss``
- ``mlip_fast.functional``: the functional twins of the losses
- ``mlip_fast.ops``: ``patch_sentence_scores``, ``integrity_mask``
- ``mlip_fast.models``: ``create_model_and_transforms``, ``list_models``, ``get_tokenizer``, ``MLIP``
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
