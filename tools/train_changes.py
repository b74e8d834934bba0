"""Each speed change of the default run's training step, measured before / after in one process.

The step is the max-matching MLIP step: mlip-tiny through the DeepSpeed engine of ``ds.json`` (ZeRO, fp32, clipping,
the schedule), the MLIP loss with the preset's weights, the method's max matching and the preset's mask ratio of
that time, 0.25 (the default run's until 2026-12-06; what its optimal-transport matching costs on top is
``bench_open_clip``'s ``ours_mlip / ours_mlip_max``), on one batch of 64 synthetic pairs (``bench_open_clip``'s
batch). A change is a pair of engines that differ in one thing; their steps alternate (one of each per round, after
warm-up), so a drift of the machine's speed hits both, and the reported ratio after / before is the median of the
per-round ratios. The load average is recorded before and after (the machine is shared).

Changes (``--only`` picks some):

- ``text_dropout``: the report encoder's dropout 0.1 -> 0 (dropout forces PyTorch's math attention, with a
  Bernoulli draw per attention probability, where the fused CPU kernel runs without it);
- ``zero_stage``: ZeRO-2 -> ZeRO-1 (one process: the same update; stage 2 copies each gradient into its
  reduction buckets during backward);
- ``threads``: 1 -> 2 intra-op threads (``torch.set_num_threads`` before each step);
- ``compile``: eager -> ``torch.compile`` of the two towers (inductor, dynamic report length); the compile time
  is reported, and the steps a run needs before the compiled step has paid for it;
- ``report_tower_dropout``: the report encoder with the preset's dropout 0.1, its padding-free path as before the
  CPU dropout changes (SDPA's fallback with ``bernoulli_`` over the padded batch, ``F.dropout``) -> with them
  (``mlip_fast.models.dropout`` masks, length-grouped explicit attention; ``text.CPU_DROPOUT_PATH``);
- ``chunked_tiles``: the patch-sentence op's tiles of 2**17 -> 2**21 similarity cells (``chunked.TILE_ELEMENTS``);
- ``fused_adamw``: torch's AdamW for-loop implementation -> its fused kernel (``"fused": true`` in ``ds.json``), with
  the preset's report-tower dropout.

The data path (DataLoader workers vs ``--in-memory``), the evaluation / checkpoint cadence and the whole default
run are measured as whole commands (docs/training.md, "Where the time goes").

    python -m tools.train_changes [--only text_dropout zero_stage] [--rounds 12]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks import harness
from benchmarks.bench_open_clip import engine_step_of, make_batch
from mlip_fast.losses import MLIPLoss
from mlip_fast.models import create_model, get_model_config, text
from mlip_fast.ops.patch_sentence import chunked
from mlip_fast.train.args import MAX_PRESET_MASK_RATIO, SYNTHETIC_PRESET
from mlip_fast.train.process import init_distributed

REPO = harness.ROOT

CHANGES = ("text_dropout", "zero_stage", "threads", "compile", "report_tower_dropout", "chunked_tiles", "fused_adamw")


def engine_step(batch: dict, tokenizer, *, text_dropout: float = 0.0, zero_stage: int = 2,
                compile_towers: bool = False, fused_adamw: bool = True) -> Callable[[], float]:
    """The training loop's step (forward, loss with value checks off, backward, engine step, logit-scale clamp) on
    a DeepSpeed engine built from ``ds.json`` with the given changes."""
    init_distributed()
    cfg = get_model_config("mlip-tiny").replace(mask_ratio=MAX_PRESET_MASK_RATIO,
                                                text={"dropout": text_dropout})
    torch.manual_seed(0)
    model = create_model(cfg, tokenizer=tokenizer)
    if compile_towers:
        model.visual = torch.compile(model.visual)
        model.text = torch.compile(model.text, dynamic=True)
    criterion = MLIPLoss(lambda_local=SYNTHETIC_PRESET["lambda_local"], lambda_sie=0.1)
    return engine_step_of(model, criterion, batch, zero_stage=zero_stage, fused_adamw=fused_adamw)


def pair(name: str, batch: dict, tokenizer) -> tuple:
    """(before step, after step, labels, set-up seconds of each)."""
    timed = {}

    def build(label: str, **kw):
        start = time.perf_counter()
        step = engine_step(batch, tokenizer, **kw)
        timed[label] = time.perf_counter() - start
        return step

    if name == "text_dropout":
        labels = ("dropout 0.1", "dropout 0")
        return build(labels[0], text_dropout=0.1), build(labels[1], text_dropout=0.0), labels, timed
    if name == "zero_stage":
        labels = ("ZeRO-2", "ZeRO-1")
        return build(labels[0], zero_stage=2), build(labels[1], zero_stage=1), labels, timed
    if name == "fused_adamw":
        labels = ("AdamW for-loop", "AdamW fused")
        return (build(labels[0], text_dropout=0.1, fused_adamw=False), build(labels[1], text_dropout=0.1),
                labels, timed)
    if name == "threads":
        labels = ("1 thread", "2 threads")
        step = build("engine")

        def with_threads(n: int):
            def run():
                torch.set_num_threads(n)
                return step()
            return run

        return with_threads(1), with_threads(2), labels, timed
    if name == "compile":
        labels = ("eager", "compiled towers")
        before, after = build(labels[0]), build(labels[1], compile_towers=True)
        start = time.perf_counter()
        after()  # the first step compiles (forward and backward graphs)
        timed["first compiled step"] = time.perf_counter() - start
        return before, after, labels, timed
    if name in ("report_tower_dropout", "chunked_tiles"):
        step = build("engine", text_dropout=0.1)
        if name == "report_tower_dropout":
            labels = ("SDPA fallback + bernoulli_", "CPU masks + grouped attention")

            def apply(on: bool) -> None:
                text.CPU_DROPOUT_PATH = on
        else:
            labels = ("tiles of 2**17", "tiles of 2**21")

            def apply(on: bool) -> None:
                chunked.patch_sentence_scores_chunked.__defaults__ = (2**21 if on else 2**17,)

        def setting(on: bool):  # the code's setting is the "after" one: restored after every step
            def run():
                apply(on)
                try:
                    return step()
                finally:
                    apply(True)
            return run

        return setting(False), setting(True), labels, timed
    raise ValueError(f"unknown change {name!r}; choose from {CHANGES}")


def measure(before: Callable, after: Callable, rounds: int, warmup: int = 3) -> dict:
    for _ in range(warmup):
        before(), after()
    a, b = [], []
    for _ in range(rounds):
        for step, out in ((before, a), (after, b)):
            start = time.perf_counter()
            step()
            out.append(time.perf_counter() - start)
    return {"before_ms": round(1e3 * statistics.median(a), 1), "after_ms": round(1e3 * statistics.median(b), 1),
            "ratio_after_before": round(statistics.median(y / x for x, y in zip(a, b)), 3),
            "ratio_range": f"{min(y / x for x, y in zip(a, b)):.3f} - {max(y / x for x, y in zip(a, b)):.3f}"}


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m tools.train_changes", description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=CHANGES, default=list(CHANGES))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "train_changes_cpu.json")
    args = parser.parse_args(argv)
    batch, tokenizer = make_batch()
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    rows = {row["change"]: row for row in previous.get("table", [])}
    for name in args.only:
        torch.set_num_threads(args.threads)
        load_before = os.getloadavg()[0]
        before, after, labels, setup = pair(name, batch, tokenizer)
        result = measure(before, after, args.rounds)
        row = {"change": name, "before": labels[0], "after": labels[1], **result,
               "threads": args.threads if name != "threads" else "1 vs 2", "rounds": args.rounds,
               "load (1 min)": f"{load_before:.2f} -> {os.getloadavg()[0]:.2f}",
               "set-up (s)": "; ".join(f"{k} {v:.1f}" for k, v in setup.items())}
        if name == "compile":
            saved = (result["before_ms"] - result["after_ms"]) / 1e3
            cost = setup["first compiled step"] - result["after_ms"] / 1e3
            row["break_even_steps"] = round(cost / saved) if saved > 0 else None
        rows[name] = row
        print(json.dumps(row))
    payload = {"benchmark": "bench_train_changes: the default run's DeepSpeed step, before / after each change, "
                            "batch 64, fp32, interleaved in one process",
               "environment": harness.environment("cpu"), "table": list(rows.values())}
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
