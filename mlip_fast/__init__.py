"""mlip_fast: MLIP (medical language-image pre-training with masked local representation learning)
with fused Triton kernels, a reference PyTorch path for every op, and a DeepSpeed training app.

Top-level API (open_clip's names; each is imported on first use, so ``import mlip_fast`` stays light)::

    import mlip_fast
    model, _, preprocess = mlip_fast.create_model_and_transforms("mlip-tiny")   # or "hf-hub:org/name"
    tokenizer = mlip_fast.get_tokenizer("mlip-tiny")
    image_features, text_features, logit_scale = model(preprocess(pil_image)[None], tokenizer(["No effusion."]))
    model, preprocess = mlip_fast.create_model_from_pretrained("local-dir:/path/to/export")

``create_model_and_transforms``, ``create_model``, ``create_model_from_pretrained``, ``get_tokenizer``,
``list_models``, ``list_pretrained``, ``add_model_config``, ``from_pretrained``, ``MLIP`` (``mlip_fast.models``),
``MLIPLoss`` (``mlip_fast.losses``). Submodules: ``losses``, ``functional``, ``ops``, ``models``, ``data``,
``eval``, ``train`` (``deepspeed --module mlip_fast.train`` / ``mlip-train``). ``python -m mlip_fast env``
reports the environment.

Importing the package registers MLIP exports with transformers' ``AutoConfig`` / ``AutoModel``
(:mod:`mlip_fast.models.hf`): at once when transformers' Auto classes are already imported, else right after
they are, so that ``import mlip_fast`` alone imports neither torch nor transformers.
"""
from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings
from typing import TYPE_CHECKING

from mlip_fast._version import __license__, __version__

# name -> the submodule that defines it
_LAZY = {
    "create_model_and_transforms": "mlip_fast.models",
    "create_model": "mlip_fast.models",
    "create_model_from_pretrained": "mlip_fast.models",
    "get_tokenizer": "mlip_fast.models",
    "list_models": "mlip_fast.models",
    "list_pretrained": "mlip_fast.models",
    "add_model_config": "mlip_fast.models",
    "from_pretrained": "mlip_fast.models",
    "MLIP": "mlip_fast.models",
    "MLIPLoss": "mlip_fast.losses",
}

__all__ = ["__version__", "__license__", *_LAZY]

if TYPE_CHECKING:
    from mlip_fast.losses import MLIPLoss
    from mlip_fast.models import (MLIP, add_model_config, create_model, create_model_and_transforms,
                                  create_model_from_pretrained, from_pretrained, get_tokenizer, list_models,
                                  list_pretrained)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'mlip_fast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# transformers' Auto classes ----------------------------------------------------------------------------------
# transformers' Auto module -> the registration to run once it has been executed
_AUTO_HOOKS = {"transformers.models.auto.configuration_auto": "register_config",
               "transformers.models.auto.modeling_auto": "register_model"}


def _register_with_transformers(function: str) -> None:
    try:
        getattr(importlib.import_module("mlip_fast.models.hf"), function)()
    except Exception as e:  # noqa: BLE001 - a failure here must not break the user's transformers import
        warnings.warn(f"mlip_fast could not register its models with transformers' Auto classes ({function}: "
                      f"{type(e).__name__}: {e}); load exports with mlip_fast.from_pretrained", RuntimeWarning)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration of :data:`_AUTO_HOOKS` for a module right after its first import has executed it (a
    post-import hook): the finder finds the module's real spec with the other finders and wraps its loader's
    ``exec_module``. It steps aside once every hooked module is imported."""

    def __init__(self, hooks: dict):
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path=None, target=None):
        function = self.hooks.pop(fullname, None)
        if function is None:
            return None
        if not self.hooks:
            sys.meta_path.remove(self)
        finders = (f for f in sys.meta_path if f is not self and hasattr(f, "find_spec"))
        spec = next((s for s in (f.find_spec(fullname, path, target) for f in finders) if s is not None), None)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _register_with_transformers(function)

        spec.loader.exec_module = exec_then_register
        return spec


def _hook_transformers() -> None:
    pending = {}
    for module, function in _AUTO_HOOKS.items():
        if module in sys.modules:
            _register_with_transformers(function)
        else:
            pending[module] = function
    if pending and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(pending))


_hook_transformers()
