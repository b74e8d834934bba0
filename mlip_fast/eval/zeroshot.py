"""Zero-shot classification with positive / negative prompt sets, scored globally, locally or both.

API (what the training loop and the CLI call)::

    zero_shot_classify(model, data, class_prompts, *, mode="combined", label_names=None,
                       local_weight=0.5, batch_size=32, device=None, max_samples=None,
                       skip_empty=False, progress=True, transform=None, classes=None,
                       local_matching=None) -> dict
    zero_shot_scores(model, data, class_prompts, *, label_names=None, local_weight=0.5,
                     batch_size=32, device=None, max_samples=None, progress=True,
                     transform=None, classes=None, local_matching=None) -> ZeroShotScores
    scores_to_metrics(scores [N, C], labels [N, C], class_names, *, skip_empty=False) -> dict

``data``: a dataset / list of sample dicts / DataLoader (see ``mlip_fast.eval.common``) with labels;
``class_prompts``: a shipped prompt-file name (``"synthetic"``, ``"chexpert5"``, ...), a JSON path or
a mapping ``{class: {"positive": [...], "negative": [...]}}``; prompt classes are matched to the
dataset's label names (case, spaces and underscores ignored); label columns without prompts are ignored;
``classes`` restricts the evaluation to some prompt classes (e.g. the CheXpert 5 of the synthetic set).

Scores per image and class c (all embeddings L2-normalised; ``P+`` / ``P-`` = the positive / negative
prompt sets of c):
- global: ``cos(v, mean_{t in P+} t) - cos(v, mean_{t in P-} t)`` with v the global image vector and the
  prompt means renormalised (the usual averaged-prompt classifier);
- local: ``L(P+) - L(P-)`` with ``L(P) = mean over the sentences q of P of max over patches p of
  cos(patch_p, q)`` (the text-to-image patch-sentence score of MLIP's local loss,
  ``mlip_fast.ops.patch_sentence_scores(..., directions="t2i")``): does some region match the finding?
  With optimal-transport matching (the model config's ``local_matching="ot"``, or ``local_matching="ot"``
  here) ``L(P)`` is the OT score of the image's patches against the sentences of P
  (``mlip_fast.ops.patch_sentence_ot_scores``, the model config's eps and iterations): the score the model
  was trained with. ``local_matching`` None reads the model config's.
- combined: ``(1 - local_weight) * global + local_weight * local``.
A score > 0 means the positive prompts win: accuracy and F1 use threshold 0; AUC is threshold-free.

Returned metrics (one mode; ``mode="all"`` returns ``{"global": ..., "local": ..., "combined": ...}``)::

    {"mode", "classes": {name: {"auc", "accuracy", "f1", "precision", "recall", "n", "n_positive",
                                "prevalence", "chance": {"auc", "accuracy", "f1"}}},
     "macro": {"auc", "accuracy", "f1"}, "chance": {"auc", "accuracy", "f1"} (macro of the chance rates),
     "n_images", "multiclass" (only for one-label-per-image data such as CheXpert 5x200:
     {"accuracy" of the arg-max class, "chance"}), "local_matching" ("max" / "ot")}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import (evaluating, eval_transform, iter_batches, l2_normalise, label_names_of,
                                   local_matching_of, model_device)
from mlip_fast.eval.prompts import ClassPrompts, load_prompts, normalise_name
from mlip_fast.ops import patch_sentence_ot_scores, patch_sentence_scores

__all__ = ["zero_shot_classify", "zero_shot_scores", "scores_to_metrics", "encode_prompts", "ZeroShotScores",
           "PromptEmbeddings", "MODES"]

MODES = ("global", "local", "combined")


@dataclass
class PromptEmbeddings:
    """Normalised prompt embeddings for C classes: ``global_ [C, 2, D]`` (positive, negative averaged
    and renormalised), ``sentences [2C, Q, D]`` (rows 2c = positive set of c, 2c + 1 = negative set; all
    valid sentences of the set's prompts) with ``sentence_mask [2C, Q]``."""

    class_names: list[str]
    global_: torch.Tensor
    sentences: torch.Tensor
    sentence_mask: torch.Tensor


@dataclass
class ZeroShotScores:
    """Per-image class scores ``[N, C]`` per mode, the labels ``[N, C]`` (NaN = unknown), class names and the
    patch-sentence matching of the local scores ("max" / "ot")."""

    class_names: list[str]
    scores: dict[str, np.ndarray]
    labels: Optional[np.ndarray]
    index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    local_matching: str = "max"


def encode_prompts(model, prompts: Mapping[str, ClassPrompts], device: torch.device) -> PromptEmbeddings:
    """Encode every prompt once with ``model.encode_text_local`` and build the per-class prompt embeddings."""
    names = list(prompts)
    texts: list[str] = []
    owner: list[int] = []  # row 2c or 2c + 1 of each prompt
    for c, name in enumerate(names):
        for polarity, sentences in enumerate((prompts[name].positive, prompts[name].negative)):
            texts.extend(sentences)
            owner.extend([2 * c + polarity] * len(sentences))
    out = model.encode_text_local(texts)
    text_global = l2_normalise(out["text_global"]).to(device)
    sents = l2_normalise(out["sentences"]).to(device)
    smask = out["sentence_mask"].to(device).bool()
    owner_t = torch.tensor(owner, device=device)
    rows = 2 * len(names)
    sums = torch.zeros(rows, text_global.shape[1], device=device).index_add_(0, owner_t, text_global)
    global_ = l2_normalise(sums).view(len(names), 2, -1)
    per_row = [sents[owner_t == r][smask[owner_t == r]] for r in range(rows)]  # each [Q_r, D]
    empty = [names[r // 2] + (" (negative)" if r % 2 else " (positive)") for r, s in enumerate(per_row) if s.shape[0] == 0]
    if empty:
        raise EvalDataError(f"the text tower produced no sentence for the prompts of {empty}")
    q = max(s.shape[0] for s in per_row)
    sentences = torch.zeros(rows, q, sents.shape[-1], device=device)
    mask = torch.zeros(rows, q, dtype=torch.bool, device=device)
    for r, s in enumerate(per_row):
        sentences[r, : s.shape[0]] = s
        mask[r, : s.shape[0]] = True
    return PromptEmbeddings(names, global_, sentences, mask)


def _match_columns(class_names: Sequence[str], data_names: Optional[Sequence[str]], n_columns: int) -> list[int]:
    if data_names is None:
        if n_columns != len(class_names):
            raise EvalDataError(
                f"the dataset has {n_columns} label columns but no label names, and the prompts name "
                f"{len(class_names)} classes {list(class_names)}; pass label_names= to match them"
            )
        return list(range(n_columns))
    if len(data_names) != n_columns:
        raise EvalDataError(f"the dataset names {len(data_names)} labels {list(data_names)} but its samples have {n_columns} label values")
    lookup = {normalise_name(n): i for i, n in enumerate(data_names)}
    missing = [c for c in class_names if normalise_name(c) not in lookup]
    if missing:
        raise EvalDataError(f"prompt classes {missing} are not labels of the dataset; its labels are {list(data_names)}")
    return [lookup[normalise_name(c)] for c in class_names]


def zero_shot_scores(
    model,
    data,
    class_prompts,
    *,
    label_names: Optional[Sequence[str]] = None,
    local_weight: float = 0.5,
    batch_size: int = 32,
    device=None,
    max_samples: Optional[int] = None,
    progress: bool = True,
    transform=None,
    require_labels: bool = True,
    classes: Optional[Sequence[str]] = None,
    local_matching: Optional[str] = None,
) -> ZeroShotScores:
    """Score every image of ``data`` against every prompt class in the three modes (see module doc)."""
    matching = local_matching_of(model, local_matching)
    prompts = load_prompts(class_prompts)
    if classes is not None:
        by_key = {normalise_name(c): c for c in prompts}
        unknown = [c for c in classes if normalise_name(c) not in by_key]
        if unknown:
            raise EvalDataError(f"classes {unknown} have no prompts; the prompts cover {list(prompts)}")
        prompts = {by_key[normalise_name(c)]: prompts[by_key[normalise_name(c)]] for c in classes}
    if not 0.0 <= local_weight <= 1.0:
        raise ValueError(f"local_weight must be in [0, 1], got {local_weight}")
    dev = model_device(model, device)
    data_names = label_names_of(data, label_names)
    transform = transform if transform is not None else eval_transform(model)
    scores = {m: [] for m in MODES}
    labels, index = [], []
    columns: Optional[list[int]] = None
    with evaluating(model):
        emb = encode_prompts(model, prompts, dev)
        c = len(emb.class_names)
        for batch in iter_batches(data, batch_size=batch_size, transform=transform, label_names=data_names,
                                  max_samples=max_samples, progress=progress, desc="zero-shot"):
            if "labels" in batch:
                lab = batch["labels"].float().cpu()
                if columns is None:
                    columns = _match_columns(emb.class_names, data_names, lab.shape[1])
                labels.append(lab[:, columns].numpy())
            elif require_labels:
                raise EvalDataError(
                    "zero-shot classification needs labels, but the dataset yields samples without 'labels' "
                    "(use a labelled reader, or the image-folder reader with one sub-folder per class)"
                )
            out = model.encode_image_local(batch["images"].to(dev), mask_ratio=0.0)
            image = l2_normalise(out["image_global"])
            sims = torch.einsum("bd,cpd->bcp", image, emb.global_)  # [B, C, 2]
            g = sims[..., 0] - sims[..., 1]
            patches = l2_normalise(out["patches"])
            sentences = emb.sentences.to(patches.dtype)
            if matching.mode == "ot":
                local = patch_sentence_ot_scores(patches, sentences, emb.sentence_mask, eps=matching.ot_eps,
                                                 n_iter=matching.ot_iters)
            else:
                _, local = patch_sentence_scores(patches, sentences, emb.sentence_mask, directions="t2i")
            local = local.view(-1, c, 2)
            loc = local[..., 0] - local[..., 1]
            scores["global"].append(g.float().cpu().numpy())
            scores["local"].append(loc.float().cpu().numpy())
            scores["combined"].append(((1 - local_weight) * g + local_weight * loc).float().cpu().numpy())
            index.append(batch["index"].cpu().numpy() if "index" in batch else np.full(g.shape[0], -1))
    return ZeroShotScores(
        class_names=emb.class_names,
        scores={m: np.concatenate(v) for m, v in scores.items()},
        labels=np.concatenate(labels) if labels else None,
        index=np.concatenate(index),
        local_matching=matching.mode,
    )


def scores_to_metrics(scores, labels, class_names: Sequence[str], *, skip_empty: bool = False, mode: str = "") -> dict:
    """Per-class and macro AUC / accuracy / F1 of ``scores [N, C]`` against ``labels [N, C]`` (NaN =
    unknown, excluded per class). A class with no positive or no negative labelled sample raises
    EvalDataError, or with ``skip_empty`` is reported as skipped and left out of the macro."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 2 or s.shape[1] != len(class_names):
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be [N, C={len(class_names)}]")
    classes: dict[str, dict] = {}
    for j, name in enumerate(class_names):
        known = np.isfinite(y[:, j])
        yj = y[known, j]
        n_pos = int((yj > 0.5).sum())
        n_neg = int(yj.size - n_pos)
        if n_pos == 0 or n_neg == 0:
            reason = (f"class {name!r} has {n_pos} positive and {n_neg} negative labelled samples in the "
                      f"evaluation data ({y.shape[0]} images); AUC needs both")
            if not skip_empty:
                raise EvalDataError(reason + " (use more data, or skip_empty=True to report it as skipped)")
            classes[name] = {"skipped": reason, "n": int(yj.size), "n_positive": n_pos}
            continue
        classes[name] = M.binary_report((yj > 0.5).astype(np.int64), s[known, j], threshold=0.0)
    scored = [v for v in classes.values() if "skipped" not in v]
    if not scored:
        raise EvalDataError("no class could be scored: " + "; ".join(v["skipped"] for v in classes.values()))
    result = {
        "mode": mode,
        "classes": classes,
        "macro": {k: float(np.mean([v[k] for v in scored])) for k in ("auc", "accuracy", "f1")},
        "chance": {k: float(np.mean([v["chance"][k] for v in scored])) for k in ("auc", "accuracy", "f1")},
        "n_images": int(y.shape[0]),
        "n_classes_scored": len(scored),
    }
    complete = np.isfinite(y).all(axis=1)
    if len(class_names) > 1 and complete.any() and np.all(y[complete].sum(axis=1) == 1):
        truth = y[complete].argmax(axis=1)
        pred = s[complete].argmax(axis=1)
        counts = np.bincount(truth, minlength=len(class_names))
        result["multiclass"] = {"accuracy": float((pred == truth).mean()), "chance": float(counts.max() / counts.sum()),
                                "n": int(complete.sum())}
    return result


def zero_shot_classify(
    model,
    data,
    class_prompts,
    *,
    mode: str = "combined",
    label_names: Optional[Sequence[str]] = None,
    local_weight: float = 0.5,
    batch_size: int = 32,
    device=None,
    max_samples: Optional[int] = None,
    skip_empty: bool = False,
    progress: bool = True,
    transform=None,
    classes: Optional[Sequence[str]] = None,
    local_matching: Optional[str] = None,
) -> dict:
    """Zero-shot metrics for ``mode`` in ``"global" | "local" | "combined" | "all"`` (see module doc)."""
    if mode not in MODES + ("all",):
        raise ValueError(f"mode must be one of {MODES + ('all',)}, got {mode!r}")
    zs = zero_shot_scores(model, data, class_prompts, label_names=label_names, local_weight=local_weight,
                          batch_size=batch_size, device=device, max_samples=max_samples, progress=progress,
                          transform=transform, classes=classes, local_matching=local_matching)
    def metrics(m):
        return {**scores_to_metrics(zs.scores[m], zs.labels, zs.class_names, skip_empty=skip_empty, mode=m),
                "local_matching": zs.local_matching}

    return {m: metrics(m) for m in MODES} if mode == "all" else metrics(mode)
