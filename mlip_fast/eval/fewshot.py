"""Few-shot classification: linear probe and full fine-tuning on 1% / 10% / 100% of the training labels.

API::

    few_shot_classify(model, train_data, test_data, *, valid_data=None, fractions=(0.01, 0.1, 1.0),
                      methods=("linear", "finetune"), seed=0, label_names=None, classes=None,
                      splits_dir=None, subset_sampler="nested", linear_steps=300, linear_lr=1e-2,
                      linear_weight_decay=1e-4, finetune_epochs=5, finetune_lr=1e-4, head_lr=1e-3,
                      batch_size=32, device=None, progress=True, transform=None) -> dict
    subset_indices(n, fraction, seed, sampler="nested") -> list[int]

Subsets: one seeded permutation of the training set; the fraction f takes its first
``max(1, round(f N))`` entries, so the subsets are nested (1% within 10% within 100%) and the same
seed always picks the same images. ``sampler="nested"`` draws the permutation with
``numpy.random.default_rng([seed, 0xF5])``; ``sampler="mgca"`` with ``RandomState(seed)``, which is
pandas' ``DataFrame.sample(frac=f, random_state=seed)`` over the training list in its order (MGCA's
subsets with seed 42, given MGCA's training list). With ``splits_dir`` each subset is written to
``splits_dir/fewshot_<pct>pct_seed<seed>.json`` (indices, sampler, plus sample names when the dataset
has them); an existing file is read instead, which is how a shipped split file reproduces a run.

Model selection on the validation set (``valid_data``; every choice is made there, never on test):
- linear probe: the frozen image tower's global feature (final-norm CLS, width C) of every image is
  extracted once, standardised with the subset's mean / std, and a linear layer is trained full-batch
  with AdamW on the masked binary cross-entropy (unknown labels, NaN, are ignored); the validation loss
  is computed every ``LINEAR_CHECK_EVERY`` steps and the head of the lowest one is kept;
- full fine-tune: a copy of the image tower plus a linear head trained end to end with AdamW
  (``finetune_lr`` for the tower, ``head_lr`` for the head) for ``finetune_epochs`` epochs; the epoch
  with the lowest validation loss is kept (MGCA keeps the checkpoint of the lowest ``val_loss``).
Without ``valid_data`` the last step / epoch is kept and ``selection`` says so.
Test metric: ROC AUC per class and macro over the classes with both outcomes in the test set.

Returned metrics::

    {"<method>": {"<pct>%": {"macro_auc", "auc": {class: auc}, "n_train", "n_train_positive": {...},
                             "split_file", "selection": {"by", "step" | "epoch", "valid_loss"}}},
     "classes", "n_test", "n_valid", "seed", "subset_sampler"}
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
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import (
    no_bar,
    collate_samples,
    eval_transform,
    evaluating,
    iter_batches,
    label_names_of,
    model_device,
)
from mlip_fast.eval.prompts import normalise_name

__all__ = ["few_shot_classify", "subset_indices", "split_indices", "linear_probe", "METHODS", "SUBSET_SAMPLERS",
           "LINEAR_CHECK_EVERY"]

METHODS = ("linear", "finetune")
SUBSET_SAMPLERS = ("nested", "mgca")
LINEAR_CHECK_EVERY = 10  # linear-probe steps between validation checks


def subset_indices(n: int, fraction: float, seed: int, sampler: str = "nested") -> list[int]:
    """The first ``max(1, round(fraction n))`` entries of a seeded permutation of ``range(n)``, sorted
    (``sampler`` picks the generator, see the module doc)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if sampler not in SUBSET_SAMPLERS:
        raise ValueError(f"sampler must be one of {SUBSET_SAMPLERS}, got {sampler!r}")
    if n < 1:
        raise EvalDataError("the training set is empty")
    if sampler == "mgca":
        order = np.random.RandomState(int(seed)).permutation(n)
    else:
        order = np.random.default_rng([int(seed), 0xF5]).permutation(n)
    k = max(1, int(round(fraction * n)))
    return sorted(int(i) for i in order[:k])


def _pct(fraction: float) -> str:
    return f"{fraction * 100:g}"


def _sample_names(data, indices: Sequence[int]) -> Optional[list[str]]:
    """File names of ``data[indices]`` when the dataset (possibly a Subset) lists them, else None."""
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


def split_indices(data, n: int, fraction: float, seed: int, splits_dir, prefix: str = "fewshot",
                  sampler: str = "nested") -> tuple[list[int], Optional[str]]:
    """The training subset for ``fraction``: read from ``splits_dir/<prefix>_<pct>pct_seed<seed>.json`` when
    that file exists, else drawn by ``subset_indices`` and written there. Returns (indices, file or None)."""
    if splits_dir is None:
        return subset_indices(n, fraction, seed, sampler), None
    path = Path(splits_dir) / f"{prefix}_{_pct(fraction)}pct_seed{seed}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        indices = [int(i) for i in record["indices"]]
        if record.get("n_train_total") != n or (indices and max(indices) >= n):
            raise EvalDataError(f"split file {path} was written for a training set of {record.get('n_train_total')} "
                                f"samples, this one has {n}; remove it or use the matching data")
        if record.get("sampler", "nested") != sampler:
            raise EvalDataError(f"split file {path} was drawn with the {record.get('sampler', 'nested')!r} sampler, "
                                f"this run asks for {sampler!r}; remove it or use the same sampler")
        return indices, str(path)
    indices = subset_indices(n, fraction, seed, sampler)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"fraction": fraction, "seed": seed, "sampler": sampler, "n_train_total": n, "indices": indices}
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
                 weight_decay: float = 1e-4, seed: int = 0,
                 valid: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> tuple:
    """Train a linear classifier on standardised features ``[N, C]`` against labels ``[N, L]``.

    With ``valid = (features [M, C], labels [M, L])`` the masked BCE on it is computed every
    ``LINEAR_CHECK_EVERY`` steps (and after the last) and the head with the lowest one is kept.
    Returns ``(predict, selection)``: ``predict(x) -> logits [N, L]`` and
    ``{"by": "valid_loss" | "last", "step", "valid_loss"}``."""
    gen = torch.Generator().manual_seed(seed)
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True, unbiased=False).clamp_min(1e-6) if train_x.shape[0] > 1 else torch.ones_like(mean)
    head = nn.Linear(train_x.shape[1], train_y.shape[1])
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    x = (train_x - mean) / std
    vx = (valid[0] - mean) / std if valid is not None else None
    best = {"by": "last", "step": steps, "valid_loss": None}
    best_state = None
    with torch.enable_grad():
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            _masked_bce(head(x), train_y).backward()
            opt.step()
            if vx is not None and (step % LINEAR_CHECK_EVERY == 0 or step == steps):
                with torch.no_grad():
                    loss = float(_masked_bce(head(vx), valid[1]))
                if best["valid_loss"] is None or loss < best["valid_loss"]:
                    best = {"by": "valid_loss", "step": step, "valid_loss": loss}
                    best_state = copy.deepcopy(head.state_dict())
    if best_state is not None:
        head.load_state_dict(best_state)

    @torch.no_grad()
    def predict(features: torch.Tensor) -> torch.Tensor:
        return head((features - mean) / std)

    return predict, best


class _Classifier(nn.Module):
    def __init__(self, visual: nn.Module, num_labels: int):
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.width, num_labels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(images, 0.0).global_features)


@torch.no_grad()
def _scores(clf: nn.Module, data, *, transform, batch_size, device, progress, desc, label_names) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, L]`` of ``clf`` on ``data`` and its labels ``[N, L_data]`` (NaN rows when unlabelled)."""
    outs, labels = [], []
    for batch in iter_batches(data, batch_size=batch_size, transform=transform, label_names=label_names,
                              progress=progress, desc=desc):
        logits = clf(batch["images"].to(device)).float().cpu()
        outs.append(logits)
        labels.append(batch["labels"].float().cpu() if "labels" in batch else torch.full_like(logits, float("nan")))
    return torch.cat(outs), torch.cat(labels)


def _finetune(model, train_data, indices, columns, *, epochs, lr, head_lr, batch_size, device, transform,
              label_names, seed, progress, valid=None) -> tuple[_Classifier, torch.Tensor, dict]:
    """Fine-tune a copy of the image tower + a linear head; returns it (at the epoch of the lowest validation
    loss when ``valid = (data, columns, label_names)`` is given, else the last), the subset's labels
    ``[n, L]`` and the selection record."""
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
    seen = []
    best = {"by": "last", "epoch": epochs, "valid_loss": None}
    best_state = None
    with tqdm(total=epochs * len(loader), desc="fine-tune", disable=no_bar(progress), leave=False) as bar:
        for epoch in range(epochs):
            clf.train()
            with torch.enable_grad():
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
            if valid is not None:
                clf.eval()
                valid_data, valid_cols, valid_names = valid
                logits, vy = _scores(clf, valid_data, transform=transform, batch_size=batch_size, device=device,
                                     progress=False, desc="fine-tune valid", label_names=valid_names)
                vloss = float(_masked_bce(logits, vy[:, valid_cols]))
                if best["valid_loss"] is None or vloss < best["valid_loss"]:
                    best = {"by": "valid_loss", "epoch": epoch + 1, "valid_loss": vloss}
                    best_state = copy.deepcopy(clf.state_dict())
    if best_state is not None:
        clf.load_state_dict(best_state)
    return clf.eval(), torch.cat(seen), best


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
    valid_data=None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    label_names: Optional[Sequence[str]] = None,
    classes: Optional[Sequence[str]] = None,
    splits_dir: Optional[str | os.PathLike] = None,
    subset_sampler: str = "nested",
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
    """Linear-probe and fine-tune AUC for each label fraction, choices made on ``valid_data`` (see module doc)."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(methods)}")
    if subset_sampler not in SUBSET_SAMPLERS:
        raise ValueError(f"subset_sampler must be one of {SUBSET_SAMPLERS}, got {subset_sampler!r}")
    dev = model_device(model, device)
    transform = transform if transform is not None else eval_transform(model)
    train_names = label_names_of(train_data, label_names)
    test_names = label_names_of(test_data, label_names)
    n_train = len(train_data)
    if n_train == 0 or len(test_data) == 0:
        raise EvalDataError(f"few-shot classification needs training and test samples, got {n_train} and {len(test_data)}")
    if valid_data is not None and len(valid_data) == 0:
        raise EvalDataError("the validation set is empty; pass valid_data=None to keep the last step / epoch")
    test_x, test_y = _features(model, test_data, transform=transform, batch_size=batch_size, device=dev,
                               progress=progress, desc="test features", label_names=test_names)
    class_names, test_cols = _columns(classes, test_names, test_y.shape[1])
    test_y = test_y[:, test_cols].numpy()
    valid = None
    if valid_data is not None:
        valid_names = label_names_of(valid_data, label_names)
        valid_x, valid_y = _features(model, valid_data, transform=transform, batch_size=batch_size, device=dev,
                                     progress=progress, desc="valid features", label_names=valid_names)
        _, valid_cols = _columns(classes, valid_names, valid_y.shape[1])
        valid = (valid_x, valid_y[:, valid_cols], valid_cols, valid_names)
    train_x = train_y = None
    if "linear" in methods:
        train_x, train_y = _features(model, train_data, transform=transform, batch_size=batch_size, device=dev,
                                     progress=progress, desc="train features", label_names=train_names)
    result: dict = {"classes": class_names, "n_test": int(test_y.shape[0]), "n_train_total": n_train,
                    "n_valid": len(valid_data) if valid_data is not None else 0, "seed": seed,
                    "subset_sampler": subset_sampler}
    for method in methods:
        result[method] = {}
    for fraction in fractions:
        indices, split_file = split_indices(train_data, n_train, fraction, seed, splits_dir, sampler=subset_sampler)
        key = f"{_pct(fraction)}%"
        for method in methods:
            if method == "linear":
                _, cols = _columns(classes, train_names, train_y.shape[1])
                sub_y = train_y[indices][:, cols]
                predict, selection = linear_probe(train_x[indices], sub_y, steps=linear_steps, lr=linear_lr,
                                                  weight_decay=linear_weight_decay, seed=seed,
                                                  valid=None if valid is None else valid[:2])
                scores = predict(test_x).numpy()
            else:
                first = collate_samples([train_data[indices[0]]], transform, train_names)
                if "labels" not in first:
                    raise EvalDataError("few-shot fine-tuning needs labels, but the training data yields samples without 'labels'")
                _, cols = _columns(classes, train_names, first["labels"].shape[1])
                clf, sub_y, selection = _finetune(
                    model, train_data, indices, cols, epochs=finetune_epochs, lr=finetune_lr, head_lr=head_lr,
                    batch_size=batch_size, device=dev, transform=transform, label_names=train_names, seed=seed,
                    progress=progress, valid=None if valid is None else (valid_data, valid[2], valid[3]))
                scores = _scores(clf, test_data, transform=transform, batch_size=batch_size, device=dev,
                                 progress=progress, desc="fine-tune test", label_names=test_names)[0].numpy()
            table = _auc_table(scores, test_y, class_names)
            positives = {c: int(torch.nan_to_num(sub_y[:, j], nan=0.0).gt(0.5).sum()) for j, c in enumerate(class_names)}
            result[method][key] = {**table, "n_train": len(indices), "n_train_positive": positives,
                                   "split_file": split_file, "fraction": fraction, "selection": selection}
    return result
