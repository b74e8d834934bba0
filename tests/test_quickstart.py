"""The README's Python quick start, run as a new user would: its code blocks (marked ``<!-- quickstart -->``)
are executed as written, in a folder holding a real chest X-ray as ``chest_xray.jpg``, then checked: the PIL
image becomes the model's input, the embeddings are unit vectors, the zero-shot probabilities are the softmax
of the scaled cosine similarities (recomputed in fp64), and the model saved, pushed (to a local folder laid
out as the Hub cache, offline) and loaded back at a revision gives identical outputs. Then the other open_clip
and Hugging Face calls a newcomer tries: ``precision=``, ``force_image_size=``, ``model.logit_scale``, 3-channel
input, token ids, ``create_model_from_pretrained`` with ``local-dir:``, ``list_pretrained`` /
``add_model_config``, and transformers' ``AutoConfig`` / ``AutoModel`` after ``import mlip_fast``."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hub_cache import offline_cache, record_pushes
from tests.paths import COVID_CXR

REPO = Path(__file__).resolve().parents[1]
MARKER = "<!-- quickstart: run by tests/test_quickstart.py -->"


def quickstart_blocks() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2, "README.md should hold the two marked quick-start blocks"
    return blocks


def real_rgb_jpeg():
    for path in sorted((COVID_CXR / "images").glob("*.jp*g")):
        with Image.open(path) as img:
            if img.format == "JPEG" and img.mode == "RGB":
                return path
    pytest.skip(f"no real RGB JPEG chest X-ray under {COVID_CXR}")


def test_readme_quickstart_runs_as_written(tmp_path, monkeypatch, capsys):
    first, second = quickstart_blocks()
    shutil.copy(real_rgb_jpeg(), tmp_path / "chest_xray.jpg")
    monkeypatch.chdir(tmp_path)
    cache = offline_cache(monkeypatch, tmp_path / "hf-cache")
    calls = record_pushes(monkeypatch, cache)

    ns: dict = {}
    exec(compile(first, "README.md (quick start)", "exec"), ns)
    model, image, text = ns["model"], ns["image"], ns["text"]
    assert image.shape == (1, 1, 64, 64) and image.dtype == torch.float32
    image_features, text_features, probs = ns["image_features"], ns["text_features"], ns["probs"]
    assert image_features.shape == (1, model.config.embed_dim) and text_features.shape == (3, model.config.embed_dim)
    for features in (image_features, text_features):
        torch.testing.assert_close(features.double().norm(dim=-1), torch.ones(len(features), dtype=torch.float64))
    with torch.no_grad():
        scale = model.logit_scale_global().double()
        raw_img, raw_txt = model.encode_image(image).double(), model.encode_text(text).double()
    logits = scale * (raw_img / raw_img.norm(dim=-1, keepdim=True)) @ (raw_txt / raw_txt.norm(dim=-1, keepdim=True)).T
    expected = torch.softmax(logits, dim=-1)
    # fp32 features and a logit scale of 1/0.07: a few ulps of the logits, well below 1e-5 in probability
    torch.testing.assert_close(probs.double(), expected, atol=1e-5, rtol=0)
    assert probs.shape == (1, 3) and abs(float(probs.sum()) - 1) < 1e-6
    assert "tensor([[" in capsys.readouterr().out  # the snippet prints its probabilities

    ns_before = dict(ns)
    exec(compile(second, "README.md (checkpoints)", "exec"), ns)
    loaded, hub_model = ns["model"], ns["hub_model"]
    assert loaded is not model and not loaded.training and not hub_model.training
    assert (tmp_path / "mlip-export" / "README.md").is_file() and (tmp_path / "mlip-export" / "preprocess_config.json").is_file()
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert loaded.preprocess_cfg == model.preprocess_cfg
    with torch.no_grad():
        for other in (loaded, hub_model):
            assert torch.equal(other.encode_image(image, normalize=True), ns_before["image_features"])
            assert torch.equal(other.encode_text(text, normalize=True), ns_before["text_features"])
    outputs = ns["outputs"]  # transformers' AutoModel: a ModelOutput with CLIP's names
    from transformers.utils import ModelOutput

    assert isinstance(outputs, ModelOutput) and outputs.logits_per_image.shape == (1, 3)
    torch.testing.assert_close(outputs.logits_per_image.softmax(dim=-1), probs, atol=1e-6, rtol=0)
    torch.testing.assert_close(outputs.logits_per_text, outputs.logits_per_image.T)
    preprocess = ns_before["preprocess"]
    with Image.open("chest_xray.jpg") as img:
        grey = (np.asarray(img, dtype=np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])
    torch.testing.assert_close(image[0], preprocess(grey.astype(np.float32)), atol=1e-5, rtol=0)


def test_open_clip_calls_work_as_there(tmp_path, monkeypatch, caplog):
    import mlip_fast
    from mlip_fast.models import registry, vision

    monkeypatch.setattr(registry, "_ADDED_CONFIGS", {})
    monkeypatch.setattr(registry, "_PRETRAINED", {})
    torch.manual_seed(0)
    model, _, preprocess = mlip_fast.create_model_and_transforms("mlip-tiny", precision="bf16", force_image_size=96)
    model.eval()
    tokenizer = mlip_fast.get_tokenizer("mlip-tiny")
    image = preprocess(real_rgb_jpeg()).unsqueeze(0)  # the transform's fp32 output goes into a bf16 model
    assert image.shape == (1, 1, 96, 96) and model.visual.embeddings.proj.weight.dtype == torch.bfloat16
    with torch.no_grad():
        image_features, text_features, logit_scale = model(image, tokenizer(["Effusion.", "Clear lungs."]))
    assert image_features.dtype == torch.bfloat16 and text_features.shape == (2, model.config.embed_dim)
    # open_clip's model.logit_scale: the parameter whose exp() is the returned scale, kept in fp32, and no new
    # state-dict key (existing checkpoints and exports load unchanged)
    assert isinstance(model.logit_scale, torch.nn.Parameter) and model.logit_scale is model.logit_scale_global.log_scale
    assert model.logit_scale.dtype == torch.float32 and float(model.logit_scale.detach().exp()) == float(logit_scale)
    assert not any(k.startswith("logit_scale.") or k == "logit_scale" for k in model.state_dict())
    with pytest.raises(ValueError, match="precision must be one of fp32, amp"):
        mlip_fast.create_model("mlip-tiny", precision="float64")

    fp32 = mlip_fast.create_model("mlip-tiny").eval()
    grey = torch.randn(2, 1, 64, 64)
    monkeypatch.setattr(vision, "_noticed_rgb", False)
    caplog.set_level(logging.WARNING, logger="mlip_fast.models.vision")
    with torch.no_grad():
        expected = fp32(grey, None)[0]
        for _ in range(2):  # an RGB rendering of the grey image gives the grey image's features
            torch.testing.assert_close(fp32(grey.expand(-1, 3, -1, -1), None)[0], expected)
        batch = tokenizer(["No pleural effusion.", "Mild cardiomegaly."])
        from_ids = fp32(None, batch["input_ids"])[1]  # token ids alone, as open_clip's tokenizer gives them
        torch.testing.assert_close(from_ids, fp32(None, batch)[1])
    notices = [r for r in caplog.records if "3-channel input is reduced to BT.601" in r.getMessage()]
    assert len(notices) == 1  # once per process

    export = tmp_path / "export"
    fp32.save_pretrained(export)
    loaded, eval_transform = mlip_fast.create_model_from_pretrained(f"local-dir:{export}")
    assert not loaded.training and eval_transform.image_size == 64
    with torch.no_grad():
        torch.testing.assert_close(loaded(grey, None)[0], expected, atol=0, rtol=0)
    resized, _ = mlip_fast.create_model_from_pretrained("mlip-tiny", pretrained=export, force_image_size=80)
    assert resized.visual.embeddings.pos_embed.shape == (1, 1 + 10 * 10, 128)  # resampled to the 10 x 10 grid
    with pytest.raises(mlip_fast.models.CheckpointError, match="needs pretrained weights"):
        mlip_fast.create_model_from_pretrained("mlip-tiny")

    assert mlip_fast.list_pretrained() == []  # no published weights: only what is added
    config = tmp_path / "my-vit.json"
    config.write_text(json.dumps({**json.loads(mlip_fast.models.get_model_config("mlip-tiny").to_json()), "embed_dim": 32}))
    assert mlip_fast.add_model_config(config) == ["my-vit"] and "my-vit" in mlip_fast.list_models()
    assert mlip_fast.create_model("my-vit").config.embed_dim == 32
    assert mlip_fast.add_model_config(export) == ["mlip-tiny"]
    assert mlip_fast.list_pretrained() == [("mlip-tiny", f"local-dir:{export.resolve()}")]


def test_transformers_auto_classes_after_import(tmp_path):
    """A fresh interpreter: ``import mlip_fast`` stays light (no torch, no transformers), then transformers'
    AutoConfig / AutoModel load an export and return ModelOutputs; an export written before ``model_type`` was
    stored still loads through mlip_fast's own loaders."""
    import mlip_fast

    torch.manual_seed(0)
    model = mlip_fast.create_model("mlip-tiny").eval()
    model.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "config.json").read_text())["model_type"] == "mlip"
    header = (tmp_path / "export" / "README.md").read_text().split("---")[1]  # the card's YAML metadata
    assert "pipeline_tag" not in header and "\nlicense: mit\n" in header  # no pipeline can serve MLIP
    code = """
import sys, torch, mlip_fast
assert "transformers" not in sys.modules
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput
config = AutoConfig.from_pretrained(sys.argv[1])
model = AutoModel.from_pretrained(sys.argv[1])
tokens = mlip_fast.get_tokenizer(sys.argv[1])(["No effusion.", "Cardiomegaly."])
out = model(pixel_values=torch.zeros(1, 1, 64, 64), **tokens)
assert isinstance(out, ModelOutput) and out.logits_per_image.shape == (1, 2), out
print(type(config).__name__, config.to_mlip_config().name, type(model).__name__, model.training)
print(out.logits_per_image.tolist())
"""
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "export")], cwd=REPO, capture_output=True,
                          text=True, timeout=180, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, logits = proc.stdout.strip().splitlines()
    assert first == "MLIPHFConfig mlip-tiny MLIPHFModel False"
    tokens = mlip_fast.get_tokenizer("mlip-tiny")(["No effusion.", "Cardiomegaly."])
    with torch.no_grad():
        image, text, scale = model(torch.zeros(1, 1, 64, 64), tokens)
    torch.testing.assert_close(torch.tensor(json.loads(logits)), scale * image @ text.T, atol=1e-5, rtol=0)

    old = tmp_path / "old-export"
    shutil.copytree(tmp_path / "export", old)
    data = json.loads((old / "config.json").read_text())
    del data["model_type"]
    (old / "config.json").write_text(json.dumps(data))
    for loaded in (mlip_fast.from_pretrained(old), mlip_fast.create_model_and_transforms(str(old))[0].eval()):
        with torch.no_grad():
            torch.testing.assert_close(loaded(torch.zeros(1, 1, 64, 64), None)[0], image, atol=0, rtol=0)


def test_top_level_names_are_lazy():
    """``import mlip_fast`` stays light (no torch); the open_clip names resolve on first use."""
    code = "import sys, mlip_fast; print(sorted(mlip_fast.__all__)); assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import mlip_fast
    from mlip_fast.models import factory

    for name in ("create_model_and_transforms", "create_model", "create_model_from_pretrained", "get_tokenizer",
                 "list_models", "list_pretrained", "add_model_config", "from_pretrained"):
        assert name in proc.stdout and name in dir(mlip_fast)
        assert getattr(mlip_fast, name) is getattr(factory, name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        mlip_fast.nope
