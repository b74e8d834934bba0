"""MLIP models: the masked ViT image tower, the BERT report tower, the MLIP module and its factory.

Public API::

    from mlip_fast.models import create_model_and_transforms, list_models, get_tokenizer
    model, train_tf, eval_tf = create_model_and_transforms("mlip-tiny")
    loss, terms = MLIPLoss()(**model(batch))
"""
from mlip_fast.models.attention import selected_backend
from mlip_fast.models.config import ConfigError, MLIPConfig, TextConfig, VisionConfig
from mlip_fast.models.factory import (
    CheckpointError,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    list_models,
    save_pretrained,
)
from mlip_fast.models.mlip import MLIP
from mlip_fast.models.tokenization import tokenize_reports
from mlip_fast.models.vision import VisionTransformer
from mlip_fast.models.vit_weights import PretrainedWeightsError, load_pretrained_vit

__all__ = [
    "MLIP",
    "MLIPConfig",
    "VisionConfig",
    "TextConfig",
    "ConfigError",
    "VisionTransformer",
    "list_models",
    "get_model_config",
    "create_model",
    "create_model_and_transforms",
    "get_tokenizer",
    "save_pretrained",
    "from_pretrained",
    "tokenize_reports",
    "load_pretrained_vit",
    "selected_backend",
    "CheckpointError",
    "PretrainedWeightsError",
]
