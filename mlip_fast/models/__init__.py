"""MLIP models: the masked ViT image tower, the BERT report tower, the MLIP module and its factory.

Public API::

    from mlip_fast.models import create_model_and_transforms, list_models, get_tokenizer
    model, train_tf, eval_tf = create_model_and_transforms("mlip-tiny")   # precision=, force_image_size=
    tokenizer = get_tokenizer("mlip-tiny")
    image = model.encode_image(eval_tf(pil_image)[None], normalize=True)      # [1, D]
    text = model.encode_text(tokenizer(reports), normalize=True)              # [B, D]
    loss, terms = MLIPLoss()(**model(batch))
    image_features, text_features, logit_scale = model(images, tokenizer(reports))   # open_clip's call
    model, preprocess = create_model_from_pretrained("local-dir:/path/to/export")  # or hf-hub:org/name

Transformers' ``AutoConfig`` / ``AutoModel`` load an export after ``import mlip_fast``
(:mod:`mlip_fast.models.hf`).
"""
from mlip_fast.models.attention import selected_backend
from mlip_fast.models.config import ConfigError, MLIPConfig, TextConfig, VisionConfig
from mlip_fast.models.factory import (
    CheckpointError,
    add_model_config,
    create_model,
    create_model_and_transforms,
    create_model_from_pretrained,
    from_pretrained,
    get_model_config,
    get_tokenizer,
    list_models,
    list_pretrained,
    save_pretrained,
)
from mlip_fast.models.mlip import MLIP
from mlip_fast.models.model_card import render_model_card, write_model_card
from mlip_fast.preprocess.tokenization import ReportTokenizer, tokenize_reports
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
    "list_pretrained",
    "add_model_config",
    "get_model_config",
    "create_model",
    "create_model_and_transforms",
    "create_model_from_pretrained",
    "get_tokenizer",
    "save_pretrained",
    "from_pretrained",
    "tokenize_reports",
    "ReportTokenizer",
    "render_model_card",
    "write_model_card",
    "load_pretrained_vit",
    "selected_backend",
    "CheckpointError",
    "PretrainedWeightsError",
]
