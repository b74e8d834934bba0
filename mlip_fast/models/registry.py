"""The names a model can be built from, as open_clip's registry: shipped configs, configs added at run time and
pretrained checkpoints.

- :func:`list_models` / :func:`get_model_config`: the configs shipped in ``model_configs/*.json`` plus those
  added by :func:`add_model_config`.
- :func:`add_model_config`: a config JSON file (named by its file stem), a folder of them, or an MLIP checkpoint
  folder (its weights become a pretrained entry of its config name, ``local-dir:<folder>``).
- :func:`list_pretrained`: the (model name, pretrained tag) pairs known to this process. No MLIP weights are
  published yet, so the list holds only the checkpoints added with :func:`add_model_config`; any checkpoint
  loads by its name: a folder, ``local-dir:<folder>`` or ``hf-hub:<org>/<name>``.

The registry starts with the shipped configs only: nothing is added on import.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from mlip_fast.models.config import ConfigError, MLIPConfig
from mlip_fast.models.hub import CHECKPOINT_FORMAT, CONFIG_FILE, HUB_PREFIX, LOCAL_PREFIX, is_checkpoint

__all__ = ["CONFIG_DIR", "list_models", "get_model_config", "add_model_config", "list_pretrained",
           "is_checkpoint_name"]

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
_ADDED_CONFIGS: dict = {}  # name -> config JSON path (add_model_config)
_PRETRAINED: dict = {}  # (model name, tag) -> checkpoint folder (add_model_config on a checkpoint)


def _shipped() -> dict:
    return {p.stem: p for p in CONFIG_DIR.glob("*.json")}


def list_models() -> list[str]:
    """Names of the model configs: shipped (``model_configs/*.json``) and added with :func:`add_model_config`."""
    return sorted({**_shipped(), **_ADDED_CONFIGS})


def get_model_config(name: Union[str, Path, MLIPConfig]) -> MLIPConfig:
    """A config by name (shipped or added), a config JSON file by path, or an :class:`MLIPConfig` (copied).

    Raises:
        ConfigError: an unknown name (the message lists the known ones) or an invalid config file.
    """
    if isinstance(name, MLIPConfig):
        return MLIPConfig.from_dict(name.to_dict())
    path = {**_shipped(), **_ADDED_CONFIGS}.get(str(name))
    if path is not None:
        return MLIPConfig.from_json(path)
    if str(name).endswith(".json"):
        if not Path(name).is_file():
            raise ConfigError(f"model config file {str(name)!r} does not exist")
        return MLIPConfig.from_json(name)
    raise ConfigError(f"unknown model {str(name)!r}; shipped models: {', '.join(list_models())} (or a config .json path, "
                      f"an MLIP checkpoint folder, local-dir:<folder> or hf-hub:<org>/<name>)")


def add_model_config(path: Union[str, Path]) -> list[str]:
    """Adds model configs to :func:`list_models` (as open_clip's ``add_model_config``): a config JSON file (named
    by its stem), a folder of them, or an MLIP checkpoint folder, whose weights are then listed by
    :func:`list_pretrained` under its config's name with the tag ``local-dir:<folder>``. Every config is read and
    checked now. Returns the names added.

    Raises:
        ConfigError: the path does not exist, holds no config, or a config is invalid.
    """
    path = Path(path).expanduser().resolve()
    if path.is_dir() and is_checkpoint(path):
        data = json.loads((path / CONFIG_FILE).read_text())
        name = str(data.get("name", path.name))
        _PRETRAINED[(name, f"{LOCAL_PREFIX}{path}")] = path
        return [name]
    files = sorted(path.glob("*.json")) if path.is_dir() else [path] if path.suffix == ".json" else []
    if not path.exists() or not files:
        raise ConfigError(f"add_model_config: {path} is neither a config .json file, a folder of them, nor an MLIP "
                          f"checkpoint folder (config.json with \"format\": \"{CHECKPOINT_FORMAT}\")")
    for file in files:
        MLIPConfig.from_json(file)  # a broken config fails here, naming its file, not at first use
        _ADDED_CONFIGS[file.stem] = file
    return [file.stem for file in files]


def list_pretrained(as_str: bool = False) -> list:
    """The (model name, pretrained tag) pairs of the checkpoints added with :func:`add_model_config` (``"name:tag"``
    strings with ``as_str``). Empty until one is added: no MLIP weights are published; pass any checkpoint
    folder, ``local-dir:<folder>`` or ``hf-hub:<org>/<name>`` as ``pretrained`` (or as the model name)."""
    pairs = sorted(_PRETRAINED)
    return [f"{name}:{tag}" for name, tag in pairs] if as_str else pairs


def is_checkpoint_name(name) -> bool:
    """``name`` names an MLIP checkpoint: ``hf-hub:org/name``, ``local-dir:<folder>``, or a checkpoint folder (a
    config name wins over a folder of the same name in the working directory)."""
    if isinstance(name, MLIPConfig):
        return False
    text = str(name)
    return text.startswith((HUB_PREFIX, LOCAL_PREFIX)) or (text not in list_models() and is_checkpoint(text))
