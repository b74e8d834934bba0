"""Few-shot segmentation: the pre-trained ViT with a light upsampling decoder, trained on 1% / 10% / 100%
of the training masks; Dice on the test set.

API::

    few_shot_segment(model, train_data, test_data, *, valid_data=None, fractions=(0.01, 0.1, 1.0), seed=0,
                     freeze_encoder=True, epochs=10, lr=1e-3, encoder_lr=1e-5, batch_size=16,
                     splits_dir=None, device=None, progress=True, transform=None, examples=0) -> dict
    SegmentationDecoder(width, grid_size, patch_size, channels=(128, 64, 32, 16))

``train_data`` / ``test_data`` yield samples with ``image`` and ``mask`` (binary ``[H, W]`` in the raw
image's frame; it is put in the model's input frame with the image's resize + pad). Subsets and split
files as in ``mlip_fast.eval.fewshot`` (``segmentation_<pct>pct_seed<seed>.json``).

Model: patch tokens of ``model.visual.forward_features`` (no masking) reshaped to ``[B, C, g, g]`` ->
1x1 conv to ``channels[0]`` -> log2(patch_size) stages of (2x bilinear upsampling, 3x3 conv, BatchNorm,
ReLU) -> 1x1 conv to one logit per pixel (``[B, 1, S, S]``). The encoder is frozen by default (the
decoder learns from the pre-trained features alone; ``freeze_encoder=False`` fine-tunes it with
``encoder_lr``). Loss: binary cross-entropy + soft Dice. Prediction: sigmoid >= 0.5 (as GLoRIA / MGCA).
With ``valid_data`` the loss on it is computed after every epoch and the epoch with the lowest one is
kept (MGCA keeps the checkpoint of the lowest ``val_loss``); without it, the last epoch.
The training set is used as given: GLoRIA / MGCA's SIIM protocol trains on the positive images plus as
many negatives, which ``mlip_fast.eval.benchmarks`` builds (``balanced_negatives``).

Dice per test image (``mlip_fast.eval.metrics.dice``; an empty prediction of an empty mask scores 1),
averaged. Returned metrics::

    {"<pct>%": {"dice", "dice_std", "iou", "n_train", "split_file", "final_loss",
                "selection": {"by", "epoch", "valid_loss"}}, "n_test", "n_valid", "seed", "freeze_encoder",
     "chance": {"dice_all_foreground"}}

``chance.dice_all_foreground`` is the Dice of predicting every pixel as foreground (a trivial baseline).
With ``examples=k`` the result also holds ``"examples"`` (image, mask, prediction of the largest
fraction for k test images) for overlay plots; drop it before writing JSON.
"""
from __future__ import annotations

import copy
import functools
import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from mlip_fast.data.readers import EvalDataError
from mlip_fast.eval import metrics as M
from mlip_fast.eval.common import collate_samples, eval_transform, model_device, no_bar
from mlip_fast.eval.fewshot import _pct, split_indices
from mlip_fast.eval.localisation import mask_to_input_frame

__all__ = ["few_shot_segment", "SegmentationDecoder", "SegmentationModel"]


class SegmentationDecoder(nn.Module):
    """Patch tokens ``[B, P, C]`` (P = g^2, row-major) -> per-pixel logits ``[B, 1, g * patch, g * patch]``."""

    def __init__(self, width: int, grid_size: int, patch_size: int, channels: Sequence[int] = (128, 64, 32, 16)):
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2**stages != patch_size:
            raise ValueError(f"the decoder upsamples by powers of 2; patch_size {patch_size} is not one")
        chans = [channels[min(i, len(channels) - 1)] for i in range(stages + 1)]
        self.grid_size = grid_size
        self.stem = nn.Conv2d(width, chans[0], 1)
        self.ups = nn.ModuleList(
            nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                          nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True))
            for i in range(stages)
        )
        self.out = nn.Conv2d(chans[-1], 1, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, p, c = tokens.shape
        g = self.grid_size
        if p != g * g:
            raise ValueError(f"expected {g * g} patch tokens, got {p}")
        x = self.stem(tokens.transpose(1, 2).reshape(b, c, g, g))
        for up in self.ups:
            x = up(x)
        return self.out(x)


class SegmentationModel(nn.Module):
    """Image tower + decoder: images ``[B, C_in, S, S]`` -> logits ``[B, 1, S, S]``."""

    def __init__(self, visual: nn.Module, freeze_encoder: bool = True):
        super().__init__()
        self.visual = visual
        self.freeze_encoder = freeze_encoder
        self.decoder = SegmentationDecoder(visual.width, visual.grid_size, visual.patch_size)
        for p in self.visual.parameters():
            p.requires_grad_(not freeze_encoder)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                tokens = self.visual.forward_features(images)
        else:
            tokens = self.visual.forward_features(images)
        return self.decoder(tokens[:, 1:].float())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.visual.eval()
        return self


def _collate(samples, transform, size):
    missing = [i for i, s in enumerate(samples) if s.get("mask") is None]
    if missing:
        raise EvalDataError("segmentation needs a 'mask' for every sample; the dataset yields samples without one")
    batch = collate_samples(samples, transform)
    batch["targets"] = torch.from_numpy(np.stack([mask_to_input_frame(s["mask"], size) for s in samples])).float()
    return batch


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = logits[:, 0]
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = logits.sigmoid()
    inter = (prob * target).sum((1, 2))
    soft_dice = (2 * inter + 1) / (prob.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + (1 - soft_dice).mean()


def _encode(encoder: nn.Module, data, indices, collate, batch_size: int, device, progress: bool, desc: str):
    """Frozen patch tokens ``[N, P, C]`` (CPU float32), targets ``[N, S, S]`` and input images of ``data[indices]``."""
    loader = DataLoader(Subset(data, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    tokens, targets, images = [], [], []
    with torch.no_grad(), tqdm(total=len(indices), desc=desc, disable=no_bar(progress), leave=False) as bar:
        for batch in loader:
            tokens.append(encoder.forward_features(batch["images"].to(device))[:, 1:].float().cpu())
            targets.append(batch["targets"])
            images.append(batch["images"][:, 0])
            bar.update(batch["images"].shape[0])
    return torch.cat(tokens), torch.cat(targets), torch.cat(images)


def few_shot_segment(
    model,
    train_data,
    test_data,
    *,
    valid_data=None,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int = 0,
    freeze_encoder: bool = True,
    epochs: int = 10,
    lr: float = 1e-3,
    encoder_lr: float = 1e-5,
    batch_size: int = 16,
    splits_dir: Optional[str | os.PathLike] = None,
    device=None,
    progress: bool = True,
    transform=None,
    examples: int = 0,
    cache_limit_gb: float = 2.0,
) -> dict:
    """Train a decoder per label fraction and report test Dice (see module doc).

    With a frozen encoder the patch tokens of every needed image are computed once and reused by all
    fractions and epochs when they fit in ``cache_limit_gb``; otherwise images are encoded per batch.
    """
    dev = model_device(model, device)
    transform = transform if transform is not None else eval_transform(model)
    size = model.config.vision.image_size
    n_train, n_test = len(train_data), len(test_data)
    n_valid = len(valid_data) if valid_data is not None else 0
    if n_train == 0 or n_test == 0:
        raise EvalDataError(f"segmentation needs training and test samples, got {n_train} and {n_test}")
    if valid_data is not None and n_valid == 0:
        raise EvalDataError("the validation set is empty; pass valid_data=None to keep the last epoch")
    collate = functools.partial(_collate, transform=transform, size=size)
    splits = {f: split_indices(train_data, n_train, f, seed, splits_dir, "segmentation") for f in fractions}
    needed = sorted({i for indices, _ in splits.values() for i in indices})
    visual = model.visual
    token_bytes = (len(needed) + n_test + n_valid) * visual.num_patches * visual.width * 4
    cache = freeze_encoder and token_bytes <= cache_limit_gb * 2**30
    result: dict = {"n_test": n_test, "n_valid": n_valid, "n_train_total": n_train, "seed": seed,
                    "freeze_encoder": freeze_encoder, "cached_features": cache}
    if cache:
        encoder = copy.deepcopy(visual).to(dev).eval()
        train_tok, train_tgt, _ = _encode(encoder, train_data, needed, collate, batch_size, dev, progress, "train features")
        row_of = {idx: r for r, idx in enumerate(needed)}
        test_tok, test_tgt, test_img = _encode(encoder, test_data, range(n_test), collate, batch_size, dev, progress,
                                               "test features")
        if valid_data is not None:
            valid_tok, valid_tgt, _ = _encode(encoder, valid_data, range(n_valid), collate, batch_size, dev, progress,
                                              "valid features")
        del encoder
    kept: list[dict] = []
    for fi, fraction in enumerate(fractions):
        indices, split_file = splits[fraction]
        key = f"{_pct(fraction)}%"
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        if cache:  # the decoder alone, fed the cached tokens; the caller's model is never touched
            seg = decoder = SegmentationDecoder(visual.width, visual.grid_size, visual.patch_size).to(dev)
        else:
            seg = SegmentationModel(copy.deepcopy(visual), freeze_encoder=freeze_encoder).to(dev)
            decoder = seg.decoder
        groups = [{"params": decoder.parameters(), "lr": lr}]
        if not freeze_encoder:
            groups.append({"params": seg.visual.parameters(), "lr": encoder_lr})
        opt = torch.optim.AdamW(groups, weight_decay=1e-4)
        if cache:
            rows = torch.tensor([row_of[i] for i in indices])
            n_batches = max(1, len(rows) // batch_size) if len(rows) > batch_size else 1

            def train_batches():
                order = rows[torch.randperm(len(rows), generator=gen)]
                for b in range(n_batches):
                    sel = order[b * batch_size:(b + 1) * batch_size]
                    yield train_tok[sel].to(dev), train_tgt[sel].to(dev)
        else:
            loader = DataLoader(Subset(train_data, indices), batch_size=batch_size, shuffle=True, collate_fn=collate,
                                generator=gen, drop_last=len(indices) > batch_size)
            n_batches = len(loader)

            def train_batches():
                for batch in loader:
                    yield batch["images"].to(dev), batch["targets"].to(dev)
        if valid_data is not None and cache:
            def valid_batches():
                for k in range(0, n_valid, batch_size):
                    yield valid_tok[k:k + batch_size].to(dev), valid_tgt[k:k + batch_size].to(dev)
        elif valid_data is not None:
            def valid_batches():
                for b in DataLoader(valid_data, batch_size=batch_size, shuffle=False, collate_fn=collate):
                    yield b["images"].to(dev), b["targets"].to(dev)
        loss = torch.tensor(float("nan"))
        selection = {"by": "last", "epoch": epochs, "valid_loss": None}
        best_state = None
        with tqdm(total=epochs * n_batches, desc=f"segmentation {key}", disable=no_bar(progress), leave=False) as bar:
            for epoch in range(epochs):
                seg.train()
                with torch.enable_grad():
                    for inputs, targets in train_batches():
                        opt.zero_grad(set_to_none=True)
                        if inputs.shape[0] == 1:
                            decoder.eval()  # BatchNorm cannot normalise a single image
                        loss = _loss(seg(inputs), targets)
                        loss.backward()
                        opt.step()
                        seg.train()
                        bar.set_postfix(loss=f"{loss.item():.3f}")
                        bar.update(1)
                if valid_data is not None:
                    seg.eval()
                    with torch.no_grad():
                        total = sum(float(_loss(seg(x), t)) * x.shape[0] for x, t in valid_batches())
                    vloss = total / n_valid
                    if selection["valid_loss"] is None or vloss < selection["valid_loss"]:
                        selection = {"by": "valid_loss", "epoch": epoch + 1, "valid_loss": vloss}
                        best_state = copy.deepcopy(seg.state_dict())
        if best_state is not None:
            seg.load_state_dict(best_state)
        seg.eval()
        if cache:
            test_batches = ((test_tok[k:k + batch_size].to(dev), test_tgt[k:k + batch_size], test_img[k:k + batch_size])
                            for k in range(0, n_test, batch_size))
        else:
            test_batches = ((b["images"].to(dev), b["targets"], b["images"][:, 0])
                            for b in DataLoader(test_data, batch_size=batch_size, shuffle=False, collate_fn=collate))
        dices, ious, all_fg = [], [], []
        with torch.no_grad():
            for inputs, targets, images in test_batches:
                pred = (seg(inputs)[:, 0].sigmoid() >= 0.5).cpu().numpy()
                target = targets.numpy() >= 0.5
                dices.append(np.atleast_1d(M.dice(pred, target)))
                ious.append(np.atleast_1d(M.iou(pred, target)))
                all_fg.append(np.atleast_1d(M.dice(np.ones_like(target), target)))
                if fi == len(fractions) - 1 and len(kept) < examples:
                    for k in range(min(examples - len(kept), pred.shape[0])):
                        kept.append({"image": images[k].float().cpu().numpy(), "mask": target[k], "prediction": pred[k]})
        d = np.concatenate(dices)
        result[key] = {"dice": float(d.mean()), "dice_std": float(d.std()), "iou": float(np.concatenate(ious).mean()),
                       "n_train": len(indices), "split_file": split_file, "fraction": fraction,
                       "final_loss": float(loss.item()), "selection": selection}
        result["chance"] = {"dice_all_foreground": float(np.concatenate(all_fg).mean())}
    if examples:
        result["examples"] = kept
    return result
