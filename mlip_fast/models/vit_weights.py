"""Loading ImageNet-pretrained ViT weights into :class:`~mlip_fast.models.vision.VisionTransformer`.

Accepted checkpoints (a ``.safetensors``, ``.bin``, ``.pt`` or ``.pth`` file, or a directory holding
``model.safetensors`` / ``pytorch_model.bin``):

- transformers ``ViTModel`` / ``ViTForImageClassification``, in the hub files' naming
  (``embeddings.patch_embeddings.projection.weight``, ``encoder.layer.N.attention.attention.query.weight``,
  ``encoder.layer.N.intermediate.dense.weight`` ...) or transformers 5's in-memory naming
  (``layers.N.attention.q_proj.weight``, ``layers.N.mlp.fc1.weight`` ...). Separate q/k/v projections are
  concatenated into the fused ``qkv`` projection (rows ordered q, k, v).
- timm ``VisionTransformer`` (``patch_embed.proj.weight``, ``blocks.N.attn.qkv.weight`` ...).

Adaptations: the position embedding is resampled bicubically when the checkpoint's patch grid differs
from the model's; the patch embedding is adapted from 3 input channels to 1 by summing over channels
(a grey image replicated to RGB gives the same response) and from 1 to 3 by spreading the weights over
the channels. Classifier / pooler heads are ignored. Anything else that does not fit raises
:class:`PretrainedWeightsError` listing the missing, unexpected and wrong-shape keys.

Nothing here touches the network unless the source is written ``hf-hub:<repo id>`` explicitly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file

from mlip_fast.models._state import state_mismatch

__all__ = ["load_pretrained_vit", "convert_vit_state_dict", "read_state_dict", "resize_pos_embed", "PretrainedWeightsError",
           "LoadReport"]

HUB_PREFIX = "hf-hub:"
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")
_KEY_PREFIXES = ("module.", "vit.", "model.", "backbone.", "encoder_q.")
_IGNORED_PREFIXES = ("pooler.", "classifier.", "head.", "head_drop.")
# The estimator is MLIP's own head; an ImageNet ViT never has it.
_NOT_IN_CHECKPOINTS = ("estimator.",)
# register tokens: loaded when the checkpoint has them (timm's ``reg_token``), else kept at their init
_REGISTERS = "embeddings.registers"


class PretrainedWeightsError(ValueError):
    """A pretrained checkpoint does not fit the model (message lists the keys)."""


@dataclass
class LoadReport:
    """What :func:`load_pretrained_vit` did: the naming detected, keys ignored and adaptations applied."""

    source: str
    naming: str
    loaded: int
    ignored: list = field(default_factory=list)
    adapted: list = field(default_factory=list)


def read_state_dict(source: Union[str, Path]) -> dict:
    """Reads a checkpoint file (or a directory holding one) into a flat {name: tensor} dict on CPU.

    ``hf-hub:<repo id>`` downloads ``model.safetensors`` (else ``pytorch_model.bin``) from the Hugging
    Face hub; any other string must be a local path.
    """
    source = str(source)
    if source.startswith(HUB_PREFIX):
        path = _download(source[len(HUB_PREFIX):])
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"pretrained ViT checkpoint {source!r} does not exist; pass a local .safetensors/.bin/.pth file "
                f"or directory, or '{HUB_PREFIX}<repo id>' to download from the Hugging Face hub"
            )
        if path.is_dir():
            candidates = [path / n for n in ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")]
            found = [c for c in candidates if c.exists()]
            if not found:
                raise FileNotFoundError(f"{path} holds none of {[c.name for c in candidates]}")
            path = found[0]
    if path.suffix == ".safetensors":
        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedWeightsError(f"{path} does not hold a state dict of tensors")
    return state


def _download(repo_id: str) -> Path:
    errors = []
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(repo_id, filename))
        except Exception as e:  # noqa: BLE001 - the next file name may exist; all reasons are reported
            errors.append(f"{filename}: {e}")
    raise FileNotFoundError(f"could not download ViT weights from hub repo {repo_id!r}: " + "; ".join(errors))


def _strip_prefixes(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in _KEY_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        out[key] = value
    return out


# (pattern, target) pairs; "{i}" in a target is the block number, "{p}" the parameter (weight / bias)
_HF_LEGACY = [
    (r"encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)", "blocks.{i}.norm1.{p}"),
    (r"encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)", "blocks.{i}.norm2.{p}"),
    (r"encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)", "blocks.{i}.attn.proj.{p}"),
    (r"encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)", "blocks.{i}.mlp.fc1.{p}"),
    (r"encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)", "blocks.{i}.mlp.fc2.{p}"),
]
_HF_LEGACY_QKV = r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)"
_HF_V5 = [
    (r"layers\.(\d+)\.layernorm_before\.(weight|bias)", "blocks.{i}.norm1.{p}"),
    (r"layers\.(\d+)\.layernorm_after\.(weight|bias)", "blocks.{i}.norm2.{p}"),
    (r"layers\.(\d+)\.attention\.o_proj\.(weight|bias)", "blocks.{i}.attn.proj.{p}"),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", "blocks.{i}.mlp.fc1.{p}"),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", "blocks.{i}.mlp.fc2.{p}"),
]
_HF_V5_QKV = r"layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)"
_HF_FIXED = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.pos_embed",
    "embeddings.patch_embeddings.projection.weight": "embeddings.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
_TIMM_FIXED = {
    "cls_token": "embeddings.cls_token",
    "reg_token": _REGISTERS,
    "pos_embed": "embeddings.pos_embed",
    "patch_embed.proj.weight": "embeddings.proj.weight",
    "patch_embed.proj.bias": "embeddings.proj.bias",
}
_QKV_ORDER = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}


def _detect_naming(state: dict) -> str:
    keys = set(state)
    if "embeddings.patch_embeddings.projection.weight" in keys:
        return "transformers"
    if "patch_embed.proj.weight" in keys:
        return "timm"
    sample = sorted(keys)[:8]
    raise PretrainedWeightsError(
        "unrecognised ViT checkpoint: expected transformers ViTModel keys "
        "('embeddings.patch_embeddings.projection.weight', ...) or timm keys ('patch_embed.proj.weight', ...); "
        f"found {len(keys)} keys such as {sample}"
    )


def _convert_transformers(state: dict) -> tuple[dict, list, list]:
    out, ignored, unknown = {}, [], []
    qkv: dict = {}  # (block, param) -> {slot: tensor}
    for key, value in state.items():
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
            continue
        m = re.fullmatch(_HF_LEGACY_QKV, key) or re.fullmatch(_HF_V5_QKV, key)
        if m:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[_QKV_ORDER[m.group(2)]] = value
            continue
        for pattern, target in _HF_LEGACY + _HF_V5:
            m = re.fullmatch(pattern, key)
            if m:
                out[target.format(i=m.group(1), p=m.group(2))] = value
                break
        else:
            (ignored if key.startswith(_IGNORED_PREFIXES) else unknown).append(key)
    for (block, param), parts in sorted(qkv.items()):
        if len(parts) != 3:
            names = ["query", "key", "value"]
            missing = [names[i] for i in range(3) if i not in parts]
            unknown.append(f"block {block} {param}: missing {missing} to build attn.qkv")
            continue
        out[f"blocks.{block}.attn.qkv.{param}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    return out, ignored, unknown


def _convert_timm(state: dict) -> tuple[dict, list, list]:
    out, ignored, unknown = {}, [], []
    for key, value in state.items():
        if key in _TIMM_FIXED:
            out[_TIMM_FIXED[key]] = value
        elif key.startswith("blocks.") or key.startswith("norm."):
            out[key] = value
        elif key.startswith(_IGNORED_PREFIXES):
            ignored.append(key)
        else:
            unknown.append(key)
    return out, ignored, unknown


def resize_pos_embed(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, 1 + g'^2, C] -> [1, 1 + grid^2, C]: bicubic resampling of the patch part, CLS kept."""
    cls, patches = pos[:, :1], pos[:, 1:]
    old = int(round(patches.shape[1] ** 0.5))
    if old * old != patches.shape[1]:
        raise PretrainedWeightsError(
            f"embeddings.pos_embed: checkpoint has {patches.shape[1]} patch positions, not a square grid"
        )
    c = patches.shape[-1]
    img = patches.float().reshape(1, old, old, c).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=(grid, grid), mode="bicubic", align_corners=False, antialias=grid < old)
    return torch.cat([cls.float(), img.permute(0, 2, 3, 1).reshape(1, grid * grid, c)], dim=1).to(pos.dtype)


def convert_vit_state_dict(state: dict, model) -> tuple[dict, LoadReport]:
    """Maps a transformers or timm ViT state dict onto ``model``'s names and shapes.

    Returns ``(converted, report)``; raises :class:`PretrainedWeightsError` naming every missing,
    unexpected or wrong-shape key (estimator keys are MLIP's own and never expected).
    """
    state = _strip_prefixes(state)
    naming = _detect_naming(state)
    converted, ignored, unknown = (_convert_transformers if naming == "transformers" else _convert_timm)(state)
    report = LoadReport(source="", naming=naming, loaded=0, ignored=sorted(ignored))

    target = {k: v for k, v in model.state_dict().items() if not k.startswith(_NOT_IN_CHECKPOINTS)}
    if _REGISTERS in target and _REGISTERS not in converted:
        report.adapted.append(f"{_REGISTERS}: not in the checkpoint, the {target[_REGISTERS].shape[1]} register "
                              "tokens keep their init")
        del target[_REGISTERS]
    pos = converted.get("embeddings.pos_embed")
    want = target["embeddings.pos_embed"]
    if pos is not None and pos.ndim == 3 and pos.shape[1] != want.shape[1] and pos.shape[2] == want.shape[2]:
        converted["embeddings.pos_embed"] = resize_pos_embed(pos, model.grid_size)
        report.adapted.append(f"embeddings.pos_embed: grid {int(round((pos.shape[1] - 1) ** 0.5))} -> {model.grid_size}")
    proj = converted.get("embeddings.proj.weight")
    want = target["embeddings.proj.weight"]
    if proj is not None and proj.ndim == 4 and proj.shape[1] != want.shape[1] and proj.shape[0] == want.shape[0]:
        if want.shape[1] == 1:
            converted["embeddings.proj.weight"] = proj.sum(dim=1, keepdim=True)
        elif proj.shape[1] == 1:
            converted["embeddings.proj.weight"] = proj.repeat(1, want.shape[1], 1, 1) / want.shape[1]
        else:
            raise PretrainedWeightsError(
                f"embeddings.proj.weight: cannot adapt {proj.shape[1]} input channels to {want.shape[1]} "
                "(supported: 3 -> 1 by summing, 1 -> N by spreading)"
            )
        report.adapted.append(f"embeddings.proj.weight: {proj.shape[1]} -> {want.shape[1]} input channels")

    problem = state_mismatch(f"pretrained ViT weights ({naming} naming) do not fit the model:", converted, target, unknown)
    if problem:
        raise PretrainedWeightsError(problem)
    report.loaded = len(converted)
    return converted, report


def load_pretrained_vit(model, source: Union[str, Path, dict]) -> LoadReport:
    """Loads a transformers / timm ViT checkpoint (path, ``hf-hub:<repo id>`` or a state dict) into
    ``model`` (a :class:`~mlip_fast.models.vision.VisionTransformer`); the estimator keeps its init."""
    state = source if isinstance(source, dict) else read_state_dict(source)
    converted, report = convert_vit_state_dict(state, model)
    with torch.no_grad():
        result = model.load_state_dict(converted, strict=False)
    leftover = [k for k in result.missing_keys if not k.startswith(_NOT_IN_CHECKPOINTS) and k != _REGISTERS]
    if leftover or result.unexpected_keys:
        raise PretrainedWeightsError(f"missing keys {leftover}, unexpected keys {result.unexpected_keys}")
    report.source = "<state dict>" if isinstance(source, dict) else str(source)
    return report
