"""Zero-shot classification end to end, and its scores against a direct computation."""
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlip_fast.data.evaluation.synthetic import SyntheticBenchmark
from mlip_fast.data.labels import CHEXPERT5
from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import collate_samples
from mlip_fast.eval.prompts import load_prompts
from mlip_fast.eval.zeroshot import MODES, scores_to_metrics, zero_shot_classify, zero_shot_scores
from mlip_fast.reference.patch_sentence_ot import patch_sentence_ot_scores as reference_ot_scores


def test_zero_shot_all_modes(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split=None, transform=eval_tf)
    tiny_model.train()
    result = zero_shot_classify(tiny_model, data, "synthetic", mode="all", classes=list(CHEXPERT5), progress=False)
    assert tiny_model.training, "evaluation must restore the training mode"
    assert set(result) == set(MODES)
    for mode, r in result.items():
        assert list(r["classes"]) == list(CHEXPERT5) and r["n_images"] == 40 and r["mode"] == mode
        for v in r["classes"].values():
            assert all(math.isfinite(v[k]) for k in ("auc", "accuracy", "f1"))
        assert r["macro"]["auc"] == pytest.approx(np.mean([v["auc"] for v in r["classes"].values()]))
        assert r["chance"]["auc"] == 0.5


def _direct_scores(model, images, prompts, local_weight=0.5):
    """Zero-shot scores written out with loops: one class, one prompt, one patch at a time."""
    norm = lambda v: v / v.norm()
    model.eval()
    with torch.no_grad():
        out = model.encode_image_local(images)
        sets = {}
        for cls, p in prompts.items():
            for polarity, texts in (("pos", p.positive), ("neg", p.negative)):
                enc = model.encode_text_local(list(texts))
                mean = norm(sum(norm(t) for t in enc["text_global"]))
                sentences = [norm(enc["sentences"][i, q]) for i in range(len(texts))
                             for q in range(enc["sentences"].shape[1]) if enc["sentence_mask"][i, q]]
                sets[cls, polarity] = (mean, sentences)
        result = {m: np.zeros((images.shape[0], len(prompts))) for m in MODES}
        for b in range(images.shape[0]):
            v = norm(out["image_global"][b])
            patches = torch.stack([norm(p) for p in out["patches"][b]])
            for c, cls in enumerate(prompts):
                g, l = [], []
                for polarity in ("pos", "neg"):
                    mean, sentences = sets[cls, polarity]
                    g.append(float(v @ mean))
                    l.append(sum(float((patches @ s).max()) for s in sentences) / len(sentences))
                result["global"][b, c] = g[0] - g[1]
                result["local"][b, c] = l[0] - l[1]
                result["combined"][b, c] = (1 - local_weight) * (g[0] - g[1]) + local_weight * (l[0] - l[1])
    return result


def test_scores_match_direct_computation(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split="test", transform=eval_tf)
    prompts = {k: v for k, v in load_prompts("synthetic").items() if k in ("Cardiomegaly", "Pneumothorax")}
    zs = zero_shot_scores(tiny_model, data, prompts, local_weight=0.3, batch_size=5, progress=False)
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    direct = _direct_scores(tiny_model, images, prompts, local_weight=0.3)
    for mode in MODES:
        np.testing.assert_allclose(zs.scores[mode], direct[mode], atol=1e-5)
    labels = np.stack([data[i]["labels"] for i in range(len(data))])[:, [1, 5]]
    np.testing.assert_array_equal(zs.labels, labels)
    r = scores_to_metrics(zs.scores["global"], zs.labels, zs.class_names, skip_empty=True)
    for j, name in enumerate(zs.class_names):
        if "skipped" not in r["classes"][name]:
            assert r["classes"][name]["auc"] == pytest.approx(M.roc_auc(labels[:, j], direct["global"][:, j]))
            pred = direct["global"][:, j] >= 0
            assert r["classes"][name]["f1"] == pytest.approx(M.f1_score(labels[:, j], pred))


def test_dataloader_input_and_multiclass(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split=None, transform=eval_tf)
    loader = DataLoader(data, batch_size=16, collate_fn=lambda s: collate_samples(s))
    r = zero_shot_classify(tiny_model, loader, "synthetic", mode="global", classes=["Cardiomegaly", "Edema"],
                           max_samples=24, progress=False)
    assert r["n_images"] == 24
    # One label per image: the arg-max accuracy is reported with its chance rate.
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.1], [0.6, 0.9]])
    labels = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], float)
    mc = scores_to_metrics(scores, labels, ["a", "b"])["multiclass"]
    assert mc["accuracy"] == 0.75 and mc["chance"] == 0.75


def test_unknown_labels_are_excluded():
    scores = np.array([[0.9], [0.1], [0.5], [0.7]])
    labels = np.array([[1.0], [0.0], [np.nan], [0.0]])
    r = scores_to_metrics(scores, labels, ["x"])
    assert r["classes"]["x"]["n"] == 3 and r["classes"]["x"]["auc"] == 1.0


def test_bad_input(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split="test", transform=eval_tf)
    # An empty class: no positive sample of a label in the evaluated data.
    labels = np.zeros((6, 1))
    with pytest.raises(EvalDataError, match="'x' has 0 positive"):
        scores_to_metrics(np.random.rand(6, 1), labels, ["x"])
    r = scores_to_metrics(np.random.rand(6, 2), np.c_[labels, [0, 1, 0, 1, 0, 1]], ["x", "y"], skip_empty=True)
    assert "skipped" in r["classes"]["x"] and r["n_classes_scored"] == 1
    unlabelled = [{"image": data[i]["image"], "index": i} for i in range(4)]
    with pytest.raises(EvalDataError, match="needs labels"):
        zero_shot_classify(tiny_model, unlabelled, "synthetic", progress=False)
    with pytest.raises(EvalDataError, match="not labels of the dataset"):
        zero_shot_classify(tiny_model, data, "chexpert5", label_names=["a", "b", "c", "d", "e", "f", "g"], progress=False)
    with pytest.raises(EvalDataError, match="no prompts"):
        zero_shot_classify(tiny_model, data, "synthetic", classes=["Nodule"], progress=False)
    with pytest.raises(ValueError, match="mode"):
        zero_shot_classify(tiny_model, data, "synthetic", mode="best", progress=False)
    with pytest.raises(EvalDataError, match="empty"):
        zero_shot_classify(tiny_model, [], "synthetic", progress=False)


def test_ot_local_scores_are_the_ot_op_against_each_prompt_set(tiny_model, synth_dir, eval_tf):
    data = SyntheticBenchmark(synth_dir, split="test", transform=eval_tf)
    prompts = {k: v for k, v in load_prompts("synthetic").items() if k in ("Edema", "Pneumothorax")}
    zs = zero_shot_scores(tiny_model, data, prompts, batch_size=4, progress=False, local_matching="ot")
    assert zs.local_matching == "ot"
    norm = lambda x: torch.nn.functional.normalize(x.double(), dim=-1)  # noqa: E731
    images = torch.stack([data[i]["image"] for i in range(len(data))])
    with torch.no_grad():
        patches = norm(tiny_model.eval().encode_image_local(images)["patches"])
        cfg = tiny_model.config
        for c, p in enumerate(prompts.values()):
            score = []
            for texts in (p.positive, p.negative):
                enc = tiny_model.encode_text_local(list(texts))
                sentences = norm(enc["sentences"][enc["sentence_mask"]])[None]
                score.append(reference_ot_scores(patches, sentences, eps=cfg.ot_eps, n_iter=cfg.ot_iters)[:, 0])
            np.testing.assert_allclose(zs.scores["local"][:, c], (score[0] - score[1]).numpy(), atol=2e-5)
    base = zero_shot_scores(tiny_model, data, prompts, batch_size=4, progress=False)
    assert base.local_matching == "max"  # the model config's matching (the tiny model trained with max)
    np.testing.assert_allclose(zs.scores["global"], base.scores["global"])
    result = zero_shot_classify(tiny_model, data, prompts, mode="local", progress=False, skip_empty=True,
                                local_matching="ot")
    assert result["local_matching"] == "ot"
