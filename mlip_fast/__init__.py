"""mlip_fast: MLIP (medical language-image pre-training with masked local representation learning)
with fused Triton kernels, a reference PyTorch path for every op, and a DeepSpeed training app.

Top-level API (open_clip's names; each is imported on first use, so ``import mlip_fast`` stays light)::

    import mlip_fast
    model, _, preprocess = mlip_fast.create_model_and_transforms("mlip-tiny")   # or "hf-hub:org/name"
    tokenizer = mlip_fast.get_tokenizer("mlip-tiny")
    image = model.encode_image(preprocess(pil_image)[None], normalize=True)   # [1, D]
    text = model.encode_text(tokenizer(["No pleural effusion."]), normalize=True)

``create_model_and_transforms``, ``create_model``, ``get_tokenizer``, ``list_models``, ``from_pretrained``,
``MLIP`` (``mlip_fast.models``), ``MLIPLoss`` (``mlip_fast.losses``). Submodules: ``losses``, ``functional``,
``ops``, ``models``, ``data``, ``eval``, ``train`` (``deepspeed --module mlip_fast.train`` / ``mlip-train``).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the submodule that defines it
_LAZY = {
    "create_model_and_transforms": "mlip_fast.models",
    "create_model": "mlip_fast.models",
    "get_tokenizer": "mlip_fast.models",
    "list_models": "mlip_fast.models",
    "from_pretrained": "mlip_fast.models",
    "MLIP": "mlip_fast.models",
    "MLIPLoss": "mlip_fast.losses",
}

__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from mlip_fast.losses import MLIPLoss
    from mlip_fast.models import MLIP, create_model, create_model_and_transforms, from_pretrained, get_tokenizer, list_models


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mlip_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
