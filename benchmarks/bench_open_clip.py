"""One training step of open_clip against ours on the same work, timed in one process.

The rival a user would train instead is open_clip (package ``open-clip-torch``). Its model here is a custom
config of mlip-tiny's size: ViT at 64 px with 8 px patches, width 128, 4 layers, 4 heads; a text transformer of
width 128, 2 layers, 4 heads over the same token ids (its context length = the batch's padded length T, our
vocabulary); joint width 64. Every provider trains on the same batch of 64 synthetic image-report pairs, in fp32,
with the same thread count and a plain ``torch.optim.AdamW`` (betas 0.9 / 0.95, weight decay 0.05, lr 1e-4):

- ``open_clip``: ``open_clip.CLIP`` + ``open_clip.ClipLoss`` (3-channel images: its ViT's input);
- ``ours_clip``: mlip-tiny in CLIP mode, mask ratio 0 and only the global contrastive loss (``lambda_local=0``,
  ``lambda_sie=0``);
- ``ours_mlip``: mlip-tiny as the default run trains it (the preset's mask ratio, patch-sentence weight,
  integrity weight and text dropout, and its patch-sentence matching: optimal transport since 2026-12-06);
- ``ours_mlip_max``: the same step with the method's max matching (what OT costs on top: ``ours_mlip / ours_mlip_max``);
- ``ours_mlip_deepspeed``: the default run's step (``ours_mlip``) through the DeepSpeed engine of the default run
  (``ds.json``: ZeRO-2, fp32, gradient clipping, the schedule), as the training loop drives it.

Each round times one step of every provider in turn (after warm-up steps), so a change of machine speed hits all
of them; the ratios are taken per round and their medians reported (ours / open_clip: below 1 is faster). The
DeepSpeed row says what the engine costs on top of the plain step. ``os.getloadavg()`` is recorded before and
after: the machine is shared.

open_clip imports torchvision, whose wheels on the package index need the CUDA build of torch (ENVIRONMENT.md), so
it runs in an environment of its own, outside CI and git::

    python3.11 -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 open-clip-torch
    /tmp/ocvenv/bin/pip install transformers==5.24.0 deepspeed==0.19.8 scikit-learn==1.9.1 pillow matplotlib tqdm \
        safetensors pytest pytest-benchmark     # no triton pin: torch 2.14.1 brings its own (a 3.9 pin downgrades torch)
    PYTHONPATH=. /tmp/ocvenv/bin/python benchmarks/bench_open_clip.py      # writes results/open_clip_step_cpu.json

Under pytest (CI) the comparison is skipped with the reason when open_clip is not importable; our three steps
are still checked to run.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if __name__ == "__main__":  # as a script: the repository importable, as under pytest
    sys.path.insert(0, str(REPO))

from benchmarks import harness  # noqa: E402

BATCH, IMAGE_SIZE = 64, 64
LR, BETAS, WD = 1e-4, (0.9, 0.95), 0.05
PROVIDERS = ("open_clip", "ours_clip", "ours_mlip", "ours_mlip_max", "ours_mlip_deepspeed")
HAVE_OPEN_CLIP = importlib.util.find_spec("open_clip") is not None


def make_batch(batch: int = BATCH, seed: int = 0) -> tuple:
    """``(batch dict, tokenizer)``: ``batch`` synthetic pairs at 64 px (mlip_fast.data.synth) through the default
    run's transforms and a WordPiece vocabulary trained on their reports, as the training app builds them."""
    from mlip_fast.data.synth import make_sample
    from mlip_fast.models import get_model_config, get_tokenizer
    from mlip_fast.models.hub import default_preprocess
    from mlip_fast.preprocess.reports import report_text
    from mlip_fast.preprocess.tokenization import tokenize_reports

    cfg = get_model_config("mlip-tiny")
    samples = [make_sample(seed, i, IMAGE_SIZE) for i in range(batch)]
    reports = [report_text(s["findings_text"], s["impression"]) for s in samples]
    tokenizer = get_tokenizer(cfg, corpus=reports)
    train_tf, _ = default_preprocess(cfg).transforms()
    g = torch.Generator().manual_seed(seed)
    images = torch.stack([train_tf(s["image"], generator=g) for s in samples])
    text = tokenize_reports(tokenizer, reports, cfg.text.max_length, cfg.text.max_sentences)
    return {"images": images, **text}, tokenizer


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WD)


def open_clip_step(batch: dict, vocab_size: int) -> Callable[[], float]:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg={"image_size": IMAGE_SIZE, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                    "mlp_ratio": 4.0},
        text_cfg={"context_length": batch["input_ids"].shape[1], "vocab_size": vocab_size, "width": 128,
                  "heads": 4, "layers": 2},
    )
    model.train()
    loss_fn = open_clip.ClipLoss()
    optimizer = _adamw(model.parameters())
    images = batch["images"].expand(-1, 3, -1, -1).contiguous()
    text = batch["input_ids"]

    def step() -> float:
        image_features, text_features, logit_scale = model(images, text)
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return float(loss.detach())

    return step


def _ours(mode: str, tokenizer):
    """mlip-tiny and its loss in ``mode``: "clip", "mlip" (the default run's settings, its matching included) or
    "mlip_max" (the same with the method's max matching)."""
    from mlip_fast.losses import MLIPLoss
    from mlip_fast.models import create_model, get_model_config
    from mlip_fast.train.args import SYNTHETIC_PRESET

    cfg = get_model_config("mlip-tiny")
    text = {"dropout": SYNTHETIC_PRESET.get("text_dropout", cfg.text.dropout)}
    if mode == "clip":
        cfg = cfg.replace(mask_ratio=0.0, text=text)
        criterion = MLIPLoss(lambda_local=0.0, lambda_sie=0.0)
    else:
        matching = "max" if mode == "mlip_max" else SYNTHETIC_PRESET.get("local_matching", cfg.local_matching)
        cfg = cfg.replace(mask_ratio=SYNTHETIC_PRESET["mask_ratio"], text=text, local_matching=matching)
        criterion = MLIPLoss(lambda_local=SYNTHETIC_PRESET["lambda_local"], lambda_sie=0.1,
                             local_matching=cfg.local_matching, ot_eps=cfg.ot_eps, ot_iters=cfg.ot_iters)
    torch.manual_seed(0)
    model = create_model(cfg, tokenizer=tokenizer)
    model.train()
    return model, criterion


def our_step(batch: dict, tokenizer, mode: str) -> Callable[[], float]:
    """One step of the training loop's work without DeepSpeed: forward, the loop's precision policy, the loss with
    its value checks off (as the loop runs it), backward, AdamW, the logit scales' clamp."""
    from mlip_fast import _checks
    from mlip_fast.losses import clamp_logit_scales_
    from mlip_fast.train.loop import loss_inputs

    model, criterion = _ours(mode, tokenizer)
    optimizer = _adamw(model.parameters())
    counter = iter(range(10**9))

    def step() -> float:
        seed = next(counter)
        torch.manual_seed(seed)
        outputs = loss_inputs(model(batch, seed=seed))
        with _checks.value_checks_disabled():
            loss, _ = criterion(**outputs)
        loss.backward()
        optimizer.step()
        clamp_logit_scales_(model)
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def deepspeed_step(batch: dict, tokenizer) -> Callable[[], float]:
    """The default run's step: ``ds.json``'s engine (ZeRO-2, fp32, clipping, warm-up + cosine over 1,000 steps),
    driven as ``mlip_fast.train.loop`` drives it (forward, loss, one reduction of the terms, backward, step,
    the clamp of the logit scales in the model and the optimizer's fp32 copy)."""
    from mlip_fast.train.process import init_distributed

    init_distributed()
    model, criterion = _ours("mlip", tokenizer)
    return engine_step_of(model, criterion, batch)


def engine_step_of(model, criterion, batch: dict, zero_stage: int | None = None,
                   fused_adamw: bool | None = None) -> Callable[[], float]:
    """One training step of ``model`` and ``criterion`` on ``batch`` through a DeepSpeed engine built from
    ``ds.json`` (its ZeRO stage unless ``zero_stage`` names another, its AdamW kernel unless ``fused_adamw`` says
    fused or not), as the training loop drives it; returns the step, which gives the total loss. The process group
    must be up (``init_distributed``)."""
    import deepspeed

    from mlip_fast import _checks
    from mlip_fast.train import ds_config as dsc
    from mlip_fast.train.loop import clamp_engine_logit_scales, loss_inputs
    from mlip_fast.train.run import param_groups

    raw = dsc.load_ds_config(REPO / "ds.json")
    config = dsc.resolve_schedule(dsc.resolve_batch_sizes(raw, 1), 1000)
    config["train_batch_size"], config["train_micro_batch_size_per_gpu"] = BATCH, BATCH
    if zero_stage is not None:
        config["zero_optimization"] = {"stage": zero_stage}
    if fused_adamw is not None:
        config["optimizer"]["params"]["fused"] = fused_adamw
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           model_parameters=param_groups(model, config["optimizer"]["params"]["weight_decay"]))
    engine.train()
    counter = iter(range(10**9))

    def step() -> float:
        seed = next(counter)
        torch.manual_seed(seed)
        outputs = loss_inputs(engine(batch, seed=seed))
        with _checks.value_checks_disabled():
            total, terms = criterion(**outputs)
        stats = torch.stack([terms[k].reshape(()).to(torch.float64) for k in ("loss", "loss_global")])
        engine.backward(total)
        engine.step()
        clamp_engine_logit_scales(engine.module)
        return float(stats[0])

    return step


def build(providers=PROVIDERS) -> dict:
    batch, tokenizer = make_batch()
    steps = {}
    for name in providers:
        if name == "open_clip":
            steps[name] = open_clip_step(batch, len(tokenizer))
        elif name == "ours_clip":
            steps[name] = our_step(batch, tokenizer, "clip")
        elif name in ("ours_mlip", "ours_mlip_max"):
            steps[name] = our_step(batch, tokenizer, name[len("ours_"):])
        elif name == "ours_mlip_deepspeed":
            steps[name] = deepspeed_step(batch, tokenizer)
    return steps


def measure(steps: dict, rounds: int = 15, warmup: int = 3) -> dict:
    """Interleaved rounds (one step of each provider per round): per provider the median step time, and the
    per-round ratios of each provider to open_clip (if present) and of the DeepSpeed step to the plain one."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - start)
            assert loss == loss, f"{name}: loss is NaN"
    out = {"step_s": {n: round(statistics.median(t), 4) for n, t in times.items()},
           "step_s_min": {n: round(min(t), 4) for n, t in times.items()},
           "samples_per_s": {n: round(BATCH / statistics.median(t), 1) for n, t in times.items()}, "ratios": {}}

    def ratio(a: str, b: str):
        if a in times and b in times:
            out["ratios"][f"{a} / {b}"] = round(statistics.median(x / y for x, y in zip(times[a], times[b])), 3)

    for name in ("ours_clip", "ours_mlip", "ours_mlip_max", "ours_mlip_deepspeed"):
        ratio(name, "open_clip")
    ratio("ours_mlip_deepspeed", "ours_mlip")
    ratio("ours_mlip", "ours_clip")
    ratio("ours_mlip", "ours_mlip_max")
    return out


def table(result: dict, load_before: float, load_after: float) -> list:
    """README rows: per provider its median step, samples/s and the per-round median ratio to open_clip."""
    rows = []
    for name, step_s in result["step_s"].items():
        ratio = result["ratios"].get(f"{name} / open_clip", 1.0 if name == "open_clip" else "")
        rows.append({"step (batch 64, fp32, AdamW)": name, "median s": step_s, "samples/s": result["samples_per_s"][name],
                     "/ open_clip (paired)": ratio, "load (1 min)": f"{load_before:.2f} -> {load_after:.2f}"})
    if "ours_mlip_deepspeed / ours_mlip" in result["ratios"]:
        rows.append({"step (batch 64, fp32, AdamW)": "DeepSpeed engine / plain step (ours_mlip)",
                     "median s": "", "samples/s": "", "/ open_clip (paired)": result["ratios"]["ours_mlip_deepspeed / ours_mlip"],
                     "load (1 min)": ""})
    if "ours_mlip / ours_mlip_max" in result["ratios"]:
        ot_over_max = result["ratios"]["ours_mlip / ours_mlip_max"]
        rows.append({"step (batch 64, fp32, AdamW)": "default run's matching (OT) / max matching (ours_mlip)",
                     "median s": "", "samples/s": "", "/ open_clip (paired)": ot_over_max, "load (1 min)": ""})
    return rows


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "open_clip_step_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    providers = PROVIDERS if HAVE_OPEN_CLIP else PROVIDERS[1:]
    if importlib.util.find_spec("deepspeed") is None:
        providers = tuple(p for p in providers if p != "ours_mlip_deepspeed")
    load_before = os.getloadavg()
    result = measure(build(providers), rounds=args.rounds)
    versions = {"torch": torch.__version__}
    if HAVE_OPEN_CLIP:
        import open_clip

        versions["open_clip"] = open_clip.__version__
    load_after = os.getloadavg()
    payload = {"benchmark": "bench_open_clip: one training step, batch 64, fp32, plain AdamW, mlip-tiny size",
               "environment": {**harness.environment("cpu"), **versions, "threads": args.threads,
                               "loadavg_before": [round(v, 2) for v in load_before],
                               "loadavg_after": [round(v, 2) for v in load_after]},
               "rounds": args.rounds, **result, "table": table(result, load_before[0], load_after[0])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return args.out


# -------------------------------------------------------------------------------------------- tests
def test_our_steps_run():
    """Our modes train (the loss falls over a few steps on one batch) without open_clip; "mlip" is the default
    run's step, its patch-sentence matching included."""
    from mlip_fast.train.args import SYNTHETIC_PRESET

    torch.manual_seed(0)
    batch, tokenizer = make_batch(batch=8)
    matching = {mode: _ours(mode, tokenizer)[1].config.local_matching for mode in ("mlip", "mlip_max")}
    assert matching == {"mlip": SYNTHETIC_PRESET["local_matching"], "mlip_max": "max"}
    for mode in ("clip", "mlip", "mlip_max"):
        step = our_step(batch, tokenizer, mode)
        first = step()
        for _ in range(4):
            last = step()
        assert last < first, (mode, first, last)


@pytest.mark.skipif(not HAVE_OPEN_CLIP, reason="open_clip is not installed: it needs torchvision, whose index wheels "
                                               "need the CUDA torch build; run this file in the environment of its "
                                               "docstring")
def test_open_clip_comparison():
    result = measure(build(("open_clip", "ours_clip", "ours_mlip")), rounds=3, warmup=1)
    assert set(result["ratios"]) >= {"ours_clip / open_clip", "ours_mlip / open_clip"}


if __name__ == "__main__":
    main(sys.argv[1:])
