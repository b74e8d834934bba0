"""Pretrained ViT loading: checkpoints written by transformers' ViTModel (hub naming on disk, transformers 5
naming in memory) and timm naming load with zero missing keys and reproduce the source model's outputs;
grid and channel adaptation; errors name the keys."""
import pytest
import torch
import torch.nn.functional as F

from mlip_fast.models import PretrainedWeightsError, VisionConfig, VisionTransformer, load_pretrained_vit
from mlip_fast.models.vit_weights import read_state_dict

CFG = VisionConfig(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, heads=3)


def hf_vit(image_size=40, channels=1):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=192,
                    image_size=image_size, patch_size=8, num_channels=channels, layer_norm_eps=1e-6,
                    hidden_act="gelu", qkv_bias=True)
    model = ViTModel(cfg, add_pooling_layer=True).eval()
    with torch.no_grad():  # non-trivial biases, LayerNorms and CLS so that a wrong mapping shows
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def hf_features(model, images):
    with torch.no_grad():
        return model(pixel_values=images).last_hidden_state


def test_transformers_checkpoint_file_loads_and_matches(tmp_path):
    hf = hf_vit()
    hf.save_pretrained(tmp_path)  # on disk: hub naming (encoder.layer.N.attention.attention.query ...)
    assert any(".attention.attention.query." in k for k in read_state_dict(tmp_path / "model.safetensors"))
    vit = VisionTransformer(CFG).eval()
    report = load_pretrained_vit(vit, tmp_path)
    assert report.naming == "transformers" and report.ignored == ["pooler.dense.bias", "pooler.dense.weight"]
    assert report.adapted == []
    images = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), hf_features(hf, images), atol=1e-5, rtol=1e-4)


def test_transformers_in_memory_naming_and_prefixes(tmp_path):
    hf = hf_vit()
    state = {"vit." + k: v for k, v in hf.state_dict().items()}  # ViTForImageClassification-style prefix
    state["classifier.weight"] = torch.zeros(10, 48)
    assert any(".attention.q_proj." in k for k in state)
    torch.save(state, tmp_path / "vit.bin")
    vit = VisionTransformer(CFG).eval()
    load_pretrained_vit(vit, tmp_path / "vit.bin")
    images = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(images), hf_features(hf, images), atol=1e-5, rtol=1e-4)


TIMM_NAMES = {"embeddings.proj.weight": "patch_embed.proj.weight", "embeddings.proj.bias": "patch_embed.proj.bias",
              "embeddings.cls_token": "cls_token", "embeddings.pos_embed": "pos_embed",
              "embeddings.registers": "reg_token"}


def timm_state(vit):
    state = {TIMM_NAMES.get(k, k): v.clone() for k, v in vit.state_dict().items() if not k.startswith("estimator.")}
    state["head.weight"], state["head.bias"] = torch.zeros(1000, 48), torch.zeros(1000)
    return state


def test_timm_checkpoint_loads_with_no_missing_keys(tmp_path):
    from safetensors.torch import save_file

    source = VisionTransformer(CFG).eval()
    save_file({"module." + k: v.contiguous() for k, v in timm_state(source).items()}, str(tmp_path / "m.safetensors"))
    vit = VisionTransformer(CFG).eval()
    report = load_pretrained_vit(vit, tmp_path / "m.safetensors")
    assert report.naming == "timm" and report.ignored == ["head.bias", "head.weight"]
    for k, v in source.state_dict().items():
        if not k.startswith("estimator."):
            assert torch.equal(vit.state_dict()[k], v), k
    images = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(images), source.forward_features(images))


def test_register_tokens_load_from_reg_token_or_keep_their_init():
    """A tower with register tokens takes timm's ``reg_token`` when the checkpoint has one and otherwise keeps its
    own init (said in the report), every other weight loaded; a checkpoint's registers without a place in the
    model are an error naming the key."""
    with_registers = VisionConfig(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, heads=3, registers=2)
    source = VisionTransformer(with_registers).eval()
    vit = VisionTransformer(with_registers).eval()
    report = load_pretrained_vit(vit, timm_state(source))
    assert report.adapted == []
    assert torch.equal(vit.embeddings.registers, source.embeddings.registers)
    images = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        assert torch.equal(vit.forward_features(images), source.forward_features(images))

    plain = VisionTransformer(CFG).eval()
    vit = VisionTransformer(with_registers).eval()
    init = vit.embeddings.registers.detach().clone()
    report = load_pretrained_vit(vit, timm_state(plain))
    assert report.adapted == ["embeddings.registers: not in the checkpoint, the 2 register tokens keep their init"]
    assert torch.equal(vit.embeddings.registers, init)
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, plain.blocks[1].mlp.fc2.weight)

    with pytest.raises(PretrainedWeightsError, match="embeddings.registers"):
        load_pretrained_vit(VisionTransformer(CFG), timm_state(source))


def test_three_channel_weights_summed_for_grey_input():
    hf = hf_vit(channels=3)
    vit = VisionTransformer(CFG).eval()
    report = load_pretrained_vit(vit, hf.state_dict())
    assert report.adapted == ["embeddings.proj.weight: 3 -> 1 input channels"]
    grey = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(grey), hf_features(hf, grey.expand(-1, 3, -1, -1)),
                                   atol=1e-5, rtol=1e-4)


def test_position_embedding_resampled_to_the_model_grid():
    hf = hf_vit(image_size=24)  # grid 3 -> model grid 5
    vit = VisionTransformer(CFG)
    report = load_pretrained_vit(vit, hf.state_dict())
    assert report.adapted == ["embeddings.pos_embed: grid 3 -> 5"]
    src = hf.state_dict()["embeddings.position_embeddings"]
    got = vit.embeddings.pos_embed.detach()
    assert torch.equal(got[:, 0], src[:, 0])
    grid = src[:, 1:].reshape(1, 3, 3, 48).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(5, 5), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 25, 48)
    torch.testing.assert_close(got[:, 1:], expected)


def test_errors_name_missing_unexpected_and_wrong_shape_keys():
    state = dict(hf_vit().state_dict())
    del state["layernorm.weight"]
    state["layers.0.attention.rotary.weight"] = torch.zeros(3)
    vit = VisionTransformer(CFG)
    with pytest.raises(PretrainedWeightsError) as e:
        load_pretrained_vit(vit, state)
    msg = str(e.value)
    assert "missing keys (1): ['norm.weight']" in msg
    assert "layers.0.attention.rotary.weight" in msg

    wide = VisionTransformer(VisionConfig(image_size=40, patch_size=8, width=64, depth=2, heads=4))
    with pytest.raises(PretrainedWeightsError, match=r"wrong shapes .*blocks\.0\.attn\.qkv\.weight: checkpoint \(144, 48\) vs model \(192, 64\)"):
        load_pretrained_vit(wide, hf_vit().state_dict())

    deep = VisionTransformer(VisionConfig(image_size=40, patch_size=8, width=48, depth=3, heads=3))
    with pytest.raises(PretrainedWeightsError, match=r"blocks\.2\.attn\.qkv\.weight"):
        load_pretrained_vit(deep, hf_vit().state_dict())


def test_unrecognised_checkpoint_and_missing_file(tmp_path):
    with pytest.raises(PretrainedWeightsError, match="unrecognised ViT checkpoint"):
        load_pretrained_vit(VisionTransformer(CFG), {"conv1.weight": torch.zeros(1)})
    with pytest.raises(FileNotFoundError, match="hf-hub:"):
        load_pretrained_vit(VisionTransformer(CFG), tmp_path / "nope.safetensors")
