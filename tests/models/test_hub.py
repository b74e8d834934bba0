"""Hub-native checkpoints, offline: a local folder laid out as a Hugging Face cache snapshot (refs/<revision>
-> snapshots/<commit>/...) stands in for the Hub. MLIP.from_pretrained with revisions, hf-hub: names in the
factory, push_to_hub through a recording stand-in for HfApi, the preprocessing stored and restored, and the
model card (numbers with chance rates, a user's README kept)."""
import json

import pytest
import torch
from huggingface_hub import ModelCard

from mlip_fast.eval.common import eval_transform
from mlip_fast.models import (
    MLIP,
    CheckpointError,
    create_model,
    create_model_and_transforms,
    get_model_config,
    get_tokenizer,
    render_model_card,
    write_model_card,
)
from mlip_fast.models.model_card import CARD_MARKER
from mlip_fast.preprocess.transforms import ImageTransform, PreprocessConfig
from tests.hub_cache import offline_cache, publish, record_pushes

from .conftest import tiny_overrides

REPO = "mlip-org/mlip-tiny-test"
TEXTS = ["Heart size is normal. No focal consolidation.", "Small right pleural effusion."]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, the default one, with every network request refused (offline mode)."""
    return offline_cache(monkeypatch, tmp_path / "hf-cache")


def encode(model, images):
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(TEXTS), model.encode_image_local(images)["patches"]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_revisions_of_a_hub_snapshot_load_bitwise(tmp_path, hub_cache):
    old = create_model("mlip-tiny", **tiny_overrides()).eval()
    new = create_model("mlip-tiny", **tiny_overrides()).eval()
    old.save_pretrained(tmp_path / "v1")
    new.save_pretrained(tmp_path / "v2")
    first = publish(tmp_path / "v1", hub_cache, REPO, refs=("v1",))
    publish(tmp_path / "v2", hub_cache, REPO, refs=("main",))
    images = torch.randn(2, 1, 64, 64)

    assert_same(encode(MLIP.from_pretrained(REPO, revision="v1"), images), encode(old, images))
    assert_same(encode(MLIP.from_pretrained(f"hf-hub:{REPO}"), images), encode(new, images))
    by_commit = MLIP.from_pretrained(REPO, revision=first, local_files_only=True, cache_dir=hub_cache)
    assert_same(encode(by_commit, images), encode(old, images))
    assert not by_commit.training and by_commit.config == old.config

    model, train_tf, eval_tf = create_model_and_transforms(f"hf-hub:{REPO}", revision="v1")
    assert_same(encode(model.eval(), images), encode(old, images))
    assert train_tf.train and not eval_tf.train and eval_tf.image_size == 64
    again = create_model("mlip-tiny", pretrained=f"hf-hub:{REPO}", revision="v1", **tiny_overrides())
    assert_same(encode(again.eval(), images), encode(old, images))
    tokenizer = get_tokenizer(f"hf-hub:{REPO}", revision="v1")
    assert tokenizer.max_length == old.config.text.max_length
    assert torch.equal(tokenizer(TEXTS)["input_ids"], old.tokenize(TEXTS)["input_ids"])


def test_missing_hub_checkpoints_are_clear_errors(tmp_path, hub_cache):
    create_model("mlip-tiny").save_pretrained(tmp_path / "ckpt")
    publish(tmp_path / "ckpt", hub_cache, REPO)
    with pytest.raises(CheckpointError, match=rf"{REPO} at revision 'v9'.*local cache"):
        MLIP.from_pretrained(REPO, revision="v9")
    with pytest.raises(CheckpointError, match="no-such/repo.*no local folder"):
        MLIP.from_pretrained("no-such/repo")
    with pytest.raises(CheckpointError, match="not a Hub repo id"):
        create_model_and_transforms("hf-hub:not a repo")
    with pytest.raises(CheckpointError, match="revision='v1' applies to Hub repos"):
        MLIP.from_pretrained(tmp_path / "ckpt", revision="v1")
    with pytest.raises(CheckpointError, match="does not exist"):
        MLIP.from_pretrained(tmp_path / "missing")


def test_push_to_hub_uploads_a_complete_checkpoint(tmp_path, hub_cache, monkeypatch):
    calls = record_pushes(monkeypatch, hub_cache)
    model = create_model("mlip-tiny", **tiny_overrides()).eval()
    url = model.push_to_hub(REPO, private=True, branch="release")
    (create, upload) = calls
    assert create == ("create_repo", REPO, True) and url.startswith(f"https://huggingface.co/{REPO}/commit/")
    assert upload[:3] == ("upload_folder", REPO, "release")
    assert {"README.md", "config.json", "model.safetensors", "preprocess_config.json", "text/config.json",
            "tokenizer/tokenizer.json"} <= set(upload[3])
    images = torch.randn(2, 1, 64, 64)
    assert_same(encode(MLIP.from_pretrained(REPO, revision="release"), images), encode(model, images))


def test_preprocessing_is_stored_and_restored(tmp_path):
    model = create_model("mlip-tiny", **tiny_overrides())
    model.preprocess_cfg = PreprocessConfig(image_size=64, mean=0.45, std=0.3, augment={"degrees": 3.0})
    model.save_pretrained(tmp_path / "ckpt")
    stored = json.loads((tmp_path / "ckpt" / "preprocess_config.json").read_text())
    assert stored["mean"] == [0.45] and stored["std"] == [0.3] and stored["augment"]["degrees"] == 3.0
    loaded, train_tf, eval_tf = create_model_and_transforms(tmp_path / "ckpt")
    assert loaded.preprocess_cfg == model.preprocess_cfg
    image = torch.rand(50, 40)
    expected = ImageTransform(64, mean=0.45, std=0.3)(image)
    assert torch.equal(eval_tf(image), expected) and train_tf.augment["degrees"] == 3.0
    assert torch.equal(eval_transform(loaded)(image), expected)  # what the evaluation tasks use
    # an export written before the preprocessing was stored: the default of its image size
    (tmp_path / "ckpt" / "preprocess_config.json").unlink()
    assert MLIP.from_pretrained(tmp_path / "ckpt").preprocess_cfg == PreprocessConfig(image_size=64)
    with pytest.raises(ValueError, match="does not fit the ViT"):
        MLIP(model.config, model.text.encoder, model.tokenizer, PreprocessConfig(image_size=32))


SUMMARY = {
    "steps": 12, "global_batch": 8, "micro_batch": 4, "gradient_accumulation": 2, "world_size": 1, "dtype": "float32",
    "zero_stage": 2, "wall_time_s": 41.5, "train_s": 20.25, "samples_per_s": 4.74, "seed": 3, "device": "cpu", "cpu_count": 2,
    "ds_config": {"optimizer": {"type": "AdamW", "params": {"lr": 0.002, "weight_decay": 0.05}},
                  "scheduler": {"type": "WarmupCosineLR"}},
    "data": {"source": "synthetic", "path": "/x/master.csv", "n_train": 70, "n_valid": 15, "n_test": 15},
    "args": {"synthetic_n": 100, "synthetic_seed": 0},
    "zero_shot_test": {"auc": {"Edema": 0.8125, "Atelectasis": None}, "auc_macro": 0.8125, "chance_auc": 0.5,
                       "n_images": 15},
    "localisation_test": {"pointing_accuracy": 0.25, "chance": 0.0513, "mask_iou": 0.04, "iou_chance": 0.0513,
                          "n_sentences": 9},
    "versions": {"mlip_fast": "0.1.0", "torch": "2.13.0", "platform": "Linux-x86_64"},
}


def test_model_card_holds_the_run_numbers_and_keeps_a_users_readme(tmp_path):
    model = create_model("mlip-tiny")
    model.save_pretrained(tmp_path / "plain")
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert plain.startswith("---\nlibrary_name: mlip_fast\n") and CARD_MARKER in plain
    assert "not a medical device" in plain and "Not recorded" in plain and "mean [0.5], std [0.25]" in plain
    assert "| patch-sentence matching | token-wise max " in plain
    ot = create_model(get_model_config("mlip-tiny").replace(local_matching="ot", ot_eps=0.1, ot_iters=20))
    assert "| patch-sentence matching | entropic optimal transport, eps 0.1, 20 Sinkhorn iterations " in \
        render_model_card(ot)
    model.save_pretrained(tmp_path / "plain", model_card_kwargs={"summary": SUMMARY})  # replaces its own card
    card = (tmp_path / "plain" / "README.md").read_text()
    assert card == render_model_card(model, SUMMARY)
    # the metadata says only what holds: no pipeline serves MLIP, the synthetic data, the test numbers as results
    meta = ModelCard(card).data.to_dict()
    assert "pipeline_tag" not in meta and meta["license"] == "mit" and meta["datasets"] == ["mlip_fast-synthetic-cxr"]
    [results] = [r for r in meta["model-index"] if r["name"] == "mlip-tiny"]
    zero_shot, pointing = results["results"]
    assert zero_shot["task"]["type"] == "zero-shot-image-classification" and zero_shot["dataset"]["split"] == "test"
    assert [(m["name"], m["value"]) for m in zero_shot["metrics"]] == [("zero-shot macro AUC", 0.8125),
                                                                       ("zero-shot AUC, Edema", 0.8125)]
    assert pointing["metrics"][0]["value"] == 0.25
    real = {**SUMMARY, "data": {**SUMMARY["data"], "source": "/data/mimic/master.csv"}}
    meta = ModelCard(render_model_card(model, real)).data.to_dict()
    assert meta["license"] == "other" and "datasets" not in meta  # real data: its terms apply, no known Hub id
    meta = ModelCard(render_model_card(model, real, license="cc-by-nc-4.0", datasets=["org/cxr"])).data.to_dict()
    assert meta["license"] == "cc-by-nc-4.0" and meta["datasets"] == ["org/cxr"]
    for line in ("| zero-shot AUC, Edema | 0.812 | 0.500 |", "| zero-shot AUC, Atelectasis | n/a | 0.500 |",
                 "| zero-shot AUC, macro (15 images) | 0.812 | 0.500 |",
                 "| localisation pointing accuracy (9 finding sentences) | 0.250 | 0.051 |",
                 "| global batch | 8 = 4 per process x 2 accumulation x 1 process(es) |", "| precision | float32 |",
                 "| wall time | 41.5 s in all, 20.2 s training (4.7 samples/s) |",
                 "| hardware | 1 process(es) on CPU, 2 cores (Linux-x86_64) |",
                 "- Splits: 70 training, 15 validation and 15 test pairs"):
        assert line in card, line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("# my notes\n")
    model.save_pretrained(mine)
    assert (mine / "README.md").read_text() == "# my notes\n"
    with pytest.raises(FileExistsError, match="not written by mlip_fast"):
        write_model_card(mine, model, SUMMARY)
    write_model_card(tmp_path / "plain", model, None)
    assert "Not recorded" in (tmp_path / "plain" / "README.md").read_text()


def test_a_model_with_register_tokens_round_trips(tmp_path):
    """The ViT's register tokens are saved with the config and weights and restored bitwise."""
    vision = dict(get_model_config("mlip-tiny").vision.__dict__, registers=2)
    model = create_model("mlip-tiny", **tiny_overrides(vision=vision)).eval()
    assert model.visual.embeddings.registers.shape == (1, 2, model.config.vision.width)
    model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["vision"]["registers"] == 2
    loaded = MLIP.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.equal(loaded.visual.embeddings.registers, model.visual.embeddings.registers)
    images = torch.randn(2, 1, 64, 64)
    assert_same(encode(model, images), encode(loaded, images))
