"""Few-shot classification: linear probe and full fine-tuning on 1% / 10% / 100% of the training labels.

API::

    few_shot_classify(model, train_data, test_data, *, fractions=(0.01, 0.1, 1.0),
                      methods=("linear", "finetune"), seed=0, label_names=None, classes=None,
                      splits_dir=None, linear_steps=300, linear_lr=1e-2, linear_weight_decay=1e-4,
                      finetune_epochs=5, finetune_lr=1e-4, head_lr=1e-3, batch_size=32, device=None,
                      progress=True, transform=None) -> dict
    subset_indices(n, fraction, seed) -> list[int]

Subsets: one seeded permutation of the training set; the fraction f takes its first
``max(1, round(f N))`` entries, so the subsets are nested (1% within 10% within 100%) and the same
seed always picks the same images. With ``splits_dir`` each subset is written to
``splits_dir/fewshot_<pct>pct_seed<seed>.json`` (indices, plus sample names when the dataset has them);
an existing file is read instead, which is how a shipped split file reproduces a run.

- linear probe: the frozen image tower's global feature (final-norm CLS, width C) of every image is
  extracted once, standardised with the subset's mean / std, and a linear layer is trained full-batch
  with AdamW on the masked binary cross-entropy (unknown labels, NaN, are ignored);
- full fine-tune: a copy of the image tower plus a linear head trained end to end with AdamW
  (``finetune_lr`` for the tower, ``head_lr`` for the head) for ``finetune_epochs`` epochs.
Test metric: ROC AUC per class and macro over the classes with both outcomes in the test set.

Returned metrics::

    {"<method>": {"<pct>%": {"macro_auc", "auc": {class: auc}, "n_train", "n_train_positive": {...},
                             "split_file"}}, "classes", "n_test", "seed"}
"""
from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import (
    EvalDataError,
    collate_samples,
    eval_transform,
    evaluating,
    iter_batches,
    label_names_of,
    model_device,
)
from mlip_fast.eval.prompts import normalise_name

__all__ = ["few_shot_classify", "subset_indices", "split_indices", "linear_probe", "METHODS"]

METHODS = ("linear", "finetune")


def subset_indices(n: int, fraction: float, seed: int) -> list[int]:
    """The first ``max(1, round(fraction n))`` entries of a seeded permutation of ``range(n)``, sorted."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n < 1:
        raise EvalDataError("the training set is empty")
    order = np.random.default_rng([int(seed), 0xF5]).permutation(n)
    k = max(1, int(round(fraction * n)))
    return sorted(int(i) for i in order[:k])


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


def _sample_names(data, indices: Sequence[int]) -> Optional[list[str]]:
    """File names of ``data[indices]`` when the dataset (possibly a Subset) lists them, else None."""
    from torch.utils.data import Subset

    base = data
    while isinstance(base, Subset):
        indices = [int(base.indices[i]) for i in indices]
        base = base.dataset
    for attr in ("pairs", "rows"):
        items = getattr(base, attr, None)
        if items is not None:
            out = []
            for i in indices:
                item = items[i]
                out.append(str(item[0].name) if isinstance(item, tuple) else str(item.get("image_path", item.get("filename", i))))
            return out
    return None


def split_indices(data, n: int, fraction: float, seed: int, splits_dir, prefix: str = "fewshot") -> tuple[list[int], Optional[str]]:
    """The training subset for ``fraction``: read from ``splits_dir/<prefix>_<pct>pct_seed<seed>.json`` when
    that file exists, else drawn by ``subset_indices`` and written there. Returns (indices, file or None)."""
    if splits_dir is None:
        return subset_indices(n, fraction, seed), None
    path = Path(splits_dir) / f"{prefix}_{_pct(fraction)}pct_seed{seed}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        indices = [int(i) for i in record["indices"]]
        if record.get("n_train_total") != n or (indices and max(indices) >= n):
            raise EvalDataError(f"split file {path} was written for a training set of {record.get('n_train_total')} "
                                f"samples, this one has {n}; remove it or use the matching data")
        return indices, str(path)
    indices = subset_indices(n, fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"fraction": fraction, "seed": seed, "n_train_total": n, "indices": indices}
    names = _sample_names(data, indices)
    if names is not None:
        record["names"] = names
    path.write_text(json.dumps(record, indent=1) + "\n")
    return indices, str(path)


def _columns(class_names: Optional[Sequence[str]], data_names: Optional[Sequence[str]], n_cols: int) -> tuple[list[str], list[int]]:
    names = list(data_names) if data_names is not None else [f"label_{j}" for j in range(n_cols)]
    if len(names) != n_cols:
        raise EvalDataError(f"the dataset names {len(names)} labels but its samples have {n_cols} label values")
    if class_names is None:
        return names, list(range(n_cols))
    lookup = {normalise_name(n): j for j, n in enumerate(names)}
    missing = [c for c in class_names if normalise_name(c) not in lookup]
    if missing:
        raise EvalDataError(f"classes {missing} are not labels of the dataset; its labels are {names}")
    return [names[lookup[normalise_name(c)]] for c in class_names], [lookup[normalise_name(c)] for c in class_names]


@torch.no_grad()
def _features(model, data, *, transform, batch_size, device, progress, desc, label_names) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels = [], []
    with evaluating(model):
        for batch in iter_batches(data, batch_size=batch_size, transform=transform, label_names=label_names,
                                  progress=progress, desc=desc):
            if "labels" not in batch:
                raise EvalDataError(f"few-shot classification needs labels, but the {desc} data yields samples "
                                    "without 'labels'")
            out = model.visual(batch["images"].to(device), 0.0)
            feats.append(out.global_features.float().cpu())
            labels.append(batch["labels"].float().cpu())
    return torch.cat(feats), torch.cat(labels)


def _masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    known = torch.isfinite(labels)
    if not known.any():
        return logits.sum() * 0.0
    target = torch.where(known, labels, torch.zeros_like(labels)).clamp(0, 1)
    loss = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return loss[known].mean()


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, *, steps: int = 300, lr: float = 1e-2,
                 weight_decay: float = 1e-4, seed: int = 0):
    """Train a linear classifier on standardised features; returns ``predict(x) -> logits [N, L]``."""
    gen = torch.Generator().manual_seed(seed)
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6) if train_x.shape[0] > 1 else torch.ones_like(mean)
    head = nn.Linear(train_x.shape[1], train_y.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = (train_x - mean) / std
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            _masked_bce(head(x), train_y).backward()
            opt.step()

    @torch.no_grad()
    def predict(features: torch.Tensor) -> torch.Tensor:
        return head((features - mean) / std)

    return predict


class _Classifier(nn.Module):
    def __init__(self, visual: nn.Module, num_labels: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.width, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images, 0.0).global_features)


def _finetune(model, train_data, indices, columns, *, epochs, lr, head_lr, batch_size, device, transform,
              label_names, seed, progress) -> tuple[_Classifier, torch.Tensor]:
    """Fine-tune a copy of the image tower + a linear head; returns it with the subset's labels [n, L]."""
    from torch.utils.data import DataLoader, Subset
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    clf = _Classifier(copy.deepcopy(model.visual), len(columns)).to(device)
    for p in clf.visual.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([
        {"params": clf.visual.parameters(), "lr": lr},
        {"params": clf.head.parameters(), "lr": head_lr},
    ], weight_decay=0.01)
    loader = DataLoader(Subset(train_data, indices), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed),
                        collate_fn=functools.partial(collate_samples, transform=transform, label_names=label_names))
    col = torch.tensor(columns)
    clf.train()
    seen = []
    with torch.enable_grad(), tqdm(total=epochs * len(loader), desc="fine-tune", disable=not progress, leave=False) as bar:
        for epoch in range(epochs):
            for batch in loader:
                if "labels" not in batch:
                    raise EvalDataError("few-shot fine-tuning needs labels, but the training data yields samples "
                                        "without 'labels'")
                labels = batch["labels"][:, col]
                if epoch == 0:
                    seen.append(labels)
                opt.zero_grad(set_to_none=True)
                loss = _masked_bce(clf(batch["images"].to(device)), labels.to(device))
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update(1)
    return clf.eval(), torch.cat(seen)


def _auc_table(scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict:
    auc, skipped = {}, {}
    for j, name in enumerate(class_names):
        known = np.isfinite(labels[:, j])
        y = labels[known, j] > 0.5
        if y.all() or not y.any():
            skipped[name] = f"{int(y.sum())} positive and {int((~y).sum())} negative test samples"
            continue
        auc[name] = M.roc_auc(y, scores[known, j])
    if not auc:
        raise EvalDataError(f"no class has both outcomes in the test set: {skipped}")
    return {"macro_auc": float(np.mean(list(auc.values()))), "auc": auc, "skipped": skipped}


def few_shot_classify(
    model,
    train_data,
    test_data,
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    label_names: Optional[Sequence[str]] = None,
    classes: Optional[Sequence[str]] = None,
    splits_dir: Optional[str | os.PathLike] = None,
    linear_steps: int = 300,
    linear_lr: float = 1e-2,
    linear_weight_decay: float = 1e-4,
    finetune_epochs: int = 5,
    finetune_lr: float = 1e-4,
    head_lr: float = 1e-3,
    batch_size: int = 32,
    device=None,
    progress: bool = True,
    transform=None,
) -> dict:
    """Linear-probe and fine-tune AUC for each label fraction (see module doc)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    dev = model_device(model, device)
    transform = transform if transform is not None else eval_transform(model)
    train_names = label_names_of(train_data, label_names)
    test_names = label_names_of(test_data, label_names)
    n_train = len(train_data)
    if n_train == 0 or len(test_data) == 0:
        raise EvalDataError(f"few-shot classification needs training and test samples, got {n_train} and {len(test_data)}")
    test_x, test_y = _features(model, test_data, transform=transform, batch_size=batch_size, device=dev,
                               progress=progress, desc="test features", label_names=test_names)
    class_names, test_cols = _columns(classes, test_names, test_y.shape[1])
    test_y = test_y[:, test_cols].numpy()
    train_x = train_y = None
    if "linear" in methods:
        train_x, train_y = _features(model, train_data, transform=transform, batch_size=batch_size, device=dev,
                                     progress=progress, desc="train features", label_names=train_names)
    result: dict = {"classes": class_names, "n_test": int(test_y.shape[0]), "n_train_total": n_train, "seed": seed}
    for method in methods:
        result[method] = {}
    for fraction in fractions:
        indices, split_file = split_indices(train_data, n_train, fraction, seed, splits_dir)
        key = f"{_pct(fraction)}%"
        for method in methods:
            if method == "linear":
                _, cols = _columns(classes, train_names, train_y.shape[1])
                sub_y = train_y[indices][:, cols]
                predict = linear_probe(train_x[indices], sub_y, steps=linear_steps, lr=linear_lr,
                                       weight_decay=linear_weight_decay, seed=seed)
                scores = predict(test_x).numpy()
            else:
                first = collate_samples([train_data[indices[0]]], transform, train_names)
                if "labels" not in first:
                    raise EvalDataError("few-shot fine-tuning needs labels, but the training data yields samples without 'labels'")
                _, cols = _columns(classes, train_names, first["labels"].shape[1])
                clf, sub_y = _finetune(model, train_data, indices, cols, epochs=finetune_epochs, lr=finetune_lr,
                                head_lr=head_lr, batch_size=batch_size, device=dev, transform=transform,
                                label_names=train_names, seed=seed, progress=progress)
                outs = []
                with torch.no_grad():
                    for batch in iter_batches(test_data, batch_size=batch_size, transform=transform,
                                              label_names=test_names, progress=progress, desc="fine-tune test"):
                        outs.append(clf(batch["images"].to(dev)).float().cpu())
                scores = torch.cat(outs).numpy()
            table = _auc_table(scores, test_y, class_names)
            positives = {c: int(torch.nan_to_num(sub_y[:, j], nan=0.0).gt(0.5).sum()) for j, c in enumerate(class_names)}
            result[method][key] = {**table, "n_train": len(indices), "n_train_positive": positives,
                                   "split_file": split_file, "fraction": fraction}
    return result
