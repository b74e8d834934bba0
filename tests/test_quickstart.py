"""The README's Python quick start, run as a new user would: its code blocks (marked ``<!-- quickstart -->``)
are executed as written, in a folder holding a real chest X-ray as ``chest_xray.jpg``, then checked: the PIL
image becomes the model's input, the embeddings are unit vectors, the zero-shot probabilities are the softmax
of the scaled cosine similarities (recomputed in fp64), and the model saved, pushed (to a local folder laid
out as the Hub cache, offline) and loaded back at a revision gives identical outputs."""
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
    loaded = ns["model"]
    assert loaded is not model and not loaded.training
    assert (tmp_path / "mlip-export" / "README.md").is_file() and (tmp_path / "mlip-export" / "preprocess_config.json").is_file()
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    assert loaded.preprocess_cfg == model.preprocess_cfg
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image, normalize=True), ns_before["image_features"])
        assert torch.equal(loaded.encode_text(text, normalize=True), ns_before["text_features"])
    preprocess = ns_before["preprocess"]
    with Image.open("chest_xray.jpg") as img:
        grey = (np.asarray(img, dtype=np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])
    torch.testing.assert_close(image[0], preprocess(grey.astype(np.float32)), atol=1e-5, rtol=0)


def test_top_level_names_are_lazy():
    """``import mlip_fast`` stays light (no torch); the open_clip names resolve on first use."""
    code = "import sys, mlip_fast; print(sorted(mlip_fast.__all__)); assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import mlip_fast
    from mlip_fast.models import factory

    for name in ("create_model_and_transforms", "create_model", "get_tokenizer", "list_models", "from_pretrained"):
        assert name in proc.stdout and name in dir(mlip_fast)
        assert getattr(mlip_fast, name) is getattr(factory, name)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        mlip_fast.nope
