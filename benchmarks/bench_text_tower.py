"""The report tower's training forward + backward on CPU, and its dropout masks, mlip_fast vs transformers.

Why: the default run's profile (``--profile-steps``) showed the report tower at three times the image tower's cost
although it runs fewer token-layers, from its dropout: ``bernoulli_`` draws (one Mersenne-Twister number per
element) and SDPA's CPU fallback for attention with dropout, over the whole padded [B, H, T, T]. The tower now
draws masks with :func:`mlip_fast.models.dropout.dropout` and computes attention with dropout per group of rows of
similar length (``mlip_fast.models.text``); since 2026-12-06 evening, where the C kernels build, attention with
dropout is one packed C op over the valid tokens (``mlip_fast.ops.varlen_attention``) and the hidden-state dropouts
one hashed C pass each (``mlip_fast.ops.hash_dropout``). Two measurements, fp32, training mode, dropout 0.1 (the
preset's):

- ``tower``: ``mlip-tiny``'s report tower (hidden 128, 2 layers, 4 heads) on batches of 64 synthetic-benchmark
  reports (the generator's findings + impression; WordPiece vocabulary trained on them, as the default run),
  forward + backward of [CLS] and the sentence vectors, ms per batch: ``transformers`` (the encoder's own padded
  forward: SDPA with dropout, ``nn.Dropout``) vs ``mlip_fast_pytorch`` (``TextTower`` with the C kernels off:
  padding-free, CPU dropout masks, length-grouped attention) vs ``mlip_fast`` (``TextTower`` with them).
- ``mask``: one dropout call at the tower's shapes (attention probabilities [64, 4, 110, 110], hidden states
  [3500, 128]), ms: ``F.dropout`` vs ``mlip_fast.models.dropout.dropout`` vs ``mlip_fast.ops.hash_dropout``.

Median of interleaved rounds (the two ways alternate, so machine load hits both alike):

    python benchmarks/bench_text_tower.py        # writes benchmarks/results/text_tower_cpu.json
    pytest benchmarks/bench_text_tower.py        # one small round of each, into a temp file
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness  # noqa: E402

WAYS = ("transformers", "mlip_fast_pytorch", "mlip_fast")
MASK_SHAPES = {"attention [64, 4, 110, 110]": (64, 4, 110, 110), "hidden [3500, 128]": (3500, 128)}


def synthetic_reports(n: int, seed: int = 0) -> list:
    """``n`` report texts of the synthetic benchmark's generator (findings + impression)."""
    from mlip_fast.data.synth.findings import sample_findings
    from mlip_fast.data.synth.reports import write_report

    rng = np.random.default_rng(seed)
    return [" ".join(write_report(rng, sample_findings(rng))) for _ in range(n)]


def make_tower(batches: int, batch: int = 64, seed: int = 0):
    """(model's text tower in training mode, list of tokenized batches)."""
    from mlip_fast.models import create_model

    texts = synthetic_reports(batches * batch, seed)
    torch.manual_seed(seed)
    model = create_model("mlip-tiny", corpus=texts).train()
    return model.text, [model.tokenize(texts[i * batch:(i + 1) * batch]) for i in range(batches)]


@contextlib.contextmanager
def _kernels(on: bool):
    """The C kernels on or off (``MLIP_FAST_CPU_KERNELS``, read at every call) for the duration."""
    before = os.environ.get("MLIP_FAST_CPU_KERNELS")
    os.environ["MLIP_FAST_CPU_KERNELS"] = "1" if on else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["MLIP_FAST_CPU_KERNELS"]
        else:
            os.environ["MLIP_FAST_CPU_KERNELS"] = before


def _tower_step(tower, batches: list, way: str) -> None:
    from mlip_fast.models.text import pool_sentences

    keys = ("input_ids", "attention_mask", "sentence_spans", "sentence_mask")
    for b in batches:
        if way == "transformers":
            hidden = tower.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            cls, sentences = hidden[:, 0], pool_sentences(hidden, b["sentence_spans"], b["sentence_mask"])
        else:
            with _kernels(way == "mlip_fast"):
                cls, sentences = tower(*(b[k] for k in keys))
        with _kernels(way == "mlip_fast"):
            (cls.sum() + sentences.sum()).backward()


def _median_ms(fns: dict, rounds: int, number: int) -> dict:
    return {name: statistics.median(t) * 1e3 for name, t in harness.interleaved_times(fns, rounds, number).items()}


def measure(rounds: int = 5, batches: int = 4, mask_number: int = 10) -> dict:
    from mlip_fast.models.dropout import dropout
    from mlip_fast.ops.hash_dropout import hash_dropout

    tower, data = make_tower(batches)
    lengths = [int(b["attention_mask"].shape[1]) for b in data]
    valid = [round(float(b["attention_mask"].sum(1).float().mean()), 1) for b in data]
    ms = _median_ms({way: (lambda w=way: _tower_step(tower, data, w)) for way in WAYS}, rounds, 1)
    rows = [{"what": "tower", "case": f"{batches} batches of 64 reports, padded T {lengths}, mean valid {valid}",
             "way": way, "ms": round(ms[way] / batches, 2), "per": "batch of 64"} for way in WAYS]
    for label, shape in MASK_SHAPES.items():
        x = torch.randn(shape)
        ms = _median_ms({"transformers": lambda: F.dropout(x, 0.1, True), "mlip_fast_pytorch": lambda: dropout(x, 0.1),
                         "mlip_fast": lambda: hash_dropout(x, 0.1, 12345)}, rounds, mask_number)
        rows += [{"what": "mask", "case": label, "way": way, "ms": round(ms[way], 3), "per": "call"} for way in WAYS]
    return {"environment": dict(harness.environment(), threads=torch.get_num_threads(),
                                load_1min=round(os.getloadavg()[0], 2)),
            "what": "report tower forward + backward (training mode, dropout 0.1, fp32) per batch of 64, and one "
                    "dropout call, median of interleaved rounds; 'transformers' = the encoder's padded forward and "
                    "F.dropout, 'mlip_fast_pytorch' = TextTower with the C kernels off / mlip_fast.models.dropout, "
                    "'mlip_fast' = TextTower with them / mlip_fast.ops.hash_dropout",
            "rounds": rounds, "table": rows}


def test_text_tower_ways(benchmark):
    """Both ways run at every case (the numbers are the JSON's, not asserted)."""
    result = benchmark.pedantic(measure, args=(1, 1, 1), rounds=1, iterations=1)
    rows = result["table"]
    assert {(r["what"], r["way"]) for r in rows} == {(w, way) for w in ("tower", "mask") for way in WAYS}
    assert all(r["ms"] > 0 for r in rows)


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description="report tower training cost -> benchmarks/results/text_tower_cpu.json")
    parser.add_argument("--out", type=Path, default=harness.RESULTS / "text_tower_cpu.json")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args(argv)
    return harness.write_result(args.out, measure(args.rounds, args.batches), lambda r: (
        f"{r['what']:<6} {r['way']:<13} {r['ms']:>9} ms per {r['per']}  {r['case']}"))


if __name__ == "__main__":
    main()
