"""The MLIP module end to end: output contract with MLIPLoss for every shipped config, fp32 and bf16
autocast, gradients to every trainable parameter, masking semantics, tower locks, checkpointing."""
import math

import pytest
import torch

from mlip_fast.losses import MLIPLoss, clamp_logit_scales_
from mlip_fast.models import create_model, get_model_config
from mlip_fast.models.vision import num_kept

from .conftest import make_batch, tiny_overrides

OUTPUT_KEYS = {"image_global", "text_global", "patches", "patch_index", "sentences", "sentence_mask",
               "integrity_logits", "integrity_weights", "logit_scale_global", "logit_scale_local"}


def report_texts(iu_reports, n):
    texts = list(iu_reports.values()) + ["Heart size normal. Lungs clear.", "No acute cardiopulmonary process.",
                                         "Small left pleural effusion. Mild cardiomegaly. No pneumothorax.",
                                         "Stable 1.5 cm nodule in the right upper lobe."]
    return texts[:n]


def check_outputs(out, b, cfg, dtype):
    assert set(out) == OUTPUT_KEYS
    d, k = cfg.embed_dim, num_kept(cfg.vision.num_patches, cfg.mask_ratio)
    s = out["sentence_mask"].shape[1]
    assert out["image_global"].shape == (b, d) and out["text_global"].shape == (b, d)
    assert out["patches"].shape == (b, k, d) and out["patch_index"].shape == (b, k)
    assert out["sentences"].shape == (b, s, d) and out["sentence_mask"].dtype == torch.bool
    assert out["integrity_logits"].shape == (b, k) and out["integrity_weights"].shape == (b,)
    for key in ("image_global", "text_global", "patches", "sentences"):
        assert out[key].dtype == dtype, key
        assert torch.isfinite(out[key]).all(), key
    assert out["patch_index"].dtype == torch.int64 and (out["patch_index"].diff(dim=1) > 0).all()
    assert out["integrity_weights"].dtype == torch.float32 and not out["integrity_weights"].requires_grad
    assert ((out["integrity_weights"] > 0) & (out["integrity_weights"] <= 1 + 1e-6)).all()
    for key in ("logit_scale_global", "logit_scale_local"):
        assert out[key].ndim == 0
        torch.testing.assert_close(out[key].float(), torch.tensor(1 / 0.07))


@pytest.mark.parametrize(
    "name, b, dtype",
    [
        ("mlip-tiny", 8, torch.float32),
        ("mlip-tiny", 8, torch.bfloat16),
        ("mlip-small", 2, torch.float32),
        ("mlip-small", 2, torch.bfloat16),
        ("mlip-vit-b16-bert-base", 1, torch.float32),
    ],
)
def test_forward_contract_for_shipped_configs(name, b, dtype, iu_reports):
    model = create_model(name).train()
    batch = make_batch(model, report_texts(iu_reports, b))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(batch, seed=0)
        check_outputs(out, b, get_model_config(name), dtype)
        total, terms = MLIPLoss()(**out)
    assert torch.isfinite(total) and set(terms) == {"loss_global", "loss_local", "loss_sie", "loss"}


def test_backward_reaches_every_trainable_parameter(iu_reports):
    model = create_model("mlip-tiny", **tiny_overrides()).train()
    # the estimator's zero-initialised output layer would block the gradient to its hidden layer
    torch.nn.init.normal_(model.visual.estimator.fc2.weight, std=0.5)
    batch = make_batch(model, report_texts(iu_reports, 6))
    total, _ = MLIPLoss()(**model(batch, seed=3))
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert no_grad == []


def test_mask_ratio_zero_equals_the_unmasked_model(tiny_model):
    model = tiny_model.eval()
    images = torch.randn(3, 1, 64, 64)
    with torch.no_grad():
        out = model.encode_image_local(images, mask_ratio=0.0)
        full = model.visual.forward_features(images)
        assert torch.equal(out["image_global"], model.image_projection(full[:, 0]))
        assert torch.equal(model.encode_image(images), out["image_global"])
        assert torch.equal(out["patches"], model.patch_projection(full[:, 1:]))
    assert out["integrity_logits_all"].shape == (3, 64)
    assert torch.equal(out["patch_index"], torch.arange(64).expand(3, 64))


def test_masked_encode_image_uses_the_towers_masked_pass(tiny_model):
    model = tiny_model.eval()
    images = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = model.encode_image_local(images, mask_ratio=0.75, seed=9)
        vis = model.visual(images, 0.75, temperature=model.config.mask_temperature, seed=9)
    assert out["patches"].shape == (2, 16, 64)
    assert torch.equal(out["patches"], model.patch_projection(vis.patch_features))
    assert torch.equal(out["patch_index"], vis.patch_index)
    assert torch.equal(out["integrity_logits"], out["integrity_logits_all"].gather(1, out["patch_index"]))


def test_default_mask_ratio_follows_train_and_eval_mode(tiny_model, iu_reports):
    batch = make_batch(tiny_model, report_texts(iu_reports, 2))
    with torch.no_grad():
        assert tiny_model.train()(batch, seed=0)["patches"].shape[1] == 32
        assert tiny_model.eval()(batch)["patches"].shape[1] == 64
        assert tiny_model.eval()(batch, mask_ratio=0.5, seed=0)["patches"].shape[1] == 32


def test_encode_text_from_strings_equals_batch(tiny_model, iu_reports):
    model = tiny_model.eval()
    texts = report_texts(iu_reports, 3)
    with torch.no_grad():
        a = model.encode_text_local(texts)
        b = model.encode_text_local(model.tokenize(texts))
        assert torch.equal(model.encode_text(texts), a["text_global"])
    for key in a:
        assert torch.equal(a[key], b[key])
    assert (a["sentences"][~a["sentence_mask"]] == 0).all()
    with pytest.raises(KeyError, match="sentence_spans"):
        model.encode_text({"input_ids": b["sentence_mask"]})


def test_open_clip_shaped_encoders_return_embeddings(tiny_model, iu_reports):
    """encode_image / encode_text give [B, D] global embeddings; normalize=True is their L2 normalisation
    (checked in fp64 against the unnormalised output); a single string is a batch of one."""
    model = tiny_model.eval()
    images = torch.randn(3, 1, 64, 64)
    texts = report_texts(iu_reports, 2)
    with torch.no_grad():
        img, img_n = model.encode_image(images), model.encode_image(images, normalize=True)
        txt, txt_n = model.encode_text(texts), model.encode_text(texts, normalize=True)
        one = model.encode_text(texts[0], normalize=True)
    assert img.shape == (3, 64) and txt.shape == (2, 64) and one.shape == (1, 64)
    for raw, unit in ((img, img_n), (txt, txt_n)):
        expected = raw.double() / raw.double().pow(2).sum(-1, keepdim=True).sqrt()
        torch.testing.assert_close(unit.double(), expected, atol=1e-6, rtol=1e-6)  # fp32 rounding of a division
    torch.testing.assert_close(one, txt_n[:1], atol=1e-6, rtol=1e-6)  # padding to a longer report changes nothing


def test_logit_scales_clamped_after_the_step_not_in_forward(tiny_model):
    with torch.no_grad():
        tiny_model.logit_scale_global.log_scale.fill_(math.log(1000.0))
    scale = tiny_model.logit_scale_global()
    assert scale.item() == pytest.approx(1000.0, rel=1e-6)
    scale.backward()
    assert tiny_model.logit_scale_global.log_scale.grad.item() == pytest.approx(1000.0, rel=1e-6)
    clamp_logit_scales_(tiny_model)
    assert tiny_model.logit_scale_global().item() == pytest.approx(100.0, rel=1e-6)
    assert tiny_model.logit_scale_local().item() == pytest.approx(1 / 0.07)


def test_lock_towers(iu_reports):
    model = create_model("mlip-tiny", **tiny_overrides(text={"dropout": 0.1}))
    model.lock_image_tower()
    model.lock_text_tower()
    model.train()
    assert not model.text.encoder.training and not model.visual.blocks.training
    assert model.visual.estimator.training and model.image_projection.training
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("visual.", "text.")) and not n.startswith("visual.estimator.") for n in frozen)
    assert any(n.startswith("visual.blocks.") for n in frozen) and any(n.startswith("text.encoder.") for n in frozen)
    torch.nn.init.normal_(model.visual.estimator.fc2.weight, std=0.5)
    total, _ = MLIPLoss()(**model(make_batch(model, report_texts(iu_reports, 3)), seed=1))
    total.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n in frozen)
    assert model.text_projection.net.weight.grad is not None and model.visual.estimator.fc1.weight.grad is not None


def test_grad_checkpointing_same_loss_and_grads(iu_reports):
    model = create_model("mlip-tiny", **tiny_overrides()).train()
    batch = make_batch(model, report_texts(iu_reports, 3))
    results = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        total, _ = MLIPLoss()(**model(batch, seed=4))
        total.backward()
        results.append((total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], atol=1e-6, rtol=1e-4, msg=name)


def test_mlp_projection_and_batch_mismatch(iu_reports):
    model = create_model("mlip-tiny", projection="mlp").eval()
    batch = make_batch(model, report_texts(iu_reports, 2))
    with torch.no_grad():
        assert model(batch)["image_global"].shape == (2, 64)
        batch["images"] = batch["images"][:1]
        with pytest.raises(ValueError, match="1 images but 2 reports"):
            model(batch)


@pytest.mark.parametrize("attention_dropout, expected", [(None, 0.3), (0.0, 0.0), (0.2, 0.2)])
def test_attention_dropout_apart_from_the_hidden_states(iu_reports, monkeypatch, attention_dropout, expected):
    """text.attention_dropout sets the probability every attention call of the report tower gets in training
    (None: the hidden states' dropout, as before the field existed); the hidden-state dropout stays text.dropout,
    and evaluation passes 0 whatever the config."""
    from mlip_fast.models import text

    model = create_model("mlip-tiny", **tiny_overrides(text={"dropout": 0.3, "attention_dropout": attention_dropout}))
    seen = []
    attention = text.self_attention

    def spy(attn, x, layout, dropout_p):  # the report tower's attention calls
        seen.append(dropout_p)
        return attention(attn, x, layout, dropout_p)

    monkeypatch.setattr(text, "self_attention", spy)
    batch = make_batch(model, report_texts(iu_reports, 3))
    model.train()(batch, seed=1)
    layers = model.config.text.num_layers
    assert seen == [pytest.approx(expected)] * layers
    hidden = [m.p for n, m in model.text.encoder.named_modules() if isinstance(m, torch.nn.Dropout)
              and not n.endswith("attention.self.dropout")]
    assert hidden and all(p == pytest.approx(0.3) for p in hidden)
    seen.clear()
    with torch.no_grad():
        model.eval()(batch, seed=1)
    assert seen == [0.0] * layers
