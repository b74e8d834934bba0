"""Localisation, retrieval, few-shot classification and segmentation end to end on the synthetic set."""
import json
import math

import numpy as np
import pytest
import torch

from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.fewshot import few_shot_classify, subset_indices
from mlip_fast.eval.localisation import (evaluate_localisation, mask_to_input_frame, plan_heatmaps, report_sentences,
                                         sentence_heatmaps)
from mlip_fast.eval.retrieval import evaluate_retrieval
from mlip_fast.eval.segmentation import SegmentationDecoder, few_shot_segment
from mlip_fast.functional import LocalMatching
from mlip_fast.reference.patch_sentence_ot import transport_plan


def test_localisation_end_to_end(tiny_model, synth_dir):
    r = evaluate_localisation(tiny_model, synth_dir, split=None, examples=3, progress=False)
    assert len(r.pop("examples")) == 3
    rows = SyntheticBenchmark(synth_dir, split=None).rows
    n_findings = sum(len(json.loads(row["findings_json"])) for row in rows)
    assert r["n_sentences"] == n_findings and r["n_images"] == 40
    for key in ("pointing_accuracy", "chance", "mask_iou", "iou_chance"):
        assert 0.0 <= r[key] <= 1.0
    assert sum(v["n"] for v in r["per_finding"].values()) == n_findings
    assert r["per_finding"]["cardiomegaly"]["chance"] > r["per_finding"]["nodule"]["chance"]


def test_localisation_against_direct_heatmap(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split="test", with_findings=True)
    record = next(data[i] for i in range(len(data)) if data[i]["findings"])
    finding = record["findings"][0]
    image = eval_tf(record["image"])[None]
    with torch.no_grad():
        heat = sentence_heatmaps(tiny_model.eval(), image, [finding["sentence"]], [0])[0].numpy()
        patches = tiny_model.encode_image_local(image)["patches"][0]
        sentence = tiny_model.encode_text_local([finding["sentence"]])["sentences"][0, 0]
    grid = tiny_model.config.vision.image_size // tiny_model.config.vision.patch_size
    for p in range(grid * grid):
        cos = float(patches[p] @ sentence / (patches[p].norm() * sentence.norm()))
        assert heat[p // grid, p % grid] == pytest.approx(cos, abs=1e-5)
    result = evaluate_localisation(tiny_model, [{"image": record["image"], "findings": [finding]}], progress=False)
    mask = mask_to_input_frame(finding["mask"], 64)
    assert result["pointing_accuracy"] == float(M.pointing_hit(heat, mask))
    assert result["chance"] == pytest.approx(mask.mean())
    assert result["mask_iou"] == pytest.approx(M.heatmap_iou(heat, mask))


def test_mask_to_input_frame_letterbox():
    mask = np.zeros((20, 40), bool)
    mask[:, 20:] = True  # right half of a wide image
    out = mask_to_input_frame(mask, 16)
    assert out.shape == (16, 16)
    assert not out[:4].any() and not out[12:].any()  # padded rows above and below
    assert out[4:12, 8:].all() and not out[4:12, :8].any()


def test_localisation_bad_input(tiny_model, synth_dir, eval_tf):
    with pytest.raises(EvalDataError, match="findings"):
        evaluate_localisation(tiny_model, [{"image": np.zeros((64, 64), np.float32)}], progress=False)
    with pytest.raises(EvalDataError, match="none of the"):
        evaluate_localisation(tiny_model, [{"image": np.zeros((64, 64), np.float32), "findings": []}], progress=False)
    with pytest.raises(EvalDataError, match="master.csv"):
        evaluate_localisation(tiny_model, synth_dir / "images", progress=False)


def test_retrieval_end_to_end(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split=None, transform=eval_tf)
    r = evaluate_retrieval(tiny_model, data, batch_size=16, progress=False, return_similarity=True)
    sim = r.pop("similarity")
    assert sim.shape == (40, 40) and r["n_pairs"] == 40
    for direction, s in (("image_to_report", sim), ("report_to_image", sim.T)):
        ranks = M.retrieval_ranks(s)
        assert r[direction]["median_rank"] == M.median_rank(ranks)
        for k in (1, 5, 10):
            assert r[direction][f"recall@{k}"] == M.recall_at_k(ranks, k)
    unreported = [{"image": data[0]["image"]}, {"image": data[1]["image"]}]
    with pytest.raises(EvalDataError, match="report"):
        evaluate_retrieval(tiny_model, unreported, progress=False)


def test_subsets_are_seeded_and_nested():
    a, b, c = (subset_indices(200, f, seed=5) for f in (0.01, 0.1, 1.0))
    assert len(a) == 2 and len(b) == 20 and c == list(range(200))
    assert set(a) <= set(b) <= set(c)
    assert subset_indices(200, 0.1, seed=5) == b and subset_indices(200, 0.1, seed=6) != b
    assert len(subset_indices(7, 0.01, 0)) == 1


def test_fewshot_end_to_end_with_split_files(tiny_model, synth_dir, eval_tf, tmp_path):
    train = SyntheticBenchmark(synth_dir, split="train", transform=eval_tf)
    test = SyntheticBenchmark(synth_dir, split=None, transform=eval_tf)
    kwargs = dict(fractions=(0.1, 1.0), seed=1, classes=["Cardiomegaly", "Pleural Effusion"], linear_steps=30,
                  finetune_epochs=1, batch_size=16, splits_dir=tmp_path / "splits", progress=False)
    r = few_shot_classify(tiny_model, train, test, **kwargs)
    assert r["classes"] == ["Cardiomegaly", "Pleural Effusion"] and r["n_test"] == 40
    for method in ("linear", "finetune"):
        for key, n in (("10%", round(0.1 * len(train))), ("100%", len(train))):
            row = r[method][key]
            assert row["n_train"] == n and 0.0 <= row["macro_auc"] <= 1.0
            assert json.loads(open(row["split_file"]).read())["indices"] == subset_indices(len(train), row["fraction"], 1)
    files = sorted(p.name for p in (tmp_path / "splits").iterdir())
    assert files == ["fewshot_100pct_seed1.json", "fewshot_10pct_seed1.json"]
    # A split file is read back, not redrawn: edit it and the subset follows.
    path = tmp_path / "splits" / "fewshot_10pct_seed1.json"
    record = json.loads(path.read_text())
    record["indices"] = [0, 1, 2]
    path.write_text(json.dumps(record))
    again = few_shot_classify(tiny_model, train, test, **{**kwargs, "methods": ("linear",), "fractions": (0.1,)})
    assert again["linear"]["10%"]["n_train"] == 3
    # The linear probe on 100% of the labels is deterministic for a seed.
    twice = few_shot_classify(tiny_model, train, test, **{**kwargs, "methods": ("linear",), "fractions": (1.0,)})
    assert twice["linear"]["100%"]["macro_auc"] == r["linear"]["100%"]["macro_auc"]


def test_fewshot_needs_labels(tiny_model, synth_dir, eval_tf):
    unlabelled = [{"image": torch.zeros(1, 64, 64), "index": i} for i in range(4)]
    with pytest.raises(EvalDataError, match="needs labels"):
        few_shot_classify(tiny_model, unlabelled, unlabelled, methods=("linear",), progress=False)
    with pytest.raises(EvalDataError, match="needs labels"):
        few_shot_classify(tiny_model, unlabelled, SyntheticBenchmark(synth_dir, "test", eval_tf), methods=("finetune",),
                          fractions=(1.0,), progress=False)


def test_decoder_shapes():
    dec = SegmentationDecoder(width=24, grid_size=3, patch_size=8)
    assert dec(torch.randn(2, 9, 24)).shape == (2, 1, 24, 24)
    with pytest.raises(ValueError, match="powers of 2"):
        SegmentationDecoder(24, 3, 12)


def test_segmentation_end_to_end(tiny_model, synth_dir, eval_tf, tmp_path):
    train = SyntheticBenchmark(synth_dir, "train", eval_tf, segmentation_target="any")
    test = SyntheticBenchmark(synth_dir, "test", eval_tf, segmentation_target="any")
    before = {k: v.clone() for k, v in tiny_model.visual.state_dict().items()}
    r = few_shot_segment(tiny_model, train, test, fractions=(0.1, 1.0), epochs=3, batch_size=8, examples=2,
                         splits_dir=tmp_path, progress=False)
    assert len(r.pop("examples")) == 2
    for key in ("10%", "100%"):
        assert 0.0 <= r[key]["dice"] <= 1.0 and math.isfinite(r[key]["final_loss"])
    assert (tmp_path / "segmentation_10pct_seed0.json").is_file()
    assert all(torch.equal(v, tiny_model.visual.state_dict()[k]) for k, v in before.items()), "the checkpoint's tower changed"
    tuned = few_shot_segment(tiny_model, train, test, fractions=(0.3,), epochs=1, batch_size=8, freeze_encoder=False,
                             progress=False)
    assert 0.0 <= tuned["30%"]["dice"] <= 1.0 and not tuned["cached_features"]
    # Frozen encoder without the feature cache: the same training, batch for batch.
    streamed = few_shot_segment(tiny_model, train, test, fractions=(0.1,), epochs=3, batch_size=8, cache_limit_gb=0,
                                progress=False)
    assert r["cached_features"] and not streamed["cached_features"]
    assert streamed["10%"]["final_loss"] == pytest.approx(r["10%"]["final_loss"], rel=1e-3)
    with pytest.raises(EvalDataError, match="mask"):
        few_shot_segment(tiny_model, SyntheticBenchmark(synth_dir, "train", eval_tf), test, fractions=(1.0,), epochs=1,
                         progress=False)


class _BrightnessOracle(torch.nn.Module):
    """A stand-in model whose patch vectors point towards the text vector where the image is bright, so a
    correct localisation pipeline must put every sentence on the bright region."""

    def __init__(self, image_size=64, patch_size=8):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=image_size, patch_size=patch_size, in_chans=1))
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.patch_size = patch_size

    def encode_image_local(self, images, mask_ratio=0.0):
        b = images.shape[0]
        means = torch.nn.functional.avg_pool2d(images[:, :1], self.patch_size).flatten(1)  # [B, P] row-major
        patches = torch.stack([means, torch.full_like(means, 0.5)], dim=-1)
        return {"image_global": patches.mean(1), "patches": patches}

    def encode_text_local(self, texts):
        n = len(texts)
        vec = torch.tensor([1.0, 0.0]).expand(n, 1, 2)
        return {"text_global": vec[:, 0], "sentences": vec, "sentence_mask": torch.ones(n, 1, dtype=torch.bool)}


def test_localisation_orientation_with_an_oracle():
    # Wide raw images (letterboxed into the square input) with one bright rectangle each; the finding mask
    # marks it. Any flip, transpose or misaligned resize of mask vs. heat map would miss.
    records = []
    for top, left in ((4, 6), (30, 44), (8, 50), (34, 2)):
        image = np.full((48, 64), 0.1, np.float32)
        image[top:top + 12, left:left + 12] = 0.9
        mask = np.zeros((48, 64), bool)
        mask[top:top + 12, left:left + 12] = True
        records.append({"image": image, "findings": [{"name": "spot", "sentence": "A spot.", "mask": mask}]})
    r = evaluate_localisation(_BrightnessOracle(), records, progress=False)
    assert r["pointing_accuracy"] == 1.0 and r["mask_iou"] > 0.5 and r["chance"] < 0.1
    for rec in records:  # the same maps against the horizontally mirrored masks: no hit
        rec["findings"][0]["mask"] = rec["findings"][0]["mask"][:, ::-1].copy()
    assert evaluate_localisation(_BrightnessOracle(), records, progress=False)["pointing_accuracy"] == 0.0


def test_unknown_segmentation_target(synth_dir):
    with pytest.raises(EvalDataError, match="unknown segmentation target 'effusion'"):
        SyntheticBenchmark(synth_dir, "train", segmentation_target="effusion")


class _SideOracle(_BrightnessOracle):
    """Patch vectors that say which half of the image a patch is in; sentences naming "left" or "right" point at
    that half, other sentences at neither: only a correct sentence-to-column bookkeeping of the transport plan
    puts each finding on its own half."""

    def encode_image_local(self, images, mask_ratio=0.0):
        b, g = images.shape[0], self.config.vision.image_size // self.patch_size
        left = (torch.arange(g * g) % g < g // 2).float()
        patches = torch.stack([left, 1 - left, torch.full_like(left, 0.3)], dim=-1).expand(b, -1, -1)
        return {"image_global": patches.mean(1), "patches": patches}

    def encode_text_local(self, texts):
        vec = torch.tensor([[1.0 * ("left" in t), 1.0 * ("right" in t), 0.2] for t in texts])[:, None]
        return {"text_global": vec[:, 0], "sentences": vec, "sentence_mask": torch.ones(len(texts), 1, dtype=torch.bool)}


def test_localisation_by_transport_plan_with_an_oracle():
    half = np.zeros((64, 64), bool)
    half[:, :32] = True
    findings = [{"name": "left", "sentence": "Opacity on the left.", "mask": half},
                {"name": "right", "sentence": "Opacity on the right.", "mask": ~half}]
    image = np.full((64, 64), 0.5, np.float32)
    two = [{"image": image, "findings": findings}]  # two findings compete for the patches
    r = evaluate_localisation(_SideOracle(), two, progress=False, local_matching="ot")
    assert r["pointing_accuracy"] == 1.0 and r["mask_iou"] > 0.9 and r["local_matching"] == "ot"
    assert r["plan_sentences_per_image"] == 2.0
    # one finding with its report's other sentences as competitors (the finding's own sentence counted once)
    with_report = [{"image": image, "findings": findings[1:],
                    "report": "Opacity on the right. The left lung is clear. Heart size is normal."}]
    r = evaluate_localisation(_SideOracle(), with_report, progress=False, local_matching="ot")
    assert r["pointing_accuracy"] == 1.0 and r["plan_sentences_per_image"] == 3.0
    alone = [{"image": image, "findings": findings[1:]}]  # a sentence alone is spread over every patch
    heat = plan_heatmaps(_SideOracle(), torch.zeros(1, 1, 64, 64), [findings[1]["sentence"]], [0], [[]],
                         LocalMatching("ot"))
    torch.testing.assert_close(heat, torch.full_like(heat, 1 / 64))
    assert evaluate_localisation(_SideOracle(), alone, progress=False)["local_matching"] == "max"


def test_localisation_plan_maps_are_the_reference_plan(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split="test", with_findings=True)
    record = next(data[i] for i in range(len(data)) if data[i]["findings"])
    image = eval_tf(record["image"])[None]
    sentences = [f["sentence"] for f in record["findings"]]
    context = report_sentences(record["report"])
    matching = LocalMatching("ot", 0.1, 30)
    with torch.no_grad():
        heat = plan_heatmaps(tiny_model.eval(), image, sentences, [0] * len(sentences), [context], matching)
        patches = tiny_model.encode_image_local(image)["patches"]
        keys, texts = [], []
        for t in sentences + context:
            if " ".join(t.lower().split()) not in keys:
                keys.append(" ".join(t.lower().split()))
                texts.append(t)
        vectors = torch.stack([tiny_model.encode_text_local([t])["sentences"][0, 0] for t in texts])
        norm = torch.nn.functional.normalize
        plan, _, _, _ = transport_plan(norm(patches.double(), dim=-1), norm(vectors.double(), dim=-1)[None],
                                       eps=0.1, n_iter=30)
    grid = tiny_model.config.vision.image_size // tiny_model.config.vision.patch_size
    for n in range(len(sentences)):
        want = plan[0, 0, :, n] * len(texts)
        torch.testing.assert_close(heat[n].double().flatten(), want, rtol=1e-4, atol=1e-6)
        assert heat[n].shape == (grid, grid)
    r = evaluate_localisation(tiny_model, synth_dir, split=None, progress=False, local_matching="ot")
    assert r["local_matching"] == "ot" and r["plan_sentences_per_image"] > 2
    assert 0.0 <= r["pointing_accuracy"] <= 1.0
