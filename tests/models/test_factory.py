"""Factory and checkpoints: create_model_and_transforms, save/load round trip (bitwise), clear errors for
wrong shapes and for directories that are not MLIP checkpoints, tokenizers, pretrained image weights.
Hub checkpoints (hf-hub: names, revisions, push_to_hub, the model card) are in test_hub.py."""
import json

import numpy as np
import pytest
import torch

from mlip_fast.models import (
    CheckpointError,
    create_model,
    create_model_and_transforms,
    from_pretrained,
    get_tokenizer,
    save_pretrained,
)

from .conftest import make_batch, tiny_overrides

TEXTS = ["Heart size is normal. No focal consolidation.", "Stable 1.5 cm nodule. Dr. XXXX was notified.",
         "Small right pleural effusion."]


def outputs(model, batch, **kw):
    with torch.no_grad():
        return model(batch, **kw)


def test_create_model_and_transforms():
    from mlip_fast.preprocess.transforms import ImageTransform

    model, train_tf, eval_tf = create_model_and_transforms("mlip-tiny")
    assert isinstance(train_tf, ImageTransform) and isinstance(eval_tf, ImageTransform)
    assert train_tf.train and not eval_tf.train
    image = eval_tf(np.random.default_rng(0).random((90, 70), dtype=np.float32))
    assert image.shape == (1, 64, 64)
    with torch.no_grad():
        out = model.eval().encode_image_local(image[None])
    assert out["patches"].shape == (1, 64, 64)


def test_save_load_round_trip_is_bitwise(tmp_path):
    model = create_model("mlip-tiny", **tiny_overrides()).eval()
    torch.nn.init.normal_(model.visual.estimator.fc2.weight)  # non-trivial masking
    model.save_pretrained(tmp_path / "ckpt")
    for name in ("config.json", "model.safetensors", "preprocess_config.json", "text/config.json",
                 "tokenizer/tokenizer.json", "README.md"):
        assert (tmp_path / "ckpt" / name).is_file(), name
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["format"] == "mlip_fast"
    loaded = from_pretrained(tmp_path / "ckpt")
    assert loaded.config == model.config and not loaded.training
    batch = make_batch(model, TEXTS)
    assert torch.equal(loaded.tokenize(TEXTS)["input_ids"], batch["input_ids"])
    for kw in ({}, {"mask_ratio": 0.5, "seed": 7}):
        a, b = outputs(model, batch, **kw), outputs(loaded, batch, **kw)
        for key in a:
            assert torch.equal(a[key], b[key]), (kw, key)
    # the same checkpoint as `pretrained` of the named architecture
    again, _, _ = create_model_and_transforms("mlip-tiny", pretrained=tmp_path / "ckpt", **tiny_overrides())
    assert torch.equal(outputs(again.eval(), batch)["patches"], outputs(model, batch)["patches"])


def test_corpus_tokenizer_travels_with_the_checkpoint(tmp_path):
    corpus = [t + " " + t for t in TEXTS] * 4
    model = create_model("mlip-tiny", corpus=corpus).eval()
    assert model.config.text.vocab_size == len(model.tokenizer) < 4096
    save_pretrained(model, tmp_path)
    loaded = from_pretrained(tmp_path)
    assert loaded.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    assert get_tokenizer(tmp_path).tokenizer.get_vocab() == model.tokenizer.get_vocab()
    batch = make_batch(model, TEXTS)
    assert torch.equal(outputs(model, batch)["sentences"], outputs(loaded, batch)["sentences"])


def test_wrong_shapes_fail_naming_the_keys(tmp_path):
    save_pretrained(create_model("mlip-tiny"), tmp_path)
    with pytest.raises(CheckpointError) as e:
        create_model("mlip-tiny", pretrained=tmp_path, embed_dim=32)
    msg = str(e.value)
    for key in ("image_projection.net.weight", "patch_projection.net.weight", "sentence_projection.net.bias"):
        assert key in msg
    assert "checkpoint (64, 128) vs model (32, 128)" in msg
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision"]["depth"] = 5
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing keys \(12\): \['visual\.blocks\.4\.attn\.proj\.bias'"):
        from_pretrained(tmp_path)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="is not an MLIP checkpoint"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    with pytest.raises(CheckpointError, match="is not an MLIP checkpoint.*config.json"):
        from_pretrained(tmp_path)
    save_pretrained(create_model("mlip-tiny"), tmp_path / "ok")
    (tmp_path / "ok" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['model.safetensors'\]"):
        from_pretrained(tmp_path / "ok")


def test_get_tokenizer_sources():
    tok = get_tokenizer("mlip-tiny")
    assert tok.tokenizer.is_fast and len(tok) == 4096
    with pytest.raises(OSError, match="only local files"):
        get_tokenizer("no-such-org/no-such-model")


def test_get_tokenizer_is_callable_and_truncates_to_the_model_limits(iu_reports):
    """The tokenizer of a model name returns exactly the batch encode_text takes, cut to the config's
    text.max_length tokens and text.max_sentences sentences; a long report is truncated."""
    model = create_model("mlip-tiny", **tiny_overrides()).eval()
    tokenizer = get_tokenizer("mlip-tiny")
    limits = model.config.text
    assert (tokenizer.max_length, tokenizer.max_sentences) == (limits.max_length, limits.max_sentences)
    long_report = " ".join(iu_reports.values()) * 6
    assert len(tokenizer.tokenizer(long_report)["input_ids"]) > 3 * limits.max_length  # untruncated ids
    batch = tokenizer([long_report, "No acute disease."])
    assert batch["input_ids"].shape == (2, limits.max_length)
    assert batch["sentence_mask"].shape[1] <= limits.max_sentences and batch["sentence_mask"][0].all()
    for key, value in model.tokenize([long_report, "No acute disease."]).items():
        assert torch.equal(batch[key], value), key
    with torch.no_grad():
        assert torch.equal(model.encode_text(batch), model.encode_text([long_report, "No acute disease."]))
    assert torch.equal(tokenizer("One line.")["input_ids"], tokenizer(["One line."])["input_ids"])
    assert get_tokenizer("mlip-tiny", max_length=16)([long_report])["input_ids"].shape == (1, 16)
    capped = get_tokenizer("mlip-tiny", max_length=512, max_sentences=2)([long_report])
    assert capped["sentence_mask"].shape == (1, 2) and capped["sentence_mask"].all()


def test_unknown_model_is_a_config_error_listing_the_shipped_ones():
    from mlip_fast.models import ConfigError, list_models

    with pytest.raises(ConfigError, match="unknown model 'nope'; shipped models: " + ", ".join(list_models())):
        create_model("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("missing/config.json")


def test_unavailable_text_model_is_a_clear_error():
    with pytest.raises(OSError, match="allow_download"):
        create_model("mlip-tiny", text_pretrained="no-such-org/no-such-model")


def test_image_pretrained_loads_into_the_vision_tower(tmp_path):
    from safetensors.torch import save_file

    source = create_model("mlip-tiny").visual
    names = {"embeddings.proj.weight": "patch_embed.proj.weight", "embeddings.proj.bias": "patch_embed.proj.bias",
             "embeddings.cls_token": "cls_token", "embeddings.pos_embed": "pos_embed"}
    state = {names.get(k, k): v.contiguous() for k, v in source.state_dict().items() if not k.startswith("estimator.")}
    save_file(state, str(tmp_path / "vit.safetensors"))
    model = create_model("mlip-tiny", image_pretrained=tmp_path / "vit.safetensors")
    assert torch.equal(model.visual.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    with pytest.raises(ValueError, match="already holds both towers"):
        create_model("mlip-tiny", pretrained=tmp_path, image_pretrained=tmp_path / "vit.safetensors")


def test_overrides_are_validated():
    with pytest.raises(ValueError, match="unknown keys"):
        create_model("mlip-tiny", vision={"widht": 3})
    model = create_model("mlip-tiny", mask_ratio=0.75, vision={"attn_backend": "math"})
    assert model.config.mask_ratio == 0.75 and model.visual.blocks[0].attn.backend == "math"
