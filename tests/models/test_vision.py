"""Masked ViT tower: masked encoding vs a functional ViT run by hand on the gathered tokens, mask ratio 0
vs the unmasked model, register tokens, determinism, checkpointing, dtypes."""
import math

import pytest
import torch
import torch.nn.functional as F

from mlip_fast.models import VisionConfig, VisionTransformer
from mlip_fast.models.vision import num_kept
from mlip_fast.ops.integrity_mask import integrity_mask

CFG = VisionConfig(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, heads=3)  # P = 25, odd


def make_vit(cfg=CFG):
    vit = VisionTransformer(cfg, sie_hidden=16)
    # the estimator's output layer starts at zero (all logits equal); give it weights so the logits and
    # the integrity-scored sampling are not trivial
    torch.nn.init.normal_(vit.estimator.fc2.weight, std=1.0)
    return vit.eval()


def reference_vit(vit, images, index=None):
    """The ViT computed with functional ops from the state dict: unfold patch embedding, explicit
    attention; ``index`` [B, K] gathers the patch tokens before the blocks. Returns ([B, 1 + K, C],
    integrity logits [B, P])."""
    cfg, sd = vit.config, vit.state_dict()
    c, h = cfg.width, cfg.heads
    patches = F.unfold(images, cfg.patch_size, stride=cfg.patch_size).transpose(1, 2)
    pos = sd["embeddings.pos_embed"][0]
    tokens = patches @ sd["embeddings.proj.weight"].flatten(1).T + sd["embeddings.proj.bias"] + pos[1:]
    logits = vit.estimator(tokens)
    if index is not None:
        tokens = torch.gather(tokens, 1, index[..., None].expand(-1, -1, c))
    cls = (sd["embeddings.cls_token"][0, 0] + pos[0]).expand(tokens.shape[0], 1, c)
    registers = sd.get("embeddings.registers", torch.zeros(1, 0, c)).expand(tokens.shape[0], -1, -1)
    x = torch.cat([cls, registers, tokens], dim=1)
    for i in range(cfg.depth):
        p = f"blocks.{i}."
        y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], cfg.layer_norm_eps)
        q, k, v = (y @ sd[p + "attn.qkv.weight"].T + sd[p + "attn.qkv.bias"]).split(c, dim=-1)
        q, k, v = (t.reshape(*t.shape[:2], h, c // h).transpose(1, 2) for t in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // h), dim=-1) @ v
        x = x + a.transpose(1, 2).reshape(x.shape) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]
        y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], cfg.layer_norm_eps)
        y = F.gelu(y @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + y @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = torch.cat([x[:, :1], x[:, 1 + registers.shape[1]:]], dim=1)  # the registers are not outputs
    return F.layer_norm(x, (c,), sd["norm.weight"], sd["norm.bias"], cfg.layer_norm_eps), logits


@pytest.mark.parametrize("mask_ratio", [0.5, 0.75, 0.97])
def test_masked_encoding_equals_blocks_on_gathered_tokens(mask_ratio):
    vit = make_vit()
    images = torch.randn(3, 1, 40, 40)
    out = vit(images, mask_ratio, seed=11)
    k = num_kept(25, mask_ratio)
    assert out.patch_features.shape == (3, k, 48) and out.patch_index.shape == (3, k)
    assert (out.patch_index.diff(dim=1) > 0).all()
    expected, logits = reference_vit(vit, images, out.patch_index)
    torch.testing.assert_close(out.global_features, expected[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.patch_features, expected[:, 1:], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.integrity_logits_all, logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.integrity_logits, logits.gather(1, out.patch_index))
    # the kept set is the op's own choice for the same scores and seed
    op = integrity_mask(torch.zeros(3, 25, 1), logits, k, seed=11)
    assert torch.equal(op.index, out.patch_index)
    torch.testing.assert_close(out.integrity_weights, torch.softmax(logits, -1).gather(1, out.patch_index).sum(-1))
    assert not out.integrity_weights.requires_grad


def test_mask_ratio_zero_equals_unmasked_model():
    vit = make_vit()
    images = torch.randn(2, 1, 40, 40)
    out = vit(images, 0.0)
    full = vit.forward_features(images)
    assert full.shape == (2, 26, 48)
    assert torch.equal(out.global_features, full[:, 0])
    assert torch.equal(out.patch_features, full[:, 1:])
    assert torch.equal(out.patch_index, torch.arange(25).expand(2, 25))
    assert torch.equal(out.integrity_logits, out.integrity_logits_all)
    assert torch.equal(out.integrity_weights, torch.ones(2))
    expected, _ = reference_vit(vit, images)
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.6])
def test_register_tokens_join_the_blocks_and_leave_the_outputs(mask_ratio):
    """With R registers the blocks see CLS, the R registers and the kept patches (the hand-run ViT); the outputs
    are CLS and the patches alone, in the same shapes as without registers, and the registers are trained."""
    cfg = VisionConfig(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, heads=3, registers=3)
    vit = make_vit(cfg)
    assert vit.embeddings.registers.shape == (1, 3, 48) and vit.embeddings.registers.abs().sum() > 0
    images = torch.randn(2, 1, 40, 40)
    out = vit(images, mask_ratio, seed=5)
    k = num_kept(25, mask_ratio)
    expected, _ = reference_vit(vit, images, None if mask_ratio == 0 else out.patch_index)
    assert out.patch_features.shape == (2, k, 48) and expected.shape == (2, 1 + k, 48)
    torch.testing.assert_close(out.global_features, expected[:, 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.patch_features, expected[:, 1:], atol=1e-5, rtol=1e-4)
    full = vit.forward_features(images)
    assert full.shape == (2, 26, 48)
    torch.testing.assert_close(full, reference_vit(vit, images)[0], atol=1e-5, rtol=1e-4)
    # the registers change the patches (they take part in attention) and get a gradient
    without = VisionTransformer(VisionConfig(image_size=40, patch_size=8, in_chans=1, width=48, depth=2, heads=3),
                                sie_hidden=16)
    without.load_state_dict({k: v for k, v in vit.state_dict().items() if k != "embeddings.registers"})
    assert not torch.allclose(without.eval().forward_features(images), full)
    out.patch_features.sum().backward()
    assert vit.embeddings.registers.grad is not None and vit.embeddings.registers.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_register_count_is_a_config_error(bad):
    with pytest.raises(ValueError, match="vision.registers"):
        VisionConfig(image_size=40, patch_size=8, registers=bad)


def test_seeded_masks_are_deterministic():
    vit = make_vit()
    images = torch.randn(4, 1, 40, 40)
    a, b, c = vit(images, 0.6, seed=1), vit(images, 0.6, seed=1), vit(images, 0.6, seed=2)
    assert torch.equal(a.patch_index, b.patch_index) and torch.equal(a.patch_features, b.patch_features)
    assert not torch.equal(a.patch_index, c.patch_index)


def test_grad_checkpointing_gives_same_outputs_and_grads():
    vit = make_vit().train()
    images = torch.randn(2, 1, 40, 40)
    grads = []
    for enable in (False, True):
        vit.set_grad_checkpointing(enable)
        vit.zero_grad()
        out = vit(images, 0.5, seed=5)
        (out.patch_features.square().mean() + out.global_features.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in vit.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_and_three_channels():
    cfg = VisionConfig(image_size=32, patch_size=16, in_chans=3, width=32, depth=1, heads=2)
    vit = make_vit(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vit(torch.randn(2, 3, 32, 32), 0.5, seed=0)
    # autocast runs LayerNorm in fp32, so the final-norm states come out fp32; the blocks ran in bf16
    assert out.patch_features.shape == (2, 2, 32) and torch.isfinite(out.patch_features).all()
    assert out.integrity_logits.dtype == torch.bfloat16
    assert out.integrity_weights.dtype == torch.float32
    assert vit.grid_size == 2 and vit.width == 32 and vit.num_patches == 4


def test_num_kept():
    assert num_kept(196, 0.5) == 98
    assert num_kept(196, 0.75) == 49
    assert num_kept(25, 0.5) == 13  # 12.5 rounds up
    assert num_kept(10, 0.99) == 1
    assert num_kept(7, 0.0) == 7
    with pytest.raises(ValueError, match="mask_ratio"):
        num_kept(10, 1.0)


def test_wrong_image_shape_is_a_clear_error():
    vit = make_vit()
    with pytest.raises(ValueError, match=r"\[B, 1, 40, 40\]"):
        vit(torch.randn(2, 2, 40, 40))  # 3 channels are reduced to grey (tests/test_quickstart.py)
    with pytest.raises(ValueError, match="got"):
        vit.forward_features(torch.randn(2, 1, 32, 32))
