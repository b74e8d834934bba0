"""Configs: JSON round trip, unknown keys and invalid values rejected, shipped configs valid."""
import json

import pytest

from mlip_fast.models import ConfigError, MLIPConfig, VisionConfig, get_model_config, list_models


def test_shipped_configs_listed_and_valid():
    assert list_models() == ["mlip-small", "mlip-tiny", "mlip-vit-b16-bert-base"]
    for name in list_models():
        cfg = get_model_config(name)
        assert cfg.name == name
        assert MLIPConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_json_file_round_trip(tmp_path):
    cfg = get_model_config("mlip-tiny").replace(mask_ratio=0.75, vision={"attn_backend": "math"},
                                                local_matching="ot", ot_eps=0.1, ot_iters=20)
    path = tmp_path / "c.json"
    cfg.to_json(path)
    loaded = MLIPConfig.from_json(path)
    assert loaded == cfg
    assert loaded.vision.attn_backend == "math" and loaded.vision.width == 128 and loaded.mask_ratio == 0.75
    assert (loaded.local_matching, loaded.ot_eps, loaded.ot_iters) == ("ot", 0.1, 20)
    assert get_model_config("mlip-tiny").local_matching == "max"  # the method's matching is the default
    assert get_model_config(str(path)) == cfg


@pytest.mark.parametrize(
    "data, words",
    [
        ({"embed_dimm": 3}, ["unknown keys", "embed_dimm"]),
        ({"vision": {"widht": 3}}, ["vision", "widht"]),
        ({"text": {"layers": 3}}, ["text", "layers"]),
        ({"mask_ratio": 1.0}, ["mask_ratio"]),
        ({"projection": "conv"}, ["projection"]),
        ({"vision": {"image_size": 100, "patch_size": 16}}, ["multiple of"]),
        ({"vision": {"width": 100, "heads": 3}}, ["divisible"]),
        ({"vision": {"attn_backend": "cudnn"}}, ["attn_backend"]),
        ({"text": {"source": "web"}}, ["text.source"]),
        ({"text": {"max_length": 600}}, ["max_length"]),
        ({"local_matching": "sinkhorn"}, ["local_matching", "'max', 'ot'"]),
        ({"local_matching": "ot", "ot_eps": 0}, ["ot_eps"]),
        ({"local_matching": "ot", "ot_iters": 0}, ["ot_iters"]),
    ],
)
def test_invalid_configs_rejected(data, words):
    with pytest.raises(ConfigError) as e:
        MLIPConfig.from_dict(data)
    for w in words:
        assert w in str(e.value)


def test_unknown_model_name_lists_shipped():
    with pytest.raises(ValueError, match="mlip-tiny"):
        get_model_config("mlip-huge")


def test_vision_geometry():
    v = VisionConfig(image_size=64, patch_size=8)
    assert (v.grid_size, v.num_patches) == (8, 64)


def test_hf_source_defaults_to_bio_clinicalbert():
    assert MLIPConfig.from_dict({"text": {"source": "hf"}}).text.name == "emilyalsentzer/Bio_ClinicalBERT"
